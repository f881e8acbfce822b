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
JAX_FREE = ("engine.core.block_manager", "engine.core.scheduler", "engine.config", "engine.loading.weights",
            "engine.flags", "engine.core.request_checks", "engine.serving.request_builder",
            "engine.serving.front_end_gate", "engine.device.control_channel", "kernels.backends")

# The front ends (engine/serving/) and the server reach the model only through the engine (LLMEngine's
# request API). The server also starts a process group and its follower loop (engine.device.distributed,
# engine.device.follower): that is process wiring, not a way around the engine.
FRONT_ENDS = ("server.py", "flags.py", *sorted(f"serving/{p.name}"
                                               for p in (ROOT / "engine" / "serving").glob("*.py")))
MODEL_SIDE = ("engine.device.runner", "engine.device.model", "engine.device.device_params",
              "engine.device.quantization", "engine.device.sampling", "engine.device.sharding",
              "engine.loading.weights", "engine.core.scheduler", "engine.core.block_manager", "engine.core.sequence",
              "engine.core.inbox", "engine.loading.engine_parts", "engine.loading.model_files",
              "engine.loading.gguf_loader", "engine.loading.gguf_metadata", "engine.loading.checkpoint",
              "engine.loading.weight_source",
              "engine.loading.tokenizer", "kernels", "jax")
# The rooms of engine/ by layer: the engine (core), its device step and its loading never depend on the
# front ends that serve it.
BELOW_THE_FRONT_ENDS = ("core", "device", "loading")

# scripts/ use the public API: `engine` itself (engine.__all__) and the gRPC stubs engine.v1.* (the wire
# contract); nothing of kernels/ either.
PUBLIC = ("engine", "engine.v1")
# The scripts that must see more, and why. Each entry must still be needed (checked), so the list cannot rot.
SCRIPT_EXCEPTIONS = {
    "bench_sampling.py": {"engine.device.sampling": "times the jitted sampler itself, below the engine"},
    "bench_multiprocess.py": {"engine.device.control_channel": "times the control channel itself, below the engine",
                              "engine.device.distributed": "joins its processes into a group as the server does"},
    "bench_int4.py": {"engine.device.quantization": "times q8_0's matmul itself, below the engine, beside int4"},
    "bench_llamacpp.py": {"engine.loading.gguf_loader": "the default model's path without JAX: it runs in "
                                                        "llama.cpp's own venv (numpy only), not the engine's"},
    "convert_checkpoint.py": {"engine.loading.checkpoint": "the checkpoint format's own command line",
                              "engine.config": "--dtype's choices are the engine's encodings",
                              "engine.loading.gguf_loader": "the default model's path, as the server resolves it"},
}


def _imports(path: pathlib.Path) -> set[str]:
    """Every module `path` imports; `from engine import x` of a name outside engine.__all__ is engine.x, and
    `from <a package> import m` (a room of engine/) is <package>.m."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "engine":
                found.add(node.module)
                found |= {f"engine.{a.name}" for a in node.names if a.name not in engine.__all__}
            elif (ROOT / node.module.replace(".", "/")).is_dir():   # `from engine.device import sampling`
                found |= {f"{node.module}.{a.name}" for a in node.names}
            else:
                found.add(node.module)
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
    bad = sorted(m for m in _imports(ROOT / "engine" / name) if _within(m, MODEL_SIDE))
    assert not bad, f"engine/{name} imports {bad}; go through LLMEngine (engine.core.engine) instead"


@pytest.mark.parametrize("path", sorted(p for room in BELOW_THE_FRONT_ENDS
                                        for p in (ROOT / "engine" / room).glob("*.py")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_engine_never_imports_its_front_ends(path):
    bad = sorted(m for m in _imports(path) if _within(m, ("engine.serving", "engine.server")))
    assert not bad, f"engine/{path.parent.name}/{path.name} imports {bad}"


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
