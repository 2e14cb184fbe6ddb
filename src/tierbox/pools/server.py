"""The pool host process and how the CLI reaches it.

``python -m tierbox.pools`` runs a :class:`~tierbox.pools.manager.PoolManager`
behind a unix socket (``manager.sock``, 0600, in a 0700 directory), one at a
time per pools directory (a lock file says so). The CLI's
:class:`PoolClient` starts it when it is not running and talks to it in
JSON lines: one request, then answer lines; long operations (a drain)
send ``progress`` lines first. The host exits once it holds no pool and no
function. A daemon can host the same manager and speak HTTP instead.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from tierbox import errors
from tierbox.errors import PoolManagerError, TierboxError, UsageError
from tierbox.host.pinned import start_time
from tierbox.pools import store
from tierbox.pools.manager import FunctionSpec, PoolManager, function_pool_spec
from tierbox.pools.spec import PoolSpec

#: a request line longer than this is refused (function data travels in it)
MAX_REQUEST_BYTES = 64 << 20
#: how long the CLI waits for a host it started to answer
START_TIMEOUT_S = 120.0


# ---- the host -------------------------------------------------------------------------


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.server.begin_request()
        line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
        try:
            if not line:
                return
            if len(line) > MAX_REQUEST_BYTES:
                raise UsageError(f"request larger than {MAX_REQUEST_BYTES} bytes")
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                raise UsageError("a request is a JSON object with an 'op'")
            result = self.server.dispatch(req, self._progress)
            self._send({"ok": True, "result": result})
        except TierboxError as exc:
            self._send({"ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}})
        except (ValueError, TypeError, KeyError) as exc:
            self._send(
                {"ok": False, "error": {"type": "UsageError", "message": f"bad request: {exc}"}}
            )
        except BrokenPipeError:
            return
        except Exception as exc:  # a bug of the host's: answered, and its traceback logged
            traceback.print_exc()
            self._send(
                {
                    "ok": False,
                    "error": {
                        "type": "PoolManagerError",
                        "message": f"the pool host failed: {exc!r} (see {store.log_file()})",
                    },
                }
            )
        finally:
            self.server.after_request()

    def _progress(self, text: str) -> None:
        self._send({"progress": text})

    def _send(self, obj: dict[str, Any]) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(json.dumps(obj).encode() + b"\n")
            self.wfile.flush()


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, manager: PoolManager) -> None:
        self.manager = manager
        self._active = 0
        self._active_lock = threading.Lock()
        super().__init__(path, _Handler)

    def begin_request(self) -> None:
        with self._active_lock:
            self._active += 1

    def after_request(self) -> None:
        """Exit once nothing is hosted any more and no request is in flight."""
        with self._active_lock:
            self._active -= 1
            idle = self._active == 0
        if idle and self.manager.empty():
            threading.Thread(target=self.shutdown, daemon=True).start()

    def dispatch(self, req: dict[str, Any], progress: Callable[[str], None]) -> Any:
        m = self.manager
        op = req["op"]
        if op == "ping":
            return {"pid": os.getpid()}
        if op == "create":
            return m.create_pool(PoolSpec.from_dict(req["spec"]))
        if op == "ls":
            return m.statuses()
        if op == "status":
            return m.status(req["name"])
        if op == "scale":
            return m.scale(
                req["name"], min_ready=req.get("min_ready"), max_size=req.get("max_size")
            )
        if op == "drain":
            return m.drain(req["name"], timeout_s=req.get("timeout_s"), progress=progress)
        if op == "update":
            return m.update(req["name"], image=req.get("image"), **req.get("options", {}))
        if op == "rm":
            m.remove_pool(req["name"])
            return {"removed": req["name"]}
        if op == "fn_deploy":
            fn = FunctionSpec.from_dict(req["function"])
            return m.deploy(fn, PoolSpec.from_dict(req["pool"]))
        if op == "fn_ls":
            return m.functions()
        if op == "fn_invoke":
            data = base64.b64decode(req["data_b64"]) if req.get("data_b64") else None
            inv = m.invoke(req["name"], data, timeout_s=req.get("timeout_s"))
            out = inv.to_dict()
            r = inv.result
            out["result"].update(
                stdout_b64=base64.b64encode(r.stdout).decode(),
                stderr_b64=base64.b64encode(r.stderr).decode(),
                stdout_truncated=r.stdout_truncated,
                stderr_truncated=r.stderr_truncated,
                duration_s=r.duration_s,
            )
            return out
        if op == "fn_rm":
            m.remove_function(req["name"])
            return {"removed": req["name"]}
        if op == "shutdown":
            threading.Thread(target=self.shutdown, daemon=True).start()
            return {"stopping": os.getpid()}
        raise UsageError(f"unknown request {op!r}")


def serve() -> int:
    """Run the pool host until it holds nothing (or SIGTERM); 0 when another
    host already runs for this pools directory."""
    d = store.run_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = open(store.lock_file(), "a+")  # noqa: SIM115 - held for the process's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0
    pid = os.getpid()
    store.pid_file().write_text(f"{pid} {start_time(pid)}")
    manager = PoolManager()
    manager.load()
    path = store.socket_path()
    path.unlink(missing_ok=True)
    old_umask = os.umask(0o177)
    try:
        server = _Server(str(path), manager)
    finally:
        os.umask(old_umask)

    def _stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # a host started for a request that then failed does not linger
    threading.Thread(target=_exit_if_idle, args=(server, manager), daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        manager.close()
        path.unlink(missing_ok=True)
        store.pid_file().unlink(missing_ok=True)
        lock.close()
    return 0


def _exit_if_idle(server: _Server, manager: PoolManager, grace_s: float = 30.0) -> None:
    """A host started for nothing (the request failed) does not linger."""
    time.sleep(grace_s)
    with server._active_lock:
        idle = server._active == 0
    if idle and manager.empty():
        server.shutdown()


def host_pid() -> int | None:
    """The running host's pid, if one runs (checked against its start time)."""
    try:
        pid_s, _, start = store.pid_file().read_text().partition(" ")
        pid = int(pid_s)
    except (OSError, ValueError):
        return None
    return pid if start and start_time(pid) == start else None


