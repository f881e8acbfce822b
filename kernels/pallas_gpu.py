"""Pallas GPU paged attention over one ragged token batch (Triton lowering).

One kernel serves decode rows, prefill chunks and full-prompt prefix hits in the same call. The step's
tokens are cut into blocks of `block_t` tokens of one sequence (kernels/ragged_tiles.py); a program owns
(block b, KV head h, key split s). Its query tile is the `block_t x group_pad` grid of (token,
query-head-of-this-KV-head) pairs flattened into rows, so GQA of any ratio shares one K/V read per KV
head (the group is zero-padded to a power of two inside the tile; KV is never replicated).

The program walks its split of the keys its newest query can see with an online softmax (float32 max /
sum / accumulator, base 2 with the softmax scale folded into one multiply), `block_k` keys per loop step
whatever the page size: each step loads the page id of every key from the page table and gathers
[block_k, D] of K and V from as many pages as that spans. Blocks every query of the tile sees entirely
run unmasked; only the last blocks (the causal diagonal, the row's end) are masked, and there K/V are
loaded with a mask, so slots past the row's length are never read. Keys are split across programs from
each block's real context (not the table's width), at least MIN_SPLIT_KEYS keys a split; the partial
results merge by their log-sum-exp in jnp (flash-decoding). Short rows in a wide table cost nothing.

Guards (an out-of-range read on a GPU can kill the CUDA context, i.e. the server): every page id is
checked before use and an id outside [0, P) reads page 0, the engine's null page; table columns and
context lengths are clamped to the table's width. `_key_slots` holds the whole guard.

Precision, every dot (QK^T and PV): bfloat16 inputs run bf16 x bf16 with float32 accumulation (P is cast
to bf16 for PV); float32 inputs run IEEE float32 by default (never TF32 silently): f32_dots="tf32x3"
(three TF32 passes, ~float32 accuracy on tensor cores) or "tf32" (one pass, ~1e-3) only when asked.

Why Triton and not Mosaic GPU: see WORKSPACE.md. Triton wants power-of-two tiles and dots with M >= 16,
hence the padded rows; jnp's `//` and `%` do not lower (sign fix-ups), hence lax.div / lax.rem.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import fuser as _fuser  # noqa: F401  (see below)
from jax.experimental.pallas import triton as plt

from kernels import ragged_tiles as rt

# Why import the unused fuser: Pallas imports it lazily during the first pallas_call, and that import adds
# a JAX trace-context setting, so the caller's first jit trace would be retraced (recompiled) on its next
# call. Importing it here, before anything is traced, keeps the engine's jitted steps compiled once.

# Finite, not -inf: a row with nothing visible yet keeps m = MASK_VALUE and exp2(m - m) stays finite.
MASK_VALUE = -1e30
MIN_ROWS = 16          # Triton dots need M >= 16.
BLOCK_K = 128          # keys per loop step, whatever the page size
TARGET_PROGRAMS = 264  # 2 per SM on an H100/H200 (132 SMs): below this, split the keys.
MIN_SPLIT_KEYS = 256   # a split shorter than this is not worth its merge
LOG2E = math.log2(math.e)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


F32_DOTS = {"ieee": lax.DotAlgorithmPreset.F32_F32_F32, "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
            "tf32": lax.DotAlgorithmPreset.TF32_TF32_F32}


def _dot_algorithm(dtype, f32_dots: str, interpret: bool):
    """The explicit precision of both dots (see the module docstring). XLA on CPU has no TF32, so interpret
    mode computes float32 dots in IEEE float32 whatever f32_dots asks."""
    if f32_dots not in F32_DOTS:
        raise ValueError(f"f32_dots={f32_dots!r} is not allowed; choose one of {', '.join(F32_DOTS)}")
    if dtype == jnp.float32:
        return F32_DOTS["ieee" if interpret else f32_dots]
    if dtype == jnp.bfloat16:
        return lax.DotAlgorithmPreset.BF16_BF16_F32
    raise ValueError(f"dtype {jnp.dtype(dtype).name} is not supported; use float32 or bfloat16")


def _key_slots(pt_ref, row, k_pos, *, num_pages: int, page_size: int, width: int):
    """The guard: where the keys k_pos (int32 [block_k]) of sequence `row` live. Returns (page, slot), each
    int32 [block_k], always inside the pool: the table column is clamped to [0, width) and a page id outside
    [0, num_pages) becomes page 0. Works on a Ref (in the kernel) or an array (in tests)."""
    col = jnp.clip(lax.div(k_pos, page_size), 0, width - 1)
    page = pt_ref[row, col]
    page = jnp.where((page >= 0) & (page < num_pages), page, 0)
    return page, lax.rem(k_pos, page_size)


def _attend_key_block(j, carry, *, masked, q, q_pos, row, ctx, h, pt_ref, k_ref, v_ref, scale_log2,
                      block_k, algorithm):
    """Online-softmax step over keys [j*block_k, (j+1)*block_k). q [rows, D]; q_pos [rows]; carry: m, l
    [rows] f32 running max / sum (base 2), acc [rows, D] f32. Unmasked steps hold only keys every row sees."""
    m, l, acc = carry
    k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    P, S = k_ref.shape[0], k_ref.shape[1]
    page, slot = _key_slots(pt_ref, row, k_pos, num_pages=P, page_size=S, width=pt_ref.shape[1])
    # Every index an array ([block_k, 1] x [1, D]): interpret mode discharges only all-array (or all-slice)
    # masked loads. Masked: slots past the row's length are not read at all (NaN, or not the row's pages).
    d = lax.broadcasted_iota(jnp.int32, (1, k_ref.shape[3]), 1)
    index = (page[:, None], slot[:, None], h, d)
    in_row = jnp.broadcast_to((k_pos < ctx)[:, None], (block_k, k_ref.shape[3])) if masked else None
    k = plt.load(k_ref.at[index], mask=in_row, other=0.0 if masked else None)       # [block_k, D]
    v = plt.load(v_ref.at[index], mask=in_row, other=0.0 if masked else None)
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=algorithm,
                        preferred_element_type=jnp.float32) * scale_log2
    if masked:
        mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos < ctx)[None, :]
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp2(s - m_new[:, None])
    if masked:   # a row that has seen nothing yet has m_new = MASK_VALUE: exp2(0) must not count
        p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp2(m - m_new)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=algorithm,
                         preferred_element_type=jnp.float32)
    return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + pv


def _split_range(first_pos, ntok, ctx, s, *, block_k: int, num_splits: int):
    """Key blocks [lo, hi) of split s, and n_full: blocks [0, n_full) are seen whole by every query."""
    newest = first_pos + ntok - 1
    n_blocks = jnp.where(ntok > 0, lax.div(jnp.minimum(newest, ctx - 1) + block_k, block_k), 0)
    n_blocks = jnp.maximum(n_blocks, 0)
    min_blocks = max(1, MIN_SPLIT_KEYS // block_k)
    splits = jnp.clip(lax.div(n_blocks + min_blocks - 1, min_blocks), 1, num_splits)
    per_split = lax.div(n_blocks + splits - 1, splits)
    lo = jnp.minimum(s * per_split, n_blocks)
    hi = jnp.minimum(lo + per_split, n_blocks)
    n_full = lax.div(jnp.clip(jnp.minimum(first_pos + 1, ctx), 0, None), block_k)
    return lo, hi, n_full


def _attention_kernel(work_ref, pt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale_log2, group_pad,
                      block_k, num_splits, algorithm):
    """One (block b, KV head h, key split s). work_ref int32 [4, NB] and pt_ref int32 [R, W] in GPU memory;
    q_ref/o_ref: [rows, D] tiles, lse_ref [rows]; k_ref/v_ref: one layer's pool [P, S, Hkv, D]."""
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row, first_pos = work_ref[rt.ROW, b], work_ref[rt.FIRST_POS, b]
    ntok = work_ref[rt.NUM_TOKENS, b]
    ctx = jnp.minimum(work_ref[rt.CONTEXT, b], pt_ref.shape[1] * k_ref.shape[1])   # the table's reach
    lo, hi, n_full = _split_range(first_pos, ntok, ctx, s, block_k=block_k, num_splits=num_splits)
    q = q_ref[...]
    rows = q.shape[0]
    q_pos = first_pos + lax.div(lax.broadcasted_iota(jnp.int32, (rows,), 0), group_pad)
    step = functools.partial(_attend_key_block, q=q, q_pos=q_pos, row=row, ctx=ctx, h=h, pt_ref=pt_ref,
                             k_ref=k_ref, v_ref=v_ref, scale_log2=scale_log2, block_k=block_k,
                             algorithm=algorithm)
    carry = (jnp.full((rows,), MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros(q.shape, jnp.float32))
    mid = jnp.clip(n_full, lo, hi)
    carry = lax.fori_loop(lo, mid, functools.partial(step, masked=False), carry)
    m, l, acc = lax.fori_loop(mid, hi, functools.partial(step, masked=True), carry)
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / safe_l[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(safe_l), MASK_VALUE)


def _attention_call(work, page_table, q_tiles, k_pool, v_pool, *, scale, group_pad, block_k, num_splits,
                    out_dtype, interpret, num_warps, num_stages, f32_dots, debug):
    """q_tiles [NB, Hkv, rows, D]. Returns o [NB, Hkv, splits, rows, D] in out_dtype (each split normalised
    on its own) and lse [NB, Hkv, splits, rows] f32, base 2 (MASK_VALUE where a split saw no key)."""
    NB, Hkv, rows, D = q_tiles.shape
    kernel = functools.partial(_attention_kernel, scale_log2=scale * LOG2E, group_pad=group_pad,
                               block_k=block_k, num_splits=num_splits,
                               algorithm=_dot_algorithm(q_tiles.dtype, f32_dots, interpret))
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        kernel,
        grid=(NB, Hkv, num_splits),
        in_specs=[any_spec, any_spec, pl.BlockSpec((None, None, rows, D), lambda b, h, s: (b, h, 0, 0)),
                  any_spec, any_spec],
        out_specs=[pl.BlockSpec((None, None, None, rows, D), lambda b, h, s: (b, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((NB, Hkv, num_splits, rows, D), out_dtype),
                   jax.ShapeDtypeStruct((NB, Hkv, num_splits, rows), jnp.float32)],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        debug=debug,
        name="ragged_paged_attention",
    )(work, page_table, q_tiles, k_pool, v_pool)


def tiling(N: int, R: int, G: int, Hkv: int, W: int, S: int, *, block_q=None, target_rows: int = 64,
           num_splits=None):
    """Static tile choice -> (group_pad, block_t, num_splits). block_t follows the bucket's tokens per
    sequence (N / R: 1 for a decode bucket, so a decode row does not pad a 64-row tile); num_splits fills
    about TARGET_PROGRAMS programs (each block's real context then decides how many it uses)."""
    group_pad = _next_pow2(G)
    min_t = max(1, MIN_ROWS // group_pad)
    if block_q is None:
        per_seq = _next_pow2(-(-N // max(1, min(R, N))))
        block_q = min(per_seq, max(min_t, target_rows // group_pad))
    block_t = max(min_t, _next_pow2(block_q))
    if num_splits is None:
        programs = rt.num_blocks(N, R, block_t) * Hkv
        num_splits = min(-(-TARGET_PROGRAMS // programs), (W * S) // MIN_SPLIT_KEYS)
    return group_pad, block_t, max(1, min(num_splits, -(-W * S // BLOCK_K)))


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_q", "target_rows", "num_splits",
                                             "num_warps", "num_stages", "f32_dots", "debug"))
def ragged_paged_attention(q_nhd, k_pool, v_pool, page_table, context_lens, query_start, *, scale,
                           interpret: bool = False, block_q: int | None = None, target_rows: int = 64,
                           num_splits: int | None = None, num_warps: int = 4, num_stages: int = 2,
                           f32_dots: str = "ieee", debug: bool = False):
    """Causal attention of a ragged token batch over one layer's pages (the contract of
    kernels.paged_attention.paged_attention). q_nhd [N, Hq, D] (sequences one after another, padding at the
    end); k_pool/v_pool [P, S, Hkv, D], Hq % Hkv == 0; page_table int32 [R, W]; context_lens int32 [R]
    (tokens in the pages including this step's); query_start int32 [R + 1]. Query t of sequence r sits at
    position context_lens[r] - q_len_r + t. Returns [N, Hq, D] in q's dtype, 0 for padding tokens.
    Tuning (static): block_q tokens per tile (None: from N / R), num_splits key splits (None: fill the GPU),
    num_warps / num_stages (Triton), f32_dots (float32 dot precision: ieee | tf32x3 | tf32); debug prints
    the kernel's jaxpr and Triton IR at lowering."""
    N, Hq, D = q_nhd.shape
    P, S, Hkv, Dk = k_pool.shape
    R, W = page_table.shape
    if (v_pool.shape != k_pool.shape or Dk != D or Hq % Hkv or context_lens.shape != (R,)
            or query_start.shape != (R + 1,)):
        raise ValueError(f"shapes q {q_nhd.shape}, k {k_pool.shape}, v {v_pool.shape}, page_table "
                         f"{page_table.shape}, context_lens {context_lens.shape}, query_start "
                         f"{query_start.shape} do not match")
    if D & (D - 1) or D < 16:
        raise ValueError(f"head dim {D} must be a power of two >= 16 (Triton tiles)")
    group_pad, block_t, splits = tiling(N, R, Hq // Hkv, Hkv, W, S, block_q=block_q,
                                        target_rows=target_rows, num_splits=num_splits)
    p = rt.plan(query_start, context_lens, N=N, block_t=block_t)
    q_tiles = rt.query_tiles(q_nhd, p, num_kv_heads=Hkv, group_pad=group_pad, block_t=block_t)
    o, lse = _attention_call(
        p.work, page_table.astype(jnp.int32), q_tiles, k_pool, v_pool, scale=scale, group_pad=group_pad,
        block_k=BLOCK_K, num_splits=splits, out_dtype=q_nhd.dtype if splits == 1 else jnp.float32,
        interpret=interpret, num_warps=num_warps, num_stages=num_stages, f32_dots=f32_dots, debug=debug)
    o = o[:, :, 0] if splits == 1 else rt.merge_splits(o, lse)
    return rt.untile(o, p, num_heads=Hq, group_pad=group_pad, dtype=q_nhd.dtype)
