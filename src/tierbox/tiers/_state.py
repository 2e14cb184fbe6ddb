"""Per-sandbox runtime directories and state files.

Each live sandbox owns ``sandboxes_dir()/<id>/`` with a ``state.json`` that
lets another tierbox process (the CLI, the daemon, ``tierbox gc``) find it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from tierbox.errors import SandboxNotFoundError
from tierbox.paths import sandboxes_dir


def new_id() -> str:
    return secrets.token_hex(6)


def sandbox_dir(sandbox_id: str) -> Path:
    return sandboxes_dir() / sandbox_id


def _proc_start(pid: int) -> str:
    """Start time of ``pid`` in clock ticks: (pid, start) names a process uniquely."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return ""


def claim(sandbox_id: str) -> None:
    """Mark the sandbox as owned by this process. ``tierbox gc`` treats a
    sandbox whose owner died (and that is not persistent) as a leftover."""
    pid = os.getpid()
    (sandbox_dir(sandbox_id) / "owner").write_text(f"{pid} {_proc_start(pid)}")


def is_live(sandbox_id: str) -> bool:
    """Persistent (created by ``tierbox sandbox create``) or its owner lives."""
    d = sandbox_dir(sandbox_id)
    try:
        state = json.loads((d / "state.json").read_text())
        if state.get("persistent"):
            return True
    except (OSError, ValueError):
        pass
    try:
        pid_s, _, start = (d / "owner").read_text().partition(" ")
        pid = int(pid_s)
    except (OSError, ValueError):
        return False
    return _proc_start(pid) == start and start != ""


def live_ids() -> set[str]:
    base = sandboxes_dir()
    if not base.is_dir():
        return set()
    return {d.name for d in base.iterdir() if not d.name.startswith(".") and is_live(d.name)}


def write_state(sandbox_id: str, state: dict[str, Any]) -> None:
    d = sandbox_dir(sandbox_id)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, d / "state.json")


def read_state(sandbox_id: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((sandbox_dir(sandbox_id) / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise SandboxNotFoundError(
            f"no sandbox {sandbox_id!r}: `tierbox sandbox ls` lists the live ones"
        ) from exc
    return data


def list_states() -> list[dict[str, Any]]:
    out = []
    base = sandboxes_dir()
    if base.is_dir():
        for d in sorted(base.iterdir()):
            try:
                out.append(json.loads((d / "state.json").read_text()))
            except (OSError, ValueError):
                continue
    return out


def remove_dir(sandbox_id: str) -> None:
    shutil.rmtree(sandbox_dir(sandbox_id), ignore_errors=True)


def safe_join(root: Path, inner: str) -> Path:
    """``inner`` (absolute or relative) resolved under ``root`` without escaping it.

    Symlinks are resolved as if ``root`` were ``/`` so a link to ``/etc``
    inside the sandbox cannot make tierbox touch the host's ``/etc``.
    """
    parts: list[str] = []
    todo = [p for p in inner.split("/") if p not in ("", ".")]
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if parts:
                parts.pop()
            continue
        candidate = root.joinpath(*parts, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise OSError(f"too many symlinks resolving {inner}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                parts = []
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        parts.append(part)
    return root.joinpath(*parts)
