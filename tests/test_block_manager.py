"""Hand-made BlockManager scenarios with exact page ids, ref counts and eviction order (page_size 4)."""
import itertools

import pytest

import engine.core.block_manager as bm_module
from engine.core.block_manager import BlockManager, FreePageQueue
from engine.core.request import Request
from engine.core.sampling_params import SamplingParams
from engine.core.sequence import Sequence

PS = 4
_ids = itertools.count()


def make_seq(tokens, salt=""):
    return Sequence(Request(f"r{next(_ids)}", tuple(tokens), SamplingParams(), salt))


def prefill(bm, seq):
    """What the scheduler + runner do for a whole prompt in one chunk: admit, reserve, compute, commit."""
    bm.admit(seq)
    assert bm.reserve(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)
    return seq


def refs(bm):
    return {p: bm.ref_count(p) for p in range(1, bm.num_pages) if bm.ref_count(p)}


def cached(bm):
    return [p for p in range(1, bm.num_pages) if bm.is_cached(p)]


@pytest.fixture
def bm():
    return BlockManager(num_pages=8, page_size=PS, enable_prefix_caching=True)


def test_fresh_pool_reserves_page_zero(bm):
    assert bm.free_page_ids() == [1, 2, 3, 4, 5, 6, 7]
    assert (bm.num_total_pages, bm.num_free_pages, bm.num_used_pages, bm.num_cached_pages) == (7, 7, 0, 0)
    seq = make_seq(range(28))
    bm.admit(seq)
    assert bm.reserve(seq, 28) and seq.block_table == [1, 2, 3, 4, 5, 6, 7]
    assert not bm.reserve(seq, 29) and bm.num_free_pages == 0


def test_shared_prefix_and_diverging_suffix(bm):
    a = prefill(bm, make_seq(range(10)))              # blocks [0..3] [4..7] full, [8, 9] partial
    assert a.block_table == [1, 2, 3] and cached(bm) == [1, 2]
    b = make_seq([*range(8), 50, 51])                 # same two full blocks, different tail
    bm.admit(b)
    assert b.block_table == [1, 2] and (b.num_cached_tokens, b.num_computed_tokens) == (8, 8)
    assert bm.reserve(b, 2) and b.block_table == [1, 2, 4]
    c = make_seq([0, 1, 2, 3, 9, 9, 9, 9, 9])         # diverges in block 2: only block 1 is shared
    bm.admit(c)
    assert c.block_table == [1] and c.num_computed_tokens == 4
    assert refs(bm) == {1: 3, 2: 2, 3: 1, 4: 1}
    assert (bm.prefix_cache_queried_tokens, bm.prefix_cache_hit_tokens) == (10 + 10 + 9, 0 + 8 + 4)


def test_a_block_matches_only_after_its_whole_prefix(bm):
    prefill(bm, make_seq([1, 1, 1, 1, 2, 2, 2, 2]))
    other = make_seq([7, 7, 7, 7, 2, 2, 2, 2])        # same second block, different first one
    bm.admit(other)
    assert other.block_table == [] and other.num_computed_tokens == 0


def test_exact_multiple_full_prompt_hit_recomputes_last_token(bm):
    a = prefill(bm, make_seq(range(8)))
    b = make_seq(range(8))
    bm.admit(b)                                       # while a still runs: pages shared, ref 2
    assert b.block_table == [1, 2] and refs(bm) == {1: 2, 2: 2}
    assert (b.num_cached_tokens, b.num_computed_tokens) == (8, 7)
    assert bm.reserve(b, 1) and b.block_table == [1, 2]   # the last token's slot is already there
    b.num_computed_tokens = 8
    bm.commit(b)
    assert cached(bm) == [1, 2] and bm.prefix_cache_hit_tokens == 8
    bm.free(a)
    bm.free(b)
    c = make_seq(range(8))                            # full hit on free (cached) pages
    bm.admit(c)
    assert c.block_table == [1, 2] and c.num_computed_tokens == 7 and bm.free_page_ids() == [3, 4, 5, 6, 7]


