"""Where pools and functions are kept between processes.

Definitions (spec, template snapshot, autoscaler history) are durable:
``$TIERBOX_POOLS`` or ``$TIERBOX_HOME/pools``. The hosting process's
runtime files (pid, socket, lock, log) live under ``$TIERBOX_RUN/pools``,
or ``$TIERBOX_POOLS/run`` when ``TIERBOX_POOLS`` is set (so a second pool
host, as the tests run, shares nothing with the first).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from tierbox import paths
from tierbox.pools.spec import check_name

POOLS_ENV = "TIERBOX_POOLS"


def home() -> Path:
    value = os.environ.get(POOLS_ENV)
    return Path(value) if value else paths.home() / "pools"


def run_dir() -> Path:
    value = os.environ.get(POOLS_ENV)
    return Path(value) / "run" if value else paths.run_dir() / "pools"


def _dir(sub: str) -> Path:
    d = home() / sub
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def pool_file(name: str) -> Path:
    return _dir("pools") / f"{check_name(name)}.json"


def function_file(name: str) -> Path:
    return _dir("functions") / f"{check_name(name, 'function')}.json"


def write(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a crash leaves the old record or the new one. The
    temporary name is the writer's own (threads of the host save one pool's
    record at the same time: a shared name let one rename the other's away)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def records(kind: str) -> list[dict[str, Any]]:
    """Every saved pool (``pools``) or function (``functions``) record."""
    d = home() / kind
    if not d.is_dir():
        return []
    out = []
    for f in sorted(d.glob("*.json")):
        data = read(f)
        if data is not None:
            out.append(data)
    return out


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def pid_file() -> Path:
    return run_dir() / "manager.pid"


def socket_path() -> Path:
    return run_dir() / "manager.sock"


def lock_file() -> Path:
    return run_dir() / "manager.lock"


def log_file() -> Path:
    return run_dir() / "manager.log"
