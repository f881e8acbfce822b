"""EngineServicer: the engine.v1.Engine gRPC service over an LLMEngine (or the tests' FakeEngine).

One Generate call = one engine request: validate and tokenize (engine/serving/proto_convert.py), `add_request`,
then stream each RequestOutput until the one with a finish reason. A client that cancels or disconnects
has its request aborted at once through gRPC's done-callback, so its KV pages go back to the pool.
The servicer exists before the engine does (health and reflection answer while the model loads):
until `attach(engine)`, after `drain()` and once the engine has failed (`mark_failed`), Generate answers
UNAVAILABLE; beyond --max-concurrent-rpcs calls in flight, RESOURCE_EXHAUSTED. A request that an engine
fault ended (RequestOutput.error) ends its call with that error's status (INTERNAL / UNAVAILABLE), never
with a normal ABORT.
"""
from __future__ import annotations

import dataclasses
import queue
import threading

import grpc

from engine.serving.front_end_gate import FrontEndGate, GateClosed, GateFull
from engine.serving.metrics import ServerMetrics
from engine.serving.proto_convert import InvalidRequest, build_request, parse_generate_request, to_response
from engine.core.request import (DuplicateRequestError, EngineUnavailableError, ErrorCode, FinishReason, QueueFullError,
                            Request, RequestOutput)
from engine.v1 import engine_pb2 as pb
from engine.v1 import engine_pb2_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Engine"].full_name  # "engine.v1.Engine"
# How often a stream blocked on the engine re-checks that its client is still connected. The
# done-callback normally aborts at once; polling only bounds the damage if a callback is ever missed.
POLL_SECONDS = 0.5
DEFAULT_MAX_CONCURRENT_RPCS = 256  # --max-concurrent-rpcs
STATUS_OF = {ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL, ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE}


class _Call:
    """One Generate call's end, shared by the streaming loop and gRPC's done-callback (either may win)."""

    def __init__(self, engine, request_id: str, stream, timer):
        self._engine, self.request_id, self.stream, self.timer = engine, request_id, stream, timer
        self._lock = threading.Lock()
        self._done = False

    def finish(self, reason: FinishReason) -> bool:
        """Records the outcome once; False if it was already recorded."""
        with self._lock:
            if self._done:
                return False
            self._done = True
        if self.timer is not None:
            self.timer.on_finish(reason)
        return True

    def cancel(self) -> None:
        """The RPC ended (cancelled, disconnected, deadline) before the engine finished: free the pages now."""
        if self.finish(FinishReason.ABORT):
            self._engine.abort(self.request_id, self.stream)  # this call's request only, never a newer one


class EngineServicer(FrontEndGate, engine_pb2_grpc.EngineServicer):
    """Generate and GetModelInfo. The lifecycle (attach, drain, mark_failed, wait_idle: the server's calls)
    and the in-flight count, at most --max-concurrent-rpcs Generate calls, are the FrontEndGate's."""

    def __init__(self, metrics: ServerMetrics | None = None, max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS):
        super().__init__(max_in_flight=max_concurrent_rpcs)
        self._metrics = metrics

    # -- RPCs ----------------------------------------------------------------------------------------
    def Generate(self, request, context):
        engine = self._enter(context)
        try:
            yield from self._generate(engine, request, context)
        finally:
            self.leave()

    def GetModelInfo(self, request, context):
        engine = self.engine
        if engine is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        cfg, model = engine.config, engine.model_config
        return pb.ModelInfo(name=engine.model_name, architecture=model.architecture, vocab_size=model.vocab_size,
                            max_length=cfg.max_length, page_size=cfg.kv_cache_page_size,
                            prefix_caching=cfg.enable_prefix_caching, dtype=cfg.quantization_encoding,
                            devices=engine.device_description)

    # -- Generate, step by step ----------------------------------------------------------------------
    def _enter(self, context):
        """The engine to use, counting this call as in flight; UNAVAILABLE while loading, draining or dead,
        RESOURCE_EXHAUSTED at --max-concurrent-rpcs."""
        try:
            return self.enter()
        except GateClosed as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except GateFull as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e.in_flight} Generate calls are in flight "
                          f"(--max-concurrent-rpcs={self.max_in_flight}); retry later")

    def _generate(self, engine, request, context):
        timer = self._metrics.tracker() if self._metrics else None  # TTFT counts tokenization and queueing
        try:
            engine_request = build_request(request, engine)
        except InvalidRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        stream = self._add_request(engine, engine_request, context)
        call = _Call(engine, engine_request.request_id, stream, timer)
        if not context.add_callback(call.cancel):
            call.cancel()  # the RPC already ended between add_request and here
            return
        while True:
            out = self._next_output(engine, call, context)
            if out is None:
                return
            if call.timer is not None:
                call.timer.on_tokens(len(out.new_token_ids))
            if out.finish_reason is None:
                yield to_response(out)
                continue
            call.finish(out.finish_reason)  # before the last yield: the done-callback must not abort
            if out.error is None:
                yield to_response(out)
                return
            if out.new_token_ids or out.text:  # what was streamed before the fault, then the error status
                yield to_response(dataclasses.replace(out, finish_reason=None))
            context.abort(STATUS_OF[out.error.code], out.error.message)

    @staticmethod
    def _next_output(engine, call: _Call, context) -> RequestOutput | None:
        """The stream's next output; None when the client went away (its request is aborted)."""
        while True:
            try:
                return call.stream.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not context.is_active():
                    call.cancel()
                    return None
                if engine.failure is not None and call.finish(FinishReason.ABORT):  # a dead engine that did not
                    context.abort(grpc.StatusCode.UNAVAILABLE,                      # end this stream itself
                                  f"the engine stopped after a fault ({engine.failure})")

    def _add_request(self, engine, engine_request: Request, context):
        """engine.add_request, mapping its errors to status codes."""
        try:
            return engine.add_request(engine_request)
        except QueueFullError:
            limit = engine.config.max_waiting_requests
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the waiting queue is full (--max-waiting-requests={limit}); retry later")
        except DuplicateRequestError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"request_id={engine_request.request_id!r} is already in flight; use a unique id")
        except EngineUnavailableError as e:  # shut down, draining, or dead after a fault
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except ValueError as e:  # the engine's own checks name the field
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RuntimeError:
            if not self.draining:
                raise  # an engine bug: let gRPC report UNKNOWN and log the traceback
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")


def add_to_server(servicer: EngineServicer, server: grpc.Server) -> None:
    """Registers the service like the generated `add_EngineServicer_to_server`, but with a Generate
    deserializer that rejects several inputs instead of silently keeping the last one."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=parse_generate_request,
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=pb.GetModelInfoRequest.FromString,
            response_serializer=pb.ModelInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