def test_free_appends_in_reverse_and_keeps_blocks_cached(bm):
    a = prefill(bm, make_seq(range(14)))              # pages 1, 2, 3 full (cached), 4 partial
    assert a.block_table == [1, 2, 3, 4]
    bm.free(a)
    assert a.block_table == [] and a.num_computed_tokens == 0 and a.num_cached_tokens == 0
    assert bm.free_page_ids() == [5, 6, 7, 4, 3, 2, 1]
    assert (bm.num_used_pages, bm.num_cached_pages, bm.num_free_pages) == (0, 3, 7)
    assert cached(bm) == [1, 2, 3]


def test_eviction_takes_least_recently_freed_and_tail_before_head(bm):
    a = prefill(bm, make_seq(range(12)))              # pages 1 2 3, all cached
    bm.free(a)                                        # queue 4 5 6 7 | 3 2 1
    b = prefill(bm, make_seq(range(100, 120)))        # needs 5 pages: 4 5 6 7, then evicts 3 (a's tail)
    assert b.block_table == [4, 5, 6, 7, 3] and bm.prefix_cache_evictions == 1
    assert bm.free_page_ids() == [2, 1]
    a2 = make_seq(range(12))
    bm.admit(a2)                                      # the head of a's chain survived
    assert a2.block_table == [1, 2] and a2.num_computed_tokens == 8
    bm.free(a2)                                       # back at the tail: 2 is now newest-but-one
    assert bm.free_page_ids() == [2, 1]
    bm.free(b)                                        # b's pages freed after a's: evicted later
    assert bm.free_page_ids() == [2, 1, 3, 7, 6, 5, 4]
    c = make_seq(range(200, 204))
    bm.admit(c)
    assert bm.reserve(c, 4) and c.block_table == [2] and bm.prefix_cache_evictions == 2


def test_hit_on_free_page_removes_it_from_the_middle_of_the_queue(bm):
    a = prefill(bm, make_seq(range(8)))
    bm.free(a)                                        # 3 4 5 6 7 2 1
    b = make_seq([0, 1, 2, 3, 9])
    bm.admit(b)
    assert b.block_table == [1] and bm.free_page_ids() == [3, 4, 5, 6, 7, 2]
    assert bm.num_cached_pages == 1 and bm.ref_count(1) == 1


def test_salts_never_share(bm):
    prefill(bm, make_seq(range(8), salt="alice"))
    bob = make_seq(range(8), salt="bob")
    nobody = make_seq(range(8))
    alice = make_seq(range(8), salt="alice")
    for seq in (bob, nobody, alice):
        bm.admit(seq)
    assert bob.block_table == [] and nobody.block_table == [] and alice.block_table == [1, 2]


def test_commit_keeps_the_existing_page_for_a_duplicate_block(bm):
    a, b = make_seq(range(8)), make_seq(range(8))
    bm.admit(a)
    bm.admit(b)                                       # both miss: computed twice, in parallel
    assert bm.reserve(a, 8) and bm.reserve(b, 8)
    assert a.block_table == [1, 2] and b.block_table == [3, 4]
    for seq in (a, b):
        seq.num_computed_tokens = 8
        bm.commit(seq)
    assert cached(bm) == [1, 2]
    bm.free(b)
    bm.free(a)
    assert bm.num_cached_pages == 2 and bm.free_page_ids() == [5, 6, 7, 4, 3, 2, 1]


def test_decode_commits_each_block_as_it_fills(bm):
    seq = prefill(bm, make_seq(range(6)))
    assert cached(bm) == [1]
    for t in (6, 7, 8):                               # decode: feed token t-1 ... as the runner would
        seq.token_ids.append(t)
        assert bm.reserve(seq, 1)
        seq.num_computed_tokens += 1
        bm.commit(seq)
    assert seq.num_computed_tokens == 9 and cached(bm) == [1, 2] and seq.block_table == [1, 2, 3]
    follower = make_seq(range(10))
    bm.admit(follower)
    assert follower.block_table == [1, 2]


