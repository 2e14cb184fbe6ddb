"""The command of a ``tty=True`` run on the host tiers: a :class:`PumpCommand`
whose pump is a :class:`~tierbox.host.pty.PtyPump`, so that it can also be
resized. Process, container and gVisor share it (see ``host/pty.py``)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from tierbox.errors import SandboxError
from tierbox.host.capture import Captured
from tierbox.host.pty import PtyPump
from tierbox.runloop import Pump, drive
from tierbox.spec import ExecResult
from tierbox.tiers.commands import Command


class PtyCommand(Command):
    """A command on a pseudo-terminal; ``finish`` turns what was captured into
    the tier's ExecResult, exactly as for a piped command."""

    def __init__(
        self,
        pty: PtyPump,
        finish: Callable[[Captured], ExecResult],
        *,
        signal_fn: Callable[[int], None],
        pid: int | None = None,
        pid_fn: Callable[[], int | None] | None = None,
    ) -> None:
        self._pty = pty
        self._finish = finish
        self._signal = signal_fn
        self._pid = pid
        self._pid_fn = pid_fn
        self._result: ExecResult | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        if self._pid is None and self._pid_fn is not None:
            self._pid = self._pid_fn()
        return self._pid

    def wait_here(self) -> ExecResult:
        drive(self._pty)
        return self.result()

    def pump(self) -> Pump:
        return self._pty

    def result(self) -> ExecResult:
        with self._lock:
            if self._result is None:
                if not self._pty.done:
                    raise SandboxError("the command is still running")
                self._result = self._finish(self._pty.captured())
            return self._result

    def send_stdin(self, data: bytes) -> None:
        self._pty.feed(data)

    def close_stdin(self) -> None:
        self._pty.close_stdin()

    def resize(self, rows: int, cols: int) -> None:
        self._pty.resize(rows, cols)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if not self._pty.done:
            self._signal(sig)
