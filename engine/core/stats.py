"""EngineStats: a snapshot of the engine's counters and gauges (the server exports them as metrics)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    running_requests: int = 0
    waiting_requests: int = 0
    kv_pages_used: int = 0            # pages referenced by live requests
    kv_pages_cached: int = 0          # pages holding a cached block with no live reference (evictable)
    kv_pages_free: int = 0            # pages neither used nor cached
    kv_pages_total: int = 0           # usable pages (the reserved null page excluded)
    prefix_cache_queried_tokens: int = 0   # cumulative: prompt tokens looked up
    prefix_cache_hit_tokens: int = 0       # cumulative: prompt tokens served from cache
    prefix_cache_evictions: int = 0        # cumulative: cached blocks evicted to make room
    preemptions: int = 0                   # cumulative
    step_failures: int = 0                 # cumulative: engine steps that raised (each failed its requests)
    num_compilations: int = 0              # cumulative: jitted step compilations
    num_step_shapes: int = 0               # the step shapes (buckets) warm-up compiles

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / q if q else 0.0
