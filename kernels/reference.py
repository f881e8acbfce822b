"""jnp ragged paged attention: the CPU path (and the oracle the Pallas kernel is checked against).

One call attends every query of a step's flattened token batch to its own sequence's pages. The work is
cut into *items*: (query tile, group of pages holding ~KEYS_PER_ITEM keys), listed in jnp from the step's
metadata. A `fori_loop` whose trip count is the number of real items processes up to ITEMS_PER_CHUNK items per
iteration: one gather of their pages, one batched matmul for the scores and one for the values, and an
online-softmax merge into each tile's running (max, sum, accumulator) by segment ops. So the cost follows
the sum of the real contexts (rounded up to a chunk), not rows x the longest row nor the table's width.

Two tile shapes, because a decode query and a prefill chunk want different ones: a row with one query
(decode, or a full-prompt prefix hit) is one tile of 1 query; a longer row is cut into tiles of
PREFILL_TILE queries, each reading only the keys up to its own last query (causal). Queries are grouped
per KV head (rows of a tile are (query, head-in-group) pairs), so KV is never replicated for GQA.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# A large finite negative instead of -inf: fully masked rows (padding) then give 0, not NaN.
MASK_VALUE = -1e30
KEYS_PER_ITEM = 256     # keys (whole pages) one item reads
ITEMS_PER_CHUNK = 8     # most items per loop iteration: ~1.5 MB of K and of V for SmolLM2 (L2-sized)
PREFILL_TILE = 32       # queries per tile for rows with more than one query


class Tiles(NamedTuple):
    """Query tiles of one shape (all int32 [NT]); tiles with no items are padding."""
    row: jax.Array       # the sequence the tile belongs to
    q0: jax.Array        # token index (in the flat batch) of its first query
    nq: jax.Array        # valid queries
    pos0: jax.Array      # position of its first query
    n_items: jax.Array   # items it reads (0 for a padding tile)


def _decode_tiles(context_lens, q_len, query_start, keys_per_item):
    """One tile per row with exactly one query."""
    is_decode = q_len == 1
    n_items = jnp.where(is_decode, -(-context_lens // keys_per_item), 0)
    R = context_lens.shape[0]
    return Tiles(jnp.arange(R, dtype=jnp.int32), query_start[:-1], is_decode.astype(jnp.int32),
                 context_lens - 1, n_items)


def _prefill_tiles(context_lens, q_len, query_start, keys_per_item, tile, capacity):
    """Rows with >= 2 queries cut into tiles of `tile` queries; `capacity` static tiles in all."""
    per_row = jnp.where(q_len >= 2, -(-q_len // tile), 0)
    ends = jnp.cumsum(per_row)
    t = jnp.arange(capacity, dtype=jnp.int32)
    row = jnp.minimum(jnp.searchsorted(ends, t, side="right"), per_row.shape[0] - 1).astype(jnp.int32)
    k = t - (ends[row] - per_row[row])
    valid = t < ends[-1]
    nq = jnp.where(valid, jnp.minimum(tile, q_len[row] - k * tile), 0)
    pos0 = context_lens[row] - q_len[row] + k * tile
    n_items = jnp.where(valid, -(-(pos0 + nq) // keys_per_item), 0)
    return Tiles(row, query_start[row] + k * tile, nq, pos0, n_items)


def _item_list(n_items, capacity):
    """(tile, key group) of every item, tiles in order; items past the real count get tile = NT (dummy)."""
    ends = jnp.cumsum(n_items)
    i = jnp.arange(capacity, dtype=jnp.int32)
    tile = jnp.searchsorted(ends, i, side="right").astype(jnp.int32)   # NT past the end
    safe = jnp.minimum(tile, n_items.shape[0] - 1)
    return tile, i - (ends[safe] - n_items[safe]), ends[-1]


def _chunk(c, state, *, tiles: Tiles, item_tile, item_group, q_bkrd, k_pool, v_pool, groups, context_lens,
           tq, scale, CH):
    """Online-softmax merge of items [c*CH, (c+1)*CH). State per tile (+1 dummy): m, l [NT+1, Hkv, R],
    acc [NT+1, Hkv, R, D] float32, where R = tq * G rows of (query, head-in-group)."""
    m, l, acc = state
    NT = tiles.row.shape[0]
    P, S, Hkv, D = k_pool.shape
    C = groups.shape[2]
    it = lax.dynamic_slice_in_dim(item_tile, c * CH, CH)                 # [CH] tile ids (NT = dummy)
    grp = lax.dynamic_slice_in_dim(item_group, c * CH, CH)
    safe = jnp.minimum(it, NT - 1)
    row = tiles.row[safe]
    pages = groups[row, grp]                                              # [CH, C]
    k = k_pool[pages].reshape(CH, C * S, Hkv, D).transpose(0, 2, 1, 3)    # [CH, Hkv, C*S, D]
    v = v_pool[pages].reshape(CH, C * S, Hkv, D).transpose(0, 2, 1, 3)
    key_pos = grp[:, None] * (C * S) + jnp.arange(C * S, dtype=jnp.int32)[None]     # [CH, K]
    # Slots past the row's length may hold anything (NaN in tests): 0 * NaN must never reach acc.
    v = jnp.where((key_pos < context_lens[row][:, None])[:, None, :, None], v, jnp.zeros((), v.dtype))
    q = q_bkrd[safe]                                                      # [CH, Hkv, R, D]
    G = q.shape[2] // tq
    t = jnp.arange(tq * G, dtype=jnp.int32) // G
    q_pos = tiles.pos0[safe][:, None] + t[None]                           # [CH, R]
    q_ok = (t[None] < tiles.nq[safe][:, None]) & (it < NT)[:, None]
    mask = ((key_pos[:, None, :] <= q_pos[:, :, None]) & q_ok[:, :, None])[:, None]  # [CH, 1, R, K]
    s = jnp.einsum("ckrd,cksd->ckrs", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jax.ops.segment_max(jnp.max(s, -1), it, num_segments=NT + 1))
    p = jnp.where(mask, jnp.exp(s - m_new[it][..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    pv = jnp.einsum("ckrs,cksd->ckrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    l = alpha * l + jax.ops.segment_sum(jnp.sum(p, -1), it, num_segments=NT + 1)
    acc = alpha[..., None] * acc + jax.ops.segment_sum(pv, it, num_segments=NT + 1)
    return m_new, l, acc


def _attend_tiles(out, q_nhd, k_pool, v_pool, groups, context_lens, tiles: Tiles, *, tq, keys_per_item,
                  scale):
    """Adds the attention output of every valid query of `tiles` into out [N, Hq, D] (float32)."""
    N, Hq, D = q_nhd.shape
    Hkv = k_pool.shape[2]
    G, NT = Hq // Hkv, tiles.row.shape[0]
    # Each tile's queries [NT, tq, Hq, D] -> [NT, Hkv, tq*G, D]: rows are (query, head-in-group) pairs.
    tok = tiles.q0[:, None] + jnp.arange(tq, dtype=jnp.int32)[None]
    tok_ok = jnp.arange(tq)[None] < tiles.nq[:, None]
    q = q_nhd[jnp.where(tok_ok, tok, 0)].reshape(NT, tq, Hkv, G, D).transpose(0, 2, 1, 3, 4)
    q_bkrd = q.reshape(NT, Hkv, tq * G, D)
    # A chunk never holds more items than there are tiles: one decode row (batch 1) then gathers one
    # item per iteration instead of 8 mostly-dummy ones (measured: attention fell from ~1/3 of a batch-1
    # SmolLM2 step at a short context to ~1%; per-item cost, not per-iteration cost, dominates).
    CH = min(ITEMS_PER_CHUNK, NT)
    capacity = -(-NT * groups.shape[1] // CH) * CH
    item_tile, item_group, total = _item_list(tiles.n_items, capacity)
    R = tq * G
    init = (jnp.full((NT + 1, Hkv, R), MASK_VALUE, jnp.float32), jnp.zeros((NT + 1, Hkv, R), jnp.float32),
            jnp.zeros((NT + 1, Hkv, R, D), jnp.float32))
    body = functools.partial(_chunk, tiles=tiles, item_tile=item_tile, item_group=item_group, q_bkrd=q_bkrd,
                             k_pool=k_pool, v_pool=v_pool, groups=groups, context_lens=context_lens, tq=tq,
                             scale=scale, CH=CH)
    _, l, acc = lax.fori_loop(0, -(-total // CH), body, init)   # dynamic: real items only
    l, acc = l[:NT], acc[:NT]
    o = jnp.where((l > 0.0)[..., None], acc / jnp.where(l > 0.0, l, 1.0)[..., None], 0.0)
    o = o.reshape(NT, Hkv, tq, G, D).transpose(0, 2, 1, 3, 4).reshape(NT * tq, Hq, D)
    dest = jnp.where(tok_ok, tok, N).reshape(-1)                            # N: dropped
    return out.at[dest].add(o, mode="drop")


def paged_attention_reference(q_nhd, k_pool, v_pool, page_table, context_lens, query_start, *, scale):
    """Causal attention of a ragged token batch over a paged KV cache (one layer).

    q_nhd:        [N, Hq, D] queries of every token of the step, sequence after sequence, padding last.
    k_pool/v_pool: [P, S, Hkv, D] one layer's pages (P pages of S slots); Hq % Hkv == 0.
    page_table:   int32 [R, W], sequence r's pages in order; entries past its length point anywhere.
    context_lens: int32 [R], tokens in sequence r's pages *including* this step's (already written).
    query_start:  int32 [R + 1], nondecreasing from 0: sequence r owns tokens [query_start[r],
                  query_start[r+1]); query t of it sits at position context_lens[r] - q_len + t.
    Returns [N, Hq, D] in q's dtype; padding tokens (>= query_start[R]) are 0.
    """
    N, Hq, D = q_nhd.shape
    R, W = page_table.shape
    S = k_pool.shape[1]
    C = max(1, min(W, KEYS_PER_ITEM // S))                    # pages per item
    n_groups = -(-W // C)
    # Pad the table with the null page (its keys lie past every row's length, so they are masked).
    groups = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, n_groups * C - W))).reshape(R, n_groups, C)
    query_start = query_start.astype(jnp.int32)
    context_lens = context_lens.astype(jnp.int32)
    q_len = query_start[1:] - query_start[:-1]
    keys = C * S
    attend = functools.partial(_attend_tiles, q_nhd=q_nhd, k_pool=k_pool, v_pool=v_pool, groups=groups,
                               context_lens=context_lens, keys_per_item=keys, scale=scale)
    out = jnp.zeros((N, Hq, D), jnp.float32)
    # Each pass is skipped at run time when the step has no row of its kind (a pure decode step has no
    # prefill tiles, a lone prompt no decode rows): its set-up and write-back cost per layer even with no
    # item to process (~1/10 of a 32-row decode step).
    decode = functools.partial(attend, tiles=_decode_tiles(context_lens, q_len, query_start, keys), tq=1)
    out = lax.cond(jnp.any(q_len == 1), decode, lambda o: o, out)
    if N > 1:
        tile = min(PREFILL_TILE, N)
        capacity = min(R, N // 2) + N // tile
        prefill = functools.partial(attend, tiles=_prefill_tiles(context_lens, q_len, query_start, keys, tile,
                                                                 capacity), tq=tile)
        out = lax.cond(jnp.any(q_len >= 2), prefill, lambda o: o, out)
    return out.astype(q_nhd.dtype)
