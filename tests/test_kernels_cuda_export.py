"""The Pallas GPU kernel lowers for an NVIDIA H200 from this CPU-only machine.

`jax.export(..., platforms=('cuda',))` runs the whole Pallas -> Triton lowering (any unsupported op, block
shape or index fails here) under an abstract CUDA device; no CUDA package is needed. The Triton IR it makes
is read back (pallas_call's debug print) to pin what interpret mode cannot see: 64-bit K/V offsets for a
pool over 4 GiB, and the precision of every dot. When a CUDA plugin is installed (`jax-cuda12-plugin` +
`jax-cuda12-pjrt`, or the `jax-cuda13-*` pair the GPU image has; --no-deps), `test_compiles_for_h200` also
compiles each config against an H200 target description, so Triton's own limits (shared memory, registers)
are hit on CPU too. Nothing here runs a kernel: numerics are pinned by test_kernels.py in interpret mode.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import pathlib
import re
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
CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")

# (tokens N, sequences R, q heads, kv heads, head dim, page size, table width W, dtype, num_splits).
# W is what the engine uses: the pages of a max-length (8,192-token) sequence, unless noted.
CONFIGS = [
    (16, 16, 9, 3, 64, 128, 64, jnp.bfloat16, None),      # SmolLM2 decode, split keys
    (16, 16, 9, 3, 64, 128, 64, jnp.float32, 1),
    (512, 4, 9, 3, 64, 128, 64, jnp.bfloat16, None),      # SmolLM2 prefill chunks
    (512, 64, 9, 3, 64, 16, 512, jnp.bfloat16, None),     # mixed step, pages of 16
    (8, 8, 32, 8, 128, 16, 512, jnp.bfloat16, None),      # Llama-8B-like decode, small pages
    (256, 2, 32, 8, 128, 256, 32, jnp.bfloat16, None),    # big pages, head dim 128
    (256, 2, 32, 8, 128, 256, 32, jnp.float32, None),
    (256, 256, 4, 1, 128, 128, 64, jnp.bfloat16, None),   # one device's heads of Llama-8B under TP=8
    (64, 4, 4, 4, 64, 64, 128, jnp.float32, None),        # MHA
    (2, 2, 32, 4, 128, 32, 256, jnp.bfloat16, 4),         # GQA 8
    (16, 4, 8, 2, 64, 48, 171, jnp.bfloat16, None),       # a page of 48 (not a power of two)
    (40, 3, 4, 1, 16, 16, 6, jnp.float32, None),          # tiny test model shapes
    (3, 3, 6, 2, 32, 32, 4, jnp.bfloat16, None),
]
IDS = [f"N{c[0]}-R{c[1]}-Hq{c[2]}-Hkv{c[3]}-D{c[4]}-S{c[5]}-W{c[6]}-{jnp.dtype(c[7]).name}-s{c[8]}"
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


def _specs(N, R, Hq, Hkv, D, S, W, dtype, sharding=None, P=300):
    shapes = [((N, Hq, D), dtype), ((P, S, Hkv, D), dtype), ((P, S, Hkv, D), dtype), ((R, W), jnp.int32),
              ((R,), jnp.int32), ((R + 1,), jnp.int32)]
    return [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]


def _fn(D, num_splits, **kw):
    def attend(q, k, v, page_table, context_lens, query_start):
        return pallas_gpu.ragged_paged_attention(q, k, v, page_table, context_lens, query_start,
                                                 scale=D ** -0.5, num_splits=num_splits, **kw)
    return attend


def _export(config, P=300, **kw):
    N, R, Hq, Hkv, D, S, W, dtype, num_splits = config
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H200", num_cores=None, platform="cuda"))
    with use_abstract_mesh(mesh):
        return export.export(
            jax.jit(_fn(D, num_splits, **kw)), platforms=("cuda",),
            # The Triton call is not on jax.export's list of stable custom calls: it is compiled for the
            # GPU it is loaded on, which is fine for checking the lowering here.
            disabled_checks=[export.DisabledSafetyCheck.custom_call(plt.CUSTOM_CALL_TARGET_NAME)],
        )(*_specs(N, R, Hq, Hkv, D, S, W, dtype, P=P))


def triton_ir(config, P=300, **kw) -> str:
    """The Triton IR (text) of the kernel for `config`, from pallas_call's debug print at lowering."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _export(config, P=P, debug=True, **kw)
    return printed.getvalue().split("The Triton module for pallas_call", 1)[1]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_exports_for_cuda(config):
    N, R, Hq, Hkv, D, S, W, dtype, num_splits = config
    exported = _export(config)
    module = exported.mlir_module()
    assert module.count(f"@{plt.CUSTOM_CALL_TARGET_NAME}(") == 1
    assert exported.platforms == ("cuda",)
    assert exported.out_avals[0].shape == (N, Hq, D) and exported.out_avals[0].dtype == dtype
    assert len(exported.serialize()) > 1000


