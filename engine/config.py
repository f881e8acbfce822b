"""Frozen configuration: ModelConfig (read from GGUF metadata) and EngineConfig (from flags / LLM kwargs).

Both are built once and passed down; nothing reads flags or globals after start-up.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kernels.backends import ATTENTION_BACKENDS

CACHE_STRATEGIES = ("paged", "continuous")
DTYPES = ("float32", "bfloat16", "q8_0")   # q8_0: int8 weights kept in memory (engine/device/quantization.py)
DEVICE_FORMS = "cpu, gpu, gpu:N[,M...], cpu:N[,M...]"


def parse_devices(spec: str) -> tuple[str, tuple[int, ...] | None]:
    """--devices ('cpu', 'gpu', 'gpu:0,1', 'cpu:0,1') -> (kind, ids or None for the first device of that kind);
    ValueError naming the value and the allowed forms. Device ids are checked against what JAX sees later."""
    kind, colon, ids = spec.partition(":")
    parts = ids.split(",") if colon else []
    if kind not in ("cpu", "gpu") or not all(p.isdigit() for p in parts):
        raise ValueError(f"--devices={spec!r} is not allowed; use one of {DEVICE_FORMS}")
    return kind, tuple(int(p) for p in parts) if colon else None


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency scaling ("llama3" rope type)."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    # Per-frequency divisors from a GGUF `rope_freqs` tensor (Llama 3.1); empty when absent.
    rope_freq_factors: tuple[float, ...] = ()
    rope_scaling: RopeScaling | None = None


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"--{name}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


# --max-batch-size / --max-num-batched-tokens when unset: a GPU has the compute to batch far more rows and
# tokens per step than 2 CPU cores, where a step's time grows with its tokens (README: figures).
DEVICE_DEFAULTS = {"cpu": (32, 512), "gpu": (256, 8192)}


@dataclass(frozen=True)
class EngineConfig:
    """Engine options; field names are the server flags in snake_case (DESIGN.md § Contracts)."""
    model_path: str | None = None
    devices: str | None = None               # None: first GPU, else CPU
    cache_strategy: str = "paged"
    enable_prefix_caching: bool = False
    kv_cache_page_size: int = 128
    quantization_encoding: str | None = None  # None: float32 on CPU, bfloat16 on GPU
    max_batch_size: int | None = None        # None: DEVICE_DEFAULTS for the device
    max_length: int | None = None            # None: min(model context, 4096)
    max_num_batched_tokens: int | None = None  # None: DEVICE_DEFAULTS for the device
    kv_cache_pages: int | None = None        # None: sized from device_memory_utilization
    device_memory_utilization: float = 0.9
    attention_backend: str = "auto"
    max_waiting_requests: int = 1024
    seed: int = 0
    async_scheduling: bool = True            # schedule step N+1 while step N runs (engine.core.engine.LLMEngine._step)
    # Per-request limits (engine/core/request_checks.py): one client must not make work for everyone.
    max_stop_strings: int = 16
    max_stop_string_length: int = 256        # characters
    max_prompt_bytes: int | None = None      # UTF-8 bytes of a prompt's text; None: 32 per --max-length token

    def __post_init__(self):
        _choice("cache-strategy", self.cache_strategy, CACHE_STRATEGIES)
        _choice("attention-backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.devices:
            parse_devices(self.devices)
        if self.quantization_encoding is not None:
            _choice("quantization-encoding", self.quantization_encoding, DTYPES)
        if self.kv_cache_page_size < 16 or self.kv_cache_page_size % 16:
            raise ValueError(f"--kv-cache-page-size={self.kv_cache_page_size} is not allowed; "
                             "it must be a positive multiple of 16 (e.g. 16, 64, 128, 256)")
        if self.enable_prefix_caching and self.cache_strategy != "paged":
            raise ValueError(f"--enable-prefix-caching needs --cache-strategy=paged, "
                             f"got --cache-strategy={self.cache_strategy!r}")
        for name in ("max_batch_size", "max_num_batched_tokens", "max_waiting_requests", "max_stop_strings",
                     "max_stop_string_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} is not allowed; it must be >= 1")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"--max-length={self.max_length} is not allowed; it must be >= 2")
        if self.kv_cache_pages is not None and self.kv_cache_pages < 2:
            raise ValueError(f"--kv-cache-pages={self.kv_cache_pages} is not allowed; it must be >= 2 "
                             "(page 0 is reserved)")
        if self.max_prompt_bytes is not None and self.max_prompt_bytes < 1:
            raise ValueError(f"--max-prompt-bytes={self.max_prompt_bytes} is not allowed; it must be >= 1 "
                             "(unset: 32 bytes per --max-length token)")
        if not 0.0 < self.device_memory_utilization <= 1.0:
            raise ValueError(f"--device-memory-utilization={self.device_memory_utilization} is not allowed; "
                             "it must be in (0, 1]")

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)
