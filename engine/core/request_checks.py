"""The rules one request must pass, in one place for every front end (offline `LLM`, gRPC, HTTP) and the
engine itself (`LLMEngine.validate`; the tests' FakeEngine uses the same functions).

Each limit bounds the work one client can make for everyone: the stop strings are matched against the text
after every token, a prompt's text is tokenized in full before its token count is known, identifiers are
kept and hashed per request. The cheap checks (`check_identifiers`, `check_stop`, `check_prompt_text`) need
no tokenizer and run first, so an oversized request is refused before any expensive work is done.
Every error is a ValueError naming the field, the value's size and the limit (with its flag when it has one).
"""
from __future__ import annotations

from collections.abc import Sequence

from engine.config import EngineConfig
from engine.core.request import Request

# Identifiers, not workloads: no flag. A UUID is 36 characters, a sha256 in hex 64.
MAX_REQUEST_ID_LENGTH = 256
MAX_CACHE_SALT_LENGTH = 256
# Default --max-prompt-bytes per --max-length token: English averages ~4.5 bytes a token and runs of
# whitespace or rare scripts rarely pass ~10, so 32 only refuses text that could never fit.
PROMPT_BYTES_PER_TOKEN = 32


def prompt_bytes_limit(config: EngineConfig) -> int:
    """--max-prompt-bytes, or 32 bytes per --max-length token when unset (config.max_length resolved)."""
    return config.max_prompt_bytes or PROMPT_BYTES_PER_TOKEN * config.max_length


def check_identifiers(request_id: str, cache_salt: str) -> None:
    for name, value, limit in (("request_id", request_id, MAX_REQUEST_ID_LENGTH),
                               ("cache_salt", cache_salt, MAX_CACHE_SALT_LENGTH)):
        if len(value) > limit:
            raise ValueError(f"{name} has {len(value)} characters; at most {limit} are allowed")


def check_stop(stop: Sequence[str], config: EngineConfig) -> None:
    if len(stop) > config.max_stop_strings:
        raise ValueError(f"sampling.stop has {len(stop)} strings; --max-stop-strings={config.max_stop_strings} "
                         f"allows at most {config.max_stop_strings}")
    for i, s in enumerate(stop):
        if len(s) > config.max_stop_string_length:
            raise ValueError(f"sampling.stop[{i}] has {len(s)} characters; --max-stop-string-length="
                             f"{config.max_stop_string_length} allows at most {config.max_stop_string_length}")


def check_before_tokenizing(request_id: str, cache_salt: str, stop: Sequence[str], config: EngineConfig) -> None:
    """What a front end checks before it tokenizes anything (the prompt's own size: check_prompt_size), and
    `check_request` again first (an offline request comes in tokenized)."""
    check_identifiers(request_id, cache_salt)
    check_stop(stop, config)


def check_prompt_text(field: str, num_bytes: int, config: EngineConfig) -> None:
    """`field` ("prompt", "messages") holds `num_bytes` bytes of UTF-8 text, still to be tokenized."""
    limit = prompt_bytes_limit(config)
    if num_bytes > limit:
        raise ValueError(f"{field} has {num_bytes} bytes of text; --max-prompt-bytes={limit} allows at most "
                         f"{limit}")


def messages_bytes(messages) -> int:
    """UTF-8 size of a chat's roles and contents (what the chat template renders), for check_prompt_text."""
    return sum(len(str(m.get("role", "")).encode()) + len(str(m.get("content", "")).encode()) for m in messages)


def check_prompt_size(kind: str, value, config: EngineConfig) -> None:
    """Before tokenizing: kind "prompt" (value: str) or "messages" (value: {"role", "content"} dicts) within
    --max-prompt-bytes. Token ids ("prompt_token_ids") are counted by check_request, before their scan."""
    if kind == "prompt":
        check_prompt_text("prompt", len(value.encode()), config)
    elif kind == "messages":
        check_prompt_text("messages", messages_bytes(value), config)


def check_prompt_length(num_tokens: int, max_length: int, page_size: int, total_pages: int) -> None:
    """A prompt that could never run: empty, no room left for one token under --max-length, or more pages
    than the whole pool (`total_pages` usable pages of `page_size`)."""
    if not num_tokens:
        raise ValueError("prompt is empty: give at least one token")
    if num_tokens >= max_length:
        raise ValueError(f"prompt has {num_tokens} tokens; --max-length={max_length} allows at most {max_length - 1}")
    if -(-num_tokens // page_size) > total_pages:
        raise ValueError(f"prompt has {num_tokens} tokens, more than the whole KV pool holds "
                         f"(--kv-cache-pages={total_pages + 1})")


def check_request(request: Request, config: EngineConfig, vocab_size: int, total_pages: int) -> None:
    """Everything a tokenized request must satisfy to run on an engine with this (resolved) config and
    `total_pages` usable KV pages. Raises ValueError naming the field."""
    check_before_tokenizing(request.request_id, request.cache_salt, request.sampling.stop, config)
    request.sampling.validate()
    ids, limit = request.prompt_token_ids, config.max_length
    # Before the vocabulary scan: a huge id list is refused in O(1).
    check_prompt_length(len(ids), limit, config.kv_cache_page_size, total_pages)
    bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt_token_ids[{bad}]={ids[bad]} is outside the vocabulary [0, {vocab_size})")
    if len(ids) + request.sampling.max_tokens > limit:
        raise ValueError(f"sampling.max_tokens={request.sampling.max_tokens} with a {len(ids)}-token prompt "
                         f"exceeds --max-length={limit}; ask for at most {limit - len(ids)}")
