"""Pin a sandbox's init process for the sandbox's whole life.

A PID number alone can be reused by an unrelated host process once the init
dies (a workload can kill its own init); tierbox would then read and write
that process's root - the host's. So the init is held by a pidfd, checked
against the start time recorded when the sandbox was made, and everything
derived from it (its root directory) is opened while the pidfd proves the
process is still the same one.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal

from tierbox.errors import SandboxDeadError


def start_time(pid: int) -> str:
    """Start time of ``pid`` in clock ticks ("" if gone): (pid, start) names a
    process uniquely."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


class PinnedProcess:
    """A pidfd on a sandbox's init. ``label`` names the sandbox in errors.

    Never raises on its own: a sandbox whose init is already gone is pinned
    as dead, so it can still be closed; ``check`` raises for everything else.
    """

    def __init__(self, pid: int, expected_start: str | None, *, label: str) -> None:
        self.pid = pid
        self.label = label
        self.start = expected_start or ""
        try:
            self.fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.fd = -1
            return
        got = start_time(pid)
        if not got or (expected_start is not None and got != expected_start):
            os.close(self.fd)  # the PID names another process now
            self.fd = -1
            return
        self.start = got

    def _dead(self) -> SandboxDeadError:
        return SandboxDeadError(
            f"sandbox {self.label} is dead: its init process (pid {self.pid}) exited; "
            "close it and create a new one"
        )

    def alive(self) -> bool:
        """True while the pinned process has not exited (a pidfd turns readable then)."""
        if self.fd < 0:
            return False
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        return not p.poll(0)

    def check(self) -> None:
        """Raise SandboxDeadError if the init has exited."""
        if not self.alive():
            raise self._dead()

    def open_root(self) -> int:
        """An O_PATH fd on the init's root directory, opened while the pidfd
        proves the PID still names our init."""
        self.check()
        try:
            fd = os.open(f"/proc/{self.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as exc:
            # exiting: its filesystem is released before the pidfd says so
            raise self._dead() from exc
        if not self.alive():  # died meanwhile: the fd may name someone else's root
            os.close(fd)
            raise self._dead()
        return fd

    def kill(self, *, timeout_s: float) -> bool:
        """SIGKILL the pinned process through its pidfd (never a process that
        reused its PID) and wait up to ``timeout_s`` for it to exit. True once
        it has exited (also when it already had)."""
        if self.fd < 0:
            return True
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.fd, signal.SIGKILL)
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        return bool(p.poll(int(timeout_s * 1000)))

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
