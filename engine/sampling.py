"""Token sampling inside the jitted step: greedy, temperature, top-k, top-p, per-row seeds.

Each row's key is fold_in(PRNGKey(seed), position of the token being sampled), so a request's tokens depend
only on its seed and its own history — not on which other requests share the batch, nor on preemption.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingInputs(NamedTuple):
    temperature: jax.Array  # [B] float32, 0 = greedy
    top_k: jax.Array        # [B] int32, 0 = off
    top_p: jax.Array        # [B] float32, 1 = off
    seed: jax.Array         # [B] uint32
    position: jax.Array     # [B] int32, index the sampled token will take in the sequence


def _filtered_logits(logits_bv, top_k_b, top_p_b):
    """Sets logits outside each row's top-k / top-p nucleus to -inf (ties at the threshold are kept)."""
    V = logits_bv.shape[-1]
    sorted_desc = -jnp.sort(-logits_bv, axis=-1)
    k = jnp.where(top_k_b > 0, jnp.minimum(top_k_b, V), V)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)                     # [B, 1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # A sorted token is kept while the mass strictly before it is < top_p (the first one always is).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p_b[:, None]
    last_kept = jnp.maximum(jnp.sum(keep, axis=-1) - 1, 0)
    pth = jnp.take_along_axis(sorted_desc, last_kept[:, None], axis=-1)
    threshold = jnp.maximum(kth, pth)
    return jnp.where(logits_bv >= threshold, logits_bv, -jnp.inf)


def sample(logits_bv: jax.Array, s: SamplingInputs) -> jax.Array:
    """logits [B, V] float32 -> token ids [B] int32."""
    greedy = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    def stochastic(_):
        temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
        scaled = _filtered_logits(logits_bv / temp, s.top_k, s.top_p)
        keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.PRNGKey(seed), pos))(s.seed, s.position)
        drawn = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, scaled).astype(jnp.int32)
        return jnp.where(s.temperature > 0, drawn, greedy)

    # Skip the sort entirely when every row is greedy (the common serving case).
    return jax.lax.cond(jnp.any(s.temperature > 0), stochastic, lambda _: greedy, None)
