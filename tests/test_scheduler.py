"""Scheduler driven by fake sampled tokens (no model): batching, chunking, FCFS, preemption, finishing."""
import itertools
import random

import pytest

from engine.core.block_manager import BlockManager
from engine.core.request import FinishReason, QueueFullError, Request
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler import PrefillChunk, Scheduler
from engine.core.sequence import Sequence, SequenceStatus

EOS, PS = 99, 4
_ids = itertools.count()


def make_scheduler(num_pages=17, caching=False, **options):
    bm = BlockManager(num_pages, PS, enable_prefix_caching=caching)
    defaults = dict(max_batch_size=8, max_num_batched_tokens=64, max_length=64, eos_token_ids=frozenset({EOS}))
    return Scheduler(bm, **{**defaults, **options})


def add(sched, prompt_len, start=0, tokens=None, **sampling):
    tokens = tuple(range(start, start + prompt_len)) if tokens is None else tuple(tokens)
    seq = Sequence(Request(f"r{next(_ids)}", tokens, SamplingParams(**{"max_tokens": 50, **sampling})))
    sched.add(seq)
    return seq


def update(sched, out, sampled):
    """Books a step whose tokens are known: advance, then complete (what the engine does one step apart)."""
    return sched.complete(out, sched.advance(out), sampled)


def step(sched, token=7):
    """schedule(), then pretend the runner sampled `token` for every row that samples."""
    out = sched.schedule()
    sampled = {s.request_id: token for s in out.decodes}
    sampled |= {c.seq.request_id: token for c in out.prefills if c.samples}
    return out, update(sched, out, sampled)


def chunks(out):
    return [(c.seq, c.start, c.num_tokens) for c in out.prefills]


def test_continuous_batching_mixes_decodes_and_admissions():
    sched = make_scheduler()
    a = add(sched, 6)
    out, _ = step(sched)
    assert chunks(out) == [(a, 0, 6)] and out.decodes == () and a.token_ids[-1] == 7
    b = add(sched, 5, start=50)
    out, _ = step(sched, token=8)
    assert out.decodes == (a,) and chunks(out) == [(b, 0, 5)]
    assert a.num_computed_tokens == 7 and a.output_token_ids == [7, 8] and b.output_token_ids == [8]
    out, _ = step(sched)
    assert out.decodes == (a, b) and out.prefills == ()
    assert (sched.num_running, sched.num_waiting) == (2, 0)


def test_chunked_prefill_under_the_budget_keeps_decodes_flowing():
    sched = make_scheduler(max_num_batched_tokens=8)
    a = add(sched, 3)
    step(sched)
    b = add(sched, 20, start=100)
    expected = [(0, 7), (7, 7), (14, 6)]              # 8 tokens a step, one of them a's decode
    for start, n in expected:
        out, _ = step(sched)
        assert out.decodes == (a,) and chunks(out) == [(b, start, n)] and out.num_batched_tokens <= 8
    assert b.num_computed_tokens == 20 and b.output_token_ids == [7] and a.num_output_tokens == 4
    out, _ = step(sched)
    assert out.decodes == (a, b)


def test_running_prefills_go_before_new_admissions():
    sched = make_scheduler(max_num_batched_tokens=10)
    a = add(sched, 25)
    out, _ = step(sched)
    b = add(sched, 4, start=100)
    out, _ = step(sched)
    assert chunks(out) == [(a, 10, 10)] and b.status is SequenceStatus.WAITING
    out, _ = step(sched)
    assert chunks(out) == [(a, 20, 5), (b, 0, 4)]


def test_admission_is_fcfs_the_head_blocks_smaller_requests():
    sched = make_scheduler(num_pages=5, caching=True)   # 4 usable pages
    add(sched, 8)                                     # 2 pages
    b = add(sched, 12, start=100)                     # 3 pages: does not fit next to a
    c = add(sched, 4, start=200)                      # 1 page: would fit, but b is first
    for _ in range(2):
        out, _ = step(sched)
        assert chunks(out)[1:] == [] and list(sched.waiting) == [b, c]
    assert sched.block_manager.prefix_cache_queried_tokens == 8   # b's failed tries count nothing


def test_max_batch_size_and_max_prefill_seqs():
    sched = make_scheduler(max_batch_size=3, max_prefill_seqs=2)
    a, b, c, d = (add(sched, 4, start=10 * i, max_tokens=2) for i in range(4))
    out, _ = step(sched)
    assert chunks(out) == [(a, 0, 4), (b, 0, 4)]      # two prefill chunks a step
    out, finished = step(sched)
    assert out.decodes == (a, b) and chunks(out) == [(c, 0, 4)]   # batch full at 3: d waits
    assert finished == [a, b] and d.status is SequenceStatus.WAITING
    out, finished = step(sched)
    assert out.decodes == (c,) and chunks(out) == [(d, 0, 4)] and finished == [c]


