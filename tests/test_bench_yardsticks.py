"""The llama.cpp yardstick scripts without llama.cpp: scripts/bench_llamacpp.py's one-line build hint when
llama_cpp is missing, bench_faithfulness.py's common prefix and its --greedy round trip through a
subprocess (a stand-in llama_cpp module on PYTHONPATH records how it is driven)."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

from scripts import bench_faithfulness
from scripts.bench_faithfulness import common_prefix

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCKED = "raise ImportError('llama_cpp is blocked for this test')\n"
STAND_IN = textwrap.dedent('''
    import json, os
    class Llama:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
        def reset(self):
            self.n_tokens = 0
        def eval(self, tokens):
            self.n_tokens += len(tokens)
            assert self.n_tokens <= self.kwargs["n_ctx"], "past the context"
        def generate(self, tokens, **kwargs):
            with open(os.environ["LLAMA_LOG"], "a") as f:
                f.write(json.dumps({"init": self.kwargs, "generate": kwargs, "tokens": list(tokens)}) + "\\n")
            i = 0
            while True:  # like llama.cpp's generator: never stops by itself
                yield (sum(tokens) + i) % 1000
                i += 1
''')


def _llama_cpp_package(tmp_path, source: str) -> str:
    (tmp_path / "llama_cpp").mkdir()
    (tmp_path / "llama_cpp" / "__init__.py").write_text(source)
    return str(tmp_path)


@pytest.mark.parametrize("script,args", [("bench_llamacpp.py", []),
                                         ("bench_faithfulness.py", ["--llama-python", sys.executable])])
def test_missing_llama_cpp_exits_with_one_line_naming_the_build(tmp_path, script, args):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": _llama_cpp_package(tmp_path, BLOCKED)}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for part in ("llama_cpp is not importable", "llama-cpp-python==0.3.36", "-DGGML_NATIVE=OFF",
                 "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"):
        assert part in lines[0]


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix([1, 2, 3], [1, 9, 3]) == 1
    assert common_prefix([5, 2], [1, 2]) == 0
    assert common_prefix([1, 2, 3], [1, 2]) == 2
    assert common_prefix((), (1,)) == 0


def test_llama_cpp_greedy_tokens_round_trip_through_its_own_interpreter(tmp_path, monkeypatch, tiny_gguf):
    monkeypatch.setenv("PYTHONPATH", _llama_cpp_package(tmp_path, STAND_IN))
    monkeypatch.setenv("LLAMA_LOG", str(tmp_path / "calls.jsonl"))
    prompts = [(1, 2, 3), (10, 20)]
    assert bench_faithfulness.llama_cpp_tokens(sys.executable, tiny_gguf, prompts, 4) == [
        [6, 7, 8, 9], [30, 31, 32, 33]]     # exactly 4 each, from each prompt's own ids
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [c["tokens"] for c in calls] == [[1, 2, 3], [10, 20]]
    for c in calls:   # greedy, and no repeat penalty (it would change greedy tokens)
        assert c["generate"]["top_k"] == 1 and c["generate"]["temp"] == 0.0 and c["generate"]["repeat_penalty"] == 1.0
        assert c["init"]["model_path"] == tiny_gguf and c["init"]["n_threads"] == 2


def test_llama_cpp_decode_rates_are_reported_per_context(tmp_path, tiny_gguf):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": _llama_cpp_package(tmp_path, STAND_IN),
           "LLAMA_LOG": str(tmp_path / "calls.jsonl")}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_llamacpp.py"), "--model-path", tiny_gguf,
                           "--steps", "4", "--repeats", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["model"] == tiny_gguf and out["threads"] == 2
    for key in ("decode_tok_s@batch1_ctx16", "decode_tok_s@batch1_ctx1500", "prefill_tok_s@512"):
        assert out[key] > 0 and len(out["runs_" + key]) == 2
