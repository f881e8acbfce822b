"""Starts and stops `python -m engine.server` for scripts and tests, and reads its /metrics counters.

    with LaunchedServer(["--model-path=m.gguf", "--max-batch-size=8"]) as server:
        channel = grpc.insecure_channel(server.target)
        ... scrape_counters(server.metrics_url) ...

The server gets `--port=0` (it prints the port it picked), a free `--metrics-port` and a free `--http-port`
(its OpenAI-compatible API at `http_url`); start-up waits for
that line and a SERVING health check, and fails with the server's stderr tail if it exits or times out.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SERVING_LINE = re.compile(r"serving .* on (\S+):(\d+)")
_RESERVED_FLAGS = ("--port", "--metrics-port", "--http-port", "--host")


@dataclass(frozen=True)
class ServerInfo:
    """What the benchmark knows of the server it measures (None: the server does not say)."""
    name: str
    max_length: int | None
    prefix_caching: bool | None
    ours: bool                      # this engine (gRPC, or its HTTP front end): its /metrics can be read


class ServerStartError(RuntimeError):
    """The launched server died or did not become SERVING in time; the message holds its stderr tail."""


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free right now (all held open together, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def split_flags(flags: str | list[str]) -> list[str]:
    """`--launch` flags as a list; the benchmark owns the addresses, so it refuses --port & co."""
    args = shlex.split(flags) if isinstance(flags, str) else list(flags)
    for arg in args:
        if arg.split("=", 1)[0].replace("_", "-") in _RESERVED_FLAGS:
            raise ValueError(f"--launch must not set {arg.split('=', 1)[0]}: the launcher picks free ports itself")
    return args


class LaunchedServer:
    """One engine server subprocess on free ports; a context manager that always stops it."""

    def __init__(self, flags: str | list[str], timeout: float = 900.0, log_path: str | None = None):
        self.flags = split_flags(flags)
        self.timeout = timeout
        self.target = self.metrics_url = self.http_url = None
        self._log_path = log_path
        self._proc = self._stderr = None
        self._address = threading.Event()

    def __enter__(self) -> "LaunchedServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Spawns the server and blocks until it is SERVING; ServerStartError otherwise."""
        metrics_port, http_port = free_ports(2)
        # Append mode: the server shares this file's offset, and O_APPEND keeps its writes at the end even
        # while stderr_tail() seeks back to read.
        if self._log_path:
            open(self._log_path, "w").close()
        self._stderr = (open(self._log_path, "a+") if self._log_path
                        else tempfile.TemporaryFile("a+", prefix="engine-server-"))
        cmd = [sys.executable, "-m", "engine.server", *self.flags, "--host=127.0.0.1", "--port=0",
               f"--metrics-port={metrics_port}", f"--http-port={http_port}"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
        self._proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=self._stderr,
                                      text=True)
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.http_url = f"http://127.0.0.1:{http_port}"
        threading.Thread(target=self._read_stdout, daemon=True).start()
        try:
            self._wait_serving(time.monotonic() + self.timeout)
        except BaseException:
            self.stop()
            raise

    def _read_stdout(self) -> None:
        # The server prints one line when serving; keep draining so a chatty server never blocks on a full pipe.
        for line in self._proc.stdout:
            m = _SERVING_LINE.search(line)
            if m and not self._address.is_set():
                self.target = f"{m.group(1)}:{m.group(2)}"
                self._address.set()

    def _wait_serving(self, deadline: float) -> None:
        while not self._address.wait(0.2):
            if self._proc.poll() is not None:
                raise ServerStartError(f"the server exited with status {self._proc.returncode} before serving:\n"
                                       f"{self.stderr_tail()}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"the server did not start serving within {self.timeout:.0f} s "
                                       f"(raise --launch-timeout?):\n{self.stderr_tail()}")
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass  # not answering yet
                if time.monotonic() > deadline:
                    raise ServerStartError(f"{self.target} never reported SERVING:\n{self.stderr_tail()}")
                time.sleep(0.2)

    def stderr_tail(self, lines: int = 30) -> str:
        if self._stderr is None:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        return "".join(self._stderr.readlines()[-lines:])

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM (the server drains and exits), then SIGKILL after `grace` seconds."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def describe(self) -> str:
        return "python -m engine.server " + shlex.join(self.flags)


PREFIX_COUNTERS = ("engine_prefix_cache_queried_tokens_total", "engine_prefix_cache_hit_tokens_total")


def scrape_counters(url: str | None, names=PREFIX_COUNTERS, timeout: float = 10.0) -> dict[str, float] | None:
    """Unlabelled counter values from Prometheus text at `url`; None when there is no url."""
    if not url:
        return None
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in names:
            values[parts[0]] = float(parts[1])
    missing = set(names) - set(values)
    if missing:
        raise RuntimeError(f"{url} has no {', '.join(sorted(missing))}: is it an engine server's /metrics?")
    return values
