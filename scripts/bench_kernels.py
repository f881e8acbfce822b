"""Times paged attention (decode and prefill) on the present device and prints a markdown table.

For each config: milliseconds per call, achieved GB/s (bytes of K/V the rows must read) and TFLOP/s
(causal QK^T + PV), each beside a ceiling measured on the same device (a big copy's GB/s, a big matmul's
TFLOP/s). The jnp reference and the Pallas kernels run side by side; on CPU the Pallas kernels only run
in interpret mode, which says nothing about GPU speed, so they are skipped unless --include-interpret.

  python scripts/bench_kernels.py --quick
  python scripts/bench_kernels.py --batch 1,16,64 --context 1024,8192 --page-size 16,128 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels.paged_attention import paged_attention


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small grid (batch 1,16; context 512,2048; page 128)")
    p.add_argument("--batch", type=_ints, default=[1, 8, 64])
    p.add_argument("--context", type=_ints, default=[128, 1024, 8192], help="tokens per row (incl. the chunk)")
    p.add_argument("--page-size", type=_ints, default=[16, 64, 128])
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--prefill-tokens", type=int, default=512, help="chunk length T of the prefill rows")
    p.add_argument("--heads", default="9,3", help="query heads,KV heads (default: SmolLM2-135M)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--kinds", default="decode,prefill")
    p.add_argument("--backends", default="reference,pallas")
    p.add_argument("--include-interpret", action="store_true", help="time Pallas in interpret mode on CPU")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.context, args.page_size = [1, 16], [512, 2048], [128]
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
    """(GB/s of a big copy counting read + write, TFLOP/s of a big square matmul) in `dtype`."""
    on_cpu = jax.default_backend() == "cpu"
    x = jnp.ones(((64 if on_cpu else 1024) * 2 ** 20 // jnp.dtype(dtype).itemsize,), dtype)
    copy_s = time_call(jax.jit(lambda a: a + jnp.ones((), dtype)), x, iters=iters)
    n = 2048 if on_cpu else 8192
    a = jnp.ones((n, n), dtype) / n
    matmul_s = time_call(jax.jit(lambda m: m @ m), a, iters=iters)
    return 2 * x.nbytes / copy_s / 1e9, 2 * n ** 3 / matmul_s / 1e12


def make_inputs(kind, B, ctx, S, Hq, Hkv, D, T, dtype, seed=0):
    """One layer's pool holding B rows of `ctx` tokens on shuffled pages; T = 1 (decode) or the chunk."""
    rng = np.random.default_rng(seed)
    T = 1 if kind == "decode" else min(T, ctx)
    W = -(-ctx // S)
    P = B * W + 1
    page_table = rng.permutation(np.arange(1, P)).reshape(B, W).astype(np.int32)
    k = jax.random.normal(jax.random.key(seed), (1, P, S, Hkv, D), dtype)
    v = jax.random.normal(jax.random.key(seed + 1), (1, P, S, Hkv, D), dtype)
    q = jax.random.normal(jax.random.key(seed + 2), (B, T, Hq, D), dtype)
    lens = np.full((B,), ctx, np.int32)
    return (q, k, v, jnp.int32(0), jnp.asarray(page_table), jnp.asarray(lens),
            jnp.full((B,), T, jnp.int32))


def work(kind, B, ctx, Hq, Hkv, D, T, itemsize) -> tuple[float, float]:
    """(bytes of K/V to read, flops): every visible key once; 4*D flops per (query head, visible key)."""
    T = 1 if kind == "decode" else min(T, ctx)
    visible = sum(ctx - T + t + 1 for t in range(T))                # causal keys summed over the chunk
    return 2.0 * B * ctx * Hkv * D * itemsize, 4.0 * B * Hq * D * visible


def run(args):
    on_cpu = jax.default_backend() == "cpu"
    Hq, Hkv = _ints(args.heads)
    D = args.head_dim
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"heads {Hq}/{Hkv}, head dim {D}\n")
    rows = ["| kind | backend | dtype | batch | context | T | page | ms | GB/s | % of copy | TFLOP/s | % of matmul |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for dtype_name in args.dtype.split(","):
        dtype = jnp.dtype(dtype_name)
        copy_gbs, matmul_tflops = device_ceilings(dtype, args.iters)
        print(f"{dtype_name} ceilings: copy {copy_gbs:.1f} GB/s, matmul {matmul_tflops:.2f} TFLOP/s")
        for kind in args.kinds.split(","):
            for B in args.batch:
                for ctx in args.context:
                    for S in args.page_size:
                        inputs = make_inputs(kind, B, ctx, S, Hq, Hkv, D, args.prefill_tokens, dtype)
                        nbytes, flops = work(kind, B, ctx, Hq, Hkv, D, args.prefill_tokens, dtype.itemsize)
                        for backend in args.backends.split(","):
                            if backend == "pallas" and on_cpu and not args.include_interpret:
                                continue
                            fn = jax.jit(functools.partial(paged_attention, scale=D ** -0.5, backend=backend,
                                                           interpret=on_cpu))
                            label = "pallas (interpret)" if backend == "pallas" and on_cpu else backend
                            secs = time_call(fn, *inputs, iters=args.iters)
                            gbs, tflops = nbytes / secs / 1e9, flops / secs / 1e12
                            rows.append(f"| {kind} | {label} | {dtype_name} | {B} | {ctx} | {inputs[0].shape[1]} "
                                        f"| {S} | {secs * 1e3:.3f} | {gbs:.1f} | {100 * gbs / copy_gbs:.0f} "
                                        f"| {tflops:.3f} | {100 * tflops / matmul_tflops:.1f} |")
                            print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    run(parse_args())
