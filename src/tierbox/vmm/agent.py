"""Host side of the guest agent protocol (guest side: ``tierbox/guest/agent.c``).

The agent listens on a virtio-serial port that QEMU exposes on the host as a
unix socket. Every frame, both ways, is::

    u32 magic "TBX1" | u32 type | u32 id | u32 len | payload[len]   (little endian)

Requests (host -> guest), each answered with frames carrying the same id:

============  ==================================================  =========================
type          payload                                             answer
============  ==================================================  =========================
HELLO    1    a nonce                                             OK: ``key=value`` lines + nonce
EXEC     2    8 x u32 (timeout_ms, output_cap, pids_max, uid,     STDOUT/STDERR chunks, then
              gid, flags, argc, envc), then NUL-terminated        EXIT: ``key=value`` lines
              workdir, argv..., env ``K=V``...                    (or ERR when it cannot start)
STDIN    3    a chunk of the running exec's stdin; empty = EOF    -
PUT      4    u32 mode, uid, gid, path; then DATA_IN chunks,      OK or ERR
              an empty one ends the file
GET      5    u64 max_bytes, u32 uid, gid, path                   DATA chunks, then OK
                                                                  ``size=N`` (or ERR)
STATS    6    -                                                   OK: ``key=value`` lines
SYNC     7    u64 realtime ns, random bytes                       OK (clock set, RNG reseeded)
LIST     8    u64 max_bytes, u32 uid, gid, path                   DATA chunks of records
                                                                  (u8 kind, u64 size, name
                                                                  NUL), then OK ``entries=N``
POWEROFF 9    -                                                   OK, then the guest powers off
KILL    10    - (id of the running exec or stream)                the exec ends with
                                                                  reason=killed; a stream
                                                                  ends with ERR ECANCELED
============  ==================================================  =========================

ERR payloads are ``u32 code`` + a message; the code is an errno value, or
``E_NOTREG`` (0x10000) for "not a regular file". Payloads are at most 1 MiB.

Files (protocol 2, ``agent=2`` in HELLO): PUT, GET and LIST run in the guest
with the workload's file-system uid/gid and resolve paths inside the
workload's root. GET opens non-blocking and refuses FIFOs, devices, sockets,
directories and /proc or /sys files (E_NOTREG), refuses a file whose size is
over ``max_bytes`` (EFBIG) and never sends more than ``max_bytes`` bytes (a
file that grows while read ends in EFBIG too); ``max_bytes`` 2**64-1 means
no cap. LIST reports each entry's kind (lstat: a symlink is a symlink) and
size. The host bounds what it keeps by the same cap, whatever the guest
sends, and ends a stream it gives up on with KILL; the agent checks for it
(or any new request) between chunks and stops.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import itertools
import os
import secrets
import selectors
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierbox.errors import (
    AgentError,
    AgentGoneError,
    AgentTimeoutError,
    AgentTooOldError,
    FileTooLargeError,
    NotRegularFileError,
    SandboxError,
    SandboxFileError,
)
from tierbox.spec import FileEntry, FileKind, SandboxSpec, parse_user

MAGIC = 0x31584254
HEADER = struct.Struct("<IIII")
MAX_FRAME = 1 << 20
CHUNK = 256 * 1024

T_HELLO, T_EXEC, T_STDIN, T_PUT, T_GET, T_STATS, T_SYNC, T_LIST, T_POWEROFF, T_KILL, T_DATA_IN = (
    range(1, 12)
)
T_OK, T_ERR, T_STDOUT, T_STDERR, T_EXIT, T_DATA = range(101, 107)
F_STDIN = 1
#: ERR code for "not a regular file" (beyond errno values; the message says what it is)
E_NOTREG = 0x10000
#: GET/LIST ``max_bytes`` meaning no cap
NO_CAP = (1 << 64) - 1
#: The protocol the file requests need (the agent's ``agent=`` in HELLO).
FILES_PROTOCOL = 2
#: A directory listing may hold this many bytes of records (name + 9 each).
LIST_MAX_BYTES = 16 << 20
#: How long the host waits for a stream it gave up on to end.
CANCEL_TIMEOUT_S = 10.0
_KINDS = {1: FileKind.FILE, 2: FileKind.DIR, 3: FileKind.SYMLINK}
_RECORD = struct.Struct("<BQ")


def parse_kv(payload: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in payload.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key in out:  # repeated keys (kmsg) accumulate
            out[key] += "\n" + value
        else:
            out[key] = value
    return out


class Cancel:
    """Another thread's request to kill a running exec: a flag plus a pipe the
    exec loop watches, so the request is seen at once."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._set = False

    def set(self) -> None:
        self._set = True
        with contextlib.suppress(OSError):
            os.write(self._w, b"x")

    def is_set(self) -> bool:
        return self._set

    def fileno(self) -> int:
        return self._r

    def close(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class ExecOutcome:
    """What the agent reported about one exec."""

    stdout: bytes
    stderr: bytes
    fields: dict[str, str] = field(default_factory=dict)
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_s: float = 0.0


class AgentClient:
    """A connection to the guest agent's socket. Not thread-safe: callers lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._ids = itertools.count(secrets.randbelow(1 << 30) + 1)
        #: the agent's protocol version, from its HELLO (None: not asked yet)
        self.version: int | None = None

    # ---- connection ---------------------------------------------------------
    def connect(self, *, deadline: float, alive: Callable[[], bool]) -> None:
        """Connect to QEMU's end of the port, retrying until it exists."""
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if not alive():
                    raise AgentGoneError("QEMU exited before its agent socket appeared") from exc
                if time.monotonic() > deadline:
                    raise AgentTimeoutError(f"agent socket {self.path} did not appear") from exc
                time.sleep(0.002)
        self._sock = sock
        self._buf.clear()
        self.version = None  # a reconnect may reach another agent (a reverted VM)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # ---- frames ---------------------------------------------------------------
    def _send(self, ftype: int, fid: int, payload: bytes = b"") -> None:
        if self._sock is None:
            raise AgentGoneError("the agent connection is closed")
        try:
            self._sock.sendall(HEADER.pack(MAGIC, ftype, fid, len(payload)) + payload)
        except OSError as exc:
            raise AgentGoneError(f"lost the agent connection: {exc}") from exc

    def _frame_from_buf(self) -> tuple[int, int, bytes] | None:
        while len(self._buf) >= HEADER.size:
            magic, ftype, fid, length = HEADER.unpack_from(self._buf)
            if magic != MAGIC or length > MAX_FRAME:
                # not at a frame boundary (stale bytes after a restore): resync
                idx = self._buf.find(struct.pack("<I", MAGIC), 1)
                del self._buf[: idx if idx > 0 else len(self._buf) - 3]
                continue
            if len(self._buf) < HEADER.size + length:
                return None
            payload = bytes(self._buf[HEADER.size : HEADER.size + length])
            del self._buf[: HEADER.size + length]
            return ftype, fid, payload
        return None

    def _recv_into_buf(self, deadline: float | None) -> None:
        assert self._sock is not None
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise AgentTimeoutError("the guest agent did not answer in time")
        self._sock.settimeout(left)
        try:
            chunk = self._sock.recv(1 << 20)
        except TimeoutError as exc:
            raise AgentTimeoutError("the guest agent did not answer in time") from exc
        except OSError as exc:
            raise AgentGoneError(f"lost the agent connection: {exc}") from exc
        if not chunk:
            raise AgentGoneError("the agent connection closed (QEMU exited)")
        self._buf += chunk

    def _recv(self, deadline: float | None) -> tuple[int, int, bytes]:
        while True:
            frame = self._frame_from_buf()
            if frame is not None:
                return frame
            self._recv_into_buf(deadline)

    def _reply(self, fid: int, deadline: float | None) -> tuple[int, bytes]:
        """The next answer frame for request ``fid`` (others are stale: dropped)."""
        while True:
            ftype, rid, payload = self._recv(deadline)
            if rid != fid:
                continue
            if ftype == T_ERR:
                err = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else 0
                raise AgentError(err, payload[4:].decode(errors="replace"))
            return ftype, payload

    # ---- requests -----------------------------------------------------------------
    def hello(self, *, deadline: float) -> dict[str, str]:
        """Resynchronise and identify the agent; drops anything stale on the line."""
        nonce = secrets.token_hex(8).encode()
        fid = next(self._ids)
        self._send(T_HELLO, fid, nonce)
        while True:
            ftype, payload = self._reply(fid, deadline)
            info = parse_kv(payload)
            if ftype == T_OK and info.get("nonce") == nonce.decode():
                agent = info.get("agent", "")
                self.version = int(agent) if agent.isdigit() else 0
                return info

    def _require_files(self, deadline: float) -> None:
        """File requests need protocol 2; an older agent would misread them."""
        if self.version is None:
            self.hello(deadline=deadline)
        if (self.version or 0) < FILES_PROTOCOL:
            raise AgentTooOldError(
                f"the guest agent speaks protocol {self.version}; file access needs "
                f"{FILES_PROTOCOL}: this guest was made by an older tierbox (a snapshot "
                "or VM from before an upgrade): create a new one"
            )

    def sync(self, *, deadline: float, realtime_ns: int | None = None) -> None:
        """Set the guest clock to ours and mix fresh host randomness into its RNG."""
        ns = time.time_ns() if realtime_ns is None else realtime_ns
        fid = next(self._ids)
        self._send(T_SYNC, fid, struct.pack("<Q", ns) + os.urandom(64))
        self._reply(fid, deadline)

    def stats(self, *, deadline: float) -> dict[str, str]:
        fid = next(self._ids)
        self._send(T_STATS, fid)
        return parse_kv(self._reply(fid, deadline)[1])

    def entries(
        self,
        path: str,
        *,
        uid: int,
        gid: int,
        idle_timeout_s: float,
        max_bytes: int = LIST_MAX_BYTES,
    ) -> list[FileEntry]:
        """Entries of a guest directory with kind and size (symlinks not followed)."""
        records = bytearray()
        self._stream(T_LIST, path, uid, gid, max_bytes, records.extend, idle_timeout_s)
        out: list[FileEntry] = []
        off = 0
        while off + _RECORD.size < len(records):
            kind, size = _RECORD.unpack_from(records, off)
            end = records.find(b"\0", off + _RECORD.size)
            if end < 0:
                break
            name = bytes(records[off + _RECORD.size : end]).decode(errors="surrogateescape")
            out.append(FileEntry(name, _KINDS.get(kind, FileKind.OTHER), size))
            off = end + 1
        return out

    def put(
        self, path: str, data: bytes, *, mode: int, uid: int, gid: int, deadline: float
    ) -> None:
        self._require_files(deadline)
        fid = next(self._ids)
        self._send(T_PUT, fid, struct.pack("<III", mode, uid, gid) + path.encode() + b"\0")
        view = memoryview(data)
        for off in range(0, len(data), CHUNK):
            self._send(T_DATA_IN, fid, bytes(view[off : off + CHUNK]))
        self._send(T_DATA_IN, fid, b"")
        self._reply(fid, deadline)

    def get(self, path: str, *, uid: int, gid: int, max_bytes: int, idle_timeout_s: float) -> bytes:
        """A regular file's bytes, at most ``max_bytes`` of them (AgentError
        EFBIG beyond, E_NOTREG for anything but a regular file)."""
        chunks: list[bytes] = []
        self._stream(T_GET, path, uid, gid, max_bytes, chunks.append, idle_timeout_s)
        return b"".join(chunks)

    def copy_out(
        self,
        path: str,
        sink: Callable[[bytes], object],
        *,
        uid: int,
        gid: int,
        max_bytes: int | None,
        idle_timeout_s: float,
    ) -> int:
        """Stream a regular file into ``sink`` chunk by chunk (at most 1 MiB
        held at a time); returns the byte count. ``max_bytes`` None: no cap."""
        return self._stream(T_GET, path, uid, gid, max_bytes, sink, idle_timeout_s)

    def _stream(
        self,
        ftype: int,
        path: str,
        uid: int,
        gid: int,
        max_bytes: int | None,
        sink: Callable[[bytes], object],
        idle_timeout_s: float,
    ) -> int:
        """One GET or LIST: DATA frames into ``sink`` until OK or ERR.

        Each frame must come within ``idle_timeout_s`` of the previous. The
        host keeps to ``max_bytes`` whatever the guest sends; when it stops
        early (over the cap, ``sink`` failed) it sends KILL and drains the
        stream, so the line stays usable and the agent stops sending.
        """
        self._require_files(time.monotonic() + idle_timeout_s)
        cap = NO_CAP if max_bytes is None else min(max_bytes, NO_CAP - 1)
        fid = next(self._ids)
        self._send(ftype, fid, struct.pack("<QII", cap, uid, gid) + path.encode() + b"\0")
        total = 0
        ended = False
        deadline = time.monotonic() + idle_timeout_s
        try:
            while True:
                rtype, rid, payload = self._recv(deadline)
                if rid != fid:
                    continue  # stale frames of an earlier request: they do not count as progress
                deadline = time.monotonic() + idle_timeout_s
                if rtype == T_ERR:
                    ended = True
                    err = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else 0
                    raise AgentError(err, payload[4:].decode(errors="replace"))
                if rtype == T_OK:
                    ended = True
                    return total
                if rtype != T_DATA:
                    continue
                total += len(payload)
                if total > cap:
                    raise AgentError(
                        errno_mod.EFBIG,
                        f"the guest sent more than the max_bytes cap of {cap} bytes",
                    )
                sink(payload)
        except (AgentGoneError, AgentTimeoutError):
            raise
        except Exception:  # re-raised: a refusal or a broken sink ends the stream early
            if not ended:
                self._cancel(fid)
            raise
        except BaseException:  # Ctrl-C: no time to drain; the line is dropped
            if not ended:
                self.close()
            raise

    def _cancel(self, fid: int) -> None:
        """End stream ``fid`` early: KILL, then drop its frames until its last
        one. A guest that does not stop in time loses the connection."""
        deadline = time.monotonic() + CANCEL_TIMEOUT_S
        try:
            self._send(T_KILL, fid)
            while True:
                rtype, rid, _ = self._recv(deadline)
                if rid == fid and rtype in (T_OK, T_ERR):
                    return
        except (AgentGoneError, AgentTimeoutError):
            self.close()

    def poweroff(self, *, deadline: float) -> None:
        fid = next(self._ids)
        self._send(T_POWEROFF, fid)
        self._reply(fid, deadline)

    def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        workdir: str,
        uid: int,
        gid: int,
        stdin: bytes | None,
        timeout_s: float | None,
        output_bytes: int,
        pids_max: int | None,
        host_deadline: float | None,
        on_stdout: Callable[[bytes], object] | None = None,
        on_stderr: Callable[[bytes], object] | None = None,
        cancel: Cancel | None = None,
    ) -> ExecOutcome:
        """Run a command; returns when the agent reports its end.
        ``on_stdout``/``on_stderr`` get each chunk as its frame arrives (what is
        kept, up to the cap); ``cancel`` lets another thread kill the command.

        ``timeout_s`` is enforced by the agent inside the guest. ``host_deadline``
        (monotonic) is the host's own limit for a guest that stopped answering:
        past it a KILL is sent, and AgentTimeoutError raised 2 s later.
        """
        if self._sock is None:
            raise AgentGoneError("the agent connection is closed")
        fid = next(self._ids)
        head = struct.pack(
            "<8I",
            int(timeout_s * 1000) if timeout_s else 0,
            min(output_bytes, 0xFFFFFFFF),
            pids_max or 0,
            uid,
            gid,
            F_STDIN if stdin is not None else 0,
            len(argv),
            len(env),
        )
        strings = [workdir, *argv, *(f"{k}={v}" for k, v in env.items())]
        body = head + b"".join(s.encode(errors="surrogateescape") + b"\0" for s in strings)
        if len(body) > MAX_FRAME:
            raise SandboxError("command line and environment exceed 1 MiB")
        out = bytearray(HEADER.pack(MAGIC, T_EXEC, fid, len(body)) + body)
        if stdin is not None:
            view = memoryview(stdin)
            for off in range(0, len(stdin), CHUNK):
                piece = bytes(view[off : off + CHUNK])
                out += HEADER.pack(MAGIC, T_STDIN, fid, len(piece)) + piece
            out += HEADER.pack(MAGIC, T_STDIN, fid, 0)
        pending = memoryview(bytes(out))
        stdout, stderr = bytearray(), bytearray()
        trunc = [False, False]
        started = time.monotonic()
        sock = self._sock
        sel = selectors.DefaultSelector()
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        if cancel is not None:
            sel.register(cancel.fileno(), selectors.EVENT_READ)
        killed_at: float | None = None
        cancel_sent = False
        try:
            while True:
                frame = self._frame_from_buf()
                if frame is not None:
                    ftype, rid, payload = frame
                    if rid != fid:
                        continue
                    if ftype in (T_STDOUT, T_STDERR):
                        k = 0 if ftype == T_STDOUT else 1
                        buf = stdout if k == 0 else stderr
                        room = output_bytes - len(buf)
                        if len(payload) > room:
                            trunc[k] = True
                        kept = payload[: max(room, 0)]
                        buf += kept
                        sink = on_stdout if k == 0 else on_stderr
                        if sink is not None and kept:
                            sink(kept)
                        continue
                    if ftype in (T_ERR, T_EXIT):
                        # finish the frames in flight (unread stdin): the agent
                        # drops them, but a half-sent frame would desync the line
                        sock.setblocking(True)
                        sock.settimeout(5.0)
                        try:
                            sock.sendall(pending)
                        except OSError as exc:
                            raise AgentGoneError(f"lost the agent connection: {exc}") from exc
                    if ftype == T_ERR:
                        err = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else 0
                        raise AgentError(err, payload[4:].decode(errors="replace"))
                    if ftype == T_EXIT:
                        fields = parse_kv(payload)
                        return ExecOutcome(
                            stdout=bytes(stdout),
                            stderr=bytes(stderr),
                            fields=fields,
                            stdout_truncated=trunc[0] or fields.get("stdout_truncated") == "1",
                            stderr_truncated=trunc[1] or fields.get("stderr_truncated") == "1",
                            duration_s=time.monotonic() - started,
                        )
                    continue
                now = time.monotonic()
                if killed_at is not None and now > killed_at + 2.0:
                    raise AgentTimeoutError(
                        "the guest agent stopped answering (no result "
                        f"{now - started:.1f} s after the command started)"
                    )
                if host_deadline is not None and killed_at is None and now > host_deadline:
                    killed_at = now
                    kill = HEADER.pack(MAGIC, T_KILL, fid, 0)
                    pending = memoryview(bytes(pending) + kill)
                if cancel is not None and cancel.is_set() and not cancel_sent:
                    cancel_sent = True  # the caller killed it: the agent ends it (reason=killed)
                    pending = memoryview(bytes(pending) + HEADER.pack(MAGIC, T_KILL, fid, 0))
                wait = None
                if host_deadline is not None:
                    wait = max(0.0, (killed_at + 2.0 if killed_at else host_deadline) - now)
                sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0))
                for key, mask in sel.select(wait):
                    if cancel is not None and key.fd == cancel.fileno():
                        continue  # noticed above, on the next round
                    if mask & selectors.EVENT_WRITE and pending:
                        try:
                            n = sock.send(pending)
                        except BlockingIOError:
                            n = 0
                        except OSError as exc:
                            raise AgentGoneError(f"lost the agent connection: {exc}") from exc
                        pending = pending[n:]
                    if mask & selectors.EVENT_READ:
                        try:
                            chunk = sock.recv(1 << 20)
                        except BlockingIOError:
                            continue
                        except OSError as exc:
                            raise AgentGoneError(f"lost the agent connection: {exc}") from exc
                        if not chunk:
                            raise AgentGoneError("the agent connection closed (QEMU exited)")
                        self._buf += chunk
        finally:
            sel.close()
            if self._sock is not None:
                self._sock.setblocking(True)
                self._sock.settimeout(None)


