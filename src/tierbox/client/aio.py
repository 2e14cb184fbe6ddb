"""The asyncio remote SDK: ``tierbox.AsyncClient``, the same methods as
:class:`tierbox.Client`, awaitable (httpx's AsyncClient underneath).

    async with AsyncClient(socket, api_key=key) as client:
        async with await client.sandboxes.create("busybox") as sb:
            r = await sb.run(["echo", "hi"])
            async for stream, chunk in sb.stream(["sh", "-c", "echo a; echo b >&2"]):
                ...
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import os
import signal
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from tierbox.client._common import (
    DEFAULT_TIMEOUT,
    WAIT,
    Closed,
    Endpoint,
    RemoteSandboxRecord,
    RemoteSnapshot,
    SSEParser,
    api_key,
    check,
    chunk_of,
    create_body,
    entries_of,
    exec_body,
    headers,
    processes_of,
    result_of,
    snapshot_id,
    stats_of,
    unreachable,
)
from tierbox.errors import SandboxNotFoundError, ServerError, UsageError, WaitTimeoutError
from tierbox.spec import (
    DEFAULT_READ_MAX_BYTES,
    ExecResult,
    FileEntry,
    ProcessInfo,
    SandboxSpec,
    Stats,
)

Callback = Callable[[bytes], object]


class AsyncClient:
    """A connection to a tierbox daemon for asyncio programs (see :class:`tierbox.Client`)."""

    def __init__(
        self,
        url_or_socket: str | os.PathLike[str] | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.endpoint = Endpoint.parse(url_or_socket)
        transport = httpx.AsyncHTTPTransport(uds=self.endpoint.uds) if self.endpoint.uds else None
        self._http = httpx.AsyncClient(
            base_url=self.endpoint.base_url,
            transport=transport,
            headers=headers(_key(api_key)),
            timeout=DEFAULT_TIMEOUT if timeout_s is None else httpx.Timeout(timeout_s),
        )
        self.sandboxes = AsyncSandboxes(self)
        self._owned: set[AsyncRemoteSandbox] = set()

    def __repr__(self) -> str:
        return f"<tierbox.AsyncClient {self.endpoint.where}>"

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise unreachable(self.endpoint, exc) from None
        check(response)
        return response

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return (await self.request(method, path, **kwargs)).json()

    async def events(
        self, method: str, path: str, **kwargs: Any
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        parser = SSEParser()
        try:
            async with self._http.stream(
                method, path, headers={"Accept": "text/event-stream"}, timeout=WAIT, **kwargs
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    check(response)
                async for line in response.aiter_lines():
                    ev = parser.feed(line)
                    if ev is not None:
                        yield ev
        except httpx.TransportError as exc:
            raise unreachable(self.endpoint, exc) from None

    async def run(
        self,
        image: str | None,
        argv: Sequence[str],
        *,
        tier: str = "container",
        stdin: bytes | str | None = None,
        spec: SandboxSpec | None = None,
        on_stdout: Callback | None = None,
        on_stderr: Callback | None = None,
        **options: Any,
    ) -> ExecResult:
        body = create_body(image, tier, None, None, spec, options)
        body.update(exec_body(argv, stdin, None, None, None, None, False))
        body.pop("background")
        if on_stdout is None and on_stderr is None:
            return result_of(await self.json("POST", "/v1/run", json=body, timeout=WAIT))
        return await _follow(self.events("POST", "/v1/run", json=body), on_stdout, on_stderr)

    async def tiers(self) -> list[dict[str, Any]]:
        return list(await self.json("GET", "/v1/tiers"))

    async def images(self) -> list[dict[str, Any]]:
        return list(await self.json("GET", "/v1/images"))

    async def me(self) -> dict[str, Any]:
        return dict(await self.json("GET", "/v1/me"))

    async def close(self) -> None:
        """Remove the sandboxes created here without ``keep=True``, then hang up."""
        owned, self._owned = list(self._owned), set()
        for sb in owned:
            with contextlib.suppress(Exception):
                await sb.close()
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _key(given: str | None) -> str | None:
    return api_key(given)


async def _follow(
    events: AsyncIterator[tuple[str, dict[str, Any]]],
    on_stdout: Callback | None,
    on_stderr: Callback | None,
) -> ExecResult:
    async for event, data in events:
        if event == "stdout" and on_stdout is not None:
            on_stdout(chunk_of(data))
        elif event == "stderr" and on_stderr is not None:
            on_stderr(chunk_of(data))
        elif event == "exit":
            return result_of(data["exec"])
    raise ServerError("the daemon ended the output stream before the command ended")


class AsyncSandboxes:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(
        self,
        image: str | None = None,
        *,
        tier: str = "container",
        spec: SandboxSpec | None = None,
        name: str | None = None,
        ttl_s: float | None = None,
        keep: bool = False,
        **options: Any,
    ) -> AsyncRemoteSandbox:
        body = create_body(image, tier, name, ttl_s, spec, options)
        view = await self._client.json("POST", "/v1/sandboxes", json=body, timeout=WAIT)
        sb = AsyncRemoteSandbox(self._client, view)
        if not keep:
            self._client._owned.add(sb)
        return sb

    async def get(self, sandbox_id: str) -> AsyncRemoteSandbox:
        if not sandbox_id or sandbox_id in (".", ".."):
            raise UsageError(f"{sandbox_id!r} is not an id or a name")
        view = await self._client.json(
            "GET", f"/v1/sandboxes/{urllib.parse.quote(sandbox_id, safe='')}"
        )
        if view.get("state") != "running":
            raise SandboxNotFoundError(f"sandbox {sandbox_id} is {view.get('state')}")
        return AsyncRemoteSandbox(self._client, view)

    async def list(self, *, ended: bool = False) -> list[RemoteSandboxRecord]:
        rows = await self._client.json("GET", "/v1/sandboxes", params={"ended": ended})
        return [RemoteSandboxRecord.from_view(v) for v in rows]

    async def restore(self, snap: RemoteSnapshot | str) -> AsyncRemoteSandbox:
        view = await self._client.json(
            "POST", f"/v1/snapshots/{snapshot_id(snap)}/restore", timeout=WAIT
        )
        sb = AsyncRemoteSandbox(self._client, view)
        self._client._owned.add(sb)
        return sb

    async def clone(
        self, snap: RemoteSnapshot | str, count: int = 1
    ) -> builtins.list[AsyncRemoteSandbox]:
        views = await self._client.json(
            "POST", f"/v1/snapshots/{snapshot_id(snap)}/clone", json={"count": count}, timeout=WAIT
        )
        out = [AsyncRemoteSandbox(self._client, v) for v in views]
        self._client._owned.update(out)
        return out


class AsyncRemoteFiles:
    def __init__(self, sb: AsyncRemoteSandbox) -> None:
        self._sb = sb

    def _path(self) -> str:
        self._sb._closed.check()
        return f"/v1/sandboxes/{self._sb.id}/files"

    async def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        if isinstance(data, str):
            data = data.encode()
        await self._sb._client.request(
            "PUT", self._path(), params={"path": path, "mode": mode}, content=bytes(data)
        )

    async def read(self, path: str, *, max_bytes: int = DEFAULT_READ_MAX_BYTES) -> bytes:
        response = await self._sb._client.request(
            "GET", self._path(), params={"path": path, "max_bytes": max_bytes}
        )
        return response.content

    async def read_text(self, path: str, *, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def list(self, path: str) -> builtins.list[str]:
        return [e.name for e in await self.entries(path)]

    async def entries(self, path: str) -> builtins.list[FileEntry]:
        return entries_of(
            await self._sb._client.json("GET", self._path() + "/list", params={"path": path})
        )


class AsyncRemoteCommandHandle:
    """A background command on the daemon, for asyncio."""

    def __init__(self, sb: AsyncRemoteSandbox, view: dict[str, Any]) -> None:
        self._sb = sb
        self.id: str = view["id"]
        self.argv: list[str] = list(view["argv"])
        self.pid: int | None = view.get("pid")

    def _base(self) -> str:
        return f"/v1/sandboxes/{self._sb.id}/execs/{self.id}"

    async def wait(self, timeout_s: float | None = None) -> ExecResult:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = 60.0 if deadline is None else max(0.0, deadline - time.monotonic())
            view = await self._sb._client.json(
                "GET", self._base(), params={"wait_s": min(left, 60.0)}, timeout=WAIT
            )
            if view["status"] != "running":
                return result_of(view)
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(f"{self.argv[0]!r} is still running after {timeout_s} s")

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        await self._sb._client.request("POST", self._base() + "/kill", json={"signal": int(sig)})

    async def send_stdin(self, data: bytes | str) -> None:
        body = (
            {"data": data}
            if isinstance(data, str)
            else {"data_b64": base64.b64encode(data).decode()}
        )
        await self._sb._client.request("POST", self._base() + "/stdin", json=body)

    async def close_stdin(self) -> None:
        await self._sb._client.request("POST", self._base() + "/stdin", json={"eof": True})


class AsyncRemoteSandbox:
    """A sandbox on a daemon, with the methods of :class:`tierbox.AsyncSandbox`."""

    def __init__(self, client: AsyncClient, view: Mapping[str, Any]) -> None:
        self._client = client
        self._view = dict(view)
        self.id: str = view["id"]
        self.name: str | None = view.get("name")
        self.tier: str = view["tier"]
        self.tenant: str = view["tenant"]
        self.spec = SandboxSpec.from_dict(view["spec"])
        self.files = AsyncRemoteFiles(self)
        self._closed = Closed(self.id)

    @property
    def image(self) -> str | None:
        return self._view.get("image")

    def __repr__(self) -> str:
        return f"<AsyncRemoteSandbox {self.id} tier={self.tier} image={self.image or '-'}>"

    def _base(self) -> str:
        self._closed.check()
        return f"/v1/sandboxes/{self.id}"

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
        """Await the result, or with ``background=True`` a handle at once."""
        body = exec_body(argv, stdin, env, timeout_s, cwd, user, background)
        path = self._base() + "/execs"
        if background:
            return AsyncRemoteCommandHandle(self, await self._client.json("POST", path, json=body))
        if on_stdout is None and on_stderr is None:
            return result_of(await self._client.json("POST", path, json=body, timeout=WAIT))
        return await _follow(self._client.events("POST", path, json=body), on_stdout, on_stderr)

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
        """Yield ``("stdout"|"stderr", chunk)`` as the output comes."""
        body = exec_body(argv, stdin, env, timeout_s, cwd, user, False)
        async for event, data in self._client.events("POST", self._base() + "/execs", json=body):
            if event in ("stdout", "stderr"):
                yield event, chunk_of(data)
            elif event == "exit":
                result_of(data["exec"])  # raises if it did not end by itself
                return

    async def processes(self) -> builtins.list[ProcessInfo]:
        return processes_of(await self._client.json("GET", self._base() + "/processes"))

    async def stats(self) -> Stats:
        return stats_of(await self._client.json("GET", self._base() + "/stats"))

    async def snapshot(self) -> RemoteSnapshot:
        view = await self._client.json("POST", self._base() + "/snapshots", timeout=WAIT)
        return RemoteSnapshot.from_view(view)

    async def close(self) -> None:
        if self._closed.closed:
            return
        self._closed.closed = True
        self._client._owned.discard(self)
        with contextlib.suppress(SandboxNotFoundError):
            await self._client.request("DELETE", f"/v1/sandboxes/{self.id}", timeout=WAIT)

    async def __aenter__(self) -> AsyncRemoteSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


__all__ = ["AsyncClient", "AsyncRemoteSandbox"]
