"""The one runner for external commands.

Every external tool goes through :func:`run`: argv in (never a shell string),
a typed :class:`~tierbox.errors.CommandError` carrying argv, exit code and
stderr out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence

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
