"""The offline API (like vLLM's): `LLM(model_path, **engine_options).generate(prompts, sampling)`."""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Sequence

from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.core.request import Request
from engine.serving.request_builder import default_max_tokens
from engine.core.request_checks import check_prompt_size
from engine.core.sampling_params import SamplingParams
from engine.core.stats import EngineStats


@dataclass(frozen=True)
class CompletionOutput:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str          # "stop" | "length" | "abort"
    cached_prompt_tokens: int


def _is_chat(p: Any) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(m, dict) for m in p)


def _is_token_ids(p: Any) -> bool:
    return isinstance(p, (list, tuple)) and bool(p) and all(isinstance(t, int) for t in p)


class LLM:
    """Offline generation over the same engine the server uses (stepped in the calling thread)."""

    def __init__(self, model_path: str | None = None, **engine_options):
        self.engine = LLMEngine(EngineConfig(model_path=model_path, **engine_options))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    @property
    def config(self) -> EngineConfig:
        """The engine's options with every unset one resolved (max_length, page size, pool size, ...)."""
        return self.engine.config

    def stats(self) -> EngineStats:
        """The engine's counters and gauges now (pages in use, prefix-cache hits, compilations, ...)."""
        return self.engine.stats()

    def warmup(self) -> float:
        """Compiles every step shape now (as the server does before it serves); returns the seconds spent.
        Without it, each shape compiles on first use."""
        return self.engine.warmup()

    def prompt_token_ids(self, prompt: Any) -> tuple[int, ...]:
        """Token ids of one prompt as `generate` takes it (a string, a chat message list or token ids);
        ValueError for text over --max-prompt-bytes (checked before tokenizing) or a prompt of another type."""
        config = self.engine.config
        if isinstance(prompt, str):
            check_prompt_size("prompt", prompt, config)  # before the (costly) tokenizing
            return tuple(self.tokenizer.encode(prompt))
        if _is_chat(prompt):
            check_prompt_size("messages", prompt, config)
            return tuple(self.tokenizer.encode_chat(prompt))
        if _is_token_ids(prompt):
            return tuple(int(t) for t in prompt)
        raise ValueError(f"prompt {prompt!r:.80} is not a string, a chat message list or a token-id list")

    def generate(self, prompts: Any, sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                 cache_salt: str | None = None, use_tqdm: bool = False,
                 on_step: Callable[[], None] | None = None) -> list[CompletionOutput]:
        """Generates for one prompt or a list of prompts (strings, chat message lists or token-id lists);
        returns one CompletionOutput per prompt, in order. `on_step` is called after every engine step (e.g.
        to sample `stats()` while the requests run)."""
        if isinstance(prompts, str) or _is_chat(prompts) or _is_token_ids(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling or SamplingParams()] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"got {len(sampling)} SamplingParams for {len(prompts)} prompts")
        requests = [Request(f"offline-{next(self._ids)}", self.prompt_token_ids(p), s, cache_salt or "")
                    for p, s in zip(prompts, sampling)]
        for r in requests:  # every prompt checked before any starts: a bad one leaves nothing half-run
            self.engine.validate(r)
        return self._run(requests, use_tqdm, on_step)

    def sampling_params(self, prompt_len: int, **fields) -> SamplingParams:
        """SamplingParams of `fields` (SamplingParams' names), with the servers' rule for an unset or None
        max_tokens: min(256, what fits in --max-length after a `prompt_len`-token prompt), at least 1."""
        if fields.get("max_tokens") is None:
            fields["max_tokens"] = max(1, default_max_tokens(prompt_len, self.engine.config.max_length))
        return SamplingParams(**fields)

    def validate(self, prompt_token_ids: Sequence[int], sampling: SamplingParams) -> None:
        """ValueError naming the field when `generate` would refuse this prompt and sampling (every limit
        and message of the servers'), so a caller can drop one bad prompt before a batch call."""
        self.engine.validate(Request("validate", tuple(prompt_token_ids), sampling))

    def _run(self, requests: list[Request], use_tqdm: bool,
             on_step: Callable[[], None] | None) -> list[CompletionOutput]:
        pending = list(reversed(requests))
        streams, results = {}, {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(requests), desc="generate")
        limit = self.engine.config.max_waiting_requests
        while pending or len(results) < len(requests):
            while pending and len(streams) - len(results) < limit:
                r = pending.pop()
                streams[r.request_id] = (r, self.engine.add_request(r), [], [])
            self.engine.step()
            if on_step is not None:
                on_step()
            for rid, (r, stream, toks, text) in streams.items():
                if rid in results:
                    continue
                for out in stream.drain():
                    if out.error is not None:  # an engine fault ended it (a failed step raises instead)
                        for other in streams:
                            self.engine.abort(other)
                        raise RuntimeError(f"request {rid}: {out.error.message}")
                    toks.extend(out.new_token_ids)
                    text.append(out.text)
                    if out.finish_reason is not None:
                        results[rid] = CompletionOutput(rid, r.prompt_token_ids, tuple(toks), "".join(text),
                                                        out.finish_reason.value, out.cached_prompt_tokens)
                        if bar is not None:
                            bar.update(1)
        if bar is not None:
            bar.close()
        return [results[r.request_id] for r in requests]

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()
