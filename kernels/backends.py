"""The attention backends (`--attention-backend`) and how "auto" resolves; plain Python, so the engine's
config can name them without importing JAX or Pallas."""
from __future__ import annotations

ATTENTION_BACKENDS = ("auto", "pallas", "reference")


def resolve_backend(name: str, platform: str) -> str:
    """Maps a --attention-backend value and a device platform ('cpu', 'gpu'/'cuda') to 'pallas' or 'reference'."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend={name!r} is not allowed; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "auto":
        return "pallas" if platform in ("gpu", "cuda") else "reference"
    return name
