"""Pallas GPU paged attention (Triton lowering): one kernel for decode (T=1) and chunked prefill (T>1).

A program owns (batch row b, KV head h, block i of `block_t` queries, key split s). Its query tile is the
`block_t x group_pad` grid of (query, query-head-of-this-KV-head) pairs flattened into rows, so GQA of any
ratio shares one K/V read per KV head: the group is zero-padded to a power of two inside the tile and KV
is never replicated. The program walks its split's pages in order with an online softmax (float32 max /
sum / accumulator), `block_k` slots at a time, and stops at the last key its newest query can see: pages
past the row's length, and whole padding rows (query_lens == 0), cost nothing. When B * Hkv * blocks
would leave most SMs idle (decode at small batch), the pages are split across programs and the partial
results merged with their log-sum-exp in jnp (flash-decoding).

Why Triton and not Mosaic GPU: see WORKSPACE.md. The Triton lowering has no scalar prefetch, so index
maps cannot read the page table; the page pool instead stays in GPU memory (`memory_space=pl.ANY`) and is
indexed with a page id read inside the kernel. Triton wants power-of-two blocks and dots with M >= 16,
hence the padded rows; jnp's `//` and `%` do not lower (sign fix-ups), hence lax.div / lax.rem.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import fuser as _fuser  # noqa: F401  (see below)
from jax.experimental.pallas import triton as plt

# Why import the unused fuser: Pallas imports it lazily during the first pallas_call, and that import adds
# a JAX trace-context setting, so the caller's first jit trace would be retraced (recompiled) on its next
# call. Importing it here, before anything is traced, keeps the engine's jitted steps compiled once.

# Finite, not -inf: a row with nothing visible yet keeps m = MASK_VALUE and exp(m - m) stays finite.
MASK_VALUE = -1e30
MIN_ROWS = 16          # Triton dots need M >= 16.
TARGET_PROGRAMS = 256  # ~2 per SM on an H100/H200 (132 SMs): below this, split the keys.
MIN_SPLIT_KEYS = 256   # a split shorter than this is not worth its merge


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _attend_key_block(j, carry, *, q, q_pos, row_valid, b, h, ctx, pt_ref, k_ref, v_ref, scale, block_k,
                      blocks_per_page):
    """Online-softmax step over key block j (slots [j*block_k, (j+1)*block_k) of row b). q [rows, D];
    q_pos / row_valid [rows]; carry: m, l [rows] f32 running max / sum, acc [rows, D] f32."""
    m, l, acc = carry
    page = pt_ref[b, lax.div(j, blocks_per_page)]
    slots = pl.ds(lax.rem(j, blocks_per_page) * block_k, block_k)
    k = k_ref[page, slots, h, :]                                   # [block_k, D]
    v = v_ref[page, slots, h, :]
    k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    mask = (k_pos[None, :] <= q_pos[:, None]) & row_valid[:, None]
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    # Slots past the row's length may hold NaN: 0 * NaN would poison the accumulator.
    v = jnp.where((k_pos < ctx)[:, None], v, jnp.zeros((), v.dtype))
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + pv


def _attention_kernel(pt_ref, ctx_ref, qlen_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale,
                      group_pad, block_t, block_k, page_size, pages_per_split):
    """One (row b, KV head h, query block i, key split s). q_ref/o_ref: [rows, D] tiles, lse_ref [rows];
    k_ref/v_ref: the whole pool [pages, S, Hkv, D] in GPU memory; pt/ctx/qlen: int32 metadata in GPU memory."""
    b, h, i, s = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    ctx, qlen = ctx_ref[b], qlen_ref[b]
    rows = block_t * group_pad
    t = i * block_t + lax.div(lax.broadcasted_iota(jnp.int32, (rows,), 0), group_pad)
    # Key blocks this program reads: its split's, up to the block's newest valid query (none if padding).
    newest = ctx - qlen + jnp.minimum((i + 1) * block_t, qlen)
    blocks_per_page = page_size // block_k
    first = s * pages_per_split * blocks_per_page
    last = jnp.minimum(lax.div(newest + block_k - 1, block_k), first + pages_per_split * blocks_per_page)
    last = jnp.where(i * block_t < qlen, jnp.maximum(last, first), first)
    q = q_ref[...]
    step = functools.partial(_attend_key_block, q=q, q_pos=ctx - qlen + t, row_valid=t < qlen, b=b, h=h,
                             ctx=ctx, pt_ref=pt_ref, k_ref=k_ref, v_ref=v_ref, scale=scale, block_k=block_k,
                             blocks_per_page=blocks_per_page)
    init = (jnp.full((rows,), MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, l, acc = lax.fori_loop(first, last, step, init)
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / safe_l[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), MASK_VALUE)


def _attention_call(q_bhrd, k_pool, v_pool, page_table, context_lens, query_lens, *, scale, group_pad,
                    block_t, block_k, num_splits, out_dtype, interpret, num_warps, num_stages):
    """q_bhrd: [B, Hkv, R, D] query tiles (R = Tp * group_pad); k_pool/v_pool: [pages, S, Hkv, D]; page_table
    int32 [B, W] (already offset to the layer). Returns o [B, Hkv, splits, R, D] in out_dtype (each split
    normalised on its own) and lse [B, Hkv, splits, R] float32 (MASK_VALUE where a split saw no key)."""
    B, Hkv, R, D = q_bhrd.shape
    rows = block_t * group_pad
    pages_per_split = -(-page_table.shape[1] // num_splits)
    kernel = functools.partial(_attention_kernel, scale=scale, group_pad=group_pad, block_t=block_t,
                               block_k=block_k, page_size=k_pool.shape[1], pages_per_split=pages_per_split)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        kernel,
        grid=(B, Hkv, R // rows, num_splits),
        in_specs=[any_spec, any_spec, any_spec,
                  pl.BlockSpec((None, None, rows, D), lambda b, h, i, s: (b, h, i, 0)), any_spec, any_spec],
        out_specs=[pl.BlockSpec((None, None, None, rows, D), lambda b, h, i, s: (b, h, s, i, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda b, h, i, s: (b, h, s, i))],
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, num_splits, R, D), out_dtype),
                   jax.ShapeDtypeStruct((B, Hkv, num_splits, R), jnp.float32)],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_attention",
    )(page_table, context_lens, query_lens, q_bhrd, k_pool, v_pool)


def _merge_splits(o_bhsrd, lse_bhsr):
    """Combines per-split softmax results by their log-sum-exp: [B, Hkv, splits, R, D] -> [B, Hkv, R, D].
    An empty split has o = 0 and lse = MASK_VALUE, so it weighs 0 beside any real one (and all-empty gives 0)."""
    w = jnp.exp(lse_bhsr - jnp.max(lse_bhsr, axis=2, keepdims=True))
    return jnp.sum(w[..., None] * o_bhsrd.astype(jnp.float32), axis=2) / jnp.sum(w, axis=2)[..., None]


def _tiling(T: int, G: int, D: int, B: int, Hkv: int, W: int, S: int, target_rows: int, num_splits):
    """Static tile choice: (group_pad, block_t, block_k, num_splits); power-of-two tiles, >= MIN_ROWS rows."""
    group_pad = _next_pow2(G)
    block_t = max(MIN_ROWS // group_pad, min(_next_pow2(T), max(1, target_rows // group_pad)), 1)
    block_k = min(S, 64 if D > 64 else 128)
    if num_splits is None:
        programs = B * Hkv * -(-T // block_t)
        num_splits = max(1, min(-(-TARGET_PROGRAMS // programs), (W * S) // MIN_SPLIT_KEYS))
    num_splits = max(1, min(num_splits, W))
    return group_pad, block_t, block_k, num_splits


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "target_rows", "num_splits",
                                             "num_warps", "num_stages"))
def paged_attention(q_btnd, k_cache, v_cache, layer, page_table, context_lens, query_lens, *, scale,
                    interpret: bool = False, target_rows: int = 64, num_splits: int | None = None,
                    num_warps: int = 4, num_stages: int = 2):
    """Same contract as `kernels.reference.paged_attention_reference`: q [B, T, Hq, D]; k/v_cache
    [L, P, S, Hkv, D]; layer int32 scalar; page_table int32 [B, W]; context/query_lens int32 [B].
    Returns [B, T, Hq, D] in q's dtype (softmax in float32; rows t >= query_lens are 0).
    target_rows: query rows per program; num_splits: key splits per row (None: enough to fill the GPU).
    float32 dots follow jax_default_matmul_precision: Triton runs them as TF32 by default (as XLA's own
    GPU matmuls), as IEEE float32 under jax.default_matmul_precision("highest")."""
    B, T, Hq, D = q_btnd.shape
    L, P, S, Hkv, Dk = k_cache.shape
    if v_cache.shape != k_cache.shape or Dk != D or Hq % Hkv or page_table.shape[0] != B:
        raise ValueError(f"shapes q {q_btnd.shape}, k {k_cache.shape}, v {v_cache.shape}, "
                         f"page_table {page_table.shape} do not match")
    if D & (D - 1) or S & (S - 1) or D < 16 or S < 16:
        raise ValueError(f"head dim {D} and page size {S} must be powers of two >= 16 (Triton tiles)")
    G, W = Hq // Hkv, page_table.shape[1]
    group_pad, block_t, block_k, splits = _tiling(T, G, D, B, Hkv, W, S, target_rows, num_splits)
    Tp = -(-T // block_t) * block_t
    # [B, T, Hkv, G, D] -> [B, Hkv, Tp * Gp, D]: one contiguous tile of rows per (b, h, block of queries).
    q = q_btnd.reshape(B, T, Hkv, G, D).transpose(0, 2, 1, 3, 4)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, Tp - T), (0, group_pad - G), (0, 0))).reshape(B, Hkv, -1, D)
    # Fold the layer into the page id: [L, P, ...] -> [L * P, ...] is a free reshape.
    pages = page_table.astype(jnp.int32) + jnp.asarray(layer, jnp.int32) * P
    o, lse = _attention_call(
        q, k_cache.reshape(L * P, S, Hkv, D), v_cache.reshape(L * P, S, Hkv, D), pages,
        context_lens.astype(jnp.int32), query_lens.astype(jnp.int32), scale=scale, group_pad=group_pad,
        block_t=block_t, block_k=block_k, num_splits=splits,
        out_dtype=q_btnd.dtype if splits == 1 else jnp.float32, interpret=interpret,
        num_warps=num_warps, num_stages=num_stages)
    o = o[:, :, 0] if splits == 1 else _merge_splits(o, lse)
    o = o.reshape(B, Hkv, Tp, group_pad, D)[:, :, :T, :G].transpose(0, 2, 1, 3, 4)
    return o.reshape(B, T, Hq, D).astype(q_btnd.dtype)
