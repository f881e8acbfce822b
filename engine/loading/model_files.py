"""Reads a model from disk: a GGUF file or an orbax checkpoint directory -> ModelConfig, params, Tokenizer."""
from __future__ import annotations

import os

from engine.loading.gguf_loader import open_gguf, open_gguf_source, resolve_model_path
from engine.loading.tokenizer import Tokenizer


def load_model(path: str, devices: list | None = None):
    """(ModelConfig, weights, Tokenizer) from a GGUF file (weights: a GGUFSource, read by region when placed)
    or an orbax checkpoint directory (restored straight onto its shards over `devices` when given — on a mesh
    over several processes each reads only its addressable shards — else numpy)."""
    if os.path.isdir(path):
        from engine.loading.checkpoint import load_checkpoint, read_checkpoint_config
        from engine.device.sharding import Layout
        layout = Layout.build(read_checkpoint_config(path)[0], devices) if devices else None
        return load_checkpoint(path, layout.param_shardings() if layout else None)
    config, source, meta = open_gguf_source(path)
    return config, source, Tokenizer.from_gguf_metadata(meta, source=path)


def load_tokenizer(model_path: str | None = None) -> Tokenizer:
    """The tokenizer of a model (anything --model-path accepts; None: the embedded model) without loading its
    weights. ModelLoadError (a ValueError) naming the file when it cannot be read."""
    from engine.loading.gguf_metadata import read_metadata
    path = resolve_model_path(model_path)
    if os.path.isdir(path):
        from engine.loading.checkpoint import load_checkpoint_tokenizer
        return load_checkpoint_tokenizer(path)
    return Tokenizer.from_gguf_metadata(read_metadata(open_gguf(path)), source=path)
