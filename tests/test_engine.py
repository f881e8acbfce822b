"""Offline engine on the tiny model: batching, sampling, stop conditions, bad requests."""
import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.core.request import Request

OPTS = dict(max_batch_size=8, max_num_batched_tokens=64, max_length=256, kv_cache_page_size=16,
            kv_cache_pages=128)


@pytest.fixture(scope="module")
def llm(tiny_gguf):
    return LLM(tiny_gguf, **OPTS)


def prompts(n, vocab, seed=0, lo=3, hi=90):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, rng.integers(lo, hi))] for _ in range(n)]


def test_batch_equals_one_at_a_time(llm):
    ps = prompts(6, llm.engine.model_config.vocab_size)
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    together = llm.generate(ps, sp)
    alone = [llm.generate(p, sp)[0] for p in ps]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in together)
    assert [o.prompt_token_ids for o in together] == [tuple(p) for p in ps]


def test_seeded_sampling_is_reproducible_and_seed_dependent(llm):
    p = prompts(1, llm.engine.model_config.vocab_size, seed=1)[0]
    a = llm.generate(p, SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True))[0]
    b = llm.generate([p, p], SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True))
    c = llm.generate(p, SamplingParams(max_tokens=16, temperature=1.0, seed=8, ignore_eos=True))[0]
    assert a.token_ids == b[0].token_ids == b[1].token_ids
    assert a.token_ids != c.token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    p = prompts(1, llm.engine.model_config.vocab_size, seed=2)[0]
    greedy = llm.generate(p, SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids
    k1 = llm.generate(p, SamplingParams(max_tokens=10, temperature=2.0, top_k=1, seed=3, ignore_eos=True))[0]
    p0 = llm.generate(p, SamplingParams(max_tokens=10, temperature=2.0, top_p=1e-6, seed=3, ignore_eos=True))[0]
    assert k1.token_ids == greedy and p0.token_ids == greedy


def test_top_k_restricts_the_support(llm, tiny_gguf):
    """With top_k=3 and a high temperature, every first token is among the oracle's 3 most likely ones."""
    from tests.numpy_llama import NumpyLlama
    p = prompts(1, llm.engine.model_config.vocab_size, seed=4)[0]
    top3 = set(np.argsort(NumpyLlama(tiny_gguf).logits(p)[-1])[-3:].tolist())
    outs = llm.generate([p] * 12, [SamplingParams(max_tokens=1, temperature=5.0, top_k=3, seed=s) for s in range(12)])
    firsts = {o.token_ids[0] for o in outs}
    assert firsts <= top3 and len(firsts) >= 2


def test_stop_string_cuts_text_and_finishes(llm):
    p = prompts(1, llm.engine.model_config.vocab_size, seed=5)[0]
    full = llm.generate(p, SamplingParams(max_tokens=40, ignore_eos=True))[0]
    text = full.text
    assert len(text) > 10
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = llm.generate(p, SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[:text.find(stop)]
    assert len(cut.token_ids) < len(full.token_ids)
    assert full.token_ids[:len(cut.token_ids)] == cut.token_ids


def test_eos_stops_unless_ignored(llm):
    """Among 32 random prompts, find continuations that pass an end-of-sequence token when it is ignored;
    without ignore_eos the same request stops right there (the EOS id ends the output)."""
    eos_ids = llm.tokenizer.eos_token_ids
    ps = prompts(32, llm.engine.model_config.vocab_size, seed=6)
    free = llm.generate(ps, SamplingParams(max_tokens=30, ignore_eos=True))
    assert all(o.finish_reason == "length" and len(o.token_ids) == 30 for o in free)
    hits = [(p, o) for p, o in zip(ps, free) if eos_ids & set(o.token_ids)]
    assert hits, "no continuation reached an EOS id: pick another seed"
    for p, o in hits[:3]:
        first = next(i for i, t in enumerate(o.token_ids) if t in eos_ids)
        stopped = llm.generate(p, SamplingParams(max_tokens=30))[0]
        assert stopped.finish_reason == "stop"
        assert stopped.token_ids == o.token_ids[:first + 1]


@pytest.mark.parametrize("ids, match", [
    ([], "empty"), ([1, 10 ** 6], r"prompt_token_ids\[1\]=1000000"), ([-1], r"prompt_token_ids\[0\]=-1"),
    ([5] * 300, "max-length"),
])
def test_bad_requests_name_the_problem(llm, ids, match):
    with pytest.raises(ValueError, match=match):
        llm.engine.validate(Request("x", tuple(ids), SamplingParams()))


def test_max_tokens_beyond_max_length_is_rejected(llm):
    with pytest.raises(ValueError, match="max_tokens=250"):
        llm.engine.validate(Request("x", tuple(range(3, 13)), SamplingParams(max_tokens=250)))


def test_string_chat_and_token_prompts_agree(llm):
    msgs = [{"role": "user", "content": "hello there"}]
    text = llm.tokenizer.apply_chat_template(msgs)
    ids = llm.tokenizer.encode(text)
    sp = SamplingParams(max_tokens=5, ignore_eos=True)
    a, b, c = llm.generate([msgs, text, ids], sp)
    assert a.prompt_token_ids == b.prompt_token_ids == c.prompt_token_ids == tuple(ids)
    assert a.token_ids == b.token_ids == c.token_ids


def test_compilations_are_bounded_by_the_buckets(llm):
    """A mixed run compiles at most one program per bucket shape, never one per request."""
    before = llm.engine.runner.num_compilations
    ps = prompts(20, llm.engine.model_config.vocab_size, seed=9, lo=1, hi=120)
    llm.generate(ps, [SamplingParams(max_tokens=int(n)) for n in np.random.default_rng(0).integers(1, 20, 20)])
    assert llm.engine.runner.num_compilations <= len(llm.engine.runner.buckets.all_shapes())
    assert llm.engine.runner.num_compilations - before < 20


def test_unseeded_requests_sample_independently(llm):
    p = prompts(1, llm.engine.model_config.vocab_size, seed=11)[0]
    a, b = llm.generate([p, p], SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True))
    assert a.token_ids != b.token_ids


def test_after_warmup_an_unexpected_shape_is_an_error(tiny_gguf):
    small = LLM(tiny_gguf, max_batch_size=2, max_num_batched_tokens=16, max_length=64, kv_cache_page_size=16,
                kv_cache_pages=16)
    runner = small.engine.runner
    small.engine.warmup()
    assert runner.warm and runner.num_compilations == len(runner.buckets.all_shapes())
    out = small.generate(prompts(3, 300, seed=12, hi=20), SamplingParams(max_tokens=4, ignore_eos=True))
    assert all(len(o.token_ids) == 4 for o in out)            # every real shape was compiled
    with pytest.raises(RuntimeError, match="not one of the compiled buckets"):
        runner.warmup([(3, 3)])                                 # N=3 is no bucket


def test_recover_replaces_kv_pages_consumed_by_a_failed_step(llm):
    runner = llm.engine.runner
    assert not runner.recover()                                # nothing to do while the pages are alive
    runner.k_pools[0].delete()
    assert runner.recover() and not runner.k_pools[0].is_deleted()
    p = prompts(1, llm.engine.model_config.vocab_size, seed=13)[0]
    assert len(llm.generate(p, SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3


def test_a_full_queue_never_loses_or_hangs_a_request(tiny_gguf):
    """Many threads race add_request against the engine loop with a tiny waiting queue: each request is
    either refused with QueueFullError or streams to its end."""
    import threading
    from engine.config import EngineConfig
    from engine.core.engine import LLMEngine
    from engine.core.request import QueueFullError
    eng = LLMEngine(EngineConfig(model_path=tiny_gguf, max_waiting_requests=2, **OPTS))
    eng.start()
    accepted, refused, lock = [], [], threading.Lock()

    def submit(i):
        req = Request(f"q{i}", tuple(prompts(1, 300, seed=100 + i, hi=30)[0]), SamplingParams(max_tokens=3))
        try:
            s = eng.add_request(req)
            with lock:
                accepted.append(s)
        except QueueFullError:
            with lock:
                refused.append(i)
    threads = [threading.Thread(target=submit, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        for s in accepted:
            last = None
            while not s.finished:
                last = s.get(timeout=60)
            assert last.finish_reason is not None and last.finish_reason.value in ("length", "stop")
        assert len(accepted) + len(refused) == 24 and accepted
        assert eng.stats().kv_pages_used == 0
    finally:
        eng.shutdown()
