"""Pseudo-terminals for commands on the host tiers (process, container, gVisor).

A ``tty=True`` command gets the slave end of a pty as its stdin, stdout,
stderr and controlling terminal; tierbox keeps the master. The terminal's
line discipline in the kernel (or gVisor's Sentry) does what a terminal does:
a ``\\x03`` written to the master interrupts the foreground process group,
TIOCSWINSZ on the master resizes it and sends SIGWINCH.

- process tier: :func:`open_pty` here, the slave handed to the child, which
  makes it its controlling terminal (:func:`make_controlling`).
- OCI runtimes: ``crun exec --tty`` and ``runsc exec`` with ``terminal: true``
  create the pty themselves and send its master over the unix socket given as
  ``--console-socket`` (SCM_RIGHTS); :class:`ConsoleSocket` receives it.

:class:`PtyPump` is the :class:`~tierbox.runloop.Pump` over the master: what
the command writes comes out as stdout (one stream, as on any terminal), what
the caller feeds goes in.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tierbox.host.capture import ORPHAN_GRACE_S, Captured, StopReason
from tierbox.runloop import READ, WRITE, Pump

#: What a terminal is until the caller says otherwise (the VT100 default).
DEFAULT_ROWS, DEFAULT_COLS = 24, 80
#: How long an OCI runtime may take to hand over the pty's master.
CONSOLE_WAIT_S = 30.0
#: Ctrl-D: the end of input on a terminal in canonical mode.
EOF_BYTE = b"\x04"


def set_size(fd: int, rows: int, cols: int) -> None:
    """Set the terminal size on a pty end; the kernel sends SIGWINCH to the
    terminal's foreground process group."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def get_size(fd: int) -> tuple[int, int] | None:
    """(rows, cols) of the terminal on ``fd``; None when it is not one."""
    try:
        rows, cols, _x, _y = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


def open_pty(rows: int = DEFAULT_ROWS, cols: int = DEFAULT_COLS) -> tuple[int, int]:
    """A new pty (master, slave), both close-on-exec, sized ``rows`` x ``cols``."""
    master, slave = os.openpty()
    set_size(master, rows, cols)
    return master, slave


