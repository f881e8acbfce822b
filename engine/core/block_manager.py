"""BlockManager: the pool of KV pages, their ref counts, and the prefix cache of full blocks.

Pure Python (no JAX). Page i holds the KV of one block of `page_size` consecutive tokens of one or more
sequences. Page 0 is the null page: never handed out, never freed (the runner points padding and
"do not write" slots at it). Every usable page is in exactly one of two states:

  in use:  ref count > 0, listed in the block_table of that many live sequences;
  free:    ref count 0, in the free queue, in the order it became free (least recently used first).

A free page may still hold a cached block (its key stays in the cache map) until it is popped from the
free queue to be reused: then the block is evicted. A cache hit on a free page takes it out of the
middle of the queue, hence the O(1) intrusive doubly-linked list.

Only full blocks are cached. A block's key is sha256(parent block's key, its token ids, the request's
cache_salt), so a key names the whole prefix up to and including the block: a hit means every earlier
token matched too, and different salts never share a page.
"""
from __future__ import annotations

import hashlib

import numpy as np

from engine.core.sequence import Sequence

NULL_PAGE = 0
ROOT_KEY = bytes(32)   # parent key of a sequence's first block


def block_key(parent: bytes, token_ids, cache_salt: str) -> bytes:
    """Chained key of one full block. Unambiguous: the parent is 32 bytes and every block of one manager
    has the same number of tokens, so only the salt (last) has a variable length."""
    h = hashlib.sha256(parent)
    h.update(np.asarray(token_ids, dtype="<i8").tobytes())
    h.update(cache_salt.encode("utf-8"))
    return h.digest()


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class FreePageQueue:
    """Pages ordered by when they became free (head = oldest), with O(1) append, popleft and remove.

    The links live in two int lists indexed by page id; index `num_pages` is the sentinel that closes
    the ring. A page is in the queue iff its next link is not -1.
    """

    def __init__(self, num_pages: int):
        self._end = num_pages
        self._next = [-1] * (num_pages + 1)
        self._prev = [-1] * (num_pages + 1)
        self._next[self._end] = self._prev[self._end] = self._end
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __contains__(self, page: int) -> bool:
        return self._next[page] != -1

    def __iter__(self):
        page = self._next[self._end]
        while page != self._end:
            yield page
            page = self._next[page]

    def append(self, page: int) -> None:
        if page in self:
            raise RuntimeError(f"page {page} is already free")
        last = self._prev[self._end]
        self._next[last], self._prev[page] = page, last
        self._next[page], self._prev[self._end] = self._end, page
        self._len += 1

    def remove(self, page: int) -> None:
        if page not in self:
            raise RuntimeError(f"page {page} is not free")
        prev, nxt = self._prev[page], self._next[page]
        self._next[prev], self._prev[nxt] = nxt, prev
        self._next[page] = self._prev[page] = -1
        self._len -= 1

    def popleft(self) -> int:
        page = self._next[self._end]
        if page == self._end:
            raise RuntimeError("no free page")
        self.remove(page)
        return page


