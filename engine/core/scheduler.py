"""Scheduler: continuous batching with chunked prefill, preemption and abort (pure Python, no JAX).

Each step `schedule()` builds one SchedulerOutput under a token budget, in this order:
  1. every running sequence that is decoding gets one token (oldest first);
  2. running sequences still in (chunked) prefill get their next chunk (oldest first);
  3. waiting sequences are admitted first come, first served while the batch and the pages allow.
When a running sequence cannot get a page, the newest running sequence not yet scheduled this step is
preempted (pages freed, back to the front of the waiting queue; it recomputes later, helped by the prefix
cache) and the page is retried. The runner launches the batch; `advance()` books it at once (placeholders
for the tokens being sampled, so the next step can be scheduled while it runs) and `complete()` books its
sampled tokens when they are back (`update()` = both, for callers that wait).

Invariants: running sequences hold pages, waiting and finished ones hold none (except, until their step
completes, sequences ended with LENGTH by `advance`); running is ordered by
admission (oldest first), waiting is FCFS with preempted sequences in front.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from engine.core.block_manager import BlockManager
from engine.core.request import FinishReason, QueueFullError
from engine.core.request_checks import check_prompt_length
from engine.core.sequence import PLACEHOLDER, Sequence, SequenceStatus


@dataclass(frozen=True)
class PrefillChunk:
    """Feed seq.token_ids[start:start + num_tokens] at positions start.. (start == num_computed_tokens).
    Positions below seq.num_cached_tokens already have their KV in cached pages: the runner writes them
    to the null page. `samples`: the chunk reaches the end of the sequence, so it samples a token (fixed
    when the chunk is made: update() appends that token later)."""
    seq: Sequence
    start: int
    num_tokens: int
    samples: bool = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "samples", self.start + self.num_tokens == self.seq.num_tokens)


@dataclass(frozen=True)
class SchedulerOutput:
    """One step for the runner. A decode feeds seq.token_ids[-1] at position seq.num_tokens - 1 and
    samples one token. `preempted` lost their pages this step; `finished` were ended by the scheduler
    because they cannot fit in the whole page pool (update() returns them as finished)."""
    decodes: tuple[Sequence, ...]
    prefills: tuple[PrefillChunk, ...]
    preempted: tuple[Sequence, ...]
    finished: tuple[Sequence, ...] = ()

    @property
    def num_batched_tokens(self) -> int:
        return len(self.decodes) + sum(c.num_tokens for c in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


def in_prefill(seq: Sequence) -> bool:
    """Still prefilling: tokens besides the last lack KV, or every token came from the cache and the
    last one must run once more for its logits (as a prefill chunk: its KV must not be rewritten)."""
    return seq.num_computed_tokens < seq.num_tokens - 1 or seq.num_cached_tokens == seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_batch_size: int, max_num_batched_tokens: int,
                 max_length: int, max_prefill_seqs: int = 8, eos_token_ids: frozenset[int],
                 max_waiting: int = 1024):
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_length = max_length
        self.max_prefill_seqs = max_prefill_seqs
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._retired: dict[Sequence, int] = {}    # ended with LENGTH, pages kept until complete() (see _retire)
        self.num_preemptions = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. Raises QueueFullError when max_waiting are already waiting, and
        ValueError for a prompt that could never run (empty, >= max_length, or larger than the pool)."""
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"the waiting queue holds max_waiting={self.max_waiting} requests")
        bm = self.block_manager
        check_prompt_length(seq.num_tokens, self.max_length, bm.page_size, bm.num_total_pages)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        """The next step: at most max_num_batched_tokens tokens, max_prefill_seqs prefill chunks and
        max_batch_size running sequences; every scheduled sequence has the pages its tokens need."""
        step = _Step(self.max_num_batched_tokens)
        for seq in list(self.running):               # 1. decodes
            if seq.status is SequenceStatus.RUNNING and not in_prefill(seq) and step.budget > 0:
                if self._reserve_or_preempt(seq, 1, step):
                    step.decodes.append(seq)
                    step.budget -= 1
        for seq in list(self.running):               # 2. chunked prefills of running sequences
            if seq.status is SequenceStatus.RUNNING and in_prefill(seq) and self._prefill_room(step):
                n = min(seq.num_tokens - seq.num_computed_tokens, step.budget)
                if self._reserve_or_preempt(seq, n, step):
                    step.add_chunk(seq, n)
        if not step.preempted:                       # admitting right after preempting would thrash
            self._admit_waiting(step)
        return SchedulerOutput(tuple(step.decodes), tuple(step.prefills), tuple(step.preempted),
                               tuple(step.finished))

    def advance(self, output: SchedulerOutput) -> list[tuple[Sequence, int]]:
        """Book a step the runner has launched, before its tokens are back (so the next step can be
        scheduled while this one runs): advance num_computed_tokens and put a PLACEHOLDER where each
        sampling row's token will go. A sequence that reaches max_tokens / --max-length with that token ends
        now (LENGTH: pages freed, never scheduled again; in-order device execution makes reusing them
        safe); `complete` reports it once its token is known. Returns (sequence, index) of every
        placeholder. Sequences aborted since schedule() are skipped."""
        pending = []
        steps = [(seq, seq.num_tokens, True) for seq in output.decodes]
        steps += [(c.seq, c.start + c.num_tokens, c.samples) for c in output.prefills]
        for seq, computed, samples in steps:
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens = computed
            if samples:
                pending.append((seq, seq.num_tokens))
                seq.token_ids.append(PLACEHOLDER)
                if seq.num_output_tokens >= seq.sampling.max_tokens or seq.num_tokens >= self.max_length:
                    self._retire(seq)
        return pending

    def _retire(self, seq: Sequence) -> None:
        """Ends seq with LENGTH at its last token, which is still being sampled: never scheduled again, but its
        pages are kept until `complete` has registered its full blocks (their last token may be unknown yet)."""
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = FinishReason.LENGTH
        self._retired[seq] = seq.num_tokens - 1       # the index of that last token

    def complete(self, output: SchedulerOutput, pending: list[tuple[Sequence, int]],
                 sampled: Mapping[str, int]) -> list[Sequence]:
        """The step's tokens are back: fill the placeholders (keyed by request_id), register newly full
        blocks in the prefix cache, stop on EOS. Returns the sequences that end with this step: output.finished
        first, then EOS stops and the LENGTH ends `advance` made. A sequence that ended meanwhile (aborted,
        or stopped at an earlier token) drops its token; one preempted meanwhile keeps it (it was sampled
        from a complete forward)."""
        finished = list(output.finished)
        for seq, index in pending:
            if seq.is_finished and seq not in self._retired:
                continue                   # ended meanwhile (abort, an earlier stop): this token is dropped
            seq.token_ids[index] = sampled[seq.request_id]   # an EOS id stays (the detokenizer hides it)
            eos = not seq.sampling.ignore_eos and seq.token_ids[index] in self.eos_token_ids
            if self._retired.get(seq) == index:       # its last token (ended on length): EOS wins
                del self._retired[seq]
                self.block_manager.commit(seq)
                self.block_manager.free(seq)
                if eos:
                    seq.finish_reason = FinishReason.STOP
                finished.append(seq)
            elif eos:
                self.finish(seq, FinishReason.STOP)
                finished.append(seq)
        for seq in {*output.decodes, *(c.seq for c in output.prefills)}:
            if seq.status is SequenceStatus.RUNNING:   # every token its computed blocks hold is known now
                self.block_manager.commit(seq)
        return finished

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a waiting or running sequence: its pages are freed at once, and a token still being sampled
        for it is dropped (so nothing past a stop reaches the client). No-op if already finished."""
        if seq in self._retired:     # ended on length at a token still on the way: it ends here instead
            del self._retired[seq]
            self.block_manager.free(seq)
            seq.finish_reason = reason
        elif seq.is_finished:
            return
        else:
            self._end(seq, reason)
        while seq.token_ids and seq.token_ids[-1] == PLACEHOLDER:
            seq.token_ids.pop()

    def stop(self, seq: Sequence) -> None:
        """A stop string ended seq at its last known token: finish it (STOP), or relabel an end it already
        had at that token."""
        if seq.is_finished and seq not in self._retired:
            seq.finish_reason = FinishReason.STOP
        else:
            self.finish(seq, FinishReason.STOP)

    def _end(self, seq: Sequence, reason: FinishReason) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, request_id: str) -> Sequence | None:
        """Finish the waiting or running sequence with this id (FinishReason.ABORT); None if unknown."""
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                self.finish(seq, FinishReason.ABORT)
                return seq
        return None

    # ---- internals ------------------------------------------------------------------------------
    def _prefill_room(self, step: _Step) -> bool:
        return step.budget > 0 and len(step.prefills) < self.max_prefill_seqs

    def _reserve_or_preempt(self, seq: Sequence, num_tokens: int, step: _Step) -> bool:
        """Reserve pages for seq, preempting the newest running sequence not yet scheduled this step
        until they fit. If that victim is seq itself it is preempted (False); if seq runs alone, the
        whole pool cannot hold it: it is finished with LENGTH (False)."""
        while not self.block_manager.reserve(seq, num_tokens):
            victim = next(s for s in reversed(self.running) if s not in step.scheduled)
            if victim is seq and len(self.running) == 1:
                self.finish(seq, FinishReason.LENGTH)
                step.finished.append(seq)
                return False
            self._preempt(victim, step)
            if victim is seq:
                return False
        step.scheduled.add(seq)
        return True

    def _preempt(self, seq: Sequence, step: _Step) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        step.preempted.append(seq)

    def _admit_waiting(self, step: _Step) -> None:
        """FCFS: stop at the first waiting sequence that does not fit (no skipping ahead). One that does
        not fit while nothing runs never will (all pages are free): it is finished with LENGTH."""
        bm = self.block_manager
        while self.waiting and len(self.running) < self.max_batch_size and self._prefill_room(step):
            seq = self.waiting[0]
            if not bm.can_admit(seq, step.budget):
                if self.running:
                    return
                self.finish(seq, FinishReason.LENGTH)
                step.finished.append(seq)
                continue
            bm.admit(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, step.budget)
            if not bm.reserve(seq, n):
                raise RuntimeError(f"{seq.request_id!r}: can_admit said yes but reserve({n}) failed")
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.scheduled.add(seq)
            step.add_chunk(seq, n)


class _Step:
    """What one schedule() call has decided so far."""

    def __init__(self, budget: int):
        self.budget = budget
        self.decodes: list[Sequence] = []
        self.prefills: list[PrefillChunk] = []
        self.preempted: list[Sequence] = []
        self.finished: list[Sequence] = []
        self.scheduled: set[Sequence] = set()

    def add_chunk(self, seq: Sequence, n: int) -> None:
        self.prefills.append(PrefillChunk(seq, seq.num_computed_tokens, n))
        self.budget -= n
