"""The gRPC server over the real LLMEngine on the tiny model: concurrency, chunked prefill keeping streams
flowing, cancellation freeing pages, preemption under a small pool. Offline `LLM.generate` is the oracle."""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.serving.engine_server import EngineServer
from engine.v1 import engine_pb2 as pb
from engine.v1 import engine_pb2_grpc

OPTS = dict(max_batch_size=8, max_num_batched_tokens=64, max_length=256, kv_cache_page_size=16,
            kv_cache_pages=128, enable_prefix_caching=True)


class Served:
    def __init__(self, path, **opts):
        self.engine = LLMEngine(EngineConfig(model_path=path, **opts))
        self.server = EngineServer("127.0.0.1", 0)
        self.server.start()
        self.server.attach(self.engine)
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = engine_pb2_grpc.EngineStub(self.channel)

    def close(self):
        self.channel.close()
        self.server.shutdown(timeout=0)

    def idle_and_empty(self, timeout=30.0) -> bool:
        """Waits (bounded) until no request runs and no page is held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.engine.stats()
            if s.kv_pages_used == 0 and s.running_requests == 0 and s.waiting_requests == 0:
                return True
            time.sleep(0.01)
        return False


def request(ids, max_tokens, rid=""):
    return pb.GenerateRequest(request_id=rid, prompt_token_ids=pb.TokenIds(ids=ids),
                              sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def prompts(n, seed, lo=2, hi=100):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 300, rng.integers(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def served(tiny_gguf):
    s = Served(tiny_gguf, **OPTS)
    yield s
    s.close()


@pytest.fixture(scope="module")
def offline(tiny_gguf):
    return LLM(tiny_gguf, **OPTS)


def test_32_concurrent_streams_match_offline_generate(served, offline):
    ps = prompts(32, seed=0)
    lens = [int(n) for n in np.random.default_rng(1).integers(1, 24, 32)]
    with futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda a: list(served.stub.Generate(request(*a))), zip(ps, lens)))
    want = offline.generate(ps, [SamplingParams(max_tokens=n, ignore_eos=True) for n in lens])
    for responses, w in zip(got, want):
        assert [t for r in responses for t in r.token_ids] == list(w.token_ids)
        assert responses[-1].finish_reason == pb.GenerateResponse.LENGTH
        assert responses[-1].usage.completion_tokens == len(w.token_ids)
    assert served.idle_and_empty()


def test_long_prompt_is_chunked_between_decode_steps(served):
    """While a 240-token prompt is prefilled in 64-token chunks, the running streams keep getting tokens."""
    arrivals: dict[int, list[float]] = {i: [] for i in range(4)}
    started = threading.Barrier(5, timeout=120)

    def stream(i):
        for n, _ in enumerate(served.stub.Generate(request(prompts(1, seed=10 + i, hi=40)[0], 200))):
            arrivals[i].append(time.perf_counter())
            if n == 2:
                started.wait()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait()
    sent = time.perf_counter()
    first = next(iter(served.stub.Generate(request(prompts(1, seed=99, lo=240, hi=241)[0], 1))))
    first_at = time.perf_counter()
    assert first.usage.prompt_tokens == 240
    for t in threads:
        t.join()
    during = [sum(sent <= a <= first_at for a in arrivals[i]) for i in range(4)]
    # The longest wait of each stream for a token while the prompt was prefilled: the intervals between
    # arrivals clipped to [sent, first_at] (a hiccup in the 200-token tail, or a stream's own wait at the
    # barrier just before `sent`, says nothing of the prefill).
    gaps = [max(min(b, first_at) - max(a, sent) for a, b in zip(arrivals[i], arrivals[i][1:])
                if b >= sent and a <= first_at) for i in range(4)]
    # 240 tokens need >= 4 chunks of 64 (minus what decodes use): every stream decoded in between.
    assert min(during) >= 3, (during, gaps, first_at - sent)
    assert max(gaps) < (first_at - sent)
    assert served.idle_and_empty()


def test_cancelled_and_disconnected_clients_free_their_pages(served, tiny_gguf):
    call = served.stub.Generate(request(prompts(1, seed=20, hi=40)[0], 200, rid="to-cancel"))
    next(call), next(call)
    call.cancel()
    channel = grpc.insecure_channel(served.server.address)
    it = engine_pb2_grpc.EngineStub(channel).Generate(request(prompts(1, seed=21, hi=40)[0], 200, rid="to-drop"))
    next(it)
    channel.close()  # the client goes away mid-stream
    assert served.idle_and_empty()
    out = list(served.stub.Generate(request([5, 6, 7], 3)))   # still serving
    assert sum(len(r.token_ids) for r in out) == 3


def test_small_pool_preempts_and_still_completes_correctly(tiny_gguf, offline):
    small = Served(tiny_gguf, **{**OPTS, "kv_cache_pages": 13, "max_length": 96})
    try:
        ps = prompts(8, seed=30, lo=30, hi=40)
        with futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda p: list(small.stub.Generate(request(p, 40))), ps))
        want = offline.generate(ps, SamplingParams(max_tokens=40, ignore_eos=True))
        for responses, w in zip(got, want):
            assert [t for r in responses for t in r.token_ids] == list(w.token_ids)
        assert small.engine.stats().preemptions > 0
        # Unique prompts: a re-admission after preemption hits the request's own blocks, which is not a
        # prefix-cache hit for the prompt and must not be reported (or counted) as one.
        assert all(responses[-1].usage.cached_prompt_tokens == 0 for responses in got)
        assert small.engine.stats().prefix_cache_hit_tokens == 0
        assert small.idle_and_empty()
    finally:
        small.close()
