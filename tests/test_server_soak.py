"""Soak on the real SmolLM2 through the gRPC server (issue 13): 200+ mixed requests — greedy and seeded
sampling, shared prefixes, cancellations, deadlines — against a KV pool small enough that preemption and
eviction really happen. Afterwards no page is in use, and every request that finished got exactly the
tokens it gets when run alone (greedy and seeded sampling are both deterministic per request by design).
Slow: loads the real model twice (server + the solo oracle); a few minutes on 2 cores.
"""
from __future__ import annotations

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

pytestmark = pytest.mark.slow

NUM_REQUESTS = 216
COPIES = 4
CLIENTS = 16
# 11 usable pages of 16 tokens; 8 running requests of 30-50 tokens want 16-32: preemption is certain.
SOAK = dict(max_batch_size=8, max_num_batched_tokens=64, max_length=96, kv_cache_page_size=16, kv_cache_pages=12,
            enable_prefix_caching=True, quantization_encoding="float32", devices="cpu")
SYSTEMS = ("You are a helpful assistant. Answer in one short sentence, and be precise about numbers.",
           "You are a travel guide for Europe. Mention one city and one thing to see there.",
           "You are a patient teacher explaining science to children in simple words.",
           "You translate English into French and reply with the translation only.")
QUESTIONS = ("What is the capital of France?", "How many legs does a spider have?", "Why is the sky blue?",
             "Name a river in Germany.", "What do plants need to grow?", "Translate: good morning, friend.",
             "Where is the Colosseum?", "What is two plus three?", "Tell me about the moon.", "What is rain?",
             "Which ocean is the largest?", "What is a volcano?")


def workload(tokenizer, rng) -> list[dict]:
    """NUM_REQUESTS requests: UNIQUE prompt + sampling pairs sent COPIES times each, shuffled (repeats hit
    whole cached prompts, and keep the solo oracle affordable); each request's client either reads it to
    the end, cancels it after its first message, or gives it a 0.3 s deadline."""
    specs = []
    for _ in range(NUM_REQUESTS // COPIES):
        text = f"{SYSTEMS[rng.integers(len(SYSTEMS))]}\nQuestion: {QUESTIONS[rng.integers(len(QUESTIONS))]}\nAnswer:"
        n, ignore_eos = int(rng.integers(4, 13)), bool(rng.integers(2))
        sp = (SamplingParams(max_tokens=n, ignore_eos=ignore_eos) if rng.random() < 0.6 else
              SamplingParams(max_tokens=n, temperature=0.8, top_p=0.9, top_k=40, seed=int(rng.integers(0, 2 ** 32)),
                             ignore_eos=ignore_eos))
        specs.append((tuple(tokenizer.encode(text)), sp))
    order = rng.permutation(np.repeat(np.arange(len(specs)), COPIES))
    return [dict(rid=f"soak-{i}", ids=specs[k][0], sampling=specs[k][1],
                 action=rng.choice(["finish", "cancel", "deadline"], p=[0.8, 0.1, 0.1])) for i, k in enumerate(order)]


def to_proto(item) -> pb.GenerateRequest:
    sp = item["sampling"]
    sampling = pb.SamplingParams(max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p,
                                 top_k=sp.top_k, ignore_eos=sp.ignore_eos)
    if sp.seed is not None:
        sampling.seed = sp.seed
    return pb.GenerateRequest(request_id=item["rid"], prompt_token_ids=pb.TokenIds(ids=item["ids"]),
                              sampling=sampling)


def run_one(stub, item) -> tuple[grpc.StatusCode, list[int]]:
    got = []
    try:
        if item["action"] == "cancel":
            call = stub.Generate(to_proto(item), timeout=600)
            got.extend(next(call).token_ids)
            call.cancel()
            got.extend(t for r in call for t in r.token_ids)
        else:
            timeout = 0.3 if item["action"] == "deadline" else 600
            for r in stub.Generate(to_proto(item), timeout=timeout):
                got.extend(r.token_ids)
    except grpc.RpcError as e:
        return e.code(), got
    return grpc.StatusCode.OK, got


def test_soak_mixed_requests_small_pool(capsys):
    engine = LLMEngine(EngineConfig(**SOAK))
    server = EngineServer("127.0.0.1", 0)
    server.start()
    server.attach(engine)
    items = workload(engine.tokenizer, np.random.default_rng(0))
    start = time.perf_counter()
    try:
        with grpc.insecure_channel(server.address) as channel, futures.ThreadPoolExecutor(CLIENTS) as pool:
            stub = engine_pb2_grpc.EngineStub(channel)
            results = list(pool.map(lambda item: run_one(stub, item), items))
        wall = time.perf_counter() - start
        deadline = time.monotonic() + 60
        while engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.05)  # bounded: the aborts of the last cancels are applied within a step
        engine.shutdown(timeout=10)  # stops the loop: the counters below are final
        stats = engine.stats()
    finally:
        server.shutdown(timeout=0)
    codes = [code for code, _ in results]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}, codes
    finished = [(item, got) for item, (code, got) in zip(items, results) if code == grpc.StatusCode.OK]
    assert stats.kv_pages_used == 0 and stats.running_requests == stats.waiting_requests == 0
    assert engine.block_manager.num_free_pages == engine.block_manager.num_total_pages
    assert stats.preemptions > 0 and stats.prefix_cache_hit_tokens > 0 and stats.step_failures == 0

    oracle_start = time.perf_counter()
    oracle = LLM(**{**SOAK, "enable_prefix_caching": False, "kv_cache_pages": 64})
    solo: dict[tuple, tuple[int, ...]] = {}
    mismatches = []
    for item, got in finished:
        key = (item["ids"], item["sampling"])
        if key not in solo:
            solo[key] = oracle.generate(list(item["ids"]), item["sampling"])[0].token_ids
        if tuple(got) != solo[key]:
            mismatches.append((item["rid"], got, solo[key]))
    with capsys.disabled():
        print(f"\nsoak: {len(items)} requests in {wall:.1f} s ({len(finished)} finished, "
              f"{codes.count(grpc.StatusCode.CANCELLED)} cancelled, "
              f"{codes.count(grpc.StatusCode.DEADLINE_EXCEEDED)} past their deadline); "
              f"preemptions {stats.preemptions}, evictions {stats.prefix_cache_evictions}, "
              f"cached prompt tokens {stats.prefix_cache_hit_tokens}/{stats.prefix_cache_queried_tokens}, "
              f"pages in use at idle {stats.kv_pages_used}; {len(solo)} solo runs in "
              f"{time.perf_counter() - oracle_start:.1f} s")
    assert len(finished) >= 150 and not mismatches, mismatches
