"""What goes into the engine (Request) and what comes out of it (RequestOutput), plus its errors.

The gRPC server, the offline `LLM` and the tests' fake engine all speak this contract:

    engine.add_request(Request) -> RequestStream   # ValueError (bad request), QueueFullError, DuplicateRequestError,
                                                   # EngineUnavailableError (shut down, draining or dead)
    engine.abort(request_id, stream=None) -> None  # frees the request's pages within one step; only ever
                                                   # reaches the request in flight under that id now
    stream.get(timeout=None) -> RequestOutput      # blocks; the last one has finish_reason set
    for out in stream: ...                         # iterates until the finished output

A request killed by an engine fault ends with finish_reason ABORT *and* `error` set (a RequestError):
front ends must end such a call with the error's status (ErrorCode: INTERNAL / UNAVAILABLE), never as a
normal finish. A plain ABORT (error None) is a client cancel or a server shutdown.
"""
from __future__ import annotations

import enum
import queue
from dataclasses import dataclass

from engine.core.sampling_params import SamplingParams


class FinishReason(str, enum.Enum):
    STOP = "stop"        # EOS or a stop string
    LENGTH = "length"    # max_tokens or --max-length reached
    ABORT = "abort"      # cancelled by the client or the server shutting down


class ErrorCode(str, enum.Enum):
    INTERNAL = "internal"        # an engine fault killed this request (gRPC INTERNAL, HTTP 500)
    UNAVAILABLE = "unavailable"  # the engine is restarting/stopped/draining (gRPC UNAVAILABLE, HTTP 503)


@dataclass(frozen=True)
class RequestError:
    """Why the engine, not the client, ended a request."""
    code: ErrorCode
    message: str


def describe_exception(e: BaseException) -> str:
    """One line for a client or a log: the exception's type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


class EngineUnavailableError(RuntimeError):
    """The engine takes no requests: it is shut down, draining, or dead after a fault (gRPC UNAVAILABLE)."""


class QueueFullError(RuntimeError):
    """The waiting queue is at --max-waiting-requests (gRPC RESOURCE_EXHAUSTED)."""


class DuplicateRequestError(ValueError):
    """A request with this request_id is already in flight (gRPC INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    cache_salt: str = ""


@dataclass(frozen=True)
class RequestOutput:
    """One streamed event: the tokens sampled since the previous event and their text."""
    request_id: str
    new_token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    error: RequestError | None = None   # set (with finish_reason ABORT) when an engine fault ended it


class RequestStream:
    """Thread-safe channel of RequestOutput for one request (engine thread puts, consumer gets)."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._queue: queue.Queue[RequestOutput] = queue.Queue()
        self.finished = False

    def put(self, output: RequestOutput) -> None:
        self._queue.put(output)

    def get(self, timeout: float | None = None) -> RequestOutput:
        """Next output; raises queue.Empty after `timeout` seconds."""
        out = self._queue.get(timeout=timeout)
        if out.finish_reason is not None:
            self.finished = True
        return out

    def drain(self) -> list[RequestOutput]:
        """Every output available now, without blocking (for callers that step the engine themselves)."""
        outs = []
        while True:
            try:
                outs.append(self._queue.get_nowait())
            except queue.Empty:
                break
            if outs[-1].finish_reason is not None:
                self.finished = True
        return outs

    def __iter__(self):
        while not self.finished:
            yield self.get()
