"""Benchmark workloads: prompts built from random words with the model's tokenizer, exact in tokens.

A workload is a list of `Session`s. A session is a list of `Turn`s sent one after another: each turn
appends its `new_tokens` to the session's history, sends the whole history as `prompt_token_ids`, then
appends the answer it got back. Single-request workloads are one-turn sessions; `multi-turn` has several.

  shared-prefix    G groups x N prompts: a system prompt of P tokens shared by the group + a unique
                   question of Q tokens; O output tokens (like SGLang's generated-shared-prefix).
  multi-turn       C conversations x T turns: turn 1 is a private context of P + Q tokens, later turns a new
                   question of Q tokens; every turn resends the history (previous answers included).
  unique           the shared-prefix lengths (P + Q in, O out) with nothing shared: the control run.
  long-generation  short prompts (Q tokens), long outputs (--long-output-len).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

WORKLOADS = ("shared-prefix", "multi-turn", "unique", "long-generation")

# Plain words only: no digits or punctuation the tokenizer might merge across word boundaries, and no
# special-token text, so `encode` yields ordinary tokens.
_WORDS = (
    "the of and to in is was for on that with as by at from his her they this which are be had not or "
    "have one all were when there an their she would who will more been if no out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such "
    "like our over man me even most made after also did many before must through back years where much "
    "your way well down should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three river garden "
    "window music story market winter yellow engine silver forest paper letter ocean simple quiet bright "
    "history science morning evening teacher mountain island village question answer number system"
).split()


@dataclass(frozen=True)
class Turn:
    new_tokens: tuple[int, ...]   # appended to the session's history before this turn is sent
    output_len: int               # tokens to generate (ignore_eos makes this exact)


@dataclass(frozen=True)
class Session:
    turns: tuple[Turn, ...]

    def total_len(self) -> int:
        """Tokens of the last turn's prompt plus its output: the longest sequence the session makes."""
        return sum(len(t.new_tokens) + t.output_len for t in self.turns)


@dataclass(frozen=True)
class WorkloadSpec:
    num_groups: int = 4
    prompts_per_group: int = 8
    system_prompt_len: int = 1024
    question_len: int = 32
    output_len: int = 32
    num_conversations: int = 8
    num_turns: int = 4
    num_requests: int | None = None    # unique / long-generation; None = num_groups * prompts_per_group
    long_output_len: int = 256


SPEC_HELP = {
    "num_groups": "shared-prefix: groups (one system prompt each)",
    "prompts_per_group": "shared-prefix: requests per group",
    "system_prompt_len": "P: shared-prefix's system prompt; multi-turn's first-turn context",
    "question_len": "Q: each question (long-generation: the whole prompt)",
    "output_len": "O: tokens generated per request (long-generation: see --long-output-len)",
    "num_conversations": "multi-turn: conversations (run concurrently)",
    "num_turns": "multi-turn: turns per conversation (run one after another)",
    "num_requests": "unique / long-generation: requests (default: groups x prompts per group)",
    "long_output_len": "long-generation: tokens generated per request",
}


class TextSource:
    """Random word text turned into token ids of an exact length."""

    def __init__(self, tokenizer, rng: random.Random):
        self._tok, self._rng = tokenizer, rng

    def tokens(self, n: int) -> list[int]:
        """`n` token ids of random words (always at least one word more than needed, then cut)."""
        ids: list[int] = []
        while len(ids) < n:
            words = " ".join(self._rng.choice(_WORDS) for _ in range(n - len(ids) + 1))
            # A leading space keeps the pieces' word boundaries as they would be mid-text.
            ids.extend(self._tok.encode(" " + words, add_special_tokens=False))
        return ids[:n]

    def prompt_start(self, n: int) -> list[int]:
        """Like `tokens`, but starts with BOS when the model's GGUF asks for one (counted in `n`)."""
        bos = self._tok.bos_token_id
        if self._tok.add_bos_token and bos is not None and n > 0:
            return [bos] + self.tokens(n - 1)
        return self.tokens(n)


def _one_turn(ids: list[int], output_len: int) -> Session:
    return Session((Turn(tuple(ids), output_len),))


def shared_prefix(src: TextSource, s: WorkloadSpec) -> list[Session]:
    """Grouped in order: a group's requests are adjacent, as a real system prompt's traffic would be."""
    sessions = []
    for _ in range(s.num_groups):
        system = src.prompt_start(s.system_prompt_len)
        for _ in range(s.prompts_per_group):
            sessions.append(_one_turn(system + src.tokens(s.question_len), s.output_len))
    return sessions


def multi_turn(src: TextSource, s: WorkloadSpec) -> list[Session]:
    sessions = []
    for _ in range(s.num_conversations):
        first = Turn(tuple(src.prompt_start(s.system_prompt_len + s.question_len)), s.output_len)
        later = [Turn(tuple(src.tokens(s.question_len)), s.output_len) for _ in range(s.num_turns - 1)]
        sessions.append(Session((first, *later)))
    return sessions


def _num_requests(s: WorkloadSpec) -> int:
    return s.num_requests if s.num_requests is not None else s.num_groups * s.prompts_per_group


def unique(src: TextSource, s: WorkloadSpec) -> list[Session]:
    return [_one_turn(src.prompt_start(s.system_prompt_len + s.question_len), s.output_len)
            for _ in range(_num_requests(s))]


def long_generation(src: TextSource, s: WorkloadSpec) -> list[Session]:
    return [_one_turn(src.prompt_start(s.question_len), s.long_output_len) for _ in range(_num_requests(s))]


_BUILDERS = {"shared-prefix": shared_prefix, "multi-turn": multi_turn, "unique": unique,
             "long-generation": long_generation}


def build(name: str, tokenizer, spec: WorkloadSpec, seed: int) -> list[Session]:
    """The sessions of workload `name`; the same (name, spec, seed) always gives the same token ids."""
    if name not in _BUILDERS:
        raise ValueError(f"--workload={name!r} is not allowed; choose from {', '.join(WORKLOADS)}")
    # Seeded per workload, so adding a workload to a run never changes another's prompts.
    return _BUILDERS[name](TextSource(tokenizer, random.Random(f"{seed}:{name}")), spec)


def workload_params(name: str, spec: WorkloadSpec) -> dict:
    """The spec fields that shape `name` (for the JSON report)."""
    p, q, o = spec.system_prompt_len, spec.question_len, spec.output_len
    return {"shared-prefix": {"num_groups": spec.num_groups, "prompts_per_group": spec.prompts_per_group,
                              "system_prompt_len": p, "question_len": q, "output_len": o},
            "multi-turn": {"num_conversations": spec.num_conversations, "num_turns": spec.num_turns,
                           "first_turn_len": p + q, "question_len": q, "output_len": o},
            "unique": {"num_requests": _num_requests(spec), "input_len": p + q, "output_len": o},
            "long-generation": {"num_requests": _num_requests(spec), "input_len": q,
                                "output_len": spec.long_output_len}}[name]


def load_tokenizer(model_path: str | None):
    """The model's tokenizer without loading its weights (engine.load_tokenizer: a GGUF file, or an engine
    checkpoint directory); imported on use so the workloads need no engine to be built."""
    from engine import load_tokenizer as engine_load_tokenizer
    return engine_load_tokenizer(model_path)
