"""Orbax checkpoints: GGUF -> checkpoint -> the same params, logits and tokenizer; damaged directories are refused
with one line naming the directory."""
import glob
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from engine.loading.checkpoint import CONFIG_FILE, PARAMS_DIR, TOKENIZER_FILE, convert_gguf, load_checkpoint
from engine.loading.gguf_loader import load_gguf
from engine.loading.gguf_metadata import read_metadata
from engine.loading.model_files import load_model
from engine.device.runner import Buckets, ModelRunner, Row
from engine.core.request import Request
from engine.core.sampling_params import SamplingParams
from engine.core.sequence import Sequence
from engine.loading.tokenizer import Tokenizer
from tests.tiny_model import TinySpec

# Untied output and rope_freqs: every ModelConfig field and every parameter has to survive the round trip.
SPEC = TinySpec(tied=False, rope_freqs=True, seed=3)
TEXTS = ["Hello world", "The capital of France is Paris.", "<|im_start|>user\nhi<|im_end|>", "12345 é ü"]


@pytest.fixture(scope="module")
def gguf_path(tiny_gguf_factory):
    return tiny_gguf_factory(SPEC)


@pytest.fixture(scope="module")
def f32_dir(gguf_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "f32")
    convert_gguf(gguf_path, out, "float32")
    return out


def leaves(tree, prefix=""):
    for k, v in tree.items():
        yield from leaves(v, f"{prefix}{k}/") if isinstance(v, dict) else [(prefix + k, v)]


def logits_of(config, params, tokens):
    runner = ModelRunner(config, params, dtype="float32", devices=jax.devices("cpu")[:1], page_size=16,
                         num_pages=8, buckets=Buckets.build(1, 64, 4), attention_backend="reference")
    seq = Sequence(Request("r", tuple(tokens), SamplingParams(seed=0)))
    seq.block_table = [3, 1, 2]
    return runner.logits_rows([Row(seq, 0, len(tokens), 0)], T=64)[0, :len(tokens)]


def test_float32_checkpoint_has_the_same_config_params_and_logits(gguf_path, f32_dir):
    config, params, _ = load_gguf(gguf_path)
    c2, p2, _ = load_checkpoint(f32_dir)
    assert c2 == config and c2.rope_freq_factors and not c2.tie_word_embeddings
    got = dict(leaves(p2))
    for name, want in leaves(params):
        assert isinstance(got[name], np.ndarray) and got[name].dtype == np.float32, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    tokens = list(np.random.default_rng(0).integers(3, config.vocab_size, 40))
    np.testing.assert_array_equal(logits_of(c2, p2, tokens), logits_of(config, params, tokens))


def test_tokenizer_is_rebuilt_identically(gguf_path, f32_dir):
    import gguf
    want = Tokenizer.from_gguf_metadata(read_metadata(gguf.GGUFReader(gguf_path)), gguf_path)
    _, _, got = load_checkpoint(f32_dir)
    assert [got.encode(t) for t in TEXTS] == [want.encode(t) for t in TEXTS]
    assert (got.bos_token_id, got.eos_token_id, got.eos_token_ids, got.add_bos_token, got.vocab_size) == \
        (want.bos_token_id, want.eos_token_id, want.eos_token_ids, want.add_bos_token, want.vocab_size)
    chat = [{"role": "user", "content": "hi"}]
    assert got.apply_chat_template(chat) == want.apply_chat_template(chat)
    assert got.source == f32_dir


def test_bfloat16_checkpoint_round_trips_and_serves(gguf_path, tmp_path):
    out = str(tmp_path / "bf16")
    convert_gguf(gguf_path, out, "bfloat16")
    _, params, _ = load_gguf(gguf_path)
    config, p2, _ = load_checkpoint(out)
    assert p2["layers"]["wq"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(p2["layers"]["wq"], params["layers"]["wq"].astype(ml_dtypes.bfloat16))
    # Through the engine's loader: restored onto the device, then cast to the engine's float32.
    _, placed, _ = load_model(out, jax.devices("cpu")[:1])
    assert isinstance(placed["lm_head"], jax.Array) and placed["lm_head"].dtype == ml_dtypes.bfloat16
    from engine import LLM
    llm = LLM(out, max_batch_size=2, max_num_batched_tokens=32, max_length=64, kv_cache_page_size=16,
              kv_cache_pages=8)
    assert llm.engine.runner.params["layers"][0]["wqkv"].dtype == np.float32
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_convert_script_and_its_errors(gguf_path, tmp_path, capsys):
    from scripts.convert_checkpoint import main
    out = str(tmp_path / "c")
    assert main(["--model-path", gguf_path, "--quantization-encoding", "float32", "--output", out]) == 0
    assert sorted(os.listdir(out)) == sorted([CONFIG_FILE, TOKENIZER_FILE, PARAMS_DIR])
    assert main(["--model-path", gguf_path, "--output", out]) == 2        # refuses to overwrite
    assert "output exists and is not an empty directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model-path", gguf_path, "--quantization-encoding", "int8", "--output", str(tmp_path / "d")])


def _truncate_largest(d):
    f = max((p for p in glob.glob(f"{d}/{PARAMS_DIR}/**/*", recursive=True) if os.path.isfile(p)),
            key=os.path.getsize)
    with open(f, "r+b") as h:
        h.truncate(os.path.getsize(f) // 2)


def _edit_config(**changes):
    def edit(d):
        path = os.path.join(d, CONFIG_FILE)
        info = json.load(open(path))
        for k, v in changes.items():
            (info["model_config"] if k == "num_layers" else info)[k] = v
        json.dump(info, open(path, "w"))
    return edit


DAMAGE = {
    "no config": (lambda d: os.remove(os.path.join(d, CONFIG_FILE)), f"missing {CONFIG_FILE}"),
    "no tokenizer": (lambda d: os.remove(os.path.join(d, TOKENIZER_FILE)), f"missing {TOKENIZER_FILE}"),
    "no params": (lambda d: shutil.rmtree(os.path.join(d, PARAMS_DIR)), "missing params/"),
    "no orbax metadata": (lambda d: os.remove(os.path.join(d, PARAMS_DIR, "_METADATA")),
                          "params/ has no readable orbax metadata"),
    "corrupt config": (lambda d: open(os.path.join(d, CONFIG_FILE), "w").write("{not json"),
                       f"{CONFIG_FILE} is corrupt"),
    "truncated params": (_truncate_largest, "params/ could not be restored"),
    "version": (_edit_config(version=99), "checkpoint version 99 is not supported"),
    "config/params mismatch": (_edit_config(num_layers=3), "stored parameter layers/attn_norm has shape"),
}


# orbax's event loop closes on the first failed read while tensorstore still completes the others: noise only.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_checkpoint_is_refused_naming_the_directory(f32_dir, tmp_path, name):
    damage, message = DAMAGE[name]
    d = str(tmp_path / "damaged")
    shutil.copytree(f32_dir, d)
    damage(d)
    with pytest.raises(ValueError, match=message) as e:
        load_checkpoint(d)
    assert str(e.value).startswith(d + ": ") and "\n" not in str(e.value)


def test_empty_or_missing_directory(tmp_path):
    with pytest.raises(ValueError, match=f"^{tmp_path}: not an engine checkpoint: missing {CONFIG_FILE}"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="no such directory"):
        load_checkpoint(str(tmp_path / "nope"))
