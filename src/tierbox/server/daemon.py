"""Running the daemon: uvicorn on a unix socket (and on TCP when asked),
one daemon per state directory, graceful shutdown on SIGTERM.

SIGTERM or SIGINT: the daemon stops taking work (new requests answer 503
``shutting_down``), lets running commands end for the grace period, kills
those still running (they end ``cancelled``, and their clients are told),
and exits 0. Sandboxes stay: they are kept, and the next daemon finds them.
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from tierbox.errors import UsageError
from tierbox.server.db import Database, db_path, default_dir

log = logging.getLogger("tierbox.server")
SOCKET_NAME = "tierbox.sock"


@dataclass
class ServeOptions:
    state_dir: Path
    socket_path: Path | None = None
    listen: str | None = None
    grace_s: float = 30.0
    bench_dir: Path | None = None
    log_level: str = "info"
    access_log: bool = False

    @property
    def unix_path(self) -> Path:
        return self.socket_path or self.state_dir / SOCKET_NAME


def default_socket() -> Path:
    return default_dir() / SOCKET_NAME


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port_s = text.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise UsageError(f"--listen {text!r}: give HOST:PORT, like 127.0.0.1:7700")
    return host.strip("[]") or "127.0.0.1", int(port_s)


@contextlib.contextmanager
def _exclusive(state_dir: Path) -> Iterator[None]:
    """One daemon per state directory."""
    lock = state_dir / "daemon.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise UsageError(
                f"a daemon (pid {other or '?'}) already serves {state_dir}: stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _unix_socket(path: Path) -> socket.socket:
    """A listening unix socket that only its owner can use (0600)."""
    if len(str(path).encode()) > 107:
        raise UsageError(f"socket path {path} is longer than a unix socket allows: give --socket")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # ours (we hold the lock): left by a killed daemon
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"--listen {host}:{port}: {exc.strerror}") from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn, with tierbox's own handling of SIGTERM and SIGINT."""

    def __init__(self, config: uvicorn.Config, service: Any, grace_s: float) -> None:
        super().__init__(config)
        self.service = service
        self.grace_s = grace_s
        self._drain: asyncio.Task[Any] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        if self._drain is not None:
            log.warning("second signal: exiting at once")
            self.force_exit = True
            self.should_exit = True
            return
        log.info("signal %d: draining (grace %.0f s)", sig, self.grace_s)
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            done = await self.service.drain(self.grace_s)
            log.info("drained: %s", done)
        finally:
            self.should_exit = True


def serve(opts: ServeOptions) -> int:
    """Run the daemon until a signal stops it; returns the exit status."""
    from tierbox.server.app import create_app
    from tierbox.server.service import Service

    logging.basicConfig(
        level=getattr(logging, opts.log_level.upper(), logging.INFO),
        format="%(asctime)s tierbox serve %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    opts.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(opts.state_dir, 0o700)
    with _exclusive(opts.state_dir):
        db = Database(db_path(opts.state_dir))
        if opts.listen and db.active_key_count() == 0:
            raise UsageError(
                "refusing to listen on TCP without an API key: "
                "create one with `tierbox keys create --tenant NAME` first"
            )
        socks = [_unix_socket(opts.unix_path)]
        where = [f"unix:{opts.unix_path}"]
        if opts.listen:
            host, port = parse_listen(opts.listen)
            socks.append(_tcp_socket(host, port))
            where.append(f"http://{host}:{socks[-1].getsockname()[1]}")
        service = Service(db, bench_dir=opts.bench_dir)

        async def ready() -> None:
            print(f"tierbox serve: ready on {' and '.join(where)}", file=sys.stderr, flush=True)

        app = create_app(service, on_start=ready)
        config = uvicorn.Config(
            app,
            log_level=opts.log_level,
            access_log=opts.access_log,
            timeout_graceful_shutdown=10,
            lifespan="on",
            ws_ping_interval=20,
            proxy_headers=False,
            server_header=False,
            log_config=None,
        )
        server = _Server(config, service, opts.grace_s)
        try:
            server.run(sockets=socks)
        finally:
            for s in socks:
                s.close()
            with contextlib.suppress(FileNotFoundError):
                opts.unix_path.unlink()
            db.close()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m tierbox.server.daemon [STATE_DIR]`` (tests, debugging)."""
    args = sys.argv[1:] if argv is None else argv
    state = Path(args[0]) if args else default_dir()
    return serve(ServeOptions(state_dir=state))


if __name__ == "__main__":
    raise SystemExit(main())
