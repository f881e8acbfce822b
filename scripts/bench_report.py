"""Benchmark figures: per-run summary (the JSON contract of DESIGN.md), markdown tables, and the PNG.

A run's keys: `ttft_ms`, `tpot_ms`, `itl_ms`, `e2e_ms` (each {mean, p50, p90, p99}, or None with no
samples), `request_throughput` (req/s), `output_token_throughput` (tok/s), `prefix_cache_hit_rate`,
`num_requests`, `workload`, `prefix_caching`; plus `failed`, `completed`, `duration_s`, token totals,
`cached_prompt_token_ratio` (from the replies' usage), the workload's parameters and the raw samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestResult:
    """One request's timings (seconds, time.perf_counter) as the client saw them."""
    ok: bool
    prompt_len: int
    output_len: int = 0
    cached_prompt_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)
    error: str = ""


def stats_ms(seconds: list[float]) -> dict[str, float] | None:
    """{mean, p50, p90, p99} in milliseconds; None when there is nothing to summarize."""
    if not seconds:
        return None
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def hit_rate(before: dict | None, after: dict | None) -> float | None:
    """Hit / queried prompt tokens over the run, from the server's counters (None without /metrics)."""
    if before is None or after is None:
        return None
    queried = after["engine_prefix_cache_queried_tokens_total"] - before["engine_prefix_cache_queried_tokens_total"]
    hit = after["engine_prefix_cache_hit_tokens_total"] - before["engine_prefix_cache_hit_tokens_total"]
    return hit / queried if queried > 0 else 0.0