class BlockManager:
    """Page pool + prefix cache. Running out of pages is a return value; a broken invariant raises."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages} is not allowed; it must be >= 2 (page 0 is reserved)")
        if page_size < 1:
            raise ValueError(f"page_size={page_size} is not allowed; it must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_pages
        self._page_key: list[bytes | None] = [None] * num_pages   # key of the cached block a page holds
        self._cached: dict[bytes, int] = {}                         # key -> page; inverse of _page_key
        self._free = FreePageQueue(num_pages)
        for page in range(1, num_pages):
            self._free.append(page)
        self._num_cached_free = 0
        # Per live sequence: keys of its full blocks hashed so far (a decode hashes only the new block),
        # and how many leading blocks are already registered or were found in the cache.
        self._keys: dict[Sequence, list[bytes]] = {}
        self._committed: dict[Sequence, int] = {}
        self.prefix_cache_queried_tokens = 0
        self.prefix_cache_hit_tokens = 0
        self.prefix_cache_evictions = 0

    # ---- counters -------------------------------------------------------------------------------
    @property
    def num_total_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Allocatable pages: empty ones plus cached blocks nobody uses (evicted on demand)."""
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_total_pages - len(self._free)

    @property
    def num_cached_pages(self) -> int:
        """Free pages that still hold a cached block."""
        return self._num_cached_free

    def ref_count(self, page: int) -> int:
        return self._ref[page]

    def is_cached(self, page: int) -> bool:
        return self._page_key[page] is not None

    def free_page_ids(self) -> list[int]:
        """The free queue, next to be reused first (for tests and debugging)."""
        return list(self._free)

    # ---- the sequence lifecycle -----------------------------------------------------------------
    def can_admit(self, seq: Sequence, max_new_tokens: int) -> bool:
        """Whether admit(seq) then reserve(seq, min(tokens left after the hit, max_new_tokens)) would
        succeed. Changes no page, ref count or counter, so a queue head that keeps not fitting neither
        reorders the LRU nor inflates the hit statistics."""
        self._check_unadmitted(seq)
        hit = self._lookup(seq)
        computed = self._computed_after_hit(seq, len(hit) * self.page_size)
        end = computed + min(seq.num_tokens - computed, max_new_tokens)
        taken_from_free = sum(1 for page in hit if self._ref[page] == 0)
        return pages_for(end, self.page_size) - len(hit) <= len(self._free) - taken_from_free

    def admit(self, seq: Sequence) -> None:
        """Give a sequence with no pages the longest cached full-block prefix of all its tokens.

        Afterwards block_table holds the hit pages (each ref += 1), num_cached_tokens = hit tokens and
        num_computed_tokens = hit tokens, except when every token hit: then num_computed_tokens =
        num_tokens - 1, because the last token must run again for its logits (its KV is already there).
        Counts num_tokens queried and num_cached_tokens hit. With caching off: no pages, nothing counted.
        """
        self._check_unadmitted(seq)
        seq.num_cached_tokens = seq.num_computed_tokens = 0
        if not self.enable_prefix_caching:
            return
        hit = self._lookup(seq)
        for page in hit:
            self._take(page)
        seq.block_table = hit
        seq.num_cached_tokens = len(hit) * self.page_size
        seq.num_computed_tokens = self._computed_after_hit(seq, seq.num_cached_tokens)
        self._committed[seq] = len(hit)
        if seq.num_preemptions == 0:
            # A preempted sequence re-admitted mostly hits blocks it computed itself: count (and report)
            # only the first admission's hit, which is what the prompt really got from the cache.
            seq.cached_prompt_tokens = min(seq.num_cached_tokens, seq.prompt_len)
            self.prefix_cache_queried_tokens += seq.num_tokens
            self.prefix_cache_hit_tokens += seq.num_cached_tokens

    def reserve(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow block_table to cover num_computed_tokens + num_new_tokens slots with pages from the head
        of the free queue (evicting the cached blocks they hold). All or nothing: False changes nothing."""
        if num_new_tokens < 0:
            raise RuntimeError(f"reserve({seq.request_id!r}, {num_new_tokens}): negative token count")
        need = pages_for(seq.num_computed_tokens + num_new_tokens, self.page_size) - len(seq.block_table)
        if need > len(self._free):
            return False
        for _ in range(need):
            seq.block_table.append(self._pop_free())
        return True

    def commit(self, seq: Sequence) -> None:
        """Register every full, computed block (the first num_computed_tokens // page_size) not yet
        registered, so other requests can share it from the next step on. A key already cached on
        another page keeps that page; this one stays uncached. No-op with caching off."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.page_size
        start = self._committed.get(seq, 0)
        if num_full <= start:
            return
        keys = self._block_keys(seq, num_full)
        for i in range(start, num_full):
            page, key = seq.block_table[i], keys[i]
            if self._page_key[page] is not None:
                raise RuntimeError(f"page {page} of {seq.request_id!r} is cached before it was committed")
            if key not in self._cached:
                self._cached[key] = page
                self._page_key[page] = key
        self._committed[seq] = num_full

    def free(self, seq: Sequence) -> None:
        """Drop seq's page references, last block first, so a chain's tail is evicted before its head.
        Clears block_table and num_computed_tokens (num_cached_tokens stays, for usage reporting).
        Pages reaching ref 0 join the free queue; their cached blocks stay cached until evicted."""
        for page in reversed(seq.block_table):
            self._release(page)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._keys.pop(seq, None)
        self._committed.pop(seq, None)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block nobody uses (its page becomes plain free; not counted as an
        eviction). Blocks in use keep their keys: they are still valid and their owners keep sharing them.
        Always succeeds and returns True."""
        for key, page in list(self._cached.items()):
            if self._ref[page] == 0:
                del self._cached[key]
                self._page_key[page] = None
        self._num_cached_free = 0
        return True

    # ---- internals ------------------------------------------------------------------------------
    def _check_unadmitted(self, seq: Sequence) -> None:
        if seq.block_table:
            raise RuntimeError(f"{seq.request_id!r} already holds pages {seq.block_table}")

    def _computed_after_hit(self, seq: Sequence, hit_tokens: int) -> int:
        return hit_tokens - 1 if hit_tokens and hit_tokens == seq.num_tokens else hit_tokens

    def _block_keys(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Keys of seq's first num_blocks full blocks, hashing only those not hashed before."""
        keys = self._keys.setdefault(seq, [])
        ps = self.page_size
        for i in range(len(keys), num_blocks):
            keys.append(block_key(keys[-1] if keys else ROOT_KEY, seq.token_ids[i * ps:(i + 1) * ps],
                                  seq.cache_salt))
        return keys[:num_blocks]

    def _lookup(self, seq: Sequence) -> list[int]:
        """Pages of the longest cached chain of seq's full blocks (empty with caching off)."""
        if not self.enable_prefix_caching:
            return []
        pages = []
        for key in self._block_keys(seq, seq.num_tokens // self.page_size):
            page = self._cached.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def _take(self, page: int) -> None:
        """A hit: one more reference; a free page leaves the queue (and stops being evictable)."""
        if self._ref[page] == 0:
            self._free.remove(page)
            self._num_cached_free -= 1
        self._ref[page] += 1

    def _pop_free(self) -> int:
        page = self._free.popleft()
        if self._ref[page] != 0:
            raise RuntimeError(f"free page {page} has ref count {self._ref[page]}")
        key = self._page_key[page]
        if key is not None:
            del self._cached[key]
            self._page_key[page] = None
            self._num_cached_free -= 1
            self.prefix_cache_evictions += 1
        self._ref[page] = 1
        return page

    def _release(self, page: int) -> None:
        if page == NULL_PAGE or self._ref[page] <= 0:
            raise RuntimeError(f"releasing page {page} with ref count {self._ref[page]}")
        self._ref[page] -= 1
        if self._ref[page] == 0:
            self._free.append(page)
            if self._page_key[page] is not None:
                self._num_cached_free += 1
