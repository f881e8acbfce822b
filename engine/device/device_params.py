"""Canonical params (engine/loading/weights.py WEIGHTS: layers stacked, Q/K/V and gate/up separate) -> the params
the jitted step reads: one dict per layer, Q/K/V fused into one matrix and gate/up into another, each
placed on its shards, in the compute dtype or kept quantized (engine/device/quantization.py).

Why per-layer arrays: XLA CPU copies the dynamic slice of a stacked weight that a layer scan reads (every
layer's weights, every step: ~425 MB per SmolLM2 decode step), while a separate argument per layer is read
in place. Why fused: one matmul reads the activations once and fills the machine better than three.

Under tensor parallelism a fused matrix must still give each device its own heads and its own slice of
the MLP. So the columns are interleaved in `n` blocks, block i holding device i's Q heads, then its K and
V heads (or gate then up columns): splitting the fused columns evenly over the mesh hands each device
exactly its block. When the KV heads do not divide over the devices they stay replicated, so K/V are
fused into their own replicated matrix `wkv` beside a sharded `wq`.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from engine.config import ModelConfig
from engine.device.quantization import Int8Rows, QuantizedWeight, as_rows, quantize_weight
from engine.device.sharding import AXIS, Layout
from engine.loading.weights import QUANTIZED, ROWS, WEIGHTS

def _per_row(name: str) -> bool:
    """Whether q8_0 scales this weight per row (the embedding, engine/loading/weights.py) rather than per column;
    fused matrices (wqkv, w_gate_up, ...) are per column like their parts."""
    return QUANTIZED.get(name) == ROWS


@dataclass(frozen=True)
class FusedShapes:
    """How the fused columns split (static, read by the model): `blocks` interleaved blocks per fused
    matrix; kv_fused False means wq + wkv instead of wqkv."""
    attn_blocks: int
    mlp_blocks: int
    kv_fused: bool

    @staticmethod
    def for_layout(layout: Layout) -> "FusedShapes":
        n, rules = layout.mesh.devices.size, dict(layout.rules)
        return FusedShapes(attn_blocks=n, mlp_blocks=n if rules.get("mlp") == AXIS else 1,
                           kv_fused=rules.get("kv_heads") == AXIS or n == 1)


def _interleave(parts: list, blocks: int):
    """[in, c_i] matrices -> [in, sum c_i], as `blocks` blocks each holding 1/blocks of every part. Int8
    parts interleave their per-column scales the same way (per-column quantization commutes with this)."""
    if isinstance(parts[0], QuantizedWeight):
        return QuantizedWeight(_interleave([p.q for p in parts], blocks),
                               _interleave([p.scale[None] for p in parts], blocks)[0])
    split = [np.split(p, blocks, axis=-1) for p in parts]
    return np.concatenate([s[b] for b in range(blocks) for s in split], axis=-1)


def _layer_slice(leaf, i: int):
    if isinstance(leaf, QuantizedWeight):
        return QuantizedWeight(np.asarray(leaf.q[i]), np.asarray(leaf.scale[i], np.float32))
    return np.asarray(leaf[i], np.float32)


def quantize_canonical(params: dict) -> dict:
    """Canonical params with every matrix int8 per output column (the embedding per row); numpy."""
    def q(name, leaf):
        if isinstance(leaf, QuantizedWeight) or name not in QUANTIZED:
            return leaf
        return quantize_weight(np.asarray(leaf, np.float32), per_row=_per_row(name))
    out = {k: q(k, v) for k, v in params.items() if k != "layers"}
    out["layers"] = {k: q(k, v) for k, v in params["layers"].items()}
    return out


def fuse_layer(c: ModelConfig, layers: dict, i: int, fused: FusedShapes) -> dict:
    """Layer i of the canonical stacked params, fused (numpy; float32 or QuantizedWeight)."""
    g = {k: _layer_slice(v, i) for k, v in layers.items()}
    out = {"attn_norm": g["attn_norm"], "wo": g["wo"], "mlp_norm": g["mlp_norm"], "w_down": g["w_down"],
           "w_gate_up": _interleave([g["w_gate"], g["w_up"]], fused.mlp_blocks)}
    if fused.kv_fused:
        out["wqkv"] = _interleave([g["wq"], g["wk"], g["wv"]], fused.attn_blocks)
    else:
        out["wq"], out["wkv"] = g["wq"], _interleave([g["wk"], g["wv"]], 1)
    return out


def layer_specs(layout: Layout, fused: FusedShapes) -> dict[str, P]:
    rules = dict(layout.rules)
    col = P(None, AXIS)
    return {"attn_norm": P(), "mlp_norm": P(), "wqkv": col, "wq": col, "wkv": P(),
            "wo": P(AXIS, None), "w_gate_up": col if fused.mlp_blocks > 1 else P(),
            "w_down": P(AXIS, None) if rules.get("mlp") == AXIS else P()}


def top_specs(layout: Layout) -> dict[str, P]:
    """The weights outside the layers keep their canonical form and so their canonical sharding."""
    return {w.name: layout.spec(w.axes) for w in WEIGHTS if not w.per_layer}


def scale_spec(name: str, spec: P) -> P:
    """The sharding of a quantized weight's scales: along its output columns (the embedding's rows)."""
    axes = tuple(spec) + (None,) * (2 - len(tuple(spec)))
    return P(axes[0]) if _per_row(name) else P(axes[1])


def _dequantize(name: str, w: QuantizedWeight) -> np.ndarray:
    scale = np.asarray(w.scale, np.float32)
    return np.asarray(w.q, np.float32) * (scale[..., :, None] if _per_row(name) else scale[..., None, :])


def _place(name: str, w, spec: P, mesh, dtype, quantize: bool):
    """Puts one weight on its shards: a QuantizedWeight as Int8Rows (int8 [out, in], the transpose of the
    canonical layout, so its spec is reversed; scales sharded with the rows) — dequantized instead when the
    engine runs in a float encoding, e.g. a q8_0 checkpoint served as float32 — anything else as `dtype`."""
    if isinstance(w, QuantizedWeight) and not quantize:
        w = _dequantize(name, w)
    if isinstance(w, QuantizedWeight):
        rows = as_rows(w, per_row=_per_row(name))
        axes = tuple(spec) + (None,) * (2 - len(tuple(spec)))
        row_spec = P(*axes) if _per_row(name) else P(axes[1], axes[0])
        return Int8Rows(jax.device_put(rows.q, NamedSharding(mesh, row_spec)),
                        jax.device_put(rows.scale, NamedSharding(mesh, P(row_spec[0]))))
    return jax.device_put(np.asarray(w, dtype), NamedSharding(mesh, spec))


def to_device_params(canonical: dict, layout: Layout, fused: FusedShapes, dtype, quantize: bool = False) -> dict:
    """{'embed', 'final_norm', 'lm_head', 'layers': (L dicts)} on the mesh. `canonical` may hold numpy or
    jax arrays (an orbax restore) or, from a q8_0 checkpoint, QuantizedWeights; with `quantize` float
    matrices are quantized first. Each layer is fused on the host one at a time."""
    c, mesh = layout.config, layout.mesh
    specs, top = layer_specs(layout, fused), top_specs(layout)
    if quantize:
        canonical = quantize_canonical(canonical)
    layers = []
    for i in range(c.num_layers):
        fused_layer = fuse_layer(c, canonical["layers"], i, fused)
        layers.append({k: _place(k, v, specs[k], mesh, dtype, quantize) for k, v in fused_layer.items()})
    out = {k: _place(k, canonical[k], top[k], mesh, dtype, quantize) for k in top}
    out["layers"] = tuple(layers)
    return out


def param_bytes(params) -> int:
    """Bytes the placed params hold (per device copy summed over shards' logical size)."""
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params)))
