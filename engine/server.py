"""`python -m engine.server`: serves one model over gRPC (engine.v1.Engine, health, reflection, metrics) and
the OpenAI-compatible HTTP API (engine/serving/http_server.py; --http-port, 0 = off) on the same engine instance
(engine/serving/engine_server.py); this module is the process around them: flags, signals, start-up order,
multi-process groups, exit statuses.

Start-up order, and why:
  1. flags -> EngineConfig (engine.flags): a bad value fails in one line before anything heavy is imported;
  2. bind the gRPC and HTTP ports, start health (NOT_SERVING; HTTP /health 503) and reflection: a taken
     port fails before minutes of model loading, and orchestrators can probe the server while it loads;
  3. build the engine, warm it up (compiles every bucket), start its loop, then report SERVING.
Any start-up failure (bad host, unloadable model or tokenizer, an XLA error or out of memory in warm-up)
prints one line and exits 1.
SIGTERM / SIGINT: stop admitting on both front ends (gRPC UNAVAILABLE, HTTP 503), let in-flight streams
finish, abort the rest (gRPC: finish_reason ABORT; HTTP: an error event), shut the engine down and exit 0 —
all within --shutdown-timeout-seconds (at least engine_server.ABORT_RESERVE_SECONDS). A signal while the model is still
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
import sys
import threading
from typing import Callable

from absl import app, logging

from engine.config import EngineConfig
from engine.flags import FlagError, ServeOptions, config_from_flags, define_flags, parse_argv
from engine.core.request import describe_exception
from engine.serving.engine_server import EngineServer, ServeError


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
    except Exception as e:  # loading failed: one line; process 0 sees the channel close
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
