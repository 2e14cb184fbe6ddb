"""Wait for a child while feeding stdin and reading capped stdout/stderr.

Hand-written over ``selectors`` because ``subprocess.communicate`` buffers
without bound (a workload writing 1 GB must cost tierbox at most the cap) and
``Popen.wait(timeout)`` polls with sleeps, adding up to milliseconds to every
run. A pidfd in the same selector reports the exit at once.
"""

from __future__ import annotations

import contextlib
import enum
import os
import selectors
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

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
    """Drive ``proc`` to its end. ``kill`` must stop the workload (not just
    ``proc``). ``on_stdout``/``on_stderr`` get each chunk as it is read (what
    is kept, up to the cap). If anything interrupts the wait (Ctrl-C, a
    callback that raises), the workload is killed and reaped first."""
    start = started if started is not None else time.monotonic()
    deadline = start + timeout_s if timeout_s is not None else None
    out_fd = proc.stdout.fileno() if proc.stdout is not None else -1
    err_fd = proc.stderr.fileno() if proc.stderr is not None else -2
    in_fd = proc.stdin.fileno() if proc.stdin is not None else -3
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    sinks = {out_fd: on_stdout, err_fd: on_stderr}
    truncated = {out_fd: False, err_fd: False}
    sel = selectors.DefaultSelector()
    readers = 0
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            os.set_blocking(f.fileno(), False)
            sel.register(f.fileno(), selectors.EVENT_READ)
            readers += 1
    pending = memoryview(stdin or b"")
    if proc.stdin is not None:
        if pending:
            os.set_blocking(in_fd, False)
            sel.register(in_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
    pidfd = os.pidfd_open(proc.pid)
    sel.register(pidfd, selectors.EVENT_READ)
    exited_at: float | None = None
    stop = StopReason.NONE
    try:
        while True:
            now = time.monotonic()
            if exited_at is not None and (readers == 0 or now > exited_at + ORPHAN_GRACE_S):
                break
            limits = [t for t in (deadline, exited_at and exited_at + ORPHAN_GRACE_S) if t]
            wait = min(limits) - now if limits else None
            if deadline is not None and now >= deadline:
                stop = StopReason.TIMEOUT
                break
            for key, _ in sel.select(wait):
                fd = key.fd
                if fd == pidfd:
                    sel.unregister(pidfd)
                    exited_at = time.monotonic()
                elif fd == in_fd:
                    try:
                        n = os.write(fd, pending[:65536])
                        pending = pending[n:]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(fd)
                        if proc.stdin is not None:
                            proc.stdin.close()
                else:
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(fd)
                        readers -= 1
                        continue
                    buf = bufs[fd]
                    room = output_bytes - len(buf)
                    if len(chunk) > room:
                        chunk = chunk[: max(room, 0)]
                        truncated[fd] = True
                        stop = StopReason.OUTPUT_LIMIT
                    buf += chunk
                    sink = sinks[fd]
                    if sink is not None and chunk:
                        sink(chunk)
            if stop is not StopReason.NONE:
                break
    except BaseException:
        # interrupted (Ctrl-C, a callback raised): nothing keeps running
        kill()
        _wait_after_kill(proc, kill)
        raise
    finally:
        sel.close()
        os.close(pidfd)
    if stop is not StopReason.NONE:
        kill()
    returncode = proc.wait() if exited_at is not None else _wait_after_kill(proc, kill)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
    return Captured(
        stdout=bytes(bufs[out_fd]),
        stderr=bytes(bufs[err_fd]),
        stdout_truncated=truncated[out_fd],
        stderr_truncated=truncated[err_fd],
        returncode=returncode,
        stop=stop,
        duration_s=time.monotonic() - start,
    )


def _wait_after_kill(proc: subprocess.Popen[bytes], kill: Callable[[], None]) -> int:
    """The workload was killed: reap ``proc``, killing it too if it lingers."""
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        kill()
        proc.kill()
        return proc.wait()
