"""The committed gRPC stubs (engine/v1/*_pb2*.py) match protos/engine/v1/engine.proto, and the contract's names hold."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", os.path.join(ROOT, "scripts", "gen_protos.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_proto():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the stubs")
    stale = _gen_protos().stale_files()
    assert not stale, f"stale stubs {stale}: run `{sys.executable} scripts/gen_protos.py` and commit them"


def test_contract_names():
    from engine.v1 import engine_pb2 as pb
    from engine.v1 import engine_pb2_grpc
    service = pb.DESCRIPTOR.services_by_name["Engine"]
    assert pb.DESCRIPTOR.package == "engine.v1" and hasattr(engine_pb2_grpc, "EngineStub")
    assert {m.name: m.server_streaming for m in service.methods} == {"Generate": True, "GetModelInfo": False}
    request = pb.GenerateRequest.DESCRIPTOR
    assert [f.name for f in request.oneofs_by_name["input"].fields] == ["prompt", "messages", "prompt_token_ids"]
    assert {f.name for f in request.fields} >= {"request_id", "sampling", "cache_salt"}
    assert [v.name for v in pb.GenerateResponse.FinishReason.DESCRIPTOR.values] == [
        "FINISH_REASON_UNSPECIFIED", "STOP", "LENGTH", "ABORT"]
    assert [f.name for f in pb.Usage.DESCRIPTOR.fields] == ["prompt_tokens", "completion_tokens",
                                                            "cached_prompt_tokens"]
    sampling = pb.SamplingParams.DESCRIPTOR
    assert [f.name for f in sampling.fields] == ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                                                 "ignore_eos"]
    # "unset" must differ from 0 exactly where 0 is a meaningful (or invalid) value.
    assert {f.name for f in sampling.fields if f.has_presence} == {"max_tokens", "top_p", "seed"}
