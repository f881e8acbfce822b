"""GGUF -> orbax checkpoint directory that `--model-path` loads without the GGUF (see engine/checkpoint.py).

    python scripts/convert_checkpoint.py --model-path X.gguf --quantization-encoding bfloat16 --output DIR

--model-path defaults to the embedded SmolLM2 model; --quantization-encoding (float32 | bfloat16) is the
dtype the weights are stored in (the engine casts on load if it runs in the other one).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import DTYPES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="a .gguf file (default: the embedded SmolLM2)")
    parser.add_argument("--quantization-encoding", default="float32", choices=DTYPES,
                        help="dtype of the stored weights")
    parser.add_argument("--output", required=True, help="checkpoint directory to create (absent or empty)")
    args = parser.parse_args(argv)
    from engine.checkpoint import convert_gguf
    from engine.gguf_loader import resolve_model_path
    t0 = time.perf_counter()
    try:
        path = resolve_model_path(args.model_path)
        if os.path.isdir(path):
            raise ValueError(f"--model-path={path} is a directory; convert_checkpoint reads a .gguf file")
        config = convert_gguf(path, args.output, args.quantization_encoding)
    except ValueError as e:
        print(f"convert_checkpoint: {e}", file=sys.stderr)
        return 2
    print(f"convert_checkpoint: wrote {config.name} ({config.num_layers} layers, {args.quantization_encoding}) "
          f"to {os.path.abspath(args.output)} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
