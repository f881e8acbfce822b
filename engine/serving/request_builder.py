"""Front-end-neutral request building: a prompt -> token ids, sampling fields -> SamplingParams with the
server's defaults, both -> an engine `Request`.

The gRPC front end (engine/serving/proto_convert.py) and the HTTP one (engine/serving/http_convert.py) both
call these, so a bad request gets the same check and the same message whichever way it came in. Checks that
need the loaded engine (token ids inside the vocabulary, prompt + max_tokens within --max-length, the KV
pool's size) stay in `LLMEngine.validate`, which `add_request` runs for every front end.
"""
from __future__ import annotations

import uuid

from engine.config import EngineConfig
from engine.core.request import Request
from engine.core.request_checks import check_before_tokenizing, check_prompt_size
from engine.core.sampling_params import SamplingParams

DEFAULT_MAX_TOKENS = 256  # for an unset max_tokens (lowered to what fits in --max-length)
PROMPT_KINDS = ("prompt", "messages", "prompt_token_ids")


class InvalidRequest(ValueError):
    """A client error; the message names the offending field (gRPC INVALID_ARGUMENT, HTTP 400)."""


def check_cheap_limits(request_id: str, cache_salt: str, stop, config: EngineConfig) -> None:
    """The limits that need no tokenizer (identifiers, stop strings), so an oversized request costs almost
    nothing; raises InvalidRequest. The prompt's own size is checked by `prompt_ids`, before it tokenizes."""
    try:
        check_before_tokenizing(request_id, cache_salt, stop, config)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None


def _encode_chat(messages: list[dict], tokenizer) -> list[int]:
    if not messages:
        raise InvalidRequest("messages is empty; send at least one ChatMessage")
    try:  # the tokenizer's checks name the field, e.g. "messages[1].role='robot' is not allowed; ..."
        if hasattr(tokenizer, "encode_chat"):  # the real tokenizer: also keeps a single BOS, like llama.cpp
            return list(tokenizer.encode_chat(messages, add_generation_prompt=True))
        return list(tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True)))
    except ValueError as e:
        raise InvalidRequest(str(e)) from None


def prompt_ids(kind: str, value, tokenizer, config: EngineConfig) -> list[int]:
    """Token ids of one prompt; raises InvalidRequest naming `kind`. Text over --max-prompt-bytes is refused
    before it is tokenized.

    kind: "prompt" (value: str, special-token text is that token, BOS per the GGUF), "messages" (value: a
    list of {"role", "content"} dicts, rendered with the chat template) or "prompt_token_ids" (value: ints,
    range-checked later by engine.add_request, which names the index).
    """
    try:
        check_prompt_size(kind, value, config)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
    if kind == "prompt":
        if not value:
            raise InvalidRequest("prompt is empty")
        ids = list(tokenizer.encode(value, add_special_tokens=True))
    elif kind == "messages":
        ids = _encode_chat(list(value), tokenizer)
    elif kind == "prompt_token_ids":
        ids = list(value)
    else:
        raise ValueError(f"prompt kind {kind!r} is not one of {', '.join(PROMPT_KINDS)}")
    if not ids:
        raise InvalidRequest(f"{kind} is empty" if kind == "prompt_token_ids" else f"{kind} encodes to no tokens")
    return ids


def sampling_params(kind: str, prompt_len: int, max_length: int, *, max_tokens: int | None = None,
                    temperature: float = 0.0, top_p: float | None = None, top_k: int = 0, seed: int | None = None,
                    stop=(), ignore_eos: bool = False) -> SamplingParams:
    """SamplingParams with the server's defaults for unset (None) fields; raises InvalidRequest.

    An unset max_tokens means min(DEFAULT_MAX_TOKENS, what fits in --max-length after the prompt).
    """
    room = max_length - prompt_len
    if room < 1:
        raise InvalidRequest(f"{kind}: the prompt has {prompt_len} tokens; at most {max_length - 1} fit "
                             f"(--max-length={max_length} counts prompt + completion)")
    try:
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else default_max_tokens(prompt_len, max_length),
            temperature=temperature, top_p=top_p if top_p is not None else 1.0, top_k=top_k, seed=seed,
            stop=tuple(stop), ignore_eos=ignore_eos)
    except ValueError as e:  # SamplingParams names the field: "sampling.top_p=..."
        raise InvalidRequest(str(e)) from None
    # prompt + max_tokens vs --max-length: checked by engine.add_request


def default_max_tokens(prompt_len: int, max_length: int) -> int:
    """An unset max_tokens (gRPC, HTTP, batch jobs): DEFAULT_MAX_TOKENS, lowered to what fits in --max-length
    after the prompt (< 1 when nothing fits)."""
    return min(DEFAULT_MAX_TOKENS, max_length - prompt_len)


def make_request(request_id: str, ids: list[int], sampling: SamplingParams, cache_salt: str = "") -> Request:
    """The engine Request; an empty request_id gets a fresh unique one."""
    return Request(request_id=request_id or uuid.uuid4().hex, prompt_token_ids=tuple(ids), sampling=sampling,
                   cache_salt=cache_salt)
