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

Each device's block is read from the weights' source (engine/loading/weight_source.py) by region — for a
fused block, the matching columns of each part — and the global array is assembled from the blocks of this
process's devices (`jax.make_array_from_single_device_arrays`). So one process of a multi-host group reads
and dequantizes only the shards its devices hold, never the whole model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from engine.config import ModelConfig
from engine.device.quantization import (Int8Rows, QuantizedWeight, as_rows, quantize_weight, quantize_with_scale,
                                       scale_of)
from engine.device.sharding import AXIS, Layout
from engine.loading.weight_source import WeightSource, as_source, region_of
from engine.loading.weights import QUANTIZED, ROWS, WEIGHTS, Weight, shape_of

log = logging.getLogger(__name__)
_W = {w.name: w for w in WEIGHTS}

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


@dataclass(frozen=True)
class Fused:
    """One device parameter: the canonical weights `parts` side by side along the output (last) axis, as
    `blocks` interleaved blocks each holding 1/blocks of every part's columns (one part, one block: the
    weight itself). Per-layer parts give one such parameter per layer."""
    parts: tuple[Weight, ...]
    blocks: int = 1


def layer_parts(fused: FusedShapes) -> dict[str, Fused]:
    """What each per-layer device parameter is made of."""
    out = {"attn_norm": Fused((_W["attn_norm"],)), "wo": Fused((_W["wo"],)), "mlp_norm": Fused((_W["mlp_norm"],)),
           "w_down": Fused((_W["w_down"],)), "w_gate_up": Fused((_W["w_gate"], _W["w_up"]), fused.mlp_blocks)}
    if fused.kv_fused:
        out["wqkv"] = Fused((_W["wq"], _W["wk"], _W["wv"]), fused.attn_blocks)
    else:
        out["wq"], out["wkv"] = Fused((_W["wq"],)), Fused((_W["wk"], _W["wv"]))
    return out


def _shape(f: Fused, c: ModelConfig) -> tuple[int, ...]:
    """The device parameter's shape (one layer's): the parts' shape with their columns summed."""
    shapes = [shape_of(p, c)[1:] if p.per_layer else shape_of(p, c) for p in f.parts]
    return (*shapes[0][:-1], sum(s[-1] for s in shapes))


