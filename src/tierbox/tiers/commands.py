"""A command in a sandbox, as every tier hands it to callers.

A tier's ``_start(request)`` returns a :class:`Command`. ``exec`` waits for
it on the calling thread, a background handle gives its pump to the reactor,
``AsyncSandbox`` awaits its pump on the event loop (see :mod:`tierbox.runloop`).

- :class:`PumpCommand`: the workload runs in host processes whose pipes and
  pidfd a pump watches (process, container, gVisor): every driver waits on
  the same descriptors.
- :class:`InlineCommand`: the work is a blocking call (wasm computes in this
  process; a guest agent call): ``exec`` runs it on the calling thread, with
  no thread spent; background and async runs give it a thread of its own,
  whose end a pipe reports to the driver (:class:`ThreadPump`).
"""

from __future__ import annotations

import abc
import contextlib
import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tierbox.errors import NotSupportedError, SandboxError
from tierbox.host.capture import Captured, PipePump
from tierbox.runloop import READ, Pump, drive
from tierbox.spec import ExecResult

OutputCallback = Callable[[bytes], object]


@dataclass(frozen=True)
class ExecRequest:
    """One command, its arguments checked (see ``Instance.exec``)."""

    argv: list[str]
    stdin: bytes | None = None
    env: Mapping[str, str] | None = None
    timeout_s: float | None = None
    #: working directory inside the sandbox (None: the sandbox's)
    cwd: str | None = None
    #: ``uid[:gid]`` inside the sandbox (None: the sandbox's user)
    user: str | None = None
    on_stdout: OutputCallback | None = None
    on_stderr: OutputCallback | None = None
    #: a background command whose stdin is fed later (send_stdin/close_stdin)
    keep_stdin_open: bool = False
    #: run on a pseudo-terminal: output (both streams) arrives as stdout,
    #: input through send_stdin, size through Command.resize
    tty: bool = False
    #: no wall-clock limit unless timeout_s is given (background commands:
    #: a server runs until it ends, is killed, or the sandbox closes)
    unbounded: bool = False
    extra: dict[str, object] = field(default_factory=dict)

    def timeout(self, default_s: float | None) -> float | None:
        """The command's wall-clock limit: its own, else the sandbox's."""
        if self.timeout_s is not None:
            return self.timeout_s
        return None if self.unbounded else default_s


class Command(abc.ABC):
    """A command running (or about to run) in a sandbox."""

    @property
    def pid(self) -> int | None:
        """Its pid inside the sandbox where the tier has one, else None."""
        return None

    @abc.abstractmethod
    def wait_here(self) -> ExecResult:
        """Run to the end on the calling thread and give the result."""

    @abc.abstractmethod
    def pump(self) -> Pump:
        """The pump a driver other than the caller's thread moves."""

    @abc.abstractmethod
    def result(self) -> ExecResult:
        """The result, once the pump is done."""

    def send_stdin(self, data: bytes) -> None:
        raise NotSupportedError("this command's stdin was given at start")

    def close_stdin(self) -> None:
        raise NotSupportedError("this command's stdin was given at start")

    @abc.abstractmethod
    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the command (SIGKILL by default)."""

    def resize(self, rows: int, cols: int) -> None:
        """Set the size of the command's terminal (``tty=True`` commands)."""
        raise NotSupportedError("this command has no terminal: start it with tty=True")


class PumpCommand(Command):
    """Host processes watched by a :class:`PipePump`; ``finish`` turns what
    was captured into the tier's ExecResult (termination, evidence)."""

    def __init__(
        self,
        pipe: PipePump,
        finish: Callable[[Captured], ExecResult],
        *,
        signal_fn: Callable[[int], None],
        pid: int | None = None,
        pid_fn: Callable[[], int | None] | None = None,
    ) -> None:
        self._pipe = pipe
        self._finish = finish
        self._signal = signal_fn
        self._pid = pid
        self._pid_fn = pid_fn
        self._result: ExecResult | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """Its pid inside the sandbox (learnt once the runtime has started it)."""
        if self._pid is None and self._pid_fn is not None:
            self._pid = self._pid_fn()
        return self._pid

    def wait_here(self) -> ExecResult:
        drive(self._pipe)
        return self.result()

    def pump(self) -> Pump:
        return self._pipe

    def result(self) -> ExecResult:
        with self._lock:
            if self._result is None:
                if not self._pipe.done:
                    raise SandboxError("the command is still running")
                self._result = self._finish(self._pipe.captured())
            return self._result

    def send_stdin(self, data: bytes) -> None:
        self._pipe.feed(data)

    def close_stdin(self) -> None:
        self._pipe.close_stdin()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if not self._pipe.done:
            self._signal(sig)


