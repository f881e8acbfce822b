"""A follower process of a multi-process server (process id >= 1): it builds the same runner as process 0 (same
flags, so the same mesh, buckets and programs), then launches whatever process 0 sends over the control channel
(engine/device/control_channel.py) — warm-up shapes, packed steps — in the order sent, until process 0 says stop.

It never reads a step's results: process 0 samples and streams. Its device arrays (params shards, KV pages,
the previous step's sampled tokens that feed async-scheduling placeholders) are its part of the global arrays
every process's step reads. A follower schedules nothing and holds no prefix-cache bookkeeping (the block
manager lives in process 0; pages here are only addressed by process 0's page tables), so a prefix-cache
reset needs nothing from it.

Lifecycle: process 0 gone (end of file on the channel) or a failed step -> one line, status 1. SIGTERM: keep
following (process 0 drains and then sends Stop) for at most the shutdown timeout plus a margin.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

from engine.config import EngineConfig
from engine.device.control_channel import Step, Stop, Warmup, receive

log = logging.getLogger(__name__)

STOP_MARGIN_SECONDS = 5.0


def _say(message: str) -> None:
    print(f"engine.server (follower): {message}", file=sys.stderr, flush=True)


def _exit_later_on_sigterm(grace: float) -> None:
    """SIGTERM: process 0 is draining and will send Stop; exit on our own only if it never does."""
    def handle(signum, frame):
        _say(f"{signal.Signals(signum).name}; following process 0 until it stops (at most {grace:.0f} s)")
        timer = threading.Timer(grace, lambda: os._exit(1))
        timer.daemon = True  # a clean Stop before it fires must not wait for it
        timer.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


def follow(config: EngineConfig, link: socket.socket, shutdown_timeout: float) -> int:
    """Runs the follower until process 0 stops it; returns the exit status (0 after a clean Stop)."""
    _exit_later_on_sigterm(shutdown_timeout + STOP_MARGIN_SECONDS)
    from engine.loading.engine_parts import load_engine_parts
    runner = load_engine_parts(config).runner
    import jax
    log.info("follower %d ready: %d local devices", jax.process_index(), jax.local_device_count())
    steps, started = 0, time.monotonic()
    while True:
        try:
            command = receive(link)
        except (ConnectionError, OSError):
            _say(f"process 0 went away after {steps} steps; stopping with status 1")
            return 1
        try:
            if isinstance(command, Step):
                runner.launch_packed(command.arrays)
                steps += 1
            elif isinstance(command, Warmup):
                runner.warmup(command.shapes)
            elif isinstance(command, Stop):
                if command.reason:
                    _say(f"process 0 stopped the group: {command.reason}")
                log.info("follower stopping after %d steps in %.0f s", steps, time.monotonic() - started)
                return 0 if command.reason is None else 1
            else:
                raise RuntimeError(f"unexpected control message {type(command).__name__}")
        except Exception as e:  # any fault here breaks the group: report it and exit
            _say(f"step {steps} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                 "stopping with status 1")
            return 1
