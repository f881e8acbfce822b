"""Generates the Python gRPC stubs for protos/engine/v1/engine.proto, or checks they are current.

    python scripts/gen_protos.py           # (re)writes engine/v1/engine_pb2.py, engine_pb2_grpc.py, __init__.py
    python scripts/gen_protos.py --check   # exits 1, naming the stale files, if the committed stubs drift

The stubs are committed, so running the server needs only grpcio and protobuf, not grpcio-tools
(a dev dependency). The proto lives under its package path and is compiled with `-I protos` into the
repository root: the generated `_grpc` module imports `engine.v1.engine_pb2` by that relative path.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO = "engine/v1/engine.proto"
OUT_PACKAGE = "engine/v1"
GENERATED = ("engine_pb2.py", "engine_pb2_grpc.py", "__init__.py")
INIT_TEXT = '"""Generated gRPC stubs for engine.v1 (scripts/gen_protos.py). Do not edit."""\n'


def generate(out_root: pathlib.Path) -> None:
    """Runs protoc (from grpcio-tools) on the proto, writing the package under `out_root`."""
    try:
        from grpc_tools import protoc
    except ImportError:
        sys.exit("gen_protos: grpcio-tools is not installed; install the dev extra: pip install -e '.[dev]'")
    import grpc_tools
    # The well-known types (google/protobuf/*.proto) ship inside grpc_tools.
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}",
            f"--grpc_python_out={out_root}", str(PROTO_ROOT / PROTO)]
    if protoc.main(args) != 0:
        sys.exit(f"gen_protos: protoc failed on {PROTO_ROOT / PROTO}")
    (out_root / OUT_PACKAGE / "__init__.py").write_text(INIT_TEXT)


def stale_files() -> list[str]:
    """Generated files whose committed copy differs from a fresh generation (empty when current)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(pathlib.Path(tmp))
        stale = []
        for name in GENERATED:
            fresh = pathlib.Path(tmp, OUT_PACKAGE, name).read_bytes()
            committed = ROOT / OUT_PACKAGE / name
            if not committed.exists() or committed.read_bytes() != fresh:
                stale.append(f"{OUT_PACKAGE}/{name}")
        return stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed stubs are current")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            sys.exit(f"gen_protos: stale stubs: {', '.join(stale)}; run `python scripts/gen_protos.py`")
        print("gen_protos: stubs are current")
        return
    generate(ROOT)
    print(f"gen_protos: wrote {', '.join(f'{OUT_PACKAGE}/{n}' for n in GENERATED)}")


if __name__ == "__main__":
    main()
