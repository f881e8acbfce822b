"""Serving benchmark for the engine's gRPC server: latency (TTFT, TPOT, ITL, E2E), throughput, prefix-cache hits.

    # against a running server (its /metrics gives the prefix-cache hit rate)
    python scripts/benchmark.py --target localhost:50051 --metrics-url http://localhost:9090/metrics \\
        --workload shared-prefix --max-concurrency 8
    # launch the server itself; caching off, then on, side by side
    python scripts/benchmark.py --launch "--devices=cpu --kv-cache-page-size=128" --compare-prefix-caching \\
        --workload shared-prefix,multi-turn --output results/bench.json

Prompts are sent as `prompt_token_ids` built with the model's tokenizer (lengths exact) and every request
sets ignore_eos (output lengths exact). Workloads: scripts/bench_workloads.py; figures and the JSON/PNG:
scripts/bench_report.py. Latencies are client-side: TTFT = the first response message carrying tokens.
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
from engine.v1 import engine_pb2 as pb  # noqa: E402
from engine.v1 import engine_pb2_grpc  # noqa: E402
from scripts import bench_report, bench_workloads  # noqa: E402
from scripts.bench_report import RequestResult  # noqa: E402
from scripts.bench_server import LaunchedServer, ServerStartError, scrape_counters  # noqa: E402
from scripts.bench_workloads import Session, WorkloadSpec  # noqa: E402


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
    where.add_argument("--target", help="a running server, host:port")
    where.add_argument("--launch", metavar="FLAGS", help='start `python -m engine.server FLAGS` ("" = defaults)')
    p.add_argument("--metrics-url", help="the --target server's /metrics (for the hit rate)")
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


def send(stub, prompt: list[int], output_len: int, salt: str, timeout: float) -> tuple[RequestResult, list[int]]:
    """One streamed Generate; returns its timings and the generated token ids."""
    sampling = pb.SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=prompt), sampling=sampling, cache_salt=salt)
    result, tokens, last = RequestResult(ok=False, prompt_len=len(prompt)), [], None
    start = previous = time.perf_counter()
    try:
        for response in stub.Generate(request, timeout=timeout):
            now = time.perf_counter()
            if response.token_ids:
                if result.ttft is None:
                    result.ttft = now - start
                else:  # tokens arriving together share the gap, as the server's own ITL histogram does
                    result.itls.extend([(now - previous) / len(response.token_ids)] * len(response.token_ids))
                previous = now
                tokens.extend(response.token_ids)
            last = response
    except grpc.RpcError as e:
        result.error = f"{e.code().name}: {e.details()}"
        return result, tokens
    result.e2e = time.perf_counter() - start
    reason = pb.GenerateResponse.FinishReason.Name(last.finish_reason) if last else "no response"
    result.output_len, result.cached_prompt_tokens = len(tokens), last.usage.cached_prompt_tokens if last else 0
    result.ok = reason in ("LENGTH", "STOP") and result.ttft is not None
    result.error = "" if result.ok else f"finished with {reason} after {len(tokens)} tokens"
    return result, tokens


def run_session(stub, session: Session, salt: str, timeout: float, bar) -> list[RequestResult]:
    """Sends the turns in order, each with the whole history; a failed turn fails the turns after it."""
    history, results = [], []
    for i, turn in enumerate(session.turns):
        history.extend(turn.new_tokens)
        result, answer = send(stub, history, turn.output_len, salt, timeout)
        results.append(result)
        bar.update(1)
        if not result.ok:
            skipped = session.turns[i + 1:]
            results += [RequestResult(ok=False, prompt_len=0, error="an earlier turn failed") for _ in skipped]
            bar.update(len(skipped))
            break
        history.extend(answer)
    return results


def run_sessions(stub, sessions: list[Session], args, salt: str, desc: str) -> tuple[list[RequestResult], float]:
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
            futures.append(pool.submit(run_session, stub, session, salt, args.request_timeout, bar))
        results = [r for f in futures for r in f.result()]
    return results, time.perf_counter() - start


def spec_from(args) -> WorkloadSpec:
    return WorkloadSpec(**{f.name: getattr(args, f.name) for f in fields(WorkloadSpec)})


def check_fits(sessions: list[Session], info, workload: str) -> None:
    longest = max((s.total_len() for s in sessions), default=0)
    if longest > info.max_length:
        raise ValueError(f"workload {workload} needs sequences of {longest} tokens but the server's --max-length "
                         f"is {info.max_length}: shorten the workload (e.g. --system-prompt-len) or raise it")


def bench_server(target: str, metrics_url: str | None, tokenizer, args, server_flags: str | None) -> list[dict]:
    """Every workload of `args` against one server, in order; one run record each."""
    runs = []
    with grpc.insecure_channel(target) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        if info.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"the server's model has {info.vocab_size} tokens but the tokenizer read from "
                             f"--model-path has {tokenizer.vocab_size}: pass the served model's --model-path")
        spec = spec_from(args)
        for workload in args.workloads:
            sessions = bench_workloads.build(workload, tokenizer, spec, args.seed)
            check_fits(sessions, info, workload)
            if args.warmup_requests:  # first turns of other prompts, under their own salt: no cache warm-up
                warm = bench_workloads.build(workload, tokenizer, spec, args.seed + 1)[:args.warmup_requests]
                warm = [Session(s.turns[:1]) for s in warm]
                run_sessions(stub, warm, args, f"warmup-{uuid.uuid4()}", f"{workload} warm-up")
            salt = args.cache_salt if args.cache_salt is not None else f"bench-{uuid.uuid4()}"
            before = scrape_counters(metrics_url)
            results, duration = run_sessions(stub, sessions, args, salt, workload)
            run = bench_report.summarize(results, duration, workload, info.prefix_caching,
                                         (before, scrape_counters(metrics_url)))
            run.update(model=info.name, server_flags=server_flags, target=target, seed=args.seed,
                       max_concurrency=args.max_concurrency, request_rate=_finite(args.request_rate),
                       workload_params=bench_workloads.workload_params(workload, spec))
            runs.append(run)
    return runs


def _finite(x: float) -> float | None:
    """inf (all at once) is None in the JSON, which has no infinity."""
    return x if math.isfinite(x) else None


def _without_caching_flag(flags: list[str]) -> list[str]:
    return [f for f in flags if "enable-prefix-caching" not in f.replace("_", "-")]


def launch_and_bench(flags: list[str], tokenizer, args, log_suffix: str = "") -> list[dict]:
    log = args.server_log and args.server_log + log_suffix
    with LaunchedServer(flags, timeout=args.launch_timeout, log_path=log) as server:
        print(f"benchmark: {server.describe()} serving on {server.target}", file=sys.stderr)
        return bench_server(server.target, server.metrics_url, tokenizer, args, " ".join(flags))


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
