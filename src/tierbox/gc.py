"""``tierbox gc``: find and remove what crashed runs left behind.

A sandbox is live when it is persistent (``tierbox sandbox create``) or the
process that created it still runs. Everything tierbox-named that belongs to
no live sandbox is a leftover: engine containers and VMs, cgroups, mounts
(in the host and the runtime mount namespace), sandbox directories, trash.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tierbox.errors import TierboxError
from tierbox.host import cgroups, mntns, netgw
from tierbox.host.runner import run
from tierbox.paths import sandboxes_dir
from tierbox.pools.reap import reap as reap_pools
from tierbox.tiers import _state, get_tier, tier_names


def _runtime_ns_mounts(prefix: Path) -> list[Path]:
    """Mounts under ``prefix`` as the runtime namespace sees them."""
    if not mntns.hybrid_cgroups() or not mntns.ns_file().exists():
        return []
    proc = run(
        [*mntns.runtime_prefix(), "cat", "/proc/self/mountinfo"],
        check=False,
        timeout_s=10,
    )
    if proc.returncode != 0:
        return []
    tmp = sandboxes_dir() / ".mountinfo"
    tmp.write_bytes(proc.stdout)
    try:
        return mntns.mounts_under(prefix, str(tmp))
    finally:
        tmp.unlink(missing_ok=True)


def collect(everything: bool = False) -> list[str]:
    """Remove leftovers; with ``everything`` also live and kept sandboxes."""
    removed: list[str] = []
    live: set[str] = set() if everything else _state.live_ids()
    for name in tier_names():
        tier = get_tier(name)
        if not tier.available().available:
            continue
        try:
            removed += tier.reap(live)
        except TierboxError as exc:
            removed.append(f"{name}: reap failed: {exc}")
    removed += netgw.reap(live)  # network gateways of any tier
    for cg in cgroups.leftover_cgroups():
        if cg.relpath.rsplit("/", 1)[-1] not in live:
            cg.destroy()
            removed.append(f"cgroup {cg.relpath}")
    removed += cgroups.remove_empty_leftovers(live)
    removed += reap_pools(live)  # pool members are sandboxes: live while their host runs
    base = sandboxes_dir()
    for point in mntns.mounts_under(base):
        if _leftover_mount(point, base, live):
            mntns.umount(point)
            if point not in mntns.mounts_under(point):
                removed.append(f"mount {point}")
    for point in _runtime_ns_mounts(base):
        if _leftover_mount(point, base, live):
            run([*mntns.runtime_prefix(), "umount", "-l", str(point)], check=False)
            if point not in _runtime_ns_mounts(point):
                removed.append(f"mount {point} (runtime namespace)")
    if base.is_dir():
        for d in sorted(base.iterdir()):
            if _is_leftover_dir(d, live):
                shutil.rmtree(d, ignore_errors=True)
                if not d.exists():
                    removed.append(f"directory {d}")
    names = _state.names_dir()
    if names.is_dir():
        for entry in sorted(names.iterdir()):
            holder = _state.name_holder(entry.name)
            if holder is None or holder not in live:
                entry.unlink(missing_ok=True)
                removed.append(f"sandbox name {entry.name}")
    # the namespace goes only when no other process uses it (a lock says so)
    removed += mntns.teardown_runtime_ns()
    return removed


#: a directory being made (``.new-<id>``) older than this was left by a crash
NEW_DIR_GRACE_S = 60.0


def _is_leftover_dir(d: Path, live: set[str]) -> bool:
    if d.name == ".trash":
        return any(d.iterdir())
    if d.name.startswith(".new-"):
        try:
            return time.time() - d.stat().st_mtime > NEW_DIR_GRACE_S
        except OSError:
            return False
    if d.name.startswith(_state.SLOT_PREFIX):  # made ahead by a process that is gone
        return not _state.owner_alive(d)
    return not d.name.startswith(".") and d.name not in live


def _leftover_mount(point: Path, base: Path, live: set[str]) -> bool:
    """A mount of a sandbox that is gone, or one under ``.trash``: a
    directory discarded with a mount still in it has no owner left, and the
    thread deleting it cannot remove a mount point."""
    if point == base:
        return False
    top = point.relative_to(base).parts[0]
    return top == ".trash" or top not in live
