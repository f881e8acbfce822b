"""The whole engine on a GPU through the offline API (`from engine import LLM, SamplingParams`; warmup also
calls `llm.warmup()`, as the server does before SERVING): one stage per process (gpu_check.sh runs
each under its own timeout), each appending JSON lines to --results, so a stage that fails or hangs loses
nothing of the others.

  write-model  a SmolLM2-shaped random GGUF (30 layers, d 576, 9/3 heads of 64, FFN 1536, vocab 49,152,
               float32 tensors): the real 98 MB model does not travel with the check
  decode       pallas, bfloat16: decode tok/s at batch 1/32/256 (prefill-only run subtracted), and the
               compiled step's HLO (XLA's own dump) searched for copies of the KV pool and its donation
  greedy       greedy tokens pallas vs reference, float32 (IEEE dots everywhere) and bfloat16
  warmup       start-up compile time of every bucket, cold XLA cache (llm.warmup(), as the server)

  python scripts/gpu_engine_check.py write-model --model /tmp/smollm2_shaped.gguf
  python scripts/gpu_engine_check.py decode --model /tmp/smollm2_shaped.gguf --results out/engine.jsonl
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere in the checkout

VOCAB = 49152
PAGE = 128
PROMPT_LEN = 64
HLO_DIR = "/tmp/engine_hlo"
RESULTS = "engine_results.jsonl"


def record(row: dict) -> dict:
    """Appends one result to the results file at once (a later failure or timeout keeps it) and prints it."""
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def write_model(args) -> None:
    """SmolLM2's shapes with random float32 weights and the tiny test tokenizer padded to 49,152 tokens
    (the padding tokens are plain vocabulary entries no merge produces)."""
    from tests import tiny_vocab
    from tests.tiny_model import TinySpec, write_tiny_gguf
    tokens, types = tiny_vocab.tiny_tokens()
    padded = (tokens + [f"<pad{i}>" for i in range(VOCAB - len(tokens))],
              types + [types[-1]] * (VOCAB - len(tokens)))
    tiny_vocab.tiny_tokens = lambda: padded
    start = time.perf_counter()
    path = args.model
    write_tiny_gguf(path, TinySpec(num_layers=args.layers, hidden=576, heads=9, kv_heads=3, head_dim=64, ffn=1536,
                                   context=8192, rope_theta=1e5, tied=True, quantized=False))
    record({"stage": "write-model", "seconds": time.perf_counter() - start, "bytes": os.path.getsize(path)})


def prompts(n: int, length: int = PROMPT_LEN, seed: int = 0) -> list[list[int]]:
    import numpy as np
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(300, VOCAB, length)] for _ in range(n)]


def timed_generate(llm, batch: int, max_tokens: int) -> float:
    from engine import SamplingParams
    start = time.perf_counter()
    outs = llm.generate(prompts(batch), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    assert all(len(o.token_ids) == max_tokens for o in outs), "a request stopped early"
    return time.perf_counter() - start


def decode(args) -> None:
    from engine import LLM
    batches, new_tokens = args.batches, args.new_tokens
    max_batch = max(batches)
    pages = max_batch * -(-(PROMPT_LEN + new_tokens + 8) // PAGE) + 8
    llm = LLM(args.model, devices=args.devices, attention_backend=args.backend, quantization_encoding="bfloat16",
              max_batch_size=max_batch, max_length=1024, max_num_batched_tokens=2048, kv_cache_page_size=PAGE,
              kv_cache_pages=pages)
    for batch in batches:
        timed_generate(llm, batch, 8)                       # compiles this batch's shapes
        prefill = timed_generate(llm, batch, 1)
        total = timed_generate(llm, batch, new_tokens + 1)
        record({"stage": "decode", "batch": batch, "decode_tok_s": batch * new_tokens / (total - prefill),
                "prefill_s": prefill, "total_s": total, "kv_cache_pages": pages})
        if batch == batches[0]:
            record(hlo_pool_copies(pages))


def hlo_pool_copies(pages: int) -> dict:
    """Scans XLA's optimized HLO of every module that takes a KV pool (bf16[..P, 128, 3, 64]) as a parameter
    (the jitted steps) for copies of a pool-shaped array, and reads whether it aliases (donates) inputs."""
    pool = re.compile(rf"bf16\[(\d+,)?{pages},{PAGE},3,64\]")
    modules = {}
    for path in sorted(glob.glob(f"{HLO_DIR}/*after_optimizations.txt")):
        lines = Path(path).read_text().splitlines()
        if not any(pool.search(line) and " parameter(" in line for line in lines):
            continue
        copies = [line.strip()[:160] for line in lines
                  if re.search(r"= bf16\[[\d,]+\][^ ]* copy(-start)?\(", line) and pool.search(line)]
        modules[".".join(Path(path).name.split(".")[:2])] = {
            "pool_copies": len(copies), "examples": copies[:3],
            "donates": bool(lines) and "input_output_alias" in lines[0]}
    ok = bool(modules) and all(m["pool_copies"] == 0 and m["donates"] for m in modules.values())
    return {"stage": "hlo", "step_modules": len(modules), "ok": ok,
            "pool_copies": sum(m["pool_copies"] for m in modules.values()),
            "modules": dict(list(modules.items())[:4])}


def greedy(args) -> None:
    """Same prompts, greedy, pallas vs reference: float32 with IEEE matmuls everywhere (XLA's float32 dots
    default to TF32 on GPU, the kernel's never), then bfloat16 as served (ties may legitimately differ)."""
    import gc

    import jax

    from engine import LLM, SamplingParams
    lengths = [5, 17, 64, 129, 200, 300, 31, 1]
    batch = [p[:n] for p, n in zip(prompts(len(lengths), 300, seed=1), lengths)]
    for dtype in ("float32", "bfloat16"):
        tokens = {}
        for backend in ("pallas", "reference"):
            with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
                llm = LLM(args.model, devices=args.devices, attention_backend=backend, quantization_encoding=dtype,
                          max_batch_size=8, max_length=512, max_num_batched_tokens=256,
                          kv_cache_page_size=PAGE, kv_cache_pages=48)
                outs = llm.generate(batch, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
            tokens[backend] = [list(o.token_ids) for o in outs]
            del llm
            gc.collect()
        same = [a == b for a, b in zip(tokens["pallas"], tokens["reference"])]
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                      for a, b in zip(tokens["pallas"], tokens["reference"])]
        record({"stage": "greedy", "dtype": dtype, "equal_prompts": sum(same), "prompts": len(same),
                "first_difference": first_diff})


def warmup(args) -> None:
    """Every bucket compiled once, as the server does before SERVING, into a fresh (cold) XLA cache."""
    from engine import LLM
    start = time.perf_counter()
    llm = LLM(args.model, devices=args.devices, quantization_encoding="bfloat16",
              max_batch_size=max(args.batches), max_length=4096, max_num_batched_tokens=512,
              kv_cache_page_size=PAGE, kv_cache_pages=4096)
    loaded = time.perf_counter() - start
    seconds = llm.warmup()
    compiled = llm.stats().num_compilations
    record({"stage": "warmup", "load_s": loaded, "warmup_s": seconds, "compilations": compiled})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("write-model", "decode", "greedy", "warmup"))
    p.add_argument("--model", default="/tmp/smollm2_shaped.gguf")
    p.add_argument("--results", default="engine_results.jsonl")
    p.add_argument("--devices", default="gpu")
    p.add_argument("--layers", type=int, default=30, help="write-model: layers (SmolLM2: 30)")
    p.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")], default=[1, 32, 256])
    p.add_argument("--new-tokens", type=int, default=128, help="decode: tokens generated per request")
    p.add_argument("--backend", default="pallas", help="decode: attention backend")
    args = p.parse_args(argv)
    if args.stage == "decode":   # XLA reads its flags when the backend starts: set them before jax loads
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={HLO_DIR} " \
                                  "--xla_dump_hlo_as_text"
    if args.stage == "warmup":
        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="xla_cold_")
    global RESULTS
    RESULTS = args.results
    run = {"write-model": write_model, "decode": decode, "greedy": greedy, "warmup": warmup}[args.stage]
    try:
        run(args)
    except Exception as e:  # recorded, then re-raised for a non-zero exit and the traceback
        record({"stage": args.stage, "error": f"{type(e).__name__}: {e}"[:2000]})
        raise


if __name__ == "__main__":
    main()
