"""Streams one reply from a running engine server and prints it as it arrives.

    python scripts/client.py --prompt "The capital of France is" --max-tokens 16
    python scripts/client.py --chat "What is the capital of France?" --temperature 0.7 --seed 1
    python scripts/client.py --info                       # the model and engine settings

The text goes to stdout as it streams; a usage line follows at the end. Errors print one line
(the gRPC status and its message) and exit 1.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout
from engine.v1 import engine_pb2 as pb
from engine.v1 import engine_pb2_grpc


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="localhost:50051", help="server address host:port")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="plain text prompt (tokenized as is)")
    what.add_argument("--chat", help="a user message, rendered with the model's chat template")
    what.add_argument("--info", action="store_true", help="print the model info and exit")
    p.add_argument("--system", help="a system message to put before --chat")
    p.add_argument("--max-tokens", type=int, help="default: the server's (256, or what fits)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--request-id", default="", help="default: the server generates one")
    p.add_argument("--cache-salt", default="")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")
    return p.parse_args(argv)


def build_request(args: argparse.Namespace) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=args.temperature, top_k=args.top_k, stop=args.stop)
    for field in ("max_tokens", "top_p", "seed"):  # optional in the proto: set only when given
        if getattr(args, field) is not None:
            setattr(sampling, field, getattr(args, field))
    request = pb.GenerateRequest(request_id=args.request_id, sampling=sampling, cache_salt=args.cache_salt)
    if args.prompt is not None:
        request.prompt = args.prompt
    else:
        if args.system:
            request.messages.messages.add(role="system", content=args.system)
        request.messages.messages.add(role="user", content=args.chat)
    return request


def stream_reply(stub, request: pb.GenerateRequest, timeout: float) -> pb.GenerateResponse:
    """Prints text as it arrives; returns the last response (with finish_reason and usage)."""
    last = None
    try:
        for response in stub.Generate(request, timeout=timeout):
            sys.stdout.write(response.text)
            sys.stdout.flush()
            last = response
    finally:
        if last is not None:
            print()  # end the streamed line before the usage line or an error
    return last


def main(argv=None) -> int:
    args = parse_args(argv)
    with grpc.insecure_channel(args.target) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        try:
            if args.info:
                print(stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=args.timeout))
                return 0
            last = stream_reply(stub, build_request(args), args.timeout)
        except grpc.RpcError as e:
            print(f"client: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    u = last.usage
    reason = pb.GenerateResponse.FinishReason.Name(last.finish_reason)
    print(f"[finish_reason={reason} prompt_tokens={u.prompt_tokens} completion_tokens={u.completion_tokens} "
          f"cached_prompt_tokens={u.cached_prompt_tokens}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
