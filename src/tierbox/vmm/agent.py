"""Host side of the guest agent protocol (guest side: ``tierbox/guest/agent.c``).

The agent listens on a virtio-serial port that QEMU exposes on the host as a
unix socket. Every frame, both ways, is::

    u32 magic "TBX1" | u32 type | u32 id | u32 len | payload[len]   (little endian)

Requests (host -> guest), each answered with frames carrying the same id:

============  ==================================================  =========================
type          payload                                             answer
============  ==================================================  =========================
HELLO    1    a nonce                                             OK: ``key=value`` lines + nonce
EXEC     2    8 x u32 (timeout_ms, output_cap, pids_max, uid,     STARTED (u32 guest pid),
              gid, flags, argc, envc), then NUL-terminated        STDOUT/STDERR chunks, ACKs,
              workdir, argv..., env ``K=V``...; flags: 1 stdin    then EXIT: ``key=value``
              from STDIN frames (else /dev/null), 2 on a pty      lines (ERR: cannot start)
STDIN    3    a chunk of a running command's stdin, at any time   ACK (u32 bytes taken)
              after its EXEC; empty = end of input (on a pty:
              its EOF character)
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
KILL    10    [u32 signal (default SIGKILL), u32 flags]; the id   a command: the signal goes
              of a running command or stream; flag 1: the host    to its guest cgroup (flag 1:
              gave up waiting                                     killed, reason=killed); a
                                                                  stream ends with ERR ECANCELED
RESIZE  12    u32 rows, u32 cols of a pty command                 -
PROCS   13    u32 max_bytes                                       OK: u32 count, u32 truncated,
                                                                  records (u32 pid, ppid, uid,
                                                                  u8 state, u32 len, cmdline)
SESSION 14    - (the first frame on every connection)             - (commands of earlier
                                                                  connections lose their pipes)
NET     15    u32 address, u32 prefix length, u32 gateway         OK ``ifname=NAME`` (ERR
              (IPv4, network byte order) for the guest's NIC      ENODEV: no NIC)
============  ==================================================  =========================

ERR payloads are ``u32 code`` + a message; the code is an errno value, or
``E_NOTREG`` (0x10000) for "not a regular file". Payloads are at most 1 MiB.

Protocol 3 (``agent=3`` in HELLO) runs everything side by side: any number
of commands, each known by its id, with file transfers, stats and process
listings between them; one reader per connection (:mod:`tierbox.vmm.line`)
hands each frame to whoever waits for its id. Every connection starts with
SESSION: the agent then closes the pipes of the commands earlier
connections started (their processes run on) and drops what it had queued
for them; frames for ids a host does not know are dropped by the host. A command's stdin is
credited: at most :data:`STDIN_WINDOW` bytes are in flight, and the agent's
ACKs return credit as it writes them to the command. The host refuses an
older agent (:class:`~tierbox.errors.AgentTooOldError`) for anything but
HELLO, SYNC, STATS and POWEROFF.

Files: PUT, GET and LIST run in the guest with the workload's file-system
uid/gid and resolve paths inside the workload's root. GET opens
non-blocking and refuses FIFOs, devices, sockets, directories and /proc or
/sys files (E_NOTREG), refuses a file whose size is over ``max_bytes``
(EFBIG) and never sends more than ``max_bytes`` bytes (a file that grows
while read ends in EFBIG too); ``max_bytes`` 2**64-1 means no cap. LIST
reports each entry's kind (lstat: a symlink is a symlink) and size. The
host bounds what it keeps by the same cap, whatever the guest sends, and
ends a stream it gives up on with KILL.

The guest is hostile: a guest root can take the agent's port over and speak
in its place. Every frame is checked against what its request can receive
(a reply: OK or ERR; a stream: DATA, then OK or ERR; a command: STARTED
once, output, ACKs for bytes in flight, then EXIT or ERR) and every field
against its range (EXIT: ``exit_code`` 0-255, ``signal`` 1-64, a known
``reason``, whole numbers; ERR: an errno or E_NOTREG; listings: known kinds
and sizes below 2**63). A violation ends the line with
:class:`~tierbox.errors.AgentProtocolError` for every request on it, and the
tiers treat the agent as dead (the VM is stopped). Every wait has a
deadline; a command with none is watched for liveness: after
:data:`LIVENESS_S` of silence from the guest the host asks for STATS, and
no frame within :data:`LIVENESS_ANSWER_S` ends the command with
AgentTimeoutError.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import ipaddress
import itertools
import os
import secrets
import signal
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierbox.errors import (
    AgentError,
    AgentGoneError,
    AgentProtocolError,
    AgentTimeoutError,
    AgentTooOldError,
    FileTooLargeError,
    NotRegularFileError,
    NotSupportedError,
    SandboxError,
    SandboxFileError,
    UsageError,
)
from tierbox.runloop import READ, Pump
from tierbox.spec import FileEntry, FileKind, ProcessInfo, SandboxSpec, parse_user
from tierbox.vmm.line import BACKLOG_HIGH, MAX_FRAME, AgentLine, frame

CHUNK = 256 * 1024

T_HELLO, T_EXEC, T_STDIN, T_PUT, T_GET, T_STATS, T_SYNC, T_LIST, T_POWEROFF, T_KILL = range(1, 11)
T_DATA_IN, T_RESIZE, T_PROCS, T_SESSION, T_NET = 11, 12, 13, 14, 15
T_OK, T_ERR, T_STDOUT, T_STDERR, T_EXIT, T_DATA, T_ACK, T_STARTED = range(101, 109)
F_STDIN, F_TTY = 1, 2
#: KILL flag: the host gave up waiting for the command (it ends reason=killed)
KILL_DEADLINE = 1
#: ERR code for "not a regular file" (beyond errno values; the message says what it is)
E_NOTREG = 0x10000
#: GET/LIST ``max_bytes`` meaning no cap
NO_CAP = (1 << 64) - 1
#: The protocol this host speaks (the agent's ``agent=`` in HELLO).
PROTOCOL = 3
#: A directory listing may hold this many bytes of records (name + 9 each).
LIST_MAX_BYTES = 16 << 20
#: A process listing may hold this many bytes (it travels in one frame).
PROCS_MAX_BYTES = MAX_FRAME - 64
#: Stdin bytes a command may have in flight before the agent acknowledges them.
STDIN_WINDOW = 1 << 20
#: How long a command may take to answer a KILL sent at its host deadline.
KILL_ANSWER_S = 2.0
#: How long ``pid`` waits for a command to start.
PID_WAIT_S = 10.0
#: A command without a host deadline: silence from the guest this long and
#: the host asks for STATS ...
LIVENESS_S = 30.0
#: ... and gives up on the agent when nothing comes within this long.
LIVENESS_ANSWER_S = 30.0
#: The highest pid a Linux guest can hand out (PID_MAX_LIMIT).
PID_MAX = 1 << 22
#: EXIT ``reason`` values the agent sends.
EXIT_REASONS = frozenset({"exited", "timeout", "output_limit", "killed"})
#: EXIT fields that are whole numbers (-1: the guest could not read it).
_EXIT_NUMBERS = frozenset(
    {
        "duration_ms", "memory_peak_bytes", "cgroup_oom_kill", "pids_max_hit", "pids_max",
        "oom_kill_before", "oom_kill_after", "mem_total_kib",
    }
)  # fmt: skip
_KINDS = {1: FileKind.FILE, 2: FileKind.DIR, 3: FileKind.SYMLINK}
_RECORD = struct.Struct("<BQ")
_PROC = struct.Struct("<IIIBI")


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


def agent_error(payload: bytes) -> AgentError:
    """An ERR payload as AgentError (its code checked by :func:`check_err`)."""
    err = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else 0
    return AgentError(err, payload[4:1028].decode(errors="replace"))


def violation(what: str) -> AgentProtocolError:
    """The error for a guest that broke the protocol (the agent counts as dead)."""
    return AgentProtocolError(
        f"the guest agent broke the protocol ({what}): it is treated as dead, since a "
        "guest root may be answering in its place"
    )


def check_err(payload: bytes) -> None:
    """An ERR carries a u32 errno value (below 4096) or E_NOTREG, then text."""
    if len(payload) < 4:
        raise violation(f"an ERR frame of {len(payload)} bytes")
    code = struct.unpack_from("<I", payload)[0]
    if not (code < 4096 or code == E_NOTREG):
        raise violation(f"ERR code {code}")


def _whole(text: str | None) -> int | None:
    """A decimal whole number as the agent prints it, or None."""
    if text is None:
        return None
    digits = text[1:] if text.startswith("-") else text
    if not digits.isascii() or not digits.isdigit() or len(digits) > 19:
        return None
    return int(text)


def _in(text: str | None, low: int, high: int) -> bool:
    n = _whole(text)
    return n is not None and low <= n <= high


def check_exit(fields: Mapping[str, str]) -> None:
    """EXIT fields within their ranges: ``exit_code`` 0-255, ``signal`` 1-64
    (never both), a known ``reason``, whole numbers from -1 up."""
    code = fields.get("exit_code")
    sig = fields.get("signal")
    if code is not None and sig is not None:
        raise violation("EXIT with both exit_code and signal")
    if code is not None and not _in(code, 0, 255):
        raise violation(f"EXIT exit_code={code[:40]!r}")
    if sig is not None and not _in(sig, 1, 64):
        raise violation(f"EXIT signal={sig[:40]!r}")
    reason = fields.get("reason", "exited")
    if reason not in EXIT_REASONS:
        raise violation(f"EXIT reason={reason[:40]!r}")
    for key in sorted(_EXIT_NUMBERS & fields.keys()):
        if not _in(fields[key], -1, (1 << 63) - 1):
            raise violation(f"EXIT {key}={fields[key][:40]!r}")
    for key in ("stdout_truncated", "stderr_truncated"):
        if fields.get(key, "0") not in ("0", "1"):
            raise violation(f"EXIT {key}={fields[key][:40]!r}")


@dataclass
class ExecOutcome:
    """What the agent reported about one exec."""

    stdout: bytes
    stderr: bytes
    fields: dict[str, str] = field(default_factory=dict)
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_s: float = 0.0


def _own_oom_evidence(fields: dict[str, str]) -> dict[str, str]:
    """The guest-wide OOM counter also counts other commands' OOMs: where the
    command's own cgroup counter exists, it alone is its evidence."""
    own = fields.get("cgroup_oom_kill", "")
    if own.isdigit() and "oom_kill_after" in fields:
        fields = {**fields, "oom_kill_before": fields["oom_kill_after"]}
    return fields


