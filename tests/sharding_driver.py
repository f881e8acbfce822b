"""Subprocess side of tests/test_sharding.py: jax must see several CPU devices, which has to be set (XLA_FLAGS)
before jax is imported, and the pytest process has already imported it with one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.sharding_driver JOBS.json OUT.json

JOBS.json is a list of [case, arg, ...]; OUT.json gets one JSON object per job (token ids, sharding specs,
shard shapes, error messages), in order. One process runs them all (jax starts once); nothing is asserted
here, so a failure shows up as a readable pytest diff.
"""
from __future__ import annotations

import json
import sys

OPTS = dict(max_batch_size=4, max_num_batched_tokens=128, max_length=64, kv_cache_page_size=16,
            kv_cache_pages=48, enable_prefix_caching=True)
PREFIX = list(range(20, 57))       # 37 tokens: two full pages of 16 are shareable
SUFFIXES = ([5, 9, 11], [7, 3], [13, 17, 19, 23, 29])


def _describe(array) -> dict:
    """Spec and per-device shard shapes of a jax.Array."""
    return {"spec": [a if a is None or isinstance(a, str) else list(a) for a in array.sharding.spec],
            "shards": sorted({tuple(s.data.shape) for s in array.addressable_shards}),
            "num_shards": len(array.addressable_shards)}


def generate(model_path: str, devices: str, backend: str = "reference", encoding: str = "float32") -> dict:
    """Greedy tokens for prompts sharing a prefix, run twice (the second round hits the prefix cache)."""
    from engine import LLM, SamplingParams
    llm = LLM(model_path, devices=devices, attention_backend=backend, quantization_encoding=encoding, **OPTS)
    prompts = [PREFIX + s for s in SUFFIXES]
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    first = llm.generate(prompts, sp)
    second = llm.generate(prompts, sp)
    runner = llm.engine.runner
    layer = {k: (w.q if hasattr(w, "q") else w) for k, w in runner.params["layers"][1].items()}
    scales = {k + "_scale": _describe(w.scale) for k, w in runner.params["layers"][1].items() if hasattr(w, "scale")}
    return {"tokens": [list(o.token_ids) for o in first], "again": [list(o.token_ids) for o in second],
            "cached": [o.cached_prompt_tokens for o in second], "devices": llm.engine.device_description,
            "num_layers": len(runner.params["layers"]),
            **{name: _describe(w) for name, w in layer.items()}, **scales,
            "embed": _describe(getattr(runner.params["embed"], "q", runner.params["embed"])),
            "k_cache": _describe(runner.k_pools[1]), "v_cache": _describe(runner.v_pools[1])}


def chat(model_path: str, devices: str) -> dict:
    """Greedy chat answer of a real model (SmolLM2: 9 query / 3 KV heads split over 3 devices)."""
    from engine import LLM, SamplingParams
    llm = LLM(model_path, devices=devices, max_batch_size=2, max_num_batched_tokens=64, max_length=128,
              kv_cache_page_size=16, kv_cache_pages=20)
    out = llm.generate([[{"role": "user", "content": "What is the capital of France?"}]],
                       SamplingParams(max_tokens=12))[0]
    return {"text": out.text, "finish_reason": out.finish_reason,
            "k_cache": _describe(llm.engine.runner.k_pools[0])}


def error(model_path: str, devices: str) -> dict:
    from engine import LLM
    try:
        LLM(model_path, devices=devices, **OPTS)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def restore(checkpoint_dir: str, devices: str) -> dict:
    """A checkpoint restored straight onto a 'model' mesh: per-array shardings as read."""
    from engine.loading.checkpoint import load_checkpoint, read_checkpoint_config
    from engine.device.devices import select_devices
    from engine.device.sharding import Layout
    layout = Layout.build(read_checkpoint_config(checkpoint_dir)[0], select_devices(devices))
    _, params, _ = load_checkpoint(checkpoint_dir, layout.param_shardings())
    return {"wq": _describe(params["layers"]["wq"]), "w_down": _describe(params["layers"]["w_down"]),
            "final_norm": _describe(params["final_norm"])}


def initialize(coordinator_address: str) -> dict:
    """A one-process jax.distributed runtime (must be the first job: before any device is touched)."""
    from engine.device.distributed import maybe_initialize
    done = maybe_initialize(coordinator_address, 1, 0)
    import jax
    return {"initialized": done, "process_count": jax.process_count(), "process_index": jax.process_index(),
            "devices": jax.device_count()}


CASES = {"initialize": initialize, "generate": generate, "chat": chat, "error": error, "restore": restore}

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    results = [CASES[case](*args) for case, *args in jobs]
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
