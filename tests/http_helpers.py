"""Helpers for the HTTP front-end tests: an in-process server (gRPC + HTTP) on free ports, SSE parsing, a
raw-socket streaming client that can hang up mid-stream, and a FakeEngine whose requests die of faults."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import socket

import grpc
import httpx

from engine.core.request import ErrorCode, FinishReason, RequestError, RequestOutput
from engine.serving.engine_server import EngineServer
from engine.v1 import engine_pb2_grpc
from tests.fake_engine import FakeEngine


@dataclasses.dataclass
class Served:
    server: EngineServer
    engine: object
    url: str
    http: httpx.Client
    stub: engine_pb2_grpc.EngineStub


@contextlib.contextmanager
def serving(engine, metrics: bool = False):
    """gRPC and HTTP on free ports over `engine` (None: not attached, i.e. still loading)."""
    server = EngineServer("127.0.0.1", 0, metrics_port=0 if metrics else None, http_port=0)
    server.start()
    if engine is not None:
        server.attach(engine)
    channel = grpc.insecure_channel(server.address)
    client = httpx.Client(base_url=server.http.url, timeout=30.0)
    try:
        yield Served(server, engine, server.http.url, client, engine_pb2_grpc.EngineStub(channel))
    finally:
        client.close()
        channel.close()
        server.shutdown(timeout=0)


def sse_events(body: str) -> list:
    """The `data:` payloads of an SSE body (JSON decoded; "[DONE]" kept as is), checking the framing."""
    assert body.endswith("\n\n"), body[-80:]
    events = []
    for block in body[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def chat_text(events) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e.get("choices"))


class RawStream:
    """A streaming POST over a plain socket, read one SSE event at a time, closable at any point."""

    def __init__(self, url: str, path: str, body: dict):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        data = json.dumps(body).encode()
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        self._raw = self._body = b""
        self._head: str | None = None

    def head(self) -> str:
        """The status line and headers."""
        if self._head is None:
            while b"\r\n\r\n" not in self._raw:
                self._recv()
            head, self._raw = self._raw.split(b"\r\n\r\n", 1)
            self._head = head.decode()
        return self._head

    def next_event(self) -> str:
        """The next SSE event, e.g. 'data: {...}' (the chunked transfer encoding undone)."""
        self.head()
        while b"\n\n" not in self._body:
            self._read_chunk()
        event, self._body = self._body.split(b"\n\n", 1)
        return event.decode()

    def _read_chunk(self) -> None:
        while b"\r\n" not in self._raw:
            self._recv()
        size, rest = self._raw.split(b"\r\n", 1)
        while len(rest) < int(size, 16) + 2:
            rest += self._recv_bytes()
        self._body += rest[:int(size, 16)]
        self._raw = rest[int(size, 16) + 2:]

    def _recv(self) -> None:
        self._raw += self._recv_bytes()

    def _recv_bytes(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the stream")
        return chunk

    def close(self) -> None:
        self.sock.close()


class FaultyEngine(FakeEngine):
    """FakeEngine whose requests are killed by an engine fault (`error`) once they have `fail_after` tokens,
    as the real engine ends them: a final output with finish_reason ABORT and `error` set."""

    def __init__(self, *args, fail_after: int = 0, code: ErrorCode = ErrorCode.INTERNAL, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_after, self.error = fail_after, RequestError(code, f"injected {code.value} fault")

    def _step(self) -> None:
        for rid, seq in list(self._running.items()):
            if len(seq.output) >= self.fail_after:
                del self._running[rid]
                seq.pages = 0
                seq.stream.put(RequestOutput(rid, (), "", FinishReason.ABORT, len(seq.request.prompt_token_ids),
                                             len(seq.output), 0, error=self.error))
        super()._step()
