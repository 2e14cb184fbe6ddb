"""Background commands: ``sb.run(cmd, background=True)``.

A :class:`CommandHandle` hands its command's pump to this process's reactor
(:mod:`tierbox.runloop`) and returns at once; the command runs on while the
caller goes on, streaming to its callbacks. Its output is also kept in the
sandbox's directory (``logs/N.out``, ``logs/N.err``; capped like every
output) so ``tierbox sandbox logs ID -f`` can follow it from another process.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from tierbox.errors import WaitTimeoutError
from tierbox.runloop import reactor
from tierbox.spec import ExecResult
from tierbox.tiers.commands import Command

_numbers = itertools.count(1)


class _Tee:
    """A callback that also appends what it gets to a log file."""

    def __init__(self, path: Path, then: Callable[[bytes], object] | None) -> None:
        self.file: BinaryIO | None = open(path, "ab", buffering=0)  # noqa: SIM115 - closed at the end
        self.then = then

    def __call__(self, chunk: bytes) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):  # a full disk must not stop the command
                self.file.write(chunk)
        if self.then is not None:
            self.then(chunk)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class CommandHandle:
    """A command running in the background of a sandbox."""

    def __init__(self, command: Command, argv: list[str], tees: list[_Tee]) -> None:
        self._command = command
        self.argv = argv
        self._tees = tees
        self._done = threading.Event()
        reactor().submit(command.pump(), self._finished)

    @classmethod
    def start(
        cls,
        start: Callable[..., Command],
        argv: list[str],
        log_dir: Path | None,
        *,
        on_stdout: Callable[[bytes], object] | None,
        on_stderr: Callable[[bytes], object] | None,
        **kwargs: object,
    ) -> CommandHandle:
        """Start ``argv`` through ``start`` (an instance's ``start``), its
        output teed into ``log_dir`` when given."""
        tees: list[_Tee] = []
        if log_dir is not None:
            log_dir.mkdir(exist_ok=True)
            n = next(_numbers)
            stem = f"{os.getpid()}-{n}"
            (log_dir / f"{stem}.cmd").write_text(" ".join(argv) + "\n")
            tees = [
                _Tee(log_dir / f"{stem}.out", on_stdout),
                _Tee(log_dir / f"{stem}.err", on_stderr),
            ]
            on_stdout, on_stderr = tees[0], tees[1]
        try:
            command = start(argv, on_stdout=on_stdout, on_stderr=on_stderr, **kwargs)
        except BaseException:
            for t in tees:
                t.close()
            raise
        return cls(command, argv, tees)

    def _finished(self) -> None:
        for t in self._tees:
            t.close()
        self._done.set()

    @property
    def pid(self) -> int | None:
        """Its pid inside the sandbox (None where the tier has no processes)."""
        return self._command.pid

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: float | None = None) -> ExecResult:
        """Wait for the end (at most ``timeout_s``) and give the result;
        WaitTimeoutError if it is still running then (it keeps running)."""
        if not self._done.wait(timeout_s):
            raise WaitTimeoutError(
                f"{self.argv[0]!r} is still running after {timeout_s} s: wait longer or kill() it"
            )
        return self._command.result()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL by default); wait() then gives how it ended."""
        self._command.kill(sig)

    def send_stdin(self, data: bytes | str) -> None:
        self._command.send_stdin(data.encode() if isinstance(data, str) else data)
        reactor().wake()

    def close_stdin(self) -> None:
        self._command.close_stdin()
        reactor().wake()

    def resize(self, rows: int, cols: int) -> None:
        self._command.resize(rows, cols)

    def __repr__(self) -> str:
        state = "done" if self.done else "running"
        return f"<CommandHandle pid={self.pid} {state} {' '.join(self.argv)[:60]!r}>"
