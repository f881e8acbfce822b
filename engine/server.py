"""`python -m engine.server`: serves one model over gRPC (engine.v1.Engine, health, reflection, metrics) and
the OpenAI-compatible HTTP API (engine/http_server.py; --http-port, 0 = off) on the same engine instance.

Start-up order, and why:
  1. flags -> EngineConfig (engine.flags): a bad value fails in one line before anything heavy is imported;
  2. bind the gRPC and HTTP ports, start health (NOT_SERVING; HTTP /health 503) and reflection: a taken
     port fails before minutes of model loading, and orchestrators can probe the server while it loads;
  3. build the engine, warm it up (compiles every bucket), start its loop, then report SERVING.
SIGTERM / SIGINT: stop admitting on both front ends (gRPC UNAVAILABLE, HTTP 503), let in-flight streams
finish for --shutdown-grace-seconds, abort the rest (gRPC: finish_reason ABORT; HTTP: an error event),
shut the engine down and exit 0. A signal while the model is still loading (nothing in flight yet), or a
second signal, exits at once.

    python -m engine.server --model-path=model.gguf --port=50051 --http-port=8000 --metrics-port=9090
"""
from __future__ import annotations

import functools
import logging as std_logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent import futures
from typing import Callable

import grpc
from absl import app, logging
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.config import EngineConfig
from engine.flags import FlagError, ServeOptions, config_from_flags, define_flags, parse_argv
from engine.metrics import ServerMetrics
from engine.servicer import SERVICE_NAME, EngineServicer, add_to_server

MIN_WORKERS = 64         # every open stream holds one gRPC worker thread
ABORT_WAIT_SECONDS = 5.0  # after aborting, how long streams get to send their last (ABORT) message


class ServeError(RuntimeError):
    """The server cannot start (port taken, engine unavailable); the message is one line."""


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _check_port_free(host: str, port: int) -> None:
    """Fails in one line when nothing can listen on host:port. gRPC would say so too, but only after
    logging a multi-line core error; a plain bind probe (same SO_REUSEADDR as gRPC) says it cleanly."""
    if port == 0:
        return
    errors = []
    for family, kind, proto, _, addr in socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(addr)
                return  # gRPC, like this probe, needs only one of the resolved addresses
            except OSError as e:
                errors.append(e.strerror)
    raise ServeError(f"--port={port}: cannot listen on {_address(host, port)} ({'; '.join(errors)})")


def _http_front_end(metrics: ServerMetrics, host: str, port: int | None):
    """The OpenAI-compatible HTTP front end on `port` (None = off; 0 = a free port), bound now so that a
    taken port fails before the model loads. FastAPI is imported only when HTTP is on."""
    if port is None:
        return None
    from engine.http_server import HttpFrontEnd
    try:
        return HttpFrontEnd(metrics, host.strip("[]"), port)
    except OSError as e:
        raise ServeError(f"--http-port={port}: cannot listen on {_address(host, port)} ({e.strerror})") from None


