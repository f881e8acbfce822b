"""JAX/XLA LLM inference engine: paged KV cache, prefix caching, gRPC serving.

Offline use: `from engine import LLM, SamplingParams`.
"""
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    # LLM pulls in JAX; import it lazily so `engine.block_manager` & co. stay JAX-free to import.
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    raise AttributeError(name)
