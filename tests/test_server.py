"""The gRPC front end against tests/fake_engine.py: real servers on 127.0.0.1, in-process (and a few
subprocesses for the command line). FakeEngine continues a prompt ending in token t with t+1, t+2, ...
Synchronisation waits on conditions (FakeEngine.wait_for, health Watch, a process's output), never sleeps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from engine.config import EngineConfig
from engine.serving.engine_server import EngineServer
from engine.v1 import engine_pb2 as pb
from engine.v1 import engine_pb2_grpc
from tests.fake_engine import FakeEngine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = grpc.StatusCode
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@dataclasses.dataclass
class Served:
    server: EngineServer
    engine: FakeEngine | None
    channel: grpc.Channel
    stub: engine_pb2_grpc.EngineStub


@contextlib.contextmanager
def serving(engine: FakeEngine | None, metrics: bool = False):
    """An in-process server on a free port, attached to `engine` unless it is None, and a client for it."""
    server = EngineServer("127.0.0.1", 0, metrics_port=0 if metrics else None)
    server.start()
    if engine is not None:
        server.attach(engine)
    channel = grpc.insecure_channel(server.address)
    try:
        yield Served(server, engine, channel, engine_pb2_grpc.EngineStub(channel))
    finally:
        channel.close()
        server.shutdown(timeout=0)


@pytest.fixture(scope="module")
def shared():
    """One server for the tests that leave no state behind (max_length 64, vocab 1000, page size 128)."""
    with serving(FakeEngine(EngineConfig(max_length=64))) as served:
        yield served


def ids_request(ids, max_tokens=None, **kw) -> pb.GenerateRequest:
    sampling = pb.SamplingParams() if max_tokens is None else pb.SamplingParams(max_tokens=max_tokens)
    return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), sampling=sampling, **kw)


def tokens_of(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def pages_back_to_zero(engine: FakeEngine) -> bool:
    return engine.wait_for(lambda e: e.stats().kv_pages_used == 0 and e.stats().running_requests == 0)


# --- streaming --------------------------------------------------------------------------------------

def test_prompt_streams_one_message_per_token_and_usage_on_the_last(shared):
    stub = shared.stub
    responses = list(stub.Generate(pb.GenerateRequest(prompt="ab", sampling=pb.SamplingParams(max_tokens=4))))
    assert [list(r.token_ids) for r in responses] == [[99], [100], [101], [102]]
    assert "".join(r.text for r in responses) == "cdef"
    assert [r.finish_reason for r in responses] == [0, 0, 0, pb.GenerateResponse.LENGTH]
    assert [r.HasField("usage") for r in responses] == [False, False, False, True]
    usage = responses[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens) == (2, 4, 0)


def test_messages_use_the_chat_template_and_token_ids_pass_through(shared):
    stub = shared.stub
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    responses = list(stub.Generate(pb.GenerateRequest(messages=chat, sampling=pb.SamplingParams(max_tokens=2))))
    assert responses[-1].usage.prompt_tokens == len("<user>hi\n<assistant>")
    assert tokens_of(responses) == [ord(">") + 1, ord(">") + 2]
    assert tokens_of(stub.Generate(ids_request([5, 998], max_tokens=3))) == [999, 0, 1]  # wraps at vocab


def test_unset_max_tokens_defaults_to_what_fits_in_max_length(shared):
    stub = shared.stub
    responses = list(stub.Generate(ids_request([1] * 60)))  # max_length 64: 4 tokens fit, not 256
    assert responses[-1].usage.completion_tokens == 4


def test_eos_finishes_with_stop_unless_ignore_eos():
    with serving(FakeEngine(eos_token_id=12)) as served:
        stub = served.stub
        responses = list(stub.Generate(ids_request([10], max_tokens=8)))
        assert tokens_of(responses) == [11, 12] and responses[-1].finish_reason == pb.GenerateResponse.STOP
        request = ids_request([10], max_tokens=3)
        request.sampling.ignore_eos = True
        assert list(stub.Generate(request))[-1].finish_reason == pb.GenerateResponse.LENGTH


def test_32_concurrent_streams_each_get_exactly_their_tokens(shared):
    engine, stub = shared.engine, shared.stub

    def run(i):
        return tokens_of(stub.Generate(ids_request([i * 20], max_tokens=8, request_id=f"c{i}")))
    with futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, range(32)))
    assert results == [[i * 20 + k for k in range(1, 9)] for i in range(32)]
    assert pages_back_to_zero(engine)


# --- bad requests -----------------------------------------------------------------------------------

def _sampling(**kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt="ab", sampling=pb.SamplingParams(**kw))


def _chat(*pairs) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in pairs])


BIG = 2 ** 32
INVALID, EXHAUSTED = CODE.INVALID_ARGUMENT, CODE.RESOURCE_EXHAUSTED
# name -> (request, status, text the details must contain). The shared server: max_length 64, so the prompt-byte
# limit is 32 x 64 = 2048 bytes; 16 stop strings of at most 256 characters.
BAD_REQUESTS = {
    "no input": (pb.GenerateRequest(), INVALID, "input"),
    "empty prompt": (pb.GenerateRequest(prompt=""), INVALID, "prompt is empty"),
    "empty messages": (pb.GenerateRequest(messages=pb.ChatMessages()), INVALID, "messages is empty"),
    "empty token ids": (ids_request([]), INVALID, "prompt_token_ids is empty"),
    "negative token id": (ids_request([1, -1]), INVALID, "prompt_token_ids[1]=-1"),
    "token id = vocab": (ids_request([1000]), INVALID, "prompt_token_ids[0]=1000"),
    "token id = int32 max": (ids_request([2 ** 31 - 1]), INVALID, "prompt_token_ids[0]=2147483647"),
    "prompt too long": (ids_request([1] * 64), INVALID, "prompt_token_ids: the prompt has 64 tokens"),
    "a million token ids": (ids_request([1] * 10 ** 6), INVALID, "the prompt has 1000000 tokens"),
    "prompt + max_tokens too long": (ids_request([1] * 60, max_tokens=5), INVALID, "sampling.max_tokens=5"),
    "max_tokens int32 max": (ids_request([1], max_tokens=2 ** 31 - 1), INVALID, "sampling.max_tokens=2147483647"),
    "max_tokens 0": (_sampling(max_tokens=0), INVALID, "sampling.max_tokens=0"),
    "negative max_tokens": (_sampling(max_tokens=-3), INVALID, "sampling.max_tokens=-3"),
    "negative temperature": (_sampling(temperature=-1), INVALID, "sampling.temperature"),
    "temperature NaN": (_sampling(temperature=float("nan")), INVALID, "sampling.temperature=nan"),
    "temperature inf": (_sampling(temperature=float("inf")), INVALID, "sampling.temperature=inf"),
    "temperature -inf": (_sampling(temperature=float("-inf")), INVALID, "sampling.temperature=-inf"),
    "top_p 0": (_sampling(top_p=0), INVALID, "sampling.top_p"),
    "top_p > 1": (_sampling(top_p=1.5), INVALID, "sampling.top_p"),
    "top_p NaN": (_sampling(top_p=float("nan")), INVALID, "sampling.top_p=nan"),
    "top_p inf": (_sampling(top_p=float("inf")), INVALID, "sampling.top_p=inf"),
    "negative top_k": (_sampling(top_k=-1), INVALID, "sampling.top_k"),
    "seed 2**32 (would alias seed 0)": (_sampling(seed=BIG), INVALID, f"sampling.seed={BIG}"),
    "seed 2**64 - 1": (_sampling(seed=2 ** 64 - 1), INVALID, "[0, 4294967295]"),
    "empty stop string": (_sampling(stop=[""]), INVALID, "sampling.stop"),
    "17 stop strings": (_sampling(stop=[f"s{i}" for i in range(17)]), INVALID, "--max-stop-strings=16"),
    "stop string of 257 chars": (_sampling(stop=["x" * 257]), INVALID, "sampling.stop[0] has 257 characters"),
    "cache_salt of 257 chars": (pb.GenerateRequest(prompt="ab", cache_salt="s" * 257), INVALID, "cache_salt has 257"),
    "request_id of 257 chars": (pb.GenerateRequest(prompt="ab", request_id="r" * 257), INVALID, "request_id has 257"),
    "prompt of 2049 bytes": (pb.GenerateRequest(prompt="a" * 2049), INVALID, "--max-prompt-bytes=2048"),
    "prompt of 1 MiB": (pb.GenerateRequest(prompt="é" * (1 << 19)), INVALID, "prompt has 1048576 bytes"),
    "messages of 2049 bytes": (pb.GenerateRequest(messages=_chat(("user", "a" * 2045))), INVALID,
                               "messages has 2049 bytes"),
    "unknown role": (pb.GenerateRequest(messages=_chat(("user", "a"), ("robot", "b"))), INVALID, "messages[1].role"),
    "empty role": (pb.GenerateRequest(messages=_chat(("", "a"))), INVALID, "messages[0].role=''"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_gets_its_status_naming_the_field(shared, name):
    stub = shared.stub
    request, code, field = BAD_REQUESTS[name]
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(request))
    assert e.value.code() == code and field in e.value.details(), e.value.details()
    assert tokens_of(stub.Generate(ids_request([7], max_tokens=2))) == [8, 9]  # still serving


def test_the_bad_input_matrix_covers_thirty_cases():
    assert len(BAD_REQUESTS) >= 30


def test_cheap_limits_are_checked_before_tokenizing(shared, monkeypatch):
    """An oversized prompt is refused without being tokenized (tokenizing 1 MiB takes ~1 s of CPU)."""
    calls = []
    encode = shared.engine.tokenizer.encode
    monkeypatch.setattr(shared.engine.tokenizer, "encode", lambda *a, **k: calls.append(a) or encode(*a, **k))
    for request in (pb.GenerateRequest(prompt="a" * 4096), pb.GenerateRequest(messages=_chat(("user", "a" * 4096))),
                    pb.GenerateRequest(prompt="ab", sampling=pb.SamplingParams(stop=["x"] * 17)),
                    pb.GenerateRequest(prompt="ab", cache_salt="s" * 300)):
        with pytest.raises(grpc.RpcError) as e:
            list(shared.stub.Generate(request))
        assert e.value.code() == CODE.INVALID_ARGUMENT
    assert calls == []
    assert tokens_of(shared.stub.Generate(pb.GenerateRequest(prompt="ab", sampling=pb.SamplingParams(max_tokens=1))))
    assert calls


def test_limits_follow_their_flags():
    config = EngineConfig(max_length=64, max_stop_strings=2, max_stop_string_length=4, max_prompt_bytes=10)
    with serving(FakeEngine(config)) as served:
        for request, field in ((_sampling(stop=["a", "b", "c"]), "--max-stop-strings=2"),
                               (_sampling(stop=["abcde"]), "--max-stop-string-length=4"),
                               (pb.GenerateRequest(prompt="a" * 11), "--max-prompt-bytes=10")):
            with pytest.raises(grpc.RpcError) as e:
                list(served.stub.Generate(request))
            assert e.value.code() == CODE.INVALID_ARGUMENT and field in e.value.details()
        ok = pb.GenerateRequest(prompt="a" * 10, sampling=pb.SamplingParams(max_tokens=1, stop=["ab", "abcd"]))
        assert len(tokens_of(served.stub.Generate(ok))) == 1


def test_several_inputs_on_the_wire_are_rejected_not_half_ignored(shared):
    channel = shared.channel
    raw = channel.unary_stream("/engine.v1.Engine/Generate", request_serializer=lambda b: b,
                               response_deserializer=pb.GenerateResponse.FromString)
    two_inputs = pb.GenerateRequest(prompt="ab").SerializeToString() + ids_request([1]).SerializeToString()
    for data, field in ((two_inputs, "input"), (b"\xff", "request")):
        with pytest.raises(grpc.RpcError) as e:
            list(raw(data))
        assert e.value.code() == CODE.INVALID_ARGUMENT and field in e.value.details()


def test_duplicate_request_id_in_flight_is_invalid_argument(shared):
    engine, stub = shared.engine, shared.stub
    engine.pause()
    first = stub.Generate(ids_request([1], max_tokens=2, request_id="dup"))
    assert engine.wait_for(lambda e: e.stats().waiting_requests == 1)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(ids_request([1], max_tokens=2, request_id="dup")))
    engine.resume()
    assert e.value.code() == CODE.INVALID_ARGUMENT and "request_id='dup'" in e.value.details()
    assert tokens_of(first) == [2, 3]


def test_full_waiting_queue_is_resource_exhausted():
    engine = FakeEngine(EngineConfig(max_waiting_requests=2, max_batch_size=1))
    with serving(engine) as served:
        stub = served.stub
        engine.pause()
        queued = [stub.Generate(ids_request([i], max_tokens=2)) for i in (10, 20)]
        assert engine.wait_for(lambda e: e.stats().waiting_requests == 2)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(ids_request([30], max_tokens=2)))
        assert e.value.code() == CODE.RESOURCE_EXHAUSTED and "--max-waiting-requests=2" in e.value.details()
        engine.resume()
        assert [tokens_of(q) for q in queued] == [[11, 12], [21, 22]]


# --- cancellation and shutdown ----------------------------------------------------------------------

@pytest.mark.parametrize("how", ["cancel", "disconnect"])
def test_client_gone_mid_stream_aborts_and_frees_pages(shared, how):
    engine = shared.engine
    channel = grpc.insecure_channel(shared.server.address) if how == "disconnect" else None
    engine.pause()
    try:
        call = (engine_pb2_grpc.EngineStub(channel) if channel else shared.stub).Generate(
            ids_request([1], max_tokens=60, request_id=f"gone-{how}"))
        assert engine.wait_for(lambda e: e.stats().waiting_requests == 1)
        engine.run_steps(1)  # one token, then the request can only end by an abort
        assert list(next(call).token_ids) == [2]
        assert engine.stats().kv_pages_used > 0
        call.cancel() if how == "cancel" else channel.close()
        assert engine.wait_for(lambda e: f"gone-{how}" in e.aborted), "engine.abort was not called"
        assert pages_back_to_zero(engine)
        assert shared.server.servicer.wait_idle(timeout=5), "the servicer still counts the stream in flight"
    finally:
        engine.resume()


def test_shutdown_past_grace_ends_streams_with_a_final_abort_message():
    with serving(engine := FakeEngine()) as served:
        engine.pause()
        call = served.stub.Generate(ids_request([1], max_tokens=60))
        assert engine.wait_for(lambda e: e.stats().waiting_requests == 1)
        engine.run_steps(1)  # one token, then the stream stays in flight
        next(call)
        served.server.shutdown(timeout=0)
        last = list(call)[-1]
        assert last.finish_reason == pb.GenerateResponse.ABORT and last.usage.prompt_tokens == 1
        assert engine.shut_down and engine.stats().kv_pages_used == 0


# --- health, reflection, info, metrics --------------------------------------------------------------

def test_health_is_not_serving_until_warmup_is_done():
    gate = threading.Event()
    with serving(None) as served:
        health = health_pb2_grpc.HealthStub(served.channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="engine.v1.Engine"))
        assert next(watch).status == NOT_SERVING
        attaching = threading.Thread(target=served.server.attach, args=(FakeEngine(warmup_gate=gate),))
        attaching.start()  # blocks in warmup() until the gate opens
        with pytest.raises(grpc.RpcError) as e:
            list(served.stub.Generate(ids_request([1], max_tokens=1)))
        assert e.value.code() == CODE.UNAVAILABLE
        gate.set()
        assert next(watch).status == SERVING
        attaching.join()
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == SERVING
        watch.cancel()


def test_reflection_lists_the_services(shared):
    services = ProtoReflectionDescriptorDatabase(shared.channel).get_services()
    assert {"engine.v1.Engine", "grpc.health.v1.Health"} <= set(services)


def test_get_model_info(shared):
    info = shared.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.name, info.architecture, info.vocab_size, info.max_length, info.page_size, info.prefix_caching,
            info.dtype, info.devices) == ("fake-model", "fake", 1000, 64, 128, False, "float32", "cpu:0")


def _scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_endpoint_counts_requests_and_reads_engine_stats():
    engine = FakeEngine(EngineConfig(enable_prefix_caching=True, kv_cache_page_size=16, max_length=128))
    with serving(engine, metrics=True) as served:
        port = served.server.metrics_port
        assert _scrape(port)[("engine_requests_total", (("finish_reason", "length"),))] == 0
        prompt = list(range(1, 41))  # 40 tokens: two full 16-token pages
        usages = [list(served.stub.Generate(ids_request(prompt, max_tokens=3)))[-1].usage for _ in range(2)]
        assert [u.cached_prompt_tokens for u in usages] == [0, 32]
        m = _scrape(port)
    assert m[("engine_requests_total", (("finish_reason", "length"),))] == 2
    assert m[("engine_time_to_first_token_seconds_count", ())] == 2
    assert m[("engine_inter_token_latency_seconds_count", ())] == 4
    assert m[("engine_prefix_cache_queried_tokens_total", ())] == 80
    assert m[("engine_prefix_cache_hit_tokens_total", ())] == 32
    assert m[("engine_kv_pages_total", ())] == engine.total_pages and m[("engine_kv_pages_used", ())] == 0
    for name in ("engine_running_requests", "engine_waiting_requests", "engine_prefix_cache_evictions_total",
                 "engine_preemptions_total"):
        assert (name, ()) in m


# --- the command line (subprocesses) ----------------------------------------------------------------

def _server_cmd(*args) -> list[str]:
    # --http-port=0: the default 8000 would make parallel runs (and a running `make serve`) collide.
    return [sys.executable, "-m", "engine.server", "--http-port=0", *args]


BAD_FLAGS = {
    "page size": (["--kv-cache-page-size=17"], "--kv-cache-page-size=17"),
    "underscore spelling": (["--kv_cache_page_size=17"], "--kv-cache-page-size=17"),
    "cache strategy": (["--cache-strategy=ring"], "--cache-strategy='ring'"),
    "prefix caching needs paged": (["--enable-prefix-caching", "--cache-strategy=continuous"], "needs"),
    "port not a number": (["--port=http"], "--port=http"),
    "port out of range": (["--port=70000"], "--port=70000"),
    "devices": (["--devices=tpu"], "--devices=tpu"),
    "dtype": (["--quantization-encoding=int4"], "--quantization-encoding='int4'"),
    "unknown flag": (["--bogus=1"], "--bogus"),
    "missing model file": (["--model-path=/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
    "max stop strings": (["--max-stop-strings=0"], "--max-stop-strings=0"),
    "max stop string length": (["--max-stop-string-length=-1"], "--max-stop-string-length=-1"),
    "max prompt bytes": (["--max-prompt-bytes=0"], "--max-prompt-bytes=0"),
    "max concurrent rpcs": (["--max-concurrent-rpcs=0"], "--max-concurrent-rpcs=0"),
    "shutdown timeout": (["--shutdown-timeout-seconds=-1"], "--shutdown-timeout-seconds=-1"),
    "shutdown timeout not a number": (["--shutdown-timeout-seconds=soon"], "--shutdown-timeout-seconds=soon"),
}


@pytest.fixture(scope="module")
def bad_flag_runs():
    """Runs every bad command line at once (each is a Python start-up) and collects the results."""
    procs = {name: subprocess.Popen(_server_cmd(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, (args, _) in BAD_FLAGS.items()}
    return {name: (p.wait(timeout=30), *p.communicate()) for name, p in procs.items()}


@pytest.mark.parametrize("name", BAD_FLAGS)
def test_bad_flag_exits_nonzero_with_one_line(bad_flag_runs, name):
    code, out, err = bad_flag_runs[name]
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and BAD_FLAGS[name][1] in err, err


def test_dashed_and_underscore_flags_parse_the_same():
    from absl import flags as absl_flags
    from engine.flags import config_from_flags, define_flags, parse_argv
    configs = []
    for argv in (["s", "--max-length=99", "--no-enable-prefix-caching", "--metrics-port=0"],
                 ["s", "--max_length=99", "--noenable_prefix_caching", "--metrics_port", "0"]):
        fv = absl_flags.FlagValues()
        define_flags(fv)
        parse_argv(argv, fv)
        configs.append(config_from_flags(fv))
    assert configs[0] == configs[1] and configs[0][0].max_length == 99 and configs[0][1].metrics_port is None


def test_unreadable_model_file_exits_with_one_line_naming_it(tmp_path):
    """Needs the real engine (engine.core.engine.LLMEngine): its ValueError must name the file."""
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    p = subprocess.run(_server_cmd(f"--model-path={bad}", "--port=0"), cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and str(bad) in p.stderr, p.stderr


def test_taken_port_exits_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run(_server_cmd(f"--port={port}"), cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and f"--port={port}" in p.stderr


FAKE_SERVER = ("import sys; from engine.server import run; from tests.fake_engine import FakeEngine; "
               "run(sys.argv, engine_factory=lambda config: FakeEngine(config, token_delay=0.01))")


def test_sigterm_drains_in_flight_streams_refuses_new_ones_and_exits_0():
    proc = subprocess.Popen([sys.executable, "-c", FAKE_SERVER, "--port=0", "--http-port=0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving fake-model on 127.0.0.1:" in line and "devices cpu:0" in line, proc.stderr.read()
        address = line.split(" on ")[1].split()[0]
        with grpc.insecure_channel(address) as channel:
            stub = engine_pb2_grpc.EngineStub(channel)
            in_flight = stub.Generate(ids_request([1], max_tokens=40))
            assert list(next(in_flight).token_ids) == [2]
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == SERVING
            proc.send_signal(signal.SIGTERM)
            assert next(watch).status == NOT_SERVING  # draining has begun
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(ids_request([1], max_tokens=1)))
            assert e.value.code() == CODE.UNAVAILABLE
            rest = list(in_flight)
            assert tokens_of(rest) == list(range(3, 42)) and rest[-1].finish_reason == pb.GenerateResponse.LENGTH
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.communicate()


def test_client_script_streams_text_and_prints_usage(shared):
    cmd = [sys.executable, "scripts/client.py", f"--target={shared.server.address}", "--prompt=ab", "--max-tokens=3"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("cde\n") and "finish_reason=LENGTH prompt_tokens=2 completion_tokens=3" in p.stdout
