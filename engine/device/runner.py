"""ModelRunner: device state (params, KV pools), shape buckets, and the one jitted call per engine step.

The scheduler hands it a SchedulerOutput (decodes + prefill chunks); it flattens every scheduled token of
every sequence into one [N] batch (N padded to a token bucket, R = min(N, max batch) rows of metadata),
runs one jitted forward + sampling, and returns the sampled token of every row that samples. The KV pools
are donated into each call and come back updated, so XLA writes the new K/V in place instead of copying
the whole cache every step.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from engine.config import ModelConfig
from engine.device.control_channel import Step, Warmup
from engine.device.device_params import FusedShapes, param_bytes, to_device_params
from engine.device.model import ModelSpec, StepInputs, forward
from engine.device.sampling import SamplingInputs, sample
from engine.core.sequence import PLACEHOLDER
from engine.device.sharding import Layout

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
    """Every shape the jitted step is compiled for: N tokens (a power of two up to the step's token
    budget) with R = min(N, max_rows) rows, and one page-table width W (a max-length sequence's pages:
    attention work follows each row's real context, so a wider table costs a few int32s while each extra
    width would multiply the compiled programs)."""
    tokens: tuple[int, ...]
    max_rows: int
    width: int

    @staticmethod
    def build(max_batch_size: int, max_num_batched_tokens: int, max_pages_per_seq: int) -> "Buckets":
        return Buckets(powers_of_two_upto(max_num_batched_tokens), max_batch_size, max_pages_per_seq)

    def rows(self, n: int) -> int:
        return min(n, self.max_rows)

    def all_shapes(self) -> list[tuple[int, int]]:
        return [(n, self.rows(n)) for n in self.tokens]


@dataclass(frozen=True)
class Launched:
    """A step on its way: the device array of sampled tokens [max_rows], and which row each sampling
    request is (the next step reads a placeholder's token from that row on the device)."""
    rows: tuple
    tokens: jax.Array
    row_of: dict

    def sampled(self) -> dict[str, int]:
        """{request_id: sampled token}; blocks until the step has run."""
        tokens = np.asarray(self.tokens)
        return {r.seq.request_id: int(tokens[i]) for i, r in enumerate(self.rows) if r.samples}


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
    def __init__(self, model_config: ModelConfig, params, *, dtype: str, devices: list, page_size: int,
                 num_pages: int, buckets: Buckets, attention_backend: str):
        """params: the canonical tree (engine/loading/weights.py) or a WeightSource (a GGUF read by region); only
        the blocks this process's `devices` hold are read."""
        self.config = model_config
        self.page_size = page_size
        self.num_pages = num_pages
        self.buckets = buckets
        self.device = devices[0]
        self.quantized = dtype == "q8_0"
        on_cpu = self.device.platform == "cpu"
        self.dtype = jnp.float32 if dtype == "float32" or (self.quantized and on_cpu) else jnp.bfloat16
        self.num_compilations = 0
        self.warm = False            # set by warmup(): every bucket is compiled from then on
        # Tensor parallelism over `devices`: one Layout places params, KV pools and step inputs
        # (engine/device/sharding.py); on one device every spec is whole, i.e. plain placement.
        self.layout = Layout.build(model_config, list(devices))
        fused = FusedShapes.for_layout(self.layout)
        self.params = to_device_params(params, self.layout, fused, self.dtype, quantize=self.quantized)
        self.param_bytes = param_bytes(self.params)
        self.spec = ModelSpec(model_config, fused, self.dtype, attention_backend,
                              interpret=attention_backend == "pallas" and on_cpu, int8_activations=on_cpu,
                              mesh=self.layout.attention_mesh())
        c = model_config
        shape = (num_pages, page_size, c.num_kv_heads, c.head_dim)
        pool = NamedSharding(self.layout.mesh, P(None, None, dict(self.layout.rules).get("kv_head"), None))
        rep = self.layout.replicated()
        pools = tuple(pool for _ in range(c.num_layers))
        self._zeros = jax.jit(lambda: tuple(jnp.zeros(shape, self.dtype) for _ in range(c.num_layers)),
                              out_shardings=pools)
        self.k_pools, self.v_pools = self._zeros(), self._zeros()
        self._no_tokens = jax.device_put(np.zeros(buckets.max_rows, np.int32), rep)
        self._last: Launched | None = None     # the step launched last (its rows map placeholders to tokens)
        self._prev_tokens = self._no_tokens    # its sampled tokens, on the device
        # Process 0 of a multi-process group: sends each launch / warm-up to the followers first, so that every
        # process runs the same programs with the same inputs in the same order (engine/device/follower.py).
        self.mirror: Callable[[object], None] | None = None
        # Donating the pools lets XLA scatter new K/V into the same buffers instead of copying all pages;
        # pinning their in/out shardings to the same spec keeps every step's donation valid (no reshard).
        psh = jax.tree.map(lambda a: a.sharding, self.params)
        self._step = jax.jit(self._step_fn, donate_argnums=(1, 2), in_shardings=(psh, pools, pools, rep, rep, rep, rep),
                             out_shardings=(rep, pools, pools))
        self._logits = jax.jit(self._logits_fn, donate_argnums=(1, 2), in_shardings=(psh, pools, pools, rep),
                               out_shardings=(rep, pools, pools))

    # --- jitted bodies (Python side effects run once per trace = once per compilation) ---
    def _count(self, inputs: StepInputs) -> None:
        N, R = inputs.tokens.shape[0], inputs.context_lens.shape[0]
        if self.warm:  # DESIGN: after warm-up an unexpected shape is an error, not a silent recompile
            raise RuntimeError(f"step traced again after warm-up for N={N}, R={R}, "
                               f"W={inputs.page_table.shape[1]}: not one of the compiled buckets")
        self.num_compilations += 1
        log.info("compiling step for N=%d R=%d W=%d (compilation #%d)", N, R, inputs.page_table.shape[1],
                 self.num_compilations)

    def _step_fn(self, params, k_pools, v_pools, inputs, sampling: SamplingInputs, prev_tokens, prev_row):
        """prev_tokens [max_rows]: the previous step's sampled tokens, still on the device; prev_row [N]: for
        a token that is a placeholder, the row of prev_tokens holding it (-1 elsewhere)."""
        self._count(inputs)
        tokens = jnp.where(prev_row >= 0, prev_tokens[jnp.maximum(prev_row, 0)], inputs.tokens)
        logits, k_pools, v_pools = forward(self.spec, params, k_pools, v_pools, inputs._replace(tokens=tokens))
        sampled = sample(logits, sampling)
        # Always [max_rows]: the next step takes it as an input whatever its own bucket.
        return jnp.zeros(self.buckets.max_rows, jnp.int32).at[:sampled.shape[0]].set(sampled), k_pools, v_pools

    def _logits_fn(self, params, k_pools, v_pools, inputs):
        return forward(self.spec, params, k_pools, v_pools, inputs, all_logits=True)

    # --- host side ---
    def pack(self, rows: list[Row], N: int, R: int) -> tuple[StepInputs, SamplingInputs]:
        """Numpy arrays for `rows` flattened into N tokens (padding after them) and R rows of metadata."""
        S, W = self.page_size, self.buckets.width
        tokens, positions = np.zeros(N, np.int32), np.zeros(N, np.int32)
        slots = np.zeros(N, np.int32)                 # padding writes go to the null page 0
        table = np.zeros((R, W), np.int32)
        ctx, starts, last = np.zeros(R, np.int32), np.zeros(R + 1, np.int32), np.zeros(R, np.int32)
        temp, top_p = np.zeros(R, np.float32), np.ones(R, np.float32)
        top_k, seed, spos = np.zeros(R, np.int32), np.zeros(R, np.uint32), np.zeros(R, np.int32)
        at = 0
        for i, r in enumerate(rows):
            seq = r.seq
            pos = np.arange(r.start, r.start + r.n, dtype=np.int32)
            bt = np.asarray(seq.block_table, np.int32)
            tokens[at:at + r.n] = seq.token_ids[r.start:r.start + r.n]
            positions[at:at + r.n] = pos
            slots[at:at + r.n] = np.where(pos >= r.skip_kv_before, bt[pos // S] * S + pos % S, 0)
            npages = -(-(r.start + r.n) // S)
            table[i, :npages] = bt[:npages]
            ctx[i], last[i] = r.start + r.n, at + r.n - 1
            at += r.n
            sp = seq.sampling
            temp[i], top_p[i], top_k[i] = sp.temperature, sp.top_p, sp.top_k
            seed[i], spos[i] = seq.seed, r.start + r.n   # the engine seeds every request at admission
        starts[1:len(rows) + 1] = np.cumsum([r.n for r in rows])
        starts[len(rows) + 1:] = at
        return (StepInputs(tokens, positions, slots, table, ctx, starts, last),
                SamplingInputs(temp, top_k, top_p, seed, spos))

    def shape_for(self, rows: list[Row]) -> tuple[int, int]:
        N = fit(sum(r.n for r in rows), self.buckets.tokens, "tokens in the step")
        R = self.buckets.rows(N)
        if len(rows) > R:
            raise RuntimeError(f"{len(rows)} sequences in a step exceed the {R} rows of bucket N={N}")
        return N, R

    def _placeholder_rows(self, rows: list[Row], inputs: StepInputs) -> np.ndarray:
        """prev_row for `rows`: where a token is a PLACEHOLDER, the row of the last launched step that samples it."""
        prev_row = np.full(inputs.tokens.shape, -1, np.int32)
        for i in np.flatnonzero(inputs.tokens == PLACEHOLDER):
            rid = rows[int(np.searchsorted(inputs.query_start, i, side="right")) - 1].seq.request_id
            if self._last is None or rid not in self._last.row_of:
                raise RuntimeError(f"{rid!r}: a token still being sampled is not in the step launched last")
            prev_row[i] = self._last.row_of[rid]
        return prev_row

    def dispatch(self, rows: list[Row]) -> Launched:
        """Launches the step for `rows` without waiting for it (or for the step before, whose tokens the
        device hands over to this one's placeholders)."""
        inputs, sampling = self.pack(rows, *self.shape_for(rows))
        tokens = self.launch(inputs, sampling, self._placeholder_rows(rows, inputs))
        self._last = Launched(tuple(rows), tokens, {r.seq.request_id: i for i, r in enumerate(rows) if r.samples})
        return self._last

    def launch(self, inputs: StepInputs, sampling: SamplingInputs, prev_row: np.ndarray) -> jax.Array:
        """The one device call of a packed step (the seam a multi-process group shares: process 0 packs, every
        process launches these same arrays). Placeholders read the tokens of the step launched before this
        one. Returns the sampled tokens [max_rows] int32, still on the device."""
        if self.mirror is not None:
            self.mirror(Step((*inputs, *sampling, prev_row)))
        tokens, self.k_pools, self.v_pools = self._step(self.params, self.k_pools, self.v_pools, inputs, sampling,
                                                        self._prev_tokens, prev_row)
        self._prev_tokens = tokens
        return tokens

    def launch_packed(self, arrays: tuple[np.ndarray, ...]) -> jax.Array:
        """`launch` of the arrays of a control-channel Step (a follower's side of the seam)."""
        n, m = len(StepInputs._fields), len(SamplingInputs._fields)
        return self.launch(StepInputs(*arrays[:n]), SamplingInputs(*arrays[n:n + m]), arrays[n + m])

    def logits_rows(self, rows: list[Row], T: int) -> np.ndarray:
        """Test/debug path: float32 logits [len(rows), T, V] of every token of each row (no sampling)."""
        if self.mirror is not None:
            raise RuntimeError("logits_rows is a one-process debug path: followers would not run it")
        inputs, _ = self.pack(rows, *self.shape_for(rows))
        logits, self.k_pools, self.v_pools = self._logits(self.params, self.k_pools, self.v_pools, inputs)
        flat = np.asarray(logits)
        out = np.zeros((len(rows), T, flat.shape[-1]), np.float32)
        for i, r in enumerate(rows):
            out[i, :r.n] = flat[inputs.query_start[i]:inputs.query_start[i] + r.n]
        return out

    @staticmethod
    def rows_of(output) -> list[Row]:
        """A SchedulerOutput's decodes (one token each) and prefill chunks as step rows."""
        rows = [Row(s, s.num_tokens - 1, 1, s.num_cached_tokens) for s in output.decodes]
        rows += [Row(ch.seq, ch.start, ch.num_tokens, ch.seq.num_cached_tokens, ch.samples)
                 for ch in output.prefills]
        return rows

    def execute(self, output) -> Launched:
        """Launches a SchedulerOutput as ONE device call, without waiting; `.sampled()` on the result gives
        {request_id: sampled token} for decodes and final prefill chunks."""
        return self.dispatch(self.rows_of(output))

    def recover(self) -> bool:
        """After a failed step: if the donated KV pools were consumed, allocate fresh (zero) ones.
        Returns True when that happened (every cached block is then gone)."""
        self._last, self._prev_tokens = None, self._no_tokens
        if not any(a.is_deleted() for a in (*self.k_pools, *self.v_pools)):
            return False
        self.k_pools, self.v_pools = self._zeros(), self._zeros()
        return True

    def warmup(self, shapes: list[tuple[int, int]] | None = None) -> float:
        """Compiles the step for every bucket shape (padding-only inputs write to page 0). Returns seconds."""
        t0 = time.perf_counter()
        todo = tuple(shapes if shapes is not None else self.buckets.all_shapes())
        if self.mirror is not None:
            self.mirror(Warmup(todo))
        for N, R in todo:
            inputs, sampling = self.pack([], N, R)
            _, self.k_pools, self.v_pools = self._step(self.params, self.k_pools, self.v_pools, inputs, sampling,
                                                       self._no_tokens, np.full(N, -1, np.int32))
        jax.block_until_ready(self.k_pools)
        if todo == tuple(self.buckets.all_shapes()):
            self.warm = True
        return time.perf_counter() - t0
