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
from collections.abc import Iterable
from typing import Any

from tierbox.host.procs import children_map
from tierbox.tiers.base import Instance

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


def sandbox_pids(inst: Instance) -> list[int]:
    """The host processes of a sandbox (as the tier declares them), with
    their descendants; the bench process itself excluded."""
    me = os.getpid()
    kids = children_map()
    seen: set[int] = set()
    todo = list(inst.host_pids())
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(kids.get(pid, []))
    return sorted(seen - {me})
