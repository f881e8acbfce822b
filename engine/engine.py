"""LLMEngine: scheduler + runner behind a thread-safe request API, stepped by one background thread
(server) or by the caller (offline `LLM`). Both paths run the same `step()`.

Threading: `add_request` / `abort` / `reset_prefix_cache` only touch an inbox under a lock; every scheduler,
block-manager and runner call happens in whichever thread calls `step()` — one at a time.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

import numpy as np

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.model_loading import LoadedEngineParts, load_engine_parts
from engine.output_processor import RequestState
from engine.request import (DuplicateRequestError, FinishReason, QueueFullError, Request, RequestStream)
from engine.sequence import Sequence
from engine.stats import EngineStats

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        parts: LoadedEngineParts = load_engine_parts(config)
        self.config = parts.config                  # every None resolved
        self.model_config = parts.model_config
        self.model_name = parts.model_config.name
        self.tokenizer = parts.tokenizer
        self.device_description = parts.device_description
        self.block_manager = parts.block_manager
        self.scheduler = parts.scheduler
        self.runner = parts.runner
        self._lock = threading.Lock()
        self._inbox: collections.deque = collections.deque()
        self._states: dict[str, RequestState] = {}   # in flight, keyed by request_id
        self._pending_ids: set[str] = set()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False
        self._rng = np.random.default_rng(self.config.seed)
        self._published = self._read_stats()
        self.warmup_seconds = 0.0

    # --- request API (any thread) ---
    def validate(self, request: Request) -> None:
        """ValueError naming the field when the request cannot run on this engine."""
        ids, vocab = request.prompt_token_ids, self.model_config.vocab_size
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids[{bad}]={ids[bad]} is outside the vocabulary [0, {vocab})")
        limit = self.config.max_length
        if len(ids) >= limit:
            raise ValueError(f"prompt has {len(ids)} tokens; --max-length={limit} allows at most {limit - 1}")
        if len(ids) + request.sampling.max_tokens > limit:
            raise ValueError(f"sampling.max_tokens={request.sampling.max_tokens} with a {len(ids)}-token prompt "
                             f"exceeds --max-length={limit}; ask for at most {limit - len(ids)}")
        pages = -(-len(ids) // self.config.kv_cache_page_size)
        if pages > self.block_manager.num_total_pages:
            raise ValueError(f"prompt has {len(ids)} tokens, more than the whole KV pool holds "
                             f"(--kv-cache-pages={self.config.kv_cache_pages})")
        request.sampling.validate()

    def add_request(self, request: Request) -> RequestStream:
        self.validate(request)
        stream = RequestStream(request.request_id)
        with self._lock:
            if request.request_id in self._states or request.request_id in self._pending_ids:
                raise DuplicateRequestError(f"request_id={request.request_id!r} is already in flight")
            waiting = self.scheduler.num_waiting + sum(1 for kind, *_ in self._inbox if kind == "add")
            if waiting >= self.config.max_waiting_requests:
                raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting_requests} requests); "
                                     "retry later")
            self._pending_ids.add(request.request_id)
            self._inbox.append(("add", request, stream))
        self._wakeup.set()
        return stream

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id, None))
        self._wakeup.set()

    def reset_prefix_cache(self) -> bool:
        """Drops every cached block not in use. Runs in the stepping thread when one is running."""
        if self._thread is None:
            return self.block_manager.reset_prefix_cache()
        done, result = threading.Event(), []
        with self._lock:
            self._inbox.append(("reset", result, done))
        self._wakeup.set()
        if not done.wait(timeout=60.0):
            raise RuntimeError("reset_prefix_cache: the engine loop did not answer within 60 s")
        return result[0]

    def stats(self) -> EngineStats:
        """Counters and gauges. While the loop thread runs, the snapshot it publishes after every step (so a
        metrics scrape never sees counters from the middle of one); otherwise read now."""
        return self._published if self._thread is not None else self._read_stats()

    def _read_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            running_requests=self.scheduler.num_running, waiting_requests=self.scheduler.num_waiting,
            kv_pages_used=bm.num_used_pages, kv_pages_cached=bm.num_cached_pages,
            kv_pages_free=bm.num_free_pages - bm.num_cached_pages, kv_pages_total=bm.num_total_pages,
            prefix_cache_queried_tokens=bm.prefix_cache_queried_tokens,
            prefix_cache_hit_tokens=bm.prefix_cache_hit_tokens, prefix_cache_evictions=bm.prefix_cache_evictions,
            preemptions=self.scheduler.num_preemptions, num_compilations=self.runner.num_compilations)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._states or self._pending_ids)

    # --- the step (one thread at a time) ---
    def _drain_inbox(self) -> None:
        # The whole transfer happens under the lock, so add_request's queue check always sees every request
        # either in the inbox or in the scheduler, never in neither.
        with self._lock:
            items, self._inbox = list(self._inbox), collections.deque()
            for kind, a, b in items:
                if kind == "add":
                    self._admit_locked(a, b)
        for kind, a, b in items:
            if kind == "abort":
                seq = self.scheduler.abort(a)
                if seq is not None:
                    self._finish(self._states[seq.request_id])
            elif kind == "reset":
                a.append(self.block_manager.reset_prefix_cache())
                b.set()

    def _admit_locked(self, request: Request, stream: RequestStream) -> None:
        seq = Sequence(request)
        if seq.seed is None:  # unseeded: a fresh draw, so equal requests do not sample alike
            seq.seed = int(self._rng.integers(0, 2 ** 32))
        state = RequestState(seq, stream, IncrementalDetokenizer(self.tokenizer, list(request.prompt_token_ids)))
        self._pending_ids.discard(request.request_id)
        try:
            self.scheduler.add(seq)
        except (ValueError, QueueFullError) as e:  # validated requests should never fail here
            log.warning("request %s refused: %s", request.request_id, e)
            seq.finish_reason = FinishReason.ABORT
            stream.put(state.output(finished=True))
            return
        self._states[request.request_id] = state

    def step(self) -> int:
        """Admits new requests, runs one scheduled batch, streams outputs. Returns the rows it ran."""
        try:
            return self._step()
        finally:
            self._published = self._read_stats()

    def _step(self) -> int:
        self._drain_inbox()
        output = self.scheduler.schedule()
        rows = len(output.decodes) + len(output.prefills)
        sampled = self.runner.execute(output) if rows else {}
        if not rows and not output.finished:
            return 0
        finished = {s.request_id for s in self.scheduler.update(output, sampled)}
        for rid in list(sampled) + [r for r in finished if r not in sampled]:
            state = self._states[rid]
            if state.absorb():  # a stop string appeared: it wins over EOS and length
                if rid in finished:
                    state.seq.finish_reason = FinishReason.STOP
                else:
                    self.scheduler.finish(state.seq, FinishReason.STOP)
                    finished.add(rid)
            if rid in finished:
                self._finish(state)
            elif (out := state.output(finished=False)) is not None:
                state.stream.put(out)
        return rows

    def _finish(self, state: RequestState) -> None:
        # Leave the in-flight set before the last message goes out, so the client can reuse the id at once.
        with self._lock:
            self._states.pop(state.seq.request_id, None)
        state.stream.put(state.output(finished=True))

    # --- background loop (server) ---
    def warmup(self) -> float:
        """Compiles every bucket shape; returns seconds spent."""
        self.warmup_seconds = self.runner.warmup()
        log.info("warm-up compiled %d step shapes in %.1f s", self.runner.num_compilations, self.warmup_seconds)
        return self.warmup_seconds

    def start(self) -> None:
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while self._running:
            try:
                if self.step() == 0:
                    self._wakeup.wait(timeout=0.05 if self.has_unfinished() else 1.0)
                    self._wakeup.clear()
            except Exception:  # a broken step must not leave clients hanging forever
                log.exception("engine step failed; aborting every in-flight request")
                if self.runner.recover():  # the donated KV pages died with the step: cached blocks are gone
                    self.block_manager.reset_prefix_cache()
                self._abort_all()

    def _abort_all(self) -> None:
        self._drain_inbox()
        for rid in list(self._states):
            seq = self.scheduler.abort(rid)
            state = self._states.get(rid)
            if state is not None:
                if seq is None:
                    state.seq.finish_reason = FinishReason.ABORT
                self._finish(state)

    def shutdown(self, abort_inflight: bool = True, timeout: float = 30.0) -> None:
        """Stops the loop; in-flight requests are aborted (or, with abort_inflight=False, finished first)."""
        if self._thread is not None and not abort_inflight:
            deadline = time.monotonic() + timeout
            while self.has_unfinished() and time.monotonic() < deadline:
                time.sleep(0.01)
        self._running = False
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            if self._thread.is_alive():  # still inside a step: it must not race with _abort_all below
                log.error("engine loop did not stop within %.0f s; leaving it to finish", timeout)
                return
            self._thread = None
        self._abort_all()