@dataclass(frozen=True)
class GuestConfig:
    """How workloads run inside the guest."""

    uid: int
    gid: int
    env: dict[str, str]
    workdir: str

    def to_dict(self) -> dict[str, Any]:
        return {"uid": self.uid, "gid": self.gid, "env": self.env, "workdir": self.workdir}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuestConfig:
        return cls(int(d["uid"]), int(d["gid"]), dict(d["env"]), str(d["workdir"]))


def run_in_guest(
    agent: AgentClient,
    guest: GuestConfig,
    spec: SandboxSpec,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None,
    stdin: bytes | None,
    timeout_s: float | None,
    host_deadline: float | None,
    where: str,
    cwd: str | None = None,
    user: str | None = None,
    on_stdout: Callable[[bytes], object] | None = None,
    on_stderr: Callable[[bytes], object] | None = None,
    cancel: Cancel | None = None,
) -> ExecOutcome:
    """One exec through the guest agent with the sandbox's settings (microvm
    and vm tiers), ``cwd``/``user`` overriding them for this command; the
    agent's own refusals become SandboxErrors."""
    uid, gid = parse_user(user) or (guest.uid, guest.gid)
    try:
        return agent.exec(
            list(argv),
            env={**guest.env, **(env or {})},
            workdir=cwd or guest.workdir,
            uid=uid,
            gid=gid,
            stdin=stdin,
            timeout_s=timeout_s,
            output_bytes=spec.limits.output_bytes,
            pids_max=spec.limits.pids,
            host_deadline=host_deadline,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            cancel=cancel,
        )
    except AgentError as exc:
        # A program the guest cannot run is a result, as on every tier: 127
        # (not found) or 126 (not executable) and one line on stderr.
        if exc.errno == errno_mod.ENOENT and exc.message.startswith("command not found"):
            return _not_runnable(argv[0], 127, "command not found")
        if exc.errno in (errno_mod.EACCES, errno_mod.ENOEXEC, errno_mod.EISDIR):
            return _not_runnable(argv[0], 126, os.strerror(exc.errno))
        raise SandboxError(f"cannot run {argv[0]!r} in {where}: {exc}") from exc


