"""Prometheus metrics for one server (names fixed by DESIGN.md § Contracts).

Everything lives in a per-server CollectorRegistry, so several servers (e.g. in tests) never share
state. Per-request metrics (finish reasons, TTFT, inter-token latency) are observed by the servicer as
it streams; engine-wide gauges and cumulative counters are read from `engine.stats()` at scrape time by
a custom collector, so they can never drift from the engine's own bookkeeping.
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.core.request import FinishReason
from engine.core.stats import EngineStats

# Seconds; TTFT spans queueing + prefill, so it reaches further than the inter-token buckets.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class EngineStatsCollector(Collector):
    """Turns one `EngineStats` snapshot per scrape into the engine-wide gauges and counters."""

    def __init__(self, get_stats: Callable[[], EngineStats | None]):
        self._get_stats = get_stats

    def collect(self):
        # Before the engine is attached (warming up), report zeros so every series exists from the start.
        s = self._get_stats() or EngineStats()
        gauges = (("engine_running_requests", "Requests being generated.", s.running_requests),
                  ("engine_waiting_requests", "Requests queued for admission.", s.waiting_requests),
                  ("engine_kv_pages_used", "KV pages referenced by live requests.", s.kv_pages_used),
                  ("engine_kv_pages_total", "Usable KV pages in the pool.", s.kv_pages_total))
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = (
            ("engine_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.",
             s.prefix_cache_queried_tokens),
            ("engine_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
             s.prefix_cache_hit_tokens),
            ("engine_prefix_cache_evictions", "Cached blocks evicted to make room.", s.prefix_cache_evictions),
            ("engine_preemptions", "Running requests preempted for lack of KV pages.", s.preemptions),
            ("engine_step_failures", "Engine steps that raised (each fails the requests in flight).",
             s.step_failures))
        for name, doc, value in counters:
            # CounterMetricFamily appends the `_total` suffix in the exposition.
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    """The server's metrics registry plus helpers the servicer calls while streaming."""

    def __init__(self, get_stats: Callable[[], EngineStats | None]):
        self.registry = CollectorRegistry()
        self.requests = Counter("engine_requests", "Finished requests by finish reason.", ["finish_reason"],
                                registry=self.registry)
        for reason in FinishReason:  # pre-create the labels so dashboards see zeros, not gaps
            self.requests.labels(finish_reason=reason.value)
        self.ttft = Histogram("engine_time_to_first_token_seconds", "Arrival to first streamed token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("engine_inter_token_latency_seconds", "Time between consecutive streamed tokens.",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.registry.register(EngineStatsCollector(get_stats))
        self._http = None

    def start_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Serves /metrics on `port` (0 picks a free one); returns the bound port. Raises OSError."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_address[1]

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def tracker(self) -> "RequestTimer":
        return RequestTimer(self)


class RequestTimer:
    """Times one request's stream: TTFT at its first tokens, then the gap per token after that."""

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics
        self._start = time.perf_counter()
        self._last: float | None = None

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = time.perf_counter()
        if self._last is None:
            self._metrics.ttft.observe(now - self._start)
        else:
            # Several tokens in one message share the gap since the previous message evenly.
            gap = (now - self._last) / num_tokens
            for _ in range(num_tokens):
                self._metrics.itl.observe(gap)
        self._last = now

    def on_finish(self, reason: FinishReason) -> None:
        self._metrics.requests.labels(finish_reason=reason.value).inc()
