"""What the synchronous and asyncio clients share: where the daemon is, how
its answers become results and errors, and how its event streams parse."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tierbox.errors import (
    SandboxClosedError,
    ServerError,
    ServerUnreachableError,
    UsageError,
)
from tierbox.network import Egress, PortMap
from tierbox.server import codes
from tierbox.spec import (
    ExecResult,
    FileEntry,
    FileKind,
    Mount,
    ProcessInfo,
    SandboxSpec,
    Stats,
    Termination,
    TerminationKind,
)

URL_ENV = "TIERBOX_URL"
KEY_ENV = "TIERBOX_API_KEY"
#: requests that wait for work (a VM's boot, a command) have no read timeout
WAIT = httpx.Timeout(None, connect=10.0)
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
#: options of Sandbox.create, as the API spells them
OPTIONS = (
    "memory_mib",
    "cpus",
    "pids",
    "timeout_s",
    "disk_mib",
    "output_bytes",
    "network",
    "env",
    "user",
    "workdir",
    "mounts",
    "ports",
)


@dataclass(frozen=True)
class Endpoint:
    """Where the daemon listens: a unix socket or an http(s) URL."""

    base_url: str
    uds: str | None = None

    @property
    def where(self) -> str:
        return f"unix:{self.uds}" if self.uds else self.base_url

    @classmethod
    def parse(cls, url_or_socket: str | os.PathLike[str] | None) -> Endpoint:
        """``http://host:port``, ``unix:///path/tierbox.sock``, a socket
        path, or None: ``$TIERBOX_URL``, else the default socket."""
        if url_or_socket is None:
            url_or_socket = os.environ.get(URL_ENV) or None
        if url_or_socket is None:
            from tierbox.server.db import default_dir

            return cls("http://tierbox", str(default_dir() / "tierbox.sock"))
        text = os.fspath(url_or_socket)
        if text.startswith(("http://", "https://")):
            return cls(text.rstrip("/"))
        if text.startswith("unix:"):
            path = text[len("unix:") :]
            path = "/" + path.lstrip("/") if path.startswith("//") else path
            return cls("http://tierbox", path)
        if "://" in text:
            raise UsageError(f"{text!r}: give http://HOST:PORT, unix:///PATH or a socket path")
        return cls("http://tierbox", str(Path(text)))


def api_key(given: str | None) -> str | None:
    return given if given is not None else (os.environ.get(KEY_ENV) or None)


def headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def unreachable(endpoint: Endpoint, exc: Exception) -> ServerUnreachableError:
    return ServerUnreachableError(
        f"cannot reach the tierbox daemon at {endpoint.where}: {type(exc).__name__}: {exc}"
        " (is `tierbox serve` running?)"
    )


def check(response: httpx.Response) -> None:
    """Raise the error class the daemon named for an error answer."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    raise codes.error_from(response.status_code, body)


def create_body(
    image: str | None,
    tier: str,
    name: str | None,
    ttl_s: float | None,
    spec: SandboxSpec | None,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON of a create, from Sandbox.create's arguments."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UsageError(
            f"unknown option {', '.join(unknown)}: the options are {', '.join(OPTIONS)}"
        )
    body: dict[str, Any] = {"tier": tier}
    if spec is not None:
        d = spec.to_dict()
        body["image"] = d["image"]
        body.update(d["limits"])
        for k in ("env", "workdir", "user", "mounts", "ports"):
            body[k] = d[k]
        body["network"] = _network_body(spec.network)
    else:
        body["image"] = image
        for k, v in options.items():
            if k == "mounts":
                v = [m.to_dict() if isinstance(m, Mount) else m for m in v]
            elif k == "network":
                v = _network_body(v)
            elif k == "ports":
                v = [p.to_dict() if isinstance(p, PortMap) else p for p in v]
            body[k] = v
    if name is not None:
        body["name"] = name
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    return {k: v for k, v in body.items() if not (k == "image" and v is None)}


def _network_body(network: object) -> object:
    """``network=`` as the API spells it: "none", "host" or {"allow", "dns"}."""
    if isinstance(network, Egress):
        return {"allow": list(network.allow), "dns": network.dns}
    return getattr(network, "value", network)


def exec_body(
    argv: Sequence[str],
    stdin: bytes | str | None,
    env: Mapping[str, str] | None,
    timeout_s: float | None,
    cwd: str | None,
    user: str | None,
    background: bool,
) -> dict[str, Any]:
    if isinstance(argv, str | bytes):
        raise UsageError(f"argv must be a list of strings, not one string: ['sh', '-c', {argv!r}]")
    body: dict[str, Any] = {"argv": list(argv), "background": background}
    if isinstance(stdin, str):
        body["stdin"] = stdin
    elif stdin is not None:
        body["stdin_b64"] = base64.b64encode(bytes(stdin)).decode()
    if env is not None:
        body["env"] = dict(env)
    for k, v in (("timeout_s", timeout_s), ("cwd", cwd), ("user", user)):
        if v is not None:
            body[k] = v
    return body


