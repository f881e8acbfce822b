"""Starts a multi-process server (`python -m engine.server` once per process, on 127.0.0.1, one CPU device each)
for tests/test_multiprocess.py, and always cleans it up: every process gets a hard deadline and is killed at
the end, whatever the test did."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.v1 import engine_pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVING = health_pb2.HealthCheckResponse.SERVING


def one_cpu_env() -> dict[str, str]:
    """This environment for a process with one CPU device: JAX on CPU, no inherited XLA_FLAGS (a forced host
    device count would give each process several devices)."""
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}


def free_port_pair() -> int:
    """A port P with P + 1 free too (the coordinator and the control channel)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free pair of ports")


class Group:
    """`num_processes` server processes; `start` launches the ids in `ids` (default all)."""

    def __init__(self, logs, model_path: str, num_processes: int, flags: list[str], timeout: float = 60.0):
        self.logs = logs  # a folder: each process writes its stdout/stderr to files (pipes could fill and block)
        self.port = free_port_pair()
        self.model_path = model_path
        self.num_processes = num_processes
        self.args = [sys.executable, "-m", "engine.server", f"--model-path={model_path}", "--port=0",
                     f"--coordinator-address=127.0.0.1:{self.port}", f"--num-processes={num_processes}",
                     f"--distributed-timeout-seconds={timeout}", *flags]
        self.procs: dict[int, subprocess.Popen] = {}
        self.env = one_cpu_env()

    def start(self, ids=None) -> "Group":
        for pid in ids if ids is not None else range(self.num_processes):
            with open(self._log(pid, "out"), "w") as out, open(self._log(pid, "err"), "w") as err:
                self.procs[pid] = subprocess.Popen(self.args + [f"--process-id={pid}"], cwd=ROOT, env=self.env,
                                                   stdout=out, stderr=err, text=True)
        return self

    def _log(self, pid: int, kind: str) -> str:
        return os.path.join(self.logs, f"{pid}.{kind}")

    def stderr(self, pid: int) -> str:
        with open(self._log(pid, "err")) as f:
            return f.read()

    def address(self, timeout: float) -> str:
        """Reads process 0's stdout until it says where it serves."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.procs[0].poll() is None:
            with open(self._log(0, "out")) as f:
                m = re.search(r"serving .* on (\S+) \(", f.read())
            if m:
                return m.group(1)
            time.sleep(0.2)   # polling a log file for start-up, not synchronising the engine
        raise AssertionError(f"process 0 did not start serving: {self.finish(5)}")

    def stub(self, address: str):
        channel = grpc.insecure_channel(address)
        return channel, engine_pb2_grpc.EngineStub(channel), health_pb2_grpc.HealthStub(channel)

    def signal(self, pid: int, sig=signal.SIGTERM) -> None:
        self.procs[pid].send_signal(sig)

    def finish(self, timeout: float) -> dict[int, tuple[int | None, str]]:
        """Waits up to `timeout` s for every process, kills what is left; {pid: (exit status, stderr)}
        (status None = it had to be killed)."""
        deadline, out = time.monotonic() + timeout, {}
        for pid, proc in self.procs.items():
            try:
                out[pid] = (proc.wait(timeout=max(0.1, deadline - time.monotonic())), self.stderr(pid))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                out[pid] = (None, self.stderr(pid))
        return out

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def last_line(stderr: str) -> str:
    """The server's own last one-line message (absl/XLA log lines left out)."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("engine.server")]
    return lines[-1] if lines else stderr[-2000:]
