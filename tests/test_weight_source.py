"""Weights read by region (engine/loading/weight_source.py, GGUFSource): every region equals that slice of the
whole weight, a column region reads only the quant blocks covering it, and fused device parameters read
part by part equal the interleaved whole (engine/device/device_params.py)."""
import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from engine.device.device_params import Fused, FusedShapes, _scales, layer_parts, read_fused
from engine.device.quantization import quantize_weight
from engine.device.sharding import AXIS, make_mesh
from engine.loading.gguf_loader import load_gguf, open_gguf_source
from engine.loading.weight_source import ArraySource
from engine.loading.weights import WEIGHTS, shape_of
from tests.tiny_model import TinySpec

UNTIED = TinySpec(tied=False)     # embeddings Q8_0, attention + output Q4_1, gate/up Q8_0, down Q4_K (256-blocks)


def _regions(rng, shape, count=6):
    """Random regions, column bounds mostly off the 32-value block boundaries."""
    for _ in range(count):
        out = []
        for n in shape:
            a = int(rng.integers(0, n - 1))
            out.append(slice(a, int(rng.integers(a + 1, n + 1))))
        yield tuple(out)


@pytest.mark.parametrize("spec", [UNTIED, TinySpec()], ids=["untied", "tied"])
def test_every_region_equals_the_slice_of_the_whole_weight(tiny_gguf_factory, spec):
    path = tiny_gguf_factory(spec)
    config, whole, _ = load_gguf(path)
    _, source, _ = open_gguf_source(path)
    rng = np.random.default_rng(0)
    for w in WEIGHTS:
        full = whole[w.path[0]] if len(w.path) == 1 else whole["layers"][w.name]
        shape = shape_of(w, config)[1:] if w.per_layer else shape_of(w, config)
        for region in _regions(rng, shape):
            layer = int(rng.integers(config.num_layers)) if w.per_layer else None
            want = full[layer][region] if w.per_layer else full[region]
            np.testing.assert_array_equal(source.read(w, layer, region), want, err_msg=f"{w.name} {region}")


def test_a_column_region_reads_only_the_blocks_covering_it(tiny_gguf_factory):
    _, source, _ = open_gguf_source(tiny_gguf_factory(UNTIED))
    wo = next(w for w in WEIGHTS if w.name == "wo")       # canonical [q_heads, d]: rows are GGUF columns
    tensor = source.tensors["blk.0.attn_output.weight"]   # Q4_1: 20 bytes per 32 values
    d = tensor.data.shape[0]
    before = source.bytes_read
    source.read(wo, 0, (slice(40, 70), slice(0, d)))       # values 40..69: blocks 1 and 2 of every row
    assert source.bytes_read - before == d * 2 * 20
    assert source.bytes_read - before < tensor.data.nbytes


def test_fused_parameters_read_by_region_equal_the_interleaved_whole(tiny_gguf_factory):
    config, whole, _ = load_gguf(tiny_gguf_factory(dataclasses.replace(UNTIED, heads=8, kv_heads=4, head_dim=16,
                                                                       hidden=128)))
    source = ArraySource(config, whole)
    rng = np.random.default_rng(1)
    for blocks in (1, 2, 4):
        fused = layer_parts(FusedShapes(attn_blocks=blocks, mlp_blocks=blocks, kv_fused=True))
        for name in ("wqkv", "w_gate_up"):
            f = fused[name]
            parts = [np.split(whole["layers"][p.name][1], blocks, axis=-1) for p in f.parts]
            want = np.concatenate([s[b] for b in range(blocks) for s in parts], axis=-1)
            for region in [tuple(slice(0, n) for n in want.shape), *_regions(rng, want.shape)]:
                np.testing.assert_array_equal(read_fused(source, f, 1, region), want[region])
    assert isinstance(fused["wqkv"], Fused) and fused["wqkv"].blocks == 4


def test_row_parallel_blocks_quantize_with_the_scales_of_the_whole_matrix():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 24)).astype(np.float32)
    blocks = {(0, 32): w[:32], (32, 64): w[32:]}             # two row blocks, as wo over two devices
    mesh = make_mesh(jax.devices()[:1])
    want = quantize_weight(w).scale
    for scale in _scales("wo", blocks, P(AXIS, None), mesh).values():
        np.testing.assert_array_equal(scale, want)
    own = _scales("wqkv", {(0, 12): w[:, :12], (12, 24): w[:, 12:]}, P(None, AXIS), mesh)
    np.testing.assert_array_equal(np.concatenate(list(own.values())), want)   # column blocks: their own