def test_blocks_are_hashed_once_per_sequence(bm, monkeypatch):
    calls = []
    real = bm_module.block_key
    monkeypatch.setattr(bm_module, "block_key", lambda *a: calls.append(1) or real(*a))
    seq = prefill(bm, make_seq(range(3)))
    for t in range(3, 24):                            # 21 decode steps, 24 tokens computed in the end
        seq.token_ids.append(t)
        assert bm.reserve(seq, 1)
        seq.num_computed_tokens += 1
        bm.commit(seq)
    assert len(calls) == 6                            # one hash per full block, never a rehash


def test_reserve_is_all_or_nothing(bm):
    a = prefill(bm, make_seq(range(20)))              # 5 pages
    b = make_seq(range(100, 112))
    bm.admit(b)
    assert not bm.reserve(b, 12)
    assert b.block_table == [] and bm.num_free_pages == 2 and bm.free_page_ids() == [6, 7]
    assert bm.reserve(b, 8) and b.block_table == [6, 7]
    bm.free(a)
    bm.free(b)
    assert bm.num_used_pages == 0


def test_can_admit_changes_nothing(bm):
    a = prefill(bm, make_seq(range(8)))
    bm.free(a)
    queue = bm.free_page_ids()
    b = make_seq(range(36))                           # hits 2 free cached pages; 5 other pages free
    assert bm.can_admit(b, 20) and not bm.can_admit(b, 21)   # 7 pages fit, 8 do not
    assert bm.free_page_ids() == queue and bm.prefix_cache_queried_tokens == 8 and b.block_table == []


def test_reset_prefix_cache_drops_unused_blocks_only(bm):
    a = prefill(bm, make_seq(range(8)))
    prefill(bm, make_seq(range(100, 108)))
    bm.free(a)
    assert bm.reset_prefix_cache() is True
    assert cached(bm) == [3, 4] and bm.num_cached_pages == 0 and bm.prefix_cache_evictions == 0
    a2, b2 = make_seq(range(8)), make_seq(range(100, 108))
    bm.admit(a2)
    bm.admit(b2)
    assert a2.block_table == [] and b2.block_table == [3, 4]


def test_caching_off_looks_nothing_up():
    bm = BlockManager(num_pages=8, page_size=PS, enable_prefix_caching=False)
    a = prefill(bm, make_seq(range(8)))
    assert a.block_table == [1, 2] and cached(bm) == []
    bm.free(a)
    b = prefill(bm, make_seq(range(8)))
    assert b.block_table == [3, 4] and b.num_cached_tokens == 0
    assert (bm.prefix_cache_queried_tokens, bm.prefix_cache_hit_tokens, bm.num_cached_pages) == (0, 0, 0)
    bm.free(b)
    assert bm.num_used_pages == 0 and bm.free_page_ids() == [5, 6, 7, 2, 1, 4, 3]


def test_broken_invariants_raise(bm):
    seq = prefill(bm, make_seq(range(4)))
    with pytest.raises(RuntimeError):
        bm.admit(seq)                                 # already holds pages
    seq.block_table.append(0)
    with pytest.raises(RuntimeError):
        bm.free(seq)                                  # the null page is never freed
    with pytest.raises(ValueError):
        BlockManager(num_pages=1, page_size=PS, enable_prefix_caching=True)


def test_free_page_queue_is_a_fifo_with_removal():
    q = FreePageQueue(6)
    for p in (3, 1, 5, 2):
        q.append(p)
    q.remove(5)
    assert list(q) == [3, 1, 2] and len(q) == 3 and 5 not in q
    assert q.popleft() == 3 and list(q) == [1, 2]
    with pytest.raises(RuntimeError):
        q.append(1)
