"""Engine micro-benchmarks on one model, offline (no server), all in one run so ratios are side by side.

    python scripts/bench_engine.py [--model-path X.gguf] [--quick] [--output out/bench_engine.json]

Reports: prefill tokens/s (128/512/2048-token prompts), decode tokens/s at batch 1 and 16 (short prompts,
greedy and sampled; and 16 cached prompts of 512..2,048 tokens, timed step by step: see `cached_decode_steps`),
start-up compile time and program count, compilations in a 50-request mixed run, TTFT with a cached 1,024-token
prefix vs caching off, KV pages held by 16 requests sharing a 1,024-token system prompt, and the throughput
cost of prefix caching on a 0%-hit workload. Medians of --repeats runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np

from engine import LLM, SamplingParams


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# The engine every row runs (the README's figures name these).
ENGINE_OPTS = dict(max_batch_size=16, max_num_batched_tokens=512, max_length=2304)
# The long-context row's prompt lengths: 16 rows from 512 to 2,048 tokens (attention dominates the step).
LONG_CONTEXTS = tuple(int(n) for n in np.linspace(512, 2048, 16))
# Steps a cached-prompt run leaves out after its last prompt is admitted, before the first timed interval:
# a prompt's uncached tail (under one page, so under the token budget) may be split between its admission
# step and the next; and with async scheduling the interval that ends with step j's launch waits for step
# j-1's tokens, so step j-1 must be a pure decode too. tests/test_bench_engine.py checks the scheduler's
# outputs of the timed steps.
SETTLE_STEPS = 3
# Extra tokens each request asks for beyond the timed steps, so none finishes inside the window.
LEAD_STEPS = 12


def rand_ids(rng, n, high=40000):
    return [int(t) for t in rng.integers(100, high, n)]


def prefill_and_decode(llm, rng, repeats, quick):
    out = {}
    for n in ((128, 512) if quick else (128, 512, 2048)):
        p = rand_ids(rng, n)
        llm.generate(p, SamplingParams(max_tokens=1))  # compile
        out[f"prefill_tok_s@{n}"] = n / median_time(lambda p=p: llm.generate(p, SamplingParams(max_tokens=1)), repeats)
    steps = 32 if quick else 128
    for b in (1, 16):
        out[f"decode_tok_s@batch{b}"] = decode_rate(llm, [rand_ids(rng, 16) for _ in range(b)], steps, repeats)
    sampled = dict(temperature=0.8, top_p=0.95, seed=1)
    short = [rand_ids(rng, 16) for _ in range(16)]
    out["decode_tok_s@batch16_sampled"] = decode_rate(llm, short, steps, repeats, **sampled)
    return out


def decode_rate(llm, prompts, steps, repeats, **sampling) -> float:
    """Decode tokens/s over `steps` steps for `prompts` together: (time of steps+1 tokens - time of 1 token),
    so the prefill and the first token cancel out."""
    long_sp = SamplingParams(max_tokens=steps + 1, ignore_eos=True, **sampling)
    short_sp = SamplingParams(max_tokens=1, ignore_eos=True, **sampling)
    llm.generate(prompts, long_sp)
    t_long = median_time(lambda: llm.generate(prompts, long_sp), repeats)
    t_short = median_time(lambda: llm.generate(prompts, short_sp), repeats)
    return len(prompts) * steps / max(t_long - t_short, 1e-9)


def long_context_decode(model_path, opts, rng, repeats, steps) -> dict:
    """The batch-16 long-context row on its own engine (prefix caching on): the 16 prompts are prefilled
    once (max_tokens=1), then each run decodes all 16 from cache hits and times only its pure decode steps."""
    llm = LLM(model_path, enable_prefix_caching=True, **opts)
    prompts = [rand_ids(rng, n) for n in LONG_CONTEXTS]
    llm.generate(prompts, SamplingParams(max_tokens=1))
    cached_decode_steps(llm, prompts, steps)    # compiles the shapes the timed runs use
    seconds = [s for _ in range(repeats) for s in cached_decode_steps(llm, prompts, steps).step_seconds]
    ms = 1000 * statistics.median(seconds)
    del llm
    return {"decode_ms_step@batch16_ctx512-2048": ms, "decode_tok_s@batch16_ctx512-2048": len(prompts) * 1000 / ms}


@dataclass(frozen=True)
class DecodeWindow:
    step_seconds: list[float]   # one per timed interval: the wall time from step j-1's return to step j's
    steps: range                # the j of each interval (1 = the run's first engine step)


def cached_decode_steps(llm, prompts, steps, **sampling) -> DecodeWindow:
    """Times `steps` engine steps in which every prompt decodes and nothing prefills. The prompts must be in
    llm's prefix cache already (run once with max_tokens=1, prefix caching on): each then prefills only its
    last partial page, the run settles for SETTLE_STEPS steps once the last prompt is admitted (read from
    `stats()` after every step), and the next `steps` intervals are timed. Raises if a prompt missed the
    cache or a request was not running throughout the window."""
    n = len(prompts)
    sp = SamplingParams(max_tokens=steps + LEAD_STEPS, ignore_eos=True, **sampling)
    marks = []   # marks[j]: (time, stats) after step j; marks[0]: before the first step
    marks.append((time.perf_counter(), llm.stats()))
    outs = llm.generate(prompts, sp, on_step=lambda: marks.append((time.perf_counter(), llm.stats())))
    page = llm.config.kv_cache_page_size
    missed = [len(p) for p, o in zip(prompts, outs) if o.cached_prompt_tokens < len(p) // page * page]
    if missed:
        raise RuntimeError(f"prompts of {missed} tokens were not in the prefix cache")
    admitted = next(j for j, (_, s) in enumerate(marks) if s.running_requests == n and s.waiting_requests == 0)
    window = range(admitted + SETTLE_STEPS, admitted + SETTLE_STEPS + steps)
    if window.stop > len(marks) or any(marks[j][1].running_requests != n for j in range(window.start - 1, window.stop)):
        raise RuntimeError(f"not all {n} requests ran through steps {window.start}..{window.stop - 1}")
    return DecodeWindow([marks[j][0] - marks[j - 1][0] for j in window], window)


def ttft_cached_prefix(model_path, opts, rng, repeats):
    """TTFT of system(1024) + question(32) with the system prompt cached vs caching off."""
    system = rand_ids(rng, 1024)
    res = {}
    for caching in (False, True):
        llm = LLM(model_path, enable_prefix_caching=caching, **opts)
        llm.generate(system + rand_ids(rng, 32), SamplingParams(max_tokens=1))   # compile + fill the cache
        qs = [system + rand_ids(rng, 32) for _ in range(repeats + 1)]
        llm.generate(qs[0], SamplingParams(max_tokens=1))
        times = []
        for q in qs[1:]:
            t = time.perf_counter()
            o = llm.generate(q, SamplingParams(max_tokens=1))[0]
            times.append(time.perf_counter() - t)
        res["on" if caching else "off"] = {"ttft_s": statistics.median(times), "cached": o.cached_prompt_tokens}
        res[f"pages_16_shared_{'on' if caching else 'off'}"] = peak_pages_16_shared(llm, system, rng)
        del llm
    res["ttft_ratio_off_over_on"] = res["off"]["ttft_s"] / res["on"]["ttft_s"]
    return res


def peak_pages_16_shared(llm, system, rng):
    """Most KV pages in use while 16 requests sharing `system` run together (128 new tokens each, so all 16
    are alive at once even though their prefills are spread over many 512-token steps)."""
    llm.reset_prefix_cache()
    llm.generate(system + rand_ids(rng, 8), SamplingParams(max_tokens=1))
    used = [0]
    llm.generate([system + rand_ids(rng, 32) for _ in range(16)], SamplingParams(max_tokens=128, ignore_eos=True),
                 on_step=lambda: used.append(llm.stats().kv_pages_used))
    return max(used)


def mixed_run_compilations(model_path, opts, rng):
    llm = LLM(model_path, **opts)
    ps = [rand_ids(rng, int(n)) for n in rng.integers(4, 700, 50)]
    sps = [SamplingParams(max_tokens=int(n), ignore_eos=True) for n in rng.integers(1, 40, 50)]
    t = time.perf_counter()
    llm.generate(ps, sps)
    stats = llm.stats()
    return {"compilations_50_mixed": stats.num_compilations, "mixed_run_s": time.perf_counter() - t,
            "bucket_shapes": stats.num_step_shapes}


def zero_hit_cost(model_path, opts, rng, repeats):
    """Output tokens/s on unique prompts (0% hits) with caching off and on, interleaved run by run."""
    sp = SamplingParams(max_tokens=32, ignore_eos=True)
    llms = {c: LLM(model_path, enable_prefix_caching=c, **opts) for c in (False, True)}
    rates = {False: [], True: []}
    for i in range(repeats + 1):
        for caching in ((False, True) if i % 2 else (True, False)):
            ps = [rand_ids(rng, 200) for _ in range(16)]
            t = time.perf_counter()
            llms[caching].generate(ps, sp)
            if i:  # the first round compiles
                rates[caching].append(16 * 32 / (time.perf_counter() - t))
    res = {"off": statistics.median(rates[False]), "on": statistics.median(rates[True])}
    res["throughput_cost_pct"] = 100 * (1 - res["on"] / res["off"])
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--output", default=None)
    ap.add_argument("--only", default="", help="comma-separated: speed (the long-context row included), long "
                                                "(that row alone), mixed, prefix, zero-hit (default all)")
    ap.add_argument("--quantization-encoding", default=None, help="float32 | bfloat16 | q8_0 (engine default)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    opts = dict(ENGINE_OPTS)
    if args.quantization_encoding:
        opts["quantization_encoding"] = args.quantization_encoding
    results = {}
    only = set(filter(None, args.only.split(","))) or {"speed", "mixed", "prefix", "zero-hit"}
    if "speed" in only:
        t = time.perf_counter()
        llm = LLM(args.model_path, **opts)
        results["load_s"] = time.perf_counter() - t
        results["warmup_s"] = llm.warmup()
        results["warmup_programs"] = llm.stats().num_compilations
        results.update(prefill_and_decode(llm, rng, args.repeats, args.quick))
        del llm
    if only & {"speed", "long"}:
        results.update(long_context_decode(args.model_path, opts, rng, args.repeats, 16 if args.quick else 32))
    if "mixed" in only:
        results.update(mixed_run_compilations(args.model_path, opts, rng))
    if "prefix" in only:
        results["prefix_cache"] = ttft_cached_prefix(args.model_path, opts, rng, args.repeats)
    if "zero-hit" in only:
        results["zero_hit"] = zero_hit_cost(args.model_path, opts, rng, args.repeats)
    print(json.dumps(results, indent=2))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
