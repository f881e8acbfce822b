"""FakeEngine: the LLMEngine interface with hand-computable outputs, for fast server tests (no JAX).

Outputs: a request whose prompt ends with token t generates t+1, t+2, ... (mod vocab_size), one token per
step, until max_tokens (LENGTH) or, if `eos_token_id` is set, that token (STOP unless ignore_eos). The
tokenizer maps each character to its code point and each token back to `chr(token)`, so the prompt
"ab" continues "cdef...". The page pool is real bookkeeping: an admitted request holds
ceil((prompt + max_tokens) / page_size) pages until it finishes or is aborted, so tests can assert that
pages go back to 0. `pause()` / `run_steps(n)` / `resume()` hold the loop, to build queues and mid-stream
states deterministically; `wait_for(predicate)` blocks on a condition instead of sleeping.
Faults, as the real engine reports them: `fail_step()` ends every request in flight with an INTERNAL error
(a failed step the engine recovered from); `die(reason)` (or a prompt ending in `die_on_token`) is a fault
it cannot recover from: UNAVAILABLE for everyone, `failure` set, the loop gone. `stall()` blocks the loop
inside a step until `unstall()`; `warmup_error` is raised by warmup().
"""
from __future__ import annotations

import collections
import threading

from engine.config import EngineConfig, ModelConfig
from engine.core.request import (DuplicateRequestError, EngineUnavailableError, ErrorCode, FinishReason, QueueFullError,
                            Request, RequestError, RequestOutput, RequestStream)
from engine.core.request_checks import check_request
from engine.core.stats import EngineStats


class FakeTokenizer:
    """Characters <-> code points; a one-line chat template."""
    ALLOWED_ROLES = ("system", "user", "assistant")

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % self.vocab_size for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """'<role>content\\n' per message, then '<assistant>'."""
        for i, m in enumerate(messages):
            if m["role"] not in self.ALLOWED_ROLES:
                raise ValueError(f"messages[{i}].role={m['role']!r} is not allowed; "
                                 f"choose one of {', '.join(self.ALLOWED_ROLES)}")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class _Seq:
    def __init__(self, request: Request, stream: RequestStream):
        self.request, self.stream = request, stream
        self.output: list[int] = []
        self.pages = 0
        self.cached_tokens = 0


