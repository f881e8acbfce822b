"""The pieces of a multi-process server that run in one process (issue 16): the control channel's wire format and
its failure detection, the start-up rendezvous (missing process, different flags), and process 0's engine with
a recording group — its mirrored commands, replayed on a second runner, reproduce every step exactly (the seam
carries everything a step needs); a lost follower ends every stream UNAVAILABLE; a failed step is fatal.
"""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.device.control_channel import (FollowerLostError, Hello, Leader, Step, Stop, Warmup, Welcome, decode,
                                           encode, receive)
from engine.device.distributed import _gather_followers, _join_leader, fingerprint
from engine.core.engine import LLMEngine
from engine.core.request import EngineUnavailableError, ErrorCode, FinishReason, Request
from engine.core.sampling_params import SamplingParams
from tests.group_launcher import free_port_pair
from tests.test_faults import Faults, collect
from tests.test_sharding import TP_SPEC

OPTS = dict(max_batch_size=4, max_num_batched_tokens=16, max_length=128, kv_cache_page_size=16, kv_cache_pages=40,
            enable_prefix_caching=True)


# --- wire format ---------------------------------------------------------------------------------------------
def test_every_command_round_trips_exactly():
    arrays = (np.arange(6, dtype=np.int32).reshape(2, 3), np.array([7, 2 ** 32 - 1], np.uint32),
              np.array([0.5, -1.25], np.float32), np.zeros((0,), np.int32))
    step = decode(encode(Step(arrays))[4:])
    assert [(a.dtype, a.shape, a.tolist()) for a in step.arrays] == [(a.dtype, a.shape, a.tolist()) for a in arrays]
    for command in (Hello(3, "abc"), Welcome(), Warmup(((1, 1), (16, 4))), Stop(None), Stop("why")):
        assert decode(encode(command)[4:]) == command


def test_unknown_tag_and_unsupported_dtype_are_refused():
    with pytest.raises(ValueError, match="unknown control message tag b'Z'"):
        decode(b"Z{}")
    with pytest.raises(ValueError):
        encode(Step((np.zeros(2, np.float64),)))


# --- failure detection ---------------------------------------------------------------------------------------
def test_leader_reports_a_follower_that_disconnects_and_then_refuses_to_send():
    here, there = socket.socketpair()
    leader = Leader({1: here})
    lost = threading.Event()
    leader.on_lost = lambda message: lost.set()
    leader.broadcast(Warmup(((1, 1),)))
    assert receive(there) == Warmup(((1, 1),))
    there.close()
    assert lost.wait(5.0)
    assert leader.lost == leader.wait_lost(0) == "follower process 1 disconnected (it died or was killed)"
    with pytest.raises(FollowerLostError, match="follower process 1 disconnected"):
        leader.broadcast(Stop())
    leader.stop()


def test_leader_stop_reaches_every_follower():
    pairs = [socket.socketpair() for _ in range(3)]
    leader = Leader({pid + 1: here for pid, (here, _) in enumerate(pairs)})
    leader.stop("shutting down")
    assert [receive(there) for _, there in pairs] == [Stop("shutting down")] * 3


