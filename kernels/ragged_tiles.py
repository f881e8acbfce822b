"""The ragged token batch as the Pallas kernel's work list and query tiles, and back (jnp, inside jit).

A step's queries are one flat [N] token array: sequence r owns tokens [query_start[r], query_start[r+1]).
The kernel wants fixed-size tiles, so each sequence is cut into blocks of `block_t` consecutive tokens
(a block never spans two sequences) and each block becomes one tile of `block_t * group_pad` rows: the
(token, query head of one KV head) pairs, the GQA group zero-padded to a power of two. NB, the number of
blocks, is static: at most (N + min(R, N) * (block_t - 1)) // block_t, since each non-empty sequence
adds at most one partial block. Blocks past the real ones have no tokens and cost one early exit.

Why gather the tiles here rather than in the kernel: the Triton lowering has no scalar prefetch, so a
BlockSpec index map cannot follow a work list; gathering [N, Hq, D] queries costs a few hundred KB per
step, nothing beside the K/V the kernel reads.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Rows of the work list (int32 [WORK_ROWS, NB]).
ROW, FIRST_POS, NUM_TOKENS, CONTEXT = range(4)
WORK_ROWS = 4


def num_blocks(N: int, R: int, block_t: int) -> int:
    """Static upper bound on the blocks of `block_t` tokens that R sequences holding N tokens cut into."""
    return max(1, (N + min(R, N) * (block_t - 1)) // block_t)


class Plan(NamedTuple):
    """Where every block and token sits. work int32 [4, NB]: per block its sequence, the position of its
    first query, its number of valid queries (0: an empty block) and its sequence's context length.
    token_block / token_slot int32 [N]: the block of each token and its index inside the block;
    token_valid bool [N]: False for padding tokens (>= query_start[R])."""
    work: jax.Array
    token_block: jax.Array
    token_slot: jax.Array
    token_valid: jax.Array
    first_token: jax.Array   # int32 [NB] flat index of each block's first token


def plan(query_start, context_lens, *, N: int, block_t: int) -> Plan:
    """query_start int32 [R + 1] (nondecreasing, from 0), context_lens int32 [R] -> the Plan."""
    R = context_lens.shape[0]
    NB = num_blocks(N, R, block_t)
    qs = jnp.clip(query_start.astype(jnp.int32), 0, N)
    q_len = jnp.maximum(qs[1:] - qs[:-1], 0)
    blocks = (q_len + block_t - 1) // block_t
    block_end = jnp.cumsum(blocks)
    block_start = block_end - blocks
    b = jnp.arange(NB, dtype=jnp.int32)
    row = jnp.minimum(jnp.searchsorted(block_end, b, side="right"), R - 1).astype(jnp.int32)
    t0 = (b - block_start[row]) * block_t
    real = b < block_end[-1]
    ntok = jnp.where(real, jnp.clip(q_len[row] - t0, 0, block_t), 0)
    ctx = context_lens.astype(jnp.int32)[row]
    work = jnp.stack([row, ctx - q_len[row] + t0, ntok, ctx]).astype(jnp.int32)

    n = jnp.arange(N, dtype=jnp.int32)
    token_row = jnp.clip(jnp.searchsorted(qs, n, side="right") - 1, 0, R - 1)
    t = n - qs[token_row]
    token_block = jnp.minimum(block_start[token_row] + t // block_t, NB - 1).astype(jnp.int32)
    return Plan(work, token_block, (t % block_t).astype(jnp.int32), n < qs[R], qs[row] + t0)


def query_tiles(q_nhd, p: Plan, *, num_kv_heads: int, group_pad: int, block_t: int):
    """q [N, Hq, D] -> [NB, Hkv, block_t * group_pad, D] tiles in q's dtype; rows of padding tokens and of
    the padded group are 0 (finite: the kernel's unmasked key blocks compute them too)."""
    N, Hq, D = q_nhd.shape
    G = Hq // num_kv_heads
    tok = p.first_token[:, None] + jnp.arange(block_t, dtype=jnp.int32)[None, :]           # [NB, bt]
    valid = jnp.arange(block_t)[None, :] < p.work[NUM_TOKENS][:, None]
    q = q_nhd.reshape(N, num_kv_heads, G, D)[jnp.clip(tok, 0, N - 1)]                       # [NB, bt, Hkv, G, D]
    q = jnp.where(valid[:, :, None, None, None], q, jnp.zeros((), q.dtype))
    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, group_pad - G), (0, 0))).transpose(0, 2, 1, 3, 4)
    return q.reshape(q.shape[0], num_kv_heads, block_t * group_pad, D)


def merge_splits(o_bhsrd, lse2_bhsr):
    """Combines per-split softmax results by their base-2 log-sum-exp: [NB, Hkv, splits, rows, D] f32 ->
    [NB, Hkv, rows, D] f32. An empty split has o = 0 and a very negative lse, so it weighs 0 beside any
    real one (and all-empty gives 0)."""
    w = jnp.exp2(lse2_bhsr - jnp.max(lse2_bhsr, axis=2, keepdims=True))
    return jnp.sum(w[..., None] * o_bhsrd, axis=2) / jnp.sum(w, axis=2)[..., None]


def untile(o_bhrd, p: Plan, *, num_heads: int, group_pad: int, dtype):
    """[NB, Hkv, block_t * group_pad, D] tiles -> [N, Hq, D] in dtype, 0 for padding tokens."""
    NB, Hkv, rows, D = o_bhrd.shape
    G = num_heads // Hkv
    tiles = o_bhrd.reshape(NB, Hkv, rows // group_pad, group_pad, D)
    o = tiles[p.token_block, :, p.token_slot, :G]                          # [N, Hkv, G, D]
    o = o.reshape(-1, num_heads, D).astype(dtype)
    return jnp.where(p.token_valid[:, None, None], o, jnp.zeros((), dtype))
