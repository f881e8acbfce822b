"""The architecture's rules, checked: what may import what (DESIGN.md § Invariants, § Principles).

Imports are read from the source (ast), so a rule breaks as soon as someone writes the import, whether or
not a test runs the code; only the JAX-free rule imports for real (in a fresh interpreter).
"""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import engine

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Host bookkeeping and the cheap start-up code: importing them must not load JAX (their docstrings say so).
JAX_FREE = ("engine.block_manager", "engine.scheduler", "engine.config", "engine.weights", "engine.flags",
            "engine.request_checks", "engine.request_builder", "engine.front_end_gate", "kernels.backends")

# The front ends and the server reach the model only through the engine (LLMEngine's request API).
FRONT_ENDS = ("server", "servicer", "proto_convert", "request_builder", "metrics", "flags", "front_end_gate",
              "http_server", "http_convert", "http_stream", "http_models", "http_errors")
MODEL_SIDE = ("engine.runner", "engine.model", "engine.device_params", "engine.quantization", "engine.sampling",
              "engine.sharding", "engine.weights", "engine.scheduler", "engine.block_manager", "engine.sequence",
              "engine.inbox", "engine.engine_parts", "engine.model_files", "engine.gguf_loader",
              "engine.gguf_metadata", "engine.checkpoint", "engine.tokenizer", "kernels", "jax")

# scripts/ use the public API: `engine` itself (engine.__all__) and the gRPC stubs engine.v1.* (the wire
# contract); nothing of kernels/ either.
PUBLIC = ("engine", "engine.v1")
# The scripts that must see more, and why. Each entry must still be needed (checked), so the list cannot rot.
SCRIPT_EXCEPTIONS = {
    "bench_sampling.py": {"engine.sampling": "times the jitted sampler itself, below the engine"},
    "bench_multiprocess.py": {"engine.control_channel": "times the control channel itself, below the engine",
                              "engine.distributed": "joins its processes into a group as the server does"},
    "convert_checkpoint.py": {"engine.checkpoint": "the checkpoint format's own command line",
                              "engine.config": "--dtype's choices are the engine's encodings",
                              "engine.gguf_loader": "the default model's path, as the server resolves it"},
}


def _imports(path: pathlib.Path) -> set[str]:
    """Every module `path` imports; `from engine import x` of a name outside engine.__all__ is engine.x."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == "engine":
                found |= {f"engine.{a.name}" for a in node.names if a.name not in engine.__all__}
    return found


def _within(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_host_bookkeeping_imports_no_jax():
    code = (f"import sys; import {', '.join(JAX_FREE)}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_never_import_the_engine(path):
    assert not [m for m in _imports(path) if _within(m, ("engine",))]


@pytest.mark.parametrize("name", FRONT_ENDS)
def test_front_ends_reach_the_model_only_through_the_engine(name):
    bad = sorted(m for m in _imports(ROOT / "engine" / f"{name}.py") if _within(m, MODEL_SIDE))
    assert not bad, f"engine/{name}.py imports {bad}; go through LLMEngine (engine.engine) instead"


@pytest.mark.parametrize("path", sorted((ROOT / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_scripts_use_only_the_public_api(path):
    allowed = SCRIPT_EXCEPTIONS.get(path.name, {})
    inner = {m for m in _imports(path) if _within(m, ("engine", "kernels"))}
    bad = sorted(m for m in inner if m not in PUBLIC and not _within(m, ("engine.v1",)))
    assert set(bad) == set(allowed), (f"scripts/{path.name} imports {bad} beyond the public API "
                                      f"(allowed here: {sorted(allowed)}); add what it needs to `engine`")


def test_the_public_api_is_what_engine_exports():
    assert set(engine.__all__) == {"ENGINE_OPTIONS", "LLM", "EngineStats", "SamplingParams", "load_tokenizer"}
    for name in engine.__all__:
        assert getattr(engine, name) is not None
