"""Numerics of the compiled paged-attention kernel at realistic sizes (a stage of scripts/gpu_check.sh).

Each case is a ragged step in an engine-width table (the pages of an 8,192-token sequence) with NaN in
every free page and slot (tests/attention_oracle.make_case). The Pallas kernel runs twice and must be
bitwise equal (a race would not be); its output is compared with the float64 oracle (relative Frobenius
error) and, where the jnp reference takes the ragged contract, with that (IEEE float32 dots). Prints a
markdown table; exits 1 if any case fails.

  python scripts/gpu_numerics.py [--only decode-b33]
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout

import jax
import jax.numpy as jnp
import numpy as np

from tests.attention_oracle import Case, entry_point, make_case

MAX_LENGTH = 8192
# Relative error vs float64: IEEE float32 lands far under 1e-5; bf16 inputs and P cast to bf16 ~3e-3.
LIMIT = {"float32": 1e-5, "bfloat16": 1e-2}
SMOLLM2 = dict(Hq=9, Hkv=3, D=64)
LLAMA8B = dict(Hq=32, Hkv=8, D=128)


def _contexts(n, low, high, seed):
    return [int(c) for c in np.random.default_rng(seed).integers(low, high + 1, n)]


def cases():
    """name -> (builder(dtype) -> Case, dtypes)."""
    b33 = [1, 15, 16, 17, 127, 128, 129, 8192] + _contexts(25, 2, MAX_LENGTH, 1)
    mixed = [(2560, 512), (700, 1)] + [(c, 1) for c in _contexts(8, 100, 3000, 2)]   # chunk, prefix hit, decodes
    return {
        "decode-b1-8k-p128": (lambda dt: make_case(0, [(8192, 1)], S=128, W=64, dtype=dt, **SMOLLM2),
                              ("bfloat16", "float32")),
        "decode-b33-ragged-p16": (lambda dt: make_case(1, [(c, 1) for c in b33], S=16, W=512, dtype=dt,
                                                       **SMOLLM2), ("bfloat16", "float32")),
        "decode-b256-p128": (lambda dt: make_case(2, [(c, 1) for c in _contexts(256, 512, 2048, 3)], S=128,
                                                  W=64, dtype=dt, **SMOLLM2), ("bfloat16",)),
        "chunk512-on-2k-mixed-p128": (lambda dt: make_case(3, mixed, S=128, W=64, dtype=dt, **SMOLLM2),
                                      ("bfloat16", "float32")),
        "llama8b-decode-b33-p16": (lambda dt: make_case(4, [(c, 1) for c in b33], S=16, W=512, dtype=dt,
                                                        **LLAMA8B), ("bfloat16",)),
        "pool-over-4gib-llama8b": (big_pool_case, ("bfloat16",)),
    }


def big_pool_case(dtype, pages=17000) -> tuple[Case, Case]:
    """One layer's pool of 17,000 pages of 128 x 8 x 128 (4.46 GB in bf16: element offsets past 2^31),
    NaN everywhere except the rows' pages, placed at the top of the pool. Returns (the big case, the same
    step on a compact pool for the oracle)."""
    small = make_case(5, [(8192, 1), (3000, 1), (700, 16), (1, 1)], S=128, W=64, dtype=dtype, **LLAMA8B)
    table = np.asarray(small.page_table)
    used = np.unique(table[table > 0])
    moved = np.zeros(small.k.shape[0], np.int32)
    moved[used] = pages - 1 - np.arange(len(used))                    # page p of the small pool -> top
    big_table = jnp.asarray(np.where(table > 0, moved[table], 0))
    k, v = (jnp.full((pages, *small.k.shape[1:]), jnp.nan, small.k.dtype).at[moved[used]].set(x[used])
            for x in (small.k, small.v))
    return small._replace(k=k, v=v, page_table=big_table), small


def rel_err(got, want) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def check(name, build, dtype) -> list[str]:
    built = build(dtype)
    case, oracle_case = (built, built) if isinstance(built, Case) else built
    scale = case.q.shape[-1] ** -0.5
    interpret = jax.default_backend() == "cpu"          # a dry run of this script on CPU
    pallas = jax.jit(functools.partial(entry_point("pallas", interpret=interpret), scale=scale))
    start = time.perf_counter()
    first = jax.block_until_ready(pallas(*case))
    seconds = time.perf_counter() - start
    second = jax.block_until_ready(pallas(*case))
    got = np.asarray(first.astype(jnp.float32), np.float64)
    n = case.num_tokens
    want = oracle_case.expected()
    bitwise = bool(np.array_equal(np.asarray(first).view(np.uint16 if dtype == "bfloat16" else np.uint32),
                                  np.asarray(second).view(np.uint16 if dtype == "bfloat16" else np.uint32)))
    clean = bool(np.isfinite(got).all() and not got[n:].any())
    err = rel_err(got[:n], want[:n])
    vs_ref = "n/a (no ragged reference yet)"
    reference = entry_point("reference")
    if reference is not None:
        with jax.default_matmul_precision("highest"):
            ref = jax.jit(functools.partial(reference, scale=scale))(*case)
        vs_ref = f"{rel_err(got[:n], np.asarray(ref.astype(jnp.float32), np.float64)[:n]):.2e}"
    ok = bitwise and clean and err < LIMIT[dtype]
    return [f"| {name} | {dtype} | {case.q.shape[0]} | {case.k.shape[0]} | {err:.2e} | {vs_ref} | {bitwise} "
            f"| {clean} | {seconds:.1f} | {'PASS' if ok else 'FAIL'} |"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated case names")
    args = p.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}\n")
    rows = ["| case | dtype | tokens | pool pages | rel err vs float64 | vs jnp reference | twice bitwise equal "
            "| finite, padding 0 | first call s | |", "|" + "---|" * 10]
    failed = 0
    for name, (build, dtypes) in cases().items():
        if args.only and name not in args.only.split(","):
            continue
        for dtype in dtypes:
            try:
                rows += check(name, build, dtype)
            except Exception as e:  # one case's failure must not hide the others'
                traceback.print_exc()
                rows.append(f"| {name} | {dtype} | | | | | | | | ERROR {type(e).__name__}: {str(e)[:120]} |")
            failed += not rows[-1].endswith("PASS |")
            print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
