"""scripts/benchmark.py end to end: real servers on a tiny model (--launch), every workload, the JSON contract,
the caching on/off comparison and its PNG; plus the workloads' exact token lengths and the launcher's errors."""
from __future__ import annotations

import json
import os

import pytest

from scripts import bench_report, bench_workloads, benchmark
from scripts.bench_workloads import WorkloadSpec

# Small buckets: the server compiles every one of them before it reports SERVING.
SERVER_FLAGS = ("--devices=cpu --max-length=256 --kv-cache-page-size=16 --max-batch-size=4 "
                "--max-num-batched-tokens=32 --kv-cache-pages=128")
# P=96 is 6 full pages: with 2 requests in flight a group of 6 has >= 4 hits, so shared-prefix's hit rate
# is at least 4*96/(6*104) = 0.615 whatever the interleaving.
WORKLOAD_ARGS = ["--num-groups=2", "--prompts-per-group=6", "--system-prompt-len=96", "--question-len=8",
                 "--output-len=4", "--num-conversations=2", "--num-turns=3", "--num-requests=4",
                 "--long-output-len=48", "--max-concurrency=2", "--warmup-requests=1"]
CONTRACT_KEYS = {"ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "request_throughput", "output_token_throughput",
                 "prefix_cache_hit_rate", "num_requests", "workload", "prefix_caching"}


def _launch(tiny_gguf: str, extra: str = "") -> str:
    return f"--launch=--model-path={tiny_gguf} {SERVER_FLAGS} {extra}".strip()


def _check_run(run: dict) -> None:
    assert CONTRACT_KEYS <= set(run)
    assert run["failed"] == 0 and run["completed"] == run["num_requests"] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = run[key]
        assert set(s) == {"mean", "p50", "p90", "p99"}
        assert 0 < s["p50"] <= s["p90"] <= s["p99"]
    assert run["ttft_ms"]["p99"] <= run["e2e_ms"]["p99"] and run["ttft_ms"]["mean"] <= run["e2e_ms"]["mean"]
    assert all(t <= e for t, e in zip(run["samples"]["ttft_ms"], run["samples"]["e2e_ms"]))
    assert run["request_throughput"] > 0 and run["output_token_throughput"] > 0


