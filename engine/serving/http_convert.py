"""OpenAI request bodies -> engine Requests (through engine/serving/request_builder.py, shared with gRPC), and
engine RequestOutputs -> OpenAI response objects and stream chunks.

Defaults that differ from gRPC, because OpenAI clients rely on them: an unset `temperature` is 1.0 (gRPC:
0, greedy). `max_tokens` unset keeps the shared rule, min(256, what fits in --max-length).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from engine.serving import request_builder
from engine.serving.http_errors import HttpError, param_of
from engine.serving.http_models import ChatCompletionRequest, CompletionRequest, unsupported_field
from engine.core.request import FinishReason, Request, RequestOutput
from engine.serving.request_builder import InvalidRequest

OPENAI_DEFAULT_TEMPERATURE = 1.0
_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


@dataclass(frozen=True)
class Call:
    """What a response needs to know about the request it answers."""
    chat: bool
    request_id: str        # also the response's "id": cmpl-... / chatcmpl-...
    model: str
    created: int
    stream: bool
    include_usage: bool
    return_token_ids: bool = False


def _is_token_ids(v) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _completion_prompt(prompt) -> tuple[str, object]:
    """(request_builder kind, value) for a completion's `prompt`: one string or one list of token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _is_token_ids(prompt[0])):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return "prompt", prompt
    if _is_token_ids(prompt):
        return "prompt_token_ids", prompt
    if isinstance(prompt, list) and all(isinstance(p, str) or _is_token_ids(p) for p in prompt) and prompt:
        raise HttpError(400, f"prompt: a batch of {len(prompt)} prompts is not supported; send one prompt "
                             "per request", "prompt", "unsupported_parameter")
    raise HttpError(400, f"prompt must be a string or a list of token ids, got {prompt!r:.80}", "prompt")


def _message_text(i: int, content) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise HttpError(400, f"messages[{i}].content[{j}].type={part.type!r} is not supported; only "
                                 "{'type': 'text', 'text': ...} parts", "messages", "unsupported_parameter")
        texts.append(part.text)
    return "\n".join(texts)  # as vLLM joins text parts


def _chat_messages(body: ChatCompletionRequest) -> list[dict]:
    for i, m in enumerate(body.messages):
        if m.name is not None:
            raise HttpError(400, f"messages[{i}].name is not supported; leave it unset", "messages",
                            "unsupported_parameter")
    return [{"role": m.role, "content": _message_text(i, m.content)} for i, m in enumerate(body.messages)]


def _check_common(body, engine) -> None:
    if body.model is not None and body.model != engine.model_name:
        raise HttpError(404, f"model={body.model!r} does not exist; this server serves {engine.model_name!r} "
                             "(GET /v1/models)", "model", "model_not_found")
    bad = unsupported_field(body)
    if bad is not None:
        raise HttpError(400, bad[1], bad[0], "unsupported_parameter")


def build(body: CompletionRequest | ChatCompletionRequest, engine) -> tuple[Request, Call]:
    """The engine Request for one body, and its Call; raises HttpError (400 naming the field, or 404)."""
    chat = isinstance(body, ChatCompletionRequest)
    _check_common(body, engine)
    fields = frozenset(type(body).model_fields)
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    try:
        request_builder.check_cheap_limits("", body.cache_salt or "", stop, engine.config)
        if chat:
            kind, value = "messages", _chat_messages(body)
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        else:
            (kind, value), max_tokens = _completion_prompt(body.prompt), body.max_tokens
        ids = request_builder.prompt_ids(kind, value, engine.tokenizer, engine.config)
        sampling = request_builder.sampling_params(
            kind, len(ids), engine.config.max_length, max_tokens=max_tokens,
            temperature=OPENAI_DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
            top_p=body.top_p, top_k=0 if body.top_k in (None, -1) else body.top_k, seed=body.seed, stop=stop,
            ignore_eos=body.ignore_eos)
    except InvalidRequest as e:
        raise HttpError(400, str(e), param_of(str(e), fields)) from None
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    call = Call(chat, request_id, engine.model_name, int(time.time()), body.stream, include_usage,
                body.return_token_ids)
    return request_builder.make_request(request_id, ids, sampling, body.cache_salt or ""), call


def usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": out.cached_prompt_tokens}}


def _envelope(call: Call, stream: bool) -> dict:
    kind = ("chat.completion.chunk" if stream else "chat.completion") if call.chat else "text_completion"
    return {"id": call.request_id, "object": kind, "created": call.created, "model": call.model}


def _choice(call: Call, text: str | None, finish: str | None, stream: bool, token_ids=()) -> dict:
    if not call.chat:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    elif stream:
        choice = {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    if call.return_token_ids:
        choice["token_ids"] = list(token_ids)
    return choice


def response(call: Call, text: str, token_ids: list[int], last: RequestOutput) -> dict:
    """The whole (non-streamed) answer."""
    choice = _choice(call, text, _FINISH[last.finish_reason], False, token_ids)
    return {**_envelope(call, False), "choices": [choice], "usage": usage(last)}


def first_chunk(call: Call) -> dict | None:
    """Chat streams open with the assistant's role, as OpenAI's do."""
    if not call.chat:
        return None
    chunk = {**_envelope(call, True), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}]}
    return _with_usage_slot(call, chunk)


def chunks(call: Call, out: RequestOutput) -> list[dict]:
    """The stream chunks of one engine output: its text (if any), then the finish and usage chunks."""
    result = []
    if out.text or out.new_token_ids:
        text_chunk = {**_envelope(call, True), "choices": [_choice(call, out.text, None, True, out.new_token_ids)]}
        result.append(_with_usage_slot(call, text_chunk))
    if out.finish_reason is not None:
        finish = {**_envelope(call, True), "choices": [_choice(call, None, _FINISH[out.finish_reason], True)]}
        result.append(_with_usage_slot(call, finish))
        if call.include_usage:  # OpenAI: one last chunk with empty choices carries the usage
            result.append({**_envelope(call, True), "choices": [], "usage": usage(out)})
    return result


def _with_usage_slot(call: Call, chunk: dict) -> dict:
    if call.include_usage:  # OpenAI sends usage: null on every chunk but the last when usage is asked for
        chunk["usage"] = None
    return chunk