class FakeEngine:
    """Implements what engine.server needs of LLMEngine; thread-safe, with a background loop."""

    def __init__(self, config: EngineConfig | None = None, *, vocab_size: int = 1000, token_delay: float = 0.0,
                 eos_token_id: int | None = None, warmup_gate: threading.Event | None = None,
                 die_on_token: int | None = None, warmup_error: BaseException | None = None):
        config = config or EngineConfig()
        self.config = config.replace(quantization_encoding=config.quantization_encoding or "float32",
                                     max_length=config.max_length or 64, kv_cache_pages=config.kv_cache_pages or 256,
                                     devices=config.devices or "cpu:0", max_batch_size=config.max_batch_size or 32,
                                     max_num_batched_tokens=config.max_num_batched_tokens or 512)
        self.model_name = "fake-model"
        self.model_config = ModelConfig(
            architecture="fake", name=self.model_name, vocab_size=vocab_size, hidden_size=8, intermediate_size=16,
            num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, rope_theta=1e4, rms_norm_eps=1e-5,
            max_position=self.config.max_length, tie_word_embeddings=True)
        self.device_description = self.config.devices
        self.tokenizer = FakeTokenizer(vocab_size)
        self.token_delay, self.eos_token_id, self._warmup_gate = token_delay, eos_token_id, warmup_gate
        self.die_on_token, self._warmup_error = die_on_token, warmup_error
        self.total_pages = self.config.kv_cache_pages - 1  # page 0 is reserved, as in the real pool
        self._cond = threading.Condition(threading.RLock())
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: dict[str, _Seq] = {}
        self._cached_blocks: set[tuple] = set()
        self._counters = collections.Counter()   # prefix-cache and preemption counters
        self._steps_left: int | None = None  # None = run freely; 0 = paused
        self._stopping = False
        self._accepting = True
        self.failure: str | None = None
        self._stopped = threading.Event()
        self._unstalled, self.stalled = threading.Event(), threading.Event()
        self._unstalled.set()
        self._thread: threading.Thread | None = None
        self.abort_calls: list[str] = []   # every abort(request_id) call
        self.aborted: list[str] = []       # requests that were live when aborted
        self.warmed_up = self.started = self.shut_down = False

    # -- lifecycle -----------------------------------------------------------------------------------
    def warmup(self) -> float:
        if self._warmup_gate is not None:
            self._warmup_gate.wait()
        if self._warmup_error is not None:
            raise self._warmup_error
        self.warmed_up = True
        return 0.0

    def start(self) -> None:
        self.started = True
        self._thread = threading.Thread(target=self._loop, name="fake-engine", daemon=True)
        self._thread.start()

    def shutdown(self, abort_inflight: bool = True, timeout: float = 30.0) -> None:
        with self._cond:
            self._accepting = False
            if not abort_inflight:
                self._cond.wait_for(lambda: not self._waiting and not self._running, timeout)
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            if self._thread is not None and self._thread.is_alive():  # stalled in a step, like LLMEngine
                self._end_all_locked(RequestError(ErrorCode.UNAVAILABLE, "the server is shutting down"))
            else:
                self._end_all_locked(None)
            self.shut_down = True
        self._stopped.set()

    # -- faults --------------------------------------------------------------------------------------
    def fail_step(self, reason: str = "RuntimeError: injected") -> None:
        """A failed step the engine recovered from: every request in flight ends with an INTERNAL error."""
        with self._cond:
            self._counters["step_failures"] += 1
            self._end_all_locked(RequestError(ErrorCode.INTERNAL, f"the engine failed while running this "
                                                                        f"request ({reason}); retry it"))

    def die(self, reason: str = "recovery failed") -> None:
        """A fault the engine cannot recover from: everyone UNAVAILABLE, new requests refused, loop ends."""
        with self._cond:
            self.failure = reason
            self._accepting, self._stopping = False, True
            self._end_all_locked(RequestError(ErrorCode.UNAVAILABLE, f"the engine stopped ({reason})"))
        self._stopped.set()

    def wait_until_stopped(self, timeout: float | None = None) -> str | None:
        self._stopped.wait(timeout)
        return self.failure

    def stall(self) -> None:
        """The loop's next step blocks (holding no lock) until unstall(); `stalled` is set once it does."""
        self._unstalled.clear()

    def unstall(self) -> None:
        self._unstalled.set()

    def _end_all_locked(self, error: RequestError | None) -> None:
        for seq in list(self._waiting) + list(self._running.values()):
            self.aborted.append(seq.request.request_id)
            self._emit(seq, [], FinishReason.ABORT, error)
        self._waiting.clear()
        self._running.clear()

    def pause(self) -> None:
        """Freezes the loop after the current step: queued requests stay queued, running ones stay running."""
        self.run_steps(0)

    def resume(self) -> None:
        self.run_steps(None)

    def run_steps(self, n: int | None) -> None:
        """Lets the loop run `n` more steps (each admits what fits and emits one token per request), then pause."""
        with self._cond:
            self._steps_left = n
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        """Blocks until predicate(self) holds (re-checked on every state change); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    # -- request API -----------------------------------------------------------------------------------
    def add_request(self, request: Request) -> RequestStream:
        # The same checks as LLMEngine.validate (the servicer leaves them to the engine).
        check_request(request, self.config, self.model_config.vocab_size, self.total_pages)
        with self._cond:
            if not self._accepting:
                raise EngineUnavailableError(f"the engine stopped ({self.failure})" if self.failure
                                             else "the engine is shutting down")
            live = {s.request.request_id for s in self._waiting} | set(self._running)
            if request.request_id in live:
                raise DuplicateRequestError(f"request_id={request.request_id!r} is already in flight")
            if len(self._waiting) >= self.config.max_waiting_requests:
                raise QueueFullError("waiting queue full")
            stream = RequestStream(request.request_id)
            self._waiting.append(_Seq(request, stream))
            self._cond.notify_all()
            return stream

    def abort(self, request_id: str, stream: RequestStream | None = None) -> None:
        with self._cond:
            self.abort_calls.append(request_id)
            self._abort_locked(request_id, stream)

    def stats(self) -> EngineStats:
        with self._cond:
            used = sum(s.pages for s in self._running.values())
            return EngineStats(
                running_requests=len(self._running), waiting_requests=len(self._waiting), kv_pages_used=used,
                kv_pages_free=self.total_pages - used, kv_pages_total=self.total_pages,
                prefix_cache_queried_tokens=self._counters["queried"], prefix_cache_hit_tokens=self._counters["hit"],
                step_failures=self._counters["step_failures"])

    def reset_prefix_cache(self) -> bool:
        with self._cond:
            self._cached_blocks.clear()
            return True

    # -- internals (all under self._cond) --------------------------------------------------------------
    def _abort_locked(self, request_id: str, stream: RequestStream | None = None) -> None:
        seq = self._running.get(request_id) or next(
            (s for s in self._waiting if s.request.request_id == request_id), None)
        if seq is None or (stream is not None and stream is not seq.stream):
            return  # unknown, finished, or a newer request reusing the id: a no-op, as in the real engine
        if self._running.get(request_id) is seq:
            del self._running[request_id]
        else:
            self._waiting.remove(seq)
        self.aborted.append(request_id)
        self._emit(seq, [], FinishReason.ABORT)

    def _emit(self, seq: _Seq, new: list[int], reason: FinishReason | None, error: RequestError | None = None):
        text = "".join(chr(t) for t in new if t != self.eos_token_id)
        if reason is not None:
            seq.pages = 0  # the pages go back to the pool with the final output
        seq.stream.put(RequestOutput(seq.request.request_id, tuple(new), text, reason,
                                     len(seq.request.prompt_token_ids), len(seq.output), seq.cached_tokens, error))
        self._cond.notify_all()

    def _admit(self) -> None:
        page = self.config.kv_cache_page_size
        while self._waiting and len(self._running) < self.config.max_batch_size:
            seq = self._waiting[0]
            ids = seq.request.prompt_token_ids
            need = -(-(len(ids) + seq.request.sampling.max_tokens) // page)
            if need > self.total_pages - sum(s.pages for s in self._running.values()):
                return  # FIFO: the head waits for pages
            if self.die_on_token is not None and ids[-1] == self.die_on_token:
                self.die(f"injected fault on token {ids[-1]}")
                return
            self._waiting.popleft()
            seq.pages = need
            self._running[seq.request.request_id] = seq
            self._lookup_prefix(seq, page)

    def _lookup_prefix(self, seq: _Seq, page: int) -> None:
        """Counts full prompt blocks seen before (same salt, same tokens before them) as cache hits."""
        if not self.config.enable_prefix_caching:
            return
        ids, salt = seq.request.prompt_token_ids, seq.request.cache_salt
        self._counters["queried"] += len(ids)
        # Like a real engine, keep at least the last prompt token to compute: only blocks ending before it.
        keys = [(salt, ids[:end]) for end in range(page, len(ids), page)]
        for key in keys:
            if key not in self._cached_blocks:
                break
            seq.cached_tokens += page
        self._counters["hit"] += seq.cached_tokens
        self._cached_blocks.update(keys)

    def _step(self) -> None:
        for rid, seq in list(self._running.items()):
            last = seq.output[-1] if seq.output else seq.request.prompt_token_ids[-1]
            token = (last + 1) % self.model_config.vocab_size
            seq.output.append(token)
            reason = None
            if token == self.eos_token_id and not seq.request.sampling.ignore_eos:
                reason = FinishReason.STOP
            elif len(seq.output) >= seq.request.sampling.max_tokens:
                reason = FinishReason.LENGTH
            if reason is not None:
                del self._running[rid]
            self._emit(seq, [token], reason)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or (self._steps_left != 0 and
                                                               (self._waiting or self._running)))
                if self._stopping:
                    return
                self._admit()
                self._step()
                if self._steps_left:
                    self._steps_left -= 1
            if not self._unstalled.is_set():  # a step that does not return (holding no lock)
                self.stalled.set()
                self._unstalled.wait()
            if self.token_delay:
                with self._cond:  # a simulated step time that shutdown can cut short
                    self._cond.wait_for(lambda: self._stopping, self.token_delay)
