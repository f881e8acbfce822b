"""The jnp ragged paged attention (the CPU path) against a float64 oracle on mixed steps: decodes, prefill
chunks over cached prefixes, a full-prompt hit (one query over a whole prompt), padding rows and tokens,
shuffled pages with NaN in every slot no row owns, page sizes 16-256 and GQA ratios 1/3/4."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import paged_attention as pa


def oracle(q, k, v, page_table, context_lens, query_start, scale):
    N, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    out = np.zeros((N, Hq, D))
    for r in range(len(context_lens)):
        n_q = query_start[r + 1] - query_start[r]
        pos = np.arange(context_lens[r])
        keys, values = k[page_table[r, pos // S], pos % S], v[page_table[r, pos // S], pos % S]
        for t in range(n_q):
            n = context_lens[r] - n_q + t + 1
            for h in range(Hq):
                s = keys[:n, h // G] @ q[query_start[r] + t, h] * scale
                w = np.exp(s - s.max())
                out[query_start[r] + t, h] = (w / w.sum()) @ values[:n, h // G]
    return out


def make_step(seed, q_lens, ctx, *, N, R, W, S, Hq, Hkv, D=32):
    rng = np.random.default_rng(seed)
    q_lens = list(q_lens) + [0] * (R - len(q_lens))
    ctx = list(ctx) + [0] * (R - len(ctx))
    n_pages = [-(-c // S) for c in ctx]
    P = 1 + sum(n_pages) + 2
    k = np.full((P, S, Hkv, D), np.nan, np.float32)
    v = np.full((P, S, Hkv, D), np.nan, np.float32)
    physical = iter(rng.permutation(np.arange(1, P)))
    table = rng.choice([0, P - 1], size=(R, W)).astype(np.int32)
    for r in range(R):
        for j in range(n_pages[r]):
            page = table[r, j] = next(physical)
            used = min(S, ctx[r] - j * S)
            k[page, :used] = rng.standard_normal((used, Hkv, D))
            v[page, :used] = rng.standard_normal((used, Hkv, D))
    qs = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    assert qs[-1] <= N
    q = rng.standard_normal((N, Hq, D)).astype(np.float32)
    q[qs[-1]:] = 100.0
    return q, k, v, table, np.asarray(ctx, np.int32), qs


CASES = [
    # (q_lens, contexts): decodes around page boundaries, a chunk over a cached prefix, a whole prompt,
    # a full-prompt hit (1 query over 70 tokens), and padding rows.
    ([1, 1, 1, 1], [1, 15, 16, 17]),
    ([1, 40, 1, 5, 1], [300, 40, 17, 70, 70]),
    ([33], [130]),
    ([1, 1, 20], [1, 600, 20]),
]


@pytest.mark.parametrize("S", [16, 32, 128, 256])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (6, 2), (8, 2)])
def test_reference_matches_oracle(S, case, Hq, Hkv):
    q_lens, ctx = CASES[case]
    N, R = 64, 8
    W = -(-max(ctx) // S) + 1
    q, k, v, table, ctx, qs = make_step(case * 7 + S, q_lens, ctx, N=N, R=R, W=W, S=S, Hq=Hq, Hkv=Hkv)
    fn = jax.jit(functools.partial(pa.paged_attention, scale=32 ** -0.5, backend="reference"))
    got = np.asarray(fn(*(jnp.asarray(x) for x in (q, k, v, table, ctx, qs))))
    want = oracle(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), table, ctx, qs, 32 ** -0.5)
    assert np.isfinite(got).all()
    assert (got[qs[-1]:] == 0).all()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
