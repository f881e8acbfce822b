"""The persistent XLA compilation cache: compiled step programs survive restarts."""
from __future__ import annotations

import os


def enable_compilation_cache() -> None:
    """Persists compiled step programs across restarts (start-up compiles every bucket; a warm cache turns
    seconds per bucket into a fraction of one). JAX_COMPILATION_CACHE_DIR overrides the folder; an empty
    value turns the cache off."""
    import jax
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR",
                            os.path.join(os.path.expanduser("~"), ".cache", "jax-paged-engine", "xla"))
    if folder and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
