"""The HTTP front end over the real LLMEngine on the tiny model, beside gRPC on the same engine: the official
`openai` package streams answers equal to the gRPC reply, prefix-cache hits show in usage, both front ends
serve at once, and a client that hangs up frees its pages."""
from __future__ import annotations

import time
import uuid
from concurrent import futures

import numpy as np
import openai
import pytest

from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.v1 import engine_pb2 as pb
from tests.http_helpers import RawStream, serving, sse_events

OPTS = dict(max_batch_size=8, max_num_batched_tokens=64, max_length=256, kv_cache_page_size=16,
            kv_cache_pages=128, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def served(tiny_gguf):
    with serving(LLMEngine(EngineConfig(model_path=tiny_gguf, **OPTS))) as s:
        yield s


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def idle_and_empty(engine, timeout=30.0) -> bool:
    """Waits (bounded) until no request runs and no page is held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.kv_pages_used == 0 and s.running_requests == 0 and s.waiting_requests == 0:
            return True
        time.sleep(0.01)
    return False


def grpc_reply(served, salt, max_tokens, **input_):
    request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0),
                                 cache_salt=salt, **input_)
    responses = list(served.stub.Generate(request))
    return "".join(r.text for r in responses), responses[-1]


def test_openai_sdk_streams_equal_the_grpc_reply(served, client):
    messages = [{"role": "system", "content": "Hello"}, {"role": "user", "content": " the capital of France"}]
    want_text, want = grpc_reply(served, "g1", 24, messages=pb.ChatMessages(
        messages=[pb.ChatMessage(**m) for m in messages]))
    stream = client.chat.completions.create(model=served.engine.model_name, messages=messages, max_tokens=24,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"cache_salt": "h1"})
    chunks = list(stream)
    assert want.usage.completion_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_text
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (want.usage.prompt_tokens, want.usage.completion_tokens)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [pb.GenerateResponse.FinishReason.Name(want.finish_reason).lower()]

    ids = [int(t) for t in np.random.default_rng(0).integers(3, 300, 40)]
    want_text, want = grpc_reply(served, "g2", 20, prompt_token_ids=pb.TokenIds(ids=ids))
    stream = client.completions.create(model=served.engine.model_name, prompt=ids, max_tokens=20, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"cache_salt": "h2"})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want_text
    assert chunks[-1].usage.completion_tokens == want.usage.completion_tokens and chunks[-1].usage.prompt_tokens == 40
    r = served.http.post("/v1/completions", json={"prompt": ids, "max_tokens": 20, "temperature": 0,
                                                  "cache_salt": "h3", "return_token_ids": True})
    want_ids = [t for r in served.stub.Generate(pb.GenerateRequest(
        prompt_token_ids=pb.TokenIds(ids=ids), cache_salt="g3",
        sampling=pb.SamplingParams(max_tokens=20, temperature=0.0))) for t in r.token_ids]
    assert r.json()["choices"][0]["token_ids"] == want_ids and r.json()["choices"][0]["text"] == want_text


def test_a_second_request_sharing_a_long_prefix_reports_cached_tokens(served, client):
    rng = np.random.default_rng(1)
    prefix = [int(t) for t in rng.integers(3, 300, 80)]   # 5 full 16-token pages
    salt = uuid.uuid4().hex

    def cached(suffix, salt):
        r = client.completions.create(model=served.engine.model_name, prompt=prefix + suffix, max_tokens=2,
                                      temperature=0,
                                      extra_body={"cache_salt": salt, "ignore_eos": True})
        return r.usage.prompt_tokens_details.cached_tokens
    assert cached([5, 6, 7], salt) == 0
    assert cached([8, 9, 10], salt) == 80
    assert cached([8, 9, 10], uuid.uuid4().hex) == 0   # another salt never shares pages


def test_grpc_and_http_in_flight_at_once_agree(served):
    rng = np.random.default_rng(2)
    prompts = [[int(t) for t in rng.integers(3, 300, rng.integers(2, 60))] for _ in range(12)]
    lens = [int(n) for n in rng.integers(1, 24, 12)]

    def over_grpc(i):
        request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=prompts[i]), cache_salt=f"g{i}",
                                     sampling=pb.SamplingParams(max_tokens=lens[i], ignore_eos=True))
        responses = list(served.stub.Generate(request))
        return "".join(r.text for r in responses), responses[-1].usage.completion_tokens

    def over_http(i):
        body = {"prompt": prompts[i], "max_tokens": lens[i], "temperature": 0, "ignore_eos": True,
                "cache_salt": f"h{i}", "stream": i % 2 == 0, "stream_options": {"include_usage": True}}
        r = served.http.post("/v1/completions", json=body if i % 2 == 0 else {**body, "stream_options": None})
        if i % 2:
            return r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"]
        events = sse_events(r.text)
        return "".join(e["choices"][0]["text"] for e in events[:-2]), events[-2]["usage"]["completion_tokens"]
    with futures.ThreadPoolExecutor(24) as pool:
        grpc_results = [pool.submit(over_grpc, i) for i in range(12)]
        http_results = [pool.submit(over_http, i) for i in range(12)]
        got = [(g.result(), h.result()) for g, h in zip(grpc_results, http_results)]
    for (g, h), n in zip(got, lens):
        assert g == h and g[1] == n
    assert idle_and_empty(served.engine)


def test_client_gone_mid_stream_frees_the_pages(served):
    raw = RawStream(served.url, "/v1/completions", {"prompt": [5, 6, 7, 8], "max_tokens": 200, "ignore_eos": True,
                                                    "stream": True})
    assert raw.next_event().startswith("data: {")
    assert served.engine.stats().kv_pages_used > 0
    raw.close()
    assert idle_and_empty(served.engine)
    assert served.server.http.wait_idle(timeout=5)
    r = served.http.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 3  # still serving
