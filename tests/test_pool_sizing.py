"""KV-pool sizing and device defaults (engine/loading/config_resolution.py resolve_config), without a real device."""
import pytest

from engine.config import EngineConfig
from engine.loading.config_resolution import page_bytes, resolve_config
from tests.test_sharding import SMOLLM2

GiB = 1 << 30


class FakeGpu:
    platform = "gpu"

    def memory_stats(self):
        return {"bytes_limit": 80 * GiB, "bytes_in_use": 0}


@pytest.mark.parametrize("encoding,weight_bytes,kv_bytes", [(None, 2, 2), ("bfloat16", 2, 2), ("float32", 4, 4),
                                                             ("q8_0", 1, 2)])
def test_gpu_pool_counts_the_weights_in_the_dtype_actually_used(encoding, weight_bytes, kv_bytes):
    """The default encoding on a GPU is bfloat16: its weights take 2 bytes each, not 4 (and q8_0's 1)."""
    n = 8_000_000_000            # an 8B model: the weights' size decides the pool
    cfg = EngineConfig(quantization_encoding=encoding, max_length=4096, max_batch_size=4096)
    resolved = resolve_config(cfg, SMOLLM2, FakeGpu(), n)
    budget = int(80 * GiB * 0.9 - n * weight_bytes)
    want = budget // page_bytes(SMOLLM2, 128, kv_bytes) + 1
    assert resolved.kv_cache_pages == want
    assert resolved.quantization_encoding == (encoding or "bfloat16")


def test_batch_defaults_follow_the_device():
    class Cpu:
        platform = "cpu"
    cpu = resolve_config(EngineConfig(kv_cache_pages=100, max_length=256), SMOLLM2, Cpu(), 1000)
    gpu = resolve_config(EngineConfig(kv_cache_pages=100, max_length=256), SMOLLM2, FakeGpu(), 1000)
    assert (cpu.max_batch_size, cpu.max_num_batched_tokens) == (32, 512)
    assert (gpu.max_batch_size, gpu.max_num_batched_tokens) == (256, 8192)
    mine = resolve_config(EngineConfig(kv_cache_pages=100, max_length=256, max_batch_size=3), SMOLLM2, FakeGpu(), 1)
    assert (mine.max_batch_size, mine.max_num_batched_tokens) == (3, 8192)
