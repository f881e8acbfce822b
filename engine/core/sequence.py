"""Sequence: the whole state of one request inside the engine (one object, as in nano-vllm)."""
from __future__ import annotations

import enum

from engine.core.request import FinishReason, Request


# Stands in token_ids for a token a launched step is still sampling (async scheduling: the next step is
# scheduled before this one's tokens are back; the device feeds the real token to it).
PLACEHOLDER = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Mutable request state shared by the scheduler, block manager and runner (engine thread only).

    Invariants: KV of token_ids[:num_computed_tokens] is in the pages of block_table;
    num_cached_tokens are the tokens found in the prefix cache at the last admission (after a full-prompt hit it
    is num_computed_tokens + 1: the last token is recomputed for its logits without rewriting its KV);
    len(block_table) * page_size >= num_computed_tokens. Hashed by identity (the block manager keys on it):
    do not give it __eq__.
    """

    def __init__(self, request: Request):
        self.request_id = request.request_id
        self.sampling = request.sampling
        self.cache_salt = request.cache_salt
        self.prompt_len = len(request.prompt_token_ids)
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0          # prefix-cache hit at the last admission (KV not rewritten)
        self.cached_prompt_tokens = 0       # prompt tokens served from the cache at the first admission (usage)
        self.seed = request.sampling.seed   # the engine draws one when the request sets none
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """Output tokens known so far (a token still being sampled is not one yet)."""
        end = len(self.token_ids) - (1 if self.token_ids and self.token_ids[-1] == PLACEHOLDER else 0)
        return self.token_ids[self.prompt_len:end]

    @property
    def num_output_tokens(self) -> int:
        """Output tokens including one still being sampled (what max_tokens counts)."""
        return len(self.token_ids) - self.prompt_len

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, pages={self.block_table})")
