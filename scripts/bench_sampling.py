"""Times engine.device.sampling.sample() (jitted) beside the sort-based sampler it replaced, in one run.

Each setting runs both samplers on the same rotating batches, interleaved call by call, and prints the median
wall and CPU milliseconds per call (CPU time, of all this process's threads, is steadier on a shared machine).
Logits are random normal rows (--scale) unless --logits names an .npy of real rows [N, V] float32.

  python scripts/bench_sampling.py --batch 1,16
  python scripts/bench_sampling.py --batch 16 --logits smollm_logits.npy
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout
from engine.device import sampling
from engine.device.sampling import SamplingInputs

SETTINGS = {  # name: (temperature, top_k, top_p)
    "greedy": (0.0, 0, 1.0),
    "T=1": (1.0, 0, 1.0),
    "T=0.8 top_p=0.95": (0.8, 0, 0.95),
    "T=1 top_p=0.95": (1.0, 0, 0.95),
    "T=1 top_k=50": (1.0, 50, 1.0),
    "T=0.7 top_k=40 top_p=0.9": (0.7, 40, 0.9),
}


def sort_sample(logits_bv, s: SamplingInputs):
    """The sampler as it was before the sort-free one (sorts every row whenever any row samples)."""
    greedy = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    def filtered(x, top_k_b, top_p_b):
        V = x.shape[-1]
        sorted_desc = -jnp.sort(-x, axis=-1)
        k = jnp.where(top_k_b > 0, jnp.minimum(top_k_b, V), V)
        kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p_b[:, None]
        last_kept = jnp.maximum(jnp.sum(keep, axis=-1) - 1, 0)
        pth = jnp.take_along_axis(sorted_desc, last_kept[:, None], axis=-1)
        return jnp.where(x >= jnp.maximum(kth, pth), x, -jnp.inf)

    def stochastic(_):
        temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
        scaled = filtered(logits_bv / temp, s.top_k, s.top_p)
        keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.PRNGKey(seed), pos))(s.seed, s.position)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(s.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(s.temperature > 0), stochastic, lambda _: greedy, None)


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=_ints, default=[1, 16])
    p.add_argument("--vocab", type=int, default=49152, help="row length of the random logits")
    p.add_argument("--scale", type=float, default=3.0, help="standard deviation of the random logits")
    p.add_argument("--logits", help=".npy of real logits [N, V] (overrides --vocab/--scale)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names from: " + ", ".join(SETTINGS))
    p.add_argument("--calls", type=int, default=40, help="timed calls per sampler and setting")
    p.add_argument("--no-sort", action="store_true", help="skip the sort-based sampler (slow at large batch)")
    return p.parse_args(argv)


def batches(rows, B, n, rng):
    """n device batches [B, V] drawn from the rows."""
    return [jnp.asarray(rows[rng.choice(len(rows), B)]) for _ in range(n)]


def inputs(B, temperature, top_k, top_p, step):
    return SamplingInputs(jnp.full(B, temperature, jnp.float32), jnp.full(B, top_k, jnp.int32),
                          jnp.full(B, top_p, jnp.float32), jnp.arange(B, dtype=jnp.uint32),
                          jnp.full(B, step, jnp.int32))


def time_pair(fns, data, setting, calls):
    """Interleaved timing of each fn over the rotating batches: {name: ([wall ms], [cpu ms]) per call}."""
    B = data[0].shape[0]
    out = {name: ([], []) for name in fns}
    for fn in fns.values():
        fn(data[0], inputs(B, *setting, 0)).block_until_ready()   # compile outside the timing
    for i in range(calls):
        x, s = data[i % len(data)], inputs(B, *setting, i)
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn(x, s).block_until_ready()
            out[name][0].append((time.perf_counter() - t) * 1e3)
            out[name][1].append((time.process_time() - c) * 1e3)
    return out


def main(argv=None):
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    if args.logits:
        rows = np.load(args.logits).astype(np.float32)
    else:
        rows = (rng.standard_normal((256, args.vocab)) * args.scale).astype(np.float32)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; V={rows.shape[1]}; "
          f"{'logits from ' + args.logits if args.logits else f'random normal logits, scale {args.scale}'}")
    print("| batch | setting | sampler | wall ms | CPU ms |\n|---|---|---|---|---|")
    for B in args.batch:
        data = batches(rows, B, 8, rng)
        for name in args.settings.split(","):
            fns = {"sort-free (now)": jax.jit(sampling.sample)}
            if not args.no_sort:
                fns["sort (before)"] = jax.jit(sort_sample)
            for sampler, (wall, cpu) in time_pair(fns, data, SETTINGS[name], args.calls).items():
                print(f"| {B} | {name} | {sampler} | {statistics.median(wall):.2f} | {statistics.median(cpu):.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
