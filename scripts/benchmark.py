"""Serving benchmark: latency (TTFT, TPOT, ITL, E2E), throughput and prefix-cache hits of the engine's gRPC
server, or of any OpenAI-compatible server (ours, vLLM, SGLang, MAX, llama.cpp) with `--backend openai`.

    # against a running server (its /metrics gives the prefix-cache hit rate)
    python scripts/benchmark.py --target localhost:50051 --metrics-url http://localhost:9090/metrics \\
        --workload shared-prefix --max-concurrency 8
    # launch the server itself; caching off, then on, side by side
    python scripts/benchmark.py --launch "--devices=cpu --kv-cache-page-size=128" --compare-prefix-caching \\
        --workload shared-prefix,multi-turn --output results/bench.json
    # any OpenAI-compatible server (streamed /v1/completions); the same workloads, JSON and PNG
    python scripts/benchmark.py --backend openai --target http://localhost:8000 --workload multi-turn

gRPC prompts are `prompt_token_ids` built with the model's tokenizer (lengths exact) and every request
sets ignore_eos (output lengths exact); the openai backend sends the same prompts as text (or token ids
with --openai-prompt tokens) and, to servers that accept them, ignore_eos and cache_salt (scripts/
bench_openai.py). Workloads: scripts/bench_workloads.py; figures and the JSON/PNG: scripts/bench_report.py.
Latencies are client-side: TTFT = the first streamed message carrying tokens.
Exit status 1 when the server cannot start or be reached, or when any request failed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import random
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields

import grpc
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout
from scripts import bench_report, bench_workloads
from scripts.bench_grpc import GrpcBackend
from scripts.bench_openai import OpenAIBackend
from scripts.bench_report import RequestResult
from scripts.bench_server import LaunchedServer, ServerStartError, scrape_counters
from scripts.bench_workloads import Session, WorkloadSpec


def _join_launch(argv: list[str]) -> list[str]:
    """`--launch "--devices=cpu"` -> `--launch=--devices=cpu`: argparse would take the value for an option."""
    out = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] == "--launch" and out and out[-1] == "--launch":
            out[-1] = "--launch=" + arg
        else:
            out.append(arg)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="a running server: host:port (grpc), http://host:port (openai)")
    where.add_argument("--launch", metavar="FLAGS", help='start `python -m engine.server FLAGS` ("" = defaults)')
    p.add_argument("--backend", choices=("grpc", "openai"), default="grpc",
                   help="grpc: engine.v1 Generate; openai: streamed /v1/completions (any OpenAI-compatible server)")
    p.add_argument("--openai-prompt", choices=("text", "tokens"), default="text",
                   help="openai backend: prompts as text (any server) or token ids (ours, vLLM)")
    p.add_argument("--openai-extensions", choices=("auto", "on", "off"), default="auto",
                   help="openai backend: send ignore_eos and cache_salt (auto: only to our server)")
    p.add_argument("--openai-extra-body", type=json.loads, default={}, metavar="JSON",
                   help="openai backend: fields added to every request, e.g. '{\"min_tokens\": 32}' (llama.cpp)")
    p.add_argument("--metrics-url", help="the --target server's /metrics (for the hit rate; openai backend: "
                                         "our server's own /metrics by default)")
    p.add_argument("--model-path", help="tokenizer source; default: --model-path in --launch, else the embedded model")
    p.add_argument("--launch-timeout", type=float, default=900.0, help="seconds to wait for SERVING")
    p.add_argument("--server-log", help="with --launch: write the server's stderr here (default: kept in memory, "
                                        "its tail shown if it fails)")
    p.add_argument("--compare-prefix-caching", action="store_true",
                   help="with --launch: run caching off, then on (--enable-prefix-caching appended)")
    p.add_argument("--workload", default="shared-prefix",
                   help=f"comma-separated, from: {', '.join(bench_workloads.WORKLOADS)}")
    for f in fields(WorkloadSpec):
        p.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default,
                       help=bench_workloads.SPEC_HELP[f.name] + (f" (default {f.default})" if f.default else ""))
    p.add_argument("--max-concurrency", type=int, help="most sessions (requests; multi-turn: conversations) in "
                                                       "flight; default: all at once")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals/s of sessions")
    p.add_argument("--warmup-requests", type=int, default=2, help="sent first, excluded from the figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-salt", help="default: a fresh salt per run, so runs never share cached pages")
    p.add_argument("--request-timeout", type=float, default=1800.0)
    p.add_argument("--output", help="write the runs to this .json, and a plot beside it (.png)")
    args = p.parse_args(_join_launch(sys.argv[1:] if argv is None else list(argv)))
    if args.compare_prefix_caching and args.launch is None:
        p.error("--compare-prefix-caching needs --launch (it starts a server with caching off, then on)")
    for name in [f.name for f in fields(WorkloadSpec)] + ["max_concurrency"]:
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')}={value} is not allowed; it must be >= 1")
    if not args.request_rate > 0:
        p.error(f"--request-rate={args.request_rate} is not allowed; it must be > 0 (inf = all at once)")
    args.workloads = [w.strip() for w in args.workload.split(",") if w.strip()]
    bad = [w for w in args.workloads if w not in bench_workloads.WORKLOADS]
    if bad or not args.workloads:
        p.error(f"--workload={args.workload!r} is not allowed; choose from {', '.join(bench_workloads.WORKLOADS)}")
    return args


def run_session(backend, session: Session, salt: str, bar) -> list[RequestResult]:
    """Sends the turns in order, each with the whole history; a failed turn fails the turns after it."""
    history, results = [], []
    for i, turn in enumerate(session.turns):
        history.extend(turn.new_tokens)
        result, answer = backend.send(history, turn.output_len, salt)
        results.append(result)
        bar.update(1)
        if not result.ok:
            skipped = session.turns[i + 1:]
            results += [RequestResult(ok=False, prompt_len=0, error="an earlier turn failed") for _ in skipped]
            bar.update(len(skipped))
            break
        history.extend(answer)
    return results


def run_sessions(backend, sessions: list[Session], args, salt: str, desc: str) -> tuple[list[RequestResult], float]:
    """Runs every session (Poisson starts at --request-rate, at most --max-concurrency at once);
    returns the requests' results and the wall time from the first send to the last reply."""
    rng = random.Random(args.seed)
    workers = min(args.max_concurrency or len(sessions), len(sessions), 512)  # a blocking stream per thread
    total = sum(len(s.turns) for s in sessions)
    with tqdm(total=total, desc=desc, unit="req", file=sys.stderr) as bar, ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        futures = []
        for i, session in enumerate(sessions):
            if i and math.isfinite(args.request_rate):  # exponential gaps between starts: Poisson arrivals
                time.sleep(rng.expovariate(args.request_rate))
            futures.append(pool.submit(run_session, backend, session, salt, bar))
        results = [r for f in futures for r in f.result()]
    return results, time.perf_counter() - start


