"""One connection to the guest agent, shared by every request and command on it.

Callers queue frames (:meth:`AgentLine.send`); one I/O thread per
connection writes them in order and reads what the guest sends, handing
each frame to the :class:`Receiver` registered under its id. So a
background command, a foreground exec, a file read and stats share the line
side by side, and nobody holds it for the length of a command.

The guest is hostile (SECURITY.md): nothing it sends can make the host grow
or hang. A header whose length is over :data:`MAX_FRAME` is garbage and is
skipped up to the next magic word, at most one partial frame is buffered,
frames for ids nobody waits for are dropped, a frame a receiver finds
impossible (:class:`~tierbox.errors.AgentProtocolError`) ends the line for
everyone with that error, and receivers bound what they
keep (a command's output by its cap; a stream by holding reads while its
consumer is behind, :data:`BACKLOG_HIGH`). The thread never runs caller
code: receivers queue and wake whoever waits. Waits have deadlines set by
the callers; a guest that stops reading costs at most :data:`QUEUE_HIGH`
bytes of queued frames before senders that can wait are held.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import threading
import time
from collections import deque
from typing import Protocol

from tierbox.errors import AgentGoneError, AgentProtocolError, AgentTimeoutError, SandboxError

MAGIC = 0x31584254  # "TBX1"
HEADER = struct.Struct("<IIII")
_MAGIC_BYTES = struct.pack("<I", MAGIC)
#: The largest payload of one frame, both ways.
MAX_FRAME = 1 << 20
#: Bytes read from the socket at a time.
RECV_BYTES = 256 * 1024
#: While receivers hold more unread bytes than this, the line reads no more.
BACKLOG_HIGH = 8 << 20
#: Senders that pass a deadline wait while more than this many bytes are queued.
QUEUE_HIGH = 4 << 20


def frame(ftype: int, fid: int, payload: bytes = b"") -> bytes:
    """One frame, header and payload."""
    if len(payload) > MAX_FRAME:
        raise SandboxError(f"a frame of {len(payload)} bytes is over the {MAX_FRAME}-byte limit")
    return HEADER.pack(MAGIC, ftype, fid, len(payload)) + payload


class Receiver(Protocol):
    """What the I/O thread hands the frames of one id to."""

    def frame(self, ftype: int, payload: bytes) -> bool:
        """Take one frame (quickly, without blocking); True when it was the
        last one for this id (the route is then removed). Raises
        AgentProtocolError for a frame this request cannot have."""

    def gone(self, exc: SandboxError) -> None:
        """The line ended before the last frame."""

    def backlog(self) -> int:
        """Bytes taken and not yet consumed by whoever waits."""


class AgentLine:
    """A connected socket to the agent and the thread that serves it."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._routes: dict[int, Receiver] = {}
        self._out: deque[bytes] = deque()
        self._queued = 0
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closing: str | None = None
        self._failure: SandboxError | None = None
        self._ended: SandboxError | None = None
        #: bytes held for a partial frame at most (tests check the bound)
        self.buffered = 0
        #: when the guest last sent anything (monotonic seconds): liveness
        self.last_rx_s = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="tierbox-agent-line", daemon=True)
        self._thread.start()

    # ---- callers ------------------------------------------------------------------
    @property
    def open(self) -> bool:
        """Connected, and not closed by this side."""
        return self._ended is None and self._closing is None

    @property
    def closed_by_host(self) -> str | None:
        """Why this side closed the line (None: open, or the guest's end went)."""
        return self._closing

    def register(self, fid: int, receiver: Receiver) -> None:
        with self._lock:
            if self._ended is not None:
                raise self._ended
            if self._closing is not None:
                raise self._failure or AgentGoneError(self._closing)
            self._routes[fid] = receiver

    def unregister(self, fid: int) -> None:
        with self._lock:
            self._routes.pop(fid, None)

    def send(self, data: bytes, *, deadline: float | None = None) -> None:
        """Queue frames for the guest, in order. With ``deadline``, wait while
        more than :data:`QUEUE_HIGH` bytes are queued (a big upload); without,
        never wait (the I/O thread itself sends this way)."""
        with self._lock:
            while deadline is not None and self._queued > QUEUE_HIGH and self._usable():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AgentTimeoutError("the guest agent stopped taking data")
                self._drained.wait(left)
            if self._ended is not None:
                raise self._ended
            if self._closing is not None:
                raise AgentGoneError(self._closing)
            self._out.append(data)
            self._queued += len(data)
            self._wake_locked()

    def close(self, reason: str = "the agent connection was closed") -> None:
        """End the line from this side: every receiver still registered is
        told ``reason`` (AgentGoneError). Never blocks; safe from any thread."""
        with self._lock:
            if self._closing is None and self._ended is None:
                self._closing = reason
                self._wake_locked()
                self._drained.notify_all()

    def fail(self, exc: SandboxError) -> None:
        """End the line with ``exc`` for every receiver (a guest that broke
        the protocol, found on a caller's side). Never blocks."""
        with self._lock:
            if self._closing is None and self._ended is None:
                self._failure = exc
                self._closing = str(exc)
                self._wake_locked()
                self._drained.notify_all()

    def wake(self) -> None:
        """Look again at the receivers' backlog (a consumer caught up)."""
        with self._lock:
            self._wake_locked()

    def join(self, timeout_s: float) -> None:
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _usable(self) -> bool:
        return self._ended is None and self._closing is None

    def _wake_locked(self) -> None:
        if self._wake_fd >= 0:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(self._wake_fd, 1)

    # ---- the I/O thread -------------------------------------------------------------
    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_fd, selectors.EVENT_READ)
        buf = bytearray()
        pending = memoryview(b"")
        registered = 0
        err: SandboxError = AgentGoneError("the agent connection was closed")
        try:
            while True:
                with self._lock:
                    if self._closing is not None:
                        err = self._failure or AgentGoneError(self._closing)
                        break
                    if not pending and self._out:
                        pending = memoryview(self._out.popleft())
                    routes = list(self._routes.values())
                want = selectors.EVENT_WRITE if pending else 0
                if sum(r.backlog() for r in routes) <= BACKLOG_HIGH:
                    want |= selectors.EVENT_READ
                if want != registered:
                    if registered:
                        sel.unregister(self._sock)
                    if want:
                        sel.register(self._sock, want)
                    registered = want
                for key, mask in sel.select():
                    if key.fd == self._wake_fd:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self._wake_fd)
                        continue
                    if mask & selectors.EVENT_WRITE:
                        pending = self._write(pending)
                    if mask & selectors.EVENT_READ:
                        try:
                            chunk = self._sock.recv(RECV_BYTES)
                        except BlockingIOError:
                            continue
                        if not chunk:
                            err = AgentGoneError("the agent connection closed (QEMU exited)")
                            return
                        self.last_rx_s = time.monotonic()
                        buf += chunk
                        self._dispatch(buf)
                        self.buffered = len(buf)
        except AgentProtocolError as exc:
            err = exc
        except OSError as exc:
            err = AgentGoneError(f"lost the agent connection: {exc}")
        finally:
            with self._lock:
                self._ended = err
                routes = list(self._routes.values())
                self._routes.clear()
                self._out.clear()
                self._queued = 0
                os.close(self._wake_fd)
                self._wake_fd = -1
                self._drained.notify_all()
            sel.close()
            self._sock.close()
            for r in routes:
                r.gone(err)

    def _write(self, pending: memoryview) -> memoryview:
        while True:
            if not pending:
                with self._lock:
                    if not self._out:
                        self._drained.notify_all()
                        return pending
                    pending = memoryview(self._out.popleft())
            try:
                n = self._sock.send(pending)
            except BlockingIOError:
                return pending
            pending = pending[n:]
            with self._lock:
                self._queued -= n
                if self._queued <= QUEUE_HIGH:
                    self._drained.notify_all()

    def _dispatch(self, buf: bytearray) -> None:
        """Hand every complete frame in ``buf`` to its receiver; keep the rest."""
        off, end = 0, len(buf)
        while end - off >= HEADER.size:
            magic, ftype, fid, length = HEADER.unpack_from(buf, off)
            if magic != MAGIC or length > MAX_FRAME:
                idx = buf.find(_MAGIC_BYTES, off + 1)
                off = idx if idx >= 0 else max(off + 1, end - 3)
                continue
            if end - off < HEADER.size + length:
                break
            payload = bytes(buf[off + HEADER.size : off + HEADER.size + length])
            off += HEADER.size + length
            with self._lock:
                receiver = self._routes.get(fid)
            if receiver is not None and receiver.frame(ftype, payload):
                with self._lock:
                    if self._routes.get(fid) is receiver:
                        del self._routes[fid]
        del buf[:off]
