import os
import sys

# Tests import `tests.*` helpers and the packages from the repo root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """Path of the default tiny quantized model (GQA 6/2, tied output)."""
    from tests.tiny_model import write_tiny_gguf
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_gguf_factory(tmp_path_factory):
    """Writes (and caches) tiny models for a given TinySpec."""
    from tests.tiny_model import write_tiny_gguf
    cache = {}

    def make(spec):
        if spec not in cache:
            cache[spec] = write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", spec)
        return cache[spec]
    return make
