"""Tensor-parallel layout: one `Mesh` axis 'model' over the selected devices; each weight's logical axes
(engine/loading/weights.py, the one description of the weights) are split over it by `sharding_rules`.

Megatron-style split: attention is sharded by heads (wq/wk/wv column-parallel on the head dim, wo
row-parallel), the MLP by its hidden dim (w_gate/w_up column-parallel, w_down row-parallel), so each
device computes whole heads and a slice of the MLP and XLA inserts one all-reduce after wo and w_down.
The KV caches [L, P, S, Hkv, D] are split on Hkv, so a device keeps the pages of its own KV heads.
Embedding and lm_head are split on the vocabulary when it divides; norms and step inputs are replicated.

Mesh axes are Auto (not `jax.make_mesh`'s default Explicit): contracting over a sharded dim under
Explicit axes raises ShardingTypeError (FACTS.md); under Auto the partitioner adds the collectives.

Head counts: `num_heads % n` must be 0 (ValueError otherwise). When only `num_kv_heads % n != 0` (e.g. 8
query / 2 KV heads on 4 devices) wk/wv and the KV cache are replicated instead (as vLLM does when
tp > kv heads): correct, at the cost of n copies of the KV pool. MLP or vocab sizes that do not divide
are replicated likewise. One device: every axis has size 1, i.e. today's single-device placement.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from engine.config import ModelConfig
from engine.loading.weights import WEIGHTS, check_param_shapes, param_shapes, tree

log = logging.getLogger(__name__)

AXIS = "model"

KV_CACHE_AXES = ("layer", "page", "slot", "kv_head", "head_dim")   # [L, P, S, Hkv, D]


def sharding_rules(c: ModelConfig, n: int) -> dict[str, str | None]:
    """Logical axis -> AXIS or None (replicated) for n devices. ValueError when the heads cannot be split."""
    if c.num_heads % n:
        raise ValueError(f"cannot shard the model over {n} devices: num_heads={c.num_heads} (num_kv_heads="
                         f"{c.num_kv_heads}) must be divisible by the device count {n}; pick --devices with a "
                         f"count that divides {c.num_heads}")
    split = lambda size: AXIS if size % n == 0 else None
    rules = {"q_heads": AXIS, "kv_heads": split(c.num_kv_heads), "kv_head": split(c.num_kv_heads),
             "mlp": split(c.intermediate_size), "vocab": split(c.vocab_size)}
    if n > 1:
        replicated = [f"{k}={v}" for k, v in (("num_kv_heads", c.num_kv_heads), ("intermediate_size",
                      c.intermediate_size), ("vocab_size", c.vocab_size)) if v % n]
        if replicated:
            log.warning("%s not divisible by %d devices: replicated instead of sharded", ", ".join(replicated), n)
    return rules


def _spec(axes: tuple[str, ...], rules: dict[str, str | None]) -> P:
    return P(*(rules.get(a) for a in axes))


@dataclass(frozen=True)
class Layout:
    """Where everything lives for one model on one mesh. Build with `Layout.build(config, devices)`."""
    mesh: Mesh
    config: ModelConfig
    rules: tuple[tuple[str, str | None], ...]   # frozen copy of sharding_rules

    @staticmethod
    def build(config: ModelConfig, devices: list) -> "Layout":
        rules = sharding_rules(config, len(devices))
        return Layout(make_mesh(devices), config, tuple(sorted(rules.items())))

    def spec(self, axes: tuple[str, ...]) -> P:
        """The PartitionSpec of an array with these logical axes."""
        return _spec(axes, dict(self.rules))

    def _named(self, axes: tuple[str, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes))

    def param_shardings(self) -> dict[str, Any]:
        """The params tree of NamedShardings (device_put targets, jit in_shardings, orbax restore targets)."""
        return tree((w.path, self._named(w.axes)) for w in WEIGHTS)

    def cache_sharding(self) -> NamedSharding:
        """KV pages [L, P, S, Hkv, D]: split on Hkv (axis 3), or replicated (see module docstring)."""
        return self._named(KV_CACHE_AXES)

    def attention_mesh(self) -> Mesh | None:
        """The mesh to run the Pallas attention kernel under `shard_map` (each device on its own query and KV
        heads), or None: one device, or KV heads replicated (then GSPMD partitions the jnp attention)."""
        if self.mesh.devices.size == 1 or dict(self.rules).get("kv_head") != AXIS:
            return None
        return self.mesh

    def replicated(self) -> NamedSharding:
        """Token ids, positions, page tables, sampling inputs and sampled tokens: on every device."""
        return NamedSharding(self.mesh, P())

    def put_params(self, params: dict, dtype) -> dict:
        """Casts (numpy or jax) params to `dtype` and places each on its sharding; checks every shape."""
        shardings = self.param_shardings()
        check_param_shapes(params, param_shapes(self.config))
        return jax.tree.map(lambda a, sh: jax.device_put(_cast(a, dtype), sh), params, shardings)


def _cast(a, dtype):
    if isinstance(a, jax.Array):
        return a if a.dtype == dtype else a.astype(dtype)   # stays on its shards
    return np.asarray(a, dtype)


def make_mesh(devices: list) -> Mesh:
    """A 1-D Mesh named AXIS over `devices`, in the given order, with Auto axis types."""
    kwargs = {}
    if hasattr(jax.sharding, "AxisType"):
        kwargs["axis_types"] = (jax.sharding.AxisType.Auto,)
    return Mesh(np.asarray(devices, dtype=object), (AXIS,), **kwargs)
