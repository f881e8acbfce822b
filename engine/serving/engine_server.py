"""EngineServer: one model's front ends over one engine — the gRPC server (engine.v1.Engine, grpc.health.v1,
reflection), its Prometheus /metrics endpoint and, with an HTTP port, the OpenAI-compatible HTTP API
(engine/serving/http_server.py) — with their lifecycle: bind (a taken port fails in one line before the model
loads), answer NOT_SERVING, attach the engine (SERVING), watch it, drain. The process around it (flags,
signals, groups, exit statuses) is engine/server.py.
"""
from __future__ import annotations

import socket
import threading
import time
from concurrent import futures

import grpc
from absl import logging
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.serving.metrics import ServerMetrics
from engine.serving.servicer import DEFAULT_MAX_CONCURRENT_RPCS, SERVICE_NAME, EngineServicer, add_to_server

# Every open Generate stream holds a gRPC worker thread; these few more keep GetModelInfo, health checks and
# reflection answering while --max-concurrent-rpcs streams are open.
EXTRA_WORKERS = 16
# The end of a shutdown: stopping the engine loop (one step), the streams' last messages, gRPC's stop.
ABORT_RESERVE_SECONDS = 3.0


class ServeError(RuntimeError):
    """The server cannot start (port taken, engine unavailable); the message is one line."""


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _check_port_free(host: str, port: int) -> None:
    """Fails in one line when the host does not resolve or nothing can listen on host:port. gRPC would say so
    too, but only after logging a multi-line core error; a plain bind probe (same SO_REUSEADDR as gRPC) says
    it cleanly."""
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ServeError(f"--host={host}: not an address this machine can listen on "
                         f"({getattr(e, 'strerror', None) or e})") from None
    if port == 0:
        return
    errors = []
    for family, kind, proto, _, addr in addresses:
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
    from engine.serving.http_server import HttpFrontEnd
    try:
        return HttpFrontEnd(metrics, host.strip("[]"), port)
    except OSError as e:
        raise ServeError(f"--http-port={port}: cannot listen on {_address(host, port)} ({e.strerror})") from None


class EngineServer:
    """A gRPC server (engine.v1.Engine + grpc.health.v1 + reflection), its /metrics endpoint and, with
    `http_port`, the OpenAI-compatible HTTP front end (`self.http`) over the same engine.

    Construction binds the ports (raising ServeError); `start()` starts answering (health NOT_SERVING);
    `attach(engine)` warms the engine up, starts it and reports SERVING, then watches it: if it dies, health
    goes NOT_SERVING and `failure` / `wait_failed` say why; `shutdown(timeout)` drains.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, metrics_port: int | None = None,
                 max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS, http_port: int | None = None):
        self.metrics = ServerMetrics(self._stats)
        self.servicer = EngineServicer(self.metrics, max_concurrent_rpcs)
        self.failure: str | None = None
        self._failed = threading.Event()
        workers = max_concurrent_rpcs + EXTRA_WORKERS
        # so_reuseport=0: otherwise a second server silently shares a port that is already taken.
        # maximum_concurrent_rpcs: past the pool gRPC refuses calls (RESOURCE_EXHAUSTED) instead of queueing
        # them without bound; the servicer refuses Generate earlier, at --max-concurrent-rpcs, naming the flag.
        self._server = grpc.server(futures.ThreadPoolExecutor(workers, "grpc"), options=[("grpc.so_reuseport", 0)],
                                   maximum_concurrent_rpcs=workers)
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
        threading.Thread(target=self._watch, args=(engine,), name="engine-watch", daemon=True).start()

    def _watch(self, engine) -> None:
        """Waits for the engine to stop; if it died (rather than being shut down), stops serving."""
        reason = engine.wait_until_stopped()
        if reason is None:
            return
        logging.error("engine.server: the engine failed: %s", reason)
        for front_end in self._front_ends:
            front_end.mark_failed(reason)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.failure = reason
        self._failed.set()

    def wait_failed(self, timeout: float | None = None) -> str | None:
        """Blocks until the engine has died (or `timeout` passes); returns why, or None."""
        self._failed.wait(timeout)
        return self.failure

    def shutdown(self, timeout: float) -> None:
        """Stops admitting; in-flight streams may finish for `timeout - ABORT_RESERVE_SECONDS`, then the rest are
        aborted and everything stops. Returns within max(timeout, ABORT_RESERVE_SECONDS) s plus a little."""
        drain_until = time.monotonic() + max(0.0, timeout - ABORT_RESERVE_SECONDS)
        for front_end in self._front_ends:
            front_end.drain()
        self.health.enter_graceful_shutdown()  # NOT_SERVING for every service from now on
        if not all(f.wait_idle(max(0.0, drain_until - time.monotonic())) for f in self._front_ends):
            logging.warning("shutdown: aborting the streams still running after %.1f s", timeout)
        deadline = time.monotonic() + ABORT_RESERVE_SECONDS
        left = lambda: max(0.0, deadline - time.monotonic())
        engine = self.servicer.engine
        if engine is not None:  # remaining streams get a last message with ABORT
            engine.shutdown(abort_inflight=True, timeout=ABORT_RESERVE_SECONDS * 2 / 3)
        for front_end in self._front_ends:
            front_end.wait_idle(max(0.0, left() - 0.5))
        self._server.stop(grace=min(0.5, left())).wait(left() + 0.5)
        if self.http:
            self.http.stop()
        self.metrics.stop_http()
