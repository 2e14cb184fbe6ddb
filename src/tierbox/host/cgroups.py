"""Per-sandbox cgroups on cgroup v1 (and hybrid) and v2 hosts.

Every sandbox gets one cgroup made by tierbox, ``tierbox/<id>``, holding its
limits and its counters. Engines put their work *inside* it (the process tier
directly, OCI runtimes in a child ``ctr`` cgroup), so the counters tierbox
reads - ``oom_kill``, peak memory - survive the engine deleting its own cgroup
when a container exits. That is how an OOM-killed child process is caught
even when PID 1 exits 0.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from tierbox.errors import HostError
from tierbox.paths import MARKER
from tierbox.spec import Limits, Stats

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: v1 controllers tierbox uses; cpu and cpuacct may be co-mounted or separate.
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer")
CPU_PERIOD_US = 100_000


@cache
def cgroup_version() -> int:
    """2 on a pure cgroup2 host, 1 on v1 or hybrid hosts (controllers live on v1)."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return 2
    if (CGROUP_ROOT / "memory").is_dir():
        return 1
    raise HostError("no usable cgroup hierarchy under /sys/fs/cgroup: mount cgroup v1 or v2")


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _write_str(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _read_int(path: Path) -> int | None:
    text = _read(path).strip()
    return int(text) if text.lstrip("-").isdigit() else None


def _read_keyed(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


_local = threading.local()


def _thread_home() -> dict[str, str]:
    """The calling thread's own v1 cgroups, read once per thread."""
    home: dict[str, str] | None = getattr(_local, "home", None)
    if home is None:
        home = {}
        with open("/proc/thread-self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                for c in ctrls.split(","):
                    home[c] = path
        _local.home = home
    return home


def own_paths() -> dict[str, str]:
    """The calling thread's cgroup per controller (v1 names, ``""`` for
    cgroup2): where a runtime puts a relative ``cgroupsPath``."""
    return dict(_thread_home())


@cache
def _v1_mounted() -> tuple[str, ...]:
    return tuple(c for c in V1_CONTROLLERS if (CGROUP_ROOT / c).is_dir())


@dataclass
class SandboxCgroup:
    """The cgroup of one sandbox. ``relpath`` is e.g. ``tierbox/abc123``."""

    relpath: str
    version: int

    def __post_init__(self) -> None:
        # Paths computed once: sandbox start is a hot path.
        if self.version == 2:
            self._dirs = {"": CGROUP_ROOT / self.relpath}
        else:
            self._dirs = {c: CGROUP_ROOT / c / self.relpath for c in _v1_mounted()}
        # Spawning moves a thread into each hierarchy the child must start in:
        # the limiting and accounting ones. Not freezer (kill_all copes without
        # it) and not cpu unless a quota is set, as each move costs a write.
        self._tasks = [
            str(d / "tasks")
            for c, d in self._dirs.items()
            if c in ("memory", "pids", "cpuacct") or (c == "cpu" and self._cpu_limited(d))
        ]

    @staticmethod
    def _cpu_limited(d: Path) -> bool:
        quota = _read_int(d / "cpu.cfs_quota_us")
        return quota is not None and quota > 0

    # ---- paths -------------------------------------------------------------
    def dirs(self) -> dict[str, Path]:
        """Controller name -> directory (v2: the single directory under key "")."""
        return self._dirs

    def _dir(self, controller: str) -> Path:
        return self._dirs[""] if self.version == 2 else self._dirs[controller]

    @property
    def child_relpath(self) -> str:
        """Where an OCI runtime should place the container: a child of ours."""
        return f"{self.relpath}/ctr"

    # ---- life cycle --------------------------------------------------------
    @classmethod
    def create(cls, name: str, limits: Limits) -> SandboxCgroup:
        """Make ``tierbox/<name>`` with the limits applied."""
        version = cgroup_version()
        cg = cls(relpath=f"{MARKER}/{name}", version=version)
        try:
            if version == 2:
                cg._create_v2(limits)
            else:
                cg._create_v1(limits)
                cg.__post_init__()  # the cpu quota now exists
        except OSError as exc:
            cg.destroy()
            raise HostError(f"cannot set up cgroup {cg.relpath}: {exc}") from exc
        return cg

    def _create_v1(self, limits: Limits) -> None:
        for ctrl, d in self.dirs().items():
            d.mkdir(parents=True, exist_ok=True)
            if ctrl == "memory" and limits.memory_mib is not None:
                limit = str(limits.memory_mib * 1024 * 1024)
                _write(d / "memory.limit_in_bytes", limit)
                if (d / "memory.memsw.limit_in_bytes").exists():
                    # swap equal to memory: the sandbox may not swap past its limit
                    _write(d / "memory.memsw.limit_in_bytes", limit)
            elif ctrl == "pids" and limits.pids is not None:
                _write(d / "pids.max", str(limits.pids))
            elif ctrl == "cpu" and limits.cpus is not None:
                _write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(d / "cpu.cfs_quota_us", str(int(limits.cpus * CPU_PERIOD_US)))

    def _create_v2(self, limits: Limits) -> None:
        parent = CGROUP_ROOT / MARKER
        parent.mkdir(exist_ok=True)
        wanted = {"memory", "pids", "cpu"}
        enabled = set(_read(CGROUP_ROOT / "cgroup.subtree_control").split())
        for c in sorted(wanted - enabled):
            with contextlib.suppress(OSError):
                _write(CGROUP_ROOT / "cgroup.subtree_control", f"+{c}")
        for c in sorted(wanted):
            with contextlib.suppress(OSError):
                _write(parent / "cgroup.subtree_control", f"+{c}")
        d = CGROUP_ROOT / self.relpath
        d.mkdir(exist_ok=True)
        if limits.memory_mib is not None:
            _write(d / "memory.max", str(limits.memory_mib * 1024 * 1024))
            with contextlib.suppress(OSError):
                _write(d / "memory.swap.max", "0")
        if limits.pids is not None:
            _write(d / "pids.max", str(limits.pids))
        if limits.cpus is not None:
            _write(d / "cpu.max", f"{int(limits.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")

    def enable_child_controllers(self) -> None:
        """v2 only: let a child cgroup (the OCI runtime's) use our controllers."""
        if self.version == 2:
            for c in ("memory", "pids", "cpu"):
                with contextlib.suppress(OSError):
                    _write(CGROUP_ROOT / self.relpath / "cgroup.subtree_control", f"+{c}")

    # ---- placing work ------------------------------------------------------
    @contextlib.contextmanager
    def _thread_inside(self) -> Iterator[None]:
        """v1: move only the calling thread in, and back out afterwards.

        A child forked meanwhile is born inside the cgroup, so a fork bomb or
        a memory hog cannot run a single instruction outside its limits - and
        it costs a few file writes instead of a ``preexec_fn`` (which disables
        vfork and triples spawn time).
        """
        tid = str(threading.get_native_id())
        home = _thread_home()
        for tasks in self._tasks:
            _write_str(tasks, tid)
        try:
            yield
        finally:
            for tasks in self._tasks:
                ctrl = tasks[len(str(CGROUP_ROOT)) + 1 :].split("/", 1)[0]
                with contextlib.suppress(OSError):
                    _write_str(f"{CGROUP_ROOT}/{ctrl}{home.get(ctrl, '/')}/tasks", tid)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` already inside this cgroup."""
        if self.version == 2:
            procs = str(CGROUP_ROOT / self.relpath / "cgroup.procs")
            previous = kwargs.pop("preexec_fn", None)

            def _join() -> None:
                _write(Path(procs), "0")
                if previous is not None:
                    previous()

            return subprocess.Popen(list(argv), preexec_fn=_join, **kwargs)
        with self._thread_inside():
            return subprocess.Popen(list(argv), **kwargs)

    # ---- counters ----------------------------------------------------------
    def has_tasks(self) -> bool:
        """Anything still running in the sandbox (one counter read)."""
        d = self._dir("pids") if self.version == 1 else self._dirs[""]
        count = _read_int(d / "pids.current")
        return bool(count) if count is not None else bool(self.pids())

    def pids(self) -> list[int]:
        d = self._dir("pids") if self.version == 1 else CGROUP_ROOT / self.relpath
        out: list[int] = []
        for root, _dirs, _files in os.walk(d):
            out.extend(int(p) for p in _read(Path(root) / "cgroup.procs").split())
        return out

    def oom_kills(self) -> int:
        """OOM kills charged to this sandbox (v1 memory.oom_control, v2 memory.events)."""
        if self.version == 2:
            return _read_keyed(CGROUP_ROOT / self.relpath / "memory.events").get("oom_kill", 0)
        return _read_keyed(self._dir("memory") / "memory.oom_control").get("oom_kill", 0)

    def reset_peak(self) -> None:
        """Start a new peak-memory window (v1 and v2 >= 6.12 allow it)."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        with contextlib.suppress(OSError):
            _write(self._dir("memory") / name, "0")

    def pids_max_hits(self) -> int:
        """Forks refused because the pids limit was reached (pids.events "max")."""
        d = CGROUP_ROOT / self.relpath if self.version == 2 else self._dir("pids")
        return _read_keyed(d / "pids.events").get("max", 0)

    def memory_limit_bytes(self) -> int | None:
        if self.version == 2:
            return _read_int(CGROUP_ROOT / self.relpath / "memory.max")
        return _read_int(self._dir("memory") / "memory.limit_in_bytes")

    def stats(self) -> Stats:
        if self.version == 2:
            d = CGROUP_ROOT / self.relpath
            cpu = _read_keyed(d / "cpu.stat")
            cpu_us, throttled_us = cpu.get("usage_usec"), cpu.get("throttled_usec")
            return Stats(
                memory_bytes=_read_int(d / "memory.current"),
                memory_peak_bytes=_read_int(d / "memory.peak"),
                cpu_s=cpu_us / 1e6 if cpu_us is not None else None,
                pids=_read_int(d / "pids.current"),
                oom_kills=self.oom_kills(),
                cpu_throttled_s=throttled_us / 1e6 if throttled_us is not None else None,
            )
        mem = self._dir("memory")
        cpu_ns = _read_int(self._dir("cpuacct") / "cpuacct.usage")
        cpu_dir = self._dirs.get("cpu")
        throttled_ns = _read_keyed(cpu_dir / "cpu.stat").get("throttled_time") if cpu_dir else None
        return Stats(
            memory_bytes=_read_int(mem / "memory.usage_in_bytes"),
            memory_peak_bytes=_read_int(mem / "memory.max_usage_in_bytes"),
            cpu_s=cpu_ns / 1e9 if cpu_ns is not None else None,
            pids=_read_int(self._dir("pids") / "pids.current"),
            oom_kills=self.oom_kills(),
            cpu_throttled_s=throttled_ns / 1e9 if throttled_ns is not None else None,
        )

    # ---- teardown ----------------------------------------------------------
    def freeze(self, frozen: bool = True) -> bool:
        """Freeze (or thaw) every process in the cgroup: a frozen process
        runs nothing until thawed. False where this host has no freezer."""
        if self.version == 2:
            path, value = CGROUP_ROOT / self.relpath / "cgroup.freeze", "1" if frozen else "0"
        else:
            path = self._dir("freezer") / "freezer.state"
            value = "FROZEN" if frozen else "THAWED"
        try:
            _write(path, value)
        except OSError:
            return False
        return True

    def signal_all(self, sig: int = signal.SIGKILL) -> int:
        """One pass of ``sig`` to every process in the cgroup, not waiting for
        them to exit (a SIGKILLed process runs no more of its own code);
        :meth:`kill_all` is the thorough kill. Returns the processes signalled."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return len(pids)

    def kill_all(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every process, freezing first so a fork bomb cannot outrun us."""
        if self.version == 2:
            kill_file = CGROUP_ROOT / self.relpath / "cgroup.kill"
            if kill_file.exists():
                with contextlib.suppress(OSError):
                    _write(kill_file, "1")
        freezer = self._dir("freezer") if self.version == 1 else None
        frozen = False
        if freezer is not None and (freezer / "freezer.state").exists():
            with contextlib.suppress(OSError):
                _write(freezer / "freezer.state", "FROZEN")
                frozen = True
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                pids = self.pids()
                if not pids:
                    return
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if time.monotonic() > deadline:
                    raise HostError(f"processes {pids} in cgroup {self.relpath} did not die")
                if frozen and freezer is not None:
                    # killed tasks only exit once thawed
                    _write(freezer / "freezer.state", "THAWED")
                    frozen = False
                time.sleep(0.002)
        finally:
            if frozen and freezer is not None:
                with contextlib.suppress(OSError):
                    _write(freezer / "freezer.state", "THAWED")

    def destroy(self) -> None:
        """Kill what is left and remove the cgroup (children first). Idempotent."""
        if self.has_tasks():
            with contextlib.suppress(HostError):
                self.kill_all()
        for d in self.dirs().values():
            _rmdir_tree(d)


def _rmdir_tree(d: Path) -> None:
    if not d.exists():
        return
    for root, dirs, _files in os.walk(d, topdown=False):
        for name in dirs:
            _rmdir_retry(Path(root) / name)
    _rmdir_retry(d)


def _rmdir_retry(d: Path, attempts: int = 50) -> None:
    for _ in range(attempts):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            time.sleep(0.01)


def leftover_cgroups() -> list[SandboxCgroup]:
    """Sandbox cgroups under ``tierbox/`` - after a crash these are leftovers."""
    version = cgroup_version()
    base = CGROUP_ROOT / MARKER if version == 2 else CGROUP_ROOT / "memory" / MARKER
    names: set[str] = set()
    if version == 1:
        for c in V1_CONTROLLERS:
            d = CGROUP_ROOT / c / MARKER
            if d.is_dir():
                names.update(p.name for p in d.iterdir() if p.is_dir())
    elif base.is_dir():
        names.update(p.name for p in base.iterdir() if p.is_dir())
    return [SandboxCgroup(relpath=f"{MARKER}/{n}", version=version) for n in sorted(names)]


_SANDBOX_ID = re.compile(r"(?:^|[-/])([0-9a-f]{12})(?:$|[-/.])")


def remove_empty_leftovers(live: set[str]) -> list[str]:
    """Empty cgroup directories of sandboxes that are gone: runtime-made ones
    in hierarchies tierbox itself does not use (crun creates its cgroup in
    every v1 hierarchy), and libvirt's ``machine/qemu-N-tierbox-*`` left
    behind when libvirtd died mid-run. A directory that names a live sandbox
    is never touched, nor are the ``tierbox`` parents (they are not
    leftovers); one that is in use refuses rmdir and is left alone."""
    removed: list[str] = []
    candidates: list[Path] = []
    roots = (
        [CGROUP_ROOT] if cgroup_version() == 2 else [p for p in CGROUP_ROOT.iterdir() if p.is_dir()]
    )
    for root in roots:
        for top in root.glob(f"{MARKER}*"):
            # other processes make and remove cgroups meanwhile: a walk that
            # finds a directory gone just skips it
            for parent, dirs, _files in os.walk(top, onerror=lambda _exc: None):
                candidates += [Path(parent) / d for d in dirs]
            if top.name != MARKER:
                candidates.append(top)
        candidates += [p for p in root.glob(f"machine/qemu-*-{MARKER}-*") if p.is_dir()]
    for d in sorted(candidates, key=lambda p: -len(p.parts)):
        owner = _SANDBOX_ID.search(str(d.relative_to(CGROUP_ROOT)))
        if owner is None or owner.group(1) in live:
            continue
        with contextlib.suppress(OSError):
            if not _read(d / "cgroup.procs").strip():
                d.rmdir()
                if not d.exists() and len(d.relative_to(CGROUP_ROOT).parts) <= 3:
                    removed.append(f"cgroup {d.relative_to(CGROUP_ROOT)}")
    return removed
