"""What the front ends cost: the same streams over gRPC and over the OpenAI-compatible HTTP API of one
server whose engine computes nothing (tests/fake_engine.py: one token per request per step, no model), so
the time measured is serialization, transport and the front end's own work.

    python scripts/bench_frontends.py --streams 8 --tokens 512 --rounds 3

Runs alternate gRPC and HTTP (interleaved rounds: a busy machine slows both alike) with the benchmark's own
clients (scripts/bench_grpc.py, scripts/bench_openai.py with token-id prompts). Prints, per front end, the
median over rounds of streamed tokens/s with --streams concurrent streams, and of one-token request
latency (sequential requests: TTFT + end of stream).
"""
from __future__ import annotations

import argparse
import pathlib
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout
from scripts.bench_grpc import GrpcBackend
from scripts.bench_openai import OpenAIBackend
from scripts.bench_server import REPO_ROOT, free_ports

FAKE_SERVER = ("import sys; from engine.server import run; from tests.fake_engine import FakeEngine; "
               "run(sys.argv, engine_factory=lambda config: FakeEngine(config))")


class _Chars:  # the fake engine's tokenizer: one token per character (only used for text, never here)
    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 1000 for c in text]


def _throughput(backend, streams: int, tokens: int) -> float:
    def one(i):
        result, _ = backend.send([1 + i], tokens, "")
        assert result.ok and result.output_len == tokens, result.error
    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(one, range(streams)))
    return streams * tokens / (time.perf_counter() - start)


def _latency_ms(backend, n: int) -> float:
    times = []
    for i in range(n):
        result, _ = backend.send([1 + i % 500], 1, "")
        assert result.ok, result.error
        times.append(result.e2e * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512, help="tokens per stream")
    p.add_argument("--requests", type=int, default=200, help="sequential one-token requests per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    http_port, = free_ports(1)
    cmd = [sys.executable, "-c", FAKE_SERVER, "--port=0", f"--http-port={http_port}", f"--max-length={args.tokens + 8}",
           f"--max-batch-size={args.streams}"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        address = re.search(r" on (\S+:\d+) ", proc.stdout.readline()).group(1)
        backends = {"grpc": GrpcBackend(address, _Chars(), 600), "http": OpenAIBackend(
            f"http://127.0.0.1:{http_port}", _Chars(), 600, prompt_format="tokens")}
        backends["http"].info()  # the HTTP client learns the model's name from /v1/models
        figures = {name: {"tok/s": [], "ms": []} for name in backends}
        for _ in range(args.rounds):
            for name, backend in backends.items():
                figures[name]["tok/s"].append(_throughput(backend, args.streams, args.tokens))
                figures[name]["ms"].append(_latency_ms(backend, args.requests))
        for name, f in figures.items():
            print(f"{name}: {statistics.median(f['tok/s']):,.0f} streamed tokens/s ({args.streams} streams), "
                  f"one-token request {statistics.median(f['ms']):.2f} ms (medians of {args.rounds} rounds)")
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
