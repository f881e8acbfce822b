"""What LLMEngine does when a step fails or the engine cannot go on (WORKSPACE.md § Faults); mixed into
LLMEngine (engine/core/engine.py), whose inbox, scheduler, runner, block manager and group it uses.

A step that raises fails every admitted request (RequestOutput.error INTERNAL), frees their pages, lets the
runner recover its KV pages and then forgets every cached block — only once nothing holds a page, so no key
can point at a page whose contents died with the step. If that recovery raises too, or steps keep failing,
the engine is dead: every request in flight ends UNAVAILABLE, `add_request` raises EngineUnavailableError,
`failure` says why and `wait_until_stopped` returns. In a multi-process group no failed step is recovered
(the followers ran it too), and a lost follower kills the engine from the channel's watcher thread (`kill`).
"""
from __future__ import annotations

import logging

from engine.core.inbox import ResetPrefixCache, fault_output
from engine.core.request import ErrorCode, FinishReason, RequestError, describe_exception as describe

log = logging.getLogger(__name__)

# Failed steps in a row (no step with rows succeeding in between) after which the engine stops trying: a
# fault that survives recovery would otherwise fail every new request, forever, while health says SERVING.
MAX_CONSECUTIVE_FAILURES = 3


class EngineFaults:
    """LLMEngine's fault handling (a mixin: it reads the engine's state and sets its stop flags)."""

    def _on_step_failure(self, e: Exception) -> None:
        self._in_flight = None   # its requests are failed below; its tokens are never read
        self._step_failures += 1
        self._consecutive_failures += 1
        log.error("engine step failed (%d in a row); failing every admitted request", self._consecutive_failures,
                  exc_info=e)
        error = RequestError(ErrorCode.INTERNAL, f"the engine failed while running this request ({describe(e)}); "
                                                 "it was aborted: retry it")
        try:
            if self.group is not None:  # the followers ran (or lost) this step too: no process can recover alone
                raise RuntimeError(f"a step failed in a group of {self.group.num_processes} processes "
                                   f"({self.group.wait_lost(2.0) or describe(e)}); they must restart together")
            self.runner.recover()  # the donated KV pages may have died with the step: fresh ones if so
            if self._consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                raise RuntimeError(f"{self._consecutive_failures} steps failed in a row (last: {describe(e)})")
            for state in list(self.inbox.states.values()):
                self.scheduler.finish(state.seq, FinishReason.ABORT)
                self.inbox.finished(state)
                state.stream.put(fault_output(state, error))
            # Only now does no request hold a page, so this forgets every cached block (a key left pointing
            # at a page whose contents were lost would serve wrong tokens as a "hit"). Done even when recover()
            # found the pages alive: an asynchronous device error can poison buffers that look alive.
            self.block_manager.reset_prefix_cache()
            if self.block_manager.num_used_pages:
                raise RuntimeError(f"{self.block_manager.num_used_pages} KV pages are still in use after every "
                                   "request was failed")
        except Exception as fatal:
            log.exception("engine recovery failed")
            self._die(f"no recovery after a failed step: {describe(fatal)}")

    def _die(self, reason: str) -> None:
        """The engine cannot go on: every request in flight ends UNAVAILABLE, every new one is refused."""
        self.inbox.stop(failure=reason)
        log.error("the engine has stopped: %s", reason)
        states = self._end_streams(RequestError(
            ErrorCode.UNAVAILABLE, f"the engine stopped after a fault it cannot recover from ({reason}); "
                                   "retry on a restarted server"))
        try:  # give their pages back if the bookkeeping still works (it may be what broke)
            for state in states:
                self.scheduler.finish(state.seq, FinishReason.ABORT)
        except Exception:
            log.exception("could not free the pages of the failed requests")
        self._stopped.set()

    def _end_streams(self, error: RequestError) -> list:
        """Sends every request in flight its last message with `error`, touching neither scheduler nor runner;
        returns the admitted ones' states."""
        states, pending, items = self.inbox.take_all()
        for state in states:
            state.stream.put(fault_output(state, error))
        for entry in pending:
            entry.stream.put(entry.final_output(error))
        for command in items:
            if isinstance(command, ResetPrefixCache):
                command.reply.set_result(False)
        return states

    def kill(self, reason: str) -> None:
        """From any thread (a follower process died): the engine cannot go on. Every request in flight ends
        UNAVAILABLE now, new ones are refused and the loop stops, without waiting for a step that may never
        return (a collective with a dead peer); the scheduler is left alone, the process is about to exit."""
        if self.inbox.failure is not None or self._stopped.is_set():
            return
        self.inbox.stop(failure=reason)
        log.error("the engine has stopped: %s", reason)
        self._running = False
        self._end_streams(RequestError(ErrorCode.UNAVAILABLE, f"the engine stopped: {reason}; retry on a "
                                                              "restarted server"))
        self._wakeup.set()
        self._stopped.set()
