"""The one runner for external commands.

Every external tool goes through :func:`run` (to completion) or
:func:`spawn` (long-running: OCI runtimes, QEMU, libvirtd): argv in (never a
shell string), a typed :class:`~tierbox.errors.CommandError` carrying argv,
exit code and stderr (or the tail of the program's log) out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tierbox.errors import CommandError, HostError


def which(tool: str) -> str | None:
    """Full path of ``tool`` on PATH (plus sbin dirs), or None."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/local/sbin"
    return shutil.which(tool, path=path)


def require(tool: str, package: str) -> str:
    """Full path of ``tool``, or a HostError naming the Debian package to install."""
    found = which(tool)
    if found is None:
        raise HostError(f"{tool} is not installed: run `make setup` or `apt-get install {package}`")
    return found


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    timeout_s: float | None = 120.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    message: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion and capture its output.

    Raises CommandError when it exits non-zero (with ``check``), times out, or
    cannot be started.
    """
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(
            args,
            input=input,
            capture_output=True,
            timeout=timeout_s,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if exc.stderr else ""
        raise CommandError(args, None, stderr, message=message) from exc
    except OSError as exc:
        raise CommandError(args, 127, str(exc), message=message) from exc
    if check and proc.returncode != 0:
        raise CommandError(
            args, proc.returncode, proc.stderr.decode(errors="replace"), message=message
        )
    return proc


#: How much of a failed program's log an error carries.
LOG_TAIL_BYTES = 4000


def spawn(
    argv: Sequence[str | Path],
    *,
    launch: Callable[..., subprocess.Popen[bytes]] | None = None,
    message: str | None = None,
    **popen_kwargs: Any,
) -> subprocess.Popen[bytes]:
    """Start a long-running program and return its handle (``proc.args`` keeps
    the argv). A start that fails (no such binary, not executable) raises
    CommandError at once. ``launch`` replaces ``subprocess.Popen`` for callers
    that start it somewhere special (inside a cgroup)."""
    args = [str(a) for a in argv]
    try:
        return (launch or subprocess.Popen)(args, **popen_kwargs)
    except OSError as exc:
        raise CommandError(
            args, 127, str(exc), message=message or f"cannot start {args[0]}"
        ) from exc


def exit_error(
    proc: subprocess.Popen[bytes],
    *,
    message: str,
    log: Path | bytes | str | None = None,
    returncode: int | None = None,
) -> CommandError:
    """The error for a spawned program that failed: its argv, exit code (None
    when it was stopped for taking too long) and the tail of its log."""
    if isinstance(log, Path):
        try:
            with open(log, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - LOG_TAIL_BYTES))
                text = f.read().decode(errors="replace")
        except OSError:
            text = ""
    elif isinstance(log, bytes):
        text = log[-LOG_TAIL_BYTES:].decode(errors="replace")
    else:
        text = (log or "")[-LOG_TAIL_BYTES:]
    args = [str(a) for a in proc.args] if isinstance(proc.args, list) else [str(proc.args)]
    rc = returncode if returncode is not None else proc.returncode
    return CommandError(args, rc, text, message=message)
