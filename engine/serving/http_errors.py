"""Errors of the HTTP front end in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Statuses: 400 a bad request (the shared checks' messages, engine/serving/request_builder.py and LLMEngine.validate),
404 an unknown model or path, 429 the waiting queue is full, 500 an engine fault killed the request,
503 the model is loading, the server is draining, or the engine is unavailable.
"""
from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from engine.core.request import ErrorCode, RequestError
from engine.serving.front_end_gate import GateClosed

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}
STATUS_OF_ERROR_CODE = {ErrorCode.INTERNAL: 500, ErrorCode.UNAVAILABLE: 503}
# The shared messages start with the field they blame, in gRPC's spelling ("sampling.top_p=0 ...",
# "prompt_token_ids[3]=..."): the HTTP `param` is that field's name in the OpenAI request.
_FIELD = re.compile(r"^(sampling\.)?([a-z_]+)")
_PARAMS = {"prompt_token_ids": "prompt", "input": "prompt"}


class HttpError(Exception):
    """Raised anywhere in a handler; answered as the OpenAI error body with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def param_of(message: str, known: frozenset[str]) -> str | None:
    """The request field a shared check's message names (None when it names none of `known`)."""
    m = _FIELD.match(message)
    if m is None:
        return None
    name = _PARAMS.get(m.group(2), m.group(2))
    return name if name in known else None


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def engine_error(error: RequestError | None) -> HttpError:
    """The HttpError for a request the engine ended abnormally (`error` None: aborted by the server)."""
    if error is None:  # only the server aborts a request whose client is still there: shutdown or restart
        return HttpError(503, "the request was aborted by the server (shutting down or restarting); retry",
                         code=ErrorCode.UNAVAILABLE.value)
    return HttpError(STATUS_OF_ERROR_CODE[error.code], error.message, code=error.code.value)


def sse_error_event(error: HttpError) -> bytes:
    """An error after the stream started (headers already sent as 200), framed as vLLM does."""
    return b"data: " + json.dumps(error_body(error.status, error.message, error.param, error.code)).encode() + b"\n\n"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if not loc:
        return f"the request body must be a JSON object: {first.get('msg')}", None
    # "messages[0].content" reads better than pydantic's ("messages", 0, "content")
    path = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".")
    got = f" (got {first['input']!r:.80})" if "input" in first and first.get("type") != "missing" else ""
    return f"{path}: {first.get('msg')}{got}", loc[0]


def install_handlers(app: FastAPI) -> None:
    """Every error the app can raise answers in OpenAI's shape (FastAPI's default is 422 {"detail": ...})."""

    @app.exception_handler(HttpError)
    async def _http_error(request, exc: HttpError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(GateClosed)
    async def _closed(request, exc: GateClosed):  # the model loads, the server drains or the engine is dead
        return error_response(503, str(exc), code=ErrorCode.UNAVAILABLE.value)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(HTTPException)
    async def _starlette(request, exc: HTTPException):
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):  # a bug: never reported as success, and logged
        log.exception("HTTP %s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", code=ErrorCode.INTERNAL.value)
