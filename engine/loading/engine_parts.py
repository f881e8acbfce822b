"""Wires an engine's parts from an EngineConfig: devices, model, tokenizer, the resolved config, the attention
backend, block manager, scheduler and runner."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from engine.core.block_manager import BlockManager
from engine.loading.compilation_cache import enable_compilation_cache
from engine.config import EngineConfig, ModelConfig
from engine.loading.config_resolution import resolve_config
from engine.device.devices import describe, select_devices
from engine.loading.gguf_loader import resolve_model_path
from engine.loading.model_files import load_model
from engine.loading.weights import num_parameters
from engine.device.runner import Buckets, ModelRunner
from engine.core.scheduler import Scheduler
from engine.loading.tokenizer import Tokenizer
from kernels.backends import resolve_backend

log = logging.getLogger(__name__)

MAX_PREFILL_ROWS = 8


@dataclass
class LoadedEngineParts:
    config: EngineConfig
    model_config: ModelConfig
    tokenizer: Tokenizer
    device_description: str
    block_manager: BlockManager
    scheduler: Scheduler
    runner: ModelRunner


def load_engine_parts(config: EngineConfig) -> LoadedEngineParts:
    enable_compilation_cache()
    devices = select_devices(config.devices)
    path = resolve_model_path(config.model_path)
    # Each process reads only the shards its devices hold: a GGUF by region when the runner places it, a
    # checkpoint by orbax restoring this process's addressable shards of the mesh.
    mc, params, tokenizer = load_model(path, devices)
    num_params = num_parameters(mc)
    resolved = agree_across_processes(resolve_config(dataclasses.replace(config, model_path=path), mc,
                                                     _local(devices), num_params, len(devices)))
    resolved = dataclasses.replace(resolved, devices=describe(devices))
    backend = resolve_backend(config.attention_backend, devices[0].platform)
    page_size = resolved.kv_cache_page_size
    if backend == "pallas" and page_size & (page_size - 1):
        # The Triton lowering needs power-of-two tiles; the page is one tile of keys.
        if config.attention_backend == "pallas":
            raise ValueError(f"--kv-cache-page-size={page_size} is not allowed with --attention-backend=pallas; "
                             "it must be a power of two (16, 32, 64, 128, 256)")
        log.warning("page size %d is not a power of two: using the reference attention backend", page_size)
        backend = "reference"
    pages = resolved.kv_cache_pages
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
    processes = len({d.process_index for d in devices})
    description = resolved.devices + (f" over {processes} processes" if processes > 1 else "")
    return LoadedEngineParts(resolved, mc, tokenizer, description, block_manager, scheduler, runner)


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