class ThreadPump(Pump):
    """Runs a blocking call on a thread of its own; a pipe tells the driver
    when it is over. The thread starts when a driver first asks."""

    def __init__(self, work: Callable[[], ExecResult], abort: Callable[[], None]) -> None:
        self._work = work
        self._abort = abort
        self._r, self._w = os.pipe()
        self._thread: threading.Thread | None = None
        self._done = False
        self.value: ExecResult | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.value = self._work()
        except BaseException as exc:  # handed to whoever reads the result
            self.error = exc
        finally:
            with contextlib.suppress(OSError):
                os.write(self._w, b"x")

    def interests(self) -> dict[int, int]:
        if self._done:
            return {}
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tierbox-command", daemon=True)
            self._thread.start()
        return {self._r: READ}

    def ready(self, fd: int, events: int) -> None:
        if fd == self._r:
            self._done = True
            for end in (self._r, self._w):
                with contextlib.suppress(OSError):
                    os.close(end)

    def deadline(self) -> float | None:
        return None

    def tick(self) -> None:
        pass

    def abort(self) -> None:
        if not self._done:
            self._abort()
            if self._thread is not None:
                self._thread.join()

    @property
    def done(self) -> bool:
        return self._done


class InlineCommand(Command):
    """A blocking call that produces the result (wasm; a guest agent call)."""

    def __init__(
        self,
        work: Callable[[], ExecResult],
        *,
        kill: Callable[[int], None],
        pid: int | None = None,
    ) -> None:
        self._work = work
        self._kill = kill
        self._pid = pid
        self._pump: ThreadPump | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    def wait_here(self) -> ExecResult:
        return self._work()

    def pump(self) -> Pump:
        if self._pump is None:
            self._pump = ThreadPump(self._work, lambda: self._kill(signal.SIGKILL))
        return self._pump

    def result(self) -> ExecResult:
        pump = self._pump
        if pump is None or not pump.done:
            raise SandboxError("the command is still running")
        if pump.error is not None:
            raise pump.error
        assert pump.value is not None
        return pump.value

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self._kill(sig)


class _DonePump(Pump):
    def interests(self) -> dict[int, int]:
        return {}

    def ready(self, fd: int, events: int) -> None:
        pass

    def deadline(self) -> float | None:
        return None

    def tick(self) -> None:
        pass

    def abort(self) -> None:
        pass

    @property
    def done(self) -> bool:
        return True


class Finished(Command):
    """A command whose result was known at start (a program that cannot run)."""

    def __init__(self, result: ExecResult) -> None:
        self._result = result

    def wait_here(self) -> ExecResult:
        return self._result

    def pump(self) -> Pump:
        return _DonePump()

    def result(self) -> ExecResult:
        return self._result

    def kill(self, sig: int = signal.SIGKILL) -> None:
        pass


class MappedCommand(Command):
    """Another command whose result a tier post-processes: ``fn`` gets a
    thunk producing the inner result (so it can also translate errors)."""

    def __init__(
        self, inner: Command, fn: Callable[[Callable[[], ExecResult]], ExecResult]
    ) -> None:
        self._inner = inner
        self._fn = fn
        self._result: ExecResult | None = None

    @property
    def pid(self) -> int | None:
        return self._inner.pid

    def wait_here(self) -> ExecResult:
        self._result = self._fn(self._inner.wait_here)
        return self._result

    def pump(self) -> Pump:
        return self._inner.pump()

    def result(self) -> ExecResult:
        if self._result is None:
            self._result = self._fn(self._inner.result)
        return self._result

    def send_stdin(self, data: bytes) -> None:
        self._inner.send_stdin(data)

    def close_stdin(self) -> None:
        self._inner.close_stdin()

    def resize(self, rows: int, cols: int) -> None:
        self._inner.resize(rows, cols)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self._inner.kill(sig)
