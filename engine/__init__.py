"""JAX/XLA LLM inference engine: paged KV cache, prefix caching, gRPC serving.

The public API for scripts and notebooks (scripts/ use only this; tests/test_architecture.py checks it):
`from engine import LLM, SamplingParams` (offline generation: `LLM.generate`, `stats`, `warmup`,
`prompt_token_ids`, `sampling_params`, `validate`), `load_tokenizer(model_path)` (a model's tokenizer without
its weights), `EngineStats` (what `LLM.stats()` returns) and `ENGINE_OPTIONS` (the engine's options as
(flag name, kind, help): the server's flags, which `LLM(**options)` takes in snake_case).
"""
from engine.core.sampling_params import SamplingParams
from engine.core.stats import EngineStats

__all__ = ["ENGINE_OPTIONS", "LLM", "EngineStats", "SamplingParams", "load_tokenizer"]


def __getattr__(name):
    # LLM pulls in JAX; import it lazily so `engine.core.block_manager` & co. stay JAX-free to import.
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    if name == "ENGINE_OPTIONS":  # absl is not needed to import engine.* either
        from engine.flags import ENGINE_FLAGS
        return ENGINE_FLAGS
    if name == "load_tokenizer":
        from engine.loading.model_files import load_tokenizer
        return load_tokenizer
    raise AttributeError(name)
