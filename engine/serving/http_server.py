"""The OpenAI-compatible HTTP front end: a FastAPI app served by uvicorn in its own thread, over the same
engine instance (one scheduler, one KV pool, one prefix cache) and the same metrics registry as gRPC.

    GET  /v1/models, /v1/models/{id}       the served model
    POST /v1/completions                   prompt: a string or token ids; SSE with "stream": true
    POST /v1/chat/completions              messages rendered with the model's chat template
    GET  /health                           200 once warmed up; 503 while loading or draining
    GET  /metrics                          Prometheus text (the registry --metrics-port serves)
    POST /reset_prefix_cache               drops every cached KV block not in use

Lifecycle, driven by EngineServer (engine/serving/engine_server.py) like the gRPC servicer: construction
binds the port (a taken port fails before the model loads), `start()` serves (generation answers 503),
`attach(engine)` serves the engine, `drain()` refuses new requests (503) while in-flight ones finish,
`stop()` closes everything.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.serving import http_convert
from engine.serving.front_end_gate import FrontEndGate
from engine.serving.http_errors import HttpError, error_response, install_handlers, param_of
from engine.serving.http_models import ChatCompletionRequest, CompletionRequest
from engine.serving.http_stream import EngineResponse
from engine.serving.metrics import ServerMetrics
from engine.core.request import EngineUnavailableError, QueueFullError

log = logging.getLogger(__name__)
OWNED_BY = "jax-paged-engine"    # /v1/models' owned_by: how the benchmark recognises our server
STOP_SECONDS = 5.0               # uvicorn's grace for connections still open when it stops


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket on host:port (0 picks a free port); raises OSError."""
    errors = []
    for family, kind, proto, _, addr in socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE):
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
            return sock
        except OSError as e:
            sock.close()
            errors.append(e)
    raise OSError(errors[0].errno if errors else None, "; ".join(e.strerror or str(e) for e in errors))


class _Uvicorn(uvicorn.Server):
    """uvicorn.Server that says when it is listening (or gave up)."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets=None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()


class HttpFrontEnd(FrontEndGate):
    """The HTTP server and the state its routes share; the lifecycle (attach, drain, mark_failed, wait_idle)
    and the in-flight count are the FrontEndGate's."""

    def __init__(self, metrics: ServerMetrics, host: str = "127.0.0.1", port: int = 0):
        super().__init__()
        self.metrics = metrics
        self.executor: ThreadPoolExecutor | None = None   # blocking RequestStream reads, one per stream
        self._created = int(time.time())
        self._socket = bind_socket(host, port)
        self.port = self._socket.getsockname()[1]
        self.url = f"http://{f'[{host}]' if ':' in host.strip('[]') else host}:{self.port}"
        config = uvicorn.Config(create_app(self), log_config=None, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=STOP_SECONDS)
        self._server = _Uvicorn(config)
        self._thread: threading.Thread | None = None

    # -- lifecycle (called by engine/serving/engine_server.py) ---------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="http", daemon=True)
        self._thread.start()
        if not self._server.ready.wait(30.0) or not self._server.started:
            raise RuntimeError(f"the HTTP server on {self.url} did not start")

    def attach(self, engine) -> None:
        cfg = engine.config
        # Every admitted stream blocks one reader thread while it waits for tokens (as gRPC's workers do).
        self.executor = ThreadPoolExecutor(cfg.max_batch_size + cfg.max_waiting_requests + 8, "http-stream")
        super().attach(engine)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_SECONDS + 5.0)
        self._socket.close()
        if self.executor is not None:
            self.executor.shutdown(wait=False)

    # -- used by the routes (the gate's GateClosed answers 503: engine/serving/http_errors.py) -------------
    def model_card(self) -> dict:
        engine = self.ready_engine()
        return {"id": engine.model_name, "object": "model", "created": self._created, "owned_by": OWNED_BY,
                "max_model_len": engine.config.max_length,
                "prefix_caching": engine.config.enable_prefix_caching}   # an extension, for the benchmark


def _add_request(front: HttpFrontEnd, engine, request):
    """engine.add_request with its errors mapped to HTTP statuses."""
    try:
        return engine.add_request(request)
    except QueueFullError:
        raise HttpError(429, f"the waiting queue is full (--max-waiting-requests="
                             f"{engine.config.max_waiting_requests}); retry later", code="queue_full") from None
    except EngineUnavailableError as e:
        raise HttpError(503, f"the engine is unavailable: {e}", code="unavailable") from None
    except ValueError as e:  # the engine's own checks name the field (LLMEngine.validate)
        raise HttpError(400, str(e), param_of(str(e), frozenset({"prompt", "messages", "max_tokens"}))) from None
    except RuntimeError:
        if front.draining:
            raise HttpError(503, "the server is shutting down", code="unavailable") from None
        raise  # an engine bug: 500, logged by the handler


def _generate(front: HttpFrontEnd, body) -> EngineResponse:
    engine = front.enter()
    try:
        timer = front.metrics.tracker()  # TTFT counts tokenization and queueing, as for gRPC
        request, call = http_convert.build(body, engine)
        stream = _add_request(front, engine, request)
    except BaseException:
        front.leave()
        raise
    return EngineResponse(engine, stream, call, front.executor, timer, on_end=front.leave)


def create_app(front: HttpFrontEnd) -> FastAPI:
    """The routes. Generation handlers are plain `def`s: FastAPI runs them in a worker thread, so
    tokenizing a long prompt never stalls the event loop that writes every stream."""
    app = FastAPI(title="jax-paged-engine (OpenAI-compatible)", docs_url=None, redoc_url=None)
    install_handlers(app)

    @app.post("/v1/completions")
    def completions(body: CompletionRequest):
        return _generate(front, body)

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatCompletionRequest):
        return _generate(front, body)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [front.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str):
        card = front.model_card()
        if model_id != card["id"]:
            return error_response(404, f"model={model_id!r} does not exist; this server serves {card['id']!r}",
                                  "model", "model_not_found")
        return card

    @app.get("/health")
    def health():
        front.ready_engine()
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(front.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reset_prefix_cache")
    def reset_prefix_cache():
        return JSONResponse({"reset": bool(front.ready_engine().reset_prefix_cache())})

    return app