def spec_from(args) -> WorkloadSpec:
    return WorkloadSpec(**{f.name: getattr(args, f.name) for f in fields(WorkloadSpec)})


def check_fits(sessions: list[Session], info, workload: str) -> None:
    longest = max((s.total_len() for s in sessions), default=0)
    if info.max_length is not None and longest > info.max_length:
        raise ValueError(f"workload {workload} needs sequences of {longest} tokens but the server's --max-length "
                         f"is {info.max_length}: shorten the workload (e.g. --system-prompt-len) or raise it")


def make_backend(args, target: str, tokenizer):
    if args.backend == "openai":
        extensions = {"auto": None, "on": True, "off": False}[args.openai_extensions]
        return OpenAIBackend(target, tokenizer, args.request_timeout, args.openai_prompt, extensions,
                             args.openai_extra_body)
    return GrpcBackend(target, tokenizer, args.request_timeout)


def bench_server(target: str, metrics_url: str | None, tokenizer, args, server_flags: str | None) -> list[dict]:
    """Every workload of `args` against one server, in order; one run record each."""
    runs = []
    backend = make_backend(args, target, tokenizer)
    try:
        info = backend.info()
        metrics_url = metrics_url or backend.metrics_url
        spec = spec_from(args)
        for workload in args.workloads:
            sessions = bench_workloads.build(workload, tokenizer, spec, args.seed)
            check_fits(sessions, info, workload)
            if args.warmup_requests:  # first turns of other prompts, under their own salt: no cache warm-up
                warm = bench_workloads.build(workload, tokenizer, spec, args.seed + 1)[:args.warmup_requests]
                warm = [Session(s.turns[:1]) for s in warm]
                run_sessions(backend, warm, args, f"warmup-{uuid.uuid4()}", f"{workload} warm-up")
            salt = args.cache_salt if args.cache_salt is not None else f"bench-{uuid.uuid4()}"
            before = scrape_counters(metrics_url)
            results, duration = run_sessions(backend, sessions, args, salt, workload)
            run = bench_report.summarize(results, duration, workload, info.prefix_caching,
                                         (before, scrape_counters(metrics_url)))
            run.update(model=info.name, server_flags=server_flags, target=target, backend=backend.name,
                       seed=args.seed, max_concurrency=args.max_concurrency, request_rate=_finite(args.request_rate),
                       workload_params=bench_workloads.workload_params(workload, spec))
            runs.append(run)
    finally:
        backend.close()
    return runs


