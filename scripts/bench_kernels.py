"""Times ragged paged attention the way the engine calls it, and prints a markdown table.

Every config runs inside ONE jitted loop over --layers layers (each layer's output is the next layer's
query; per-layer pools, as the engine holds them), so the figure is device time per layer call, not host
dispatch latency. Tables always have the engine's width (the pages of a --max-length sequence) however
short the rows, pages are shuffled, data is random (never zeros). Beside each figure, a ceiling measured
on the same device: a big copy's GB/s for decode (bytes of K/V the rows must read, as a fraction of the
copy), a big matmul's TFLOP/s for prefill (causal QK^T + PV flops). Distinct pools are allocated up to
--pool-budget-gb and then reused round-robin (each far larger than the L2 cache, so reuse reads HBM).

  python scripts/bench_kernels.py --quick                          # CPU: the jnp reference, small grid
  python scripts/bench_kernels.py --batch 32,256 --context 1024,8192 --dtype bfloat16   # on a GPU
  python scripts/bench_kernels.py --sweep num_warps=4,8 --sweep num_stages=1,2,3 --batch 32 --context 4096
"""
from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout

import jax
import jax.numpy as jnp
import numpy as np

from tests.attention_oracle import entry_point


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _sweep(text: str) -> tuple[str, list[int]]:
    name, values = text.split("=")
    if name not in ("num_warps", "num_stages", "block_q", "num_splits", "target_rows"):
        raise argparse.ArgumentTypeError(f"--sweep {name!r}: not a kernel tuning argument")
    return name, _ints(values)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small grid (batch 1,16; context 512,2048; page 128)")
    p.add_argument("--batch", type=_ints, default=[1, 32, 256], help="decode rows")
    p.add_argument("--context", type=_ints, default=[1024, 8192], help="tokens per row (incl. this step's)")
    p.add_argument("--page-size", type=_ints, default=[16, 128])
    p.add_argument("--dtype", default="bfloat16,float32")
    p.add_argument("--max-length", type=int, default=8192, help="the engine's --max-length: table width")
    p.add_argument("--prefill-batch", type=_ints, default=[1, 4], help="rows of a prefill step")
    p.add_argument("--prefill-context", type=_ints, default=None, help="prefill rows' tokens (default: --context)")
    p.add_argument("--prefill-tokens", type=int, default=512, help="chunk length of prefill / mixed rows")
    p.add_argument("--heads", default="9,3", help="query heads,KV heads (default: SmolLM2-135M)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--kinds", default="decode,prefill,mixed", help="mixed: --batch decodes + one chunk")
    p.add_argument("--backends", default="reference,pallas")
    p.add_argument("--layers", type=int, default=30, help="layers in the timed jitted loop")
    p.add_argument("--pool-budget-gb", type=float, default=24.0, help="memory for distinct per-layer pools")
    p.add_argument("--sweep", type=_sweep, action="append", default=[],
                   help="NAME=v1,v2: time the Pallas kernel with each value (repeatable: the product)")
    p.add_argument("--include-interpret", action="store_true", help="time Pallas in interpret mode on CPU")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.context, args.page_size, args.prefill_batch = [1, 16], [512, 2048], [128], [1]
        args.layers = min(args.layers, 4)
        args.dtype = "float32" if jax.default_backend() == "cpu" else args.dtype
    return args


def time_call(fn, *args, iters: int) -> float:
    """Median seconds per call after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_ceilings(dtype, iters: int) -> tuple[float, float]:
    """(GB/s of a big copy counting read + write, TFLOP/s of a big square matmul) in `dtype`, random data."""
    on_cpu = jax.default_backend() == "cpu"
    x = jax.random.normal(jax.random.key(0), ((64 if on_cpu else 2048) * 2 ** 20 // jnp.dtype(dtype).itemsize,),
                          dtype)
    copy_s = time_call(jax.jit(lambda a: a * jnp.asarray(1.5, dtype)), x, iters=iters)
    n = 2048 if on_cpu else 8192
    a = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul_s = time_call(jax.jit(lambda m: m @ m), a, iters=iters)
    return 2 * x.nbytes / copy_s / 1e9, 2 * n ** 3 / matmul_s / 1e12


def make_step(q_lens, ctx, S, Hq, Hkv, D, max_length, dtype, seed=0):
    """A ragged step of len(q_lens) rows, each with `ctx` tokens in its pages and its last q_lens[r] as this
    step's queries, on shuffled pages in an engine-width table. Returns q, (page_table, context_lens,
    query_start), the pages one layer needs, and a pool factory."""
    rng = np.random.default_rng(seed)
    B, W, used = len(q_lens), -(-max_length // S), -(-ctx // S)
    P = B * used + 1
    table = np.zeros((B, W), np.int32)
    table[:, :used] = rng.permutation(np.arange(1, P)).reshape(B, used)
    query_start = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = jax.random.normal(jax.random.key(seed), (int(query_start[-1]), Hq, D), dtype)
    meta = (jnp.asarray(table), jnp.full((B,), ctx, jnp.int32), jnp.asarray(query_start))

    def pool(i):
        return jax.random.normal(jax.random.key(seed + 1 + i), (P, S, Hkv, D), dtype)
    return q, meta, P, pool


def layer_loop(attend, layers: int):
    """jit(fn(q, pools, meta)): `layers` attention calls in one program, each on the previous output."""
    def run(q, pools, meta):
        x = q
        for layer in range(layers):
            k, v = pools[layer % len(pools)]
            x = attend(x, k, v, *meta)
        return x
    return jax.jit(run)


def work(q_lens, ctx, Hq, Hkv, D, itemsize) -> tuple[float, float]:
    """(bytes of K/V the rows must read, flops): every visible key once; 4*D flops per (query head, key)."""
    visible = sum(ctx - q + t + 1 for q in q_lens for t in range(q))
    return 2.0 * len(q_lens) * ctx * Hkv * D * itemsize, 4.0 * Hq * D * visible


def variants(args, backend):
    """(label, tuning kwargs) to time for a backend: the sweep's product for pallas, else the default."""
    if backend != "pallas" or not args.sweep:
        return [("", {})]
    names = [name for name, _ in args.sweep]
    return [(" ".join(f"{n}={v}" for n, v in zip(names, values)), dict(zip(names, values)))
            for values in itertools.product(*(vals for _, vals in args.sweep))]


