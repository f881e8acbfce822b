"""SamplingParams: what a request asks of the sampler (mirrors the proto's SamplingParams).

`validate` holds the rules for every front end (offline `LLM`, gRPC, HTTP): values that are not finite
numbers are refused rather than given a meaning by accident (a NaN temperature used to sample greedily),
and a seed must fit the sampler's 32-bit key (it used to be truncated, so s and s + 2**32 sampled alike).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

MAX_SEED = 2 ** 32 - 1   # the sampler's PRNG key is seeded with a uint32


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; seed None = engine-chosen."""
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the field and the allowed values."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens={self.max_tokens!r} is not allowed; it must be an integer >= 1")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"sampling.temperature={self.temperature!r} is not allowed; it must be a finite "
                             "number >= 0 (0 = greedy)")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:  # NaN fails the comparison too
            raise ValueError(f"sampling.top_p={self.top_p!r} is not allowed; it must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"sampling.top_k={self.top_k!r} is not allowed; it must be an integer >= 0 (0 = off)")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"sampling.seed={self.seed!r} is not allowed; it must be an integer in "
                             f"[0, {MAX_SEED}] (or unset: the engine picks one)")
        if any(not isinstance(s, str) for s in self.stop):
            raise ValueError("sampling.stop must hold strings only")
        if any(not s for s in self.stop):
            raise ValueError("sampling.stop contains an empty string; stop strings must be non-empty")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"sampling.ignore_eos={self.ignore_eos!r} is not allowed; it must be true or false")
