"""One server over several hosts: every host runs `python -m engine.server` with the same flags plus
`--coordinator-address host:port --num-processes N --process-id i`; `maybe_initialize` joins them into one
JAX runtime (jax.distributed), after which `jax.devices()` lists every host's devices and the 'model' mesh
(engine/sharding.py) can span them.

What is implemented: flag validation (`check`, no JAX import, so a bad command line fails in one line
before anything loads), the `jax.distributed.initialize` call with a clear error when it is too late (JAX
already started) or fails, and `is_serving_process` (process 0 owns the gRPC front end, the scheduler and
the block manager). What is not: the follower loop. A multi-host jitted step must be launched by every
process with the same inputs in the same order; followers would receive each step's packed batch from
process 0 (e.g. `jax.experimental.multihost_utils.broadcast_one_to_all`) and call the same step. Until
that exists, only single-process serving (one host, any number of its devices) is usable.
"""
from __future__ import annotations

import logging

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
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator-address={coordinator_address} is not allowed; use host:port "
                         "(process 0's address and a free port, e.g. 10.0.0.1:1234)")
    if num_processes < 1:
        raise ValueError(f"--num-processes={num_processes} is not allowed; it must be >= 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id={process_id} is not allowed; it must be in [0, {num_processes - 1}] "
                         f"for --num-processes={num_processes}")
    return True


def maybe_initialize(coordinator_address: str | None, num_processes: int | None,
                     process_id: int | None) -> bool:
    """Calls jax.distributed.initialize when the flags ask for several processes; returns whether it did.
    Must run before anything touches a JAX device (the runtime is fixed at the first one)."""
    if not check(coordinator_address, num_processes, process_id):
        return False
    import jax
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except RuntimeError as e:
        raise ValueError(f"--coordinator-address={coordinator_address}: jax.distributed could not start "
                         f"process {process_id} of {num_processes} ({str(e).splitlines()[0]}); it must be set "
                         "up before JAX uses any device, once per process") from None
    log.info("process %d of %d joined %s: %d local / %d global devices", jax.process_index(),
             jax.process_count(), coordinator_address, jax.local_device_count(), jax.device_count())
    return True


def require_single_process() -> None:
    """Until followers exist, a runtime of several processes would deadlock in its first step (process 0
    launches a collective the others never join): refuse it with one line instead."""
    import jax
    if jax.process_count() > 1:
        raise ValueError(f"--num-processes={jax.process_count()}: serving over several processes is not "
                         "implemented yet (followers do not replay process 0's steps; see engine/distributed.py); "
                         "run one process per server")


def is_serving_process() -> bool:
    """Process 0 serves gRPC and schedules; the others would only follow its steps (see module docstring)."""
    import jax
    return jax.process_index() == 0