@pytest.mark.parametrize("caching", [False, True])
def test_preempts_the_newest_when_pages_run_out_then_recovers(caching):
    sched = make_scheduler(num_pages=5, caching=caching)   # 4 usable pages
    a = add(sched, 7, max_tokens=4)
    b = add(sched, 7, start=100, max_tokens=3)
    step(sched)                                       # a: pages 1 2, b: pages 3 4
    step(sched)                                       # both decode within their second page
    assert (a.block_table, b.block_table) == ([1, 2], [3, 4])
    out, _ = step(sched)                              # a's token 9 needs a third page: b goes
    assert out.decodes == (a,) and out.preempted == (b,) and out.prefills == ()
    assert b.status is SequenceStatus.WAITING and list(sched.waiting) == [b] and b.block_table == []
    assert (b.num_preemptions, sched.num_preemptions) == (1, 1) and b.output_token_ids == [7, 7]
    assert a.block_table == [1, 2, 4]                 # b's pages were freed tail first
    out, finished = step(sched)                       # b still does not fit; a finishes
    assert out.decodes == (a,) and out.prefills == () and finished == [a]
    out, finished = step(sched)                       # b recomputes prompt + outputs (block 0 cached)
    assert chunks(out) == [(b, 4 if caching else 0, 9 - (4 if caching else 0))]
    assert finished == [b] and b.finish_reason is FinishReason.LENGTH and b.output_token_ids == [7, 7, 7]
    assert sched.block_manager.num_used_pages == 0 and not sched.has_unfinished()


def test_no_admission_in_a_step_that_preempted():
    sched = make_scheduler(num_pages=5)               # 4 usable pages
    a, b = add(sched, 7), add(sched, 7, start=100)
    step(sched)
    step(sched)
    sched.max_num_batched_tokens = 4                  # b's first chunk after preemption: 3 tokens, 1 page
    out, _ = step(sched)
    assert out.preempted == (b,) and out.prefills == () and sched.block_manager.num_free_pages == 1
    out, _ = step(sched)                              # re-admitted one step later, not in the same one
    assert out.decodes == (a,) and chunks(out) == [(b, 0, 3)]


def test_preempted_requests_return_to_the_front_oldest_first():
    sched = make_scheduler(num_pages=5)               # 4 usable pages
    a, b, c, d, e = (add(sched, 4, start=100 * i) for i in range(5))
    out, _ = step(sched)                              # a b c d take one page each; e waits
    assert [s for s, _, _ in chunks(out)] == [a, b, c, d]
    out, _ = step(sched)                              # a's and b's next token each need a page
    assert out.decodes == (a, b) and out.preempted == (d, c)
    assert list(sched.waiting) == [c, d, e] and sched.num_preemptions == 2


def test_a_sequence_too_long_for_the_whole_pool_finishes_with_length():
    sched = make_scheduler(num_pages=3)               # 2 usable pages = 8 slots
    a = add(sched, 8)
    out, finished = step(sched)
    assert finished == [] and a.num_output_tokens == 1
    out, finished = step(sched)                       # token 9 needs a third page that does not exist
    assert out.finished == (a,) and finished == [a] and out.is_empty
    assert a.finish_reason is FinishReason.LENGTH and sched.block_manager.num_used_pages == 0
    assert sched.num_preemptions == 0


def test_abort_frees_pages_at_once_waiting_or_running():
    sched = make_scheduler(num_pages=3)
    a = add(sched, 8)
    b = add(sched, 4, start=100)
    step(sched)
    assert sched.block_manager.num_used_pages == 2 and b.status is SequenceStatus.WAITING
    assert sched.abort(a.request_id) is a
    assert a.finish_reason is FinishReason.ABORT and a.is_finished and a.block_table == []
    assert sched.block_manager.num_used_pages == 0 and sched.num_running == 0
    assert sched.abort(b.request_id) is b and sched.num_waiting == 0 and b.finish_reason is FinishReason.ABORT
    assert sched.abort("nobody") is None and sched.abort(a.request_id) is None


def test_abort_between_schedule_and_update_is_skipped():
    sched = make_scheduler()
    a = add(sched, 4)
    out = sched.schedule()
    sched.abort(a.request_id)
    assert update(sched, out, {a.request_id: 5}) == [] and a.token_ids == [0, 1, 2, 3]