def test_all_workloads_against_one_launched_server(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = benchmark.main([_launch(tiny_gguf, "--enable-prefix-caching"),
                           "--workload=shared-prefix,multi-turn,unique,long-generation",
                           *WORKLOAD_ARGS, f"--output={out}"])
    assert code == 0
    runs = {r["workload"]: r for r in json.loads(out.read_text())["runs"]}
    assert list(runs) == ["shared-prefix", "multi-turn", "unique", "long-generation"]
    for run in runs.values():
        _check_run(run)
        assert run["prefix_caching"] is True
    assert runs["shared-prefix"]["num_requests"] == 12 and runs["multi-turn"]["num_requests"] == 6
    # ignore_eos: every request generates exactly its output length.
    assert runs["shared-prefix"]["total_output_tokens"] == 12 * 4
    assert runs["long-generation"]["total_output_tokens"] == 4 * 48
    assert runs["shared-prefix"]["total_prompt_tokens"] == 12 * (96 + 8)
    assert runs["shared-prefix"]["prefix_cache_hit_rate"] > 0.5
    assert runs["multi-turn"]["prefix_cache_hit_rate"] > 0.3  # later turns resend cached history
    assert runs["unique"]["prefix_cache_hit_rate"] < 0.05
    assert os.path.getsize(tmp_path / "bench.png") > 0
    table = capsys.readouterr().out
    assert "| workload |" in table and "long-generation" in table


def test_compare_prefix_caching(tiny_gguf, tmp_path, capsys):
    # One request at a time: a group's 2nd and 3rd requests hit its 96 cached tokens, 4*96/(6*104) = 0.615.
    out = tmp_path / "cmp.json"
    code = benchmark.main([_launch(tiny_gguf), "--compare-prefix-caching", "--workload=shared-prefix",
                           *WORKLOAD_ARGS, "--prompts-per-group=3", "--max-concurrency=1", f"--output={out}"])
    assert code == 0
    report = json.loads(out.read_text())
    off, on = report["runs"]
    for run in (off, on):
        _check_run(run)
    assert (off["prefix_caching"], on["prefix_caching"]) == (False, True)
    assert off["prefix_cache_hit_rate"] == 0.0 and on["prefix_cache_hit_rate"] > 0.5
    assert on["server_flags"].endswith("--enable-prefix-caching")
    (comparison,) = report["comparisons"]
    assert comparison["workload"] == "shared-prefix" and comparison["on_over_off"]["TTFT mean"] > 0
    assert os.path.getsize(tmp_path / "cmp.png") > 0
    assert "on/off" in capsys.readouterr().out


def test_launch_failure_shows_server_stderr(tiny_gguf, capsys):
    assert benchmark.main([f"--launch=--model-path={tiny_gguf} --max-batch-size=0"]) == 1
    err = capsys.readouterr().err
    assert "exited with status 2 before serving" in err and "--max-batch-size=0" in err


def test_launch_refuses_port_flags(tiny_gguf, capsys):
    assert benchmark.main([f"--launch=--model-path={tiny_gguf} --port=5000"]) == 1
    assert "must not set --port" in capsys.readouterr().err


def test_workload_prompt_lengths_are_exact(tiny_gguf):
    tok = bench_workloads.load_tokenizer(tiny_gguf)
    spec = WorkloadSpec(num_groups=3, prompts_per_group=4, system_prompt_len=50, question_len=7, output_len=5,
                        num_conversations=2, num_turns=3, long_output_len=40)
    shared = bench_workloads.build("shared-prefix", tok, spec, seed=1)
    prompts = [s.turns[0].new_tokens for s in shared]
    assert len(prompts) == 12 and all(len(p) == 57 for p in prompts)
    assert len({p[:50] for p in prompts}) == 3            # one system prompt per group ...
    assert len({p for p in prompts}) == 12                # ... and a unique question each
    assert prompts == [s.turns[0].new_tokens for s in bench_workloads.build("shared-prefix", tok, spec, seed=1)]
    assert prompts != [s.turns[0].new_tokens for s in bench_workloads.build("shared-prefix", tok, spec, seed=2)]
    conv = bench_workloads.build("multi-turn", tok, spec, seed=1)
    assert [[len(t.new_tokens) for t in s.turns] for s in conv] == [[57, 7, 7]] * 2
    assert conv[0].total_len() == 57 + 7 + 7 + 3 * 5
    unique = bench_workloads.build("unique", tok, spec, seed=1)
    assert len(unique) == 12 and len({s.turns[0].new_tokens[:16] for s in unique}) == 12
    long = bench_workloads.build("long-generation", tok, spec, seed=1)
    assert all(len(s.turns[0].new_tokens) == 7 and s.turns[0].output_len == 40 for s in long)
    with pytest.raises(ValueError, match="--workload='nope'"):
        bench_workloads.build("nope", tok, spec, seed=1)


def test_stats_and_hit_rate():
    assert bench_report.stats_ms([]) is None
    s = bench_report.stats_ms([0.001 * i for i in range(1, 101)])
    assert s["mean"] == pytest.approx(50.5) and s["p50"] == pytest.approx(50.5) and s["p99"] == pytest.approx(99.01)
    q, h = "engine_prefix_cache_queried_tokens_total", "engine_prefix_cache_hit_tokens_total"
    assert bench_report.hit_rate({q: 100, h: 10}, {q: 300, h: 160}) == 0.75
    assert bench_report.hit_rate({q: 5, h: 5}, {q: 5, h: 5}) == 0.0
    assert bench_report.hit_rate(None, None) is None


def test_openai_backend_runs_the_same_workloads_as_grpc(tiny_gguf, tmp_path):
    """One launched server, measured over gRPC and over its OpenAI-compatible HTTP API (token-id and text
    prompts): the same token totals, and the hit rate read from the server's own /metrics."""
    from scripts.bench_server import LaunchedServer, split_flags
    flags = split_flags(f"--model-path={tiny_gguf} {SERVER_FLAGS} --enable-prefix-caching")
    args = ["--workload=shared-prefix,multi-turn", *WORKLOAD_ARGS, f"--model-path={tiny_gguf}"]
    reports = {}
    with LaunchedServer(flags, timeout=600) as server:
        for name, extra in (("grpc", [f"--target={server.target}", f"--metrics-url={server.metrics_url}"]),
                            ("tokens", [f"--target={server.http_url}", "--backend=openai", "--openai-prompt=tokens"]),
                            ("text", [f"--target={server.http_url}", "--backend=openai"])):
            out = tmp_path / f"{name}.json"
            assert benchmark.main([*extra, *args, f"--output={out}"]) == 0
            reports[name] = {r["workload"]: r for r in json.loads(out.read_text())["runs"]}
    for name, runs in reports.items():
        for run in runs.values():
            _check_run(run)
            assert run["backend"] == ("grpc" if name == "grpc" else "openai") and run["prefix_caching"] is True
        assert runs["shared-prefix"]["total_prompt_tokens"] == 12 * (96 + 8)   # text re-tokenizes exactly
        assert runs["shared-prefix"]["total_output_tokens"] == 12 * 4          # ignore_eos sent to our server
        assert runs["shared-prefix"]["prefix_cache_hit_rate"] > 0.5
        assert runs["shared-prefix"]["cached_prompt_token_ratio"] > 0.5       # from usage.cached_tokens
        assert runs["multi-turn"]["prefix_cache_hit_rate"] > 0.3
    for workload in ("shared-prefix", "multi-turn"):  # token ids over HTTP: exactly what gRPC sends
        assert reports["tokens"][workload]["total_prompt_tokens"] == reports["grpc"][workload]["total_prompt_tokens"]
    assert os.path.getsize(tmp_path / "text.png") > 0


def test_openai_backend_sends_only_standard_fields_to_other_servers(monkeypatch):
    """Against a server that is not ours: text prompts, no ignore_eos / cache_salt, no /metrics scraping."""
    from engine.config import EngineConfig
    from scripts.bench_openai import OpenAIBackend
    from tests.fake_engine import FakeEngine
    from tests.http_helpers import serving
    monkeypatch.setattr("engine.serving.http_server.OWNED_BY", "someone-else")
    engine = FakeEngine(EngineConfig(max_length=64), eos_token_id=ord("e"))
    with serving(engine) as served:
        backend = OpenAIBackend(served.url, _Chars(), timeout=30, extra_body={"top_k": 3})
        info = backend.info()
        assert (info.name, info.ours, backend.metrics_url) == ("fake-model", False, None)
        payload = backend._payload([ord("a"), ord("b")], 8, "salt")
        result, answer = backend.send([ord("a"), ord("b")], 8, "salt")
        backend.close()
    assert payload == {"model": "fake-model", "prompt": "ab", "max_tokens": 8, "temperature": 0.0, "stream": True,
                       "stream_options": {"include_usage": True}, "top_k": 3}
    # "ab" continues "cde" and stops at the EOS "e" (whose text the fake leaves out): no ignore_eos was sent
    assert result.ok and result.output_len == 3 and answer == [ord("c"), ord("d")] and result.prompt_len == 2
    assert result.ttft is not None and len(result.itls) == 1


class _Chars:
    """The fake engine's tokenizer (a token per character) with the real one's signatures."""
    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)
