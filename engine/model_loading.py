"""Builds everything an engine needs from an EngineConfig: devices, model, tokenizer, the resolved config,
a KV pool sized to the device, block manager, scheduler and runner."""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.config import DEVICE_DEFAULTS, EngineConfig, ModelConfig
from engine.devices import describe, select_devices
from engine.gguf_loader import load_gguf, resolve_model_path
from engine.runner import Buckets, ModelRunner
from engine.scheduler import Scheduler
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 4096
MAX_PREFILL_ROWS = 8
# On CPU the "device memory" is the host's RAM, shared with everything else: cap the KV pool.
CPU_KV_BUDGET_BYTES = 2 << 30


@dataclass
class LoadedEngineParts:
    config: EngineConfig
    model_config: ModelConfig
    tokenizer: Tokenizer
    device_description: str
    block_manager: BlockManager
    scheduler: Scheduler
    runner: ModelRunner


def load_model(path: str, devices: list | None = None):
    """(ModelConfig, params, Tokenizer) from a GGUF file (numpy params) or an orbax checkpoint directory
    (restored straight onto its shards over `devices` when given, else numpy)."""
    if os.path.isdir(path):
        from engine.checkpoint import load_checkpoint, read_checkpoint_config
        from engine.sharding import Layout
        layout = Layout.build(read_checkpoint_config(path)[0], devices) if devices else None
        return load_checkpoint(path, layout.param_shardings() if layout else None)
    config, params, meta = load_gguf(path)
    return config, params, Tokenizer.from_gguf_metadata(meta, source=path)


def _page_bytes(mc: ModelConfig, page_size: int, itemsize: int) -> int:
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
        per_page = _page_bytes(mc, page_size, 4 if dtype == "float32" or device.platform == "cpu" else 2) // kv_split
        budget = _device_budget(device, config.device_memory_utilization, params_bytes)
        pages = min(budget // per_page, config.max_batch_size * pages_per_seq * 2) + 1
        if config.cache_strategy == "continuous":
            pages = config.max_batch_size + 1
    if pages - 1 < pages_per_seq:
        raise ValueError(f"--kv-cache-pages={pages} is too small: one --max-length={max_length} sequence "
                         f"needs {pages_per_seq} pages of {page_size} plus the reserved page 0")
    return dataclasses.replace(config, quantization_encoding=dtype, max_length=max_length,
                               kv_cache_page_size=page_size, kv_cache_pages=int(pages))


def enable_compilation_cache() -> None:
    """Persists compiled step programs across restarts (start-up compiles every bucket; a warm cache turns
    seconds per bucket into a fraction of one). JAX_COMPILATION_CACHE_DIR overrides the folder; an empty
    value turns the cache off."""
    import jax
    if jax.process_count() > 1:
        # Off in a multi-process group: a step program process 0 loaded from the cache while the followers
        # compiled it afresh computed garbage (SmolLM2 over 3 processes answered "Theure,,-France-ab----" with
        # a warm cache, "...is Paris." without; jax 0.12, gloo). Followers compile every bucket anyway (jax
        # writes the cache from process 0 only), so start-up takes about as long either way.
        jax.config.update("jax_enable_compilation_cache", False)
        return
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR",
                            os.path.join(os.path.expanduser("~"), ".cache", "jax-paged-engine", "xla"))
    if folder and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def load_engine_parts(config: EngineConfig) -> LoadedEngineParts:
    enable_compilation_cache()
    devices = select_devices(config.devices)
    path = resolve_model_path(config.model_path)
    # Several processes: each restores the checkpoint on its host and places only its own shards (placing
    # straight from orbax onto a mesh with other processes' devices would leave arrays no host can fuse).
    mc, params, tokenizer = load_model(path, devices if len({d.process_index for d in devices}) == 1 else None)
    num_params = sum(a.size for a in _leaves(params))
    resolved = agree_across_processes(resolve_config(dataclasses.replace(config, model_path=path), mc,
                                                     _local(devices), num_params, len(devices)))
    resolved = dataclasses.replace(resolved, devices=describe(devices))
    from kernels.paged_attention import resolve_backend
    backend = resolve_backend(config.attention_backend, devices[0].platform)
    page_size = resolved.kv_cache_page_size
    if backend == "pallas" and page_size & (page_size - 1):
        # The Triton lowering needs power-of-two tiles; the page is one tile of keys.
        if config.attention_backend == "pallas":
            raise ValueError(f"--kv-cache-page-size={page_size} is not allowed with --attention-backend=pallas; "
                             "it must be a power of two (16, 32, 64, 128, 256)")
        log.warning("page size %d is not a power of two: using the reference attention backend", page_size)
        backend = "reference"
    page_size, pages = resolved.kv_cache_page_size, resolved.kv_cache_pages
    block_manager = BlockManager(pages, page_size, resolved.enable_prefix_caching)
    scheduler = Scheduler(block_manager, max_batch_size=resolved.max_batch_size,
                          max_num_batched_tokens=resolved.max_num_batched_tokens, max_length=resolved.max_length,
                          max_prefill_seqs=MAX_PREFILL_ROWS, eos_token_ids=tokenizer.eos_token_ids,
                          # The engine gates admissions at --max-waiting-requests; preempted sequences
                          # re-enter the queue on top of that, hence the headroom.
                          max_waiting=resolved.max_waiting_requests + resolved.max_batch_size)
    buckets = Buckets.build(resolved.max_batch_size, resolved.max_num_batched_tokens,
                            -(-resolved.max_length // page_size))
    runner = ModelRunner(mc, params, dtype=resolved.quantization_encoding, devices=devices, page_size=page_size,
                         num_pages=pages, buckets=buckets, attention_backend=backend)
    log.info("model %s on %s: %s, %d KV pages of %d tokens, attention=%s", mc.name, resolved.devices,
             resolved.quantization_encoding, pages, page_size, backend)
    return LoadedEngineParts(resolved, mc, tokenizer, resolved.devices, block_manager, scheduler, runner)


def _local(devices: list):
    """The first of `devices` this process drives (whose memory it can read)."""
    import jax
    return next(d for d in devices if d.process_index == jax.process_index())


def agree_across_processes(config: EngineConfig) -> EngineConfig:
    """Several processes: the KV pool each sized from its own device must be one size everywhere (the step's
    shapes must match in every process), so all take the smallest. A collective: every process calls it at
    the same point of start-up."""
    import jax
    if jax.process_count() == 1:
        return config
    import numpy as np
    from jax.experimental import multihost_utils
    pages = multihost_utils.process_allgather(np.array([config.kv_cache_pages], np.int32))
    return dataclasses.replace(config, kv_cache_pages=int(np.min(pages)))


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree
