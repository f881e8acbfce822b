"""The one description of the model's weights (plain Python: no JAX, no numpy).

For every parameter of the canonical params tree (layers stacked on a leading axis, Q/K/V and gate/up
separate; checkpoints store this form): its path, its logical axes (sizes from the config: `axis_sizes`;
which axes are split over the devices: `engine.device.sharding.sharding_rules`), the GGUF tensor it comes from and
how q8_0 keeps it. This table drives the GGUF loader (tensor names, transposes, shape checks), the
sharding (`sharding.Layout`: placement and orbax restore targets), which leaves device_params quantizes and
how, and the checkpoint's stored shapes.

dtype: every leaf is held in the compute dtype (--quantization-encoding: float32 or bfloat16) except, under
q8_0, the `quantized` ones: int8 with one float32 scale per output column, or per row for the embedding
(a lookup reads rows) — engine/device/quantization.py.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine.config import ModelConfig

COLUMNS, ROWS = "columns", "rows"   # where q8_0 puts a matrix's scales


@dataclass(frozen=True)
class Weight:
    path: tuple[str, ...]         # in the canonical tree: ("embed",), ("layers", "wq")
    axes: tuple[str, ...]         # logical axes; a per-layer weight's lead with "layer"
    gguf: str                     # GGUF tensor "<gguf>.weight"; per layer "blk.<i>.<gguf>.weight"
    transpose: bool = False       # GGUF stores [out, in] (numpy order); the model multiplies x @ [in, out]
    quantized: str | None = None  # q8_0: int8 with scales per COLUMNS or ROWS; None: a norm, kept float

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def per_layer(self) -> bool:
        return self.path[0] == "layers"


WEIGHTS: tuple[Weight, ...] = (
    Weight(("embed",), ("vocab", "embed"), "token_embd", quantized=ROWS),
    Weight(("layers", "attn_norm"), ("layer", "embed"), "attn_norm"),
    Weight(("layers", "wq"), ("layer", "embed", "q_heads"), "attn_q", True, COLUMNS),        # column-parallel
    Weight(("layers", "wk"), ("layer", "embed", "kv_heads"), "attn_k", True, COLUMNS),       # column-parallel
    Weight(("layers", "wv"), ("layer", "embed", "kv_heads"), "attn_v", True, COLUMNS),       # column-parallel
    Weight(("layers", "wo"), ("layer", "q_heads", "embed"), "attn_output", True, COLUMNS),   # row-parallel
    Weight(("layers", "mlp_norm"), ("layer", "embed"), "ffn_norm"),
    Weight(("layers", "w_gate"), ("layer", "embed", "mlp"), "ffn_gate", True, COLUMNS),      # column-parallel
    Weight(("layers", "w_up"), ("layer", "embed", "mlp"), "ffn_up", True, COLUMNS),          # column-parallel
    Weight(("layers", "w_down"), ("layer", "mlp", "embed"), "ffn_down", True, COLUMNS),      # row-parallel
    Weight(("final_norm",), ("embed",), "output_norm"),
    # Stored pre-transposed: x @ E.T cost 12 ms vs 2.3 ms for a [d, V] matrix on XLA CPU (FACTS.md). A tied
    # model has no "output" tensor: the loader copies the embedding.
    Weight(("lm_head",), ("embed", "vocab"), "output", True, COLUMNS),
)
QUANTIZED = {w.name: w.quantized for w in WEIGHTS if w.quantized}   # canonical name -> COLUMNS | ROWS


def axis_sizes(c: ModelConfig) -> dict[str, int]:
    """Size of every weight axis. q_heads/kv_heads are the flattened head*head_dim columns (heads-major)."""
    return {"vocab": c.vocab_size, "embed": c.hidden_size, "layer": c.num_layers, "mlp": c.intermediate_size,
            "q_heads": c.num_heads * c.head_dim, "kv_heads": c.num_kv_heads * c.head_dim}


def shape_of(w: Weight, c: ModelConfig) -> tuple[int, ...]:
    sizes = axis_sizes(c)
    return tuple(sizes[a] for a in w.axes)


def num_parameters(c: ModelConfig) -> int:
    """Values in the canonical params (a tied model's lm_head counted, as it is held)."""
    return sum(math.prod(shape_of(w, c)) for w in WEIGHTS)


def param_shapes(c: ModelConfig) -> dict[str, Any]:
    """The params tree of shapes, e.g. {'embed': (V, d), 'layers': {'wq': (L, d, Hq*D), ...}, ...}."""
    return tree((w.path, shape_of(w, c)) for w in WEIGHTS)


def check_param_shapes(params: dict, shapes: dict) -> None:
    """ValueError naming the first parameter whose shape differs from the weights description."""
    want, got = dict(flatten(shapes)), dict(flatten(params))
    if set(want) != set(got):
        raise ValueError(f"params tree has {sorted(got)} but the model needs {sorted(want)}")
    for path, shape in want.items():
        if tuple(got[path].shape) != shape:
            raise ValueError(f"parameter {path} has shape {tuple(got[path].shape)}, expected {shape}")


def tree(items: Iterable[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    """A nested dict from (path, value) pairs."""
    out: dict[str, Any] = {}
    for path, value in items:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def flatten(nested: dict, prefix: str = ""):
    """('layers/wq', leaf) pairs of a nested dict."""
    for key, value in nested.items():
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            yield from flatten(value, name)
        else:
            yield name, value
