"""The response to one generation request: it relays the engine's RequestStream to the client as
server-sent events (OpenAI framing) or as one JSON body, and aborts the request when the client goes away.

RequestStream.get blocks, so each read runs in a thread of the front end's executor; the event loop only
writes. A task listens for the client's `http.disconnect` for the whole life of the response (also before
the first token, while the request is still queued) and calls `engine.abort`, so the pages come back within
one engine step. The status line waits for the engine's first output: a request the engine kills before
its first token gets a real 500/503; after that, errors arrive as a `data: {"error": ...}` event, then
`data: [DONE]`, as vLLM sends them.
"""
from __future__ import annotations

import asyncio
import json
import queue

from starlette.responses import Response

from engine.serving import http_convert
from engine.serving.http_errors import HttpError, engine_error, error_body, sse_error_event
from engine.core.request import FinishReason, RequestOutput

POLL_SECONDS = 0.5   # how often a blocked read re-checks that its response still wants it
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]  # proxies such as nginx must not buffer the stream
DONE = b"data: [DONE]\n\n"


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class EngineResponse(Response):
    """ASGI response for one admitted engine request. `on_end()` runs exactly once, however it ends."""

    def __init__(self, engine, stream, call: http_convert.Call, executor, timer, on_end):
        self._engine, self._stream, self._call = engine, stream, call
        self._executor, self._timer, self._on_end = executor, timer, on_end
        self._done = False          # the engine sent the final output
        self._gone = False          # the client disconnected
        self.status_code = 200      # updated before the status line goes out (for logs)
        self.raw_headers: list = []  # Response API; the real headers are chosen when the status line goes out
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            if self._call.stream:
                await self._stream_events(send)
            else:
                await self._send_whole(send)
        except OSError:  # the connection broke while writing: the watcher (or the finally) aborts
            pass
        finally:
            watcher.cancel()
            if not self._done:
                self._abort()
            self._on_end()

    # -- the engine side -----------------------------------------------------------------------------
    async def _watch(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._gone = True
                if not self._done:
                    self._abort()
                return

    def _abort(self) -> None:
        """Ends the request before the engine did (client gone, broken write): its pages go back next step."""
        self._done = True
        if self._timer is not None:
            self._timer.on_finish(FinishReason.ABORT)
        self._engine.abort(self._call.request_id, self._stream)  # this call's request only, never a newer one

    async def _next(self) -> list[RequestOutput] | None:
        """The next outputs (everything available, at least one); None once the client is gone."""
        loop = asyncio.get_running_loop()
        while not self._gone:
            try:
                out = await loop.run_in_executor(self._executor, self._stream.get, POLL_SECONDS)
            except queue.Empty:
                continue
            outs = [out] if out.finish_reason is not None else [out, *self._stream.drain()]
            for o in outs:
                if self._timer is not None:
                    self._timer.on_tokens(len(o.new_token_ids))
                if o.finish_reason is not None and not self._done:
                    self._done = True
                    if self._timer is not None:
                        self._timer.on_finish(o.finish_reason)
            return outs
        return None

    # -- the client side -----------------------------------------------------------------------------
    async def _send_whole(self, send) -> None:
        text, token_ids = [], []
        while (outs := await self._next()) is not None:
            text.extend(o.text for o in outs)
            token_ids.extend(t for o in outs for t in o.new_token_ids)
            last = outs[-1]
            if last.finish_reason is None:
                continue
            if _failed(last):
                return await self._send_error(send, engine_error(last.error))
            body = json.dumps(http_convert.response(self._call, "".join(text), token_ids, last)).encode()
            return await self._send_json(send, 200, body)

    async def _stream_events(self, send) -> None:
        outs = await self._next()
        if outs is None:
            return
        if _failed(outs[-1]) and not any(o.new_token_ids for o in outs):  # nothing streamed yet: a real status
            return await self._send_error(send, engine_error(outs[-1].error))
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        opening = http_convert.first_chunk(self._call)
        pending = [sse(opening)] if opening else []
        while outs is not None:
            for out in outs:
                if _failed(out):
                    pending += [sse_error_event(engine_error(out.error)), DONE]
                else:
                    pending += [sse(c) for c in http_convert.chunks(self._call, out)]
                    pending += [DONE] if out.finish_reason is not None else []
            await send({"type": "http.response.body", "body": b"".join(pending), "more_body": not self._done})
            if self._done:
                return
            pending, outs = [], await self._next()

    async def _send_error(self, send, error: HttpError) -> None:
        body = json.dumps(error_body(error.status, error.message, error.param, error.code)).encode()
        await self._send_json(send, error.status, body)

    async def _send_json(self, send, status: int, body: bytes) -> None:
        self.status_code = status
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _failed(out: RequestOutput) -> bool:
    """An engine fault (error set) or a server-side abort: never reported as a normal finish."""
    return out.finish_reason is not None and (out.error is not None or out.finish_reason == FinishReason.ABORT)
