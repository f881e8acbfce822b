"""--devices parsing: 'cpu', 'gpu', 'gpu:0,1', 'cpu:0,1'; default first GPU, else CPU (as MAX does)."""
from __future__ import annotations

import jax

from engine.config import parse_devices


def _platform_devices(kind: str) -> list:
    try:
        return jax.devices("cuda" if kind == "gpu" else kind)
    except RuntimeError:
        if kind == "gpu":
            try:
                return jax.devices("gpu")
            except RuntimeError:
                return []
        return []


def select_devices(spec: str | None) -> list:
    """Returns the jax devices named by `spec`; ValueError naming the value and the allowed forms. In a
    multi-process runtime `spec` names each process's own devices (ids index its local devices; no ids:
    all of them) and the result is every process's selection, in process order: the mesh spans them all."""
    if jax.process_count() > 1:
        return _every_process(spec)
    if spec is None or spec == "":
        gpus = _platform_devices("gpu")
        return gpus[:1] if gpus else jax.devices("cpu")[:1]
    kind, wanted = parse_devices(spec)
    found = _platform_devices(kind)
    if not found:
        raise ValueError(f"--devices={spec!r}: no {kind.upper()} is visible to JAX here "
                         f"(available: {', '.join(sorted({d.platform for d in jax.devices()}))})")
    if wanted is None:
        return found[:1]
    bad = [i for i in wanted if not 0 <= i < len(found)]
    if bad or len(set(wanted)) != len(wanted):
        raise ValueError(f"--devices={spec!r}: device ids must be distinct and in 0..{len(found) - 1} "
                         f"({len(found)} {kind} device(s) visible)")
    return [found[i] for i in wanted]


def _every_process(spec: str | None) -> list:
    kind, wanted = parse_devices(spec or ("gpu" if _platform_devices("gpu") else "cpu"))
    found = _platform_devices(kind)
    per_process = [sorted((d for d in found if d.process_index == p), key=lambda d: d.id)
                   for p in range(jax.process_count())]
    out = []
    for p, local in enumerate(per_process):
        pick = wanted if wanted is not None else range(len(local))
        if not local or any(not 0 <= i < len(local) for i in pick):
            raise ValueError(f"--devices={spec!r}: process {p} has {len(local)} {kind} device(s); ids index each "
                             "process's own devices")
        out += [local[i] for i in pick]
    return out


def describe(devices: list) -> str:
    kind = "gpu" if devices[0].platform in ("gpu", "cuda") else devices[0].platform
    return f"{kind}:" + ",".join(str(d.id) for d in devices)