def _finite(x: float) -> float | None:
    """inf (all at once) is None in the JSON, which has no infinity."""
    return x if math.isfinite(x) else None


def _without_caching_flag(flags: list[str]) -> list[str]:
    return [f for f in flags if "enable-prefix-caching" not in f.replace("_", "-")]


def launch_and_bench(flags: list[str], tokenizer, args, log_suffix: str = "") -> list[dict]:
    log = args.server_log and args.server_log + log_suffix
    with LaunchedServer(flags, timeout=args.launch_timeout, log_path=log) as server:
        target = server.http_url if args.backend == "openai" else server.target
        print(f"benchmark: {server.describe()} serving on {target}", file=sys.stderr)
        return bench_server(target, server.metrics_url, tokenizer, args, " ".join(flags))


def run_all(args, tokenizer) -> tuple[list[dict], list[dict]]:
    """(runs, comparisons) for the chosen mode."""
    if args.target:
        return bench_server(args.target, args.metrics_url, tokenizer, args, None), []
    from scripts.bench_server import split_flags
    flags = split_flags(args.launch)
    if not args.compare_prefix_caching:
        return launch_and_bench(flags, tokenizer, args), []
    off = launch_and_bench(_without_caching_flag(flags), tokenizer, args, ".off")
    on = launch_and_bench(_without_caching_flag(flags) + ["--enable-prefix-caching"], tokenizer, args, ".on")
    return off + on, [bench_report.compare(a, b) for a, b in zip(off, on)]


def _launch_model_path(launch: str | None) -> str | None:
    from scripts.bench_server import split_flags
    for arg in split_flags(launch or ""):
        name, _, value = arg.partition("=")
        if name.replace("_", "-") == "--model-path":
            return value
    return None


def write_outputs(path: str, runs: list[dict], comparisons: list[dict], args) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    options = dict(vars(args), request_rate=_finite(args.request_rate))
    report = {"runs": runs, "comparisons": comparisons, "command": sys.argv, "args": options}
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    png = os.path.splitext(path)[0] + ".png"
    bench_report.plot(runs, png)
    print(f"benchmark: wrote {path} and {png}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        tokenizer = bench_workloads.load_tokenizer(args.model_path or _launch_model_path(args.launch))
        runs, comparisons = run_all(args, tokenizer)
    except (ValueError, ServerStartError, grpc.RpcError, OSError) as e:
        detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
        print(f"benchmark: error: {detail}", file=sys.stderr)
        return 1
    for run in runs:
        if run["failed"]:
            print(f"benchmark: {run['workload']}: {run['failed']} failed; e.g. {run['errors'][0]}", file=sys.stderr)
    print(bench_report.markdown_table(runs))
    if comparisons:
        print()
        print(bench_report.comparison_table(runs[:len(comparisons)], runs[len(comparisons):]))
    if args.output:
        write_outputs(args.output, runs, comparisons, args)
    return 0 if all(r["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
