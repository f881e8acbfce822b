"""Batch jobs survive interruptions (issue 13, defect 10): --resume runs again the records a shutdown or an
engine fault cut off, keeps finished ones exactly once, and fsyncs what it writes; convert_checkpoint never
leaves a half-written --output behind."""
from __future__ import annotations

import json
import os

import pytest

from scripts import batch_generate
from scripts.batch_io import read_done

LINES = [{"id": "kept", "prompt_token_ids": [5, 6, 7], "max_tokens": 3, "ignore_eos": True},
         {"id": "cut", "prompt_token_ids": [8, 9], "max_tokens": 4, "ignore_eos": True},
         {"id": "failed", "prompt_token_ids": [10, 11], "max_tokens": 2, "ignore_eos": True},
         {"id": "missing", "prompt_token_ids": [12], "max_tokens": 2, "ignore_eos": True}]
KEPT = {"id": "kept", "text": "as before", "token_ids": [1, 2, 3], "finish_reason": "length",
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "cached_prompt_tokens": 0}}
CUT = {**KEPT, "id": "cut", "token_ids": [4], "finish_reason": "abort",
       "usage": {"prompt_tokens": 2, "completion_tokens": 1, "cached_prompt_tokens": 0}}
FAILED = {"id": "failed", "line": 3, "error": "UNAVAILABLE: the engine stopped"}


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_read_done_skips_interrupted_and_failed_records(tmp_path):
    out = tmp_path / "out.jsonl"
    _jsonl(out, [KEPT, CUT, FAILED, KEPT])
    assert read_done(str(out)) == {"kept": KEPT}


def test_resume_retries_interrupted_records_and_keeps_finished_ones_once(tiny_gguf, tmp_path, monkeypatch, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _jsonl(inp, LINES)
    _jsonl(out, [KEPT, CUT, FAILED, KEPT])   # an earlier run: 'kept' appended twice, 'cut' cut off by a shutdown
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd))[1])
    argv = ["--input", str(inp), "--output", str(out), "--resume", "--model-path", tiny_gguf, "--devices", "cpu",
            "--max-length", "64", "--kv-cache-page-size", "16", "--kv-cache-pages", "16", "--max-batch-size", "4"]
    assert batch_generate.main(argv) == 0
    assert capsys.readouterr().out.startswith("batch_generate: 3 ok, 0 failed, 1 skipped;")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["kept", "cut", "failed", "missing"]
    assert records[0] == KEPT                                        # kept exactly, exactly once
    assert [r["finish_reason"] for r in records[1:]] == ["length"] * 3
    assert [len(r["token_ids"]) for r in records[1:]] == [4, 2, 2]
    assert str(out) in synced and str(tmp_path) in synced            # the final file and its directory entry


def test_each_record_is_fsynced_as_it_is_written(tiny_gguf, tmp_path, monkeypatch, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _jsonl(inp, LINES[:2])
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd))[1])
    assert batch_generate.main(["--input", str(inp), "--output", str(out), "--model-path", tiny_gguf,
                                "--devices", "cpu", "--max-length", "64", "--kv-cache-page-size", "16",
                                "--kv-cache-pages", "16"]) == 0
    assert synced.count(str(out)) >= 2 and str(tmp_path) in synced


def test_a_crashed_conversion_leaves_no_output_directory(tiny_gguf, tmp_path, monkeypatch):
    import engine.loading.checkpoint as checkpoint
    from scripts.convert_checkpoint import main
    out = tmp_path / "ckpt"
    write_json = checkpoint._write_json

    def crash_on_config(path, value):
        if path.endswith(checkpoint.CONFIG_FILE):
            raise OSError("disk full (injected)")
        write_json(path, value)
    monkeypatch.setattr(checkpoint, "_write_json", crash_on_config)
    with pytest.raises(OSError, match="injected"):
        main(["--model-path", tiny_gguf, "--output", str(out)])
    assert os.listdir(tmp_path) == []          # neither --output nor a partial directory
    monkeypatch.setattr(checkpoint, "_write_json", write_json)
    assert main(["--model-path", tiny_gguf, "--output", str(out)]) == 0   # the same --output works next time
    assert checkpoint.read_checkpoint_config(str(out))[0].num_layers == 2
    assert [p for p in os.listdir(tmp_path)] == ["ckpt"]
