"""Orbax checkpoints of converted models: load without the GGUF, without dequantizing, onto the shards.

A checkpoint directory holds
  params/                  the params tree (engine/loading/weights.py WEIGHTS), orbax-checkpoint, in the target dtype
  tokenizer_metadata.json  the GGUF's `tokenizer.*` keys (tokens, merges, types, scores, chat template,
                           bos/eos/eot ids, add_bos, pre-tokenizer kind): enough for Tokenizer.from_gguf_metadata
  engine_checkpoint.json   format, version, dtype, source and the ModelConfig fields. Written last, so a
                           conversion that died half-way leaves a directory that is refused, not half-loaded.
Write one with `scripts/convert_checkpoint.py` (or `convert_gguf`); `load_checkpoint` reads it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from engine.config import DTYPES, ModelConfig, RopeScaling
from engine.loading.gguf_loader import ModelLoadError
from engine.device.quantization import QuantizedWeight
from engine.loading.weights import QUANTIZED, ROWS, check_param_shapes, param_shapes
from engine.loading.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = "jax-paged-engine-checkpoint"
VERSION = 1
CONFIG_FILE = "engine_checkpoint.json"
TOKENIZER_FILE = "tokenizer_metadata.json"
PARAMS_DIR = "params"


def _numpy_dtype(dtype: str):
    """The stored dtype of float leaves (q8_0 stores int8 matrices + float32 scales, norms float32)."""
    if dtype not in DTYPES:
        raise ValueError(f"--quantization-encoding={dtype!r} is not allowed; choose one of {', '.join(DTYPES)}")
    import ml_dtypes  # a jax dependency; numpy itself has no bfloat16
    return ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32


def _stored(params: dict, dtype: str) -> dict:
    """The tree orbax writes: float leaves cast to the stored dtype; for q8_0 every matrix quantized per
    output column (engine/device/quantization.py) and written as {'q': int8, 'scale': float32}."""
    if dtype == "q8_0":
        from engine.device.device_params import quantize_canonical
        params = quantize_canonical(params)
    np_dtype = _numpy_dtype(dtype)
    cast = lambda a: {"q": np.asarray(a.q, np.int8), "scale": np.asarray(a.scale, np.float32)} \
        if isinstance(a, QuantizedWeight) else np.asarray(a, np_dtype)
    return {k: (_map(cast, v) if isinstance(v, dict) else cast(v)) for k, v in params.items()}


def stored_shapes(config: ModelConfig, dtype: str) -> dict:
    """The stored tree's shapes: param_shapes, with q8_0 matrices as {'q': shape, 'scale': shape}."""
    shapes = param_shapes(config)
    if dtype != "q8_0":
        return shapes
    def q(name, shape):
        if name not in QUANTIZED:
            return shape
        return {"q": shape, "scale": shape[:-1] if QUANTIZED[name] == ROWS else shape[:-2] + shape[-1:]}
    out = {k: q(k, v) for k, v in shapes.items() if k != "layers"}
    out["layers"] = {k: q(k, v) for k, v in shapes["layers"].items()}
    return out


def _as_quantized(tree: dict) -> dict:
    """{'q', 'scale'} dicts back to QuantizedWeight leaves."""
    return {k: (QuantizedWeight(v["q"], v["scale"]) if isinstance(v, dict) and set(v) == {"q", "scale"}
                else _as_quantized(v) if isinstance(v, dict) else v) for k, v in tree.items()}


def save_checkpoint(directory: str, config: ModelConfig, params: dict, tokenizer_metadata: dict[str, Any],
                    dtype: str, source: str = "") -> None:
    """Writes params (cast to `dtype`) with orbax, then the tokenizer and config JSON. `directory` must be
    absent or empty."""
    import orbax.checkpoint as ocp
    directory = _check_output(directory)
    check_param_shapes(params, param_shapes(config))
    stored = _stored(params, dtype)
    os.makedirs(directory, exist_ok=True)
    # Uncompressed: zstd saved a third of the disk but restored SmolLM2 ~35% slower (1.4 s vs 0.9 s, 2 cores);
    # load time is what a checkpoint is for.
    with ocp.PyTreeCheckpointer(use_compression=False) as checkpointer:
        checkpointer.save(os.path.join(directory, PARAMS_DIR), stored)
    _write_json(os.path.join(directory, TOKENIZER_FILE), tokenizer_metadata)
    _write_json(os.path.join(directory, CONFIG_FILE),
                {"format": FORMAT, "version": VERSION, "dtype": dtype, "source": source,
                 "model_config": dataclasses.asdict(config)})


def _check_output(directory: str) -> str:
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise ValueError(f"{directory}: output exists and is not an empty directory; choose a new --output")
    return directory


def convert_gguf(gguf_path: str, output: str, dtype: str) -> ModelConfig:
    """GGUF file -> checkpoint directory (the work of scripts/convert_checkpoint.py)."""
    from engine.loading.gguf_loader import load_gguf
    _numpy_dtype(dtype)  # a bad dtype or output fails before the slow GGUF read
    _check_output(output)
    config, params, meta = load_gguf(gguf_path)
    tokenizer_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    save_checkpoint(output, config, params, tokenizer_meta, dtype, source=os.path.abspath(gguf_path))
    return config


def read_checkpoint_config(directory: str) -> tuple[ModelConfig, str]:
    """(ModelConfig, stored dtype) from the directory's engine_checkpoint.json; cheap (no params read)."""
    if not os.path.isdir(directory):
        raise ModelLoadError(f"{directory}: not a checkpoint directory (no such directory)")
    info = _read_json(directory, CONFIG_FILE)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ModelLoadError(f"{directory}: {CONFIG_FILE} is not an engine checkpoint description "
                             f"(format {info.get('format') if isinstance(info, dict) else None!r}, "
                             f"expected {FORMAT!r})")
    if info.get("version") != VERSION:
        raise ModelLoadError(f"{directory}: checkpoint version {info.get('version')!r} is not supported (this "
                             f"engine reads version {VERSION}); re-convert it with scripts/convert_checkpoint.py")
    if info.get("dtype") not in DTYPES:
        raise ModelLoadError(f"{directory}: {CONFIG_FILE} has dtype {info.get('dtype')!r}; expected one of "
                             f"{', '.join(DTYPES)}")
    try:
        fields = dict(info["model_config"])
        scaling = fields.get("rope_scaling")
        fields["rope_scaling"] = RopeScaling(**scaling) if scaling else None
        fields["rope_freq_factors"] = tuple(fields.get("rope_freq_factors", ()))
        return ModelConfig(**fields), info["dtype"]
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{directory}: {CONFIG_FILE} has a bad model_config ({type(e).__name__}: {e})") \
            from None


def load_checkpoint(directory: str, shardings: dict | None = None) -> tuple[ModelConfig, dict, Tokenizer]:
    """(ModelConfig, params, Tokenizer) from a checkpoint directory. Without `shardings` the params are
    numpy arrays in the stored dtype; with a tree of NamedShardings (engine.device.sharding.Layout.param_shardings)
    each array is read straight onto its shards. Any problem: ModelLoadError (a ValueError) naming the
    directory."""
    config, dtype = read_checkpoint_config(directory)
    tokenizer = load_checkpoint_tokenizer(directory)
    params = _as_quantized(_restore_params(directory, config, dtype, shardings))
    return config, params, tokenizer


def load_checkpoint_tokenizer(directory: str) -> Tokenizer:
    """The checkpoint's tokenizer alone (no weights read); ModelLoadError naming the directory."""
    meta = _read_json(directory, TOKENIZER_FILE)
    try:
        return Tokenizer.from_gguf_metadata(meta, source=directory)
    except (ValueError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"{directory}: {TOKENIZER_FILE} cannot build a tokenizer ({e})") from None


def _restore_params(directory: str, config: ModelConfig, dtype: str, shardings: dict | None) -> dict:
    """Reads params/ after checking its stored shapes against the config; wraps orbax errors."""
    import orbax.checkpoint as ocp
    path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
    if not os.path.isdir(path):
        raise ModelLoadError(f"{directory}: missing {PARAMS_DIR}/ (the converted weights); re-convert it")
    shapes = stored_shapes(config, dtype)
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        _check_stored(directory, checkpointer, path, shapes)
        args = _restore_args(shapes, _numpy_dtype(dtype), shardings)
        return checkpointer.restore(path, restore_args=args)
    except ModelLoadError:
        raise
    except Exception as e:  # tensorstore/orbax raise assorted types for missing or damaged files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelLoadError(f"{directory}: {PARAMS_DIR}/ could not be restored ({type(e).__name__}: "
                             f"{first[:300]}); the checkpoint is damaged or incomplete, re-convert it") from None
    finally:
        checkpointer.close()


def _restore_args(shapes: dict, np_dtype, shardings: dict | None) -> dict:
    """orbax restore args for the stored tree: numpy, or straight onto `shardings` (a q8_0 matrix's int8
    on the weight's sharding, its scales on the sharding of its output columns)."""
    import orbax.checkpoint as ocp
    from engine.device.device_params import scale_spec

    def leaf(name, shape, sharding):
        if isinstance(shape, dict):
            if sharding is None:
                return {"q": ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.int8),
                        "scale": ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.float32)}
            spec = tuple(sharding.spec)
            scale = scale_spec(name, P(*spec[-2:]))
            if len(shape["q"]) == 3:   # layer-stacked: the layer axis leads
                scale = P(None, *scale)
            return {"q": ocp.ArrayRestoreArgs(sharding=sharding, dtype=np.int8),
                    "scale": ocp.ArrayRestoreArgs(sharding=NamedSharding(sharding.mesh, scale), dtype=np.float32)}
        if sharding is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=np_dtype)
        return ocp.ArrayRestoreArgs(sharding=sharding, dtype=np_dtype)

    def walk(sh, sd):
        return {k: walk(v, sd.get(k) if sd else None) if k == "layers" else
                leaf(k, v, sd.get(k) if sd else None) for k, v in sh.items()}
    return walk(shapes, shardings)


def _check_stored(directory: str, checkpointer, path: str, shapes: dict) -> None:
    """The orbax metadata must list exactly the parameters of `shapes`, with those shapes."""
    metadata = checkpointer.metadata(path)
    tree = getattr(getattr(metadata, "item_metadata", None), "tree", None)
    if not isinstance(tree, dict):
        raise ModelLoadError(f"{directory}: {PARAMS_DIR}/ has no readable orbax metadata; the checkpoint is "
                             "damaged or incomplete, re-convert it")
    try:
        check_param_shapes(tree, shapes)
    except ValueError as e:
        raise ModelLoadError(f"{directory}: stored {e} (from {CONFIG_FILE}); the checkpoint is inconsistent, "
                             "re-convert it") from None


def _map(fn, tree: dict) -> dict:
    """fn over the leaves of a nested dict (not jax.tree.map: shape tuples must stay leaves)."""
    return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)


def _read_json(directory: str, name: str):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{directory}: not an engine checkpoint: missing {name} "
                             "(write one with scripts/convert_checkpoint.py)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{directory}: {name} is corrupt ({type(e).__name__}: {e})") from None