def result_of(view: Mapping[str, Any]) -> ExecResult:
    """The ExecResult of a command the daemon reports as ended; a command
    that did not end by itself (cancelled, interrupted, its sandbox died)
    raises the error the daemon named."""
    err = view.get("error")
    if view.get("status") in ("cancelled", "interrupted", "error") or err:
        code = (err or {}).get("code") or "server"
        message = (err or {}).get("message") or view.get("message") or view.get("status")
        raise codes.error_from(409, {"code": code, "message": f"command {view['id']}: {message}"})
    r = view.get("result")
    if r is None:
        raise ServerError(
            f"command {view.get('id')} has no result yet (status {view.get('status')})"
        )
    t = r["termination"]
    return ExecResult(
        stdout=base64.b64decode(r["stdout_b64"]),
        stderr=base64.b64decode(r["stderr_b64"]),
        termination=Termination(
            kind=TerminationKind(t["kind"]),
            exit_code=t.get("exit_code"),
            signal=t.get("signal"),
            evidence=dict(t.get("evidence") or {}),
        ),
        duration_s=float(r.get("duration_s") or 0.0),
        stdout_truncated=bool(r.get("stdout_truncated")),
        stderr_truncated=bool(r.get("stderr_truncated")),
    )


def stats_of(d: Mapping[str, Any]) -> Stats:
    names = {f.name for f in dataclasses.fields(Stats)}
    return Stats(**{k: v for k, v in d.items() if k in names})


def processes_of(rows: Iterable[Mapping[str, Any]]) -> list[ProcessInfo]:
    return [
        ProcessInfo(
            pid=r["pid"],
            ppid=r["ppid"],
            user=str(r["user"]),
            argv=list(r["argv"]),
            state=r["state"],
        )
        for r in rows
    ]


def entries_of(rows: Iterable[Mapping[str, Any]]) -> list[FileEntry]:
    return [
        FileEntry(
            name=r["name"], kind=FileKind(r["kind"]), size=r.get("size", 0), mode=r.get("mode")
        )
        for r in rows
    ]


@dataclass(frozen=True)
class RemoteSandboxRecord:
    """A sandbox as the daemon lists it (``client.sandboxes.list()``)."""

    id: str
    name: str | None
    tier: str
    image: str | None
    created_unix: float
    state: str
    tenant: str
    expires_unix: float | None
    memory_mib: int | None
    memory_bytes: int | None = None
    memory_peak_bytes: int | None = None

    @classmethod
    def from_view(cls, v: Mapping[str, Any]) -> RemoteSandboxRecord:
        return cls(
            id=v["id"],
            name=v.get("name"),
            tier=v["tier"],
            image=v.get("image"),
            created_unix=float(v["created_unix"]),
            state=v["state"],
            tenant=v["tenant"],
            expires_unix=v.get("expires_unix"),
            memory_mib=v.get("memory_mib"),
            memory_bytes=v.get("memory_bytes"),
            memory_peak_bytes=v.get("memory_peak_bytes"),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RemoteSnapshot:
    """A snapshot the daemon keeps for its tenant; restore or clone it with
    ``client.sandboxes.restore(snap)`` / ``clone(snap, n)``."""

    id: str
    tier: str
    sandbox_id: str
    kind: str
    created_unix: float
    name: str | None = None

    @classmethod
    def from_view(cls, v: Mapping[str, Any]) -> RemoteSnapshot:
        return cls(
            id=v["id"],
            tier=v["tier"],
            sandbox_id=v["sandbox_id"],
            kind=v["kind"],
            created_unix=float(v["created_unix"]),
            name=v.get("name"),
        )


def snapshot_id(snap: RemoteSnapshot | str) -> str:
    return snap.id if isinstance(snap, RemoteSnapshot) else str(snap)


class SSEParser:
    """Server-Sent Events, fed line by line: ``(event, data)`` pairs."""

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, dict[str, Any]] | None:
        if line == "":
            if not self._data:
                return None
            event, data = self._event, "\n".join(self._data)
            self._event, self._data = "message", []
            return event, json.loads(data)
        if line.startswith("event:"):
            self._event = line[6:].strip()
        elif line.startswith("data:"):
            self._data.append(line[5:].lstrip(" "))
        return None


def chunk_of(event: Mapping[str, Any]) -> bytes:
    return base64.b64decode(event["data_b64"])


class Closed:
    """Remembers that a remote sandbox was closed from here."""

    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self.closed = False

    def check(self) -> None:
        if self.closed:
            raise SandboxClosedError(f"sandbox {self.sandbox_id} is closed")


def wait_deadline(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else time.monotonic() + timeout_s
