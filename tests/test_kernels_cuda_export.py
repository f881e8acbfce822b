"""The Pallas GPU kernels lower for an NVIDIA H200 from this CPU-only machine.

`jax.export(..., platforms=('cuda',))` runs the whole Pallas -> Triton lowering (any unsupported op, block
shape or index fails here) under an abstract CUDA device; no CUDA package is needed. When the CUDA plugin
is installed (`jax-cuda12-plugin` + `jax-cuda12-pjrt`, --no-deps), `test_compiles_for_h200` also compiles
the module against an H200 target description, so Triton's own limits (shared memory, registers) are hit
on CPU too. Nothing here runs a kernel: numerics are pinned by test_kernels.py in interpret mode.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.experimental.pallas import triton as plt
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from kernels import pallas_gpu

# Known and accepted (see WORKSPACE.md): every Triton lowering warns that the backend is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

# (batch, queries, q heads, kv heads, head dim, page size, pages per row, dtype, num_splits)
CONFIGS = [
    (16, 1, 9, 3, 64, 128, 16, jnp.bfloat16, None),   # SmolLM2 decode, split keys
    (16, 1, 9, 3, 64, 128, 16, jnp.float32, 1),
    (4, 512, 9, 3, 64, 128, 8, jnp.bfloat16, None),   # SmolLM2 prefill chunk
    (8, 1, 32, 8, 128, 16, 64, jnp.bfloat16, None),   # Llama-8B-like decode, small pages
    (2, 256, 32, 8, 128, 256, 8, jnp.bfloat16, None),  # big pages, head dim 128
    (2, 256, 32, 8, 128, 256, 8, jnp.float32, None),
    (4, 64, 4, 4, 64, 64, 4, jnp.float32, None),      # MHA
    (2, 1, 32, 4, 128, 32, 8, jnp.bfloat16, 4),       # GQA 8
    (3, 40, 4, 1, 16, 16, 6, jnp.float32, None),      # tiny test model shapes
    (3, 1, 6, 2, 32, 32, 4, jnp.bfloat16, None),
]
IDS = [f"B{c[0]}-T{c[1]}-Hq{c[2]}-Hkv{c[3]}-D{c[4]}-S{c[5]}-W{c[6]}-{jnp.dtype(c[7]).name}-s{c[8]}"
       for c in CONFIGS]

# The H200 as XLA's GPU compiler sees it (values from XLA's H100 SXM target config, the same sm_90 die;
# memory size and bandwidth are the H200's).
H200_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024  threads_per_warp: 32  shared_memory_per_block: 49152
  shared_memory_per_core: 233472  threads_per_core_limit: 2048  core_count: 132  fpus_per_core: 128
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000  l2_cache_size: 52428800  clock_rate_ghz: 1.98
  device_memory_size: 150754820096  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024  thread_dim_limit_y: 1024  thread_dim_limit_z: 64
  name: "NVIDIA H200"
}
platform_name: "CUDA"
device_description_str: "NVIDIA H200"
"""


def _specs(B, T, Hq, Hkv, D, S, W, dtype, sharding=None, L=2, P=300):
    shapes = [((B, T, Hq, D), dtype), ((L, P, S, Hkv, D), dtype), ((L, P, S, Hkv, D), dtype),
              ((), jnp.int32), ((B, W), jnp.int32), ((B,), jnp.int32), ((B,), jnp.int32)]
    return [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]


def _fn(D, num_splits):
    def attend(q, k, v, layer, page_table, context_lens, query_lens):
        return pallas_gpu.paged_attention(q, k, v, layer, page_table, context_lens, query_lens,
                                          scale=D ** -0.5, num_splits=num_splits)
    return attend


def _export(config, **pool):
    B, T, Hq, Hkv, D, S, W, dtype, num_splits = config
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H200", num_cores=None, platform="cuda"))
    with use_abstract_mesh(mesh):
        return export.export(
            jax.jit(_fn(D, num_splits)), platforms=("cuda",),
            # The Triton call is not on jax.export's list of stable custom calls: it is compiled for the
            # GPU it is loaded on, which is fine for checking the lowering here.
            disabled_checks=[export.DisabledSafetyCheck.custom_call(plt.CUSTOM_CALL_TARGET_NAME)],
        )(*_specs(B, T, Hq, Hkv, D, S, W, dtype, **pool))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_exports_for_cuda(config):
    B, T, Hq, Hkv, D, S, W, dtype, num_splits = config
    exported = _export(config)
    module = exported.mlir_module()
    assert module.count(f"@{plt.CUSTOM_CALL_TARGET_NAME}(") == 1
    assert exported.platforms == ("cuda",)
    assert exported.out_avals[0].shape == (B, T, Hq, D) and exported.out_avals[0].dtype == dtype
    assert len(exported.serialize()) > 1000


def test_exports_with_a_pool_over_4_gib():
    # 30 layers x 8192 pages of 128 slots (12 GiB in bf16): the lowering must switch to 64-bit offsets.
    exported = _export(CONFIGS[0], L=30, P=8192)
    assert exported.in_avals[1].shape == (30, 8192, 128, 3, 64)


def test_rejects_shapes_triton_cannot_tile():
    for D, S in ((80, 128), (64, 24), (8, 16)):
        with pytest.raises(ValueError, match="powers of two"):
            jax.eval_shape(_fn(D, None), *_specs(2, 1, 4, 2, D, S, 4, jnp.float32))


def _compile_all_for_h200() -> dict[str, str]:
    """Compiles every config against the H200 description; returns {config id: "ok" | error}. Runs in a
    subprocess because the CUDA plugin registers its compile-only topology only when JAX starts with
    JAX_PLATFORMS=cpu (otherwise it looks for a GPU and cuDNN, and fails)."""
    from jax.experimental import topologies
    topo = topologies.get_topology_desc("", platform="cuda", topology="1x1x1",
                                        target_config=H200_TARGET_CONFIG)
    mesh = topologies.make_mesh(topo, (1,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    results = {}
    for config, config_id in zip(CONFIGS, IDS):
        B, T, Hq, Hkv, D, S, W, dtype, num_splits = config
        try:
            with use_abstract_mesh(mesh.abstract_mesh):
                lowered = jax.jit(_fn(D, num_splits), out_shardings=sharding).lower(
                    *_specs(B, T, Hq, Hkv, D, S, W, dtype, sharding))
            lowered.compile()   # raises e.g. "Shared memory size limit exceeded"
            results[config_id] = "ok"
        except Exception as e:  # reported per config by the test below
            results[config_id] = f"{type(e).__name__}: {e}"[:2000]
    return results


@pytest.fixture(scope="module")
def h200_compile_results():
    if importlib.util.find_spec("jax_cuda12_plugin") is None:
        pytest.skip("full CUDA compile needs jax-cuda12-plugin and jax-cuda12-pjrt (--no-deps)")
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                          cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("config_id", IDS)
def test_compiles_for_h200(config_id, h200_compile_results):
    assert h200_compile_results[config_id] == "ok"


if __name__ == "__main__":
    print(json.dumps(_compile_all_for_h200()))
