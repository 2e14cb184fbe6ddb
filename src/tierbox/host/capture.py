"""Wait for a child while feeding stdin and reading capped stdout/stderr.

Hand-written over ``selectors`` because ``subprocess.communicate`` buffers
without bound: a workload writing 1 GB must cost tierbox at most the cap.
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
) -> Captured:
    """Drive ``proc`` to its end. ``kill`` must stop the workload (not just ``proc``)."""
    start = started if started is not None else time.monotonic()
    deadline = start + timeout_s if timeout_s is not None else None
    out_fd = proc.stdout.fileno() if proc.stdout is not None else -1
    err_fd = proc.stderr.fileno() if proc.stderr is not None else -2
    bufs: dict[int, bytearray] = {out_fd: bytearray(), err_fd: bytearray()}
    truncated: dict[int, bool] = {out_fd: False, err_fd: False}
    sel = selectors.DefaultSelector()
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            os.set_blocking(f.fileno(), False)
            sel.register(f.fileno(), selectors.EVENT_READ)
    in_fd = proc.stdin.fileno() if proc.stdin is not None else -3
    pending = memoryview(stdin or b"")
    if proc.stdin is not None:
        if pending:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
    stop = StopReason.NONE
    try:
        while sel.get_map():
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                stop = StopReason.TIMEOUT
                break
            for key, _ in sel.select(wait):
                fd = key.fd
                if fd == in_fd and proc.stdin is not None:
                    try:
                        n = os.write(fd, pending[:65536])
                        pending = pending[n:]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    continue
                buf = bufs[fd]
                room = output_bytes - len(buf)
                if len(chunk) > room:
                    buf += chunk[: max(room, 0)]
                    truncated[fd] = True
                    stop = StopReason.OUTPUT_LIMIT
                else:
                    buf += chunk
            if stop is not StopReason.NONE:
                break
    finally:
        sel.close()
    if stop is not StopReason.NONE:
        kill()
    remaining = (
        None
        if deadline is None or stop is not StopReason.NONE
        else max(deadline - time.monotonic(), 0)
    )
    try:
        returncode = proc.wait(timeout=remaining if stop is StopReason.NONE else 10)
    except subprocess.TimeoutExpired:
        stop = StopReason.TIMEOUT
        kill()
        returncode = proc.wait()
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
