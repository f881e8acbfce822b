"""ModelRunner: device state (params, KV pages), shape buckets, and the jitted step.

The scheduler hands it a SchedulerOutput (decodes + prefill chunks); it packs them into padded [B, T]
blocks whose shapes come from a few buckets, runs one jitted forward + sampling per block, and returns the
sampled token of every row that samples. The KV pages are donated into each call and come back updated, so
XLA writes the new K/V in place instead of copying the whole cache every step.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from engine.config import ModelConfig
from engine.model import Llama, StepInputs
from engine.sampling import SamplingInputs, sample
from engine.sharding import Layout

log = logging.getLogger(__name__)


def powers_of_two_upto(limit: int, start: int = 1) -> tuple[int, ...]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return tuple(out) + (limit,)


def fit(value: int, buckets: tuple[int, ...], what: str) -> int:
    for b in buckets:
        if value <= b:
            return b
    raise RuntimeError(f"{what}={value} exceeds the largest bucket {buckets[-1]} (scheduler broke its budget)")


@dataclass(frozen=True)
class Buckets:
    """Every shape the jitted step is compiled for."""
    batch: tuple[int, ...]         # decode rows
    tokens: tuple[int, ...]        # prefill chunk length T
    pages: tuple[int, ...]         # page-table width W
    max_prefill_rows: int

    @staticmethod
    def build(max_batch_size: int, max_num_batched_tokens: int, max_pages_per_seq: int,
              max_prefill_rows: int) -> "Buckets":
        # One page-table width: attention loops only over the pages the longest row uses (kernels/), so
        # a wider table costs a few int32s, while each extra width would multiply the compiled programs.
        return Buckets(powers_of_two_upto(max_batch_size), powers_of_two_upto(max_num_batched_tokens, 16),
                       (max_pages_per_seq,), max_prefill_rows)

    def prefill_rows(self, t: int) -> tuple[int, ...]:
        """Row buckets for chunk bucket t: a group's chunks hold > t/2 tokens each (except the smallest
        bucket) and at most max_num_batched_tokens together, which bounds the rows."""
        cap = self.max_prefill_rows if t == self.tokens[0] else max(1, 2 * self.tokens[-1] // t)
        return powers_of_two_upto(min(cap, self.max_prefill_rows))

    def all_shapes(self) -> list[tuple[int, int, int]]:
        shapes = [(b, 1, w) for b in self.batch for w in self.pages]
        shapes += [(r, t, w) for t in self.tokens for r in self.prefill_rows(t) for w in self.pages]
        return shapes


@dataclass(frozen=True)
class Row:
    """One sequence's tokens in a step: token_ids[start:start+n]; KV of positions < skip_kv_before
    is already cached and is not rewritten (full-prompt prefix hits recompute the last token only)."""
    seq: object
    start: int
    n: int
    skip_kv_before: int
    samples: bool = True


class ModelRunner:
    def __init__(self, model_config: ModelConfig, params: dict, *, dtype: str, devices: list, page_size: int,
                 num_pages: int, buckets: Buckets, attention_backend: str, seed: int = 0):
        self.config = model_config
        self.page_size = page_size
        self.num_pages = num_pages
        self.buckets = buckets
        self.device = devices[0]
        self.dtype = jnp.float32 if dtype == "float32" else jnp.bfloat16
        self.num_compilations = 0
        self.warm = False            # set by warmup(): every bucket is compiled from then on
        self.seed = seed
        # Tensor parallelism over `devices`: one Layout places params, KV pages and step inputs
        # (engine/sharding.py); on one device every spec is whole, i.e. plain placement.
        self.layout = Layout.build(model_config, list(devices))
        interpret = attention_backend == "pallas" and self.device.platform == "cpu"
        mesh = self.layout.attention_mesh() if attention_backend == "pallas" else None
        self.model = Llama(model_config, self.dtype, attention_backend, interpret, mesh)
        self.params = self.layout.put_params(params, self.dtype)
        c = model_config
        shape = (c.num_layers, num_pages, page_size, c.num_kv_heads, c.head_dim)
        cache, rep, psh = self.layout.cache_sharding(), self.layout.replicated(), self.layout.param_shardings()
        self._zeros = jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=cache)
        self.k_cache, self.v_cache = self._zeros(), self._zeros()
        # Donating the caches lets XLA scatter new K/V into the same buffers instead of copying all pages;
        # pinning their in/out shardings to the same spec keeps every step's donation valid (no reshard).
        self._step = jax.jit(self._step_fn, donate_argnums=(1, 2), in_shardings=(psh, cache, cache, rep, rep),
                             out_shardings=(rep, cache, cache))
        self._logits = jax.jit(self._logits_fn, donate_argnums=(1, 2), in_shardings=(psh, cache, cache, rep),
                               out_shardings=(rep, cache, cache))

    # --- jitted bodies (Python side effects run once per trace = once per compilation) ---
    def _count(self, inputs: StepInputs) -> None:
        if self.warm:  # DESIGN: after warm-up an unexpected shape is an error, not a silent recompile
            raise RuntimeError(f"step traced again after warm-up for B, T = {inputs.tokens.shape}, "
                               f"W = {inputs.page_table.shape[1]}: not one of the compiled buckets")
        self.num_compilations += 1
        log.info("compiling step for shape B=%d T=%d W=%d (compilation #%d)", *inputs.tokens.shape,
                 inputs.page_table.shape[1], self.num_compilations)

    def _step_fn(self, params, k_cache, v_cache, inputs, sampling: SamplingInputs):
        self._count(inputs)
        logits_index = jnp.maximum(inputs.query_lens - 1, 0)
        logits, k_cache, v_cache = self.model.apply({"params": params}, k_cache, v_cache, inputs, logits_index)
        return sample(logits, sampling), k_cache, v_cache

    def _logits_fn(self, params, k_cache, v_cache, inputs):
        self._count(inputs)
        logits, k_cache, v_cache = self.model.apply({"params": params}, k_cache, v_cache, inputs,
                                                    inputs.query_lens, all_logits=True)
        return logits, k_cache, v_cache

    # --- host side ---
    def pack(self, rows: list[Row], B: int, T: int, W: int) -> tuple[StepInputs, SamplingInputs]:
        """Numpy arrays for `rows`, padded to [B, T] with page tables of width W."""
        S = self.page_size
        tokens = np.zeros((B, T), np.int32)
        positions = np.zeros((B, T), np.int32)
        slots = np.zeros((B, T), np.int32)          # padding writes go to the null page 0
        table = np.zeros((B, W), np.int32)
        ctx, qlen = np.zeros(B, np.int32), np.zeros(B, np.int32)
        temp, top_p = np.zeros(B, np.float32), np.ones(B, np.float32)
        top_k, seed, spos = np.zeros(B, np.int32), np.zeros(B, np.uint32), np.zeros(B, np.int32)
        for i, r in enumerate(rows):
            seq = r.seq
            pos = np.arange(r.start, r.start + r.n, dtype=np.int32)
            bt = np.asarray(seq.block_table, np.int32)
            tokens[i, :r.n] = seq.token_ids[r.start:r.start + r.n]
            positions[i, :r.n] = pos
            slots[i, :r.n] = np.where(pos >= r.skip_kv_before, bt[pos // S] * S + pos % S, 0)
            npages = -(-(r.start + r.n) // S)
            table[i, :npages] = bt[:npages]
            ctx[i], qlen[i] = r.start + r.n, r.n
            sp = seq.sampling
            temp[i], top_p[i], top_k[i] = sp.temperature, sp.top_p, sp.top_k
            seed[i] = (seq.seed if seq.seed is not None else self.seed) & 0xFFFFFFFF
            spos[i] = r.start + r.n
        return (StepInputs(tokens, positions, slots, table, ctx, qlen),
                SamplingInputs(temp, top_k, top_p, seed, spos))

    def dispatch(self, rows: list[Row], B: int, T: int, W: int) -> jax.Array:
        """Launches one padded block without waiting for it; returns the device array of sampled tokens [B]."""
        inputs, sampling = self.pack(rows, B, T, W)
        tokens, self.k_cache, self.v_cache = self._step(self.params, self.k_cache, self.v_cache, inputs, sampling)
        return tokens

    def run_rows(self, rows: list[Row], B: int, T: int, W: int) -> np.ndarray:
        """Runs one padded block; returns the sampled token per row (int32 [len(rows)])."""
        return np.asarray(self.dispatch(rows, B, T, W))[:len(rows)]

    def logits_rows(self, rows: list[Row], T: int, W: int) -> np.ndarray:
        """Test/debug path: float32 logits [len(rows), T, V] of every token (no sampling)."""
        inputs, _ = self.pack(rows, len(rows), T, W)
        logits, self.k_cache, self.v_cache = self._logits(self.params, self.k_cache, self.v_cache, inputs)
        return np.asarray(logits)

    def width_for(self, rows: list[Row]) -> int:
        need = max(-(-(r.start + r.n) // self.page_size) for r in rows)
        return fit(need, self.buckets.pages, "pages per sequence")

    def execute(self, output) -> dict[str, int]:
        """Runs a SchedulerOutput; returns {request_id: sampled token} for decodes and final prefill chunks.
        Every block is dispatched before any result is read, so the device never waits on the host between
        the blocks of one step."""
        launched: list[tuple[list[Row], jax.Array]] = []
        if output.decodes:
            rows = [Row(s, s.num_tokens - 1, 1, s.num_cached_tokens) for s in output.decodes]
            B = fit(len(rows), self.buckets.batch, "decode batch")
            launched.append((rows, self.dispatch(rows, B, 1, self.width_for(rows))))
        groups: dict[int, list[Row]] = {}
        for ch in output.prefills:
            row = Row(ch.seq, ch.start, ch.num_tokens, ch.seq.num_cached_tokens, ch.samples)
            groups.setdefault(fit(ch.num_tokens, self.buckets.tokens, "prefill chunk"), []).append(row)
        for T, rows in sorted(groups.items()):
            cap = self.buckets.prefill_rows(T)[-1]
            for i in range(0, len(rows), cap):
                part = rows[i:i + cap]
                B = fit(len(part), self.buckets.prefill_rows(T), "prefill rows")
                launched.append((part, self.dispatch(part, B, T, self.width_for(part))))
        sampled: dict[str, int] = {}
        for rows, tokens in launched:
            for r, tok in zip(rows, np.asarray(tokens)):
                if r.samples:
                    sampled[r.seq.request_id] = int(tok)
        return sampled

    def recover(self) -> bool:
        """After a failed step: if the donated KV pages were consumed, allocate fresh (zero) ones.
        Returns True when that happened (every cached block is then gone)."""
        if not (self.k_cache.is_deleted() or self.v_cache.is_deleted()):
            return False
        self.k_cache, self.v_cache = self._zeros(), self._zeros()
        return True

    def warmup(self, shapes: list[tuple[int, int, int]] | None = None) -> float:
        """Compiles the step for every bucket shape (padding-only inputs write to page 0). Returns seconds."""
        t0 = time.perf_counter()
        for B, T, W in shapes if shapes is not None else self.buckets.all_shapes():
            inputs, sampling = self.pack([], B, T, W)
            tokens, self.k_cache, self.v_cache = self._step(self.params, self.k_cache, self.v_cache, inputs,
                                                            sampling)
        jax.block_until_ready(self.k_cache)
        self.warm = shapes is None
        return time.perf_counter() - t0
