"""Flax Llama over a paged KV cache.

One forward serves prefill chunks and decode alike: a [B, T] block of new tokens per step (T = 1 for
decode). Each layer scatters the chunk's K/V into its pages (slot_mapping), then attends through
`kernels.paged_attention` to everything in the row's pages. Layers run under `nn.scan` (one compiled layer
body instead of L copies: compile time matters because every bucket is compiled at start-up); the KV pages
of all layers ride in the scan carry as two [L, P, S, Hkv, D] arrays, so the scatter updates them in place.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engine.config import ModelConfig
from kernels.paged_attention import paged_attention

P = jax.sharding.PartitionSpec


class StepInputs(NamedTuple):
    """Device inputs of one forward (all int32). Padding rows have query_lens 0 and write to page 0."""
    tokens: jax.Array        # [B, T]
    positions: jax.Array     # [B, T] absolute position of each token (RoPE)
    slot_mapping: jax.Array  # [B, T] page * page_size + offset where each token's K/V is written
    page_table: jax.Array    # [B, W]
    context_lens: jax.Array  # [B] tokens in the row's pages after this chunk is written
    query_lens: jax.Array    # [B] valid tokens of the chunk


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


def apply_rope(x_btnd: jax.Array, cos_btf: jax.Array, sin_btf: jax.Array) -> jax.Array:
    """Rotates interleaved pairs (x[2i], x[2i+1]): llama.cpp's layout, which GGUF's permuted Q/K rows expect."""
    B, T, N, D = x_btnd.shape
    x = x_btnd.astype(jnp.float32).reshape(B, T, N, D // 2, 2)
    c, s = cos_btf[:, :, None, :], sin_btf[:, :, None, :]
    x0, x1 = x[..., 0], x[..., 1]
    out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(B, T, N, D).astype(x_btnd.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def _init(scale: float = 0.02):
    return nn.initializers.normal(scale)


def sharded_attention(mesh, **kw):
    """paged_attention mapped over `mesh`'s 'model' axis: each device attends with its own query heads over
    its own KV heads' pages. A Pallas kernel is an opaque custom call to XLA's partitioner, which would
    otherwise gather every KV page onto every device; query heads are grouped by KV head, so contiguous
    head slices keep each query with its KV head."""
    heads, pages, rep = P(None, None, "model", None), P(None, None, None, "model", None), P()
    return jax.shard_map(functools.partial(paged_attention, **kw), mesh=mesh,
                         in_specs=(heads, pages, pages, rep, rep, rep, rep), out_specs=heads, check_vma=False)


class DecoderLayer(nn.Module):
    """One Llama block; called by nn.scan with (carry, layer index, broadcast step data)."""
    config: ModelConfig
    dtype: Any
    attention_backend: str = "reference"
    interpret: bool = False
    mesh: Any = None     # set for the Pallas backend over several devices (see sharded_attention)

    @nn.compact
    def __call__(self, carry, layer, step):
        c = self.config
        d, H, K, D, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
        x, k_cache, v_cache = carry
        inputs, cos, sin = step
        B, T, _ = x.shape
        p = lambda name, shape, init=_init(): self.param(name, init, shape, self.dtype)  # noqa: E731
        with jax.named_scope("attention"):
            h = rms_norm(x, p("attn_norm", (d,), nn.initializers.ones), c.rms_norm_eps)
            q = apply_rope(jnp.einsum("btd,dh->bth", h, p("wq", (d, H * D))).reshape(B, T, H, D), cos, sin)
            k = apply_rope(jnp.einsum("btd,dh->bth", h, p("wk", (d, K * D))).reshape(B, T, K, D), cos, sin)
            v = jnp.einsum("btd,dh->bth", h, p("wv", (d, K * D))).reshape(B, T, K, D)
            slots = inputs.slot_mapping.reshape(-1)
            page, offset = slots // k_cache.shape[2], slots % k_cache.shape[2]
            k_cache = k_cache.at[layer, page, offset].set(k.reshape(B * T, K, D).astype(k_cache.dtype))
            v_cache = v_cache.at[layer, page, offset].set(v.reshape(B * T, K, D).astype(v_cache.dtype))
            kw = dict(scale=D ** -0.5, backend=self.attention_backend, interpret=self.interpret)
            attend = sharded_attention(self.mesh, **kw) if self.mesh is not None else \
                functools.partial(paged_attention, **kw)
            o = attend(q, k_cache, v_cache, layer, inputs.page_table, inputs.context_lens, inputs.query_lens)
            x = x + jnp.einsum("bth,hd->btd", o.reshape(B, T, H * D), p("wo", (H * D, d)))
        with jax.named_scope("mlp"):
            h = rms_norm(x, p("mlp_norm", (d,), nn.initializers.ones), c.rms_norm_eps)
            gate = jnp.einsum("btd,df->btf", h, p("w_gate", (d, F)))
            up = jnp.einsum("btd,df->btf", h, p("w_up", (d, F)))
            x = x + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, p("w_down", (F, d)))
        return (x, k_cache, v_cache), None


class Llama(nn.Module):
    config: ModelConfig
    dtype: Any = jnp.float32
    attention_backend: str = "reference"
    interpret: bool = False
    mesh: Any = None

    @nn.compact
    def __call__(self, k_cache, v_cache, inputs: StepInputs, logits_index, all_logits: bool = False):
        """Returns (logits, k_cache, v_cache). logits: float32 [B, V] at each row's `logits_index` [B]
        (or [B, T, V] for every token when all_logits). k_cache/v_cache: [L, P, S, Hkv, D], updated."""
        c = self.config
        embed = self.param("embed", _init(), (c.vocab_size, c.hidden_size), self.dtype)
        x = jnp.take(embed, inputs.tokens, axis=0)
        angles = inputs.positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inverse_frequencies(c))
        step = (inputs, jnp.cos(angles), jnp.sin(angles))
        layers = nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0, nn.broadcast), length=c.num_layers)
        (x, k_cache, v_cache), _ = layers(c, self.dtype, self.attention_backend, self.interpret, self.mesh,
                                          name="layers")(
            (x, k_cache, v_cache), jnp.arange(c.num_layers, dtype=jnp.int32), step)
        if not all_logits:
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)[:, 0]   # [B, d]
        x = rms_norm(x, self.param("final_norm", nn.initializers.ones, (c.hidden_size,), self.dtype),
                     c.rms_norm_eps)
        lm_head = self.param("lm_head", _init(), (c.hidden_size, c.vocab_size), self.dtype)
        logits = jnp.einsum("...d,dv->...v", x, lm_head, preferred_element_type=jnp.float32)
        return logits, k_cache, v_cache
