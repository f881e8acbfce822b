"""The control channel of a multi-process server: process 0 tells its followers, over one TCP connection each,
what to launch next. Only host-side messages travel here — a step's packed inputs (a few small int32/float32
arrays), warm-up shapes, stop; every tensor the step computes moves inside XLA's own collectives.

Why a socket rather than `multihost_utils.broadcast_one_to_all` (measured in WORKSPACE.md § Several processes):
a broadcast is itself a collective, i.e. a device program that every process must enter with the same
shapes (so it needs a fixed-size header first) and that process 0 has to wait for — it costs milliseconds per
step and would serialise the async scheduling; a send into a socket buffer costs tens of µs and returns at
once. The socket also tells process 0 within milliseconds that a follower is gone (end of file), where a
collective with a dead peer may block (NCCL) — process 0 then fails loudly instead of hanging.

Wire format: each message is a 4-byte little-endian length, a 1-byte tag, then the body. Arrays travel as
(dtype code, ndim, dims, raw bytes) — never pickle, so a stray connection cannot run code. No JAX here.
"""
from __future__ import annotations

import json
import logging
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

_DTYPES = (np.dtype(np.int32), np.dtype(np.uint32), np.dtype(np.float32))


@dataclass(frozen=True)
class Hello:
    """Follower -> process 0 at start-up: who it is, and a digest of its flags (they must match)."""
    process_id: int
    fingerprint: str


@dataclass(frozen=True)
class Welcome:
    """Process 0 -> followers once every process has said hello: go on to jax.distributed.initialize."""


@dataclass(frozen=True)
class Step:
    """Launch the jitted step on these packed host arrays (engine/device/runner.py `ModelRunner.launch`)."""
    arrays: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Warmup:
    """Compile the step for these (N, R) bucket shapes, in this order (`ModelRunner.warmup`)."""
    shapes: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Stop:
    """Stop following: a clean shutdown (reason None) or a failed start-up / engine (reason says why)."""
    reason: str | None = None


_JSON_COMMANDS = {b"H": Hello, b"W": Welcome, b"U": Warmup, b"X": Stop}
_TAGS = {cls: tag for tag, cls in _JSON_COMMANDS.items()} | {Step: b"S"}


def encode(command) -> bytes:
    """One framed message for `command`."""
    tag = _TAGS[type(command)]
    if isinstance(command, Step):
        parts = [struct.pack("<I", len(command.arrays))]
        for a in command.arrays:
            a = np.ascontiguousarray(a)
            parts.append(struct.pack(f"<BB{a.ndim}I", _DTYPES.index(a.dtype), a.ndim, *a.shape))
            parts.append(a.tobytes())
        body = b"".join(parts)
    else:
        body = json.dumps(command.__dict__).encode()
    return struct.pack("<I", len(body) + 1) + tag + body


def decode(message: bytes):
    tag, body = message[:1], memoryview(message)[1:]
    if tag in _JSON_COMMANDS:
        fields = json.loads(bytes(body))
        if tag == b"U":
            fields["shapes"] = tuple(tuple(s) for s in fields["shapes"])
        return _JSON_COMMANDS[tag](**fields)
    if tag != b"S":
        raise ValueError(f"unknown control message tag {tag!r}")
    (count,), at, arrays = struct.unpack_from("<I", body), 4, []
    for _ in range(count):
        code, ndim = struct.unpack_from("<BB", body, at)
        shape = struct.unpack_from(f"<{ndim}I", body, at + 2)
        at += 2 + 4 * ndim
        dtype = _DTYPES[code]
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        arrays.append(np.frombuffer(body[at:at + size], dtype).reshape(shape))
        at += size
    return Step(tuple(arrays))


def receive(sock: socket.socket):
    """The next command on `sock`; ConnectionError when the other side has gone (end of file)."""
    (length,) = struct.unpack("<I", _read_exactly(sock, 4))
    return decode(_read_exactly(sock, length))


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the connection was closed")
        buf += chunk
    return bytes(buf)


class FollowerLostError(RuntimeError):
    """A follower process is gone: the group cannot run another step."""


class Leader:
    """Process 0's end: one connected socket per follower (process ids 1..N-1). `broadcast` sends a command to
    all of them; a watcher thread calls `on_lost(message)` once, at the first follower that disconnects."""

    def __init__(self, sockets: dict[int, socket.socket], send_timeout: float = 60.0):
        self.sockets = dict(sorted(sockets.items()))
        for sock in self.sockets.values():  # a follower alive but stuck would otherwise block process 0 for good
            sock.settimeout(send_timeout)
        self.num_processes = len(sockets) + 1
        self.lost: str | None = None
        self.on_lost: Callable[[str], None] | None = None
        self._lost_event = threading.Event()
        self._closing = False
        self._send_lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        for pid, sock in self.sockets.items():
            self._selector.register(sock, selectors.EVENT_READ, pid)
        self._watcher = threading.Thread(target=self._watch, name="follower-watch", daemon=True)
        self._watcher.start()

    def broadcast(self, command) -> None:
        message = encode(command)
        with self._send_lock:
            if self.lost is not None:
                raise FollowerLostError(self.lost)
            for pid, sock in self.sockets.items():
                try:
                    sock.sendall(message)
                except OSError as e:  # TimeoutError included: it took no step for send_timeout seconds
                    self._mark_lost(f"follower process {pid} is gone ({e.strerror or type(e).__name__})")
                    raise FollowerLostError(self.lost) from None

    def _watch(self) -> None:
        """Followers never write after their hello, so a readable socket means it closed: that process died."""
        selector = self._selector
        while not self._closing:
            try:
                events = selector.select(timeout=0.5)
            except (OSError, ValueError):  # stop() closed the sockets under us
                return
            for key, _ in events:
                if self._closing:
                    return
                try:
                    alive = bool(key.fileobj.recv(1, socket.MSG_PEEK))
                except OSError:
                    alive = False
                if not alive:
                    self._mark_lost(f"follower process {key.data} disconnected (it died or was killed)")
                    return
                selector.unregister(key.fileobj)  # unexpected bytes: ignore this socket from now on

    def wait_lost(self, timeout: float) -> str | None:
        """Which follower is gone, waiting up to `timeout` s for the watcher to see it (a collective with a
        dead peer can fail a step a moment before its socket's end of file is read)."""
        self._lost_event.wait(timeout)
        return self.lost

    def _mark_lost(self, message: str) -> None:
        if self.lost is None and not self._closing:
            self.lost = message
            self._lost_event.set()
            log.error("multi-process group broken: %s", message)
            if self.on_lost is not None:
                self.on_lost(message)

    def stop(self, reason: str | None = None) -> None:
        """Tells every follower still there to stop, then closes the channel (idempotent)."""
        if self._closing:
            return
        message = encode(Stop(reason))
        self._closing = True
        locked = self._send_lock.acquire(timeout=5.0)  # not behind a send stuck on a follower that hangs
        try:
            for sock in self.sockets.values():
                try:
                    if locked:
                        sock.sendall(message)
                except OSError:
                    pass
                sock.close()
        finally:
            if locked:
                self._send_lock.release()
