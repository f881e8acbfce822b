"""Resolves every None of an EngineConfig for one model on one device: dtype, batch defaults, max length,
page size and the KV pool's size (from what the device has left once the weights are resident)."""
from __future__ import annotations

import dataclasses
import os

from engine.config import DEVICE_DEFAULTS, EngineConfig, ModelConfig

DEFAULT_MAX_LENGTH = 4096
# On CPU the "device memory" is the host's RAM, shared with everything else: cap the KV pool.
CPU_KV_BUDGET_BYTES = 2 << 30


def page_bytes(mc: ModelConfig, page_size: int, itemsize: int) -> int:
    return 2 * mc.num_layers * page_size * mc.num_kv_heads * mc.head_dim * itemsize


def bytes_per_parameter(dtype: str) -> int:
    """Resident bytes per weight in the encoding the runner keeps (q8_0: int8 plus small scales)."""
    return {"float32": 4, "bfloat16": 2, "q8_0": 1}[dtype]


def resolve_dtype(config: EngineConfig, device) -> str:
    """--quantization-encoding, or the device's default: float32 on CPU (bf16 dots are slow there), bfloat16
    elsewhere."""
    return config.quantization_encoding or ("float32" if device.platform == "cpu" else "bfloat16")


def _device_budget(device, utilization: float, params_bytes: int) -> int:
    if device.platform == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(min(total * utilization - 2 * params_bytes, CPU_KV_BUDGET_BYTES))
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit", 16 << 30)
    return int(limit * utilization - stats.get("bytes_in_use", 0) - params_bytes)


def resolve_config(config: EngineConfig, mc: ModelConfig, device, num_params: int,
                   num_devices: int = 1) -> EngineConfig:
    """Fills every None: dtype, max_length, page size (continuous = one max-length page), pool size (from
    what `device` has left once its share of the weights is resident in the dtype actually used; on a GPU
    over `num_devices` tensor-parallel devices each holds ~1/n of the weights and, when the KV heads split,
    1/n of every page)."""
    dtype = resolve_dtype(config, device)
    params_bytes = num_params * bytes_per_parameter(dtype)
    kv_split = 1
    if device.platform != "cpu" and num_devices > 1:  # CPU "devices" share one host's RAM: whole sizes
        params_bytes //= num_devices
        kv_split = num_devices if mc.num_kv_heads % num_devices == 0 else 1
    batch, tokens = DEVICE_DEFAULTS["cpu" if device.platform == "cpu" else "gpu"]
    config = dataclasses.replace(config, max_batch_size=config.max_batch_size or batch,
                                 max_num_batched_tokens=config.max_num_batched_tokens or tokens)
    max_length = config.max_length or min(mc.max_position, DEFAULT_MAX_LENGTH)
    if max_length > mc.max_position:
        raise ValueError(f"--max-length={max_length} exceeds the model's context length {mc.max_position}")
    page_size = config.kv_cache_page_size
    if config.cache_strategy == "continuous":
        page_size = -(-max_length // 16) * 16
    pages_per_seq = -(-max_length // page_size)
    pages = config.kv_cache_pages
    if pages is None:
        per_page = page_bytes(mc, page_size, 4 if dtype == "float32" or device.platform == "cpu" else 2) // kv_split
        budget = _device_budget(device, config.device_memory_utilization, params_bytes)
        pages = min(budget // per_page, config.max_batch_size * pages_per_seq * 2) + 1
        if config.cache_strategy == "continuous":
            pages = config.max_batch_size + 1
    if pages - 1 < pages_per_seq:
        raise ValueError(f"--kv-cache-pages={pages} is too small: one --max-length={max_length} sequence "
                         f"needs {pages_per_seq} pages of {page_size} plus the reserved page 0")
    return dataclasses.replace(config, quantization_encoding=dtype, max_length=max_length,
                               kv_cache_page_size=page_size, kv_cache_pages=int(pages))
