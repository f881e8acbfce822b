"""The OpenAI-compatible HTTP front end against tests/fake_engine.py (a prompt ending in token t continues
t+1, t+2, ...; the tokenizer maps characters to code points): real servers on 127.0.0.1, gRPC and HTTP on
free ports over one engine. Synchronisation waits on conditions (FakeEngine.wait_for, the gRPC health
Watch, the stream's own events), never on sleeps."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent import futures

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from engine.config import EngineConfig
from engine.core.request import EngineUnavailableError, ErrorCode
from engine.v1 import engine_pb2 as pb
from scripts.bench_server import free_ports
from tests.fake_engine import FakeEngine
from tests.http_helpers import FaultyEngine, RawStream, chat_text, serving, sse_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def shared():
    """One server for the tests that leave no state behind (max_length 64, vocab 1000)."""
    with serving(FakeEngine(EngineConfig(max_length=64))) as served:
        yield served


def pages_back_to_zero(engine) -> bool:
    return engine.wait_for(lambda e: e.stats().kv_pages_used == 0 and e.stats().running_requests == 0
                           and e.stats().waiting_requests == 0)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- answers ----------------------------------------------------------------------------------------

def test_completion_of_a_string_and_of_token_ids(shared):
    r = shared.http.post(COMPLETIONS, json={"prompt": "ab", "max_tokens": 4})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "fake-model" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "cdef", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    for prompt in ([97, 98], [[97, 98]], ["ab"]):   # token ids, and batches of one
        r = shared.http.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 4, "model": "fake-model"})
        assert r.json()["choices"][0]["text"] == "cdef" and "token_ids" not in r.json()["choices"][0]
    r = shared.http.post(COMPLETIONS, json={"prompt": "ab", "max_tokens": 4, "return_token_ids": True})
    assert r.json()["choices"][0]["token_ids"] == [99, 100, 101, 102]


def test_chat_completion_renders_the_chat_template(shared):
    r = shared.http.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2})
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    # "<user>hi\n<assistant>" ends with ">" (62): the fake continues "?@"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "?@"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len("<user>hi\n<assistant>")
    parts = {"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}
    r = shared.http.post(CHAT, json={"messages": [parts], "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens"] == len("<user>h\ni\n<assistant>")  # text parts joined by "\n"


def test_unset_max_tokens_is_what_fits_and_eos_finishes_with_stop():
    with serving(FakeEngine(eos_token_id=12)) as served:
        r = served.http.post(COMPLETIONS, json={"prompt": [10], "max_tokens": 8})
        assert r.json()["choices"][0]["finish_reason"] == "stop" and r.json()["usage"]["completion_tokens"] == 2
        r = served.http.post(COMPLETIONS, json={"prompt": [10], "max_tokens": 3, "ignore_eos": True})
        assert r.json()["choices"][0]["finish_reason"] == "length"
        r = served.http.post(COMPLETIONS, json={"prompt": [20] * 60})   # max_length 64: 4 fit, not 256
        assert r.json()["usage"]["completion_tokens"] == 4


# --- streaming --------------------------------------------------------------------------------------

def test_chat_stream_framing_with_usage(shared):
    r = shared.http.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                     "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"] for c in chunks[1:4]] == [{"content": "?"}, {"content": "@"}, {"content": "A"}]
    assert chunks[4]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert all(c["usage"] is None for c in chunks[:5])  # usage: null until the last chunk, as OpenAI sends
    assert chunks[5]["choices"] == [] and chunks[5]["usage"]["completion_tokens"] == 3
    assert chunks[5]["usage"]["prompt_tokens"] == len("<user>hi\n<assistant>") and len(chunks) == 6


def test_completion_stream_without_usage(shared):
    r = shared.http.post(COMPLETIONS, json={"prompt": "ab", "max_tokens": 2, "stream": True})
    events = sse_events(r.text)
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["c", "d", ""]
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, None, "length"]
    assert all("usage" not in e for e in events[:-1]) and events[-1] == "[DONE]"
    r = shared.http.post(COMPLETIONS, json={"prompt": "ab", "max_tokens": 2, "stream": True, "return_token_ids": True})
    assert [e["choices"][0]["token_ids"] for e in sse_events(r.text)[:-1]] == [[99], [100], []]


def test_openai_sdk_streams_a_chat_completion_and_a_completion(shared):
    client = openai.OpenAI(base_url=shared.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["fake-model"]
    stream = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "?@A"
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].usage.prompt_tokens_details.cached_tokens == 0
    stream = client.completions.create(model="fake-model", prompt="ab", max_tokens=4, stream=True,
                                       extra_body={"top_k": 5, "ignore_eos": True, "cache_salt": "s"})
    assert "".join(c.choices[0].text for c in stream) == "cdef"


# --- bad requests -----------------------------------------------------------------------------------

BAD = {  # name: (path, body, status, param, text in the message)
    "top_p 0": (COMPLETIONS, {"prompt": "ab", "top_p": 0}, 400, "top_p", "sampling.top_p=0"),
    "negative temperature": (COMPLETIONS, {"prompt": "ab", "temperature": -1}, 400, "temperature",
                             "sampling.temperature"),
    "max_tokens 0": (COMPLETIONS, {"prompt": "ab", "max_tokens": 0}, 400, "max_tokens", "sampling.max_tokens=0"),
    "negative top_k": (COMPLETIONS, {"prompt": "ab", "top_k": -2}, 400, "top_k", "sampling.top_k=-2"),
    "empty stop": (COMPLETIONS, {"prompt": "ab", "stop": [""]}, 400, "stop", "sampling.stop"),
    "prompt + max_tokens too long": (COMPLETIONS, {"prompt": [1] * 60, "max_tokens": 5}, 400, "max_tokens",
                                     "sampling.max_tokens=5"),
    "prompt too long": (COMPLETIONS, {"prompt": [1] * 64}, 400, "prompt", "the prompt has 64 tokens"),
    "token id outside the vocabulary": (COMPLETIONS, {"prompt": [1, 1000]}, 400, "prompt", "prompt_token_ids[1]=1000"),
    "empty prompt": (COMPLETIONS, {"prompt": ""}, 400, "prompt", "prompt is empty"),
    "empty token ids": (COMPLETIONS, {"prompt": []}, 400, "prompt", "prompt_token_ids is empty"),
    "prompt of the wrong type": (COMPLETIONS, {"prompt": {"a": 1}}, 400, "prompt", "a string or a list of token ids"),
    "batch of prompts": (COMPLETIONS, {"prompt": ["a", "b"]}, 400, "prompt", "a batch of 2 prompts"),
    "missing prompt": (COMPLETIONS, {"max_tokens": 3}, 400, "prompt", "prompt: Field required"),
    "string for an int": (COMPLETIONS, {"prompt": "ab", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    "negative seed": (COMPLETIONS, {"prompt": "ab", "seed": -1}, 400, "seed", "seed"),
    "unknown role": (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages",
                     "messages[0].role='robot'"),
    "empty messages": (CHAT, {"messages": []}, 400, "messages", "messages is empty"),
    "message name": (CHAT, {"messages": [{"role": "user", "content": "x", "name": "bob"}]}, 400, "messages",
                     "messages[0].name"),
    "image part": (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages",
                   "messages[0].content[0].type='image_url'"),
    "tool calls in a message": (CHAT, {"messages": [{"role": "assistant", "content": "", "tool_calls": []}]}, 400,
                                "messages", "messages[0].tool_calls"),
    "n 2": (CHAT, {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n", "n=2 is not supported"),
    "logprobs": (CHAT, {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs",
                 "logprobs=True"),
    "tools": (CHAT, {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools",
              "tools="),
    "presence penalty": (COMPLETIONS, {"prompt": "ab", "presence_penalty": 0.5}, 400, "presence_penalty",
                         "presence_penalty=0.5"),
    "echo": (COMPLETIONS, {"prompt": "ab", "echo": True}, 400, "echo", "echo=True"),
    "unknown field": (COMPLETIONS, {"prompt": "ab", "frobnicate": 1}, 400, "frobnicate", "unknown field"),
    "unknown stream option": (COMPLETIONS, {"prompt": "ab", "stream_options": {"x": 1}}, 400, "stream_options",
                              "stream_options.x"),
    "unknown model": (COMPLETIONS, {"prompt": "ab", "model": "gpt-4"}, 404, "model", "model='gpt-4' does not exist"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_request_gets_the_openai_error_shape_naming_the_field(shared, name):
    path, body, status, param, text = BAD[name]
    for stream in (False, True):
        r = shared.http.post(path, json={**body, "stream": stream})
        assert r.status_code == status, r.text
        error = error_of(r)
        assert error["param"] == param and text in error["message"], error
        assert error["type"] == "invalid_request_error"
    assert shared.http.post(COMPLETIONS, json={"prompt": [7], "max_tokens": 2}).json()["choices"][0]["text"] == "\x08\t"


def test_cheap_limits_are_checked_before_tokenizing(shared, monkeypatch):
    """Over HTTP too, an oversized prompt or stop list is refused without being tokenized."""
    calls = []
    encode = shared.engine.tokenizer.encode
    monkeypatch.setattr(shared.engine.tokenizer, "encode", lambda *a, **k: calls.append(a) or encode(*a, **k))
    for path, body, limit in ((COMPLETIONS, {"prompt": "a" * 4096}, "--max-prompt-bytes=2048"),
                              (CHAT, {"messages": [{"role": "user", "content": "a" * 4096}]}, "--max-prompt-bytes"),
                              (COMPLETIONS, {"prompt": "ab", "stop": ["x"] * 17}, "--max-stop-strings=16"),
                              (COMPLETIONS, {"prompt": "ab", "cache_salt": "s" * 300}, "cache_salt has 300")):
        r = shared.http.post(path, json=body)
        assert r.status_code == 400 and limit in error_of(r)["message"], r.text
    assert calls == []
    assert shared.http.post(COMPLETIONS, json={"prompt": "ab", "max_tokens": 1}).status_code == 200
    assert calls


def test_neutral_values_of_unsupported_fields_are_accepted(shared):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "n": 1, "logprobs": False,
            "tools": [], "tool_choice": "none", "presence_penalty": 0, "frequency_penalty": 0.0, "user": "u1",
            "response_format": {"type": "text"}, "top_k": -1}
    assert shared.http.post(CHAT, json=body).status_code == 200


def test_not_json_unknown_paths_and_models(shared):
    r = shared.http.post(COMPLETIONS, content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in error_of(r)["message"]
    r = shared.http.post(COMPLETIONS, json=["a list"])
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"
    r = shared.http.get("/v1/nope")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    assert shared.http.get("/v1/models/fake-model").json()["id"] == "fake-model"
    r = shared.http.get("/v1/models/other")
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    assert shared.http.get(COMPLETIONS).status_code == 405


def test_full_waiting_queue_is_429():
    engine = FakeEngine(EngineConfig(max_waiting_requests=2, max_batch_size=1))
    with serving(engine) as served:
        engine.pause()
        with futures.ThreadPoolExecutor(2) as pool:
            queued = [pool.submit(served.http.post, COMPLETIONS, json={"prompt": [i], "max_tokens": 2})
                      for i in (10, 20)]
            assert engine.wait_for(lambda e: e.stats().waiting_requests == 2)
            r = served.http.post(COMPLETIONS, json={"prompt": [30], "max_tokens": 2})
            assert r.status_code == 429
            error = error_of(r)
            assert error["type"] == "rate_limit_error" and "--max-waiting-requests=2" in error["message"]
            engine.resume()
            assert [q.result().json()["choices"][0]["text"] for q in queued] == ["\x0b\x0c", "\x15\x16"]


# --- engine faults ----------------------------------------------------------------------------------

@pytest.mark.parametrize("code,status", [(ErrorCode.INTERNAL, 500), (ErrorCode.UNAVAILABLE, 503)])
def test_fault_before_the_first_token_is_a_real_status(code, status):
    with serving(engine := FaultyEngine(fail_after=0, code=code)) as served:
        for stream in (False, True):
            r = served.http.post(COMPLETIONS, json={"prompt": "ab", "max_tokens": 4, "stream": stream})
            assert r.status_code == status, r.text
            error = error_of(r)
            assert error["code"] == code.value and error["message"] == f"injected {code.value} fault"
            assert error["type"] == "server_error"
        assert pages_back_to_zero(engine)


def test_fault_after_streaming_started_is_an_error_event_then_done():
    with serving(FaultyEngine(fail_after=2)) as served:
        r = served.http.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                                         "stream": True})
        assert r.status_code == 200
        events = sse_events(r.text)
        assert chat_text(events[:-1]) == "?@"
        assert events[-2] == {"error": {"message": "injected internal fault", "type": "server_error", "param": None,
                                        "code": "internal"}}
        assert events[-1] == "[DONE]"
        assert all(c["choices"][0]["finish_reason"] is None for c in events[:-2])  # never a normal finish
        r = served.http.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        assert r.status_code == 500  # not streamed: the whole answer is an error


def test_engine_unavailable_on_add_request_is_503():
    class Dead(FakeEngine):
        def add_request(self, request):
            raise EngineUnavailableError("the engine loop died")
    with serving(Dead()) as served:
        r = served.http.post(COMPLETIONS, json={"prompt": "ab"})
        assert r.status_code == 503 and "the engine loop died" in error_of(r)["message"]


# --- disconnects ------------------------------------------------------------------------------------

@pytest.fixture
def slow_poll(monkeypatch):
    """Blocked stream reads re-check only every 60 s: a prompt abort must come from the disconnect itself."""
    monkeypatch.setattr("engine.serving.http_stream.POLL_SECONDS", 60.0)


@pytest.mark.parametrize("stream", [True, False])
def test_client_gone_mid_request_aborts_and_frees_pages(shared, stream, slow_poll):
    engine = shared.engine
    engine.pause()
    before = len(engine.aborted)
    try:
        raw = RawStream(shared.url, COMPLETIONS, {"prompt": [1], "max_tokens": 60, "stream": stream})
        assert engine.wait_for(lambda e: e.stats().waiting_requests == 1)
        engine.run_steps(1)  # one token, then the request can only end by an abort
        if stream:
            assert raw.head().startswith("HTTP/1.1 200")
            assert json.loads(raw.next_event()[6:])["choices"][0]["text"] == "\x02"
        else:
            assert engine.wait_for(lambda e: e.stats().kv_pages_used > 0)
        raw.close()
        assert engine.wait_for(lambda e: len(e.aborted) == before + 1), "engine.abort was not called"
        assert pages_back_to_zero(engine)
        assert shared.server.http.wait_idle(timeout=5), "the front end still counts the request in flight"
    finally:
        engine.resume()


def test_client_gone_while_queued_aborts_the_queued_request(shared, slow_poll):
    engine = shared.engine
    engine.pause()
    before = len(engine.aborted)
    try:
        raw = RawStream(shared.url, CHAT, {"messages": [{"role": "user", "content": "x"}], "stream": True})
        assert engine.wait_for(lambda e: e.stats().waiting_requests == 1)
        raw.close()  # before any token: no status line was sent yet
        assert engine.wait_for(lambda e: len(e.aborted) == before + 1 and e.stats().waiting_requests == 0)
        assert shared.server.http.wait_idle(timeout=5)
    finally:
        engine.resume()


# --- both front ends, health, metrics, lifecycle ------------------------------------------------------

def test_grpc_and_http_in_flight_at_once_each_get_exactly_their_tokens(shared):
    def over_grpc(i):
        request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[i * 20]),
                                     sampling=pb.SamplingParams(max_tokens=6))
        return [t for r in shared.stub.Generate(request) for t in r.token_ids]

    def over_http(i):
        r = shared.http.post(COMPLETIONS, json={"prompt": [i * 20], "max_tokens": 6, "stream": i % 2 == 0})
        text = "".join(e["choices"][0]["text"] for e in sse_events(r.text)[:-1]) if i % 2 == 0 else \
            r.json()["choices"][0]["text"]
        return [ord(c) for c in text]
    with futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: (over_grpc if i % 3 == 0 else over_http)(i), range(1, 33)))
    assert results == [[i * 20 + k for k in range(1, 7)] for i in range(1, 33)]
    assert pages_back_to_zero(shared.engine)


def test_health_is_503_until_warmed_up_and_models_need_the_engine():
    gate = threading.Event()
    with serving(None) as served:
        for path in ("/health", "/v1/models"):
            r = served.http.get(path)
            assert r.status_code == 503 and "still loading" in error_of(r)["message"]
        attaching = threading.Thread(target=served.server.attach, args=(FakeEngine(warmup_gate=gate),))
        attaching.start()  # blocks in warmup() until the gate opens
        assert served.http.post(COMPLETIONS, json={"prompt": "ab"}).status_code == 503
        assert served.http.get("/health").status_code == 503
        gate.set()
        attaching.join()
        assert served.http.get("/health").json() == {"status": "ok"}


def _samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_are_the_same_registry_as_the_metrics_port_and_count_http_requests():
    engine = FakeEngine(EngineConfig(enable_prefix_caching=True, kv_cache_page_size=16, max_length=128))
    with serving(engine, metrics=True) as served:
        prompt = list(range(1, 41))  # two full 16-token pages
        cached = [served.http.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 3}).json()["usage"]
                  ["prompt_tokens_details"]["cached_tokens"] for _ in range(2)]
        assert cached == [0, 32]
        over_http = _samples(served.http.get("/metrics").text)
        port = served.server.metrics_port
        assert over_http == _samples(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
    assert over_http[("engine_requests_total", (("finish_reason", "length"),))] == 2
    assert over_http[("engine_time_to_first_token_seconds_count", ())] == 2
    assert over_http[("engine_inter_token_latency_seconds_count", ())] == 4
    assert over_http[("engine_prefix_cache_hit_tokens_total", ())] == 32


def test_reset_prefix_cache(shared):
    shared.engine._cached_blocks.add(("salt", (1,)))
    assert shared.http.post("/reset_prefix_cache").json() == {"reset": True}
    assert not shared.engine._cached_blocks


def test_http_port_flag():
    from absl import flags as absl_flags
    from engine.flags import FlagError, config_from_flags, define_flags, parse_argv

    def options(*argv):
        fv = absl_flags.FlagValues()
        define_flags(fv)
        parse_argv(["s", *argv], fv)
        return config_from_flags(fv)[1]
    assert options().http_port == 8000 and options("--http-port=0").http_port is None
    assert options("--http_port=9001").http_port == 9001
    for argv, text in ((["--http-port=50051"], "must differ from --port"),
                       (["--http-port=9090", "--metrics-port=9090"], "must differ from --metrics-port"),
                       (["--http-port=70000"], "--http-port=70000")):
        with pytest.raises(FlagError, match=text):
            options(*argv)


FAKE_SERVER = ("import sys; from engine.server import run; from tests.fake_engine import FakeEngine; "
               "run(sys.argv, engine_factory=lambda config: FakeEngine(config, token_delay=0.01))")


def test_taken_http_port_exits_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run([sys.executable, "-c", FAKE_SERVER, "--port=0", f"--http-port={port}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and f"--http-port={port}" in p.stderr


def test_sigterm_drains_both_front_ends_and_exits_0():
    (http_port,) = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-c", FAKE_SERVER, "--port=0", f"--http-port={http_port}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"OpenAI-compatible HTTP at http://127.0.0.1:{http_port}/v1" in line, proc.stderr.read()
        url, address = f"http://127.0.0.1:{http_port}", line.split(" on ")[1].split()[0]
        raw = RawStream(url, COMPLETIONS, {"prompt": [1], "max_tokens": 40, "stream": True})
        assert json.loads(raw.next_event()[6:])["choices"][0]["text"] == "\x02"
        with grpc.insecure_channel(address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            proc.send_signal(signal.SIGTERM)
            # NOT_SERVING comes after both front ends stopped admitting
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        r = httpx.post(url + COMPLETIONS, json={"prompt": "ab"})
        assert r.status_code == 503 and "shutting down" in error_of(r)["message"]
        assert httpx.get(url + "/health").status_code == 503
        rest = []
        while (event := raw.next_event()) != "data: [DONE]":
            rest.append(json.loads(event[6:])["choices"][0])
        assert "".join(c["text"] for c in rest) == "".join(chr(t) for t in range(3, 42))
        assert rest[-1]["finish_reason"] == "length"
        raw.close()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.communicate()
