"""Engine faults on the tiny model with prefix caching on (issue 13): a runner made to fail at chosen steps
(wrapping only `runner.execute(scheduler_output)` and `runner.recover()`), failing admissions, late aborts,
adds after shutdown. Every failure is reported (RequestOutput.error), nothing leaks, and no cached block
survives a failed step.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.core.engine_faults import MAX_CONSECUTIVE_FAILURES
from engine.core.request import EngineUnavailableError, ErrorCode, FinishReason, Request

OPTS = dict(max_batch_size=8, max_num_batched_tokens=64, max_length=256, kv_cache_page_size=16,
            kv_cache_pages=128)
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


class Faults:
    """Makes `runner.execute` raise on chosen calls (1-based) and `runner.recover` raise or claim that it
    replaced the KV pages (as after a real failed, donated step). Only those two methods are touched."""

    def __init__(self, monkeypatch, runner, fail_on=(), recover_raises=False, pages_replaced=True):
        self.calls, self.fail_on = 0, set(fail_on)
        self.recoveries = 0
        execute, recover = runner.execute, runner.recover

        def failing_execute(scheduler_output):
            self.calls += 1
            if self.calls in self.fail_on:
                raise RuntimeError(f"injected fault in execute call {self.calls}")
            return execute(scheduler_output)

        def watched_recover():
            self.recoveries += 1
            if recover_raises:
                raise RuntimeError("injected fault in recover")
            return recover() or pages_replaced

        monkeypatch.setattr(runner, "execute", failing_execute)
        monkeypatch.setattr(runner, "recover", watched_recover)


def prompts(n, seed, lo=34, hi=60):
    rng = np.random.default_rng(seed)
    return [tuple(int(t) for t in rng.integers(3, 300, rng.integers(lo, hi))) for _ in range(n)]


def collect(stream, timeout=120.0):
    """Every output of a stream up to its last one (bounded wait: a hang fails instead of blocking)."""
    outs = [stream.get(timeout=timeout)]
    while outs[-1].finish_reason is None:
        outs.append(stream.get(timeout=timeout))
    return outs


def run_offline(engine: LLMEngine, requests: list[Request], max_steps=500):
    """Steps the engine in this thread until every request has its last output; step errors are counted."""
    streams = [engine.add_request(r) for r in requests]
    outs, errors = {r.request_id: [] for r in requests}, 0
    for _ in range(max_steps):
        if all(o and o[-1].finish_reason is not None for o in outs.values()):
            break
        try:
            engine.step()
        except RuntimeError:
            errors += 1
        for r, s in zip(requests, streams):
            outs[r.request_id] += s.drain()
    return outs, errors


def tokens(outs):
    return tuple(t for o in outs for t in o.new_token_ids)


@pytest.fixture(scope="module")
def oracle(tiny_gguf):
    """Caching off, one request at a time: the outputs every faulted run must reproduce."""
    llm = LLM(tiny_gguf, **OPTS)
    return lambda p, sp=GREEDY: llm.generate(list(p), sp)[0].token_ids


@pytest.fixture
def engine(tiny_gguf):
    eng = LLMEngine(EngineConfig(model_path=tiny_gguf, enable_prefix_caching=True, **OPTS))
    yield eng
    eng.shutdown(timeout=10)


def test_a_failed_step_leaves_no_cached_block_behind(engine, monkeypatch, oracle):
    """Defect 1: the failed request held registered blocks; after recovery (fresh, zeroed KV pages) a request
    with the same prefix must recompute it, not 'hit' lost pages."""
    faults = Faults(monkeypatch, engine.runner, fail_on={2})  # B's prefill runs, its first decode fails
    engine.start()
    prompt = prompts(1, seed=0)[0]
    failed = collect(engine.add_request(Request("B", prompt, GREEDY)))
    again = collect(engine.add_request(Request("C", prompt, GREEDY)))
    assert again[-1].cached_prompt_tokens == 0 and again[-1].error is None
    assert tokens(again) == oracle(prompt)
    assert failed[-1].finish_reason is FinishReason.ABORT and failed[-1].error.code is ErrorCode.INTERNAL
    assert "injected fault in execute call 2" in failed[-1].error.message and faults.recoveries == 1
    stats = engine.stats()
    assert stats.step_failures == 1 and stats.prefix_cache_hit_tokens == 0 and stats.kv_pages_used == 0


def test_after_failures_greedy_outputs_equal_caching_off(engine, monkeypatch, oracle):
    """Shared prefixes, several requests in flight, two failed steps: every failed request says so, every
    other one (and every retry) gets exactly the caching-off tokens, and no page leaks."""
    Faults(monkeypatch, engine.runner, fail_on={3, 9})   # round 1's 3rd call, round 2's 6th
    shared = prompts(1, seed=1, lo=40, hi=41)[0]
    ps = [shared + p for p in prompts(6, seed=2, lo=3, hi=20)]
    short = SamplingParams(max_tokens=2, ignore_eos=True)
    sps = [short] * 3 + [GREEDY] * 3
    first, errors = run_offline(engine, [Request(f"a{i}", p, GREEDY) for i, p in enumerate(ps[:3])])
    assert errors == 1 and all(o[-1].error.code is ErrorCode.INTERNAL for o in first.values())
    second, errors = run_offline(engine, [Request(f"b{i}", p, sp) for i, (p, sp) in enumerate(zip(ps, sps))])
    failed = {rid for rid, o in second.items() if o[-1].error is not None}
    assert errors == 1 and 0 < len(failed) < len(ps), failed
    assert all(second[r][-1].error.code is ErrorCode.INTERNAL and second[r][-1].finish_reason is FinishReason.ABORT
               for r in failed)
    for i, (p, sp) in enumerate(zip(ps, sps)):
        if f"b{i}" not in failed:
            assert tokens(second[f"b{i}"]) == oracle(p, sp)
    retried, errors = run_offline(engine, [Request(f"c{i}", p, GREEDY) for i, p in enumerate(ps)])
    assert errors == 0 and [tokens(retried[f"c{i}"]) for i in range(len(ps))] == [oracle(p) for p in ps]
    assert engine.stats().prefix_cache_hit_tokens > 0   # the cache works again after the recoveries
    assert engine.stats().kv_pages_used == 0 and not engine.has_unfinished()


def test_recovery_that_raises_stops_the_engine_loudly(engine, monkeypatch):
    """Defect 3: the loop cannot continue: the stream ends UNAVAILABLE (not a hang), new requests are refused,
    `failure` says why, and the pages still go back."""
    Faults(monkeypatch, engine.runner, fail_on={1}, recover_raises=True)
    engine.start()
    prompt = prompts(1, seed=3)[0]
    last = collect(engine.add_request(Request("x", prompt, GREEDY)), timeout=60)[-1]
    assert last.finish_reason is FinishReason.ABORT and last.error.code is ErrorCode.UNAVAILABLE
    assert "injected fault in recover" in engine.wait_until_stopped(timeout=10)
    assert "injected fault in recover" in engine.failure
    with pytest.raises(EngineUnavailableError, match="injected fault in recover"):
        engine.add_request(Request("y", prompt, GREEDY))
    assert engine.block_manager.num_used_pages == 0


def test_steps_that_keep_failing_stop_the_engine(engine, monkeypatch):
    Faults(monkeypatch, engine.runner, fail_on=range(1, 100))
    engine.start()
    for i in range(MAX_CONSECUTIVE_FAILURES):
        last = collect(engine.add_request(Request(f"f{i}", prompts(1, seed=4)[0], GREEDY)))[-1]
        assert last.error is not None
    assert f"{MAX_CONSECUTIVE_FAILURES} steps failed in a row" in engine.wait_until_stopped(timeout=10)
    assert last.error.code is ErrorCode.UNAVAILABLE   # the last one ended with the engine
    with pytest.raises(EngineUnavailableError):
        engine.add_request(Request("after", prompts(1, seed=4)[0], GREEDY))


def test_a_late_abort_never_reaches_a_newer_request_with_the_same_id(engine):
    """Defect 4: the abort was issued for a request that has finished; the next one reusing the id runs."""
    p = prompts(1, seed=5)[0]
    first, _ = run_offline(engine, [Request("same", p, SamplingParams(max_tokens=2, ignore_eos=True))])
    assert first["same"][-1].finish_reason is FinishReason.LENGTH
    engine.abort("same")    # late: its request already finished
    second, _ = run_offline(engine, [Request("same", p, GREEDY)])
    assert second["same"][-1].finish_reason is FinishReason.LENGTH and len(tokens(second["same"])) == 8


def test_an_abort_bound_to_a_stream_spares_another_request_with_the_id(engine):
    p = prompts(1, seed=6)[0]
    old = engine.add_request(Request("id", p, SamplingParams(max_tokens=1)))
    run_offline(engine, [])  # nothing new: just finish what is there
    while not old.finished:
        engine.step()
        old.drain()
    new = engine.add_request(Request("id", p, GREEDY))
    engine.abort("id", old)                       # the old call's cancel, arriving late
    outs, _ = run_offline(engine, [])
    while not new.finished:
        engine.step()
        outs.setdefault("id", []).extend(new.drain())
    assert outs["id"][-1].finish_reason is FinishReason.LENGTH and len(tokens(outs["id"])) == 8


def test_an_abort_before_admission_ends_the_request_at_once(engine):
    stream = engine.add_request(Request("early", prompts(1, seed=7)[0], GREEDY))
    engine.abort("early")
    last = stream.drain()[-1]
    assert last.finish_reason is FinishReason.ABORT and last.error is None and last.new_token_ids == ()
    assert not engine.has_unfinished() and engine.step() == 0


def test_one_failing_admission_fails_only_its_request(engine, monkeypatch):
    """Defect 5: admitting 'b' raises part-way through the inbox: 'a' and 'c' still run to the end, 'b' ends
    INTERNAL, no id stays pending, and 'b' can be sent again."""
    add = engine.scheduler.add

    def add_failing_for_b(seq):
        if seq.request_id == "b":
            raise RuntimeError("injected admission fault")
        add(seq)
    monkeypatch.setattr(engine.scheduler, "add", add_failing_for_b)
    ps = prompts(3, seed=8)
    outs, errors = run_offline(engine, [Request(rid, p, GREEDY) for rid, p in zip("abc", ps)])
    assert errors == 0 and not engine.has_unfinished()
    assert [outs[r][-1].finish_reason for r in "ac"] == [FinishReason.LENGTH] * 2
    assert outs["b"][-1].error.code is ErrorCode.INTERNAL and "injected admission fault" in outs["b"][-1].error.message
    monkeypatch.setattr(engine.scheduler, "add", add)
    again, _ = run_offline(engine, [Request("b", ps[1], GREEDY)])
    assert again["b"][-1].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("loop", [False, True])
def test_adds_after_shutdown_are_refused(engine, loop):
    """Defect 6: a request added after shutdown would never run: it is refused (UNAVAILABLE)."""
    if loop:
        engine.start()
    engine.shutdown(timeout=10)
    with pytest.raises(EngineUnavailableError, match="shutting down"):
        engine.add_request(Request("late", prompts(1, seed=9)[0], GREEDY))
    assert not engine.has_unfinished()


def test_offline_step_failure_fails_its_requests_and_generate_raises(tiny_gguf, monkeypatch, oracle):
    """Offline, the failing step raises to the caller; the engine has already failed and freed the
    requests, so the next generate runs cleanly."""
    llm = LLM(tiny_gguf, enable_prefix_caching=True, **OPTS)
    Faults(monkeypatch, llm.engine.runner, fail_on={2})
    p = prompts(1, seed=10)[0]
    with pytest.raises(RuntimeError, match="injected fault in execute call 2"):
        llm.generate(list(p), GREEDY)
    assert llm.engine.stats().kv_pages_used == 0 and not llm.engine.has_unfinished()
    assert llm.generate(list(p), GREEDY)[0].token_ids == oracle(p)


def test_shutdown_of_a_stuck_loop_ends_streams_within_the_timeout(engine, monkeypatch):
    """A step that never returns: shutdown still returns within its timeout and no client waits forever."""
    entered, release = threading.Event(), threading.Event()
    execute = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda out: (entered.set(), release.wait(), execute(out))[2])
    engine.start()
    stream = engine.add_request(Request("stuck", prompts(1, seed=11)[0], GREEDY))
    assert entered.wait(timeout=60)
    engine.shutdown(timeout=0.5)
    last = collect(stream, timeout=5)[-1]
    assert last.finish_reason is FinishReason.ABORT and last.error.code is ErrorCode.UNAVAILABLE
    release.set()
