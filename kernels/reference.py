"""jnp paged attention: the CPU fallback and the tests' oracle.

An online softmax over the row's pages, KEYS_PER_STEP keys (whole pages) per loop step, gathering only
that step's pages and stopping after the longest row's last page. Measured on the 2-core CPU (SmolLM2
heads, pages of 128, f32; min of 15) against gathering all W pages then one masked softmax (the first
version): decode B=16 at 512-2048 tokens 12 vs 19 ms; the same rows of ~512 tokens in a 64-page
(bucket-padded) table 3.7 vs 125 ms, since work follows the longest context, not the table's width;
B=64 at ~1k tokens 21 vs 41 ms; prefill T=512 5.3 vs 8.6 ms (B=1) and 64 vs 105 ms (B=4); a 256-token
chunk over 1,792 cached tokens 19 vs 64 ms. It never materialises a [B, W*S, Hkv, D] copy of the cache.
Queries are grouped per KV head ('bkrd': rows are (query, head-in-group) pairs): KV is never replicated.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

# A large finite negative instead of -inf: fully masked rows (padding) then give 0, not NaN.
MASK_VALUE = -1e30
KEYS_PER_STEP = 256


def _attend_step(j, carry, *, q_bkrd, q_pos, q_valid, k_cache, v_cache, layer, pages, context_lens, scale):
    """Online-softmax step j: the C pages pages[j] ([B, C] ids) of every row, i.e. keys [j*C*S, (j+1)*C*S).
    q_bkrd [B, Hkv, R, D]; q_pos/q_valid [B, R]; carry: m, l [B, Hkv, R] f32 running max / sum, acc
    [B, Hkv, R, D] f32."""
    m, l, acc = carry
    B, Hkv, _, D = q_bkrd.shape
    C, S = pages.shape[2], k_cache.shape[2]
    step_pages = lax.dynamic_index_in_dim(pages, j, 0, keepdims=False)              # [B, C]
    # Gather only this step's pages of this layer ([B, C, S, Hkv, D]), then heads-major for the dots.
    k_bksd = k_cache[layer, step_pages].reshape(B, C * S, Hkv, D).transpose(0, 2, 1, 3)
    v_bksd = v_cache[layer, step_pages].reshape(B, C * S, Hkv, D).transpose(0, 2, 1, 3)
    key_pos = j * C * S + jnp.arange(C * S, dtype=jnp.int32)
    # Slots past the row's length may hold anything (NaN in tests): 0 * NaN must never reach acc.
    key_valid = key_pos[None, :] < context_lens[:, None]                             # [B, K]
    v_bksd = jnp.where(key_valid[:, None, :, None], v_bksd, jnp.zeros((), v_bksd.dtype))
    s = jnp.einsum("bkrd,bksd->bkrs", q_bkrd, k_bksd, preferred_element_type=jnp.float32) * scale
    mask = ((key_pos[None, None, :] <= q_pos[:, :, None]) & q_valid[:, :, None])[:, None]
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    pv = jnp.einsum("bkrs,bksd->bkrd", p.astype(v_bksd.dtype), v_bksd, preferred_element_type=jnp.float32)
    return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv


def paged_attention_reference(q_btnd, k_cache, v_cache, layer, page_table, context_lens, query_lens, *, scale):
    """Causal attention of a chunk of queries over a paged KV cache.

    q_btnd:       [B, T, Hq, D] queries (T = 1 for decode).
    k_cache/v_cache: [L, P, S, Hkv, D] pages of every layer (P pages of S slots); Hq % Hkv == 0.
    layer:        int32 scalar, which layer's pages to read.
    page_table:   int32 [B, W], the row's pages in order; entries past its length point anywhere (page 0).
    context_lens: int32 [B], tokens in the row's pages *including* this chunk (already written).
    query_lens:   int32 [B], valid queries in the row; query t sits at position context_lens - query_lens + t.
    Returns [B, T, Hq, D] in q's dtype; rows t >= query_lens (and rows with query_lens == 0) are 0.
    """
    B, T, Hq, D = q_btnd.shape
    S, Hkv = k_cache.shape[2], k_cache.shape[3]
    W = page_table.shape[1]
    G = Hq // Hkv
    C = max(1, min(W, KEYS_PER_STEP // S))                     # pages per step
    n_groups = -(-W // C)
    # Pad the table with the null page (its keys lie past every row's length, so they are masked).
    pages = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, n_groups * C - W)))
    pages = pages.reshape(B, n_groups, C).transpose(1, 0, 2)                          # [steps, B, C]
    q_bkrd = q_btnd.reshape(B, T, Hkv, G, D).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, T * G, D)
    t = jnp.arange(T, dtype=jnp.int32)
    q_pos = jnp.repeat((context_lens - query_lens)[:, None] + t[None, :], G, axis=1)  # [B, R]
    q_valid = jnp.repeat(t[None, :] < query_lens[:, None], G, axis=1)
    step = functools.partial(
        _attend_step, q_bkrd=q_bkrd, q_pos=q_pos, q_valid=q_valid, pages=pages, context_lens=context_lens,
        k_cache=k_cache, v_cache=v_cache, layer=layer, scale=scale)
    R = T * G
    init = (jnp.full((B, Hkv, R), MASK_VALUE, jnp.float32), jnp.zeros((B, Hkv, R), jnp.float32),
            jnp.zeros((B, Hkv, R, D), jnp.float32))
    # A dynamic trip count: pages past the longest row (bucket padding) cost nothing.
    n_steps = jnp.minimum(-(-jnp.max(context_lens) // (C * S)), n_groups)
    _, l, acc = lax.fori_loop(0, n_steps, step, init)
    o = jnp.where((l > 0.0)[..., None], acc / jnp.where(l > 0.0, l, 1.0)[..., None], 0.0)
    return o.reshape(B, Hkv, T, G, D).transpose(0, 2, 1, 3, 4).reshape(B, T, Hq, D).astype(q_btnd.dtype)