class _Answer:
    """The frames of one request, for a caller that blocks on them: a reply
    (its last frame, OK or ERR) or a stream (DATA frames until OK or ERR)."""

    def __init__(self, line: AgentLine, *, stream: bool) -> None:
        self._line = line
        self._stream = stream
        self._cond = threading.Condition()
        self._items: deque[tuple[int, bytes]] = deque()
        self._bytes = 0
        self._gone: SandboxError | None = None

    def frame(self, ftype: int, payload: bytes) -> bool:
        last = ftype in (T_OK, T_ERR)
        if not last and not (self._stream and ftype == T_DATA):
            raise violation(f"frame type {ftype} for a {'stream' if self._stream else 'request'}")
        if ftype == T_ERR:
            check_err(payload)
        if last or (self._stream and ftype == T_DATA):
            with self._cond:
                self._items.append((ftype, payload))
                self._bytes += len(payload)
                self._cond.notify()
        return last

    def gone(self, exc: SandboxError) -> None:
        with self._cond:
            self._gone = exc
            self._cond.notify()

    def backlog(self) -> int:
        return self._bytes

    def take(self, deadline: float) -> tuple[int, bytes]:
        with self._cond:
            while not self._items:
                if self._gone is not None:
                    raise self._gone
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AgentTimeoutError("the guest agent did not answer in time")
                self._cond.wait(left)
            ftype, payload = self._items.popleft()
            behind = self._bytes > BACKLOG_HIGH
            self._bytes -= len(payload)
        if behind:
            self._line.wake()  # the line held its reads for us
        return ftype, payload


