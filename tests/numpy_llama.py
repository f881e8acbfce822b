"""A plain float64 numpy Llama forward pass (no paging, no JAX): the tests' oracle for the engine's logits.

It reads the GGUF itself (gguf.GGUFReader + gguf.quants.dequantize) so it shares no code with the engine.
"""
from __future__ import annotations

import gguf
import numpy as np


class NumpyLlama:
    def __init__(self, path: str):
        r = gguf.GGUFReader(path)
        f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.")}
        a = f["general.architecture"] + "."
        self.L = f[a + "block_count"]
        self.H = f[a + "attention.head_count"]
        self.K = f[a + "attention.head_count_kv"]
        self.theta = f[a + "rope.freq_base"]
        self.eps = f[a + "attention.layer_norm_rms_epsilon"]
        self.w = {}
        for t in r.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))
            self.w[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64).reshape(shape)
        self.D = self.w["blk.0.attn_q.weight"].shape[0] // self.H
        self.freq_factors = self.w.get("rope_freqs.weight")

    def _norm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def _rope(self, x, pos):
        """x [T, N, D]; rotates interleaved pairs like llama.cpp's NORM rope."""
        inv = self.theta ** (-np.arange(0, self.D, 2) / self.D)
        if self.freq_factors is not None:
            inv = inv / self.freq_factors
        ang = pos[:, None] * inv[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out

    def logits(self, tokens) -> np.ndarray:
        """[T, V] float64 logits of every position of `tokens` (causal, from position 0)."""
        tokens = np.asarray(tokens)
        T, H, K, D = len(tokens), self.H, self.K, self.D
        pos = np.arange(T, dtype=np.float64)
        x = self.w["token_embd.weight"][tokens]
        causal = np.tril(np.ones((T, T), bool))
        for i in range(self.L):
            b = lambda n, i=i: self.w[f"blk.{i}.{n}.weight"]
            h = self._norm(x, b("attn_norm"))
            q = self._rope((h @ b("attn_q").T).reshape(T, H, D), pos)
            k = self._rope((h @ b("attn_k").T).reshape(T, K, D), pos)
            v = (h @ b("attn_v").T).reshape(T, K, D)
            k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
            s = np.where(causal[None], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", p, v).reshape(T, H * D)
            x = x + o @ b("attn_output").T
            h = self._norm(x, b("ffn_norm"))
            g, u = h @ b("ffn_gate").T, h @ b("ffn_up").T
            x = x + ((g / (1 + np.exp(-g))) * u) @ b("ffn_down").T
        x = self._norm(x, self.w["output_norm.weight"])
        out = self.w.get("output.weight", self.w["token_embd.weight"])
        return x @ out.T
