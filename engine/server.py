"""`python -m engine.server`: serves one model over gRPC (engine.v1.Engine, health, reflection, metrics) and
the OpenAI-compatible HTTP API (engine/serving/http_server.py; --http-port, 0 = off) on the same engine instance.

Start-up order, and why:
  1. flags -> EngineConfig (engine.flags): a bad value fails in one line before anything heavy is imported;
  2. bind the gRPC and HTTP ports, start health (NOT_SERVING; HTTP /health 503) and reflection: a taken
     port fails before minutes of model loading, and orchestrators can probe the server while it loads;
  3. build the engine, warm it up (compiles every bucket), start its loop, then report SERVING.
Any start-up failure (bad host, unloadable model or tokenizer, an XLA error or out of memory in warm-up)
prints one line and exits 1.
SIGTERM / SIGINT: stop admitting on both front ends (gRPC UNAVAILABLE, HTTP 503), let in-flight streams
finish, abort the rest (gRPC: finish_reason ABORT; HTTP: an error event), shut the engine down and exit 0 —
all within --shutdown-timeout-seconds (at least ABORT_RESERVE_SECONDS). A signal while the model is still
loading, or a second signal, exits at once.
If the engine dies (a fault it cannot recover from): health NOT_SERVING, every call UNAVAILABLE (HTTP 503),
and the process exits 1 so that its supervisor (Kubernetes, systemd) restarts it — WORKSPACE.md § Faults.

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
from engine.serving.metrics import ServerMetrics
from engine.core.request import describe_exception
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


def _load_llm_engine(config: EngineConfig, group=None):
    """The real engine, imported only now: JAX is slow to import and flags were checked without it."""
    # JAX logs an INFO line per backend it fails to find (tpu, proxy): noise for a CPU/GPU server.
    std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
    try:
        from engine.core.engine import LLMEngine
    except ImportError as e:
        raise ServeError(f"cannot import the engine (engine.core.engine.LLMEngine): {e}") from None
    return LLMEngine(config, group=group)


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


def _fail(message, code: int, now: bool = False) -> None:
    """One line on stderr, then exit. `now` (a multi-process group): skip the atexit handlers, whose
    jax.distributed shutdown barrier would wait for processes that are gone."""
    print(f"engine.server: {message}", file=sys.stderr, flush=True)
    if now:
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


def _join_group(config: EngineConfig, options: ServeOptions):
    """Multi-process flags: the rendezvous and jax.distributed (engine/device/distributed.py), before JAX touches a
    device. Returns process 0's Leader, a follower's link to process 0, or None for a group of one."""
    std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
    from engine.device.distributed import fingerprint, start_group
    try:
        return start_group(options.coordinator_address, options.num_processes, options.process_id,
                           options.distributed_timeout_seconds, fingerprint(config))
    except ValueError as e:
        _fail(e, 1, now=True)


def _follow(config: EngineConfig, options: ServeOptions, link) -> int:
    """A follower: no front ends; it runs process 0's steps until told to stop (engine/device/follower.py)."""
    from engine.device.follower import follow
    try:
        status = follow(config, link, options.shutdown_timeout_seconds)
    except Exception as e:  # noqa: BLE001 — loading failed: one line; process 0 sees the channel close
        _fail(f"follower {options.process_id}: loading the model failed: {describe_exception(e)}", 1, now=True)
    if status:
        _fail(f"follower {options.process_id} stopped with status {status}", status, now=True)
    return 0


def serve(config: EngineConfig, options: ServeOptions, engine_factory: Callable | None = None) -> int:
    """Runs the server until SIGTERM/SIGINT; returns the exit status. `engine_factory(config)` builds
    the engine (default: engine.core.engine.LLMEngine; the tests pass their FakeEngine)."""
    group = _join_group(config, options) if options.num_processes else None
    if group is not None and options.process_id != 0:
        return _follow(config, options, group)
    if group is not None and engine_factory is None:
        engine_factory = functools.partial(_load_llm_engine, group=group)
    now = group is not None
    signals = _Signals()
    try:
        server = EngineServer(options.host, options.port, options.metrics_port, options.max_concurrent_rpcs,
                              http_port=options.http_port)
    except ServeError as e:
        _fail(e, 1, now)
    server.start()
    engine = _start_engine(server, config, engine_factory, now)
    signals.serving = True  # from here on a signal drains instead of exiting at once
    metrics = f"; metrics at :{server.metrics_port}/metrics" if server.metrics_port else ""
    metrics += f"; OpenAI-compatible HTTP at {server.http.url}/v1" if server.http else ""
    print(f"engine.server: serving {engine.model_name} on {server.address} "
          f"(devices {engine.device_description}{metrics})", flush=True)
    # A timed wait keeps the main thread responsive to signals.
    while not signals.stop.wait(0.5) and server.failure is None:
        pass
    if server.failure is not None:
        server.shutdown(0)
        _fail(f"the engine failed ({server.failure}); exiting with status 1 so that a supervisor restarts "
              "the server", 1, now)
    logging.info("engine.server: shutting down (within %.1f s)", options.shutdown_timeout_seconds)
    server.shutdown(options.shutdown_timeout_seconds)
    return 0


def _start_engine(server: EngineServer, config: EngineConfig, engine_factory: Callable | None, now: bool = False):
    """Builds, warms up and attaches the engine; any failure: one line, exit 1 (`now`: see _fail)."""
    phase = "loading the model"
    try:
        engine = (engine_factory or _load_llm_engine)(config)
        phase = "warm-up"
        server.attach(engine)
        return engine
    except (ValueError, ServeError) as e:  # LLMEngine raises ValueError for a bad model path / setting
        message = str(e)
    except (RuntimeError, MemoryError, OSError) as e:  # XLA errors (a failed compile, out of memory) included
        message = f"{phase} failed: {describe_exception(e)}"
        if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            message += " (out of memory: lower --kv-cache-pages, --device-memory-utilization or --max-batch-size)"
    server.shutdown(0)
    _fail(message, 1, now)


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
