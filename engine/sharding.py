"""Tensor-parallel layout: one `Mesh` axis 'model' over the selected devices, and ONE description of the
weights (logical axes per parameter) that drives their shapes, their placement and checkpoint restores.

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

log = logging.getLogger(__name__)

AXIS = "model"

# Every parameter as (path in the params tree, logical axes). Sizes come from the config (axis_sizes);
# which logical axes are split over AXIS is decided once per (config, device count) by `sharding_rules`.
WEIGHTS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("embed",), ("vocab", "embed")),
    (("layers", "attn_norm"), ("layer", "embed")),
    (("layers", "wq"), ("layer", "embed", "q_heads")),          # column-parallel
    (("layers", "wk"), ("layer", "embed", "kv_heads")),         # column-parallel
    (("layers", "wv"), ("layer", "embed", "kv_heads")),         # column-parallel
    (("layers", "wo"), ("layer", "q_heads", "embed")),          # row-parallel
    (("layers", "mlp_norm"), ("layer", "embed")),
    (("layers", "w_gate"), ("layer", "embed", "mlp")),          # column-parallel
    (("layers", "w_up"), ("layer", "embed", "mlp")),            # column-parallel
    (("layers", "w_down"), ("layer", "mlp", "embed")),          # row-parallel
    (("final_norm",), ("embed",)),
    (("lm_head",), ("embed", "vocab")),
)
KV_CACHE_AXES = ("layer", "page", "slot", "kv_head", "head_dim")   # [L, P, S, Hkv, D]


def axis_sizes(c: ModelConfig) -> dict[str, int]:
    """Size of every weight axis. q_heads/kv_heads are the flattened head*head_dim columns (heads-major)."""
    return {"vocab": c.vocab_size, "embed": c.hidden_size, "layer": c.num_layers, "mlp": c.intermediate_size,
            "q_heads": c.num_heads * c.head_dim, "kv_heads": c.num_kv_heads * c.head_dim}


def sharding_rules(c: ModelConfig, n: int) -> dict[str, str | None]:
    """Logical axis -> AXIS or None (replicated) for n devices. ValueError when the heads cannot be split."""
    if c.num_heads % n:
        raise ValueError(f"cannot shard the model over {n} devices: num_heads={c.num_heads} (num_kv_heads="
                         f"{c.num_kv_heads}) must be divisible by the device count {n}; pick --devices with a "
                         f"count that divides {c.num_heads}")
    split = lambda size: AXIS if size % n == 0 else None  # noqa: E731
    rules = {"q_heads": AXIS, "kv_heads": split(c.num_kv_heads), "kv_head": split(c.num_kv_heads),
             "mlp": split(c.intermediate_size), "vocab": split(c.vocab_size)}
    if n > 1:
        replicated = [f"{k}={v}" for k, v in (("num_kv_heads", c.num_kv_heads), ("intermediate_size",
                      c.intermediate_size), ("vocab_size", c.vocab_size)) if v % n]
        if replicated:
            log.warning("%s not divisible by %d devices: replicated instead of sharded", ", ".join(replicated), n)
    return rules


def param_shapes(c: ModelConfig) -> dict[str, Any]:
    """The params tree of shapes, e.g. {'embed': (V, d), 'layers': {'wq': (L, d, Hq*D), ...}, ...}."""
    sizes = axis_sizes(c)
    return _tree((path, tuple(sizes[a] for a in axes)) for path, axes in WEIGHTS)


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

    def _named(self, axes: tuple[str, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, _spec(axes, dict(self.rules)))

    def param_shardings(self) -> dict[str, Any]:
        """The params tree of NamedShardings (device_put targets, jit in_shardings, orbax restore targets)."""
        return _tree((path, self._named(axes)) for path, axes in WEIGHTS)

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


def check_param_shapes(params: dict, shapes: dict) -> None:
    """ValueError naming the first parameter whose shape differs from the weights description."""
    want, got = dict(_flatten(shapes)), dict(_flatten(params))
    if set(want) != set(got):
        raise ValueError(f"params tree has {sorted(got)} but the model needs {sorted(want)}")
    for path, shape in want.items():
        if tuple(got[path].shape) != shape:
            raise ValueError(f"parameter {path} has shape {tuple(got[path].shape)}, expected {shape}")


def make_mesh(devices: list) -> Mesh:
    """A 1-D Mesh named AXIS over `devices`, in the given order, with Auto axis types."""
    kwargs = {}
    if hasattr(jax.sharding, "AxisType"):
        kwargs["axis_types"] = (jax.sharding.AxisType.Auto,)
    return Mesh(np.asarray(devices, dtype=object), (AXIS,), **kwargs)


def _tree(items) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in items:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _flatten(tree: dict, prefix: str = ""):
    """('layers/wq', leaf) pairs of a nested dict."""
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            yield from _flatten(value, name)
        else:
            yield name, value