def test_finish_reasons():
    sched = make_scheduler(max_length=10)
    eos = add(sched, 4)
    ignore = add(sched, 4, start=10, ignore_eos=True)
    short = add(sched, 4, start=20, max_tokens=1, ignore_eos=True)
    long = add(sched, 8, start=30, ignore_eos=True)   # max_length 10: two tokens
    _, finished = step(sched, token=EOS)
    assert finished == [eos, short]
    assert eos.finish_reason is FinishReason.STOP and eos.output_token_ids == [EOS]   # EOS is kept
    assert short.finish_reason is FinishReason.LENGTH
    _, finished = step(sched, token=EOS)
    assert finished == [long] and long.finish_reason is FinishReason.LENGTH and long.num_tokens == 10
    assert ignore.status is SequenceStatus.RUNNING and ignore.output_token_ids == [EOS, EOS]
    assert sched.block_manager.num_used_pages == len(ignore.block_table)


def test_engine_finish_for_stop_strings():
    sched = make_scheduler()
    a = add(sched, 4)
    step(sched)
    sched.finish(a, FinishReason.STOP)
    sched.finish(a, FinishReason.ABORT)               # already finished: no-op
    assert a.finish_reason is FinishReason.STOP and sched.block_manager.num_used_pages == 0


def test_prefix_hits_on_admission():
    sched = make_scheduler(caching=True)
    add(sched, 10, max_tokens=1)
    step(sched)                                       # a: 10 tokens, blocks 0 and 1 cached, finishes
    b = add(sched, 0, tokens=[*range(8), 50, 51, 52])
    out, _ = step(sched)
    assert chunks(out) == [(b, 8, 3)] and b.num_cached_tokens == 8 and b.block_table[:2] == [1, 2]
    bm = sched.block_manager
    assert (bm.prefix_cache_queried_tokens, bm.prefix_cache_hit_tokens) == (21, 8)


def test_full_prompt_hit_runs_the_last_token_as_a_prefill_chunk():
    sched = make_scheduler(caching=True)
    a = add(sched, 8)
    step(sched)                                       # a's two blocks are committed after its prefill
    b = add(sched, 8)
    out, _ = step(sched)
    assert out.decodes == (a,) and chunks(out) == [(b, 7, 1)] and out.prefills[0].samples
    assert b.block_table[:2] == a.block_table[:2] and sched.block_manager.ref_count(a.block_table[0]) == 2
    assert b.num_cached_tokens == 8 and b.output_token_ids == [7]
    out, _ = step(sched)
    assert out.decodes == (a, b)


def test_add_rejects_what_could_never_run():
    sched = make_scheduler(num_pages=3, max_length=16, max_waiting=2)
    for n in (0, 16, 9):                              # empty, >= max_length, more than the 8-slot pool
        with pytest.raises(ValueError):
            add(sched, n)
    add(sched, 4)
    add(sched, 4)
    with pytest.raises(QueueFullError):
        add(sched, 4)


@pytest.mark.parametrize("caching", [False, True])
def test_random_workload_ends_with_no_leaks(caching):
    rng = random.Random(caching)
    sched = make_scheduler(num_pages=12, caching=caching, max_batch_size=4, max_num_batched_tokens=12,
                           max_length=40, max_prefill_seqs=2)
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    seqs = []
    for _ in range(300):
        if len(seqs) < 40 and rng.random() < 0.4:
            tokens = rng.choice(prefixes)[:rng.randrange(1, 13)] + [rng.randrange(50) for _ in range(rng.randrange(8))]
            seqs.append(add(sched, 0, tokens=tokens, max_tokens=rng.randrange(1, 12)))
        if rng.random() < 0.03 and seqs:
            sched.abort(rng.choice(seqs).request_id)
        out = sched.schedule()
        assert out.num_batched_tokens <= 12 and sched.num_running <= 4 and len(out.prefills) <= 2
        assert all(s.num_computed_tokens == s.num_tokens - 1 for s in out.decodes)
        assert all(isinstance(c, PrefillChunk) and c.start == c.seq.num_computed_tokens for c in out.prefills)
        sampled = {s.request_id: rng.choice([EOS, 1, 2, 3]) for s in out.decodes}
        sampled |= {c.seq.request_id: rng.choice([EOS, 1, 2, 3]) for c in out.prefills if c.samples}
        update(sched, out, sampled)
        held = sum(len(s.block_table) for s in sched.running)
        assert held >= sched.block_manager.num_used_pages     # shared pages are counted once
    while sched.has_unfinished():
        step(sched)
    assert all(s.is_finished for s in seqs) and sched.block_manager.num_used_pages == 0
