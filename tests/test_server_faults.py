"""Faults seen from a gRPC client (issue 13): a failed engine step ends its streams INTERNAL and is counted;
an engine that cannot recover makes health NOT_SERVING, every call UNAVAILABLE and the process exit 1;
shutdown is bounded even with a stuck engine; start-up failures print one line; concurrent calls are
bounded. The real engine on the tiny model (prefix caching on) and tests/fake_engine.py.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.serving.engine_server import ABORT_RESERVE_SECONDS, EngineServer
from engine.v1 import engine_pb2 as pb
from engine.v1 import engine_pb2_grpc
from tests.fake_engine import FakeEngine
from tests.test_faults import Faults
from tests.test_server import ROOT, ids_request, pages_back_to_zero, serving, tokens_of

CODE = grpc.StatusCode
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
OPTS = dict(max_batch_size=8, max_num_batched_tokens=64, max_length=256, kv_cache_page_size=16,
            kv_cache_pages=128)


class RealServed:
    """The real engine (prefix caching on) behind an in-process server with /metrics."""

    def __init__(self, path):
        self.engine = LLMEngine(EngineConfig(model_path=path, enable_prefix_caching=True, **OPTS))
        self.server = EngineServer("127.0.0.1", 0, metrics_port=0)
        self.server.start()
        self.server.attach(self.engine)
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = engine_pb2_grpc.EngineStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.server.metrics_port}/metrics", timeout=5).read()
        return next(s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples
                    if s.name == name)

    def close(self):
        self.channel.close()
        self.server.shutdown(timeout=0)


def request(ids, max_tokens=6, rid=""):
    return pb.GenerateRequest(request_id=rid, prompt_token_ids=pb.TokenIds(ids=ids),
                              sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def shared_prefix_prompts(n, seed):
    rng = np.random.default_rng(seed)
    prefix = [int(t) for t in rng.integers(3, 300, 40)]
    return [prefix + [int(t) for t in rng.integers(3, 300, rng.integers(2, 12))] for _ in range(n)]


def outcome(stub, req):
    """(status code, tokens) of one call."""
    try:
        return CODE.OK, tokens_of(stub.Generate(req, timeout=120))
    except grpc.RpcError as e:
        return e.code(), e.details()


@pytest.fixture
def real(tiny_gguf):
    served = RealServed(tiny_gguf)
    yield served
    served.close()


def test_a_failed_step_ends_its_streams_internal_and_later_requests_are_exact(real, tiny_gguf, monkeypatch):
    """Defect 2: 4 streams sharing a prefix are in flight when a step fails: each ends INTERNAL (not OK with
    ABORT), the failure is counted, the server keeps serving, and the same requests sent again get exactly
    the caching-off outputs with no page leaked."""
    ps = shared_prefix_prompts(4, seed=0)
    Faults(monkeypatch, real.engine.runner, fail_on={3})
    calls = [real.stub.Generate(request(p, rid=f"s{i}"), timeout=120) for i, p in enumerate(ps)]
    results = []
    for call in calls:
        try:
            results.append((CODE.OK, tokens_of(call)))
        except grpc.RpcError as e:
            results.append((e.code(), e.details()))
    assert all(code == CODE.INTERNAL and "injected fault in execute call 3" in details for code, details in results)
    assert real.metric("engine_step_failures_total") == 1
    assert real.health.Check(health_pb2.HealthCheckRequest(service="")).status == SERVING
    want = LLM(tiny_gguf, **OPTS).generate(ps, SamplingParams(max_tokens=6, ignore_eos=True))
    assert [outcome(real.stub, request(p)) for p in ps] == [(CODE.OK, list(w.token_ids)) for w in want]
    assert real.engine.stats().kv_pages_used == 0 and real.metric("engine_kv_pages_used") == 0


def test_an_engine_that_cannot_recover_stops_serving(real, monkeypatch):
    """Defect 3: recovery raises. The stream in flight ends UNAVAILABLE, health goes NOT_SERVING, new calls
    get UNAVAILABLE naming the fault, and the server reports the failure (serve() exits 1 on it)."""
    watch = real.health.Watch(health_pb2.HealthCheckRequest(service="engine.v1.Engine"))
    assert next(watch).status == SERVING
    Faults(monkeypatch, real.engine.runner, fail_on={1}, recover_raises=True)
    code, details = outcome(real.stub, request(shared_prefix_prompts(1, seed=1)[0]))
    assert code == CODE.UNAVAILABLE and "injected fault in recover" in details
    assert "injected fault in recover" in real.server.wait_failed(timeout=10)
    assert next(watch).status == NOT_SERVING
    code, details = outcome(real.stub, request([5, 6, 7]))
    assert code == CODE.UNAVAILABLE and "injected fault in recover" in details
    assert real.engine.block_manager.num_used_pages == 0
    watch.cancel()


def test_fake_engine_faults_map_to_internal_and_unavailable():
    engine = FakeEngine()
    with serving(engine) as served:
        engine.pause()
        call = served.stub.Generate(ids_request([1], max_tokens=20))
        assert engine.wait_for(lambda e: e.stats().waiting_requests == 1)
        engine.run_steps(1)
        assert list(next(call).token_ids) == [2]
        engine.fail_step("RuntimeError: boom")
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == CODE.INTERNAL and "RuntimeError: boom" in e.value.details()
        engine.resume()
        assert tokens_of(served.stub.Generate(ids_request([7], max_tokens=2))) == [8, 9]  # still serving
        engine.pause()
        call = served.stub.Generate(ids_request([1], max_tokens=20))
        assert engine.wait_for(lambda e: e.stats().waiting_requests == 1)
        engine.die("recovery failed: RuntimeError: gone")
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == CODE.UNAVAILABLE and "gone" in e.value.details()
        assert "gone" in served.server.wait_failed(timeout=10)
        health = health_pb2_grpc.HealthStub(served.channel)
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            list(served.stub.Generate(ids_request([1], max_tokens=1)))
        assert e.value.code() == CODE.UNAVAILABLE and "gone" in e.value.details()


DYING_SERVER = ("import sys; from engine.server import run; from tests.fake_engine import FakeEngine; "
                "run(sys.argv, engine_factory=lambda config: FakeEngine(config, die_on_token=666))")


def test_a_dead_engine_makes_the_process_exit_1_for_its_supervisor():
    proc = subprocess.Popen([sys.executable, "-c", DYING_SERVER, "--port=0"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        address = line.split(" on ")[1].split()[0]
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as e:
                list(engine_pb2_grpc.EngineStub(channel).Generate(ids_request([666], max_tokens=3), timeout=30))
            assert e.value.code() == CODE.UNAVAILABLE and "injected fault on token 666" in e.value.details()
        assert proc.wait(timeout=30) == 1
        err = proc.stderr.read()
        assert "Traceback" not in err and "exiting with status 1 so that a supervisor restarts" in err.splitlines()[-1]
    finally:
        proc.kill()
        proc.communicate()


def test_shutdown_is_bounded_even_when_the_engine_is_stuck():
    """Defect 11: a stream that never finishes and a step that never returns: shutdown(timeout) still
    returns within max(timeout, ABORT_RESERVE_SECONDS) plus a little, and the client gets a status."""
    engine = FakeEngine()
    server = EngineServer("127.0.0.1", 0)
    server.start()
    server.attach(engine)
    with grpc.insecure_channel(server.address) as channel:
        engine.pause()
        call = engine_pb2_grpc.EngineStub(channel).Generate(ids_request([1], max_tokens=60), timeout=60)
        assert engine.wait_for(lambda e: e.stats().waiting_requests == 1)
        engine.run_steps(1)
        assert list(next(call).token_ids) == [2]
        engine.stall()
        engine.resume()
        assert engine.stalled.wait(timeout=10)  # the loop is inside a step that blocks until unstall()
        start = time.monotonic()
        stopping = threading.Thread(target=server.shutdown, args=(1.0,), daemon=True)
        stopping.start()
        stopping.join(timeout=ABORT_RESERVE_SECONDS + 3)
        took = time.monotonic() - start
        alive = stopping.is_alive()
        engine.unstall()
        assert not alive and took < max(1.0, ABORT_RESERVE_SECONDS) + 1.5, took
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() in (CODE.UNAVAILABLE, CODE.CANCELLED)


def test_default_shutdown_fits_in_kubernetes_grace_period():
    from engine.flags import ServeOptions
    from engine.serving.engine_server import ABORT_RESERVE_SECONDS as reserve
    assert max(ServeOptions().shutdown_timeout_seconds, reserve) + 1.0 < 30.0  # SIGKILL follows after 30 s


def test_concurrent_calls_beyond_the_limit_are_resource_exhausted():
    """Defect 7: --max-concurrent-rpcs bounds the Generate calls in flight (each holds a thread)."""
    engine = FakeEngine()
    server = EngineServer("127.0.0.1", 0, max_concurrent_rpcs=2)
    server.start()
    server.attach(engine)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = engine_pb2_grpc.EngineStub(channel)
            engine.pause()
            held = [stub.Generate(ids_request([i], max_tokens=2)) for i in (10, 20)]
            assert engine.wait_for(lambda e: e.stats().waiting_requests == 2)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(ids_request([30], max_tokens=2)))
            assert e.value.code() == CODE.RESOURCE_EXHAUSTED and "--max-concurrent-rpcs=2" in e.value.details()
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status == SERVING
            assert stub.GetModelInfo(pb.GetModelInfoRequest()).name == "fake-model"
            engine.resume()
            assert [tokens_of(h) for h in held] == [[11, 12], [21, 22]]
            assert tokens_of(stub.Generate(ids_request([30], max_tokens=2))) == [31, 32]
            assert pages_back_to_zero(engine)
    finally:
        server.shutdown(timeout=0)


# --- start-up failures: one line, exit 1, no traceback (defect 12) ------------------------------------------

FAILING_WARMUP = ("import sys; from engine.server import run; from tests.fake_engine import FakeEngine; "
                  "errors = {{'oom': RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                  "4.00GiB.\\n  details on a second line'), 'xla': RuntimeError('INTERNAL: XLA compilation "
                  "failed\\nmore'), 'memory': MemoryError()}}; "
                  "run(sys.argv, engine_factory=lambda config: FakeEngine(config, warmup_error=errors[{kind!r}]))")


def _run(args: list[str], timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("kind, expected", [("oom", "out of memory"), ("xla", "XLA compilation failed"),
                                            ("memory", "MemoryError")])
def test_a_warmup_failure_exits_1_with_one_line(kind, expected):
    p = _run([sys.executable, "-c", FAILING_WARMUP.format(kind=kind), "--port=0"])
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "warm-up failed" in lines[0] and expected in lines[0], p.stderr


def test_a_bad_host_exits_1_with_one_line():
    p = _run([sys.executable, "-m", "engine.server", "--host=no such host!", "--port=0"], timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "--host=no such host!" in p.stderr, p.stderr


def test_a_tokenizer_that_cannot_be_built_exits_1_with_one_line(tmp_path, monkeypatch):
    from tests import tiny_vocab
    from tests.tiny_model import write_tiny_gguf
    monkeypatch.setattr(tiny_vocab, "tiny_merges", lambda: ["a ZZZ"])  # a merge naming a missing token
    path = write_tiny_gguf(tmp_path / "badtok.gguf")
    p = _run([sys.executable, "-m", "engine.server", f"--model-path={path}", "--port=0", "--devices=cpu"])
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    line = p.stderr.strip().splitlines()
    assert len(line) == 1 and str(path) in line[0] and "cannot build the tokenizer" in line[0], p.stderr
