"""One server over several processes (one per host): every process runs `python -m engine.server` with the same
flags plus `--coordinator-address host:port --num-processes N --process-id i`. Process 0 serves gRPC/HTTP,
schedules and keeps the block manager; processes 1..N-1 are followers that launch the same jitted step with
the same inputs in the same order (engine/device/follower.py), so XLA's SPMD program spans every process's devices
and all tensor traffic is XLA collectives (gloo on CPU, NCCL on GPU).

Start-up (`start_group`), before JAX touches a device:
  1. rendezvous on the control channel (engine/device/control_channel.py), TCP port = the coordinator's port + 1 on
     process 0: each follower says hello with its process id and a digest of its flags; process 0 waits up
     to --distributed-timeout-seconds for all of them. A missing process fails every process that is there
     with one line naming the missing ids (jax.distributed itself would abort the process with a C++ check
     failure that names nobody); flags that differ fail likewise, as they would give programs of
     different shapes that deadlock in their first collective.
  2. jax.distributed.initialize (CPU collectives: gloo), after which `jax.devices()` lists every process's
     devices and the 'model' mesh (engine/device/sharding.py) spans them.
`check` validates the flags without importing JAX, so a bad command line fails before anything loads.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import socket
import time

from engine.device.control_channel import Hello, Leader, Stop, Welcome, encode, receive

log = logging.getLogger(__name__)


def check(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """True when multi-process flags are given (and valid); False when all are unset. ValueError naming
    the flag otherwise. Imports no JAX."""
    given = {"--coordinator-address": coordinator_address, "--num-processes": num_processes,
             "--process-id": process_id}
    if all(v is None or v == "" for v in given.values()):
        return False
    missing = [name for name, v in given.items() if v is None or v == ""]
    if missing:
        raise ValueError(f"{', '.join(missing)} must be set too: a multi-host server needs "
                         "--coordinator-address, --num-processes and --process-id together")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise ValueError(f"--coordinator-address={coordinator_address} is not allowed; use host:port with a port "
                         "in [1, 65534] (process 0's address and a free port whose successor is free too: the "
                         "control channel; e.g. 10.0.0.1:1234)")
    if num_processes < 1:
        raise ValueError(f"--num-processes={num_processes} is not allowed; it must be >= 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id={process_id} is not allowed; it must be in [0, {num_processes - 1}] "
                         f"for --num-processes={num_processes}")
    return True


def fingerprint(config) -> str:
    """A digest of the engine flags every process must share (the model path may differ between hosts)."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "model_path"}
    return hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:16]


def start_group(coordinator_address: str, num_processes: int, process_id: int, timeout: float,
                digest: str) -> Leader | socket.socket | None:
    """Joins the processes (rendezvous, then jax.distributed). Returns process 0's Leader, a follower's socket
    to process 0, or None for a group of one. ValueError (one line) when the group cannot form."""
    host, _, port = coordinator_address.rpartition(":")
    control = (host.strip("[]"), int(port) + 1)
    link = None
    if num_processes > 1:
        link = (_gather_followers(control, num_processes, timeout, digest, coordinator_address) if process_id == 0
                else _join_leader(control, process_id, timeout, digest))
    maybe_initialize(coordinator_address, num_processes, process_id, timeout)
    return Leader(link) if isinstance(link, dict) else link


def _gather_followers(control, n: int, timeout: float, digest: str, coordinator: str) -> dict[int, socket.socket]:
    listener = (socket.create_server(("", control[1]), family=socket.AF_INET6, dualstack_ipv6=True)
                if socket.has_dualstack_ipv6() else socket.create_server(("", control[1])))
    listener.settimeout(0.2)
    deadline, joined = time.monotonic() + timeout, {}
    try:
        while len(joined) < n - 1 and time.monotonic() < deadline:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5.0)
            try:
                hello = receive(conn)
            except (OSError, ValueError):
                conn.close()
                continue
            if not isinstance(hello, Hello) or not 0 < hello.process_id < n or hello.process_id in joined:
                _refuse(joined, f"--num-processes={n}: a second process said --process-id="
                                f"{getattr(hello, 'process_id', '?')} (each id in [0, {n - 1}] runs exactly once)",
                        conn)
            joined[hello.process_id] = conn
            if hello.fingerprint != digest:
                _refuse(joined, f"process {hello.process_id} runs with different engine flags than process 0 "
                                "(every process needs the same flags except --process-id and --model-path)")
    finally:
        listener.close()
    missing = sorted(set(range(1, n)) - set(joined))
    if missing:
        _refuse(joined, f"--num-processes={n}: process{'es' if len(missing) > 1 else ''} "
                        f"{', '.join(map(str, missing))} did not join within {timeout:g} s (coordinator "
                        f"{coordinator}; --distributed-timeout-seconds)")
    for conn in joined.values():
        conn.settimeout(None)
        conn.sendall(encode(Welcome()))
    return joined


def _refuse(joined: dict, reason: str, extra: socket.socket | None = None) -> None:
    """Tells every connected follower why the group cannot form, then raises it here too."""
    for conn in [*joined.values(), *([extra] if extra else [])]:
        try:
            conn.sendall(encode(Stop(reason)))
        except OSError:
            pass
        conn.close()
    raise ValueError(reason)


def _join_leader(control, process_id: int, timeout: float, digest: str) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(control, timeout=1.0)
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise ValueError(f"process 0 did not answer at {control[0]}:{control[1]} (the coordinator's port "
                                 f"+ 1) within {timeout:g} s; start it with the same --coordinator-address "
                                 "(--distributed-timeout-seconds)") from None
            time.sleep(0.2)
    sock.settimeout(2 * timeout + 5)  # process 0 answers within its own timeout
    sock.sendall(encode(Hello(process_id, digest)))
    try:
        answer = receive(sock)
    except (OSError, ConnectionError):
        raise ValueError(f"process 0 at {control[0]}:{control[1]} went away during start-up") from None
    if isinstance(answer, Stop):
        raise ValueError(answer.reason)
    if not isinstance(answer, Welcome):
        raise ValueError(f"process 0 sent {type(answer).__name__} during start-up instead of Welcome")
    sock.settimeout(None)
    return sock


def maybe_initialize(coordinator_address: str | None, num_processes: int | None,
                     process_id: int | None, timeout: float = 300.0) -> bool:
    """Calls jax.distributed.initialize when the flags ask for it; returns whether it did. Must run before
    anything touches a JAX device (the runtime is fixed at the first one)."""
    if not check(coordinator_address, num_processes, process_id):
        return False
    import jax
    # CPU devices of different processes need a collectives backend (GPUs use NCCL whatever this says).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Not jax_share_binary_between_hosts: its cache keys differ between processes here (jax 0.12, CPU), so a
    # follower waits for a binary under a key process 0 never writes, and a persistent-cache hit on process 0
    # skips the sharing altogether: the group deadlocks. Followers compile every bucket themselves (the
    # persistent cache is written by process 0 only).
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=max(1, int(timeout)),
                                   shutdown_timeout_seconds=30)
    except RuntimeError as e:
        raise ValueError(f"--coordinator-address={coordinator_address}: jax.distributed could not start "
                         f"process {process_id} of {num_processes} ({str(e).splitlines()[0]}); it must be set "
                         "up before JAX uses any device, once per process") from None
    log.info("process %d of %d joined %s: %d local / %d global devices", jax.process_index(),
             jax.process_count(), coordinator_address, jax.local_device_count(), jax.device_count())
    return True
