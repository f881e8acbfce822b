"""scripts/batch_generate.py: input order kept, malformed lines become error records, --resume, and the
offline engine and a launched server giving the same greedy outputs for the same file."""
from __future__ import annotations

import json

import pytest

from scripts import batch_generate
from scripts.bench_server import LaunchedServer

ENGINE = {"devices": "cpu", "max-length": "256", "kv-cache-page-size": "16", "max-batch-size": "4",
          "max-num-batched-tokens": "32", "kv-cache-pages": "128"}
LINES = [
    {"id": "p1", "prompt": "Hello world, the capital of France is", "max_tokens": 6},
    {"id": 7, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "ignore_eos": True},
    "this is not json",
    "",                                                              # blank: ignored, not an error
    {"prompt": "no id here"},
    {"id": "ids", "prompt_token_ids": [5, 6, 7, 8, 9], "max_tokens": 4},
    {"id": "zero", "prompt": "x", "max_tokens": 0},
    {"id": "two", "prompt": "x", "prompt_token_ids": [5]},
    {"id": "vocab", "prompt_token_ids": [5, 10 ** 6], "max_tokens": 4},
    {"id": "role", "messages": [{"role": "robot", "content": "Hi"}]},
    {"id": "p1", "prompt": "a duplicate id"},
    {"id": "long", "prompt": "Hello the world", "max_tokens": 12, "ignore_eos": True, "stop": ["zzzz"]},
]
# (id, line) of the output records in order; a result has no "line", an error record always has one.
EXPECTED = [("p1", None), (7, None), (None, 3), (None, 5), ("ids", None), ("zero", 7), ("two", 8), ("vocab", 9),
            ("role", 10), ("p1", 11), ("long", None)]


@pytest.fixture(scope="module")
def input_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("batch") / "in.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in LINES))
    return path


@pytest.fixture(scope="module")
def server(tiny_gguf):
    flags = [f"--model-path={tiny_gguf}", "--enable-prefix-caching"] + [f"--{k}={v}" for k, v in ENGINE.items()]
    with LaunchedServer(flags, timeout=600) as s:
        yield s


def _output(argv) -> str:
    return str(argv[argv.index("--output") + 1])


def _records(capsys, argv) -> tuple[list[dict], str]:
    argv = [str(a) for a in argv]
    assert batch_generate.main(argv) == 0
    summary = capsys.readouterr().out
    return [json.loads(line) for line in open(_output(argv))], summary


def _check_records(records: list[dict]) -> None:
    assert [(r["id"], r.get("line")) for r in records] == EXPECTED
    by_line = {r["line"]: r["error"] for r in records if "error" in r}
    assert "line 3:" in by_line[3] and '"id"' in by_line[5] and "max_tokens=0" in by_line[7]
    assert "exactly one of" in by_line[8] and "outside the vocabulary" in by_line[9]
    assert "role='robot'" in by_line[10] and "duplicate id 'p1' (first on line 1)" in by_line[11]
    ok = {r["id"]: r for r in records if "error" not in r}
    assert ok[7]["finish_reason"] == "length" and len(ok[7]["token_ids"]) == ok[7]["usage"]["completion_tokens"] == 5
    assert ok["ids"]["usage"]["prompt_tokens"] == 5 and len(ok["long"]["token_ids"]) == 12


def test_offline_and_server_agree(tiny_gguf, server, input_file, tmp_path, capsys):
    offline, summary = _records(capsys, ["--input", input_file, "--output", tmp_path / "offline.jsonl",
                                         "--model-path", tiny_gguf,
                                         *[x for k, v in ENGINE.items() for x in (f"--{k}", v)]])
    assert summary.startswith("batch_generate: 4 ok, 7 failed, 0 skipped;")
    _check_records(offline)
    served, _ = _records(capsys, ["--input", input_file, "--output", tmp_path / "served.jsonl",
                                  "--target", server.target, "--max-concurrency", 3])
    _check_records(served)
    drop_cache = lambda r: {**r, "usage": {**r["usage"], "cached_prompt_tokens": None}}
    assert [drop_cache(r) for r in served if "error" not in r] == [drop_cache(r) for r in offline if "error" not in r]


def test_resume_runs_only_what_is_missing(server, input_file, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    argv = ["--input", input_file, "--output", out, "--target", server.target]
    first, _ = _records(capsys, argv)
    kept = [r for r in first if r["id"] in ("p1", 7) and "error" not in r]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"id": "ids", "te')  # a torn last line
    resumed, summary = _records(capsys, argv + ["--resume"])
    assert summary.startswith("batch_generate: 2 ok, 7 failed, 2 skipped;")
    assert resumed == first


def test_engine_flags_and_caching_switch():
    args = batch_generate.parse_args(["--input", "i", "--output", "o", "--max-batch-size", "3"])
    assert args.engine_options == {"max_batch_size": 3, "enable_prefix_caching": True}
    args = batch_generate.parse_args(["--input", "i", "--output", "o", "--no-prefix-caching"])
    assert args.engine_options["enable_prefix_caching"] is False
    with pytest.raises(SystemExit):
        batch_generate.parse_args(["--input", "i", "--output", "o", "--target", "h:1", "--max-batch-size", "3"])
