"""One server over several processes on 127.0.0.1 (issue 16): `python -m engine.server` once per process, one CPU
device each, tensor parallel across the processes over gloo; process 0 serves gRPC/HTTP and its followers replay
its steps (engine/device/follower.py). Every process has a hard deadline (tests/group_launcher.py kills what is left).
"""
from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2

from engine import LLM, SamplingParams
from engine.v1 import engine_pb2 as pb
from tests.group_launcher import SERVING, Group, last_line
from tests.test_sharding import TP_SPEC

pytestmark = pytest.mark.slow
# Few buckets (1..16 tokens): every process compiles each one at start-up (the persistent compilation
# cache is off in a group: engine/loading/compilation_cache.py).
OPTS = dict(max_batch_size=4, max_num_batched_tokens=16, max_length=1024, kv_cache_page_size=16, kv_cache_pages=80)
FLAGS = ["--max-batch-size=4", "--max-num-batched-tokens=16", "--max-length=1024", "--kv-cache-page-size=16",
         "--kv-cache-pages=80", "--enable-prefix-caching"]
PREFIX = list(range(20, 57))        # 37 tokens: two full pages of 16 are shareable
SUFFIXES = ([5, 9, 11], [7, 3], [13, 17, 19, 23, 29])
BATCH = [PREFIX[:k] + [3 + k] for k in (4, 9, 17, 30, 33, 36)]   # six at once: several rows per step
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
START_TIMEOUT = 600.0


def _request(ids, max_tokens=8):
    return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids),
                              sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def _one(stub, ids) -> tuple[list[int], int]:
    responses = list(stub.Generate(_request(ids), timeout=60))
    return [t for r in responses for t in r.token_ids], responses[-1].usage.cached_prompt_tokens


def _workload(generate, reset) -> dict:
    """Sequential rounds (cached tokens are exact), a reset, a round after it, then six prompts at once."""
    first = [generate([PREFIX + list(s)]) for s in SUFFIXES]
    again = [generate([PREFIX + list(s)]) for s in SUFFIXES]
    reset_result = reset()
    after = generate([PREFIX + list(SUFFIXES[0])])
    batch = generate(BATCH)
    return {"first": first, "again": again, "reset": reset_result, "after": after,
            "batch": [tokens for tokens, _ in batch]}


@pytest.fixture(scope="module")
def one_process(tiny_gguf_factory):
    llm = LLM(tiny_gguf_factory(TP_SPEC), devices="cpu", enable_prefix_caching=True, **OPTS)
    sp = SamplingParams(max_tokens=8, ignore_eos=True)

    def generate(prompts):
        outs = llm.generate(prompts, sp)
        return [(list(o.token_ids), o.cached_prompt_tokens) for o in outs] if len(prompts) > 1 else \
            (list(outs[0].token_ids), outs[0].cached_prompt_tokens)
    return _workload(generate, llm.reset_prefix_cache)


def _served(group: Group):
    address = group.address(START_TIMEOUT)
    channel, stub, health = group.stub(address)
    grpc.channel_ready_future(channel).result(timeout=30)
    return channel, stub, health


def _check_against_one_process(group: Group, one_process: dict, tmp_path):
    """Runs the workload on a started group; returns its gRPC channel, stub and health stub."""
    channel, stub, health = _served(group)
    http = re.search(r"OpenAI-compatible HTTP at (\S+)/v1", open(f"{tmp_path}/0.out").read()).group(1)
    def generate(prompts):
        if len(prompts) == 1:
            return _one(stub, prompts[0])
        results = [None] * len(prompts)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _one(stub, prompts[i])))
                   for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return results

    def reset():
        req = urllib.request.Request(f"{http}/reset_prefix_cache", method="POST")
        return json.loads(urllib.request.urlopen(req, timeout=30).read())["reset"]

    got = _workload(generate, reset)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert got == one_process
    assert got["again"][0][1] == 32 and got["after"][1] == 0   # hits, then none after the reset
    assert info.devices.endswith(f"over {group.num_processes} processes")
    return channel, stub, health


def test_four_processes_serve_the_tokens_and_prefix_hits_of_one_process_then_stop(tiny_gguf_factory, one_process,
                                                                                   tmp_path):
    group = Group(str(tmp_path), tiny_gguf_factory(TP_SPEC), 4, FLAGS + [f"--http-port={_free_port()}"])
    try:
        group.start()
        channel, _, _ = _check_against_one_process(group, one_process, tmp_path)
        channel.close()
        # Each process read only its shards: the tiny model's vocabulary (and so its embedding) does not
        # divide over 4 and its Q4_K w_down is one block of 256 columns, so those are read by every process.
        full, read = _full_read_mb(group.model_path), _weights_read_mb(group)
        assert all(mb < 0.7 * full for mb in read.values()) and sum(read.values()) >= 0.99 * full, (read, full)
        group.signal(0, signal.SIGTERM)                              # drains, then stops the followers
        results = group.finish(60)
        assert {pid: status for pid, (status, _) in results.items()} == {0: 0, 1: 0, 2: 0, 3: 0}, \
            {pid: last_line(err) for pid, (_, err) in results.items()}
    finally:
        group.kill_all()