def _not_runnable(program: str, code: int, why: str) -> ExecOutcome:
    return ExecOutcome(
        stdout=b"",
        stderr=f"tierbox: {program}: {why}\n".encode(),
        fields={"reason": "exited", "exit_code": str(code)},
    )


def file_error(exc: AgentError, verb: str, path: str, where: str) -> SandboxFileError:
    """A guest agent's refusal of a file request, as the files API reports it
    on every tier (NotRegularFileError, FileTooLargeError, SandboxFileError)."""
    if exc.errno == E_NOTREG:
        return NotRegularFileError(
            f"cannot {verb} {path} in {where}: {exc.message}, not a regular file", path=path
        )
    if exc.errno == errno_mod.EFBIG and verb == "read":
        return FileTooLargeError(
            f"cannot {verb} {path} in {where}: {exc.message}: pass a larger max_bytes "
            "or use download",
            path=path,
        )
    if exc.errno == errno_mod.EFBIG and verb == "list":
        return FileTooLargeError(f"cannot {verb} {path} in {where}: {exc.message}", path=path)
    hint = ""
    if exc.errno == errno_mod.ELOOP:
        hint = ": too many symlinks, or a symlink where tierbox does not follow one"
    elif exc.errno == errno_mod.EROFS:
        hint = ": that part of the guest's file system is read-only"
    return SandboxFileError(f"cannot {verb} {path} in {where}: {exc.message}{hint}", path=path)