class AgentClient:
    """The host's connection to one guest agent. Thread-safe: requests and
    commands from any number of threads share the line side by side."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._line: AgentLine | None = None
        self._lock = threading.Lock()  # held briefly, never across a wait
        self._hello_lock = threading.Lock()
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
        with self._lock:
            if self._line is not None:
                self._line.close()
            self._line = AgentLine(sock)
            # the agent tells connections apart by this alone: the guest may
            # see a host's first frames before it sees the previous one leave
            self._line.send(frame(T_SESSION, 0))
            self.version = None  # a reconnect may reach another agent (a reverted VM)

    def close(self, reason: str = "the agent connection was closed") -> None:
        """Drop the line (never blocks): requests and commands still on it
        end with AgentGoneError(``reason``)."""
        with self._lock:
            if self._line is not None:
                self._line.close(reason)
                self._line = None

    @property
    def connected(self) -> bool:
        line = self._line
        return line is not None and line.open

    def line(self) -> AgentLine:
        line = self._line
        if line is None or not line.open:
            raise AgentGoneError("the agent connection is closed")
        return line

    def _broken(self, exc: AgentProtocolError) -> AgentProtocolError:
        """End the line with ``exc`` (found on the caller's side) and return it."""
        with self._lock:
            if self._line is not None:
                self._line.fail(exc)
        return exc

    def _next_id(self) -> int:
        return next(self._ids) & 0xFFFFFFFF

    # ---- requests -----------------------------------------------------------------
    def _request(self, ftype: int, payload: bytes, deadline: float) -> bytes:
        """One request and its OK payload (ERR raises AgentError)."""
        line = self.line()
        fid = self._next_id()
        answer = _Answer(line, stream=False)
        line.register(fid, answer)
        try:
            line.send(frame(ftype, fid, payload))
            rtype, data = answer.take(deadline)
        finally:
            line.unregister(fid)
        if rtype == T_ERR:
            raise agent_error(data)
        return data

    def hello(self, *, deadline: float) -> dict[str, str]:
        """Identify the agent (its protocol version, kernel)."""
        nonce = secrets.token_hex(8)
        info = parse_kv(self._request(T_HELLO, nonce.encode(), deadline))
        if info.get("nonce") != nonce:
            raise AgentError(errno_mod.EPROTO, "the guest agent answered HELLO with another nonce")
        agent = info.get("agent", "")
        self.version = int(agent) if agent.isdigit() and len(agent) < 6 else 0
        return info

    def _require(self, deadline: float) -> None:
        """Refuse an agent older than this host's protocol: it would misread
        commands and transfers that run side by side."""
        with self._hello_lock:
            if self.version is None:
                self.hello(deadline=deadline)
        if (self.version or 0) < PROTOCOL:
            raise AgentTooOldError(
                f"the guest agent speaks protocol {self.version}; this tierbox needs "
                f"{PROTOCOL} (commands side by side, terminals, process listings): this guest "
                "was made by an older tierbox (a snapshot or VM from before an upgrade): "
                "create a new one"
            )

    def sync(self, *, deadline: float, realtime_ns: int | None = None) -> None:
        """Set the guest clock to ours and mix fresh host randomness into its RNG."""
        ns = time.time_ns() if realtime_ns is None else realtime_ns
        self._request(T_SYNC, struct.pack("<Q", ns) + os.urandom(64), deadline)

    def stats(self, *, deadline: float) -> dict[str, str]:
        return parse_kv(self._request(T_STATS, b"", deadline))

    def net(self, address: str, gateway: str, *, deadline: float) -> dict[str, str]:
        """Give the guest's NIC ``address`` (``10.0.0.2/30``) and a default
        route through ``gateway``, replacing what it had (a restored clone)."""
        iface = ipaddress.IPv4Interface(address)
        payload = (
            iface.ip.packed
            + struct.pack("<I", iface.network.prefixlen)
            + ipaddress.IPv4Address(gateway).packed
        )
        return parse_kv(self._request(T_NET, payload, deadline))

    def poweroff(self, *, deadline: float) -> None:
        self._request(T_POWEROFF, b"", deadline)

    def processes(self, *, deadline: float) -> list[ProcessInfo]:
        """What runs in the guest (kernel threads and the agent left out),
        read from its /proc; at most :data:`PROCS_MAX_BYTES` of records."""
        self._require(deadline)
        data = self._request(T_PROCS, struct.pack("<I", PROCS_MAX_BYTES), deadline)
        try:
            return parse_processes(data)
        except AgentProtocolError as exc:
            raise self._broken(exc) from None

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
        while off < len(records):
            if off + _RECORD.size >= len(records):
                raise self._broken(violation("a short LIST record"))
            kind, size = _RECORD.unpack_from(records, off)
            end = records.find(b"\0", off + _RECORD.size)
            if end < 0 or kind > 8 or size >= 1 << 63:
                raise self._broken(violation(f"a LIST record of kind {kind}, size {size}"))
            name = bytes(records[off + _RECORD.size : end]).decode(errors="surrogateescape")
            out.append(FileEntry(name, _KINDS.get(kind, FileKind.OTHER), size))
            off = end + 1
        return out

    def put(
        self, path: str, data: bytes, *, mode: int, uid: int, gid: int, deadline: float
    ) -> None:
        self._require(deadline)
        line = self.line()
        fid = self._next_id()
        answer = _Answer(line, stream=False)
        line.register(fid, answer)
        ended = False
        try:
            head = struct.pack("<III", mode, uid, gid) + path.encode() + b"\0"
            line.send(frame(T_PUT, fid, head))
            view = memoryview(data)
            for off in range(0, len(data), CHUNK):
                line.send(frame(T_DATA_IN, fid, bytes(view[off : off + CHUNK])), deadline=deadline)
            line.send(frame(T_DATA_IN, fid, b""))
            rtype, reply = answer.take(deadline)
            ended = True
            if rtype == T_ERR:
                raise agent_error(reply)
        except BaseException:
            if not ended:
                with contextlib.suppress(AgentGoneError):
                    line.send(frame(T_KILL, fid))  # the agent drops the half-written upload
            raise
        finally:
            line.unregister(fid)

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
        """Stream a regular file into ``sink`` chunk by chunk (the line holds
        its reads while the sink is behind); returns the byte count.
        ``max_bytes`` None: no cap."""
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
        early (over the cap, ``sink`` failed, interrupted) it sends KILL and
        forgets the stream: later frames of it are dropped by the line.
        """
        self._require(time.monotonic() + idle_timeout_s)
        cap = NO_CAP if max_bytes is None else min(max_bytes, NO_CAP - 1)
        line = self.line()
        fid = self._next_id()
        answer = _Answer(line, stream=True)
        line.register(fid, answer)
        ended = False
        total = 0
        try:
            line.send(frame(ftype, fid, struct.pack("<QII", cap, uid, gid) + path.encode() + b"\0"))
            while True:
                rtype, payload = answer.take(time.monotonic() + idle_timeout_s)
                if rtype == T_ERR:
                    ended = True
                    raise agent_error(payload)
                if rtype == T_OK:
                    ended = True
                    return total
                total += len(payload)
                if total > cap:
                    raise AgentError(
                        errno_mod.EFBIG,
                        f"the guest sent more than the max_bytes cap of {cap} bytes",
                    )
                sink(payload)
        except BaseException:
            if not ended:
                with contextlib.suppress(AgentGoneError):
                    line.send(frame(T_KILL, fid))
            raise
        finally:
            line.unregister(fid)

    # ---- commands ---------------------------------------------------------------------
    def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        workdir: str,
        uid: int,
        gid: int,
        stdin: bytes | None,
        keep_stdin_open: bool,
        tty: bool,
        timeout_s: float | None,
        output_bytes: int,
        pids_max: int | None,
        host_deadline: float | None,
        on_stdout: Callable[[bytes], object] | None = None,
        on_stderr: Callable[[bytes], object] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> GuestExec:
        """Start a command and return it running (see :class:`GuestExec`).

        ``timeout_s`` is enforced by the agent inside the guest. ``host_deadline``
        (monotonic) is the host's own limit for a guest that stopped answering:
        past it a KILL is sent, and AgentTimeoutError raised 2 s later.
        ``on_end`` runs once when the command is over (in the guest, or as far
        as the host is concerned), on whichever thread learns it: it must be
        quick and must not block.
        """
        if host_deadline is not None:
            self._require(min(host_deadline, time.monotonic() + 30.0))
        else:
            self._require(time.monotonic() + 30.0)
        flags = (F_STDIN if stdin is not None or keep_stdin_open else 0) | (F_TTY if tty else 0)
        head = struct.pack(
            "<8I",
            min(int(timeout_s * 1000), 0xFFFFFFFF) if timeout_s else 0,
            min(output_bytes, 0xFFFFFFFF),
            pids_max or 0,
            uid,
            gid,
            flags,
            len(argv),
            len(env),
        )
        strings = [workdir, *argv, *(f"{k}={v}" for k, v in env.items())]
        body = head + b"".join(s.encode(errors="surrogateescape") + b"\0" for s in strings)
        if len(body) > MAX_FRAME:
            raise SandboxError("command line and environment exceed 1 MiB")
        line = self.line()
        fid = self._next_id()
        cmd = GuestExec(
            line,
            fid,
            output_bytes=output_bytes,
            host_deadline=host_deadline,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            on_end=on_end,
            tty=tty,
            stdin=stdin,
            stdin_open=flags & F_STDIN != 0 or tty,
            keep_stdin_open=keep_stdin_open or tty,
        )
        line.register(fid, cmd)
        try:
            line.send(frame(T_EXEC, fid, body))
        except BaseException:
            line.unregister(fid)
            cmd.forget()
            raise
        cmd.feed()
        return cmd


def parse_processes(data: bytes) -> list[ProcessInfo]:
    """PROCS records, read within their bounds (AgentProtocolError for a
    record that overruns the frame or a pid no Linux hands out)."""
    out: list[ProcessInfo] = []
    if len(data) < 8:
        raise violation(f"a PROCS answer of {len(data)} bytes")
    count = struct.unpack_from("<I", data)[0]
    off = 8
    while len(out) < count:
        if off + _PROC.size > len(data):
            raise violation("a short PROCS record")
        pid, ppid, uid, state, n = _PROC.unpack_from(data, off)
        off += _PROC.size
        if n > len(data) - off or not 0 < pid <= PID_MAX or ppid > PID_MAX:
            raise violation(f"a PROCS record of pid {pid}, ppid {ppid}, length {n}")
        raw = data[off : off + n]
        off += n
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        out.append(ProcessInfo(pid=pid, ppid=ppid, user=str(uid), argv=argv, state=chr(state)))
    return sorted(out, key=lambda p: p.pid)


_GONE = -1  # an event: the line ended


class _Probe:
    """The answer to a liveness STATS: only its arrival counts (the line
    notes it), so it is dropped."""

    def frame(self, ftype: int, payload: bytes) -> bool:
        return ftype in (T_OK, T_ERR)

    def gone(self, exc: SandboxError) -> None:
        pass

    def backlog(self) -> int:
        return 0


class GuestExec(Pump):
    """One command in the guest, as a :class:`~tierbox.runloop.Pump` that
    waits on a descriptor of its own (an eventfd the line's I/O thread
    writes when a frame for it arrives): ``drive``, ``adrive`` and the
    reactor wait on it with no thread of their own.

    Output is kept up to ``output_bytes`` per stream (what is over it is
    dropped on arrival, so a flooding guest costs nothing) and given to
    ``on_stdout``/``on_stderr`` on the driving thread. ``send_stdin``,
    ``close_stdin``, ``kill`` and ``resize`` work from any thread.
    """

    def __init__(
        self,
        line: AgentLine,
        fid: int,
        *,
        output_bytes: int,
        host_deadline: float | None,
        on_stdout: Callable[[bytes], object] | None,
        on_stderr: Callable[[bytes], object] | None,
        on_end: Callable[[], None] | None,
        tty: bool,
        stdin: bytes | None,
        stdin_open: bool,
        keep_stdin_open: bool,
    ) -> None:
        self.line = line
        self.fid = fid
        self.tty = tty
        self._cap = output_bytes
        self._host_deadline = host_deadline
        self._sinks = (on_stdout, on_stderr)
        self._on_end = on_end
        self._lock = threading.Lock()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._events: deque[tuple[int, Any]] = deque()
        self._kept = [0, 0]
        self._trunc = [False, False]
        self._out = (bytearray(), bytearray())
        self._pid: int | None = None
        self._started = threading.Event()
        self._ended = False  # on_end ran
        # stdin: what waits for credit, what is in flight, whether it ends
        self._stdin_open = stdin_open
        self._pending = bytearray(stdin or b"")
        self._in_flight = 0
        self._closing = not keep_stdin_open
        self._eof_sent = not stdin_open
        # the end
        self._done = False
        self._outcome: ExecOutcome | None = None
        self._error: BaseException | None = None
        self._kill_sent_at: float | None = None
        self._probe_at: float | None = None  # liveness: when STATS was asked
        self._t0 = time.monotonic()

    # ---- the line's side (I/O thread): quick, never blocks ---------------------------
    def frame(self, ftype: int, payload: bytes) -> bool:
        """Take one frame of this command; AgentProtocolError for a frame or
        field a command cannot have (the line then ends for everyone)."""
        if ftype in (T_STDOUT, T_STDERR):
            k = 0 if ftype == T_STDOUT else 1
            with self._lock:
                room = self._cap - self._kept[k]
                if len(payload) > room:
                    self._trunc[k] = True
                    payload = payload[: max(room, 0)]
                if payload:
                    self._kept[k] += len(payload)
                    self._events.append((ftype, payload))
                    self._wake_locked()
            return False
        if ftype == T_ACK:
            taken = struct.unpack_from("<I", payload)[0] if len(payload) == 4 else -1
            with self._lock:
                if not 0 <= taken <= self._in_flight:
                    raise violation(f"ACK of {taken} stdin bytes, {self._in_flight} in flight")
                self._in_flight -= taken
            self.feed()
            return False
        if ftype == T_STARTED:
            pid = struct.unpack_from("<I", payload)[0] if len(payload) == 4 else 0
            if self._pid is not None or not 0 < pid <= PID_MAX:
                raise violation(f"STARTED pid {pid} (known pid: {self._pid})")
            self._pid = pid
            self._started.set()
            return False
        if ftype in (T_EXIT, T_ERR):
            if ftype == T_EXIT:
                check_exit(parse_kv(payload))
            else:
                check_err(payload)
            with self._lock:
                self._events.append((ftype, payload))
                self._wake_locked()
            self._end()
            return True
        raise violation(f"frame type {ftype} for a command")

    def gone(self, exc: SandboxError) -> None:
        with self._lock:
            self._events.append((_GONE, exc))
            self._wake_locked()
        self._end()

    def backlog(self) -> int:
        return 0  # bounded by the output cap, whoever drives it

    def _wake_locked(self) -> None:
        if self._efd >= 0:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(self._efd, 1)

    def _end(self) -> None:
        """Over, as far as the guest or the line goes: run ``on_end`` once."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        self._started.set()
        if self._on_end is not None:
            self._on_end()

    def forget(self) -> None:
        """The command never reached the line (its start failed)."""
        self._finish(None, AgentGoneError("the command was not sent"))
        self._end()

    # ---- stdin, signals, terminal (any thread) -----------------------------------------
    def feed(self) -> None:
        """Send what stdin holds, as far as the credit goes."""
        with self._lock:
            if not self._stdin_open or self._done:
                return
            out = []
            while self._pending and self._in_flight < STDIN_WINDOW:
                n = min(len(self._pending), STDIN_WINDOW - self._in_flight, CHUNK)
                out.append(frame(T_STDIN, self.fid, bytes(self._pending[:n])))
                del self._pending[:n]
                self._in_flight += n
            if not self._pending and self._closing and not self._eof_sent:
                out.append(frame(T_STDIN, self.fid, b""))
                self._eof_sent = True
            if out:
                with contextlib.suppress(AgentGoneError):  # the end shows on the pump
                    self.line.send(b"".join(out))

    def send_stdin(self, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise UsageError(f"stdin data must be bytes, not {type(data).__name__}")
        with self._lock:
            if not self._stdin_open or self._closing:
                raise SandboxError(
                    "this command's stdin is closed (start it with keep_stdin_open=True "
                    "to send it input later)"
                )
            self._pending += data
        self.feed()

    def close_stdin(self) -> None:
        with self._lock:
            if not self._stdin_open:
                raise SandboxError("this command's stdin is not open (keep_stdin_open=True)")
            self._closing = True
        self.feed()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """``sig`` to every process of the command (its guest cgroup)."""
        sig = int(sig)
        if not 0 < sig < 65:
            raise UsageError(f"sig={sig} is not a signal number")
        if not self._done and not self._ended:
            with contextlib.suppress(AgentGoneError):
                self.line.send(frame(T_KILL, self.fid, struct.pack("<II", sig, 0)))

    def resize(self, rows: int, cols: int) -> None:
        if not self.tty:
            raise NotSupportedError("this command has no terminal: start it with tty=True")
        for name, v in (("rows", rows), ("cols", cols)):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 65536:
                raise UsageError(f"{name}={v!r} must be a whole number from 1 to 65535")
        if not self._done and not self._ended:
            with contextlib.suppress(AgentGoneError):
                self.line.send(frame(T_RESIZE, self.fid, struct.pack("<II", rows, cols)))

    @property
    def pid(self) -> int | None:
        """The command's pid in the guest (waits briefly for it to start)."""
        if self._pid is None and not self._done:
            self._started.wait(PID_WAIT_S)
        return self._pid

    # ---- Pump (the driving thread) -------------------------------------------------------
    def interests(self) -> dict[int, int]:
        return {} if self._done or self._efd < 0 else {self._efd: READ}

    def ready(self, fd: int, events: int) -> None:
        if fd == self._efd:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._efd)
            self._consume()

    def _consume(self) -> None:
        while not self._done:
            with self._lock:
                if not self._events:
                    return
                ftype, item = self._events.popleft()
            if ftype in (T_STDOUT, T_STDERR):
                k = 0 if ftype == T_STDOUT else 1
                self._out[k].extend(item)
                sink = self._sinks[k]
                if sink is not None:
                    sink(item)
            elif ftype == T_EXIT:
                fields = _own_oom_evidence(parse_kv(item))
                self._finish(
                    ExecOutcome(
                        stdout=bytes(self._out[0]),
                        stderr=bytes(self._out[1]),
                        fields=fields,
                        stdout_truncated=self._trunc[0] or fields.get("stdout_truncated") == "1",
                        stderr_truncated=self._trunc[1] or fields.get("stderr_truncated") == "1",
                        duration_s=time.monotonic() - self._t0,
                    ),
                    None,
                )
            elif ftype == T_ERR:
                self._finish(None, agent_error(item))
            else:
                self._finish(None, item)

    def deadline(self) -> float | None:
        if self._done:
            return None
        if self._kill_sent_at is not None:
            return self._kill_sent_at + KILL_ANSWER_S
        if self._host_deadline is not None:
            return self._host_deadline
        return self._liveness_due()

    def _liveness_due(self) -> float:
        """With no host deadline: when to ask the guest for a sign of life,
        or, having asked, when to give up on it."""
        if self._probe_at is not None and self.line.last_rx_s > self._probe_at:
            self._probe_at = None  # it spoke since
        if self._probe_at is None:
            return self.line.last_rx_s + LIVENESS_S
        return self._probe_at + LIVENESS_ANSWER_S

    def _check_liveness(self, now: float) -> None:
        """A command with no deadline still ends when the agent goes silent:
        STATS after :data:`LIVENESS_S` of silence, AgentTimeoutError when
        not even that is answered."""
        due = self._liveness_due()
        if now < due:
            return
        if self._probe_at is None:
            self._probe_at = now
            probe = (self.fid ^ 0x80000000) or 1
            with contextlib.suppress(AgentGoneError):
                self.line.register(probe, _Probe())
                self.line.send(frame(T_STATS, probe))
            return
        silent_s = now - self.line.last_rx_s
        self._finish(
            None,
            AgentTimeoutError(
                f"the guest agent stopped answering: nothing from it for {silent_s:.0f} s "
                "while a command without a timeout ran, not even an answer to STATS"
            ),
        )
        self.line.unregister(self.fid)
        self._end()

    def tick(self) -> None:
        self._consume()
        if self._done:
            return
        now = time.monotonic()
        if self._kill_sent_at is not None:
            if now >= self._kill_sent_at + KILL_ANSWER_S:
                self._finish(
                    None,
                    AgentTimeoutError(
                        "the guest agent stopped answering (no result "
                        f"{now - self._t0:.1f} s after the command started)"
                    ),
                )
                self.line.unregister(self.fid)
                self._end()
        elif self._host_deadline is not None and now >= self._host_deadline:
            self._kill_sent_at = now
            with contextlib.suppress(AgentGoneError):
                self.line.send(frame(T_KILL, self.fid, struct.pack("<II", 9, KILL_DEADLINE)))
        elif self._host_deadline is None:
            self._check_liveness(now)

    def abort(self) -> None:
        """The caller was interrupted: kill the command, do not wait for it."""
        if self._done:
            return
        with contextlib.suppress(AgentGoneError):
            self.line.send(frame(T_KILL, self.fid, struct.pack("<II", 9, 0)))
        self.line.unregister(self.fid)
        self._finish(
            ExecOutcome(
                stdout=bytes(self._out[0]),
                stderr=bytes(self._out[1]),
                fields={"signal": "9", "reason": "exited"},
                stdout_truncated=self._trunc[0],
                stderr_truncated=self._trunc[1],
                duration_s=time.monotonic() - self._t0,
            ),
            None,
        )
        self._end()

    @property
    def done(self) -> bool:
        return self._done

    def _finish(self, outcome: ExecOutcome | None, error: BaseException | None) -> None:
        with self._lock:
            self._outcome = outcome
            self._error = error
            self._done = True
            self._pending.clear()

    def release(self) -> None:
        """Close the descriptor once no driver watches it any more (closing it
        under a driver could let another file reuse its number there)."""
        with self._lock:
            if self._efd >= 0 and self._done:
                os.close(self._efd)
                self._efd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if self._efd >= 0:
                os.close(self._efd)

    def outcome(self) -> ExecOutcome:
        """What the agent reported (its refusal, a line that ended and a
        guest that stopped answering raise)."""
        if not self._done:
            raise SandboxError("the command is still running")
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome


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


def start_in_guest(
    agent: AgentClient,
    guest: GuestConfig,
    spec: SandboxSpec,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None,
    stdin: bytes | None,
    timeout_s: float | None,
    host_deadline: float | None,
    cwd: str | None = None,
    user: str | None = None,
    on_stdout: Callable[[bytes], object] | None = None,
    on_stderr: Callable[[bytes], object] | None = None,
    keep_stdin_open: bool = False,
    tty: bool = False,
    on_end: Callable[[], None] | None = None,
) -> GuestExec:
    """One command through the guest agent with the sandbox's settings
    (microvm and vm tiers), ``cwd``/``user`` overriding them for this
    command. On a terminal, TERM defaults to ``xterm``."""
    uid, gid = parse_user(user) or (guest.uid, guest.gid)
    full_env = {**guest.env, **(env or {})}
    if tty:
        full_env.setdefault("TERM", "xterm")
    return agent.start(
        list(argv),
        env=full_env,
        workdir=cwd or guest.workdir,
        uid=uid,
        gid=gid,
        stdin=stdin,
        keep_stdin_open=keep_stdin_open,
        tty=tty,
        timeout_s=timeout_s,
        output_bytes=spec.limits.output_bytes,
        pids_max=spec.limits.pids,
        host_deadline=host_deadline,
        on_stdout=on_stdout,
        on_stderr=on_stderr,
        on_end=on_end,
    )


def refused_outcome(exc: AgentError, program: str, where: str) -> ExecOutcome:
    """The agent's refusal to start a command, as a result where every tier
    gives one: 127 (not found) or 126 (not executable) and one line on
    stderr; any other refusal raises SandboxError."""
    if exc.errno == errno_mod.ENOENT and exc.message.startswith("command not found"):
        return _not_runnable(program, 127, "command not found")
    if exc.errno in (errno_mod.EACCES, errno_mod.ENOEXEC, errno_mod.EISDIR):
        return _not_runnable(program, 126, os.strerror(exc.errno))
    raise SandboxError(f"cannot run {program!r} in {where}: {exc}") from exc


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