def configs(args):
    """(kind, rows' query lengths, context, page size): decode rows; prefill rows of one chunk each; mixed:
    B decode rows plus one chunk (the chunk is the last row)."""
    T = args.prefill_tokens
    for kind in args.kinds.split(","):
        batches = args.prefill_batch if kind == "prefill" else args.batch
        contexts = args.prefill_context or args.context if kind == "prefill" else args.context
        for B, ctx, S in itertools.product(batches, contexts, args.page_size):
            q_lens = {"decode": [1] * B, "prefill": [min(T, ctx)] * B, "mixed": [1] * B + [min(T, ctx)]}[kind]
            yield kind, q_lens, ctx, S


def run(args):
    on_cpu = jax.default_backend() == "cpu"
    Hq, Hkv = _ints(args.heads)
    D = args.head_dim
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; heads "
          f"{Hq}/{Hkv}, head dim {D}; table width = {args.max_length} tokens; {args.layers}-layer jitted loop\n")
    rows = ["| kind | backend | tuning | dtype | rows | context | longest q | page | pools | us/layer | GB/s "
            "| % of copy | TFLOP/s | % of matmul |", "|" + "---|" * 14]
    for dtype_name in args.dtype.split(","):
        dtype = jnp.dtype(dtype_name)
        copy_gbs, matmul_tflops = device_ceilings(dtype, args.iters)
        print(f"{dtype_name} ceilings: copy {copy_gbs:.1f} GB/s, matmul {matmul_tflops:.2f} TFLOP/s", flush=True)
        for kind, q_lens, ctx, S in configs(args):
            q, meta, P, pool = make_step(q_lens, ctx, S, Hq, Hkv, D, args.max_length, dtype)
            layer_bytes = 2 * P * S * Hkv * D * dtype.itemsize
            n_pools = max(1, min(args.layers, int(args.pool_budget_gb * 1e9 // layer_bytes)))
            pools = [(pool(2 * i), pool(2 * i + 1)) for i in range(n_pools)]
            nbytes, flops = work(q_lens, ctx, Hq, Hkv, D, dtype.itemsize)
            for backend in args.backends.split(","):
                if backend == "pallas" and on_cpu and not args.include_interpret:
                    continue
                for label, tuning in variants(args, backend):
                    fn = entry_point(backend, interpret=on_cpu and backend == "pallas", **tuning)
                    if fn is None:
                        print(f"skipped {backend}: kernels.paged_attention does not take the ragged contract yet")
                        continue
                    loop = layer_loop(functools.partial(fn, scale=D ** -0.5), args.layers)
                    secs = time_call(loop, q, pools, meta, iters=args.iters) / args.layers
                    gbs, tflops = nbytes / secs / 1e9, flops / secs / 1e12
                    name = "pallas (interpret)" if backend == "pallas" and on_cpu else backend
                    rows.append(f"| {kind} | {name} | {label or '-'} | {dtype_name} | {len(q_lens)} | {ctx} "
                                f"| {max(q_lens)} | {S} "
                                f"| {n_pools} | {secs * 1e6:.1f} | {gbs:.1f} | {100 * gbs / copy_gbs:.0f} "
                                f"| {tflops:.3f} | {100 * tflops / matmul_tflops:.1f} |")
                    print(rows[-1], flush=True)
            del pools
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    run(parse_args())
