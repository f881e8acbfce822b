"""The one attention entry point the model calls; the backend is chosen once from the engine config.

Backends: "reference" (jnp online softmax over the pages, the CPU default), "pallas" (our Pallas kernels;
on CPU they run in interpret mode), "auto" (pallas on GPU, reference elsewhere), listed and resolved by
kernels/backends.py.
"""
from __future__ import annotations

# Imported eagerly, not inside the traced call: importing Pallas registers JAX trace-context settings,
# so a first trace made before that import would be retraced (recompiled) on the next call.
from kernels import pallas_gpu
from kernels.reference import paged_attention_reference


def paged_attention(q_nhd, k_pool, v_pool, page_table, context_lens, query_start, *, scale,
                    backend: str = "reference", interpret: bool = False):
    """Causal attention of a step's ragged token batch over each sequence's KV pages (one layer). Shapes:
    see `kernels.reference.paged_attention_reference`; `backend` is a resolved name ('pallas' | 'reference')."""
    if backend == "reference":
        return paged_attention_reference(q_nhd, k_pool, v_pool, page_table, context_lens, query_start,
                                         scale=scale)
    if backend == "pallas":
        return pallas_gpu.ragged_paged_attention(q_nhd, k_pool, v_pool, page_table, context_lens, query_start,
                                                 scale=scale, interpret=interpret)
    raise ValueError(f"unknown resolved attention backend {backend!r}")
