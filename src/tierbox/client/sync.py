"""The synchronous remote SDK: ``tierbox.Client``.

    from tierbox import Client
    with Client("/root/.local/share/tierbox/server/tierbox.sock") as client:
        with client.sandboxes.create("busybox", tier="container", memory_mib=64) as sb:
            r = sb.run(["sh", "-c", "echo hi"], on_stdout=print)

A remote sandbox has the methods of a local :class:`~tierbox.Sandbox`: the
same results (:class:`~tierbox.ExecResult`), the same errors (the daemon names
the class), background handles, files, snapshots and close.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import io
import os
import shutil
import signal
import tarfile
import tempfile
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, overload

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
from tierbox.errors import (
    SandboxNotFoundError,
    ServerError,
    UsageError,
    WaitTimeoutError,
)
from tierbox.spec import (
    DEFAULT_READ_MAX_BYTES,
    ExecResult,
    FileEntry,
    ProcessInfo,
    SandboxSpec,
    Stats,
)

Callback = Callable[[bytes], object]
_clients: weakref.WeakSet[Client] = weakref.WeakSet()


@atexit.register
def _close_clients() -> None:
    """Sandboxes a program created and never closed are removed when it exits
    (as local ones are), unless created with ``keep=True``."""
    for client in list(_clients):
        with contextlib.suppress(Exception):
            client.close()


class Client:
    """A connection to a tierbox daemon (``tierbox serve``).

    ``url_or_socket``: ``http://HOST:PORT``, ``unix:///PATH``, a socket path,
    or None for ``$TIERBOX_URL`` or the default socket. ``api_key``: the
    tenant's key (default ``$TIERBOX_API_KEY``); on the unix socket the host's
    root may call without one."""

    def __init__(
        self,
        url_or_socket: str | os.PathLike[str] | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.endpoint = Endpoint.parse(url_or_socket)
        key = _key(api_key)
        transport = httpx.HTTPTransport(uds=self.endpoint.uds) if self.endpoint.uds else None
        self._http = httpx.Client(
            base_url=self.endpoint.base_url,
            transport=transport,
            headers=headers(key),
            timeout=DEFAULT_TIMEOUT if timeout_s is None else httpx.Timeout(timeout_s),
        )
        self.sandboxes = Sandboxes(self)
        self.snapshots = Snapshots(self)
        self._owned: set[RemoteSandbox] = set()
        self._lock = threading.Lock()
        _clients.add(self)

    def __repr__(self) -> str:
        return f"<tierbox.Client {self.endpoint.where}>"

    # ---- plumbing -------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise unreachable(self.endpoint, exc) from None
        check(response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        try:
            with self._http.stream(method, path, timeout=WAIT, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    check(response)
                yield response
        except httpx.TransportError as exc:
            raise unreachable(self.endpoint, exc) from None

    def events(self, method: str, path: str, **kwargs: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        """An exec's Server-Sent Events, parsed."""
        headers_ = {"Accept": "text/event-stream"}
        parser = SSEParser()
        with self.stream(method, path, headers=headers_, **kwargs) as response:
            for line in response.iter_lines():
                ev = parser.feed(line)
                if ev is not None:
                    yield ev

    # ---- the API --------------------------------------------------------------------
    def run(
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
        """One-shot, as :func:`tierbox.run`: a fresh sandbox on the daemon
        runs ``argv`` and is gone; output streams to the callbacks."""
        body = create_body(image, tier, None, None, spec, options)
        body.update(exec_body(argv, stdin, None, None, None, None, False))
        body.pop("background")
        if on_stdout is None and on_stderr is None:
            return result_of(self.json("POST", "/v1/run", json=body, timeout=WAIT))
        return _follow(self.events("POST", "/v1/run", json=body), on_stdout, on_stderr)

    def tiers(self) -> list[dict[str, Any]]:
        return list(self.json("GET", "/v1/tiers"))

    def images(self) -> list[dict[str, Any]]:
        return list(self.json("GET", "/v1/images"))

    def image(self, ref: str) -> dict[str, Any]:
        return dict(self.json("GET", f"/v1/images/{ref}"))

    def me(self) -> dict[str, Any]:
        """This key's tenant, quotas and usage."""
        return dict(self.json("GET", "/v1/me"))

    def bench(self) -> dict[str, Any]:
        return dict(self.json("GET", "/v1/bench"))

    def audit(self, limit: int = 1000) -> list[dict[str, Any]]:
        return list(self.json("GET", "/v1/audit", params={"limit": limit}))

    def close(self) -> None:
        """Remove the sandboxes created here without ``keep=True``, then hang up."""
        with self._lock:
            owned = list(self._owned)
            self._owned.clear()
        for sb in owned:
            with contextlib.suppress(Exception):
                sb.close()
        self._http.close()
        _clients.discard(self)

    def _own(self, sb: RemoteSandbox) -> None:
        with self._lock:
            self._owned.add(sb)

    def _disown(self, sb: RemoteSandbox) -> None:
        with self._lock:
            self._owned.discard(sb)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _key(given: str | None) -> str | None:
    return api_key(given)


def _follow(
    events: Iterator[tuple[str, dict[str, Any]]],
    on_stdout: Callback | None,
    on_stderr: Callback | None,
) -> ExecResult:
    """Call back with each chunk as it comes; the result at the end."""
    for event, data in events:
        if event == "stdout" and on_stdout is not None:
            on_stdout(chunk_of(data))
        elif event == "stderr" and on_stderr is not None:
            on_stderr(chunk_of(data))
        elif event == "exit":
            return result_of(data["exec"])
    raise ServerError("the daemon ended the output stream before the command ended")


class Sandboxes:
    """``client.sandboxes``: create, get, list, restore, clone."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(
        self,
        image: str | None = None,
        *,
        tier: str = "container",
        spec: SandboxSpec | None = None,
        name: str | None = None,
        ttl_s: float | None = None,
        keep: bool = False,
        **options: Any,
    ) -> RemoteSandbox:
        """As :meth:`tierbox.Sandbox.create`, on the daemon. Without ``keep``
        the sandbox is removed when the client closes (or the program exits)."""
        body = create_body(image, tier, name, ttl_s, spec, options)
        view = self._client.json("POST", "/v1/sandboxes", json=body, timeout=WAIT)
        sb = RemoteSandbox(self._client, view)
        if not keep:
            self._client._own(sb)
        return sb

    def get(self, sandbox_id: str) -> RemoteSandbox:
        """A live sandbox by id or name (this tenant's only)."""
        view = self._client.json("GET", f"/v1/sandboxes/{_seg(sandbox_id)}")
        if view.get("state") != "running":
            raise SandboxNotFoundError(f"sandbox {sandbox_id} is {view.get('state')}")
        return RemoteSandbox(self._client, view)

    connect = get

    def list(self, *, ended: bool = False) -> list[RemoteSandboxRecord]:
        rows = self._client.json("GET", "/v1/sandboxes", params={"ended": ended})
        return [RemoteSandboxRecord.from_view(v) for v in rows]

    def restore(self, snap: RemoteSnapshot | str) -> RemoteSandbox:
        view = self._client.json("POST", f"/v1/snapshots/{snapshot_id(snap)}/restore", timeout=WAIT)
        sb = RemoteSandbox(self._client, view)
        self._client._own(sb)
        return sb

    def clone(self, snap: RemoteSnapshot | str, count: int = 1) -> builtins.list[RemoteSandbox]:
        views = self._client.json(
            "POST", f"/v1/snapshots/{snapshot_id(snap)}/clone", json={"count": count}, timeout=WAIT
        )
        out = [RemoteSandbox(self._client, v) for v in views]
        for sb in out:
            self._client._own(sb)
        return out


class Snapshots:
    """``client.snapshots``: list, get, delete."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self) -> list[RemoteSnapshot]:
        return [RemoteSnapshot.from_view(v) for v in self._client.json("GET", "/v1/snapshots")]

    def get(self, snap_id: str) -> RemoteSnapshot:
        return RemoteSnapshot.from_view(self._client.json("GET", f"/v1/snapshots/{_seg(snap_id)}"))

    def delete(self, snap: RemoteSnapshot | str) -> None:
        self._client.request("DELETE", f"/v1/snapshots/{_seg(snapshot_id(snap))}")


def _seg(value: str) -> str:
    """One path segment (a slash or a dot-segment cannot reach another route)."""
    if not isinstance(value, str) or not value or value in (".", ".."):
        raise UsageError(f"{value!r} is not an id or a name")
    return urllib.parse.quote(value, safe="")


class RemoteFiles:
    """``sb.files`` on a remote sandbox: as :class:`tierbox.sandbox.Files`."""

    def __init__(self, sb: RemoteSandbox) -> None:
        self._sb = sb

    def _path(self) -> str:
        self._sb._closed.check()
        return f"/v1/sandboxes/{self._sb.id}/files"

    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        if isinstance(data, str):
            data = data.encode()
        self._sb._client.request(
            "PUT", self._path(), params={"path": path, "mode": mode}, content=bytes(data)
        )

    def read(self, path: str, *, max_bytes: int = DEFAULT_READ_MAX_BYTES) -> bytes:
        return self._sb._client.request(
            "GET", self._path(), params={"path": path, "max_bytes": max_bytes}
        ).content

    def read_text(
        self, path: str, *, encoding: str = "utf-8", max_bytes: int = DEFAULT_READ_MAX_BYTES
    ) -> str:
        return self.read(path, max_bytes=max_bytes).decode(encoding)

    def list(self, path: str) -> builtins.list[str]:
        return [e.name for e in self.entries(path)]

    def entries(self, path: str) -> builtins.list[FileEntry]:
        rows = self._sb._client.json("GET", self._path() + "/list", params={"path": path})
        return entries_of(rows)

    def download(
        self, path: str, local_path: str | os.PathLike[str], *, max_bytes: int = 1 << 30
    ) -> int:
        """Copy a file or directory out to ``local_path`` (which must not
        exist); returns the bytes copied. Comes as a tar, unpacked with
        tarfile's ``data`` filter (nothing outside ``local_path``, no links out)."""
        dest = Path(local_path)
        if dest.exists():
            raise UsageError(f"{dest} exists: give a new path")
        tmp = Path(
            tempfile.mkdtemp(
                prefix="tierbox-dl-", dir=dest.parent if dest.parent.is_dir() else None
            )
        )
        try:
            archive = tmp / "a.tar"
            with (
                self._sb._client.stream(
                    "GET", self._path() + "/archive", params={"path": path, "max_bytes": max_bytes}
                ) as response,
                archive.open("wb") as out,
            ):
                for chunk in response.iter_bytes():
                    out.write(chunk)
            with tarfile.open(archive) as tar:
                members = tar.getmembers()
                tar.extractall(tmp / "x", filter="data")
            tops = [p for p in (tmp / "x").iterdir()] if (tmp / "x").is_dir() else []
            if len(tops) != 1:
                raise ServerError(f"the daemon sent {len(tops)} top entries for {path}")
            os.replace(tops[0], dest)
            return sum(m.size for m in members if m.isfile())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def upload(self, local_path: str | os.PathLike[str], path: str) -> int:
        """Copy a host file or directory into the sandbox at ``path``."""
        local = Path(local_path)
        if local.is_file():
            data = local.read_bytes()
            self.write(path, data, local.stat().st_mode & 0o777)
            return len(data)
        if not local.is_dir():
            raise UsageError(f"{local}: no such file or directory")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for child in sorted(local.iterdir()):
                tar.add(child, arcname=child.name)
        answer = self._sb._client.json(
            "PUT", self._path() + "/archive", params={"path": path}, content=buf.getvalue()
        )
        return int(answer.get("bytes", 0))


class RemoteCommandHandle:
    """A background command on the daemon: as :class:`tierbox.CommandHandle`."""

    def __init__(
        self,
        sb: RemoteSandbox,
        view: dict[str, Any],
        on_stdout: Callback | None,
        on_stderr: Callback | None,
    ) -> None:
        self._sb = sb
        self.id: str = view["id"]
        self.argv: list[str] = list(view["argv"])
        self._view = view
        self._pid: int | None = view.get("pid")
        self._follower: threading.Thread | None = None
        self._final: dict[str, Any] | None = None
        if on_stdout is not None or on_stderr is not None:
            self._follower = threading.Thread(
                target=self._follow, args=(on_stdout, on_stderr), daemon=True
            )
            self._follower.start()

    def _base(self) -> str:
        return f"/v1/sandboxes/{self._sb.id}/execs/{self.id}"

    def _follow(self, on_stdout: Callback | None, on_stderr: Callback | None) -> None:
        with contextlib.suppress(Exception):
            for event, data in self._sb._client.events("GET", self._base() + "/events"):
                if event == "stdout" and on_stdout is not None:
                    on_stdout(chunk_of(data))
                elif event == "stderr" and on_stderr is not None:
                    on_stderr(chunk_of(data))
                elif event == "exit":
                    self._final = data["exec"]

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def done(self) -> bool:
        if self._final is not None:
            return True
        view = self._sb._client.json("GET", self._base())
        return bool(view["status"] != "running")

    def wait(self, timeout_s: float | None = None) -> ExecResult:
        """The result once it ends; WaitTimeoutError after ``timeout_s`` (it keeps running)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = 60.0 if deadline is None else max(0.0, deadline - time.monotonic())
            view = self._sb._client.json(
                "GET", self._base(), params={"wait_s": min(left, 60.0)}, timeout=WAIT
            )
            if view["status"] != "running":
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(
                    f"{self.argv[0]!r} is still running after {timeout_s} s: "
                    "wait longer or kill() it"
                )
        if self._follower is not None:
            self._follower.join(30)  # every chunk delivered before the result
        return result_of(view if view.get("result") or view.get("error") else self._final or view)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self._sb._client.request("POST", self._base() + "/kill", json={"signal": int(sig)})

    def send_stdin(self, data: bytes | str) -> None:
        body = {"data": data} if isinstance(data, str) else {"data_b64": _b64(data)}
        self._sb._client.request("POST", self._base() + "/stdin", json=body)

    def close_stdin(self) -> None:
        self._sb._client.request("POST", self._base() + "/stdin", json={"eof": True})

    def __repr__(self) -> str:
        return f"<RemoteCommandHandle {self.id} {' '.join(self.argv)[:60]!r}>"


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


class RemoteSandbox:
    """A sandbox on a tierbox daemon, with the methods of :class:`tierbox.Sandbox`."""

    def __init__(self, client: Client, view: Mapping[str, Any]) -> None:
        self._client = client
        self._view = dict(view)
        self.id: str = view["id"]
        self.name: str | None = view.get("name")
        self.tier: str = view["tier"]
        self.tenant: str = view["tenant"]
        self.spec = SandboxSpec.from_dict(view["spec"])
        self.expires_unix: float | None = view.get("expires_unix")
        self.files = RemoteFiles(self)
        self._closed = Closed(self.id)

    @property
    def image(self) -> str | None:
        return self._view.get("image")

    def __repr__(self) -> str:
        named = f" name={self.name}" if self.name else ""
        return f"<RemoteSandbox {self.id}{named} tier={self.tier} image={self.image or '-'}>"

    def _base(self) -> str:
        self._closed.check()
        return f"/v1/sandboxes/{self.id}"

    @overload
    def run(
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
        background: Literal[False] = False,
    ) -> ExecResult: ...

    @overload
    def run(
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
        background: Literal[True],
    ) -> RemoteCommandHandle: ...

    def run(
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
    ) -> ExecResult | RemoteCommandHandle:
        """As :meth:`tierbox.Sandbox.run`: wait for the command (output to the
        callbacks as it comes), or with ``background=True`` a handle at once."""
        body = exec_body(argv, stdin, env, timeout_s, cwd, user, background)
        path = self._base() + "/execs"
        if background:
            view = self._client.json("POST", path, json=body)
            return RemoteCommandHandle(self, view, on_stdout, on_stderr)
        if on_stdout is None and on_stderr is None:
            return result_of(self._client.json("POST", path, json=body, timeout=WAIT))
        return _follow(self._client.events("POST", path, json=body), on_stdout, on_stderr)

    exec = run

    def processes(self) -> builtins.list[ProcessInfo]:
        return processes_of(self._client.json("GET", self._base() + "/processes"))

    def stats(self) -> Stats:
        return stats_of(self._client.json("GET", self._base() + "/stats"))

    def put_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        self.files.write(path, data, mode)

    def get_file(self, path: str, *, max_bytes: int = DEFAULT_READ_MAX_BYTES) -> bytes:
        return self.files.read(path, max_bytes=max_bytes)

    def list_dir(self, path: str) -> builtins.list[str]:
        return self.files.list(path)

    def snapshot(self) -> RemoteSnapshot:
        return RemoteSnapshot.from_view(
            self._client.json("POST", self._base() + "/snapshots", timeout=WAIT)
        )

    def revert(self, snapshot: RemoteSnapshot | str) -> None:
        """Back to a snapshot in place (tiers whose snapshots revert: vm)."""
        name = snapshot.id if isinstance(snapshot, RemoteSnapshot) else snapshot
        self._client.request(
            "POST", self._base() + "/revert", json={"snapshot": name}, timeout=WAIT
        )

    def info(self) -> RemoteSandboxRecord:
        return RemoteSandboxRecord.from_view(self._client.json("GET", self._base()))

    def close(self) -> None:
        """Stop the sandbox on the daemon. Idempotent."""
        if self._closed.closed:
            return
        self._closed.closed = True
        self._client._disown(self)
        with contextlib.suppress(SandboxNotFoundError):
            self._client.request("DELETE", f"/v1/sandboxes/{self.id}", timeout=WAIT)

    kill = close

    def __enter__(self) -> RemoteSandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