def read_fused(source: WeightSource, f: Fused, layer: int | None, region: tuple[slice, ...]):
    """region of the device parameter `f` (layer `layer`), read part by part from `source`: only the blocks
    of each part's columns that fall in the region. float32 or QuantizedWeight (scales kept per column)."""
    *lead, cols = region
    widths = [shape_of(p, source.config)[-1] // f.blocks for p in f.parts]
    block = sum(widths)
    pieces = []
    for b in range(cols.start // block, -(-cols.stop // block)):
        at = b * block
        for part, width in zip(f.parts, widths):
            lo, hi = max(cols.start, at), min(cols.stop, at + width)
            if lo < hi:
                first = b * width + lo - at
                pieces.append(source.read(part, layer, (*lead, slice(first, first + hi - lo))))
            at += width
    if len(pieces) == 1:
        return pieces[0]
    if isinstance(pieces[0], QuantizedWeight):
        return QuantizedWeight(np.concatenate([p.q for p in pieces], -1), np.concatenate([p.scale for p in pieces], -1))
    return np.concatenate(pieces, -1)


def quantize_canonical(params: dict) -> dict:
    """Canonical params with every matrix int8 per output column (the embedding per row); numpy."""
    def q(name, leaf):
        if isinstance(leaf, QuantizedWeight) or name not in QUANTIZED:
            return leaf
        return quantize_weight(np.asarray(leaf, np.float32), per_row=_per_row(name))
    out = {k: q(k, v) for k, v in params.items() if k != "layers"}
    out["layers"] = {k: q(k, v) for k, v in params["layers"].items()}
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


def _two_axes(spec: P) -> tuple:
    """A matrix's spec as two entries (a trailing replicated axis may be left out of a PartitionSpec)."""
    return tuple(spec) + (None,) * (2 - len(tuple(spec)))


def scale_spec(name: str, spec: P) -> P:
    """The sharding of a quantized weight's scales: along its output columns (the embedding's rows)."""
    axes = _two_axes(spec)
    return P(axes[0]) if _per_row(name) else P(axes[1])


def _dequantize(name: str, w: QuantizedWeight) -> np.ndarray:
    scale = np.asarray(w.scale, np.float32)
    return np.asarray(w.q, np.float32) * (scale[..., :, None] if _per_row(name) else scale[..., None, :])


def _scales(name: str, blocks: dict, spec: P, mesh) -> dict:
    """q8_0 scales of each float block, one per output column (per row for the embedding): its absmax over
    the whole matrix. A block holds whole columns unless the spec splits the other axis (a row-parallel
    wo / w_down): then the maxima of this process's blocks are combined, and across processes by one
    all-gather (every process places the same weights in the same order, so the collectives pair up)."""
    reduce_axis = 1 if _per_row(name) else 0
    if _two_axes(spec)[reduce_axis] is None:
        return {k: scale_of(np.max(np.abs(v), axis=reduce_axis)) for k, v in blocks.items()}
    amax = np.max([np.max(np.abs(v), axis=reduce_axis) for v in blocks.values()], axis=0)
    if len({d.process_index for d in mesh.devices.flat}) > 1:
        from jax.experimental import multihost_utils
        amax = np.max(np.asarray(multihost_utils.process_allgather(amax)), axis=0)
    scale = scale_of(amax)
    return {k: scale for k in blocks}


def _place(name: str, f: Fused, layer: int | None, source: WeightSource, spec: P, mesh, dtype, quantize: bool):
    """One device parameter on its shards, each device's block read from `source` (so a process reads only
    what its devices hold; replicated blocks once). A QuantizedWeight (or, with `quantize`, a float block
    quantized here) goes as Int8Rows: int8 [out, in], the transpose of the canonical layout, so its spec is
    reversed, scales sharded with the rows; it is dequantized instead when the engine runs a float encoding
    (e.g. a q8_0 checkpoint served as float32). Anything else goes as `dtype`."""
    shape = _shape(f, source.config)
    sharding = NamedSharding(mesh, spec)
    index = {d: region_of(i, shape) for d, i in sharding.addressable_devices_indices_map(shape).items()}
    key = lambda region: tuple((s.start, s.stop) for s in region)
    blocks = {}
    for region in index.values():
        if key(region) not in blocks:
            blocks[key(region)] = read_fused(source, f, layer, region)
    stored_int8 = isinstance(next(iter(blocks.values())), QuantizedWeight)
    if stored_int8 and not quantize:
        blocks = {k: _dequantize(name, v) for k, v in blocks.items()}
    elif quantize and not stored_int8 and all(p.name in QUANTIZED for p in f.parts):   # norms stay float
        scales = _scales(name, blocks, spec, mesh)
        blocks = {k: QuantizedWeight(quantize_with_scale(v, scales[k], _per_row(name)), scales[k])
                  for k, v in blocks.items()}
    if not isinstance(next(iter(blocks.values())), QuantizedWeight):
        return _assemble(shape, sharding, {d: np.asarray(blocks[key(r)], dtype) for d, r in index.items()})
    per_row = _per_row(name)
    axes = _two_axes(spec)
    row_spec = P(*axes) if per_row else P(axes[1], axes[0])
    rows = {k: as_rows(v, per_row=per_row) for k, v in blocks.items()}
    return Int8Rows(_assemble(shape if per_row else shape[::-1], NamedSharding(mesh, row_spec),
                              {d: rows[key(r)].q for d, r in index.items()}),
                    _assemble(shape[:1] if per_row else shape[1:], NamedSharding(mesh, P(row_spec[0])),
                              {d: rows[key(r)].scale for d, r in index.items()}))


def _assemble(shape, sharding: NamedSharding, shards: dict) -> jax.Array:
    """A global array from this process's blocks, one per addressable device."""
    return jax.make_array_from_single_device_arrays(
        shape, sharding, [jax.device_put(block, device) for device, block in shards.items()])


def to_device_params(params, layout: Layout, fused: FusedShapes, dtype, quantize: bool = False) -> dict:
    """{'embed', 'final_norm', 'lm_head', 'layers': (L dicts)} on the mesh, read from `params`: a
    WeightSource (a GGUF file is read region by region) or a canonical tree (numpy or jax arrays, e.g. an
    orbax restore, or from a q8_0 checkpoint QuantizedWeights). With `quantize` float matrices are quantized
    to int8 (q8_0) block by block. Only this process's blocks are read."""
    c, mesh = layout.config, layout.mesh
    source = as_source(c, params)
    specs, top = layer_specs(layout, fused), top_specs(layout)
    parts = layer_parts(fused)
    layers = tuple({k: _place(k, f, i, source, specs[k], mesh, dtype, quantize) for k, f in parts.items()}
                   for i in range(c.num_layers))
    out = {k: _place(k, Fused((_W[k],)), None, source, top[k], mesh, dtype, quantize) for k in top}
    out["layers"] = layers
    # The read can exceed the stored bytes: a tied model reads its embedding twice (as embed and lm_head).
    log.info("weights: read %.3g MB of the %.3g MB stored, for the shards of %d of %d devices",
             source.bytes_read / 1e6, source.total_bytes / 1e6, len(mesh.local_devices), mesh.devices.size)
    return out
def param_bytes(params) -> int:
    """Bytes the placed params hold (per device copy summed over shards' logical size)."""
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params)))
