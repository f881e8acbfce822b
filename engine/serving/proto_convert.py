"""Conversions between the engine.v1 protos and the engine's own objects, validating on the way in.

`build_request` turns a GenerateRequest into an engine `Request` (tokenized, defaults applied) or raises
InvalidRequest with a message naming the field; `to_response` turns a RequestOutput into a
GenerateResponse. Nothing a client sends can reach the engine unchecked, and the cheap limits
(engine/core/request_checks.py: identifiers, stop strings, prompt bytes) are checked before any tokenizing.
"""
from __future__ import annotations

from google.protobuf.message import DecodeError

from engine.serving import request_builder
from engine.core.request import FinishReason, Request, RequestOutput
from engine.serving.request_builder import InvalidRequest  # the servicer catches it from here
from engine.core.sampling_params import SamplingParams
from engine.v1 import engine_pb2 as pb

_INPUT_ONEOF = pb.GenerateRequest.DESCRIPTOR.oneofs_by_name["input"]
_INPUT_NUMBERS = frozenset(f.number for f in _INPUT_ONEOF.fields)
_INPUT_NAMES = ", ".join(f.name for f in _INPUT_ONEOF.fields)
_FINISH_REASONS = {FinishReason.STOP: pb.GenerateResponse.STOP,
                   FinishReason.LENGTH: pb.GenerateResponse.LENGTH,
                   FinishReason.ABORT: pb.GenerateResponse.ABORT}


# ---------------------------------------------------------------------------------------------------
# Wire -> GenerateRequest. Protobuf silently keeps the last of several oneof members, so a request
# carrying two inputs would be half-ignored; we look at the raw bytes to reject it instead.

def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def input_fields_on_wire(data: bytes) -> set[int]:
    """Numbers of the `input` oneof's fields present at the top level of a serialized GenerateRequest."""
    seen, pos = set(), 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        if key >> 3 in _INPUT_NUMBERS:
            seen.add(key >> 3)
        wire_type = key & 7
        if wire_type == 0:
            _, pos = _read_varint(data, pos)
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:  # groups: unused by this proto, and the parser has already accepted the bytes
            break
    return seen


# What the deserializer hands on for bytes that do not parse (gRPC itself would answer INTERNAL for an
# exception or None, but malformed input is the client's error: INVALID_ARGUMENT).
UNDECODABLE = object()


def parse_generate_request(data: bytes):
    """The gRPC deserializer: UNDECODABLE for bad bytes; `input` cleared when several inputs were sent."""
    try:
        request = pb.GenerateRequest.FromString(data)
    except DecodeError:
        return UNDECODABLE
    if len(input_fields_on_wire(data)) > 1:
        request.ClearField("input")
    return request


# ---------------------------------------------------------------------------------------------------
# GenerateRequest -> engine Request (validation: engine/serving/request_builder.py, shared with the HTTP front end)

def prompt_token_ids(request: pb.GenerateRequest, engine) -> tuple[str, list[int]]:
    """(the input field's name, its token ids); raises InvalidRequest."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequest(f"input: set exactly one of {_INPUT_NAMES} (got none, or several)")
    if kind == "prompt":
        value = request.prompt
    elif kind == "messages":
        value = [{"role": m.role, "content": m.content} for m in request.messages.messages]
    else:
        value = list(request.prompt_token_ids.ids)
    return kind, request_builder.prompt_ids(kind, value, engine.tokenizer, engine.config)


def sampling_params(s: pb.SamplingParams, kind: str, prompt_len: int, max_length: int) -> SamplingParams:
    """Proto SamplingParams -> engine SamplingParams, applying defaults to unset fields; raises InvalidRequest."""
    return request_builder.sampling_params(
        kind, prompt_len, max_length, max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        temperature=s.temperature, top_p=s.top_p if s.HasField("top_p") else None, top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop), ignore_eos=s.ignore_eos)


def build_request(request, engine) -> Request:
    """Validates and tokenizes one GenerateRequest; raises InvalidRequest naming the field."""
    if request is UNDECODABLE:
        raise InvalidRequest("request: not a valid engine.v1.GenerateRequest")
    request_builder.check_cheap_limits(request.request_id, request.cache_salt, request.sampling.stop, engine.config)
    kind, ids = prompt_token_ids(request, engine)
    sampling = sampling_params(request.sampling, kind, len(ids), engine.config.max_length)
    return request_builder.make_request(request.request_id, ids, sampling, request.cache_salt)


def to_response(out: RequestOutput) -> pb.GenerateResponse:
    response = pb.GenerateResponse(token_ids=out.new_token_ids, text=out.text)
    if out.finish_reason is not None:
        response.finish_reason = _FINISH_REASONS[out.finish_reason]
        response.usage.prompt_tokens = out.prompt_tokens
        response.usage.completion_tokens = out.completion_tokens
        response.usage.cached_prompt_tokens = out.cached_prompt_tokens
    return response