# ---- the client -----------------------------------------------------------------------


def _raise(error: dict[str, Any]) -> None:
    """The host's error, as the same class where it is one of ours."""
    cls = getattr(errors, str(error.get("type")), None)
    message = str(error.get("message"))
    if isinstance(cls, type) and issubclass(cls, TierboxError):
        try:
            exc = cls(message)
        except TypeError:
            exc = None
        if exc is not None:
            raise exc
    raise PoolManagerError(message)


class PoolClient:
    """Requests to the pool host, started on first use."""

    def __init__(self, *, start: bool = True) -> None:
        self.start = start

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(store.socket_path()))
        except OSError:
            s.close()
            raise
        return s

    def _ensure(self) -> socket.socket:
        try:
            return self._connect()
        except OSError:
            if not self.start:
                raise PoolManagerError(
                    "no pool host is running (`tierbox pool create` starts one)"
                ) from None
        self._spawn()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                return self._connect()
            except OSError:
                if time.monotonic() > deadline:
                    raise PoolManagerError(
                        f"the pool host did not answer in {START_TIMEOUT_S:.0f} s: "
                        f"see {store.log_file()}"
                    ) from None
                time.sleep(0.05)

    @staticmethod
    def _spawn() -> None:
        d = store.run_dir()
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(store.log_file(), "ab") as log:
            subprocess.Popen(
                [sys.executable, "-m", "tierbox.pools"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
                cwd="/",  # pins no directory of the caller's
            )

    def stream(self, op: str, **args: Any) -> Iterator[dict[str, Any]]:
        """Answer lines of one request (progress lines, then the result)."""
        s = self._ensure()
        with s, s.makefile("rwb") as f:
            f.write(json.dumps({"op": op, **args}).encode() + b"\n")
            f.flush()
            yield from _lines(f)

    def call(self, op: str, progress: Callable[[str], None] | None = None, **args: Any) -> Any:
        # A host that is exiting (it held nothing more) still accepts
        # connections until its socket closes, and drops them unanswered: a
        # request that got no line at all was never handled, so it is sent
        # again, to the next host, for a while.
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            answered = False
            for msg in self.stream(op, **args):
                answered = True
                if "progress" in msg:
                    if progress is not None:
                        progress(str(msg["progress"]))
                    continue
                if msg.get("ok"):
                    return msg.get("result")
                _raise(msg.get("error") or {})
            if answered or time.monotonic() > deadline:
                raise PoolManagerError("the pool host closed the connection without an answer")
            time.sleep(0.1)

    # convenience ---------------------------------------------------------------
    def create(self, spec: PoolSpec) -> dict[str, Any]:
        result: dict[str, Any] = self.call("create", spec=spec.to_dict())
        return result

    def deploy(self, fn: FunctionSpec, image: str | None, tier: str, **pool_opts: Any) -> Any:
        spec = function_pool_spec(fn.name, image, tier=tier, **pool_opts)
        return self.call("fn_deploy", function=fn.to_dict(), pool=spec.to_dict())


class _ReadLine(Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...


def _lines(f: _ReadLine) -> Iterator[dict[str, Any]]:
    while True:
        line = f.readline(MAX_REQUEST_BYTES + 1)
        if not line:
            return
        msg = json.loads(line)
        if isinstance(msg, dict):
            yield msg
