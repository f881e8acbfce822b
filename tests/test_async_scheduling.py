"""Async scheduling (engine.core.engine.LLMEngine._step): step N+1 is launched before step N's tokens are read. Every
observable output must equal the synchronous loop's, token for token: greedy and seeded sampling, EOS,
stop strings found one step late, max_tokens, preemption under a tiny pool, aborts; and no token past a
stop may ever reach a stream."""
import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.core.request import Request

OPTS = dict(max_batch_size=6, max_num_batched_tokens=64, max_length=160, kv_cache_page_size=16)


def prompts(n, seed):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 300, rng.integers(3, 70))] for _ in range(n)]


def run(llm, ps, sps):
    """generate() through add_request/step, also checking that the streamed pieces add up to the result."""
    eng = llm.engine
    streams = [eng.add_request(Request(f"a{i}-{id(sp)}", tuple(p), sp)) for i, (p, sp) in enumerate(zip(ps, sps))]
    got = [([], []) for _ in streams]
    finals = [None] * len(streams)
    while any(f is None for f in finals):
        eng.step()
        for i, s in enumerate(streams):
            for out in s.drain():
                got[i][0].extend(out.new_token_ids)
                got[i][1].append(out.text)
                if out.finish_reason is not None:
                    finals[i] = out
    assert eng.stats().kv_pages_used == 0
    return [(tuple(t), "".join(x), f.finish_reason, f.completion_tokens) for (t, x), f in zip(got, finals)]


@pytest.fixture(scope="module")
def engines(tiny_gguf):
    # A pool of 14 pages of 16 for up to 6 sequences of up to 160 tokens: preemption happens.
    return {mode: LLM(tiny_gguf, async_scheduling=mode, kv_cache_pages=14, enable_prefix_caching=True, **OPTS)
            for mode in (False, True)}


def test_outputs_equal_the_synchronous_loop(engines):
    ps = prompts(14, seed=1)
    sync = engines[False]
    # Stop strings taken from what the synchronous loop writes, so they really fire (some mid-output).
    plain = sync.generate(ps, SamplingParams(max_tokens=30, ignore_eos=True))
    sps = []
    for i, o in enumerate(plain):
        stop = [o.text[len(o.text) // 3:len(o.text) // 3 + 2]] if i % 3 == 0 and len(o.text) > 6 else []
        sps.append(SamplingParams(max_tokens=5 + 3 * (i % 9), ignore_eos=i % 2 == 0, stop=stop,
                                  temperature=0.9 if i % 4 == 1 else 0.0, seed=i))
    want = run(sync, ps, sps)
    got = run(engines[True], ps, sps)
    assert got == want
    assert sum(1 for _, _, reason, _ in want if reason.value == "stop") >= 3          # stops really happened
    assert engines[True].engine.stats().preemptions > 0                                # and preemption
    for (tokens, _, _, n), sp in zip(got, sps):
        assert len(tokens) == n <= sp.max_tokens


def test_a_stop_string_found_late_never_streams_the_extra_token(engines):
    """The token after a stop string is already being computed when the stop is found: it is dropped."""
    p = prompts(1, seed=2)[0]
    full = engines[False].generate(p, SamplingParams(max_tokens=24, ignore_eos=True))[0]
    stop = full.text[8:10]
    sp = SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop])
    want, got = (run(engines[m], [p], [sp])[0] for m in (False, True))
    assert got == want and got[2].value == "stop" and stop not in got[1]
    assert len(got[0]) < 24


def test_abort_while_a_step_is_in_flight_frees_everything(engines):
    eng = engines[True].engine
    s = eng.add_request(Request("in-flight", tuple(prompts(1, seed=3)[0]), SamplingParams(max_tokens=50,
                                                                                          ignore_eos=True)))
    for _ in range(3):
        eng.step()
    eng.abort("in-flight")
    while eng.has_unfinished():
        eng.step()
    outs = s.drain()
    assert outs[-1].finish_reason.value == "abort"
    assert all(t >= 0 for o in outs for t in o.new_token_ids)     # a placeholder never leaks
    assert eng.stats().kv_pages_used == 0


def test_one_device_call_per_engine_step(engines, monkeypatch):
    """Decodes and prefill chunks of any mix run as ONE jitted call per step."""
    eng = engines[True].engine
    calls, outputs = [], []
    real_step, real_schedule = eng.runner._step, eng.scheduler.schedule
    monkeypatch.setattr(eng.runner, "_step", lambda *a: calls.append(1) or real_step(*a))
    monkeypatch.setattr(eng.scheduler, "schedule", lambda: outputs.append(real_schedule()) or outputs[-1])
    for i, p in enumerate(prompts(5, seed=4)):
        eng.add_request(Request(f"calls-{i}", tuple(p), SamplingParams(max_tokens=8, ignore_eos=True)))
    mixed = 0
    while eng.has_unfinished():
        before = len(calls)
        eng.step()
        out = outputs[-1]
        assert len(calls) - before == (1 if out.decodes or out.prefills else 0)
        mixed += bool(out.decodes and out.prefills)
    assert mixed >= 1 and len(calls) > 5


def test_a_long_prompt_is_chunked_while_16_streams_each_get_a_token_every_step(tiny_gguf):
    """Chunking stays fair: while a 600-token prompt is prefilled (64-token steps, 16 of them decodes), every
    one of 16 decoding streams gets a token on every step until the long prompt's first token."""
    llm = LLM(tiny_gguf, max_batch_size=17, max_num_batched_tokens=64, max_length=700, kv_cache_page_size=16,
              kv_cache_pages=200)
    eng = llm.engine
    streams = [eng.add_request(Request(f"s{i}", tuple(p), SamplingParams(max_tokens=200, ignore_eos=True)))
               for i, p in enumerate(prompts(16, seed=5))]
    while not all(s.drain() for s in streams):        # every stream has started decoding
        eng.step()
    long_prompt = tuple(int(t) for t in np.random.default_rng(6).integers(3, 300, 600))
    long = eng.add_request(Request("long", long_prompt, SamplingParams(max_tokens=1)))
    steps = 0
    while True:
        eng.step()
        steps += 1
        outs = long.drain()
        if outs and any(o.new_token_ids for o in outs):
            break
        assert all(sum(len(o.new_token_ids) for o in s.drain()) == 1 for s in streams), f"step {steps}"
    assert steps >= 600 // 48                          # 48 prefill tokens a step at most
    for s in streams:
        eng.abort(s.request_id)
    while eng.has_unfinished():
        eng.step()
