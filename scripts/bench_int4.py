"""Why there is no q4_0 encoding (README): a 30-layer stack of SmolLM2's matmuls with int8 weights, as q8_0
runs them, beside the same stack with int4 weights widened to int8 inside the jitted graph.

    python scripts/bench_int4.py [--rows 1] [--layers 30] [--repeats 7]

Each layer chains the decode step's four matmuls (fused q/k/v [960 x 576], o [576 x 576], fused gate/up
[3072 x 576] with SiLU gating, down [576 x 1536]) through q8_0's own `int8_matmul` (int8 activations in two
levels, one s8 x s8 -> s32 dot); attention and norms are left out, so the figure is the weights' cost alone.
The int4 weights hold the same values (each int8 row rounded to [-8, 7] steps) as jnp.int4 arrays; the graph
converts them to int8 before the dot, which XLA CPU materialises rather than fusing. Prints the median
milliseconds per stack call of each and their ratio, as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout
import jax
import jax.numpy as jnp
import numpy as np

from engine.device.quantization import Int8Rows, int8_matmul

D, FFN, QKV = 576, 1536, 960            # SmolLM2-135M: d_model, FFN width, 9 + 2 x 3 heads of 64
SHAPES = {"qkv": (QKV, D), "o": (D, D), "gate_up": (2 * FFN, D), "down": (D, FFN)}   # [out, in]


def make_layers(rng, num_layers: int, int4: bool) -> list[dict[str, Int8Rows]]:
    """Random Int8Rows per layer and matrix; with int4, q is jnp.int4 (values in [-8, 7])."""
    layers = []
    for _ in range(num_layers):
        layer = {}
        for name, (out, inp) in SHAPES.items():
            lo, hi = (-8, 8) if int4 else (-127, 128)
            q = rng.integers(lo, hi, (out, inp), dtype=np.int8)
            q_rms = (hi - 1) / np.sqrt(3)     # of uniform values in [lo, hi): a gain of ~0.5 keeps 30 layers finite
            scale = np.full((out,), 0.5 / (q_rms * np.sqrt(inp)), np.float32)
            layer[name] = Int8Rows(jnp.asarray(q, jnp.int4 if int4 else jnp.int8), jnp.asarray(scale))
        layers.append(layer)
    return layers


def stack(x, layers):
    """x [M, 576] float32 through every layer's four matmuls -> [M, 576]."""
    def mm(v, w: Int8Rows):
        return int8_matmul(v, Int8Rows(w.q.astype(jnp.int8), w.scale))   # a no-op for int8 weights
    for layer in layers:
        h = mm(x, layer["qkv"])[:, :D]
        x = x + mm(h, layer["o"])
        gate, up = jnp.split(mm(x, layer["gate_up"]), 2, axis=-1)
        x = x + mm(jax.nn.silu(gate) * up, layer["down"])
    return x


def time_stack(layers, rows: int, repeats: int) -> float:
    """Median milliseconds of one jitted stack call (compiled first)."""
    fn = jax.jit(stack)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((rows, D)), jnp.float32)
    fn(x, layers).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x, layers).block_until_ready()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1, help="activation rows M (1 = a batch-1 decode step)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    results = {"rows": args.rows, "layers": args.layers, "backend": jax.default_backend(),
               "weights": args.layers * sum(out * inp for out, inp in SHAPES.values())}
    for name, int4 in (("int8", False), ("int4_widened", True)):
        layers = make_layers(rng, args.layers, int4)
        results[f"{name}_ms"] = time_stack(layers, args.rows, args.repeats)
        del layers
    results["int4_over_int8"] = results["int4_widened_ms"] / results["int8_ms"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
