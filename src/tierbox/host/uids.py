"""Host user ids for sandboxes that run as host processes (the process tier).

Each such sandbox gets a uid (and the same gid) of its own from a range no
distribution hands out, so its workload holds no capability, cannot touch
tierbox's cgroups, and cannot signal or ptrace another sandbox's processes
(a shared ``nobody`` would let it). A uid is claimed by creating
``$TIERBOX_RUN/uids/<uid>`` exclusively, holding the sandbox id;
``tierbox gc`` frees the uids of sandboxes that are gone.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from tierbox.errors import HostError
from tierbox.paths import run_dir

#: First uid of the range; far above login users (1000+) and the usual
#: subordinate-id ranges for user namespaces (100000 + n * 65536).
UID_BASE = 1_500_000_000
UID_COUNT = 1 << 20


def uids_dir() -> Path:
    return run_dir() / "uids"


def claim(sandbox_id: str) -> int:
    """A uid no other sandbox holds, recorded as ``sandbox_id``'s."""
    d = uids_dir()
    d.mkdir(parents=True, exist_ok=True)
    for _ in range(64):
        uid = UID_BASE + secrets.randbelow(UID_COUNT)
        try:
            fd = os.open(d / str(uid), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(sandbox_id)
        return uid
    raise HostError(f"no free sandbox uid in {d}: run `tierbox gc`")


def release(uid: int) -> None:
    (uids_dir() / str(uid)).unlink(missing_ok=True)


def reap(live: set[str]) -> list[str]:
    """Free the uids of sandboxes not in ``live``."""
    removed: list[str] = []
    d = uids_dir()
    if not d.is_dir():
        return removed
    for entry in d.iterdir():
        try:
            owner = entry.read_text().strip()
        except OSError:
            continue
        if owner not in live:
            entry.unlink(missing_ok=True)
            removed.append(f"sandbox uid {entry.name} of {owner}")
    return removed
