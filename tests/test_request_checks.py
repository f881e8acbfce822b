"""One set of request rules for every front end (engine/core/request_checks.py, SamplingParams.validate): values
that are not numbers are refused, seeds must fit the sampler, limits name their flags; the offline API
applies the same rules as gRPC (tests/test_server.py runs them over the wire)."""
from __future__ import annotations

import math

import pytest

from engine.config import EngineConfig
from engine.core.request import Request
from engine.core.request_checks import MAX_CACHE_SALT_LENGTH, MAX_REQUEST_ID_LENGTH, check_request, prompt_bytes_limit
from engine.core.sampling_params import MAX_SEED, SamplingParams

CONFIG = EngineConfig(max_length=64, kv_cache_page_size=16, kv_cache_pages=16)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=math.nan), r"sampling.temperature=nan .* finite"),
    (dict(temperature=math.inf), r"sampling.temperature=inf"),
    (dict(temperature=-math.inf), r"sampling.temperature=-inf"),
    (dict(top_p=math.nan), r"sampling.top_p=nan"),
    (dict(top_p=math.inf), r"sampling.top_p=inf"),
    (dict(seed=MAX_SEED + 1), r"sampling.seed=4294967296 .* \[0, 4294967295\]"),
    (dict(seed=-1), r"sampling.seed=-1"),
    (dict(seed=1.5), r"sampling.seed=1.5"),
    (dict(max_tokens=True), r"sampling.max_tokens=True"),
    (dict(top_k=2.0), r"sampling.top_k=2.0"),
    (dict(temperature="1"), r"sampling.temperature='1'"),
    (dict(stop=[3]), r"sampling.stop must hold strings"),
    (dict(ignore_eos="yes"), r"sampling.ignore_eos='yes'"),
])
def test_sampling_values_that_are_not_numbers_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_every_seed_the_sampler_can_tell_apart_is_accepted():
    assert SamplingParams(seed=0).seed == 0 and SamplingParams(seed=MAX_SEED).seed == MAX_SEED
    assert SamplingParams(temperature=1e30).temperature == 1e30   # finite: a (nearly uniform) distribution


def _request(**kw) -> Request:
    base = dict(request_id="r", prompt_token_ids=(1, 2, 3), sampling=SamplingParams(max_tokens=4), cache_salt="")
    return Request(**{**base, **kw})


@pytest.mark.parametrize("request_kwargs, match", [
    (dict(request_id="r" * (MAX_REQUEST_ID_LENGTH + 1)), "request_id has 257 characters; at most 256"),
    (dict(cache_salt="s" * (MAX_CACHE_SALT_LENGTH + 1)), "cache_salt has 257 characters"),
    (dict(sampling=SamplingParams(stop=["a"] * 17)), r"sampling.stop has 17 strings; --max-stop-strings=16"),
    (dict(sampling=SamplingParams(stop=["ok", "x" * 257])), r"sampling.stop\[1\] has 257 characters"),
    (dict(prompt_token_ids=(1,) * 10 ** 6), "prompt has 1000000 tokens; --max-length=64"),
    (dict(prompt_token_ids=(1, 300)), r"prompt_token_ids\[1\]=300 is outside the vocabulary \[0, 300\)"),
])
def test_request_limits_name_the_field_and_the_limit(request_kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_request(_request(**request_kwargs), CONFIG, vocab_size=300, total_pages=15)


def test_prompt_bytes_default_scales_with_max_length():
    assert prompt_bytes_limit(CONFIG) == 32 * 64
    assert prompt_bytes_limit(CONFIG.replace(max_prompt_bytes=10)) == 10


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_stop_strings=0), "--max-stop-strings=0"), (dict(max_stop_string_length=0), "--max-stop-string-length=0"),
    (dict(max_prompt_bytes=0), "--max-prompt-bytes=0"),
])
def test_bad_limit_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_offline_api_applies_the_same_rules(tiny_gguf, monkeypatch):
    """Offline: the prompt-byte limit is checked before tokenizing, and bad sampling values are refused."""
    from engine import LLM
    llm = LLM(tiny_gguf, max_length=64, kv_cache_page_size=16, kv_cache_pages=16, max_prompt_bytes=100)
    calls = []
    encode = llm.tokenizer.encode
    monkeypatch.setattr(llm.tokenizer, "encode", lambda *a, **k: calls.append(a) or encode(*a, **k))
    with pytest.raises(ValueError, match="prompt has 101 bytes of text; --max-prompt-bytes=100"):
        llm.generate("a" * 101, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="messages has 105 bytes"):
        llm.generate([{"role": "user", "content": "a" * 101}], SamplingParams(max_tokens=1))
    assert calls == []
    with pytest.raises(ValueError, match="sampling.stop has 17 strings"):
        llm.generate("hello", SamplingParams(max_tokens=1, stop=["z"] * 17))
    assert len(llm.generate("hello", SamplingParams(max_tokens=2, ignore_eos=True))[0].token_ids) == 2
