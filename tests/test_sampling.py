"""engine.device.sampling against the sort-based definition it replaced: kept sets and probabilities, seeds, greedy
rows and draw frequencies.

The definition is the old sort-based code, evaluated in float64 with top_p = 1 meaning "off" (SamplingInputs'
contract). In float32 its cumulative sum over 49,152 tokens drifts: it reaches 1.0 early, so at top_p = 1 it
silently dropped up to ~40% of the vocabulary (test_full_distribution_when_nothing_is_cut fails with it), and
at top_p = 0.999 it keeps one token more or less than exact arithmetic in some rows. Test top_p values are moved
to the middle of a gap between two achievable masses, so that no float32 rounding decides a comparison either
way (unambiguous_top_p); every test uses fixed seeds.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.device.sampling import SamplingInputs, argmax, draw, filtered_logits, sample, thresholds

FILTER, SAMPLE = jax.jit(filtered_logits), jax.jit(sample)


def definition_keep(x, top_k, top_p):
    """The sort-based filter: bool [B, V], True where the token is kept. x [B, V] (any float), top_k, top_p [B]."""
    x = np.asarray(x, np.float64)
    V = x.shape[-1]
    sorted_desc = -np.sort(-x, axis=-1)
    k = np.where(top_k > 0, np.minimum(top_k, V), V)
    kth = np.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    probs = softmax(sorted_desc)
    # A sorted token is kept while the mass strictly before it is < top_p (the first one always is).
    mass_before = np.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1)
    last_kept = np.maximum(keep.sum(-1) - 1, 0)
    pth = np.take_along_axis(sorted_desc, last_kept[:, None], axis=-1)
    return x >= np.maximum(kth, pth)


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def achievable_masses(row):
    """The masses strictly above each distinct value of `row` (descending values), then 1: float64 [D + 1]."""
    s = -np.sort(-np.asarray(row, np.float64))
    probs = softmax(s)
    before = np.cumsum(probs) - probs
    return np.r_[before[np.r_[True, s[1:] != s[:-1]]], 1.0]


def unambiguous_top_p(masses, p, margin=3e-6):
    """p moved to the middle of the gap between consecutive achievable masses nearest to p among those wider
    than 2 * margin (so no float32 rounding decides a comparison); p itself when p >= 1."""
    if p >= 1:
        return p
    lo, hi = masses[:-1], masses[1:]
    wide = np.flatnonzero(hi - lo > 2 * margin)
    best = wide[np.argmin(np.abs(hi[wide] - p))]
    return float((lo[best] + hi[best]) / 2)


TEMPERATURES = (0.5, 1.0, 2.0)
TOP_P = (1.0, 0.999, 0.95, 0.7, 0.3, 1e-6)


def top_ks(V):
    return (0, 1, 2, 7, 64, 300, V - 1, V, V + 5)   # 0 is off, and so is anything >= V


def rows_and_limits(logits):
    """Every (row, temperature, top_k, top_p) combination: scaled float32 rows [N, V], top_k [N], top_p [N]."""
    xs, ks, ps = [], [], []
    for row in logits:
        for t in TEMPERATURES:
            x = (row / np.float32(t)).astype(np.float32)
            masses = achievable_masses(x)
            for k in top_ks(len(row)):
                for p in TOP_P:
                    xs.append(x)
                    ks.append(k)
                    ps.append(unambiguous_top_p(masses, p))
    return np.stack(xs), np.array(ks, np.int32), np.array(ps, np.float32)


def random_logits(kind, rows, V, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, V))
    if kind == "ties":       # a few distinct values (and -0.0), each shared by many tokens
        x = np.round(x * 2) / 2
    if kind == "peaked":     # a handful of likely tokens over a flat tail
        x = x + np.where(rng.random((rows, V)) < 0.002, 8.0, 0.0)
    if kind == "wide":       # SmolLM2-like spread
        x = x * 3
    return x.astype(np.float32)


@pytest.mark.parametrize("kind, V", [("normal", 3001), ("ties", 3001), ("peaked", 2048), ("wide", 49152),
                                     ("normal", 5), ("ties", 7)])
def test_kept_set_and_probabilities_equal_the_definition(kind, V):
    x, top_k, top_p = rows_and_limits(random_logits(kind, 2 if V > 10_000 else 3, V, seed=V))
    got = np.asarray(FILTER(x, top_k, top_p))
    want = definition_keep(x, top_k, top_p)
    bad = np.flatnonzero((np.isfinite(got) != want).any(-1))
    assert bad.size == 0, (f"{bad.size} of {len(x)} rows differ; first: top_k={top_k[bad[0]]} "
                           f"top_p={top_p[bad[0]]} kept {np.isfinite(got[bad[0]]).sum()} vs {want[bad[0]].sum()}")
    np.testing.assert_array_equal(got[want], x[want])                # kept logits are unchanged
    np.testing.assert_allclose(softmax(got), softmax(np.where(want, x, -np.inf)), rtol=1e-6, atol=1e-12)
    assert want.sum(-1).min() >= 1 and (V < 100 or (want.sum(-1) > 64).any())  # big kept sets too


def test_ties_at_the_threshold_are_kept():
    x = np.log(np.array([[0.5, 0.2, 0.2, 0.1]] * 4, np.float32))
    got = np.isfinite(np.asarray(FILTER(x, np.array([2, 0, 0, 1], np.int32),
                                        np.array([1.0, 0.6, 0.45, 1.0], np.float32))))
    assert got.tolist() == [[True, True, True, False],    # top_k=2: the second-largest value is tied
                            [True, True, True, False],    # top_p=0.6: mass before the 0.2s is 0.5 < 0.6
                            [True, False, False, False],  # top_p=0.45
                            [True, False, False, False]]  # top_k=1


def test_full_distribution_when_nothing_is_cut():
    """top_k 0 and top_p 1 keep every token, however small; the float32 sort-based code dropped the tail."""
    x = np.linspace(-100, 30, 49152, dtype=np.float32)[None].repeat(2, 0)
    got = np.asarray(FILTER(x, np.array([0, 49152], np.int32), np.ones(2, np.float32)))
    assert np.isfinite(got).all()


def test_inactive_rows_are_not_cut():
    x = random_logits("normal", 3, 500, seed=1)
    th = np.asarray(jax.jit(thresholds)(x, np.array([5, 5, 0], np.int32), np.array([0.5, 0.5, 1.0], np.float32),
                                        np.array([True, False, True])))
    assert np.isfinite(th[0]) and th[1] == -np.inf and th[2] == -np.inf


def test_argmax_matches_jnp_argmax_on_ties_nan_and_inf():
    x = random_logits("ties", 6, 1000, seed=2)
    x[1, [3, 9]] = 50.0
    x[2, 7] = np.nan
    x[3, :] = -np.inf
    x[4, [5, 2]] = np.inf
    np.testing.assert_array_equal(np.asarray(jax.jit(argmax)(x)), np.asarray(jnp.argmax(x, axis=-1)))


def inputs(B, temperature=1.0, top_k=0, top_p=1.0, seed=None, position=0):
    full = lambda v, dt: np.broadcast_to(np.asarray(v, dt), (B,)).copy()
    return SamplingInputs(full(temperature, np.float32), full(top_k, np.int32), full(top_p, np.float32),
                          np.arange(B, dtype=np.uint32) if seed is None else full(seed, np.uint32),
                          full(position, np.int32))


def test_greedy_rows_get_their_argmax_in_a_mixed_batch():
    x = random_logits("ties", 16, 3001, seed=3)
    s = inputs(16, temperature=[0, 1.5, 0, 0.7, 0, 2.0, 0, 1.0] * 2, top_k=[0, 0, 5, 0, 0, 40, 1, 0] * 2,
               top_p=[1.0, 0.9, 0.5, 1.0, 1e-6, 1.0, 1.0, 0.3] * 2)
    got = np.asarray(SAMPLE(x, s))
    greedy = np.asarray(s.temperature) == 0
    np.testing.assert_array_equal(got[greedy], np.argmax(x, -1)[greedy])
    assert (got[~greedy] != np.argmax(x, -1)[~greedy]).sum() >= 4  # the hot rows really sampled
    np.testing.assert_array_equal(np.asarray(SAMPLE(x, inputs(16, temperature=0.0))), np.argmax(x, -1))


def test_same_seed_same_tokens_whatever_the_batch():
    x = random_logits("normal", 16, 3001, seed=4)
    s = inputs(16, temperature=1.0, top_p=0.95, top_k=[0, 50] * 8, seed=np.arange(16) * 7,
               position=np.arange(16) + 3)
    a = np.asarray(SAMPLE(x, s))
    np.testing.assert_array_equal(a, np.asarray(SAMPLE(x, s)))
    # Rows 0-7 inside another batch (reversed, next to greedy rows and other sampling settings), and row 3
    # alone, sample the same tokens.
    mix = lambda v, w: np.concatenate([np.asarray(v)[7::-1], np.asarray(w)[8:]])
    t = SamplingInputs(*(mix(f, g) for f, g in zip(s, inputs(16, temperature=[0.0, 2.0] * 8, top_k=3))))
    np.testing.assert_array_equal(np.asarray(SAMPLE(mix(x, x[::-1]), t))[:8], a[7::-1])
    assert np.asarray(SAMPLE(x[3:4], SamplingInputs(*(np.asarray(f)[3:4] for f in s))))[0] == a[3]
    other = np.asarray(SAMPLE(x, s._replace(seed=np.asarray(s.seed) + 1)))
    assert (other != a).sum() >= 8


def chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def within(observed, p, n, sds=5):
    """|observed share - p| within `sds` binomial standard deviations over n draws."""
    return np.abs(observed - p) <= sds * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (2.0, 30, 1.0),
                                                       (1.3, 12, 0.8)])
def test_draw_frequencies_match_the_definition(temperature, top_k, top_p):
    """20,480 draws through sample() (fixed seeds: deterministic) from one 600-token row, i.e. three blocks:
    no excluded token is ever drawn, Pearson's chi-square over the kept tokens is within 5 standard deviations
    of its mean, and so is each block's share (a block mis-weighted by ~5% would fail)."""
    rng = np.random.default_rng(5)
    row = (rng.standard_normal(600) * 1.5 + np.where(np.arange(600) % 97 == 0, 3.0, 0.0)).astype(np.float32)
    x = (row / np.float32(temperature)).astype(np.float32)[None]
    top_p = unambiguous_top_p(achievable_masses(x[0]), top_p)
    keep = definition_keep(x, np.array([top_k]), np.array([top_p]))[0]
    probs = softmax(np.where(keep, x[0], -np.inf))
    B, n = 2048, 20480
    tokens = np.concatenate([np.asarray(SAMPLE(np.repeat(row[None], B, 0),
                                               inputs(B, temperature, top_k, top_p, position=i)))
                             for i in range(n // B)])
    counts = np.bincount(tokens, minlength=600)
    assert counts[~keep].sum() == 0
    df = keep.sum() - 1
    assert df >= 10
    assert chi_square(counts[keep], probs[keep]) < df + 5 * np.sqrt(2 * df)
    blocks = lambda v: np.add.reduceat(v, [0, 256, 512])
    assert within(blocks(counts) / n, blocks(probs), n).all()


def test_draw_gives_a_partial_last_block_its_exact_share():
    """draw() alone, V = 300 (one full block + a partial one), 65,536 fixed keys."""
    logits = np.zeros((65536, 300), np.float32)
    logits[:, 256:] = np.log(3.0)          # 44 tokens of weight 3 vs 256 of weight 1: share 132/388
    keys = jax.vmap(jax.random.PRNGKey)(np.arange(65536, dtype=np.uint32))
    got = np.asarray(jax.jit(draw)(keys, logits))
    assert within((got >= 256).mean(), 132 / 388, 65536)
    assert within((got == 299).mean(), 3 / 388, 65536) and within((got == 0).mean(), 1 / 388, 65536)
