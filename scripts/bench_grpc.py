"""The benchmark's gRPC backend: one streamed engine.v1 Generate per request, prompts as token ids.

TTFT = the first response message carrying tokens; ITL = the gaps between such messages, shared evenly by
the tokens that arrive together (as the server's own ITL histogram does).
"""
from __future__ import annotations

import time

import grpc

from engine.v1 import engine_pb2 as pb
from engine.v1 import engine_pb2_grpc
from scripts.bench_report import RequestResult
from scripts.bench_server import ServerInfo


class GrpcBackend:
    name = "grpc"

    def __init__(self, target: str, tokenizer, timeout: float):
        self.target, self._tokenizer, self._timeout = target, tokenizer, timeout
        self._channel = grpc.insecure_channel(target)
        self._stub = engine_pb2_grpc.EngineStub(self._channel)
        self.metrics_url: str | None = None   # gRPC has no /metrics of its own: --metrics-url or --launch

    def info(self) -> ServerInfo:
        info = self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        if info.vocab_size != self._tokenizer.vocab_size:
            raise ValueError(f"the server's model has {info.vocab_size} tokens but the tokenizer read from "
                             f"--model-path has {self._tokenizer.vocab_size}: pass the served model's --model-path")
        return ServerInfo(info.name, info.max_length, info.prefix_caching, ours=True)

    def send(self, prompt: list[int], output_len: int, salt: str) -> tuple[RequestResult, list[int]]:
        """One streamed Generate; returns its timings and the generated token ids."""
        sampling = pb.SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=prompt), sampling=sampling, cache_salt=salt)
        result, tokens, last = RequestResult(ok=False, prompt_len=len(prompt)), [], None
        start = previous = time.perf_counter()
        try:
            for response in self._stub.Generate(request, timeout=self._timeout):
                now = time.perf_counter()
                if response.token_ids:
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itls.extend([(now - previous) / len(response.token_ids)] * len(response.token_ids))
                    previous = now
                    tokens.extend(response.token_ids)
                last = response
        except grpc.RpcError as e:
            result.error = f"{e.code().name}: {e.details()}"
            return result, tokens
        result.e2e = time.perf_counter() - start
        reason = pb.GenerateResponse.FinishReason.Name(last.finish_reason) if last else "no response"
        result.output_len, result.cached_prompt_tokens = len(tokens), last.usage.cached_prompt_tokens if last else 0
        result.ok = reason in ("LENGTH", "STOP") and result.ttft is not None
        result.error = "" if result.ok else f"finished with {reason} after {len(tokens)} tokens"
        return result, tokens

    def close(self) -> None:
        self._channel.close()