def _full_read_mb(model_path: str) -> float:
    """MB one process reads to load the whole model (every weight once, a tied embedding twice)."""
    from engine.loading.gguf_loader import open_gguf_source
    from engine.loading.weights import WEIGHTS
    _, source, _ = open_gguf_source(model_path)
    for w in WEIGHTS:
        source.read_all(w)
    return source.bytes_read / 1e6


def _weights_read_mb(group: Group) -> dict[int, float]:
    """MB of weights each process read, from its start-up log (engine/device/device_params.py)."""
    found = {pid: re.search(r"weights: read ([\d.e+]+) MB of the", group.stderr(pid))
             for pid in range(group.num_processes)}
    assert all(found.values()), {pid: last_line(group.stderr(pid)) for pid, m in found.items() if not m}
    return {pid: float(m.group(1)) for pid, m in found.items()}


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_serve_like_one_and_a_killed_follower_fails_process_0_loudly(tiny_gguf_factory,
                                                                                    one_process, tmp_path):
    group = Group(str(tmp_path), tiny_gguf_factory(TP_SPEC), 2, FLAGS + [f"--http-port={_free_port()}"])
    try:
        group.start()
        channel, stub, health = _check_against_one_process(group, one_process, tmp_path)
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == SERVING
        stream = stub.Generate(_request(PREFIX, max_tokens=900), timeout=60)
        assert len(next(stream).token_ids) == 1                      # streaming has begun
        group.signal(1, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            for _ in stream:
                pass
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
        assert "follower process 1" in failed.value.details()
        assert time.monotonic() - killed < 10.0
        assert NOT_SERVING in [update.status for update in _until_closed(watch)]
        results = group.finish(30)
        status, err = results[0]
        assert status == 1, last_line(err)
        assert "follower process 1" in last_line(err) and "exiting with status 1" in last_line(err)
        assert time.monotonic() - killed < 20.0
        channel.close()
    finally:
        group.kill_all()


def test_two_processes_restore_their_checkpoint_shards_and_quantize_like_one_process(tiny_gguf_factory, tmp_path):
    """An orbax checkpoint restored onto a mesh over two processes (each reads its addressable shards), served
    q8_0: quantized at load, each row-parallel matrix's scales from its maxima over both processes."""
    from engine.loading.checkpoint import convert_gguf
    checkpoint = str(tmp_path / "checkpoint")
    convert_gguf(tiny_gguf_factory(TP_SPEC), checkpoint, "float32")
    prompts = [PREFIX + list(s) for s in SUFFIXES]
    llm = LLM(checkpoint, devices="cpu", quantization_encoding="q8_0", **OPTS)
    want = [list(o.token_ids) for o in llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))]
    group = Group(str(tmp_path), checkpoint, 2, FLAGS + ["--quantization-encoding=q8_0", "--http-port=0"])
    try:
        group.start()
        channel, stub, _ = _served(group)
        assert [_one(stub, p)[0] for p in prompts] == want
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).dtype == "q8_0"
        channel.close()
        group.signal(0, signal.SIGTERM)
        assert {pid: status for pid, (status, _) in group.finish(60).items()} == {0: 0, 1: 0}
    finally:
        group.kill_all()


def _until_closed(watch):
    try:
        yield from watch
    except grpc.RpcError:   # the server went away after reporting NOT_SERVING
        return


def test_missing_process_fails_start_up_with_one_line_naming_it(tiny_gguf_factory, tmp_path):
    group = Group(str(tmp_path), tiny_gguf_factory(TP_SPEC), 3, FLAGS + ["--http-port=0"], timeout=3)
    try:
        started = time.monotonic()
        group.start(ids=[0, 1])                                      # process 2 never comes
        results = group.finish(40)
        elapsed = time.monotonic() - started
        want = "--num-processes=3: process 2 did not join within 3 s"
        for pid in (0, 1):
            status, err = results[pid]
            assert status == 1 and want in last_line(err), (pid, status, last_line(err))
        assert elapsed < 30.0
    finally:
        group.kill_all()


def test_real_model_over_three_processes_answers_paris(tmp_path):
    from engine.loading.gguf_loader import resolve_model_path
    group = Group(str(tmp_path), resolve_model_path(None), 3,
                  # three buckets (1, 2, 4 tokens): each process compiles each unrolled 30-layer step
                  ["--max-batch-size=1", "--max-num-batched-tokens=4", "--max-length=128", "--kv-cache-page-size=16",
                   "--kv-cache-pages=20", "--http-port=0"])
    try:
        group.start()
        channel, stub, _ = _served(group)
        request = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(
            role="user", content="What is the capital of France?")]), sampling=pb.SamplingParams(max_tokens=12))
        text = "".join(r.text for r in stub.Generate(request, timeout=120))
        channel.close()
        assert "Paris" in text, text
        # Each host read a third of the weights (SmolLM2's heads, MLP and vocabulary divide by 3, every
        # split column-aligned to the Q4_1 blocks); only the norms are read by all.
        full, read = _full_read_mb(group.model_path), _weights_read_mb(group)
        assert all(mb <= 0.34 * full for mb in read.values()) and sum(read.values()) >= 0.99 * full, (read, full)
        group.signal(0, signal.SIGTERM)
        assert {pid: status for pid, (status, _) in group.finish(60).items()} == {0: 0, 1: 0, 2: 0}
    finally:
        group.kill_all()
