"""Where the weights come from, read by region: the device placement (engine/device/device_params.py) asks
for exactly the block of each weight that one device holds, so a process reads only its own shards.

A region is given in the canonical layout of engine/loading/weights.py (one layer at a time: [in, out] for
a matrix, [V, d] for the embedding, [d] for a norm) as one slice per dimension. Two sources:
- `ArraySource`: an in-memory canonical tree (numpy, jax arrays — also ones an orbax restore put on a
  mesh spanning several processes, of which this process reads only its addressable shards — or
  QuantizedWeight leaves of a q8_0 checkpoint);
- `engine.loading.gguf_loader.GGUFSource`: the GGUF file itself, dequantizing only the blocks a region covers.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from engine.config import ModelConfig
from engine.device.quantization import QuantizedWeight
from engine.loading.weights import QUANTIZED, ROWS, WEIGHTS, Weight, check_param_shapes, param_shapes, shape_of

Region = tuple[slice, ...]


class WeightSource:
    """The weights of one model, read by region. `read` returns float32 (or a QuantizedWeight whose scales
    are those of the region's columns — rows for the embedding) in the canonical layout."""
    config: ModelConfig
    bytes_read: int = 0      # bytes of stored weights read so far (a measure of how much of the model a host reads)
    total_bytes: int = 0     # bytes of all stored weights

    def read(self, w: Weight, layer: int | None, region: Region):
        raise NotImplementedError

    def read_all(self, w: Weight) -> np.ndarray | QuantizedWeight:
        """The whole canonical parameter (layers stacked on a leading axis)."""
        shape = shape_of(w, self.config)[1:] if w.per_layer else shape_of(w, self.config)
        full = tuple(slice(0, n) for n in shape)
        if not w.per_layer:
            return self.read(w, None, full)
        parts = [self.read(w, i, full) for i in range(self.config.num_layers)]
        if isinstance(parts[0], QuantizedWeight):
            return QuantizedWeight(np.stack([p.q for p in parts]), np.stack([p.scale for p in parts]))
        return np.stack(parts)


def region_of(index: tuple[slice, ...], shape: tuple[int, ...]) -> Region:
    """Slices with explicit bounds (a device's index from a sharding may say slice(None))."""
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


class ArraySource(WeightSource):
    """A canonical params tree held in memory (engine/loading/weights.py), checked against the config."""

    def __init__(self, config: ModelConfig, params: dict[str, Any]):
        check_param_shapes(params, param_shapes(config))
        self.config, self.params = config, params
        self.total_bytes = sum(_nbytes(self._leaf(w)) for w in WEIGHTS)

    def _leaf(self, w: Weight):
        node = self.params
        for key in w.path:
            node = node[key]
        return node

    def read(self, w: Weight, layer: int | None, region: Region):
        leaf = self._leaf(w)
        lead = () if layer is None else (slice(layer, layer + 1),)
        if isinstance(leaf, QuantizedWeight):
            per_row = QUANTIZED.get(w.name) == ROWS
            q = _block(leaf.q, lead + region)
            scale = _block(leaf.scale, lead + (region[0] if per_row else region[-1],))
            out = QuantizedWeight(q.astype(np.int8), scale.astype(np.float32))
            if layer is not None:
                out = QuantizedWeight(out.q[0], out.scale[0])
        else:
            out = _block(leaf, lead + region).astype(np.float32)
            if layer is not None:
                out = out[0]
        self.bytes_read += _nbytes(out)
        return out


def _block(a, region: Region) -> np.ndarray:
    """a[region] as numpy. A jax array is read from the one addressable shard that holds the region (an
    array over several processes has no other way in); failing that, gathered (this process holds it all)."""
    if isinstance(a, np.ndarray) or not hasattr(a, "addressable_shards"):
        return np.asarray(a[region])
    for shard in a.addressable_shards:
        bounds = region_of(shard.index, a.shape)
        if all(b.start <= r.start and r.stop <= b.stop for b, r in zip(bounds, region)):
            local = tuple(slice(r.start - b.start, r.stop - b.start) for b, r in zip(bounds, region))
            return np.asarray(shard.data)[local]
    if not a.is_fully_addressable:
        raise ValueError(f"region {region} of an array of shape {a.shape} is not held by this process")
    return np.asarray(a)[region]


def _nbytes(leaf) -> int:
    if isinstance(leaf, QuantizedWeight):
        return _nbytes(leaf.q) + _nbytes(leaf.scale)
    return int(math.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def as_source(config: ModelConfig, params) -> WeightSource:
    """A WeightSource as is; a params tree wrapped (and its shapes checked)."""
    return params if isinstance(params, WeightSource) else ArraySource(config, params)
