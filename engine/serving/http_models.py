"""Pydantic models of the OpenAI-compatible request bodies, and the table of OpenAI fields we do not support.

Models are strict (no "5" for 5, no 1 for true) and keep unknown fields aside (`model_extra`), so
`unsupported_field` can answer 400 naming the field instead of silently ignoring it. A known OpenAI field
we do not implement is accepted only at its neutral value (`n=1`, `logprobs=null`, `tools=[]`, ...).
Value ranges (max_tokens >= 1, 0 < top_p <= 1, ...) are checked by engine/serving/request_builder.py, shared with
gRPC; only what JSON allows and protobuf cannot carry (a negative or huge seed) is checked here.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class _Sampling(_Body):
    """Fields both endpoints share. Extensions (as in vLLM): top_k, ignore_eos, cache_salt, return_token_ids."""
    model: str | None = None            # None or the served model's name (anything else: 404)
    temperature: float | None = None    # None: 1.0, OpenAI's default; 0 = greedy
    top_p: float | None = None
    seed: int | None = Field(default=None, ge=0, lt=2 ** 64)  # the gRPC field is a uint64
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = None            # 0 or -1 (vLLM's spelling) = off
    ignore_eos: bool = False
    cache_salt: str | None = None       # requests with different salts never share cached KV pages
    return_token_ids: bool = False      # each choice also carries the generated `token_ids`


class CompletionRequest(_Sampling):
    """POST /v1/completions. `prompt`: a string, a list of token ids, or a one-element list of either."""
    prompt: Any
    max_tokens: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: str
    content: str | list[TextPart]
    name: str | None = None             # accepted only unset: the chat templates we render ignore it


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions; `max_completion_tokens` wins over the older `max_tokens`."""
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


def _unset(v) -> bool:
    return v is None or v == [] or v == {}


# field -> (is this value the neutral one?, what we accept)
UNSUPPORTED: dict[str, tuple] = {
    "n": (lambda v: v in (None, 1), "only n=1 (one choice per request)"),
    "best_of": (lambda v: v in (None, 1), "only best_of=1"),
    "echo": (lambda v: v in (None, False), "only echo=false"),
    "suffix": (lambda v: v in (None, ""), "no suffix (no fill-in-the-middle)"),
    "logprobs": (lambda v: v in (None, False), "no logprobs"),
    "top_logprobs": (lambda v: v in (None, 0), "no top_logprobs"),
    "frequency_penalty": (lambda v: v in (None, 0), "only frequency_penalty=0"),
    "presence_penalty": (lambda v: v in (None, 0), "only presence_penalty=0"),
    "repetition_penalty": (lambda v: v in (None, 1), "only repetition_penalty=1"),
    "logit_bias": (_unset, "no logit_bias"),
    "tools": (_unset, "no tools"),
    "tool_choice": (lambda v: v in (None, "none"), "no tools (tool_choice='none')"),
    "parallel_tool_calls": (lambda v: v in (None, True, False), "no tools"),
    "functions": (_unset, "no functions"),
    "function_call": (lambda v: v in (None, "none"), "no functions"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, "only plain text ({'type': 'text'})"),
    "modalities": (lambda v: v in (None, ["text"]), "only text"),
    "audio": (lambda v: v is None, "no audio"),
    "prediction": (lambda v: v is None, "no predicted outputs"),
    "store": (lambda v: v in (None, False), "nothing is stored (store=false)"),
    "metadata": (_unset, "nothing is stored"),
    "user": (lambda v: v is None or isinstance(v, str), "a string (it is not used)"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "the default tier"),
}


def unsupported_field(body: _Body) -> tuple[str, str] | None:
    """(field, message) for the first field we cannot honour; None when every field is fine."""
    for name, value in (body.model_extra or {}).items():
        if name not in UNSUPPORTED:
            return name, f"{name}: unknown field; this server does not support it"
        neutral, accepted = UNSUPPORTED[name]
        if not neutral(value):
            return name, f"{name}={value!r} is not supported; this server accepts {accepted}"
    return None

