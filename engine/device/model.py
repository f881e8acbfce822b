"""Llama over a paged KV cache, on one flattened token batch per step.

A step's tokens — decode tokens and prefill chunks of any number of sequences — arrive as one [N] array
with per-sequence metadata (StepInputs). Each layer writes its new K/V into its own pages (slot_mapping),
then attends through `kernels.paged_attention` to everything in each sequence's pages. The layer loop is
unrolled over per-layer params and per-layer KV pools (engine/device/device_params.py says why: a scan over
stacked weights makes XLA CPU copy every layer's weights every step); the pools are donated by the
runner, so each layer's scatter of new K/V is in place.

The model is a plain function of a params pytree (not flax modules): its leaves are per-layer fused
matrices, float or int8 (engine/device/quantization.py), which the model reads as they are.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from engine.config import ModelConfig
from engine.device.device_params import FusedShapes
from engine.device.quantization import dense, embed_lookup
from kernels.paged_attention import paged_attention

P = jax.sharding.PartitionSpec


class StepInputs(NamedTuple):
    """Device inputs of one step (all int32). Padding tokens sit after the last sequence's and write to
    page 0; padding rows have no tokens and context 0."""
    tokens: jax.Array          # [N]
    positions: jax.Array       # [N] absolute position of each token (RoPE)
    slot_mapping: jax.Array    # [N] page * page_size + offset where each token's K/V is written
    page_table: jax.Array      # [R, W]
    context_lens: jax.Array    # [R] tokens in the row's pages after this step's are written
    query_start: jax.Array     # [R + 1] row r owns tokens [query_start[r], query_start[r + 1])
    logits_index: jax.Array    # [R] the token whose logits row r samples from


@dataclass(frozen=True)
class ModelSpec:
    """Everything static the forward needs besides the params."""
    config: ModelConfig
    fused: FusedShapes
    dtype: Any
    attention_backend: str = "reference"
    interpret: bool = False
    int8_activations: bool = True   # CPU: W8A8 int8 dots; GPU: weight-only (engine/device/quantization.py)
    mesh: Any = None                # set to run attention under shard_map (see sharded_attention)


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """[D/2] float32 inverse frequencies, with GGUF `rope_freqs` divisors or Llama-3.1 scaling applied."""
    half = config.head_dim // 2
    inv = 1.0 / (config.rope_theta ** (np.arange(half, dtype=np.float64) * 2.0 / config.head_dim))
    if config.rope_freq_factors:
        inv = inv / np.asarray(config.rope_freq_factors, np.float64)[:half]
    elif config.rope_scaling is not None:
        s = config.rope_scaling
        wavelen = 2 * np.pi / inv
        low_wl, high_wl = s.original_max_position / s.low_freq_factor, s.original_max_position / s.high_freq_factor
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        scaled = np.where(wavelen > low_wl, inv / s.factor, inv)
        mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        inv = np.where(mid, (1 - smooth) * inv / s.factor + smooth * inv, scaled)
    return inv.astype(np.float32)


def apply_rope(x_nhd: jax.Array, cos_nf: jax.Array, sin_nf: jax.Array) -> jax.Array:
    """Rotates interleaved pairs (x[2i], x[2i+1]): llama.cpp's layout, which GGUF's permuted Q/K rows expect."""
    N, H, D = x_nhd.shape
    x = x_nhd.astype(jnp.float32).reshape(N, H, D // 2, 2)
    c, s = cos_nf[:, None, :], sin_nf[:, None, :]
    x0, x1 = x[..., 0], x[..., 1]
    out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(N, H, D).astype(x_nhd.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def sharded_attention(mesh, **kw):
    """paged_attention mapped over `mesh`'s 'model' axis: each device attends with its own query heads over
    its own KV heads' pages. A Pallas kernel is an opaque custom call to XLA's partitioner, which would
    otherwise gather every KV page onto every device; query heads are grouped by KV head, so contiguous
    head slices keep each query with its KV head."""
    heads, pages, rep = P(None, "model", None), P(None, None, "model", None), P()
    return jax.shard_map(functools.partial(paged_attention, **kw), mesh=mesh,
                         in_specs=(heads, pages, pages, rep, rep, rep), out_specs=heads, check_vma=False)


def _qkv(spec: ModelSpec, layer: dict, h: jax.Array):
    """q [N, Hq, D], k, v [N, Hkv, D] from the fused projection (see device_params for the column order)."""
    c, f = spec.config, spec.fused
    N, H, K, D = h.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
    mm = functools.partial(dense, int8_activations=spec.int8_activations)
    if not f.kv_fused:
        kv = mm(h, layer["wkv"])
        return mm(h, layer["wq"]).reshape(N, H, D), kv[:, :K * D].reshape(N, K, D), kv[:, K * D:].reshape(N, K, D)
    n = f.attn_blocks
    qkv = mm(h, layer["wqkv"]).reshape(N, n, (H + 2 * K) // n * D)
    q_cols, kv_cols = H // n * D, K // n * D
    q = qkv[:, :, :q_cols].reshape(N, H, D)
    k = qkv[:, :, q_cols:q_cols + kv_cols].reshape(N, K, D)
    v = qkv[:, :, q_cols + kv_cols:].reshape(N, K, D)
    return q, k, v


def _layer(spec: ModelSpec, layer: dict, x, k_pool, v_pool, inputs: StepInputs, cos, sin):
    """One Llama block over the flat batch: x [N, d]; k_pool/v_pool [P, S, Hkv, D] (returned updated)."""
    c = spec.config
    mm = functools.partial(dense, int8_activations=spec.int8_activations)
    with jax.named_scope("attention"):
        h = rms_norm(x, layer["attn_norm"], c.rms_norm_eps)
        q, k, v = _qkv(spec, layer, h)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        S = k_pool.shape[1]
        page, offset = inputs.slot_mapping // S, inputs.slot_mapping % S
        k_pool = k_pool.at[page, offset].set(k.astype(k_pool.dtype))
        v_pool = v_pool.at[page, offset].set(v.astype(v_pool.dtype))
        kw = dict(scale=c.head_dim ** -0.5, backend=spec.attention_backend, interpret=spec.interpret)
        attend = sharded_attention(spec.mesh, **kw) if spec.mesh is not None else \
            functools.partial(paged_attention, **kw)
        o = attend(q, k_pool, v_pool, inputs.page_table, inputs.context_lens, inputs.query_start)
        x = x + mm(o.reshape(x.shape[0], -1), layer["wo"])
    with jax.named_scope("mlp"):
        h = rms_norm(x, layer["mlp_norm"], c.rms_norm_eps)
        n = spec.fused.mlp_blocks
        gu = mm(h, layer["w_gate_up"]).reshape(x.shape[0], n, 2, c.intermediate_size // n)
        gate, up = gu[:, :, 0].reshape(x.shape[0], -1), gu[:, :, 1].reshape(x.shape[0], -1)
        x = x + mm(jax.nn.silu(gate) * up, layer["w_down"])
    return x, k_pool, v_pool


def forward(spec: ModelSpec, params: dict, k_pools: tuple, v_pools: tuple, inputs: StepInputs,
            all_logits: bool = False):
    """Returns (logits, k_pools, v_pools). logits: float32 [R, V] at each row's `logits_index` (or [N, V]
    for every token when all_logits). k_pools/v_pools: tuples of L arrays [P, S, Hkv, D], updated."""
    c = spec.config
    x = embed_lookup(params["embed"], inputs.tokens, spec.dtype)
    angles = inputs.positions[:, None].astype(jnp.float32) * jnp.asarray(rope_inverse_frequencies(c))
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    k_out, v_out = [], []
    for i, layer in enumerate(params["layers"]):
        x, k, v = _layer(spec, layer, x, k_pools[i], v_pools[i], inputs, cos, sin)
        k_out.append(k)
        v_out.append(v)
    if not all_logits:
        x = jnp.take(x, inputs.logits_index, axis=0)                       # [R, d]
    x = rms_norm(x, params["final_norm"], c.rms_norm_eps)
    logits = dense(x, params["lm_head"], int8_activations=spec.int8_activations, out_dtype=jnp.float32)
    return logits, tuple(k_out), tuple(v_out)
