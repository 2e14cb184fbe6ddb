"""Leftovers of microVMs whose owner crashed: QEMUs named ``tierbox-<id>``,
RAM files in /dev/shm, sandbox directories with their cgroups, network
gateways (router namespace, tap, pasta), the per-sandbox uids their QEMUs
ran as, half-made snapshots and conversion helpers (``tierbox gc``;
``Tier.reap``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

from tierbox.host import netgw, uids
from tierbox.host.cgroups import SandboxCgroup, cgroup_version
from tierbox.paths import MARKER, sandboxes_dir
from tierbox.tiers import _state
from tierbox.tiers.microvm.instance import vm_state_file
from tierbox.vmm import qemu

#: Half-made snapshots and conversion helpers older than this are leftovers.
STALE_AFTER_S = 600.0


def reap_leftovers(live: set[str], snapshots_root: Path) -> list[str]:
    """Kill QEMUs and remove RAM files and sandbox directories of microVMs
    whose id is not in ``live`` (crashed owners, or QEMU already dead), and
    stale half-made snapshots under ``snapshots_root``; a line per thing removed."""
    removed: list[str] = []
    ours: set[str] = set()  # microVM sandboxes found here, live or not
    running = qemu.find_marked_qemus(sandboxes_dir())
    for sid, pid in sorted(running.items()):
        ours.add(sid)
        d = _state.sandbox_dir(sid)
        if sid in live and d.is_dir():
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        removed.append(f"qemu process {pid} ({qemu.process_name(sid)})")
    ram_dir = qemu.ram_file("x").parent
    if ram_dir.is_dir():
        time.sleep(0.05)  # let the QEMUs killed above exit
        in_use = qemu.ram_files_in_use()
        for f in sorted(ram_dir.glob(f"{MARKER}-*.ram")):
            sid = f.name[len(MARKER) + 1 : -len(".ram")]
            if sid not in live and str(f) not in in_use:
                f.unlink(missing_ok=True)
                removed.append(f"microVM RAM file {f}")
    base = sandboxes_dir()
    stale = time.time() - STALE_AFTER_S
    if base.is_dir():
        for d in sorted(base.iterdir()):
            if d.name.startswith(".helper"):
                if _mtime(d) < stale:
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(f"directory {d}")
                continue
            if not vm_state_file(d).exists():
                continue
            ours.add(d.name)
            if d.name in live:
                continue
            # an unreadable record only leaves its cgroup, which gc's cgroup walk removes
            with contextlib.suppress(OSError, ValueError):
                vm = json.loads(vm_state_file(d).read_text())
                if vm.get("cgroup"):
                    SandboxCgroup(relpath=vm["cgroup"], version=cgroup_version()).destroy()
            shutil.rmtree(d, ignore_errors=True)
            removed.append(f"microVM directory {d}")
    removed += _reap_gateways(live, ours)
    removed += uids.reap(live)  # the VMM users of microVMs that are gone
    snaps = snapshots_root
    if snaps.is_dir():
        for tmp in snaps.glob(".tmp-*"):
            if _mtime(tmp) < stale:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(f"unfinished snapshot {tmp}")
    return removed


def _reap_gateways(live: set[str], ours: set[str]) -> list[str]:
    """Gateways of microVMs that are not live: those of sandboxes found
    above, and tap gateways whose sandbox left nothing else (killed between
    making its gateway and writing vm.json). Another tier's gateways stay."""
    keep = set(live)
    for sid in netgw.recorded():
        if sid not in ours and _gateway_kind(sid) != "tap":
            keep.add(sid)
    return netgw.reap(keep)


def _gateway_kind(sandbox_id: str) -> str | None:
    try:
        record = json.loads((netgw.records_dir() / f"{sandbox_id}.json").read_text())
    except (OSError, ValueError):
        return None
    return record.get("kind") if isinstance(record, dict) else None


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0
