"""LLMEngine: scheduler + runner behind a thread-safe request API, stepped by one background thread
(server) or by the caller (offline `LLM`). Both paths run the same `step()`.

Threading: `add_request` / `abort` / `reset_prefix_cache` only touch an inbox under a lock; every scheduler,
block-manager and runner call happens in whichever thread calls `step()` — one at a time.

Faults: what a failed step does, and how the engine dies, is engine/core/engine_faults.py (mixed in).
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np

from engine.config import EngineConfig
from engine.core.detokenizer import IncrementalDetokenizer
from engine.core.engine_faults import EngineFaults
from engine.loading.engine_parts import LoadedEngineParts, load_engine_parts
from engine.core.inbox import Abort, Inbox, Pending, ResetPrefixCache
from engine.core.request_state import RequestState
from engine.core.request import (EngineUnavailableError, ErrorCode, FinishReason, Request, RequestError, RequestStream,
                            describe_exception as describe)
from engine.core.request_checks import check_request
from engine.core.sequence import Sequence
from engine.core.stats import EngineStats

log = logging.getLogger(__name__)


class LLMEngine(EngineFaults):
    def __init__(self, config: EngineConfig, group=None):
        """`group`: process 0's engine/device/control_channel.Leader in a multi-process server (None: one process)."""
        parts: LoadedEngineParts = load_engine_parts(config)
        self.config = parts.config                  # every None resolved
        self.model_config = parts.model_config
        self.model_name = parts.model_config.name
        self.tokenizer = parts.tokenizer
        self.device_description = parts.device_description
        self.block_manager = parts.block_manager
        self.scheduler = parts.scheduler
        self.runner = parts.runner
        self.inbox = Inbox()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False
        self._stopped = threading.Event()            # dead or shut down
        self._step_failures = self._consecutive_failures = 0
        self._in_flight = None                       # (output, launched, pending) of the step not yet booked
        self._rng = np.random.default_rng(self.config.seed)
        self._published = self._read_stats()
        self.warmup_seconds = 0.0
        self.group = group
        if group is not None:  # followers launch every step process 0 launches (engine/device/follower.py)
            self.runner.mirror = group.broadcast
            group.on_lost = self.kill

    # --- request API (any thread) ---
    def validate(self, request: Request) -> None:
        """ValueError naming the field when the request cannot run on this engine."""
        check_request(request, self.config, self.model_config.vocab_size, self.block_manager.num_total_pages)

    def add_request(self, request: Request) -> RequestStream:
        """Raises ValueError (bad request), DuplicateRequestError, QueueFullError, EngineUnavailableError."""
        self.validate(request)
        stream = RequestStream(request.request_id)
        self.inbox.add(request, stream, lambda: self.scheduler.num_waiting, self.config.max_waiting_requests)
        self._wakeup.set()
        return stream

    def abort(self, request_id: str, stream: RequestStream | None = None) -> None:
        """Ends the request in flight under `request_id` (with `stream`: only if it is that request's); a
        finished or unknown id is a no-op. Its pages are freed within one step."""
        if self.inbox.abort(request_id, stream):
            self._wakeup.set()

    def reset_prefix_cache(self) -> bool:
        """Drops every cached block not in use. Runs in the stepping thread when one is running."""
        if self._thread is None:
            return self.block_manager.reset_prefix_cache()
        reply = self.inbox.request_reset()
        self._wakeup.set()
        try:
            return reply.result(timeout=60.0)
        except TimeoutError:
            raise RuntimeError("reset_prefix_cache: the engine loop did not answer within 60 s") from None

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
            preemptions=self.scheduler.num_preemptions, num_compilations=self.runner.num_compilations,
            num_step_shapes=len(self.runner.buckets.all_shapes()), step_failures=self._step_failures)

    def has_unfinished(self) -> bool:
        return self.inbox.has_unfinished()

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer serve (None while it can)."""
        return self.inbox.failure

    def wait_until_stopped(self, timeout: float | None = None) -> str | None:
        """Blocks until the engine dies or is shut down (or `timeout` passes); returns `failure`."""
        self._stopped.wait(timeout)
        return self.inbox.failure

    # --- the step (one thread at a time) ---
    def _drain_inbox(self) -> None:
        for command in self.inbox.drain(self._admit):
            if isinstance(command, Abort):
                state = command.state
                if self.inbox.states.get(state.seq.request_id) is state:  # still the request it was issued for
                    self.scheduler.finish(state.seq, FinishReason.ABORT)
                    self._finish(state)
            else:  # ResetPrefixCache: the cache's bookkeeping lives only here, in process 0 (followers hold
                command.reply.set_result(self.block_manager.reset_prefix_cache())  # pages, not keys)

    def _admit(self, entry: Pending) -> RequestState | None:
        """Hands one request to the scheduler. It succeeds or fails on its own: an error here ends this
        request (INTERNAL) and the rest of the inbox is admitted as usual."""
        request = entry.request
        try:
            seq = Sequence(request)
            if seq.seed is None:  # unseeded: a fresh draw, so equal requests do not sample alike
                seq.seed = int(self._rng.integers(0, 2 ** 32))
            state = RequestState(seq, entry.stream,
                                 IncrementalDetokenizer(self.tokenizer, list(request.prompt_token_ids)))
            self.scheduler.add(seq)
        except Exception as e:  # validated requests should never fail here
            log.exception("request %s could not be admitted", request.request_id)
            entry.stream.put(entry.final_output(RequestError(
                ErrorCode.INTERNAL, f"the engine could not admit this request ({describe(e)})")))
            return None
        return state

    def step(self) -> int:
        """Admits new requests, runs one scheduled batch, streams outputs. Returns the rows it ran.
        A failure fails the admitted requests and recovers (see the module docstring), then re-raises."""
        if self.inbox.failure is not None:
            raise EngineUnavailableError(self.inbox.failure)
        try:
            rows = self._step()
            if rows:
                self._consecutive_failures = 0
            return rows
        except Exception as e:
            self._on_step_failure(e)
            raise
        finally:
            self._published = self._read_stats()

    def _step(self) -> int:
        """Schedules and launches step k, then books step k-1 (whose tokens the device is handing to step k)
        while k runs: the host work of a step hides behind the next one (vLLM's async scheduling, SGLang's
        overlap scheduler). With async_scheduling off, each step is booked before the next is scheduled."""
        self._drain_inbox()
        output = self.scheduler.schedule()
        rows = len(output.decodes) + len(output.prefills)
        current = None
        if rows:
            launched = self.runner.execute(output)
            current = (output, launched, self.scheduler.advance(output))
        elif output.finished:
            current = (output, None, [])
        previous, self._in_flight = self._in_flight, current
        if previous is not None:
            self._complete(*previous)
        if current is not None and (not self.config.async_scheduling or not rows):
            self._in_flight = None
            self._complete(*current)
        return rows or int(previous is not None)

    def _complete(self, output, launched, pending) -> None:
        """Books a launched step's tokens and streams what they add (stop strings win over EOS and length)."""
        sampled = launched.sampled() if launched is not None else {}
        finished = self.scheduler.complete(output, pending, sampled)
        ended = {id(s) for s in finished}
        for seq in [s for s, _ in pending if id(s) not in ended] + finished:
            state = self.inbox.states.get(seq.request_id)
            if state is None or state.seq is not seq or seq.finish_reason is FinishReason.ABORT:
                continue    # aborted while its step was in flight (its last message is already out)
            if state.absorb():
                self.scheduler.stop(seq)
                ended.add(id(seq))
            if id(seq) in ended:
                self._finish(state)
            elif (out := state.output(finished=False)) is not None:
                state.stream.put(out)

    def _finish(self, state: RequestState) -> None:
        self.inbox.finished(state)
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
        try:
            while self._running and self.inbox.failure is None:
                try:
                    if self.step() == 0:
                        self._wakeup.wait(timeout=0.05 if self.has_unfinished() else 1.0)
                        self._wakeup.clear()
                except Exception:  # step() has logged it, failed the requests and recovered (or marked the
                    continue       # engine dead, which ends the loop)
        finally:
            if self._running and self.inbox.failure is None:  # something no handler expected ended the loop
                self._die("the engine loop stopped unexpectedly")

    def _abort_all(self) -> None:
        """With the loop stopped: every request in flight ends with ABORT (a shutdown, not a fault)."""
        states, pending, items = self.inbox.take_all()
        for entry in pending:
            entry.stream.put(entry.final_output())
        for command in items:
            if isinstance(command, ResetPrefixCache):
                command.reply.set_result(self.block_manager.reset_prefix_cache())
        for state in states:
            self.scheduler.finish(state.seq, FinishReason.ABORT)
            state.stream.put(state.output(finished=True))

    def shutdown(self, abort_inflight: bool = True, timeout: float = 30.0) -> None:
        """Refuses new requests, stops the loop; in-flight requests are aborted (or, with abort_inflight=False,
        finished first). Returns within about `timeout` seconds whatever the loop is doing."""
        deadline = time.monotonic() + timeout
        self.inbox.stop()
        if self._thread is not None and not abort_inflight:
            while self.has_unfinished() and time.monotonic() < deadline:
                time.sleep(0.01)
        self._running = False
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():  # stuck inside a step: leave the scheduler alone, but end every stream
                log.error("engine loop did not stop within %.0f s; ending its streams without it", timeout)
                self._end_streams(RequestError(ErrorCode.UNAVAILABLE, "the server is shutting down"))
                self._stop_group()
                self._stopped.set()
                return
            self._thread = None
        if self.inbox.failure is None:
            self._abort_all()
        self._stop_group()
        self._stopped.set()

    def _stop_group(self) -> None:
        """Shutdown reaches every process: the followers stop once no step will follow."""
        if self.group is not None:
            self.group.stop(self.inbox.failure)
