"""A command run by the guest agent (microvm and vm tiers), as the contract's
:class:`~tierbox.tiers.commands.Command`.

Its pump (:class:`~tierbox.vmm.agent.GuestExec`) waits on a descriptor of
its own that the agent line's reader writes, so ``exec`` waits on the
caller's thread, the reactor moves background commands and ``adrive``
awaits it on an event loop, none with a thread per command; the line stays
free for other commands, files and stats meanwhile.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from tierbox.errors import SandboxError
from tierbox.runloop import Pump, drive
from tierbox.spec import ExecResult
from tierbox.tiers.commands import Command
from tierbox.vmm.agent import ExecOutcome, GuestExec


class GuestCommand(Command):
    """``finish`` turns what the agent reported (a thunk: its refusal, a line
    that ended or a guest that stopped answering raise) into the tier's
    ExecResult."""

    def __init__(
        self,
        gexec: GuestExec,
        finish: Callable[[Callable[[], ExecOutcome]], ExecResult],
    ) -> None:
        self._gexec = gexec
        self._finish = finish
        self._result: ExecResult | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """Its pid in the guest."""
        return self._gexec.pid

    def wait_here(self) -> ExecResult:
        drive(self._gexec)
        return self.result()

    def pump(self) -> Pump:
        return self._gexec

    def result(self) -> ExecResult:
        with self._lock:
            if self._result is None:
                if not self._gexec.done:
                    raise SandboxError("the command is still running")
                self._result = self._finish(self._gexec.outcome)
                self._gexec.release()
            return self._result

    def send_stdin(self, data: bytes) -> None:
        self._gexec.send_stdin(data)

    def close_stdin(self) -> None:
        self._gexec.close_stdin()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self._gexec.kill(sig)

    def resize(self, rows: int, cols: int) -> None:
        self._gexec.resize(rows, cols)
