"""The ragged paged-attention contract in float64 numpy, and test cases built to break a wrong kernel.

Contract (kernels/paged_attention.py): q [N, Hq, D] holds every token of the step, sequence r owning tokens
[query_start[r], query_start[r+1]), padding tokens after query_start[R]; k/v [P, S, Hkv, D] are one layer's
pages; page_table [R, W]; context_lens [R] counts the sequence's tokens including this step's; query t of
sequence r sits at position context_lens[r] - q_len + t and sees keys at positions <= its own.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


def ragged_oracle(q, k, v, page_table, context_lens, query_start, scale):
    """Plain float64 attention, one sequence (and up to 64 of its queries) at a time: a masked softmax over
    the keys at positions <= each query's. Returns [N, Hq, D] float64."""
    N, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    out = np.zeros((N, Hq, D))
    for r in range(len(context_lens)):
        start, end, ctx = int(query_start[r]), int(query_start[r + 1]), int(context_lens[r])
        pos = np.arange(ctx)
        keys, values = (x[page_table[r, pos // S], pos % S] for x in (k, v))       # [ctx, Hkv, D]
        for t0 in range(start, end, 64):
            t1 = min(t0 + 64, end)
            qs = q[t0:t1].reshape(t1 - t0, Hkv, Hq // Hkv, D)
            s = np.einsum("tkgd,nkd->tkgn", qs, keys) * scale
            q_pos = ctx - (end - start) + np.arange(t0 - start, t1 - start)         # each query's position
            s = np.where((pos[None, :] <= q_pos[:, None])[:, None, None, :], s, -np.inf)
            w = np.exp(s - s.max(axis=-1, keepdims=True))
            w /= w.sum(axis=-1, keepdims=True)
            out[t0:t1] = np.einsum("tkgn,nkd->tkgd", w, values).reshape(t1 - t0, Hq, D)
    return out


class Case(NamedTuple):
    q: jnp.ndarray
    k: jnp.ndarray
    v: jnp.ndarray
    page_table: jnp.ndarray
    context_lens: jnp.ndarray
    query_start: jnp.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.query_start[-1])

    def expected(self, scale=None, page_table=None) -> np.ndarray:
        as64 = [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (self.q, self.k, self.v)]
        scale = self.q.shape[-1] ** -0.5 if scale is None else scale
        table = np.asarray(self.page_table if page_table is None else page_table)
        return ragged_oracle(*as64, table, np.asarray(self.context_lens), np.asarray(self.query_start), scale)


def make_case(seed, rows, *, Hq, Hkv, D, S, dtype="float32", N=None, R=None, W=None, P=None) -> Case:
    """rows: [(context_len, q_len)] of the real sequences, in order. N: token capacity (default: their tokens
    + 3 padding tokens); R: sequence capacity (default: len(rows) + 2 padding rows); W: table width;
    P: pages in the pool (default: the null page, the rows' pages and 3 spare ones).
    Each row's tokens sit on shuffled physical pages; everything else is garbage that must not leak: NaN
    (the null page 0, spare pages, past-the-end slots of odd rows) or finite +-100 (past-the-end slots of
    even rows, padding tokens), which a NaN-to-0 guard cannot hide. Table entries past a row's pages point
    at the null page, a NaN spare page or another row's page."""
    rng = np.random.default_rng(seed)
    ctx = np.array([c for c, _ in rows] + [0] * ((R or len(rows) + 2) - len(rows)), np.int32)
    q_len = np.array([ql for _, ql in rows] + [0] * (len(ctx) - len(rows)), np.int32)
    assert (q_len <= ctx).all() and ((q_len > 0) | (ctx == 0)).all(), "a real row has >= 1 query"
    query_start = np.concatenate([[0], np.cumsum(q_len)]).astype(np.int32)
    N = N or int(query_start[-1]) + 3
    n_pages = -(-ctx // S)
    W = W or max(1, int(n_pages.max()))
    P = P or 1 + int(n_pages.sum()) + 3
    assert P >= 2 + int(n_pages.sum()), "the pool needs the null page, the rows' pages and a spare one"
    k = np.full((P, S, Hkv, D), np.nan, np.float32)
    v = np.full((P, S, Hkv, D), np.nan, np.float32)
    physical = iter(rng.permutation(np.arange(1, P)))
    page_table = rng.choice([0, 1, P - 1], size=(len(ctx), W)).astype(np.int32)
    for r in range(len(ctx)):
        for j in range(n_pages[r]):
            page = page_table[r, j] = next(physical)
            if r % 2 == 0:
                k[page], v[page] = rng.uniform(-100, 100, (2, S, Hkv, D))
            used = min(S, ctx[r] - j * S)
            k[page, :used], v[page, :used] = rng.standard_normal((2, used, Hkv, D))
    q = rng.standard_normal((N, Hq, D)).astype(np.float32)
    q[query_start[-1]:] = rng.uniform(-100, 100, q[query_start[-1]:].shape)
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    return Case(q, k, v, jnp.asarray(page_table), jnp.asarray(ctx), jnp.asarray(query_start))


def entry_point(backend: str, interpret: bool = False, **tuning):
    """The function of the ragged contract for `backend` ('pallas' | 'reference'), called as
    fn(q, k, v, page_table, context_lens, query_start, scale=...): the engine's entry point, or the Pallas
    kernel itself when tuning options are given."""
    from kernels import paged_attention as pa
    from kernels import pallas_gpu
    if backend == "pallas" and tuning:
        return functools.partial(pallas_gpu.ragged_paged_attention, interpret=interpret, **tuning)
    return functools.partial(pa.paged_attention, backend=backend, interpret=interpret)
