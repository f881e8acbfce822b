"""int8 weights kept in memory (`--quantization-encoding q8_0`) and the matmul that reads them.

A weight is int8 [in, out] with one float32 scale per output column (symmetric, absmax / 127). Why per
column and not GGUF Q8_0's blocks of 32: the scale then factors out of the dot, so the product is one
integer matmul followed by a rescale of its [M, out] result; block scales would need a partial sum per
block (an [M, in/32, out] intermediate), which XLA CPU cannot fuse and would cost more than the weights.

CPU (XLA has no fused dequantize-into-dot: `dot(f32, convert(s8))` writes the whole float weight first):
activations are quantized per token to int8 on the fly, as llama.cpp does for its Q8 dot products, and
the dot runs s8 x s8 -> s32 natively (a YNNPACK fusion) — but only for M >= 2, so one row is padded to
two. GPU: weight-only, `dot(x_bf16, convert(w))` which XLA GPU fuses into its matmul.
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
    axis = -1 if per_row else -2
    amax = np.max(np.abs(w), axis=axis)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / np.expand_dims(scale, axis)), -127, 127).astype(np.int8)
    return QuantizedWeight(q, scale)


# Activations get one int8 scale per ACT_GROUP consecutive input features of a token (llama.cpp quantizes
# its activations per 32): one scale per token flipped SmolLM2's near-tie first answer token ("The" vs "L",
# FACTS.md) and derailed the answer, while groups of 64 keep it. A dimension that 64 does not divide falls
# back to one group per token.
ACT_GROUP = 64


def quantize_groups(x: jax.Array, group: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 of activations x [M, K] float32 per group of `group` features -> (int8 [M, K/g, g],
    float32 scale [M, K/g])."""
    M, K = x.shape
    xg = x.reshape(M, K // group, group)
    amax = jnp.max(jnp.abs(xg), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(xg / scale[..., None]), -127, 127).astype(jnp.int8), scale


def int8_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x [M, K] float32 @ w (int8 [K, N], scale [N]) -> float32 [M, N]: an s8 x s8 -> s32 dot per activation
    group ([K/g] batched dots of [M, g] x [g, N]), each rescaled by its group's scale, summed."""
    M, K = x.shape
    if M == 1:   # XLA CPU widens both operands to s32 at M = 1 instead of using its int8 kernel
        return int8_matmul(jnp.concatenate([x, jnp.zeros_like(x)]), w)[:1]
    group = ACT_GROUP if K % ACT_GROUP == 0 else K
    xq, sx = quantize_groups(x, group)                                  # [M, G, g], [M, G]
    wq = w.q.reshape(K // group, group, w.q.shape[1])                   # [G, g, N]: a free reshape
    acc = jax.lax.dot_general(xq, wq, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32)  # [G, M, N]
    y = jnp.einsum("gmn,mg->mn", acc.astype(jnp.float32), sx)
    return y * w.scale[None, :]


def dense(x: jax.Array, w, *, int8_activations: bool, out_dtype=None) -> jax.Array:
    """x [M, K] @ w for a float or a QuantizedWeight matrix, accumulated in float32; the result in
    `out_dtype` (default: x's dtype)."""
    out_dtype = out_dtype or x.dtype
    if not isinstance(w, QuantizedWeight):
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out_dtype)
    if int8_activations:
        return int8_matmul(x.astype(jnp.float32), w).astype(out_dtype)
    y = jnp.dot(x, w.q.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * w.scale[None, :]).astype(out_dtype)


def embed_lookup(embed, tokens: jax.Array, dtype) -> jax.Array:
    """Rows of the token embedding [V, d] (float, or int8 scaled per row) for tokens [N] -> [N, d]."""
    if not isinstance(embed, QuantizedWeight):
        return jnp.take(embed, tokens, axis=0)
    return (jnp.take(embed.q, tokens, axis=0).astype(jnp.float32) * embed.scale[tokens][:, None]).astype(dtype)
