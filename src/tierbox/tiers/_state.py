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