def make_controlling() -> None:
    """In a child that called setsid(): its stdin (the pty's slave) becomes
    its controlling terminal, so Ctrl-C and job control reach it."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class ConsoleSocket:
    """A listening unix socket for an OCI runtime's ``--console-socket``:
    the runtime connects once and sends the pty's master with SCM_RIGHTS."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(str(path))
            os.chmod(path, 0o600)
            self._sock.listen(1)
        except BaseException:
            self.close()
            raise

    def receive(
        self, proc: subprocess.Popen[bytes], timeout_s: float = CONSOLE_WAIT_S
    ) -> int | None:
        """The master fd the runtime sends; None if ``proc`` (the runtime)
        ends first or ``timeout_s`` passes (its stderr says why)."""
        pidfd = os.pidfd_open(proc.pid)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                ready, _, _ = select.select([self._sock.fileno(), pidfd], [], [], left)
                if self._sock.fileno() in ready:
                    conn, _addr = self._sock.accept()
                    with conn:
                        conn.settimeout(max(deadline - time.monotonic(), 0.1))
                        _msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
                    for extra in fds[1:]:
                        os.close(extra)
                    if not fds:
                        return None
                    if not os.isatty(fds[0]):  # only a terminal is taken for one
                        os.close(fds[0])
                        return None
                    os.set_inheritable(fds[0], False)
                    return fds[0]
                if pidfd in ready:
                    return None
        except OSError:
            return None
        finally:
            os.close(pidfd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        self.path.unlink(missing_ok=True)


class PtyPump(Pump):
    """A host process (the workload, or the runtime that waits for it) whose
    command talks to a pty master ``master``, as a :class:`Pump`.

    ``on_output`` gets each chunk the terminal shows. What is kept for the
    result is capped at ``output_bytes``; past it, a command with a live
    ``on_output`` goes on (an interactive session is not stopped because it
    printed a lot; the surplus is shown, not kept) while one without is
    stopped with OUTPUT_LIMIT, as on pipes. The runtime's own stdout and
    stderr pipes (if any) are read as the result's stderr: its messages.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        master: int,
        *,
        stdin: bytes | None,
        timeout_s: float | None,
        output_bytes: int,
        kill: Callable[[], None],
        started: float | None = None,
        on_output: Callable[[bytes], object] | None = None,
    ) -> None:
        self.proc = proc
        self.master = master
        self.started = started if started is not None else time.monotonic()
        self.timeout_deadline = self.started + timeout_s if timeout_s is not None else None
        self.output_bytes = output_bytes
        self._kill = kill
        self._on_output = on_output
        self._lock = threading.Lock()  # feed() comes from the caller's thread
        os.set_blocking(master, False)
        self.out = bytearray()
        self.err = bytearray()
        self.truncated = False
        self.master_open = True
        self.runtime_fds = {f.fileno(): f for f in (proc.stdout, proc.stderr) if f is not None}
        for fd in self.runtime_fds:
            os.set_blocking(fd, False)
        self.pending = bytearray(stdin or b"")
        self.pidfd = os.pidfd_open(proc.pid)
        self.exited_at: float | None = None
        self.stop = StopReason.NONE
        self.returncode: int | None = None
        self._finished = False

    # ---- input -----------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        with self._lock:
            if not self.master_open:
                raise BrokenPipeError("the terminal is closed")
            self.pending += data

    def close_stdin(self) -> None:
        """End of input, as a terminal says it: Ctrl-D."""
        with contextlib.suppress(BrokenPipeError):
            self.feed(EOF_BYTE)

    def resize(self, rows: int, cols: int) -> None:
        with self._lock:
            if self.master_open:
                set_size(self.master, rows, cols)

    # ---- Pump --------------------------------------------------------------------
    def interests(self) -> dict[int, int]:
        if self._finished:
            return {}
        want = {fd: READ for fd in self.runtime_fds}
        if self.pidfd >= 0 and self.exited_at is None:
            want[self.pidfd] = READ
        with self._lock:
            if self.master_open:
                want[self.master] = READ | (WRITE if self.pending else 0)
        return want

    def ready(self, fd: int, events: int) -> None:
        if fd == self.pidfd:
            self.exited_at = time.monotonic()
        elif fd == self.master:
            if events & WRITE:
                self._write_pending()
            if events & READ:
                self._read_master()
        elif fd in self.runtime_fds:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                del self.runtime_fds[fd]
                return
            self.err += chunk[: max(self.output_bytes - len(self.err), 0)]

    def _write_pending(self) -> None:
        with self._lock:
            try:
                n = os.write(self.master, self.pending[:65536])
                del self.pending[:n]
            except BlockingIOError:
                pass
            except OSError:
                self.pending.clear()

    def _read_master(self) -> None:
        try:
            chunk = os.read(self.master, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: every slave end is closed
                raise
            chunk = b""
        if not chunk:
            self._close_master()
            return
        room = self.output_bytes - len(self.out)
        if len(chunk) > room:
            self.truncated = True
            if self._on_output is None:
                chunk = chunk[: max(room, 0)]
                self.stop = StopReason.OUTPUT_LIMIT
            else:
                self.out += chunk[: max(room, 0)]
                self._on_output(chunk)
                return
        self.out += chunk
        if self._on_output is not None and chunk:
            self._on_output(chunk)

    def _close_master(self) -> None:
        with self._lock:
            if self.master_open:
                self.master_open = False
                with contextlib.suppress(OSError):
                    os.close(self.master)

    def deadline(self) -> float | None:
        if self._finished:
            return None
        dues = [d for d in (self.timeout_deadline,) if d is not None]
        if self.exited_at is not None:
            dues.append(self.exited_at + ORPHAN_GRACE_S)
        return min(dues) if dues else None

    def tick(self) -> None:
        if self._finished:
            return
        now = time.monotonic()
        if (
            self.stop is StopReason.NONE
            and self.timeout_deadline is not None
            and now >= self.timeout_deadline
        ):
            self.stop = StopReason.TIMEOUT
        if self.stop is not StopReason.NONE:
            self._kill()
            self._finish(_reap_after_kill(self.proc, self._kill))
            return
        if self.exited_at is not None and (
            not (self.master_open or self.runtime_fds) or now > self.exited_at + ORPHAN_GRACE_S
        ):
            self._finish(self.proc.wait())

    def abort(self) -> None:
        if not self._finished:
            self._kill()
            self._finish(_reap_after_kill(self.proc, self._kill))

    @property
    def done(self) -> bool:
        return self._finished

    def _finish(self, returncode: int) -> None:
        self.returncode = returncode
        self._finished = True
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
        self.pidfd = -1
        self._close_master()
        for f in self.runtime_fds.values():
            with contextlib.suppress(OSError):
                f.close()
        self.runtime_fds.clear()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def captured(self) -> Captured:
        assert self.returncode is not None, "the pump has not finished"
        return Captured(
            stdout=bytes(self.out),
            stderr=bytes(self.err),
            stdout_truncated=self.truncated,
            stderr_truncated=False,
            returncode=self.returncode,
            stop=self.stop,
            duration_s=time.monotonic() - self.started,
        )


def _reap_after_kill(proc: subprocess.Popen[bytes], kill: Callable[[], None]) -> int:
    """The workload was killed: reap ``proc``, killing it too if it lingers."""
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        kill()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        return proc.wait()
