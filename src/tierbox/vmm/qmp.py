"""A small QMP (QEMU Machine Protocol) client over a unix socket.

QMP is line-delimited JSON: a greeting, ``qmp_capabilities``, then
``{"execute": ...}`` commands answered by ``{"return": ...}`` or
``{"error": ...}``, with asynchronous ``{"event": ...}`` lines in between.
File descriptors (for ``getfd``, used to migrate into a file) travel as
SCM_RIGHTS ancillary data on the command that needs them.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tierbox.errors import QMPError


class QMPClient:
    """One QMP connection. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: Path, *, timeout_s: float = 10.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._buf = b""
        self._sock: socket.socket | None = None

    def connect(self, *, alive: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Connect (retrying while the socket appears) and negotiate capabilities."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() > deadline or (alive is not None and not alive()):
                    raise QMPError(f"cannot connect to QMP at {self.path}: {exc}") from exc
                time.sleep(0.002)
        self._sock = sock
        greeting = self._read_message(deadline)
        if "QMP" not in greeting:
            raise QMPError(f"unexpected QMP greeting: {greeting}")
        self.execute("qmp_capabilities")
        return greeting

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        fds: list[int] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """Run one command; returns its ``return`` value or raises QMPError."""
        if self._sock is None:
            raise QMPError("QMP is not connected")
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        try:
            if fds:
                self._sock.sendmsg(
                    [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                )
            else:
                self._sock.sendall(data)
        except OSError as exc:
            raise QMPError(f"QMP {command}: {exc}") from exc
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.timeout_s)
        while True:
            reply = self._read_message(deadline)
            if "event" in reply:
                continue  # asynchronous events (STOP, RESUME...): nothing here waits for them
            if "error" in reply:
                err = reply["error"]
                raise QMPError(f"QMP {command} failed: {err.get('class')}: {err.get('desc')}")
            return reply.get("return")

    def _read_message(self, deadline: float) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPError(f"QMP at {self.path} did not answer in time")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                raise QMPError(f"QMP at {self.path} did not answer in time") from exc
            except OSError as exc:
                raise QMPError(f"QMP connection lost: {exc}") from exc
            if not chunk:
                raise QMPError("QMP connection closed: QEMU exited")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg: dict[str, Any] = json.loads(line)
        except ValueError as exc:
            raise QMPError(f"bad QMP message: {line[:200]!r}") from exc
        return msg


def wait_migration(client: QMPClient, *, timeout_s: float) -> None:
    """Poll an outgoing migration to its end; QMPError if it fails or stalls."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = client.execute("query-migrate")
        status = st.get("status") if isinstance(st, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise QMPError(f"migration {status}: {st.get('error-desc', '')}")
        if time.monotonic() > deadline:
            with contextlib.suppress(QMPError):
                client.execute("migrate_cancel")
            raise QMPError(f"migration did not finish in {timeout_s:.0f} s (status {status})")
        time.sleep(0.001)


def load_stream(client: QMPClient, path: Path, *, ignore_shared: bool, deadline: float) -> None:
    """Feed a migration stream to a QEMU started with ``-incoming defer``."""
    client.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "x-ignore-shared", "state": ignore_shared}]},
    )
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        client.execute("getfd", {"fdname": "tierbox-in"}, fds=[fd])
    finally:
        os.close(fd)
    client.execute("migrate-incoming", {"uri": "fd:tierbox-in"})
    while True:
        status = client.execute("query-status").get("status")
        if status != "inmigrate":
            break
        if time.monotonic() > deadline:
            raise QMPError("loading the snapshot did not finish in time")
        time.sleep(0.001)
    st = client.execute("query-migrate")
    if isinstance(st, dict) and st.get("status") == "failed":
        raise QMPError(f"incoming migration failed: {st.get('error-desc', '')}")


def save_stream(client: QMPClient, path: Path, *, ignore_shared: bool, timeout_s: float) -> None:
    """Migrate the (stopped) machine's state into ``path`` through a passed fd.

    QEMU 7.2 has no ``file:`` migration URI; ``fd:`` with ``getfd`` writes
    straight into our file, and needs no helper process (QEMU's seccomp
    filter forbids spawning one anyway).
    """
    client.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "x-ignore-shared", "state": ignore_shared}]},
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        client.execute("getfd", {"fdname": "tierbox-out"}, fds=[fd])
    finally:
        os.close(fd)
    client.execute("migrate", {"uri": "fd:tierbox-out"})
    wait_migration(client, timeout_s=timeout_s)