def _kv_load_offsets(ir: str) -> set[str]:
    """Element types of the offsets added to the K/V pool pointers ([block_k, D] gathers)."""
    return set(re.findall(r"tt.addptr %\w+, %\w+ : tensor<128x\d+x!tt.ptr<\w+>>, tensor<128x\d+x(i\d+)>", ir))


def test_a_pool_over_4_gib_gets_64_bit_offsets():
    # One layer's pool of 233,016 pages of 128 slots x 3 x 64 (11.4 GB in bf16) vs a small one.
    assert _kv_load_offsets(triton_ir(CONFIGS[0], P=2 ** 21 // 9)) == {"i64"}
    assert _kv_load_offsets(triton_ir(CONFIGS[0])) == {"i32"}


def _dots(ir: str) -> list[str]:
    return [line for line in ir.splitlines() if "tt.dot " in line]


def test_float32_dots_are_ieee_and_bfloat16_dots_accumulate_in_float32():
    f32, bf16 = CONFIGS[6], CONFIGS[5]
    dots = _dots(triton_ir(f32))
    assert len(dots) == 4               # QK^T and PV, in the unmasked and the masked loop
    assert all(re.search(r"xf32> \* tensor<\d+x\d+xf32> -> tensor<\d+x\d+xf32>", d) for d in dots)
    assert not any("inputPrecision" in d for d in dots)          # Triton's default: IEEE float32
    dots = _dots(triton_ir(bf16))
    assert len(dots) == 4
    assert all(re.search(r"xbf16> \* tensor<\d+x\d+xbf16> -> tensor<\d+x\d+xf32>", d) for d in dots)
    # TF32 only when asked for (and then visibly).
    assert all("inputPrecision = tf32 " in d for d in _dots(triton_ir(f32, f32_dots="tf32")))
    assert all("inputPrecision = tf32x3 " in d for d in _dots(triton_ir(f32, f32_dots="tf32x3")))


def test_rejects_head_dims_triton_cannot_tile():
    for D in (80, 8):
        with pytest.raises(ValueError, match="power of two"):
            jax.eval_shape(_fn(D, None), *_specs(2, 2, 4, 2, D, 16, 4, jnp.float32))


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
        N, R, Hq, Hkv, D, S, W, dtype, num_splits = config
        try:
            with use_abstract_mesh(mesh.abstract_mesh):
                lowered = jax.jit(_fn(D, num_splits), out_shardings=sharding).lower(
                    *_specs(N, R, Hq, Hkv, D, S, W, dtype, sharding))
            lowered.compile()   # raises e.g. "Shared memory size limit exceeded"
            results[config_id] = "ok"
        except Exception as e:  # reported per config by the test below
            results[config_id] = f"{type(e).__name__}: {e}"[:2000]
    return results


@pytest.fixture(scope="module")
def h200_compile_results():
    if not any(importlib.util.find_spec(name) for name in CUDA_PLUGINS):
        pytest.skip("full CUDA compile needs a CUDA plugin: jax-cuda13-plugin + jax-cuda13-pjrt (or the "
                    "cuda12 pair), installed with --no-deps")
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900,
                          cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("config_id", IDS)
def test_compiles_for_h200(config_id, h200_compile_results):
    assert h200_compile_results[config_id] == "ok"


if __name__ == "__main__":
    print(json.dumps(_compile_all_for_h200()))
