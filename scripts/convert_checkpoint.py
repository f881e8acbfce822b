"""GGUF -> orbax checkpoint directory that `--model-path` loads without the GGUF (see engine/loading/checkpoint.py).

    python scripts/convert_checkpoint.py --model-path X.gguf --quantization-encoding bfloat16 --output DIR

--model-path defaults to the embedded SmolLM2 model; --quantization-encoding (float32 | bfloat16) is the
dtype the weights are stored in (the engine casts on load if it runs in the other one).
The checkpoint is written into a hidden temporary directory beside --output, fsynced, then renamed to
--output: a conversion that crashes leaves no --output at all (and removes its temporary directory when it
can), so a directory named --output is always a whole checkpoint.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import DTYPES
from scripts.durable_io import fsync_dir, fsync_tree


def convert_atomically(gguf_path: str, output: str, dtype: str):
    """convert_gguf into a temporary sibling of `output`, then one rename; returns the ModelConfig."""
    from engine.loading.checkpoint import convert_gguf
    output = os.path.abspath(output)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ValueError(f"{output}: output exists and is not an empty directory; choose a new --output")
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
    try:
        config = convert_gguf(gguf_path, partial, dtype)
        fsync_tree(partial)  # every byte on disk before the name appears
        if os.path.isdir(output):
            os.rmdir(output)  # empty (checked above): rename cannot replace a directory on every system
        os.rename(partial, output)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="a .gguf file (default: the embedded SmolLM2)")
    parser.add_argument("--quantization-encoding", default="float32", choices=DTYPES,
                        help="dtype of the stored weights")
    parser.add_argument("--output", required=True, help="checkpoint directory to create (absent or empty)")
    args = parser.parse_args(argv)
    from engine.loading.gguf_loader import resolve_model_path
    t0 = time.perf_counter()
    try:
        path = resolve_model_path(args.model_path)
        if os.path.isdir(path):
            raise ValueError(f"--model-path={path} is a directory; convert_checkpoint reads a .gguf file")
        config = convert_atomically(path, args.output, args.quantization_encoding)
    except ValueError as e:
        print(f"convert_checkpoint: {e}", file=sys.stderr)
        return 2
    print(f"convert_checkpoint: wrote {config.name} ({config.num_layers} layers, {args.quantization_encoding}) "
          f"to {os.path.abspath(args.output)} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