class EngineServer:
    """A gRPC server (engine.v1.Engine + grpc.health.v1 + reflection), its /metrics endpoint and, with
    `http_port`, the OpenAI-compatible HTTP front end (`self.http`) over the same engine.

    Construction binds the ports (raising ServeError); `start()` starts answering (health NOT_SERVING);
    `attach(engine)` warms the engine up, starts it and reports SERVING; `shutdown(grace)` drains.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, metrics_port: int | None = None,
                 max_workers: int = MIN_WORKERS, http_port: int | None = None):
        self.metrics = ServerMetrics(self._stats)
        self.servicer = EngineServicer(self.metrics)
        # so_reuseport=0: otherwise a second server silently shares a port that is already taken.
        self._server = grpc.server(futures.ThreadPoolExecutor(max(max_workers, MIN_WORKERS), "grpc"),
                                   options=[("grpc.so_reuseport", 0)])
        add_to_server(self.servicer, self._server)
        # Health Watch streams are long-lived: give them their own pool, not the Generate workers.
        self.health = health.HealthServicer(experimental_non_blocking=True,
                                            experimental_thread_pool=futures.ThreadPoolExecutor(2, "health"))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self._server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        _check_port_free(host, port)
        try:
            self.port = self._server.add_insecure_port(_address(host, port))
        except RuntimeError as e:
            raise ServeError(f"--port={port}: {e}") from None
        self.address = _address(host, self.port)
        self.metrics_port = None
        if metrics_port is not None:
            try:
                self.metrics_port = self.metrics.start_http(metrics_port, host.strip("[]"))
            except OSError as e:
                raise ServeError(f"--metrics-port={metrics_port}: cannot listen on {host} ({e.strerror})") from None
        self.http = _http_front_end(self.metrics, host, http_port)
        self._front_ends = [self.servicer] + ([self.http] if self.http else [])

    def _stats(self):
        engine = self.servicer.engine
        return engine.stats() if engine is not None else None

    def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):  # "" = the whole server, as load balancers ask
            self.health.set(service, status)

    def start(self) -> None:
        self._server.start()
        if self.http:
            self.http.start()

    def attach(self, engine) -> None:
        """Warms the engine up (compiling every bucket), starts its loop, then serves it: SERVING."""
        engine.warmup()
        engine.start()
        for front_end in self._front_ends:
            front_end.attach(engine)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def shutdown(self, grace: float) -> None:
        """Stops admitting, waits up to `grace` s for in-flight streams, aborts the rest, stops everything."""
        for front_end in self._front_ends:
            front_end.drain()
        self.health.enter_graceful_shutdown()  # NOT_SERVING for every service from now on
        deadline = time.monotonic() + grace
        if not all(f.wait_idle(max(0.0, deadline - time.monotonic())) for f in self._front_ends):
            logging.warning("shutdown: aborting the streams still running after %.1f s", grace)
        engine = self.servicer.engine
        if engine is not None:
            engine.shutdown(abort_inflight=True)  # remaining streams get a last message with ABORT
        for front_end in self._front_ends:
            front_end.wait_idle(ABORT_WAIT_SECONDS)
        self._server.stop(grace=1.0).wait()
        if self.http:
            self.http.stop()
        self.metrics.stop_http()


def _load_llm_engine(config: EngineConfig):
    """The real engine, imported only now: JAX is slow to import and flags were checked without it."""
    # JAX logs an INFO line per backend it fails to find (tpu, proxy): noise for a CPU/GPU server.
    std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
    try:
        from engine.engine import LLMEngine
    except ImportError as e:
        raise ServeError(f"cannot import the engine (engine.engine.LLMEngine): {e}") from None
    return LLMEngine(config)


class _Signals:
    """SIGTERM/SIGINT. While serving: set `stop` (graceful shutdown). Before serving (the model is still
    loading, nothing is in flight) or on a second signal: exit at once."""

    def __init__(self):
        self.stop = threading.Event()
        self.serving = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.serving and not self.stop.is_set():
            self.stop.set()
            return
        print(f"engine.server: {signal.Signals(signum).name}; exiting now", file=sys.stderr, flush=True)
        os._exit(1 if self.stop.is_set() else 0)


def _fail(message, code: int) -> None:
    print(f"engine.server: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def serve(config: EngineConfig, options: ServeOptions, engine_factory: Callable | None = None) -> int:
    """Runs the server until SIGTERM/SIGINT; returns the exit status. `engine_factory(config)` builds
    the engine (default: engine.engine.LLMEngine; the tests pass their FakeEngine)."""
    if options.num_processes:  # multi-host: join the JAX runtime before JAX touches a device
        std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
        from engine.distributed import maybe_initialize, require_single_process
        try:
            maybe_initialize(options.coordinator_address, options.num_processes, options.process_id)
            require_single_process()
        except ValueError as e:
            _fail(e, 2)
    signals = _Signals()
    workers = config.max_batch_size + config.max_waiting_requests + 8  # every admitted stream holds a thread
    try:
        server = EngineServer(options.host, options.port, options.metrics_port, max_workers=workers,
                              http_port=options.http_port)
    except ServeError as e:
        _fail(e, 1)
    server.start()
    try:
        engine = (engine_factory or _load_llm_engine)(config)
        server.attach(engine)
    except (ValueError, ServeError) as e:  # LLMEngine raises ValueError for a bad model path / setting
        server.shutdown(grace=0)
        _fail(e, 1)
    signals.serving = True  # from here on a signal drains instead of exiting at once
    metrics = f"; metrics at :{server.metrics_port}/metrics" if server.metrics_port else ""
    metrics += f"; OpenAI-compatible HTTP at {server.http.url}/v1" if server.http else ""
    print(f"engine.server: serving {engine.model_name} on {server.address} "
          f"(devices {engine.device_description}{metrics})", flush=True)
    while not signals.stop.wait(1.0):  # a timed wait keeps the main thread responsive to signals
        pass
    logging.info("engine.server: shutting down (grace %.1f s)", options.shutdown_grace_seconds)
    server.shutdown(options.shutdown_grace_seconds)
    return 0


def _main(argv: list[str], engine_factory: Callable | None) -> int:
    if len(argv) > 1:
        _fail(f"unexpected argument {argv[1]!r}; every option is a --flag (see --helpfull)", 2)
    try:
        config, options = config_from_flags()
    except FlagError as e:
        _fail(e, 2)
    return serve(config, options, engine_factory)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return parse_argv(argv)
    except FlagError as e:
        _fail(e, 2)


def run(argv: list[str] | None = None, engine_factory: Callable | None = None) -> None:
    """The `python -m engine.server` entry point (exits the process)."""
    define_flags()
    app.run(functools.partial(_main, engine_factory=engine_factory), argv=argv, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
