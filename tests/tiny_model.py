"""Writes tiny random llama GGUF models for tests (real GGUF files, quantized tensors included)."""
from __future__ import annotations

import dataclasses
import os

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q


@dataclasses.dataclass(frozen=True)
class TinySpec:
    num_layers: int = 2
    hidden: int = 192            # multiple of 32 (Q8_0/Q4_1 blocks)
    heads: int = 6
    kv_heads: int = 2            # GQA ratio 3: not 1 and not a power of two
    head_dim: int = 32
    ffn: int = 256               # multiple of 256, so ffn_down can be Q4_K
    context: int = 1024
    rope_theta: float = 10000.0
    tied: bool = True
    quantized: bool = True       # Q8_0 / Q4_1 / Q4_K matrices (else all F32)
    rope_freqs: bool = False     # write a Llama-3.1 style rope_freqs tensor
    architecture: str = "llama"
    seed: int = 0


def _random_q4_k(rng, rows: int, cols: int) -> np.ndarray:
    """Valid Q4_K blocks with random scales/quants (the gguf package cannot quantize K-types)."""
    nblk = cols // 256
    raw = rng.integers(0, 256, size=(rows, nblk, 144), dtype=np.uint8)
    raw[:, :, 0:2] = np.frombuffer(np.float16(0.02).tobytes(), np.uint8)
    raw[:, :, 2:4] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return raw.reshape(rows, nblk * 144)


def _add_matrix(w: gguf.GGUFWriter, rng, name: str, rows: int, cols: int, qtype) -> None:
    x = (rng.standard_normal((rows, cols)) * (1.0 / np.sqrt(cols))).astype(np.float32)
    if qtype == Q.F32:
        w.add_tensor(name, x)
    elif qtype == Q.Q4_K:
        w.add_tensor(name, _random_q4_k(rng, rows, cols), raw_dtype=Q.Q4_K)
    else:
        w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)


def write_tiny_gguf(path: str | os.PathLike, spec: TinySpec = TinySpec(), with_tokenizer: bool = True) -> str:
    """Writes the model; returns its path. Tensor types when quantized: embeddings Q8_0, attention Q4_1,
    gate/up Q8_0, down Q4_K, norms F32 (as real Q4 GGUFs mix them)."""
    from tests.tiny_vocab import add_tiny_tokenizer
    rng = np.random.default_rng(spec.seed)
    path = str(path)
    w = gguf.GGUFWriter(path, spec.architecture)
    vocab = add_tiny_tokenizer(w) if with_tokenizer else 320
    s = spec
    w.add_name("tiny-llama")
    w.add_block_count(s.num_layers)
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    q = (lambda t: t) if s.quantized else (lambda t: Q.F32)
    _add_matrix(w, rng, "token_embd.weight", vocab, s.hidden, q(Q.Q8_0))
    if not s.tied:
        _add_matrix(w, rng, "output.weight", vocab, s.hidden, q(Q.Q4_1))
    if s.rope_freqs:
        w.add_tensor("rope_freqs.weight", np.linspace(1.0, 8.0, s.head_dim // 2).astype(np.float32))
    w.add_tensor("output_norm.weight", (1.0 + 0.1 * rng.standard_normal(s.hidden)).astype(np.float32))
    qd, kvd = s.heads * s.head_dim, s.kv_heads * s.head_dim
    for i in range(s.num_layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", (1.0 + 0.1 * rng.standard_normal(s.hidden)).astype(np.float32))
        w.add_tensor(b + "ffn_norm.weight", (1.0 + 0.1 * rng.standard_normal(s.hidden)).astype(np.float32))
        _add_matrix(w, rng, b + "attn_q.weight", qd, s.hidden, q(Q.Q4_1))
        _add_matrix(w, rng, b + "attn_k.weight", kvd, s.hidden, q(Q.Q4_1))
        _add_matrix(w, rng, b + "attn_v.weight", kvd, s.hidden, q(Q.Q8_0))
        _add_matrix(w, rng, b + "attn_output.weight", s.hidden, qd, q(Q.Q4_1))
        _add_matrix(w, rng, b + "ffn_gate.weight", s.ffn, s.hidden, q(Q.Q8_0))
        _add_matrix(w, rng, b + "ffn_up.weight", s.ffn, s.hidden, q(Q.Q8_0))
        _add_matrix(w, rng, b + "ffn_down.weight", s.hidden, s.ffn, q(Q.Q4_K))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
