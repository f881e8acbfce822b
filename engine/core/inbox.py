"""Inbox: what other threads hand the engine thread (adds, aborts, cache resets), and the requests in flight.

Every method is thread-safe (one lock). A request is *pending* from `add` until the engine thread admits it
in `drain`, then *admitted* (its RequestState in `states`) until `finished`. An abort picks its target when
it is called: a pending request is ended at once, an admitted one is queued for the engine thread by
identity, anything else is a no-op — so an abort that arrives after its request finished can never reach a
later request that reuses the id.
"""
from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from engine.core.request_state import RequestState
from engine.core.request import (DuplicateRequestError, EngineUnavailableError, FinishReason, QueueFullError, Request,
                            RequestError, RequestOutput, RequestStream)


@dataclass(frozen=True)
class Abort:
    """Abort this admitted request (picked by identity when the abort was asked for)."""
    state: RequestState


@dataclass(frozen=True)
class ResetPrefixCache:
    """Drop every cached block not in use; `reply` gets whether it did."""
    reply: Future


@dataclass
class Pending:
    """An added request not admitted yet."""
    request: Request
    stream: RequestStream

    def final_output(self, error: RequestError | None = None) -> RequestOutput:
        return RequestOutput(self.request.request_id, (), "", FinishReason.ABORT,
                             len(self.request.prompt_token_ids), 0, 0, error)


def fault_output(state: RequestState, error: RequestError) -> RequestOutput:
    """The last message of an admitted request ended by a fault (the detokenizer is not touched: it may be
    what broke)."""
    seq = state.seq
    return RequestOutput(seq.request_id, (), "", FinishReason.ABORT, seq.prompt_len, len(seq.output_token_ids),
                         seq.cached_prompt_tokens, error)


class Inbox:
    def __init__(self):
        self.lock = threading.Lock()
        self._items: collections.deque = collections.deque()  # Abort | ResetPrefixCache, in arrival order
        self._adds: list[Pending] = []
        self._pending: dict[str, Pending] = {}
        self.states: dict[str, RequestState] = {}   # admitted; read by the engine thread without the lock
        self._accepting = True
        self.failure: str | None = None

    # -- any thread --------------------------------------------------------------------------------------
    def add(self, request: Request, stream: RequestStream, num_waiting: Callable[[], int], max_waiting: int) -> None:
        """Queues a request; EngineUnavailableError / DuplicateRequestError / QueueFullError refuse it.
        `num_waiting()` (the scheduler's queue) is read under the lock that `drain` admits under, so every
        request is counted either here or there, never in neither."""
        with self.lock:
            self._check_accepting()
            if request.request_id in self.states or request.request_id in self._pending:
                raise DuplicateRequestError(f"request_id={request.request_id!r} is already in flight")
            if num_waiting() + len(self._pending) >= max_waiting:
                raise QueueFullError(f"the waiting queue is full ({max_waiting} requests); retry later")
            entry = Pending(request, stream)
            self._pending[request.request_id] = entry
            self._adds.append(entry)

    def abort(self, request_id: str, stream: RequestStream | None) -> bool:
        """Targets the request in flight under `request_id` now (with `stream`: only if it is its stream).
        Returns True when the engine thread has an abort to apply."""
        with self.lock:
            entry = self._pending.get(request_id)
            if entry is not None and (stream is None or stream is entry.stream):
                del self._pending[request_id]
                self._adds.remove(entry)
                entry.stream.put(entry.final_output())
                return False
            state = self.states.get(request_id)
            if state is None or not (stream is None or stream is state.stream):
                return False
            self._items.append(Abort(state))
            return True

    def request_reset(self) -> Future:
        """Queues a prefix-cache reset for the engine thread; the future gets its result."""
        with self.lock:
            self._check_accepting()
            command = ResetPrefixCache(Future())
            self._items.append(command)
            return command.reply

    def stop(self, failure: str | None = None) -> None:
        """Refuses every add from now on (a shutdown, or with `failure` a dead engine)."""
        with self.lock:
            self._accepting = False
            self.failure = self.failure or failure

    def has_unfinished(self) -> bool:
        with self.lock:
            return bool(self._adds or self._items or self.states or self._pending)

    def _check_accepting(self) -> None:
        if self.failure is not None:
            raise EngineUnavailableError(f"the engine stopped after a fault it cannot recover from "
                                         f"({self.failure}); retry on a restarted server")
        if not self._accepting:
            raise EngineUnavailableError("the engine is shutting down")

    # -- the engine thread -------------------------------------------------------------------------------
    def drain(self, admit: Callable[[Pending], RequestState | None]) -> list[Abort | ResetPrefixCache]:
        """Admits every pending add with `admit` (under the lock; None = it failed and ended its stream) and
        returns the aborts and resets to apply, in arrival order."""
        with self.lock:
            adds, self._adds = self._adds, []
            items, self._items = list(self._items), collections.deque()
            for entry in adds:
                del self._pending[entry.request.request_id]
                state = admit(entry)
                if state is not None:
                    self.states[entry.request.request_id] = state
        return items

    def finished(self, state: RequestState) -> None:
        """`state` leaves the in-flight set (before its last message goes out, so the id can be reused at once)."""
        with self.lock:
            if self.states.get(state.seq.request_id) is state:
                del self.states[state.seq.request_id]

    def take_all(self) -> tuple[list[RequestState], list[Pending], list[Abort | ResetPrefixCache]]:
        """Empties the inbox: (admitted states, pending adds, queued aborts and resets)."""
        with self.lock:
            states, self.states = list(self.states.values()), {}
            pending, self._pending, self._adds = list(self._pending.values()), {}, []
            items, self._items = list(self._items), collections.deque()
        return states, pending, items
