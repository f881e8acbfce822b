"""int8 weights kept in memory (`--quantization-encoding q8_0`) and the matmul that reads them.

A weight is int8 with one float32 scale per output feature (symmetric, absmax / 127). Why per output and
not GGUF Q8_0's blocks of 32: the scale then factors out of the dot, so the product is one integer matmul
followed by a rescale of its [M, out] result; block scales would need a partial sum per block (an
[M, in/32, out] intermediate), which XLA CPU cannot fuse and would cost more than the weights.

Two forms: `QuantizedWeight` is the canonical (checkpoint) one, [in, out] like the float matrices;
`Int8Rows` is what the step reads, [out, in]: one int8 row per output feature (a vocab entry for the
embedding and lm_head), because XLA CPU's int8 dot with the contraction on both operands' last axis
runs ~1.7x faster than with the weight's leading axis (probe: a SmolLM2 layer stack at M = 2..64).

CPU (XLA has no fused dequantize-into-dot: `dot(f32, convert(s8))` writes the whole float weight first):
activations are quantized to int8 on the fly, as llama.cpp does for its Q8 dot products, and the dot runs
s8 x s8 -> s32 natively (a YNNPACK fusion) — but only for M >= 2. Each token is quantized in two levels,
x ~ s1*a + s2*b (b = the int8 rounding residual of a), and both levels go through ONE dot of 2M rows:
the error is ~amax/65,000 per token (one level per token flipped SmolLM2's "Paris", groups of 64 features
kept it but ran as a batched dot 1.5-2.5x slower), a batch of one needs no padding, and a decode step is
bound by reading the weights, so the doubled rows cost little (30-layer stack, M = 16: 28 vs 21 ms).
GPU: weight-only, `dot(x_bf16, convert(w))` which XLA GPU fuses into its matmul.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class QuantizedWeight(NamedTuple):
    """q int8 [..., in, out] with scale float32 [..., out] (one per output column), or, for the token
    embedding (read by row), q [V, d] with scale [V]. Leading axes (a layer stack) are shared."""
    q: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.q.shape

    @property
    def size(self) -> int:
        return self.q.size


def quantize_weight(w: np.ndarray, per_row: bool = False) -> QuantizedWeight:
    """Symmetric int8 of a [..., rows, cols] matrix (numpy) with one scale per column (per row when
    per_row): the largest |w| of each column (row) maps to 127."""
    w = np.asarray(w, np.float32)
    scale = scale_of(np.max(np.abs(w), axis=-1 if per_row else -2))
    return QuantizedWeight(quantize_with_scale(w, scale, per_row), scale)


def scale_of(amax: np.ndarray) -> np.ndarray:
    """float32 scales from the largest |w| of each column (row): amax / 127, 1 for an all-zero one."""
    return np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)


def quantize_with_scale(w: np.ndarray, scale: np.ndarray, per_row: bool = False) -> np.ndarray:
    """int8 of w [..., rows, cols] at given scales (one per column, or per row): the rounding of
    quantize_weight, for a block of a matrix whose scales come from the whole of it."""
    axis = -1 if per_row else -2
    return np.clip(np.rint(np.asarray(w, np.float32) / np.expand_dims(scale, axis)), -127, 127).astype(np.int8)


class Int8Rows(NamedTuple):
    """The device form of a quantized matrix: q int8 [out, in] (one row per output feature; for the
    embedding, one per token id) and scale float32 [out]."""
    q: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.q.shape


def as_rows(w: QuantizedWeight, per_row: bool = False) -> Int8Rows:
    """Canonical -> device form (numpy): a per-column [in, out] weight is transposed; a per-row one (the
    embedding) already has a row per output."""
    q = np.asarray(w.q, np.int8)
    return Int8Rows(q if per_row else np.ascontiguousarray(q.T), np.asarray(w.scale, np.float32))


def quantize_two_level(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [M, K] float32 -> (int8 [2M, K]: M rows of a then M rows of b, s1 [M], s2 [M]) with
    x ~ s1*a + s2*b per row: a rounds x to int8 at its absmax, b rounds the remainder."""
    def level(v):
        amax = jnp.max(jnp.abs(v), axis=-1, keepdims=True)
        s = jnp.where(amax > 0, amax / 127.0, 1.0)
        return jnp.clip(jnp.round(v / s), -127, 127), s
    a, s1 = level(x)
    b, s2 = level(x - a * s1)
    return jnp.concatenate([a, b]).astype(jnp.int8), s1[:, 0], s2[:, 0]


def int8_matmul(x: jax.Array, w: Int8Rows) -> jax.Array:
    """x [M, K] float32 @ w.T (int8 [N, K], scale [N]) -> float32 [M, N]: one s8 x s8 -> s32 dot of the
    two activation levels [2M, K] against the weight rows, each level rescaled, summed."""
    M = x.shape[0]
    xq, s1, s2 = quantize_two_level(x)
    acc = jax.lax.dot_general(xq, w.q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)  # [2M, N]
    acc = acc.astype(jnp.float32)
    return (acc[:M] * s1[:, None] + acc[M:] * s2[:, None]) * w.scale[None, :]


def dense(x: jax.Array, w, *, int8_activations: bool, out_dtype=None) -> jax.Array:
    """x [M, K] @ w for a float [K, N] or an Int8Rows [N, K] matrix, accumulated in float32; the result
    in `out_dtype` (default: x's dtype)."""
    out_dtype = out_dtype or x.dtype
    if not isinstance(w, Int8Rows):
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out_dtype)
    if int8_activations:
        return int8_matmul(x.astype(jnp.float32), w).astype(out_dtype)
    y = jax.lax.dot_general(x, w.q.astype(x.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (y * w.scale[None, :]).astype(out_dtype)


def embed_lookup(embed, tokens: jax.Array, dtype) -> jax.Array:
    """Rows of the token embedding [V, d] (float, or Int8Rows) for tokens [N] -> [N, d]."""
    if not isinstance(embed, Int8Rows):
        return jnp.take(embed, tokens, axis=0)
    return (jnp.take(embed.q, tokens, axis=0).astype(jnp.float32) * embed.scale[tokens][:, None]).astype(dtype)
