"""Hypothesis state machine: random admit/reserve/compute+commit/append/free/reset against a plain model.

The model keys cached blocks by (salt, the whole token prefix up to the block's end) — what the chained
sha256 key stands for — and keeps the free queue as a Python list, so it is obviously right and slow.
Small alphabets and page size 2 make shared prefixes, duplicates and evictions common.
"""
import itertools

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.core.block_manager import BlockManager
from engine.core.request import Request
from engine.core.sampling_params import SamplingParams
from engine.core.sequence import Sequence

PS, NUM_PAGES, MAX_SEQS = 2, 10, 5
_ids = itertools.count()


class Model:
    def __init__(self):
        self.free = list(range(1, NUM_PAGES))        # head = next to reuse
        self.ref = dict.fromkeys(range(1, NUM_PAGES), 0)
        self.cached: dict[tuple, int] = {}           # (salt, prefix tokens) -> page
        self.content: dict[int, tuple] = {}          # page -> its cached key
        self.writer_salt: dict[int, str] = {}        # page -> salt of the sequence that computed it
        self.committed: dict[Sequence, int] = {}     # blocks registered (or found) per sequence

    def key(self, seq, i):
        return seq.cache_salt, tuple(seq.token_ids[:(i + 1) * PS])

    def hit(self, seq):
        pages = []
        for i in range(seq.num_tokens // PS):
            if self.key(seq, i) not in self.cached:
                break
            pages.append(self.cached[self.key(seq, i)])
        return pages

    def take(self, page):
        if self.ref[page] == 0:
            self.free.remove(page)
        self.ref[page] += 1

    def pop(self, seq):
        page = self.free.pop(0)
        if page in self.content:
            del self.cached[self.content.pop(page)]
        self.ref[page] = 1
        self.writer_salt[page] = seq.cache_salt
        return page

    def release(self, page):
        self.ref[page] -= 1
        if self.ref[page] == 0:
            self.free.append(page)

    def commit(self, seq, table):
        """Blocks already registered (or skipped as duplicates) are never looked at again."""
        num_full = seq.num_computed_tokens // PS
        for i in range(self.committed[seq], num_full):
            key = self.key(seq, i)
            if key not in self.cached:
                self.cached[key], self.content[table[i]] = table[i], key
        self.committed[seq] = max(self.committed[seq], num_full)


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bm = BlockManager(NUM_PAGES, PS, enable_prefix_caching=True)
        self.model = Model()
        self.table: dict[Sequence, list[int]] = {}   # the model's block tables of admitted sequences
        self.idle: list[Sequence] = []               # sequences holding no pages (new or freed)

    @precondition(lambda self: len(self.idle) + len(self.table) < MAX_SEQS)
    @rule(tokens=st.lists(st.integers(0, 1), min_size=1, max_size=9), salt=st.sampled_from(["", "s"]))
    def new_sequence(self, tokens, salt):
        self.idle.append(Sequence(Request(f"r{next(_ids)}", tuple(tokens), SamplingParams(), salt)))

    @precondition(lambda self: self.table and len(self.idle) + len(self.table) < MAX_SEQS)
    @rule(data=st.data(), cut=st.integers(1, 12), tail=st.lists(st.integers(0, 1), max_size=3),
          salt=st.sampled_from(["", "s"]))
    def new_sequence_sharing_a_prefix(self, data, cut, tail, salt):
        """A follow-up request: some prefix of a live sequence (maybe all of it), then maybe a new tail."""
        seq = data.draw(st.sampled_from(list(self.table)))
        tokens = (seq.token_ids[:cut] + tail) or [0]
        self.idle.append(Sequence(Request(f"r{next(_ids)}", tuple(tokens), SamplingParams(), salt)))

    @precondition(lambda self: self.idle)
    @rule(data=st.data())
    def admit(self, data):
        self.admit_one(data)

    def admit_one(self, data):
        seq = self.idle.pop(data.draw(st.integers(0, len(self.idle) - 1)))
        expected = self.model.hit(seq)
        for page in expected:
            self.model.take(page)
        self.bm.admit(seq)
        hit = len(expected) * PS
        assert seq.block_table == expected
        assert seq.num_cached_tokens == hit
        assert seq.num_computed_tokens == (hit - 1 if hit == seq.num_tokens else hit)
        self.table[seq] = list(expected)
        self.model.committed[seq] = len(expected)
        return seq

    @precondition(lambda self: self.idle)
    @rule(data=st.data())
    def prefill_whole_prompt(self, data):
        """The common path in one go: admit, reserve every slot, compute everything, commit."""
        seq = self.admit_one(data)
        if self.reserve_for(seq, seq.num_tokens - seq.num_computed_tokens):
            self.compute_for(seq, seq.num_tokens)

    @precondition(lambda self: self.table)
    @rule(data=st.data(), n=st.integers(0, 6))
    def reserve(self, data, n):
        self.reserve_for(data.draw(st.sampled_from(list(self.table))), n)

    def reserve_for(self, seq, n):
        need = -(-(seq.num_computed_tokens + n) // PS) - len(self.table[seq])
        fits = need <= len(self.model.free)
        assert self.bm.reserve(seq, n) == fits
        if fits:
            self.table[seq] += [self.model.pop(seq) for _ in range(max(need, 0))]
        assert seq.block_table == self.table[seq]
        return fits

    @precondition(lambda self: self.table)
    @rule(data=st.data(), n=st.integers(1, 6))
    def compute_and_commit(self, data, n):
        """The runner computed up to n more tokens that have slots; then the scheduler commits."""
        self.compute_for(data.draw(st.sampled_from(list(self.table))), n)

    def compute_for(self, seq, n):
        slots = len(seq.block_table) * PS
        seq.num_computed_tokens = min(seq.num_computed_tokens + n, seq.num_tokens, slots)
        self.model.commit(seq, self.table[seq])
        self.bm.commit(seq)

    @precondition(lambda self: any(s.num_computed_tokens == s.num_tokens for s in self.table))
    @rule(data=st.data(), token=st.integers(0, 1))
    def append_token(self, data, token):
        seq = data.draw(st.sampled_from([s for s in self.table if s.num_computed_tokens == s.num_tokens]))
        seq.token_ids.append(token)

    @precondition(lambda self: self.table)
    @rule(data=st.data())
    def free(self, data):
        """Finish or preempt: a freed sequence may be admitted again with its outputs."""
        seq = data.draw(st.sampled_from(list(self.table)))
        for page in reversed(self.table.pop(seq)):
            self.model.release(page)
        self.bm.free(seq)
        assert seq.block_table == [] and seq.num_computed_tokens == 0
        self.idle.append(seq)

    @rule()
    def reset(self):
        assert self.bm.reset_prefix_cache()
        for page in [p for p in self.model.content if self.model.ref[p] == 0]:
            del self.model.cached[self.model.content.pop(page)]

    @invariant()
    def pages_agree_with_the_model_and_the_live_tables(self):
        bm, model = self.bm, self.model
        live = [p for seq in self.table for p in seq.block_table]
        assert bm.free_page_ids() == model.free
        assert not set(model.free) & set(live), "a page is both free and referenced"
        for page in range(1, NUM_PAGES):
            assert bm.ref_count(page) == model.ref[page] == live.count(page)
            assert bm.is_cached(page) == (page in model.content)
        assert bm.ref_count(0) == 0 and 0 not in live
        assert bm.num_used_pages == len(set(live))
        assert bm.num_free_pages + bm.num_used_pages == NUM_PAGES - 1
        assert bm.num_cached_pages == sum(1 for p in model.content if model.ref[p] == 0)
        assert bm.prefix_cache_hit_tokens <= bm.prefix_cache_queried_tokens

    @invariant()
    def salts_never_share_a_page(self):
        for seq in self.table:
            assert all(self.model.writer_salt[p] == seq.cache_salt for p in seq.block_table)

    def teardown(self):
        for seq in list(self.table):
            self.bm.free(seq)
        assert self.bm.num_used_pages == 0, "pages leaked after every sequence was freed"


BlockManagerMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=30, deadline=None)
TestBlockManagerStateMachine = BlockManagerMachine.TestCase