def summarize(results: list[RequestResult], duration: float, workload: str, prefix_caching: bool,
              counters: tuple[dict | None, dict | None]) -> dict:
    """The run's JSON record from its requests (failed ones count, but add no latency samples)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    prompt_tokens = sum(r.prompt_len for r in ok)
    # TPOT: decode time per token after the first, per request (vLLM's definition).
    tpots = [(r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    rate = hit_rate(*counters)
    return {
        "workload": workload, "prefix_caching": prefix_caching, "num_requests": len(results),
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "ttft_ms": stats_ms([r.ttft for r in ok]), "tpot_ms": stats_ms(tpots),
        "itl_ms": stats_ms([x for r in ok for x in r.itls]), "e2e_ms": stats_ms([r.e2e for r in ok]),
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_token_throughput": out_tokens / duration if duration > 0 else 0.0,
        "prefix_cache_hit_rate": rate,
        "cached_prompt_token_ratio": (sum(r.cached_prompt_tokens for r in ok) / prompt_tokens
                                      if prompt_tokens else 0.0),
        "total_prompt_tokens": prompt_tokens, "total_output_tokens": out_tokens,
        "errors": sorted({r.error for r in results if not r.ok})[:10],
        "samples": {"ttft_ms": [r.ttft * 1e3 for r in ok], "e2e_ms": [r.e2e * 1e3 for r in ok]},
    }


def _caching(on: bool | None) -> str:
    """Prefix caching on / off, or "?" for a server that does not say (another OpenAI-compatible server)."""
    return "?" if on is None else ("on" if on else "off")


def _fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _stat(run: dict, key: str, stat: str) -> float | None:
    return (run.get(key) or {}).get(stat)


_COLUMNS = (  # (header, value of a run)
    ("workload", lambda r: r["workload"]),
    ("caching", lambda r: _caching(r["prefix_caching"])),
    ("reqs", lambda r: str(r["num_requests"])), ("failed", lambda r: str(r["failed"])),
    ("TTFT mean", lambda r: _fmt(_stat(r, "ttft_ms", "mean"))),
    ("TTFT p50", lambda r: _fmt(_stat(r, "ttft_ms", "p50"))),
    ("TTFT p99", lambda r: _fmt(_stat(r, "ttft_ms", "p99"))),
    ("TPOT mean", lambda r: _fmt(_stat(r, "tpot_ms", "mean"))),
    ("ITL p50", lambda r: _fmt(_stat(r, "itl_ms", "p50"))),
    ("E2E mean", lambda r: _fmt(_stat(r, "e2e_ms", "mean"))),
    ("E2E p99", lambda r: _fmt(_stat(r, "e2e_ms", "p99"))),
    ("req/s", lambda r: _fmt(r["request_throughput"], 2)),
    ("out tok/s", lambda r: _fmt(r["output_token_throughput"], 1)),
    ("hit rate", lambda r: _fmt(r["prefix_cache_hit_rate"], 3)),
)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown_table(runs: list[dict]) -> str:
    """One row per run; latencies in ms."""
    return _table([h for h, _ in _COLUMNS], [[f(r) for _, f in _COLUMNS] for r in runs])


_RATIOS = (("TTFT mean", "ttft_ms", "mean"), ("TTFT p99", "ttft_ms", "p99"), ("TPOT mean", "tpot_ms", "mean"),
           ("E2E mean", "e2e_ms", "mean"), ("req/s", "request_throughput", None),
           ("out tok/s", "output_token_throughput", None))


def _value(run: dict, key: str, stat: str | None) -> float | None:
    return run.get(key) if stat is None else _stat(run, key, stat)


def compare(off: dict, on: dict) -> dict:
    """on/off ratios of the headline figures (< 1 is better for latencies, > 1 for throughputs)."""
    ratios = {}
    for label, key, stat in _RATIOS:
        a, b = _value(off, key, stat), _value(on, key, stat)
        ratios[label] = b / a if a and b is not None else None
    return {"workload": on["workload"], "on_over_off": ratios,
            "hit_rate_on": on["prefix_cache_hit_rate"], "hit_rate_off": off["prefix_cache_hit_rate"]}


def comparison_table(off_runs: list[dict], on_runs: list[dict]) -> str:
    """Side by side: each figure off, on and on/off, one row per workload and figure."""
    rows = []
    for off, on in zip(off_runs, on_runs):
        for label, key, stat in _RATIOS:
            a, b = _value(off, key, stat), _value(on, key, stat)
            ratio = f"{b / a:.2f}x" if a and b is not None else "-"
            digits = 2 if key == "request_throughput" else 1
            rows.append([on["workload"], label, _fmt(a, digits), _fmt(b, digits), ratio])
        rows.append([on["workload"], "hit rate", _fmt(off["prefix_cache_hit_rate"], 3),
                     _fmt(on["prefix_cache_hit_rate"], 3), "-"])
    return _table(["workload", "figure", "caching off", "caching on", "on/off"], rows)


def plot(runs: list[dict], path: str) -> None:
    """TTFT distributions (empirical CDFs: a colour per workload, solid = caching on, dashed = off) and
    output-token throughput bars grouped by workload (grey = caching off, green = on)."""
    import matplotlib
    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt
    workloads = list(dict.fromkeys(r["workload"] for r in runs))
    fig, (ax_cdf, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        ttft, on = np.sort(run["samples"]["ttft_ms"]), run["prefix_caching"]
        if len(ttft):
            ax_cdf.step(ttft, np.arange(1, len(ttft) + 1) / len(ttft), where="post",
                        color=f"C{workloads.index(run['workload'])}", linestyle="--" if on is False else "-",
                        label=f"{run['workload']} ({_caching(on)})")
    ax_cdf.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT distribution, prefix caching on vs off")
    ax_cdf.legend(fontsize=8)
    for on, offset, color in ((False, -0.2, "tab:gray"), (True, 0.2, "tab:green"), (None, 0.0, "tab:blue")):
        xs = [workloads.index(r["workload"]) + offset for r in runs if r["prefix_caching"] is on]
        ys = [r["output_token_throughput"] for r in runs if r["prefix_caching"] is on]
        if xs:
            ax_bar.bar(xs, ys, width=0.4, color=color, label=f"caching {_caching(on)}")
    ax_bar.set_xticks(range(len(workloads)), workloads, fontsize=8)
    ax_bar.set(ylabel="output tokens / s", title="Output token throughput")
    ax_bar.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
