"""scripts/bench_engine.py's long-context row times what it says: engine steps of 16 decodes and no prefill.

The row's workload on a tiny model with the bench's own engine options; the scheduler's outputs are recorded
(the script itself sees only the public API) and every timed interval's two steps are checked."""
from __future__ import annotations

import numpy as np

from engine import LLM, SamplingParams
from scripts import bench_engine
from tests.tiny_model import TinySpec


def test_long_context_row_times_only_pure_decode_steps(tiny_gguf_factory, monkeypatch):
    path = tiny_gguf_factory(TinySpec(context=4096))
    llm = LLM(path, enable_prefix_caching=True, **bench_engine.ENGINE_OPTS)
    prompts = [bench_engine.rand_ids(np.random.default_rng(0), n, high=256) for n in bench_engine.LONG_CONTEXTS]
    llm.generate(prompts, SamplingParams(max_tokens=1))      # the row's prefill: the prompts are cached now

    scheduler = llm.engine.scheduler
    outputs = []
    schedule = scheduler.schedule
    monkeypatch.setattr(scheduler, "schedule", lambda: outputs.append(schedule()) or outputs[-1])
    window = bench_engine.cached_decode_steps(llm, prompts, steps=8)

    assert len(window.step_seconds) == len(window.steps) == 8
    step = {j: outputs[j - 1] for j in range(1, len(outputs) + 1)}     # schedule() runs once per step
    for j in window.steps:      # the interval ending at step j's launch waits for step j-1's tokens
        for k in (j - 1, j):
            assert not step[k].prefills and len(step[k].decodes) == 16, (j, k)
    # The steps left out did prefill (the tails past each prompt's last full page, and the fully cached
    # prompts' last token), and decodes of the first prompts ran beside those chunks: timing from the
    # first step would have mixed them in.
    assert step[1].prefills
    assert any(step[k].prefills and step[k].decodes for k in range(1, window.steps.start - 1))
