"""Token sampling inside the jitted step: greedy, temperature, top-k, top-p, per-row seeds — without a sort.

Semantics (the sort-based definition lives in tests/test_sampling.py): logits are divided by the temperature;
a token is kept when fewer than top_k tokens have a strictly larger logit (top_k 0 or >= V: off) and the
probability mass of the strictly larger tokens, over the whole softmax, is < top_p (top_p 1: off). Ties at the
threshold are therefore kept and the kept set is {logit >= threshold}: only the threshold is searched for.

How. The threshold is a radix select on the float's order-preserving uint32 key: three passes, each a
2,048-bucket histogram (segment_sum) of the count or the probability mass of the keys still in play, fix 11
bits each. It is exact for every top_k / top_p (no candidate cap, no silent truncation), and top_k off with
top_p 1 skips it: the whole distribution is sampled. The mass is summed from the tail up, so float32's error
is relative to the tail, not to the whole distribution. The draw is exact too: a block of BLOCK tokens with
its share of the kept mass (block logsumexp), then a token within it, both by Gumbel-max — V/BLOCK + BLOCK
noise values a row instead of V.

Why (this 2-core CPU, batch 16, V = 49,152, CPU time; scripts/bench_sampling.py): the sort cost ~300 ms a
step and Gumbel noise over the vocabulary ~25-50 ms. lax.top_k(64) candidates cost ~3-6 ms, yet on SmolLM2's
own logits at T=0.8, top_p=0.95 the nucleus exceeds 64 tokens in 16% of rows (256: 2.6%), so most batch-16
steps would need the exact fallback anyway; bisection on the key needs ~32 passes over the rows (~60-120 ms),
the radix select 3 (~7 ms of the ~16 ms a top_p step now costs). Greedy-only steps skip all of it (lax.cond).
On GPU, XLA's scatter-add may add in any order: a row whose mass lies within float rounding of top_p could
then differ between runs (XLA's --xla_gpu_deterministic_ops fixes the order).

Each row's key is fold_in(PRNGKey(seed), position of the token being sampled), so a request's tokens depend
only on its seed and its own history — not on which other requests share the batch, nor on preemption.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

BLOCK = 256  # tokens per block of the two-level draw


class SamplingInputs(NamedTuple):
    temperature: jax.Array  # [B] float32, 0 = greedy
    top_k: jax.Array        # [B] int32, 0 = off
    top_p: jax.Array        # [B] float32, 1 = off
    seed: jax.Array         # [B] uint32
    position: jax.Array     # [B] int32, index the sampled token will take in the sequence


def argmax(x_bv: jax.Array) -> jax.Array:
    """[B, V] -> int32 [B]: jnp.argmax's answer (first maximum; first NaN if any) as two plain reductions,
    which XLA CPU vectorises (jnp.argmax's paired reduction takes ~3-4x longer at batch 16)."""
    m = jnp.max(x_bv, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x_bv.shape, 1)
    return jnp.min(jnp.where((x_bv == m) | jnp.isnan(x_bv), iota, x_bv.shape[-1]), axis=-1)


def _order_key(x):
    """float32 -> uint32 with the same order (negative floats have their bits flipped)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_order_key(key):
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


DIGIT_BITS = 11  # a histogram of 2,048 buckets a pass; three passes fix all 32 bits of the order key


def _radix_select(keys_bv, weights_bv, target_b):
    """The smallest uint32 t with sum(weights[keys <= t]) > target, one histogram pass per DIGIT_BITS digit.
    keys [B, V] uint32, weights [B, V] float32 (>= 0), target [B] float32 -> t [B] uint32."""
    B, V = keys_bv.shape
    n = 1 << DIGIT_BITS
    rows = n * jnp.arange(B, dtype=jnp.int32)[:, None]

    def digit_pass(i, state):
        prefix, below = state                       # the digits decided so far; the weight of keys under them
        high = keys_bv >> ((2 - i).astype(jnp.uint32) * DIGIT_BITS)
        in_play = (high >> DIGIT_BITS) == prefix[:, None]                 # keys that share the prefix
        segment = (rows + (high & (n - 1)).astype(jnp.int32)).reshape(-1)
        w = jnp.where(in_play, weights_bv, 0.0).reshape(-1)
        hist = jax.ops.segment_sum(w, segment, num_segments=B * n).reshape(B, n)
        cum = below[:, None] + jnp.cumsum(hist, axis=1)                   # weight of keys up to each digit
        d = jnp.minimum(jnp.sum(cum <= target_b[:, None], axis=1), n - 1)  # first digit over (min: float drift)
        below = jnp.take_along_axis(cum - hist, d[:, None], axis=1)[:, 0]
        return (prefix << DIGIT_BITS) | d.astype(jnp.uint32), below

    init = (jnp.zeros(B, jnp.uint32), jnp.zeros(B, jnp.float32))
    return jax.lax.fori_loop(0, 3, digit_pass, init)[0]


def thresholds(x_bv: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array, active_b: jax.Array) -> jax.Array:
    """Per-row threshold [B] float32 of the kept set {x >= threshold}; -inf where nothing is cut or the row is
    not active. x [B, V] float32 (temperature applied, no -0.0), top_k [B] int32, top_p [B] float32 in (0, 1],
    active [B] bool.

    A token x is kept iff count(> x) < top_k and mass(> x) < top_p, i.e. iff the count / mass at or below x
    exceed V - top_k / 1 - top_p: each limit's threshold is the radix select of the smallest such order key,
    and a row with both takes the larger. Summing the mass from below keeps float32's error relative to the
    (small) tail, not to the whole distribution."""
    V = x_bv.shape[-1]
    k_on = active_b & (top_k_b > 0) & (top_k_b < V)
    p_on = active_b & (top_p_b < 1.0)
    both = k_on & p_on
    none = jnp.full(x_bv.shape[:1], -jnp.inf, jnp.float32)

    def cut(_):
        keys = _order_key(x_bv)
        probs = jnp.exp(x_bv - jax.nn.logsumexp(x_bv, axis=-1, keepdims=True))

        # Round 0: each row's top_p (or its top_k when top_p is off); round 1, only run when some row has
        # both: those rows' top_k. One loop body keeps a single radix select in the compiled step.
        def round_(state):
            i, t = state
            by_mass = p_on & (i == 0)
            counted = k_on & ((i == 0) | both)
            target = jnp.where(by_mass, 1.0 - top_p_b, jnp.where(counted, (V - top_k_b).astype(jnp.float32), -1.0))
            return i + 1, jnp.maximum(t, _radix_select(keys, jnp.where(by_mass[:, None], probs, 1.0), target))

        rounds = 1 + jnp.any(both).astype(jnp.int32)
        t = jax.lax.while_loop(lambda s: s[0] < rounds, round_, (jnp.int32(0), jnp.zeros_like(keys[:, 0])))[1]
        t = jnp.clip(t, _order_key(jnp.float32(-jnp.inf)), jnp.max(keys, axis=-1))  # keeps the top token
        return jnp.where(k_on | p_on, _from_order_key(t), none)

    return jax.lax.cond(jnp.any(k_on | p_on), cut, lambda _: none, None)


def _canonical(x):
    return jnp.where(x == 0, 0.0, x)  # -0.0 -> +0.0: order keys and float comparisons then agree on ties


def filtered_logits(logits_bv: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array,
                    active_b: jax.Array | None = None) -> jax.Array:
    """[B, V] float32 -> [B, V] float32 with the logits outside each row's top-k / top-p set at -inf (ties at
    the threshold kept). Rows with active False (default: all active) are returned whole."""
    x = _canonical(logits_bv)
    active = jnp.ones(x.shape[:1], bool) if active_b is None else active_b
    return jnp.where(x >= thresholds(x, top_k_b, top_p_b, active)[:, None], x, -jnp.inf)


def draw(keys_b, logits_bv: jax.Array) -> jax.Array:
    """One token per row [B] int32 from softmax(logits) ([B, V] float32, -inf = excluded), exactly: a block
    with probability its share of the mass (block logsumexp), then a token within that block (Gumbel-max)."""
    B, V = logits_bv.shape
    nb = -(-V // BLOCK)
    blocks = jnp.pad(logits_bv, ((0, 0), (0, nb * BLOCK - V)), constant_values=-jnp.inf).reshape(B, nb, BLOCK)
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (nb + BLOCK,)))(keys_b)      # one stream per row
    b = argmax(jax.nn.logsumexp(blocks, axis=-1) + gumbel[:, :nb])
    chosen = jnp.take_along_axis(blocks, b[:, None, None], axis=1)[:, 0]              # [B, BLOCK]
    return b * BLOCK + argmax(chosen + gumbel[:, nb:])


def sample(logits_bv: jax.Array, s: SamplingInputs) -> jax.Array:
    """logits [B, V] float32 -> token ids [B] int32."""
    greedy = argmax(logits_bv)

    def stochastic(_):
        hot = s.temperature > 0
        x = logits_bv / jnp.where(hot, s.temperature, 1.0)[:, None]
        keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.PRNGKey(seed), pos))(s.seed, s.position)
        drawn = draw(keys, filtered_logits(x, s.top_k, s.top_p, hot))
        return jnp.where(hot, drawn, greedy)

    # Greedy-only steps (the common serving case) skip all of it.
    return jax.lax.cond(jnp.any(s.temperature > 0), stochastic, lambda _: greedy, None)
