"""The engine's paged forward against a float64 numpy Llama (tests/numpy_llama.py): whole prompts, chunked
prefill and step-by-step decode, several ragged sequences per batch, page sizes 16 and 128."""
import numpy as np
import pytest

from engine.loading.gguf_loader import load_gguf
from engine.core.request import Request
from engine.device.runner import Buckets, ModelRunner, Row
from engine.core.sampling_params import SamplingParams
from engine.core.sequence import Sequence
from tests.numpy_llama import NumpyLlama
from tests.tiny_model import TinySpec

SPECS = {
    "quantized-tied": TinySpec(),
    "f32-untied-ropefreqs": TinySpec(quantized=False, tied=False, rope_freqs=True, kv_heads=3, heads=6, seed=1),
}
LENGTHS = (5, 37, 130)


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def make_runner(path, page_size, num_pages=64, backend="reference"):
    config, params, _ = load_gguf(path)
    import jax
    buckets = Buckets.build(8, 256, num_pages)
    return config, ModelRunner(config, params, dtype="float32", devices=jax.devices("cpu")[:1], page_size=page_size,
                               num_pages=num_pages, buckets=buckets, attention_backend=backend)


def make_seqs(vocab, page_size, num_pages, rng):
    """Sequences with shuffled, disjoint physical pages (page 0 stays the null page)."""
    pages = list(rng.permutation(np.arange(1, num_pages)))
    seqs = []
    for i, n in enumerate(LENGTHS):
        s = Sequence(Request(f"r{i}", tuple(int(t) for t in rng.integers(0, vocab, n)), SamplingParams(seed=0)))
        need = -(-n // page_size)
        s.block_table = [int(pages.pop()) for _ in range(need)]
        seqs.append(s)
    return seqs


@pytest.fixture(scope="module", params=list(SPECS))
def model(request, tiny_gguf_factory):
    path = tiny_gguf_factory(SPECS[request.param])
    return path, NumpyLlama(path)


@pytest.mark.parametrize("backend", ["reference", "pallas"])
@pytest.mark.parametrize("page_size", [16, 128])
def test_whole_prompt_logits_match_numpy(model, page_size, backend):
    """Both attention backends (pallas = our GPU kernel in interpret mode on CPU) against the oracle."""
    path, ref = model
    config, runner = make_runner(path, page_size, backend=backend)
    seqs = make_seqs(config.vocab_size, page_size, runner.num_pages, np.random.default_rng(0))
    rows = [Row(s, 0, s.num_tokens, 0) for s in seqs]
    logits = runner.logits_rows(rows, T=256)
    for i, s in enumerate(seqs):
        want = ref.logits(s.token_ids)
        assert rel_err(logits[i, :s.num_tokens], want) < 1e-4


@pytest.mark.parametrize("page_size", [16, 128])
def test_chunked_prefill_then_decode_matches_numpy(model, page_size):
    """Prefill the first part in chunks of 7, then decode one token per step for all rows together."""
    path, ref = model
    config, runner = make_runner(path, page_size)
    seqs = make_seqs(config.vocab_size, page_size, runner.num_pages, np.random.default_rng(1))
    want = [ref.logits(s.token_ids) for s in seqs]
    prefix = [max(1, s.num_tokens - 9) for s in seqs]
    done = [0] * len(seqs)
    while any(d < p for d, p in zip(done, prefix)):
        rows = [Row(s, d, min(7, p - d), 0) for s, d, p in zip(seqs, done, prefix) if d < p]
        got = runner.logits_rows(rows, T=16)
        for r, g in zip(rows, got):
            i = seqs.index(r.seq)
            assert rel_err(g[:r.n], want[i][r.start:r.start + r.n]) < 1e-4
            done[i] += r.n
    for step in range(9):
        rows = [Row(s, p + step, 1, 0) for s, p in zip(seqs, prefix) if p + step < s.num_tokens]
        got = runner.logits_rows(rows, T=1)
        for r, g in zip(rows, got):
            assert rel_err(g[0], want[seqs.index(r.seq)][r.start]) < 1e-4


def test_decode_step_by_step_equals_full_forward(tiny_gguf):
    """The paged cache built token by token gives the logits of one full forward over the same tokens."""
    config, runner = make_runner(tiny_gguf, 16)
    seqs = make_seqs(config.vocab_size, 16, runner.num_pages, np.random.default_rng(2))
    s = seqs[1]
    full = runner.logits_rows([Row(s, 0, s.num_tokens, 0)], T=64)[0, :s.num_tokens]
    for pos in range(s.num_tokens):
        step = runner.logits_rows([Row(s, pos, 1, 0)], T=1)[0, 0]
        np.testing.assert_allclose(step, full[pos], rtol=1e-5, atol=1e-5)


def test_pallas_backend_generates_the_same_greedy_tokens(tiny_gguf):
    from engine import LLM, SamplingParams
    opts = dict(max_batch_size=4, max_num_batched_tokens=32, max_length=128, kv_cache_page_size=16,
                kv_cache_pages=40, enable_prefix_caching=True)
    rng = np.random.default_rng(3)
    system = [int(t) for t in rng.integers(3, 300, 20)]
    prompts = [system + [int(t) for t in rng.integers(3, 300, n)] for n in (3, 17, 40)]
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    ref = LLM(tiny_gguf, attention_backend="reference", **opts).generate(prompts, sp)
    pal = LLM(tiny_gguf, attention_backend="pallas", **opts).generate(prompts, sp)
    assert [o.token_ids for o in pal] == [o.token_ids for o in ref]


@pytest.mark.parametrize("page_size", [16, 128])
def test_mixed_step_decodes_chunk_and_full_prompt_hit_match_numpy(model, page_size):
    """One step holding decodes, a prefill chunk over a cached prefix and a full-prompt hit (one query whose
    K/V is not rewritten) gives every row the oracle's logits: the ragged batch of DESIGN principle 3."""
    path, ref = model
    config, runner = make_runner(path, page_size)
    seqs = make_seqs(config.vocab_size, page_size, runner.num_pages, np.random.default_rng(4))
    want = [ref.logits(s.token_ids) for s in seqs]
    a, b, c = seqs                                  # 5, 37 and 130 tokens
    # Prefill: a up to its last token, b's first 20, c whole (so c's KV is complete: its "hit" below).
    runner.logits_rows([Row(a, 0, a.num_tokens - 1, 0), Row(b, 0, 20, 0), Row(c, 0, c.num_tokens, 0)], T=256)
    rows = [Row(a, a.num_tokens - 1, 1, 0),                       # decode
            Row(b, 20, b.num_tokens - 20, 0),                     # chunk over a 20-token cached prefix
            Row(c, c.num_tokens - 1, 1, c.num_tokens)]            # full-prompt hit: KV kept, logits only
    got = runner.logits_rows(rows, T=32)
    assert rel_err(got[0, 0], want[0][-1]) < 1e-4
    assert rel_err(got[1, :b.num_tokens - 20], want[1][20:]) < 1e-4
    assert rel_err(got[2, 0], want[2][-1]) < 1e-4
