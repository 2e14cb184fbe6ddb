"""Prepared sandbox slots (a directory and a cgroup) reused by one-shot runs.

Making and removing a cgroup in five v1 hierarchies plus its directory costs
about 1.3 ms, and moving a task into a freshly made memory cgroup right after
another was removed can cost milliseconds more; a one-shot ``/bin/true``
takes 0.7 ms (process) to 7 ms (crun). So one-shot runs borrow an empty slot
and give it back. OOM and pids counters are monotonic: each run reads them
against the values left by the previous one, and the peak-memory window is
reset. A slot that is not pristine after a run (a task still inside, files
left in its work directory) is destroyed, never reused. Slots belong to this
process: closed at exit, and ``tierbox gc`` reaps them after a crash.
"""

from __future__ import annotations

import atexit
import os
import shutil
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierbox.host.cgroups import SandboxCgroup
from tierbox.paths import sandboxes_dir
from tierbox.spec import Limits
from tierbox.tiers import _state, teardown
from tierbox.tiers.base import meter


@dataclass
class Slot:
    id: str
    dir: Path
    cg: SandboxCgroup
    key: tuple[object, ...]
    #: (oom_kills, pids_max_hits) when the slot was last handed back
    counters: tuple[int, int]
    #: what a tier attached to the slot (process: uid, private /tmp), kept
    #: while the slot is pooled
    extra: dict[str, Any] = field(default_factory=dict)
    #: undone, last first, when the slot is destroyed
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def refresh_counters(self) -> None:
        self.counters = (self.cg.oom_kills(), self.cg.pids_max_hits())


def _key(limits: Limits, variant: object = None) -> tuple[object, ...]:
    return (limits.memory_mib, limits.cpus, limits.pids, limits.disk_mib, variant)


def new_slot(limits: Limits, variant: object = None) -> Slot:
    """A fresh, claimed slot (also what long-lived sandboxes start from)."""
    sandbox_id = _state.new_id()
    d = _state.make_dir(sandbox_id)
    try:
        cg = SandboxCgroup.create(sandbox_id, limits)
    except BaseException:
        discard_dir(d)
        raise
    return Slot(sandbox_id, d, cg, _key(limits, variant), (cg.oom_kills(), cg.pids_max_hits()))


def destroy(slot: Slot, *, wait: bool = False) -> None:
    """Kill what runs, then undo what the tier attached, then drop the dir
    (``wait``: before returning, as at exit)."""
    slot.cg.destroy()
    while slot.cleanups:
        slot.cleanups.pop()()
    discard_dir(slot.dir, wait=wait)


class SlotPool:
    MAX_IDLE = 4  # per distinct set of limits

    def __init__(self) -> None:
        self._idle: dict[tuple[object, ...], list[Slot]] = {}
        self._lock = threading.Lock()
        _pools.add(self)
        atexit.register(self.close_all)

    def acquire(self, limits: Limits, variant: object = None) -> Slot:
        """An idle slot made for these limits (and ``variant``: what else a
        tier keys its slots by), or a new one."""
        with self._lock:
            idle = self._idle.get(_key(limits, variant))
            slot = idle.pop() if idle else None
        slot = slot or new_slot(limits, variant)
        meter(slot.cg.stats)  # the run history samples the one-shot's cgroup
        return slot

    def release(self, slot: Slot, *, pristine: bool) -> None:
        meter(None)
        if not pristine or slot.cg.has_tasks():
            destroy(slot)
            return
        slot.cg.reset_peak()
        with self._lock:
            idle = self._idle.setdefault(slot.key, [])
            if len(idle) < self.MAX_IDLE:
                idle.append(slot)
                return
        destroy(slot)

    def close_all(self) -> None:
        with self._lock:
            slots = [s for idle in self._idle.values() for s in idle]
            self._idle.clear()
        for slot in slots:
            # at exit: a background delete would be cut short with the process
            destroy(slot, wait=True)


_pools: weakref.WeakSet[SlotPool] = weakref.WeakSet()


def close_all_pools() -> None:
    """Give back every idle slot of this process now (instead of at exit)."""
    for pool in list(_pools):
        pool.close_all()


def discard_dir(d: Path, *, wait: bool = False) -> None:
    """Remove a directory off the hot path: rename into the sandboxes dir's
    trash (instant), delete on the teardown thread (``wait``: at once).
    ``tierbox gc`` empties trash a crash left. Deleting an overlay upper dir
    takes ~20 ms. Python joins background threads before it runs atexit
    handlers, so removals made at exit must wait."""
    trash = sandboxes_dir() / ".trash"
    trash.mkdir(parents=True, exist_ok=True)
    target = trash / f"{d.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(d, target)
    except FileNotFoundError:
        return
    except OSError:
        shutil.rmtree(d, ignore_errors=True)
        return
    if wait:
        shutil.rmtree(target, ignore_errors=True)
        return
    teardown.later(f"directory {d}", lambda: shutil.rmtree(target, ignore_errors=True))
