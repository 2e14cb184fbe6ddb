"""Wait for a child while feeding stdin and reading capped stdout/stderr.

Hand-written as a :class:`~tierbox.runloop.Pump` because
``subprocess.communicate`` buffers without bound (a workload writing 1 GB must
cost tierbox at most the cap), ``Popen.wait(timeout)`` polls with sleeps,
adding up to milliseconds to every run, and neither can be awaited by an
asyncio loop. A pidfd among the watched descriptors reports the exit at once.
"""

from __future__ import annotations

import contextlib
import enum
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tierbox.runloop import READ, WRITE, Pump, drive

#: After the main process exits, how long to keep reading output that its
#: orphans may still hold open before giving up on it.
ORPHAN_GRACE_S = 0.2


class StopReason(enum.Enum):
    NONE = "none"
    TIMEOUT = "timeout"
    OUTPUT_LIMIT = "output_limit"


@dataclass
class Captured:
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    returncode: int
    stop: StopReason
    duration_s: float


class PipePump(Pump):
    """A host process (the workload itself, or the OCI runtime that runs it)
    with its stdin, stdout and stderr pipes and a pidfd, as a :class:`Pump`.

    ``kill`` must stop the workload, not just ``proc``. ``on_stdout`` and
    ``on_stderr`` get each chunk as it is read (what is kept, up to the cap).
    ``keep_stdin_open``: a background process whose stdin is fed later
    (:meth:`feed`, :meth:`close_stdin`) instead of from ``stdin`` at once.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        *,
        stdin: bytes | None,
        timeout_s: float | None,
        output_bytes: int,
        kill: Callable[[], None],
        started: float | None = None,
        on_stdout: Callable[[bytes], object] | None = None,
        on_stderr: Callable[[bytes], object] | None = None,
        keep_stdin_open: bool = False,
    ) -> None:
        self.proc = proc
        self.started = started if started is not None else time.monotonic()
        self.timeout_deadline = self.started + timeout_s if timeout_s is not None else None
        self.output_bytes = output_bytes
        self._kill = kill
        self._lock = threading.Lock()  # feed() may come from another thread
        self.out_fd = proc.stdout.fileno() if proc.stdout is not None else -1
        self.err_fd = proc.stderr.fileno() if proc.stderr is not None else -2
        self.in_fd = proc.stdin.fileno() if proc.stdin is not None else -3
        self.bufs = {self.out_fd: bytearray(), self.err_fd: bytearray()}
        self.sinks = {self.out_fd: on_stdout, self.err_fd: on_stderr}
        self.truncated = {self.out_fd: False, self.err_fd: False}
        self.open_readers = {fd for fd in (self.out_fd, self.err_fd) if fd >= 0}
        for fd in self.open_readers:
            os.set_blocking(fd, False)
        self.pending = bytearray(stdin or b"")
        self.stdin_closing = not keep_stdin_open
        if proc.stdin is not None:
            os.set_blocking(self.in_fd, False)
            if not self.pending and self.stdin_closing:
                self._close_stdin_now()
        self.pidfd = os.pidfd_open(proc.pid)
        self.exited_at: float | None = None
        self.stop = StopReason.NONE
        self.returncode: int | None = None
        self._finished = False

    # ---- feeding a background process ---------------------------------------
    def feed(self, data: bytes) -> None:
        with self._lock:
            if self.proc.stdin is None or self.stdin_closing:
                raise BrokenPipeError("stdin is closed")
            self.pending += data

    def close_stdin(self) -> None:
        with self._lock:
            self.stdin_closing = True
            if not self.pending:
                self._close_stdin_now()

    def _close_stdin_now(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            self.in_fd = -3

    # ---- Pump -----------------------------------------------------------------
    def interests(self) -> dict[int, int]:
        if self._finished:
            return {}
        want = {fd: READ for fd in self.open_readers}
        if self.pidfd >= 0 and self.exited_at is None:
            want[self.pidfd] = READ
        with self._lock:
            if self.in_fd >= 0 and self.pending:
                want[self.in_fd] = WRITE
        return want

    def ready(self, fd: int, events: int) -> None:
        if fd == self.pidfd:
            self.exited_at = time.monotonic()
        elif fd == self.in_fd:
            with self._lock:
                try:
                    n = os.write(fd, self.pending[:65536])
                    del self.pending[:n]
                except BlockingIOError:
                    return
                except BrokenPipeError:
                    self.pending.clear()
                    self.stdin_closing = True
                if not self.pending and self.stdin_closing:
                    self._close_stdin_now()
        elif fd in self.open_readers:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self.open_readers.discard(fd)
                return
            buf = self.bufs[fd]
            room = self.output_bytes - len(buf)
            if len(chunk) > room:
                chunk = chunk[: max(room, 0)]
                self.truncated[fd] = True
                self.stop = StopReason.OUTPUT_LIMIT
            buf += chunk
            sink = self.sinks[fd]
            if sink is not None and chunk:
                sink(chunk)

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
        if self.stop is StopReason.NONE and (
            self.timeout_deadline is not None and now >= self.timeout_deadline
        ):
            self.stop = StopReason.TIMEOUT
        if self.stop is not StopReason.NONE:
            self._kill()
            self._finish(_wait_after_kill(self.proc, self._kill))
            return
        if self.exited_at is not None and (
            not self.open_readers or now > self.exited_at + ORPHAN_GRACE_S
        ):
            self._finish(self.proc.wait())

    def abort(self) -> None:
        if not self._finished:
            self._kill()
            self._finish(_wait_after_kill(self.proc, self._kill))

    @property
    def done(self) -> bool:
        return self._finished

    def _finish(self, returncode: int) -> None:
        self.returncode = returncode
        self._finished = True
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
        self.pidfd = -1
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self.open_readers.clear()
        self.in_fd = -3

    def captured(self) -> Captured:
        assert self.returncode is not None, "the pump has not finished"
        return Captured(
            stdout=bytes(self.bufs[self.out_fd]),
            stderr=bytes(self.bufs[self.err_fd]),
            stdout_truncated=self.truncated[self.out_fd],
            stderr_truncated=self.truncated[self.err_fd],
            returncode=self.returncode,
            stop=self.stop,
            duration_s=time.monotonic() - self.started,
        )


def communicate(
    proc: subprocess.Popen[bytes],
    *,
    stdin: bytes | None,
    timeout_s: float | None,
    output_bytes: int,
    kill: Callable[[], None],
    started: float | None = None,
    on_stdout: Callable[[bytes], object] | None = None,
    on_stderr: Callable[[bytes], object] | None = None,
) -> Captured:
    """Drive ``proc`` to its end on this thread (see :class:`PipePump`). If
    anything interrupts the wait (Ctrl-C, a callback that raises), the
    workload is killed and reaped first."""
    pump = PipePump(
        proc,
        stdin=stdin,
        timeout_s=timeout_s,
        output_bytes=output_bytes,
        kill=kill,
        started=started,
        on_stdout=on_stdout,
        on_stderr=on_stderr,
    )
    drive(pump)
    return pump.captured()


def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """``proc.wait(timeout_s)`` that sees the exit at once: ``Popen.wait`` with
    a timeout sleeps 1, 2, 4 ... 50 ms between checks, so a runtime that takes
    32 ms is noticed at 63 ms. Raises subprocess.TimeoutExpired as it does."""
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:  # already reaped
        return proc.wait()
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        if not p.poll(max(0, int(timeout_s * 1000))):
            raise subprocess.TimeoutExpired(proc.args, timeout_s)
    finally:
        os.close(fd)
    return proc.wait()


def _wait_after_kill(proc: subprocess.Popen[bytes], kill: Callable[[], None]) -> int:
    """The workload was killed: reap ``proc``, killing it too if it lingers."""
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        kill()
        proc.kill()
        return proc.wait()
