"""SamplingParams: what a request asks of the sampler (mirrors the proto's SamplingParams)."""
from __future__ import annotations

from dataclasses import dataclass, field


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
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens={self.max_tokens!r} is not allowed; it must be an integer >= 1")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature={self.temperature!r} is not allowed; it must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p={self.top_p!r} is not allowed; it must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k={self.top_k!r} is not allowed; it must be >= 0 (0 = off)")
        if any(not s for s in self.stop):
            raise ValueError("sampling.stop contains an empty string; stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