# --- start-up rendezvous -------------------------------------------------------------------------------------
def _rendezvous(n: int, followers: dict[int, str], digest: str = "same", timeout: float = 1.0) -> dict:
    """Process 0 and the given followers (id -> flags digest) in threads; what each returned or raised."""
    control = ("127.0.0.1", free_port_pair() + 1)
    results = {}

    def run(pid, fn, *args):
        try:
            results[pid] = fn(*args)
        except ValueError as e:
            results[pid] = str(e)
    threads = [threading.Thread(target=run, args=(0, _gather_followers, control, n, timeout, digest, "h:1"))]
    threads += [threading.Thread(target=run, args=(pid, _join_leader, control, pid, timeout, d))
                for pid, d in followers.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_missing_processes_are_named_by_every_process_that_came():
    results = _rendezvous(4, {1: "same"})
    want = "--num-processes=4: processes 2, 3 did not join within 1 s (coordinator h:1; --distributed-timeout-seconds)"
    assert results == {0: want, 1: want}


def test_a_follower_with_other_flags_is_refused():
    results = _rendezvous(2, {1: "other"})
    assert results[0] == results[1] == ("process 1 runs with different engine flags than process 0 (every process "
                                        "needs the same flags except --process-id and --model-path)")


def test_a_complete_group_is_welcomed():
    results = _rendezvous(3, {1: "same", 2: "same"})
    assert sorted(results[0]) == [1, 2] and all(isinstance(results[p], socket.socket) for p in (1, 2))


def test_fingerprint_ignores_only_the_model_path():
    base = EngineConfig(max_length=64)
    assert fingerprint(base) == fingerprint(base.replace(model_path="/elsewhere/m.gguf"))
    assert fingerprint(base) != fingerprint(base.replace(max_length=65))


# --- process 0's engine with a group -------------------------------------------------------------------------
class RecordingGroup:
    """Stands in for the Leader: records every command process 0 would send."""

    def __init__(self):
        self.commands, self.num_processes, self.lost, self.on_lost, self.stopped = [], 2, None, None, []

    def wait_lost(self, timeout):
        return self.lost

    def broadcast(self, command):
        self.commands.append(command)

    def stop(self, reason=None):
        self.stopped.append(reason)


def _requests(n):
    prefix = list(range(20, 57))
    return [Request(f"r{i}", tuple(prefix[:20 + 5 * i] + [3 + i]), SamplingParams(max_tokens=6, ignore_eos=True,
                                                                                 temperature=0.8 if i % 2 else 0.0))
            for i in range(n)]


def test_mirrored_commands_replayed_on_another_runner_reproduce_every_step(tiny_gguf_factory):
    config = EngineConfig(model_path=tiny_gguf_factory(TP_SPEC), **OPTS)
    group = RecordingGroup()
    engine = LLMEngine(config, group=group)
    engine.warmup()
    follower = LLMEngine(config).runner
    follower.warmup(group.commands[0].shapes)      # as engine/device/follower.py: same programs, same null-page writes
    launched = []
    launch = engine.runner.launch
    engine.runner.launch = lambda *a: launched.append(launch(*a)) or launched[-1]
    streams = [engine.add_request(r) for r in _requests(4)]
    while engine.has_unfinished():
        engine.step()
    assert all(collect(s)[-1].finish_reason == FinishReason.LENGTH for s in streams)
    assert isinstance(group.commands[0], Warmup) and group.commands[0].shapes == tuple(
        engine.runner.buckets.all_shapes())
    steps = [c for c in group.commands[1:] if isinstance(c, Step)]
    assert len(steps) == len(group.commands) - 1 == len(launched) > 4
    for command, tokens in zip(steps, launched):
        assert np.asarray(follower.launch_packed(command.arrays)).tolist() == np.asarray(tokens).tolist()
    for mine, theirs in zip(engine.runner.k_pools + engine.runner.v_pools, follower.k_pools + follower.v_pools):
        assert np.array_equal(np.asarray(mine), np.asarray(theirs))
    engine.shutdown()
    assert group.stopped == [None]


def test_a_lost_follower_ends_every_stream_unavailable_and_refuses_new_requests(tiny_gguf_factory):
    group = RecordingGroup()
    engine = LLMEngine(EngineConfig(model_path=tiny_gguf_factory(TP_SPEC), **OPTS), group=group)
    streams = [engine.add_request(r) for r in _requests(2)]
    engine.step()                       # admitted and running
    group.on_lost("follower process 1 disconnected (it died or was killed)")
    for stream in streams:
        last = collect(stream)[-1]
        assert last.finish_reason == FinishReason.ABORT and last.error.code == ErrorCode.UNAVAILABLE
        assert "follower process 1 disconnected" in last.error.message
    assert engine.wait_until_stopped(5.0) == "follower process 1 disconnected (it died or was killed)"
    with pytest.raises(EngineUnavailableError):
        engine.add_request(_requests(1)[0])


def test_a_failed_step_in_a_group_is_fatal_not_recovered(tiny_gguf_factory, monkeypatch):
    group = RecordingGroup()
    engine = LLMEngine(EngineConfig(model_path=tiny_gguf_factory(TP_SPEC), **OPTS), group=group)
    faults = Faults(monkeypatch, engine.runner, fail_on={2})
    stream = engine.add_request(_requests(1)[0])
    engine.step()
    with pytest.raises(RuntimeError, match="injected fault"):
        engine.step()
    last = collect(stream)[-1]
    assert last.error.code == ErrorCode.UNAVAILABLE and "group of 2 processes" in last.error.message
    assert faults.recoveries == 0 and engine.failure is not None
