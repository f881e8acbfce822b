"""Prefix caching end to end on the tiny model: greedy outputs identical with caching on and off, hits
reported, salts isolated, eviction under a small pool."""
import numpy as np
import pytest

from engine import LLM, SamplingParams

PAGE = 16
OPTS = dict(max_batch_size=8, max_num_batched_tokens=64, max_length=256, kv_cache_page_size=PAGE)
SP = SamplingParams(max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def off(tiny_gguf):
    return LLM(tiny_gguf, kv_cache_pages=128, **OPTS)


@pytest.fixture(scope="module")
def on(tiny_gguf):
    return LLM(tiny_gguf, kv_cache_pages=128, enable_prefix_caching=True, **OPTS)


def ids(rng, n):
    return [int(t) for t in rng.integers(3, 300, n)]


def run_both(on, off, prompts, salt=None):
    on.reset_prefix_cache()
    a = [on.generate(p, SP, cache_salt=salt)[0] for p in prompts]   # one by one: later ones can hit
    b = off.generate(prompts, SP)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(o.cached_prompt_tokens == 0 for o in b)
    return a


@pytest.mark.parametrize("prefix_len", [48, 53])   # page-aligned and not
def test_shared_system_prompt(on, off, prefix_len):
    rng = np.random.default_rng(prefix_len)
    system = ids(rng, prefix_len)
    prompts = [system + ids(rng, int(rng.integers(1, 20))) for _ in range(5)]
    outs = run_both(on, off, prompts)
    assert outs[0].cached_prompt_tokens == 0
    full_pages = prefix_len // PAGE * PAGE
    for o in outs[1:]:
        assert o.cached_prompt_tokens >= full_pages > 0


def test_multi_turn_chat_resends_history(on, off):
    rng = np.random.default_rng(1)
    history = ids(rng, 30)
    on.reset_prefix_cache()
    for turn in range(4):
        history = history + ids(rng, 7)
        a = on.generate(history, SP)[0]
        b = off.generate(history, SP)[0]
        assert a.token_ids == b.token_ids
        if turn:
            assert a.cached_prompt_tokens >= (len(history) - 7 - 8) // PAGE * PAGE
        history = history + list(a.token_ids)


def test_full_prompt_hit_recomputes_only_the_last_token(on, off):
    rng = np.random.default_rng(2)
    p = ids(rng, 4 * PAGE)                      # an exact multiple of the page size
    first, second = run_both(on, off, [p, p])
    assert first.cached_prompt_tokens == 0
    assert second.cached_prompt_tokens == len(p)
    assert second.token_ids == first.token_ids


def test_concurrent_requests_sharing_a_prefix(on, off):
    rng = np.random.default_rng(3)
    system = ids(rng, 40)
    prompts = [system + ids(rng, 5 + i) for i in range(6)]
    on.reset_prefix_cache()
    on.generate(prompts[0], SP)
    together = on.generate(prompts, SP)
    assert [o.token_ids for o in together] == [o.token_ids for o in off.generate(prompts, SP)]
    assert all(o.cached_prompt_tokens >= 32 for o in together)


def test_different_salts_never_share(on):
    rng = np.random.default_rng(4)
    p = ids(rng, 50)
    on.reset_prefix_cache()
    on.generate(p, SP, cache_salt="alice")
    assert on.generate(p, SP, cache_salt="bob")[0].cached_prompt_tokens == 0
    assert on.generate(p, SP, cache_salt="alice")[0].cached_prompt_tokens == 48
    assert on.generate(p, SP)[0].cached_prompt_tokens == 0


def test_small_pool_evicts_and_recomputes(tiny_gguf, off):
    small = LLM(tiny_gguf, **{**OPTS, "kv_cache_pages": 14, "max_length": 96, "enable_prefix_caching": True})
    rng = np.random.default_rng(5)
    systems = [ids(rng, 64) for _ in range(4)]
    prompts = [s + ids(rng, 5) for s in systems for _ in range(2)] + [systems[0] + ids(rng, 5)]
    outs = [small.generate(p, SP)[0] for p in prompts]
    assert [o.token_ids for o in outs] == [o.token_ids for o in off.generate(prompts, SP)]
    stats = small.engine.stats()
    assert stats.prefix_cache_evictions > 0
    assert stats.kv_pages_used == 0
    assert outs[1].cached_prompt_tokens == 64      # same system prompt right after: a hit
    assert outs[-1].cached_prompt_tokens < 64      # systems[0] was evicted by the three others


def test_counters_and_reset(on):
    rng = np.random.default_rng(6)
    p = ids(rng, 40)
    on.reset_prefix_cache()
    before = on.engine.stats()
    on.generate([p], SP)
    on.generate([p], SP)
    s = on.engine.stats()
    assert s.prefix_cache_queried_tokens - before.prefix_cache_queried_tokens == 80
    assert s.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == 32
    assert s.kv_pages_used == 0 and s.kv_pages_cached > 0
    assert on.reset_prefix_cache()
    assert on.engine.stats().kv_pages_cached == 0
    assert on.generate([p], SP)[0].cached_prompt_tokens == 0
