"""What both front ends (gRPC servicer, HTTP) keep for the server's lifecycle, in one place: the engine
once attached, whether the server drains, why the engine died, and how many generation calls are in flight
(so a shutdown can wait for them). Thread-safe; no gRPC, no HTTP."""
from __future__ import annotations

import threading


class GateClosed(Exception):
    """No call can be taken now (engine dead, server draining, model still loading); str() is the client's
    message (gRPC UNAVAILABLE, HTTP 503)."""


class GateFull(Exception):
    """`max_in_flight` calls are already in flight (gRPC RESOURCE_EXHAUSTED)."""

    def __init__(self, in_flight: int):
        super().__init__(f"{in_flight} calls are in flight")
        self.in_flight = in_flight


class FrontEndGate:
    """Invariant: `in_flight` counts the calls `enter` let in that have not `leave`d yet."""

    def __init__(self, max_in_flight: int | None = None):
        self.max_in_flight = max_in_flight
        self._cond = threading.Condition()
        self._engine = None
        self._draining = False
        self._failure: str | None = None
        self._in_flight = 0

    def attach(self, engine) -> None:
        """Starts letting calls through to `engine` (warmed up and started)."""
        with self._cond:
            self._engine = engine

    def drain(self) -> None:
        """Stops letting new calls in; calls already in flight carry on."""
        with self._cond:
            self._draining = True

    def mark_failed(self, reason: str) -> None:
        """The engine is dead: every new call is refused naming `reason`."""
        with self._cond:
            self._failure = reason

    @property
    def engine(self):
        return self._engine

    @property
    def draining(self) -> bool:
        return self._draining

    def ready_engine(self):
        """The engine; GateClosed while the engine is dead, the server drains or the model loads."""
        if self._failure is not None:
            raise GateClosed(f"the engine stopped after a fault ({self._failure}); the server is restarting, "
                             "retry shortly")
        if self._draining:
            raise GateClosed("the server is shutting down")
        if self._engine is None:
            raise GateClosed("the model is still loading; retry shortly")
        return self._engine

    def enter(self):
        """Counts one call as in flight and returns the engine; GateClosed, or GateFull at the limit (checked
        first thing, so a refusal costs no work). Every successful enter needs one `leave`."""
        with self._cond:
            engine = self.ready_engine()
            if self.max_in_flight is not None and self._in_flight >= self.max_in_flight:
                raise GateFull(self._in_flight)
            self._in_flight += 1
            return engine

    def leave(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None) -> bool:
        """Blocks until no call is in flight; False if `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._in_flight == 0, timeout)
