"""Memory of sandboxes, measured from the host.

PSS (proportional set size) from ``/proc/PID/smaps_rollup`` splits every
shared page between the processes mapping it, so summing PSS over a
sandbox's processes counts shared engine code once across all instances -
the honest figure for "what does one more instance cost". The bench's own
process is never counted. Wasm runs inside the bench process, so its cost is
the growth of the bench's own resident set per instance, over many.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tierbox.host.procs import children_map
from tierbox.paths import MARKER

_PAGE = os.sysconf("SC_PAGE_SIZE")


def pss_bytes(pid: int) -> int | None:
    """PSS of one process, or None when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def total_pss(pids: Iterable[int]) -> int:
    me = os.getpid()
    return sum(p for p in (pss_bytes(pid) for pid in set(pids) if pid != me) if p is not None)


def self_rss_bytes() -> int:
    """Resident set of the bench process (``/proc/self/statm``, field 2)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def self_vm_bytes() -> int:
    """Virtual address space of the bench process (``/proc/self/statm``, field 1)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * _PAGE


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo2() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO = _mallinfo2()


def heap_in_use_bytes() -> int | None:
    """Bytes glibc malloc has handed out and not got back (``mallinfo2``):
    unlike RSS, this grows even when freed heap pages are being reused."""
    if _MALLINFO is None:
        return None
    m = _MALLINFO()
    return int(m.uordblks + m.hblkhd)


def _marked_pids(sandbox_id: str) -> list[int]:
    """Processes whose command line names ``tierbox-<id>`` (QEMU ``-name``,
    container ids), plus all their descendants."""
    needle = f"{MARKER}-{sandbox_id}".encode()
    roots: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            roots.append(int(name))
    if not roots:
        return []
    kids = children_map()
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(kids.get(pid, []))
    return sorted(seen)


def _attr_pids(inst: Any) -> list[int]:
    """pids an instance exposes directly: ``pids()``, ``pid``, or ``.pid`` of
    a process object it holds (``qemu``, ``proc``, ``process``, ``vmm``)."""
    fn = getattr(inst, "pids", None)
    if callable(fn):
        try:
            got = fn()
        except Exception:
            got = None
        if isinstance(got, list | tuple | set):
            return [int(p) for p in got]
    found: list[int] = []
    for name in ("pid", "qemu_pid", "vmm_pid"):
        pid = getattr(inst, name, None)
        if isinstance(pid, int) and pid > 0:
            found.append(pid)
    for name in ("qemu", "proc", "process", "vmm", "popen"):
        obj = getattr(inst, name, None)
        pid = getattr(obj, "pid", None)
        if isinstance(pid, int):
            found.append(pid)
    return found


def sandbox_pids(inst: Any) -> tuple[list[int], str]:
    """The host processes of a sandbox, and how they were found.

    Cgroup-based tiers: every pid in the sandbox's cgroup
    (``SandboxCgroup.pids()``). Otherwise whatever process the instance holds
    or names, plus descendants. The bench process itself is excluded.
    """
    me = os.getpid()
    cg = getattr(inst, "cg", None) or getattr(inst, "cgroup", None)
    if cg is not None and hasattr(cg, "pids"):
        # the sandbox's cgroup holds all of its processes; empty means none (process tier)
        return [p for p in cg.pids() if p != me], "cgroup"
    direct = [p for p in _attr_pids(inst) if p != me]
    if direct:
        kids = children_map()
        seen: set[int] = set()
        todo = list(direct)
        while todo:
            pid = todo.pop()
            if pid not in seen:
                seen.add(pid)
                todo.extend(kids.get(pid, []))
        return sorted(seen - {me}), "instance process"
    sandbox_id = str(getattr(inst, "id", ""))
    if re.fullmatch(r"[0-9a-f]{6,64}", sandbox_id):
        marked = [p for p in _marked_pids(sandbox_id) if p != me]
        if marked:
            return marked, f"processes named {MARKER}-<id>"
    return [], "none found"
