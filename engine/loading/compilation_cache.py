"""The persistent XLA compilation cache: compiled step programs survive restarts."""
from __future__ import annotations

import os


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
