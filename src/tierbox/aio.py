"""``AsyncSandbox``: the Sandbox API for asyncio programs.

A command's pump (:mod:`tierbox.runloop`) is awaited on the running event
loop, which watches the command's own pipes, pidfd or socket with
``add_reader``: a hundred commands on one loop cost no thread each. Only work
that is a blocking call by nature runs on a thread: creating and closing a
sandbox (engine start-up, VM boots), file transfers, and commands on tiers
whose work is itself a call (wasm computes in this process).

    async with await AsyncSandbox.create("busybox", tier="container") as sb:
        r = await sb.run(["sh", "-c", "echo hi"])
        async for stream, chunk in sb.stream(["sh", "-c", "echo a; echo b >&2"]):
            ...
"""

from __future__ import annotations

import asyncio
import builtins
import signal
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from tierbox.runloop import adrive
from tierbox.sandbox import Sandbox, SandboxRecord
from tierbox.spec import ExecResult, ProcessInfo, Stats
from tierbox.tiers.base import SnapshotRef
from tierbox.tiers.commands import Command

Callback = Callable[[bytes], object]


class AsyncCommandHandle:
    """A background command on the event loop (``run(..., background=True)``)."""

    def __init__(self, command: Command) -> None:
        self._command = command
        self._wake = asyncio.Event()  # set after stdin is fed, so the loop writes it
        self._task = asyncio.ensure_future(adrive(command.pump(), self._wake))

    @property
    def pid(self) -> int | None:
        return self._command.pid

    @property
    def done(self) -> bool:
        return self._task.done()

    async def wait(self, timeout_s: float | None = None) -> ExecResult:
        """The result; asyncio.TimeoutError after ``timeout_s`` (it keeps running)."""
        await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        return self._command.result()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self._command.kill(sig)

    def send_stdin(self, data: bytes | str) -> None:
        self._command.send_stdin(data.encode() if isinstance(data, str) else data)
        self._wake.set()

    def close_stdin(self) -> None:
        self._command.close_stdin()
        self._wake.set()


class AsyncFiles:
    """``sb.files`` for asyncio: transfers run on a thread (they are file I/O)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._files = sandbox.files

    async def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        await asyncio.to_thread(self._files.write, path, data, mode)

    async def read(self, path: str, **kwargs: Any) -> bytes:
        return await asyncio.to_thread(self._files.read, path, **kwargs)

    async def read_text(self, path: str, **kwargs: Any) -> str:
        return await asyncio.to_thread(self._files.read_text, path, **kwargs)

    async def list(self, path: str) -> list[str]:
        return await asyncio.to_thread(self._files.list, path)

    async def download(self, path: str, local_path: str, **kwargs: Any) -> int:
        return await asyncio.to_thread(self._files.download, path, local_path, **kwargs)

    async def upload(self, local_path: str, path: str) -> int:
        return await asyncio.to_thread(self._files.upload, local_path, path)


class AsyncSandbox:
    """The same methods as :class:`~tierbox.Sandbox`, awaitable."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sync = sandbox  # the synchronous sandbox underneath
        self.files = AsyncFiles(sandbox)

    @classmethod
    async def create(cls, image: str | None = None, **kwargs: Any) -> AsyncSandbox:
        """As ``Sandbox.create`` (engine start-up runs on a thread)."""
        return cls(await asyncio.to_thread(Sandbox.create, image, **kwargs))

    @classmethod
    async def connect(cls, id_or_name: str) -> AsyncSandbox:
        return cls(await asyncio.to_thread(Sandbox.connect, id_or_name))

    @staticmethod
    async def list() -> list[SandboxRecord]:
        return await asyncio.to_thread(Sandbox.list)

    @property
    def id(self) -> str:
        return self.sync.id

    @property
    def tier(self) -> str:
        return self.sync.tier

    def _start(
        self,
        argv: Sequence[str],
        stdin: bytes | str | None,
        env: Mapping[str, str] | None,
        timeout_s: float | None,
        cwd: str | None,
        user: str | None,
        on_stdout: Callback | None,
        on_stderr: Callback | None,
        background: bool,
    ) -> Command:
        inst = self.sync.instance
        return inst.start(
            argv,
            stdin=stdin,
            env=env,
            timeout_s=timeout_s,
            cwd=cwd,
            user=user,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            keep_stdin_open=background and stdin is None and inst.capabilities.stdin_stream,
            unbounded=background,
        )

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        cwd: str | None = None,
        user: str | None = None,
        on_stdout: Callback | None = None,
        on_stderr: Callback | None = None,
        background: bool = False,
    ) -> Any:
        """Run ``argv`` and await its result (an ExecResult), or with
        ``background=True`` return an :class:`AsyncCommandHandle` at once."""
        command = self._start(
            argv, stdin, env, timeout_s, cwd, user, on_stdout, on_stderr, background
        )
        if background:
            return AsyncCommandHandle(command)
        await adrive(command.pump())
        return command.result()

    async def stream(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> AsyncIterator[tuple[str, bytes]]:
        """Run ``argv`` and yield ``("stdout"|"stderr", chunk)`` as the output
        comes; the command ends when the iteration does (or is stopped)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()

        def sink(name: str) -> Callback:
            # output may come from the loop or from a command's own thread
            return lambda chunk: loop.call_soon_threadsafe(queue.put_nowait, (name, chunk))

        command = self._start(
            argv, stdin, env, timeout_s, cwd, user, sink("stdout"), sink("stderr"), False
        )
        task = asyncio.ensure_future(adrive(command.pump()))
        task.add_done_callback(lambda _t: loop.call_soon_threadsafe(queue.put_nowait, None))
        try:
            while (item := await queue.get()) is not None:
                yield item
            await task
        finally:
            if not task.done():
                command.kill()
                task.cancel()

    async def processes(self) -> builtins.list[ProcessInfo]:
        return await asyncio.to_thread(self.sync.processes)

    async def stats(self) -> Stats:
        return await asyncio.to_thread(self.sync.stats)

    async def snapshot(self) -> SnapshotRef:
        return await asyncio.to_thread(self.sync.snapshot)

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Async{repr(self.sync)[1:]}"
