"""The ``gvisor`` tier: the same OCI bundle as ``container``, run by runsc.

gVisor's Sentry implements the Linux system call surface in user space, so
the workload never talks to the host kernel directly. On hosts without KVM
support for gVisor (this includes nested VMs) the ``ptrace`` platform is used;
``systrap`` where the installed runsc has it.

Limits mean what they mean on the other tiers, although runsc enforces
neither of them on the workload alone:

- memory: the Sentry keeps no memory limit of its own (its cgroupfs
  ``memory.limit_in_bytes`` is a stub, ``--total-memory`` only sizes
  /proc/meminfo), so the one hard limit is the host cgroup holding the whole
  sandbox. The workload's memory (anonymous memory, tmpfs, cached file pages)
  lives in the Sentry's memory file and is charged to that cgroup as shmem;
  everything else charged there is the engine's (Sentry, Gofer, runsc, ptrace
  stubs, kernel memory). The cgroup gets ``memory_mib`` plus the engine's
  footprint as measured on this host for this runsc (:class:`EngineFootprint`),
  so the workload can use about ``memory_mib``, and stats and OOM evidence
  report the two shares apart. A host OOM kill stops the whole sandbox.
- pids: the Sentry enforces RLIMIT_NPROC (a fork past it fails with EAGAIN
  and the sandbox lives on), so ``pids`` becomes the workload's RLIMIT_NPROC
  and ``stats().pids`` is the Sentry's own process count. The host cgroup only
  gets a separate, generous cap on runsc's threads: on the ptrace platform
  each workload process costs the host ~10 threads (its stub process, one
  traced thread per Sentry thread that ran it), and those are never given back.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import platform as host_platform
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

from tierbox.errors import (
    CommandError,
    FileTooLargeError,
    HostError,
    NotRegularFileError,
    NotSupportedError,
    SandboxDeadError,
    SandboxError,
    SandboxFileError,
)
from tierbox.host.cgroups import SandboxCgroup, cgroup_version
from tierbox.host.locks import file_lock
from tierbox.host.rootfs import RootDir
from tierbox.host.runner import run, which
from tierbox.paths import home
from tierbox.spec import (
    MIB,
    ExecResult,
    FileEntry,
    FileKind,
    Limits,
    NetworkPolicy,
    ProcessInfo,
    SandboxSpec,
    Stats,
)
from tierbox.tiers.base import Availability
from tierbox.tiers.commands import Command, ExecRequest, MappedCommand, OutputCallback
from tierbox.tiers.oci_runtime import INIT_BINARY, OciInstance, OciTier, container_id
from tierbox.tiers.outcome import engine_evidence

#: Host threads runsc may hold: a base for the Sentry, Gofer and runsc's own
#: Go runtimes, plus this many per workload process. Measured here: ~33 at
#: idle and 9-12 per process; processes that fork in a loop make the ptrace
#: platform add a traced thread per Sentry thread to every pooled stub, so
#: the per-process figure is 3x what a steady workload needs. Past the cap
#: runsc cannot start a thread and the sandbox dies.
ENGINE_TASKS_BASE = 256
ENGINE_TASKS_PER_PROCESS = 32
#: The engine reserve covers the stubs of a small pipeline (sh and a few commands).
RESERVE_PROCESSES = 4
#: Bump when the measurement changes, so older caches are not reused.
FOOTPRINT_FORMAT = 2


@cache
def _platform(runsc: str) -> str:
    """systrap (faster) when this runsc knows it, else ptrace."""
    try:
        text = run([runsc, "help", "platforms"], timeout_s=10, check=False).stdout.decode()
    except CommandError:
        text = ""
    return "systrap" if "systrap" in text else "ptrace"


BUSYBOX_HOST = "/bin/busybox"  # Debian busybox-static: no libraries needed inside
BUSYBOX = "/.tierbox/busybox"
FILE_OP_TIMEOUT_S = 60.0
# Exit codes of the file scripts below (busybox sh inside the sandbox).
_GONE, _NOT_REGULAR, _TOO_BIG = 2, 3, 4

# Each script runs as the workload's user, inside the Sentry: paths resolve in
# the sandbox's own filesystem, never the host's. A FIFO or device is refused
# before it is opened; what races past that check can only block inside the
# sandbox, until FILE_OP_TIMEOUT_S.
_KIND = 'k=$(stat -c %F -- "$1" 2>/dev/null) || { echo "No such file or directory" >&2; exit 2; }'
_PUT = (
    'd=${1%/*}; [ -n "$d" ] && { mkdir -p -- "$d" || exit 2; }; '
    'if [ -e "$1" ] || [ -L "$1" ]; then ' + _KIND + "; "
    '[ "$k" = "regular file" ] || [ "$k" = "regular empty file" ] || '
    '{ echo "$k" >&2; exit 3; }; fi; '
    'cat > "$1" && chmod "$2" "$1"'
)
_GET = (
    _KIND + '; [ "$k" = "regular file" ] || [ "$k" = "regular empty file" ] || '
    '{ echo "$k" >&2; exit 3; }; '
    'n=$(stat -L -c %s -- "$1") || exit 2; [ "$n" -le "$2" ] || { echo "$n" >&2; exit 4; }; '
    'exec cat -- "$1"'
)
# One slice of a file for streamed copies: $2 is the slice index.
_SLICE = (
    _KIND + '; [ "$k" = "regular file" ] || [ "$k" = "regular empty file" ] || '
    '{ echo "$k" >&2; exit 3; }; '
    'exec dd if="$1" bs=1048576 skip=$(($2 * 8)) count=8 2>/dev/null'
)
SLICE_BYTES = 8 << 20
_LIST = (
    'cd -- "$1" || exit 2; for f in * .*; do '
    "case $f in .|..) continue;; esac; "
    '[ -e "$f" ] || [ -L "$f" ] || continue; '
    'printf "%s\\0%s\\0" "$(stat -c "%f %s" -- "$f")" "$f"; done'
)


class GVisorInstance(OciInstance):
    """Files move through ``exec`` of a static busybox bind-mounted into the
    sandbox: the sandbox's /tmp lives in the Sentry's memory, invisible from
    the host, and the image need not carry a shell."""

    tier: GVisorTier

    def _start(self, req: ExecRequest) -> Command:
        """As on every tier, with the evidence split into the workload's and
        the engine's share (read before the run: a host OOM kill stops the
        whole Sentry, and then the engine's share can no longer be read)."""
        before = memory_split(self.cg)
        engine_mib = None
        if before is not None and self.spec.limits.memory_mib is not None:
            engine_mib = before.engine_bytes / MIB
        hits = self.cg.pids_max_hits()

        def finish(result_of: Callable[[], ExecResult]) -> ExecResult:
            try:
                result = result_of()
            except SandboxDeadError as exc:
                pids = self.spec.limits.pids
                if pids is not None and self.cg.pids_max_hits() > hits:
                    raise SandboxDeadError(
                        f"sandbox {self.id} is dead: runsc could not start a thread past the "
                        f"host's cap on gVisor's own threads "
                        f"(engine_pids_limit={_engine_tasks(pids)}; "
                        f"the workload's pids limit is {pids})"
                    ) from exc
                raise
            return self.tier.finish(result, self.spec, engine_mib)

        return MappedCommand(super()._start(req), finish)

    def stats(self) -> Stats:
        """The workload's memory (the Sentry's memory file) and processes (the
        Sentry's count); the engine's own memory in ``engine_memory_bytes``."""
        host = self.cg.stats()
        split = memory_split(self.cg)
        mem = self.spec.limits.memory_mib
        if split is None:
            return self.with_network(host)
        peak = None
        if split.host_peak_bytes is not None:
            peak = max(split.host_peak_bytes - split.engine_bytes, split.workload_bytes)
        return self.with_network(
            Stats(
                memory_bytes=split.workload_bytes,
                memory_peak_bytes=peak,
                cpu_s=host.cpu_s,
                pids=self.tier.workload_pids(self.id, self.managed),
                oom_kills=host.oom_kills,
                memory_limit_bytes=mem * MIB if mem is not None else None,
                engine_memory_bytes=split.engine_bytes,
            )
        )

    def sample(self) -> Stats:
        """``stats()`` without the Sentry's process count (``runsc events``
        costs ~10 ms of CPU: too much every 100 ms)."""
        host = self.cg.stats()
        split = memory_split(self.cg)
        if split is None:
            return host
        return replace(
            host, memory_bytes=split.workload_bytes, engine_memory_bytes=split.engine_bytes
        )

    def _file_op(
        self, verb: str, path: str, script: str, args: list[str], stdin: bytes | None, cap: int
    ) -> bytes:
        """Run a file script; its exit code says what went wrong."""
        self._check_open()
        r = self._runtime_exec(
            [BUSYBOX, "sh", "-c", script, "sh", path, *args],
            stdin,
            {"PATH": "/.tierbox/bin"},  # nothing but busybox applets by full name
            FILE_OP_TIMEOUT_S,
            cap,
        )
        if r.ok:
            return r.stdout
        why = r.stderr.decode(errors="replace").strip() or r.termination.describe()
        code = r.termination.exit_code
        if code == _NOT_REGULAR:
            raise NotRegularFileError(
                f"cannot {verb} {path} in sandbox {self.id}: it is a {why}, not a regular file",
                path=path,
            )
        if code == _TOO_BIG:
            raise FileTooLargeError(
                f"{path} in sandbox {self.id} is {why} bytes, over the max_bytes cap of "
                f"{args[0]}: pass a larger max_bytes or use download",
                path=path,
            )
        if r.stdout_truncated:
            raise FileTooLargeError(
                f"{path} in sandbox {self.id} grew past the max_bytes cap of {cap - 1} "
                "while it was read",
                path=path,
            )
        raise SandboxFileError(f"cannot {verb} {path} in sandbox {self.id}: {why}", path=path)

    def processes(self) -> list[ProcessInfo]:
        """The Sentry's own view (the host sees only runsc's processes), read by
        the bind-mounted busybox ``ps`` (which is left out of the list)."""
        self._check_open()
        fmt = "pid,ppid,user,stat,args"
        r = self._runtime_exec(
            [BUSYBOX, "ps", "-o", fmt], None, {"PATH": "/.tierbox/bin"}, FILE_OP_TIMEOUT_S, 1 << 20
        )
        if not r.ok:
            why = r.stderr.decode(errors="replace").strip() or r.termination.describe()
            raise SandboxError(f"cannot list the processes of sandbox {self.id}: {why}")
        out = []
        for line in r.stdout.decode(errors="replace").splitlines()[1:]:
            parts = line.split(None, 4)
            if len(parts) < 5 or not parts[0].isdigit():
                continue
            argv = parts[4].split()
            if argv[:2] == [BUSYBOX, "ps"]:
                continue
            out.append(ProcessInfo(int(parts[0]), int(parts[1]), parts[2], argv, parts[3][:1]))
        return out

    def _put_file(self, path: str, data: bytes, mode: int) -> None:
        self._file_op("write", path, _PUT, [f"{mode:o}"], data, 64 * 1024)

    def _files_root(self) -> RootDir:
        # The init's /proc/PID/root is the Sentry's, not the workload's view:
        # every file operation of this tier goes through an exec instead.
        raise NotSupportedError("gVisor files are reached only through the Sentry")

    def _copy_out(self, path: str, out: BinaryIO, max_bytes: int | None) -> int:
        """Streamed in 8 MiB slices, one exec each: tierbox holds one slice at most."""
        total = 0
        for index in itertools.count():
            chunk = self._file_op("read", path, _SLICE, [str(index)], None, SLICE_BYTES)
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                raise FileTooLargeError(
                    f"{path} in sandbox {self.id} is over the max_bytes cap of {max_bytes}",
                    path=path,
                )
            out.write(chunk)
            if len(chunk) < SLICE_BYTES:
                return total
        raise AssertionError("unreachable")

    def _get_file(self, path: str, max_bytes: int) -> bytes:
        return self._file_op("read", path, _GET, [str(max_bytes)], None, max_bytes + 1)

    def _entries(self, path: str) -> list[FileEntry]:
        out = self._file_op("list", path, _LIST, [], None, 16 << 20)
        fields = out.split(b"\0")
        entries = []
        for meta, name in zip(fields[0::2], fields[1::2], strict=False):
            mode_hex, _, size = meta.decode().partition(" ")
            if not mode_hex:
                continue  # removed between the listing and its stat
            raw_mode = int(mode_hex, 16)
            entries.append(
                FileEntry(
                    name.decode(errors="surrogateescape"),
                    _kind(raw_mode),
                    int(size or 0),
                    stat.S_IMODE(raw_mode),
                )
            )
        return entries


def _kind(mode: int) -> FileKind:
    if stat.S_ISREG(mode):
        return FileKind.FILE
    if stat.S_ISDIR(mode):
        return FileKind.DIR
    if stat.S_ISLNK(mode):
        return FileKind.SYMLINK
    return FileKind.OTHER


# ---- what the engine itself costs on the host ------------------------------


@dataclass(frozen=True)
class MemorySplit:
    """The sandbox cgroup's memory, split between the workload and the engine.

    The workload's memory is the Sentry's memory file (a memfd, charged as
    shmem): its anonymous memory, tmpfs and cached file pages. The rest is
    the engine's: Sentry, Gofer and runsc heaps, ptrace stubs, kernel memory.
    """

    host_bytes: int
    workload_bytes: int
    host_peak_bytes: int | None
    host_tasks: int | None

    @property
    def engine_bytes(self) -> int:
        return max(self.host_bytes - self.workload_bytes, 0)


def _read_keyed(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
    return out


def memory_split(cg: SandboxCgroup) -> MemorySplit | None:
    """Read the split from the cgroup's own counters: a few file reads, no
    call into the Sentry. None when the cgroup is gone."""
    host = cg.stats()
    if host.memory_bytes is None:
        return None
    if cg.version == 2:
        shmem = _read_keyed(cg.dirs()[""] / "memory.stat").get("shmem", 0)
    else:
        stats = _read_keyed(cg.dirs()["memory"] / "memory.stat")
        shmem = stats.get("total_shmem", stats.get("shmem", 0))
    return MemorySplit(
        host.memory_bytes, min(shmem, host.memory_bytes), host.memory_peak_bytes, host.pids
    )


def set_memory_limit(cg: SandboxCgroup, limit_bytes: int) -> None:
    """Change the cgroup's memory limit; on v1 memory+swap moves with it
    (it may never be below the memory limit, so the order depends on the way)."""
    if cg.version == 2:
        (cg.dirs()[""] / "memory.max").write_text(str(limit_bytes))
        return
    d = cg.dirs()["memory"]
    names = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
    if limit_bytes > (cg.memory_limit_bytes() or 0):
        names.reverse()
    for name in names:
        if (d / name).exists():
            (d / name).write_text(str(limit_bytes))


@dataclass(frozen=True)
class EngineFootprint:
    """What runsc costs on the host next to its workload, measured once on
    this host for this runsc, platform and kernel (see GVisorTier.footprint).

    ``*_idle_mib``: cgroup memory minus the Sentry's memory file with an idle
    workload, for one-shot runs (the waiting ``runsc run`` included) and for
    long-lived sandboxes; ``startup_peak_mib``: the cgroup's peak while runsc
    starts; ``mib_per_workload_mib``: how much the engine grows per MiB the
    workload holds (page tables); ``mib_per_process`` and
    ``host_tasks_per_process``: what each extra workload process costs.
    """

    runsc_version: str
    platform: str
    kernel: str
    measured_at: str
    method: str
    one_shot_idle_mib: float
    long_lived_idle_mib: float
    startup_peak_mib: float
    mib_per_workload_mib: float
    mib_per_process: float
    host_tasks_idle: int
    host_tasks_per_process: float

    def reserve_mib(self, memory_mib: int, *, one_shot: bool) -> int:
        """MiB the host cgroup holds beyond ``memory_mib`` for the engine: its
        idle footprint, its growth with the workload's memory and the stubs of
        a small pipeline; never so little that runsc cannot start."""
        idle = self.one_shot_idle_mib if one_shot else self.long_lived_idle_mib
        reserve = (
            idle + self.mib_per_workload_mib * memory_mib + RESERVE_PROCESSES * self.mib_per_process
        )
        if one_shot:  # a long-lived sandbox's limit is set once runsc has started
            reserve = max(reserve, self.startup_peak_mib + 2 - memory_mib)
        return math.ceil(reserve)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


METHOD = (
    "busybox sandboxes with no memory limit; engine = cgroup memory usage minus the "
    "Sentry's memory file (shmem), median of 3 samples: idle after start (long-lived, "
    "catatonit as init) and while a one-shot `sleep` runs; growth per MiB from a "
    "workload holding 16 and 80 MiB (dd into a blocked pipe); per process from 8 "
    "sleeping processes; startup peak from the cgroup's max usage"
)


def _engine_tasks(pids: int) -> int:
    """The host cgroup's cap on runsc's threads for a workload limited to ``pids``."""
    return ENGINE_TASKS_BASE + ENGINE_TASKS_PER_PROCESS * pids


def _median_split(cg: SandboxCgroup, samples: int = 3) -> MemorySplit:
    """The middle of a few reads 50 ms apart (the Go heaps breathe)."""
    got = []
    for i in range(samples):
        if i:
            time.sleep(0.05)
        split = memory_split(cg)
        if split is None:
            raise HostError(f"cgroup {cg.relpath} vanished while gVisor's footprint was measured")
        got.append(split)
    return sorted(got, key=lambda s: s.engine_bytes)[len(got) // 2]


def _wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise HostError(f"measuring gVisor's footprint: timed out waiting for {what}")
        time.sleep(0.02)


class GVisorTier(OciTier):
    name = "gvisor"
    runtime = "runsc"
    instance_cls = GVisorInstance
    # runsc exec in the foreground gives the command its own stdio when that
    # is a terminal (and forwards the terminal's signals to it)
    tty_console_socket = False
    # runsc rejects the OCI seccomp section unless run with --oci-seccomp; the
    # Sentry already filters every syscall, so the bundle carries none.
    seccomp = False
    isolation = (
        "user-space kernel (gVisor Sentry) intercepts every syscall; namespaces, "
        "non-root, loopback-only network; host kernel not reachable directly"
    )

    def __init__(self) -> None:
        super().__init__()
        self._footprint: EngineFootprint | None = None
        self._footprint_lock = threading.Lock()
        #: (thread, cgroups): the footprint measurement's one-shot run, whose
        #: cgroup ``popen`` hands over
        self._measuring: tuple[int, list[SandboxCgroup]] | None = None

    def _runsc(self) -> str:
        path = which("runsc")
        if path is None:
            raise HostError("runsc is not installed: apt-get install runsc")
        return path

    def runtime_argv(self, managed: bool = True) -> list[str]:
        runsc = self._runsc()
        return [
            runsc,
            "--root",
            str(self.state_root()),
            f"--platform={_platform(runsc)}",
            "--ignore-cgroups",
        ]

    # ---- limits ------------------------------------------------------------
    def cgroup_limits(self, spec: SandboxSpec) -> Limits:
        """The host cgroup holds runsc itself (Sentry, Gofer, stubs), so it
        gets the workload's memory plus the engine's measured footprint (the
        one-shot figure; ``create`` narrows it once runsc has started) and a
        generous cap on runsc's threads. The workload's own process count is
        limited inside the Sentry by RLIMIT_NPROC (``process_rlimits``)."""
        lim = spec.limits
        memory_mib = None
        if lim.memory_mib is not None:
            memory_mib = lim.memory_mib + self.footprint().reserve_mib(
                lim.memory_mib, one_shot=True
            )
        pids = _engine_tasks(lim.pids) if lim.pids is not None else None
        return replace(lim, memory_mib=memory_mib, pids=pids)

    def process_rlimits(self, spec: SandboxSpec) -> list[dict[str, Any]]:
        if spec.limits.pids is None:
            return []
        return [{"type": "RLIMIT_NPROC", "hard": spec.limits.pids, "soft": spec.limits.pids}]

    def finish(self, result: ExecResult, spec: SandboxSpec, engine_mib: float | None) -> ExecResult:
        """Split the cgroup-wide evidence into the workload's and the engine's."""
        lim = spec.limits
        tasks = _engine_tasks(lim.pids) if lim.pids is not None else None
        return engine_evidence(result, engine_mib=engine_mib, engine_pids_limit=tasks)

    # ---- life cycle ----------------------------------------------------------
    def stop(self, inst: OciInstance) -> None:
        """Freeze every process of the sandbox (Sentry, Gofer and the stubs
        the workload's processes run in: all in its cgroup) and SIGKILL the
        Sentry through its pidfd: nothing of it runs again. Not waited for
        here: the Sentry's exit takes 2-4 ms (its address space is large),
        and one SIGKILL to a many-threaded process can itself take
        milliseconds on a busy host; :meth:`released` finishes the job."""
        if not inst.cg.freeze():
            inst.cg.signal_all(signal.SIGKILL)  # no freezer: kill them all now instead
        inst.init.kill(timeout_s=0)

    def released(self, inst: OciInstance) -> None:
        """First step of the background teardown: kill what the freeze
        holds, then thaw it so that the killed processes exit (``runsc
        delete`` waits for its sandbox to be gone)."""
        inst.cg.signal_all(signal.SIGKILL)
        inst.cg.freeze(False)

    def popen(
        self, cg: SandboxCgroup, cgroups_path: str | None, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        """Start runsc; the footprint measurement learns its one-shot's cgroup here."""
        measuring = self._measuring
        if measuring is not None and measuring[0] == threading.get_ident():
            measuring[1].append(cg)
        return super().popen(cg, cgroups_path, argv, **kwargs)

    def _run(
        self,
        spec: SandboxSpec,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """One-shot, with the evidence split. The engine's share in it is the
        measured idle one: by the time an OOM kill is read, runsc is gone."""
        result = super()._run(spec, argv, stdin=stdin, on_stdout=on_stdout, on_stderr=on_stderr)
        limited = spec.limits.memory_mib is not None
        engine = self.footprint().one_shot_idle_mib if limited else None
        return self.finish(result, spec, engine)

    def _create(self, spec: SandboxSpec) -> OciInstance:
        """Once runsc has started, the ``runsc run --detach`` that started it
        is gone: the cgroup narrows to the long-lived footprint, and its peak
        restarts so that it tells the workload's, not runsc's start-up."""
        inst = super()._create(spec)
        mem = spec.limits.memory_mib
        try:
            if mem is not None:
                reserve = self.footprint().reserve_mib(mem, one_shot=False)
                set_memory_limit(inst.cg, (mem + reserve) * MIB)
            inst.cg.reset_peak()
        except OSError as exc:
            inst.close()
            raise HostError(f"cannot set the memory limit of sandbox {inst.id}: {exc}") from exc
        return inst

    def workload_pids(self, sandbox_id: str, managed: bool) -> int | None:
        """Processes inside the Sentry, as runsc counts them (``runsc events
        --stats``: ~25 ms, ~10 ms of CPU). None when the sandbox is gone."""
        try:
            out = run(
                [*self.runtime_argv(managed), "events", "--stats", container_id(sandbox_id)],
                timeout_s=10,
                check=False,
            )
            count = json.loads(out.stdout)["data"]["pids"]["current"]
        except (CommandError, ValueError, KeyError, TypeError):
            return None
        return int(count) if isinstance(count, int) else None

    # ---- the engine's footprint ----------------------------------------------
    def footprint(self) -> EngineFootprint:
        """The engine's footprint on this host for this runsc: from the cache
        (``$TIERBOX_HOME/cache/gvisor``), else measured now (about 5 s, once
        per runsc version, platform and kernel; one process at a time)."""
        with self._footprint_lock:
            if self._footprint is not None:
                return self._footprint
            runsc = self._runsc()
            version = _runsc_version(runsc)
            key = json.dumps(
                [
                    FOOTPRINT_FORMAT,
                    version,
                    _platform(runsc),
                    host_platform.release(),
                    host_platform.machine(),
                    cgroup_version(),
                ]
            )
            path = (
                home()
                / "cache"
                / "gvisor"
                / f"footprint-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
            )
            fp = _load_footprint(path)
            if fp is None:
                with file_lock(path.with_suffix(".lock")):
                    fp = _load_footprint(path)
                    if fp is None:
                        fp = self._measure(version, _platform(runsc))
                        tmp = path.with_suffix(f".{os.getpid()}.tmp")
                        tmp.write_text(json.dumps(fp.to_dict(), indent=1))
                        os.replace(tmp, path)
            self._footprint = fp
            return fp

    def _measure(self, version: str, platform_name: str) -> EngineFootprint:
        """Start sandboxes with no memory limit and read their cgroups (METHOD)."""
        from tierbox.images.store import default_store

        image = default_store().ensure_busybox().ref
        spec = SandboxSpec(image=image, limits=Limits(memory_mib=None, pids=None, timeout_s=60))

        inst = OciTier._create(self, spec)

        def background(script: str) -> threading.Thread:
            t = threading.Thread(target=inst.exec, args=(["sh", "-c", script],))
            t.start()
            return t

        try:
            cg = inst.cg
            startup_peak = cg.stats().memory_peak_bytes or 0
            time.sleep(0.3)
            idle = _median_split(cg)

            def holding(mib: int) -> MemorySplit:
                """The split while the workload holds ``mib`` MiB (dd's buffer,
                blocked writing into a pipe nobody reads)."""
                want = idle.workload_bytes + mib * MIB
                t = background(f"dd if=/dev/zero bs={mib}M count=1 2>/dev/null | sleep 1")
                try:
                    _wait_for(
                        lambda: (memory_split(cg) or idle).workload_bytes >= want,
                        10,
                        f"the workload to hold {mib} MiB",
                    )
                    return _median_split(cg)
                finally:
                    t.join()

            small, large = holding(16), holding(80)
            per_mib = max((large.engine_bytes - small.engine_bytes) / (64 * MIB), 0.0)
            sleeps = 8
            procs = sleeps + 1  # and the shell that waits for them
            t = background(f"i=0; while [ $i -lt {sleeps} ]; do sleep 1 & i=$((i+1)); done; wait")
            try:
                _wait_for(
                    lambda: (self.workload_pids(inst.id, inst.managed) or 0) >= procs + 1,
                    10,
                    f"{sleeps} sleeping processes",
                )
                busy = _median_split(cg)
            finally:
                t.join()
        finally:
            inst.close()

        # one-shot: runsc run waits in the cgroup beside the sandbox it started
        started: list[SandboxCgroup] = []

        def one_shot_run() -> None:
            self._measuring = (threading.get_ident(), started)
            try:
                OciTier._run(self, spec, ["sleep", "2"])
            finally:
                self._measuring = None

        t = threading.Thread(target=one_shot_run)
        t.start()
        try:
            _wait_for(lambda: bool(started), 10, "runsc run to start")
            one_cg = started[0]
            one_id = one_cg.relpath.rsplit("/", 1)[-1]
            _wait_for(
                lambda: (self.workload_pids(one_id, managed=False) or 0) >= 1,
                10,
                "the one-shot sandbox",
            )
            time.sleep(0.3)
            one_shot = _median_split(one_cg)
        finally:
            t.join()
        return EngineFootprint(
            runsc_version=version,
            platform=platform_name,
            kernel=host_platform.release(),
            measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
            method=METHOD,
            one_shot_idle_mib=round(one_shot.engine_bytes / MIB, 2),
            long_lived_idle_mib=round(idle.engine_bytes / MIB, 2),
            startup_peak_mib=round(max(startup_peak, one_shot.host_peak_bytes or 0) / MIB, 2),
            mib_per_workload_mib=round(per_mib, 4),
            mib_per_process=round(max(busy.engine_bytes - idle.engine_bytes, 0) / procs / MIB, 3),
            host_tasks_idle=idle.host_tasks or 0,
            host_tasks_per_process=round(
                max((busy.host_tasks or 0) - (idle.host_tasks or 0), 0) / procs, 1
            ),
        )

    # ---- runsc specifics -----------------------------------------------------
    def helper_binds(self) -> dict[str, str]:
        return {BUSYBOX: BUSYBOX_HOST}

    def global_args(self, spec: SandboxSpec) -> list[str]:
        """``none``: loopback only (runsc's netstack, no interface).

        Egress: the sandbox process joins the gateway's sandbox namespace
        (the OCI config's network path) and the Sentry uses the host
        kernel's sockets there (``--network=host``, hostinet); the filter is
        in the gateway's router namespace, out of the workload's reach.
        ``--network=sandbox`` (runsc's own netstack on that namespace's veth)
        would be the narrower choice, but Debian's runsc 20221219 refuses it
        on kernels from 6.x: it takes a namespace that has
        /proc/sys/net/core/rmem_default for the root one, and these kernels
        have that file in every namespace ("cannot run with network enabled
        in root network namespace")."""
        if spec.network is NetworkPolicy.NONE:
            return ["--network=none"]
        return ["--network=host"]

    def exec_pid_args(self, pid_file: Path) -> list[str]:
        return ["--internal-pid-file", str(pid_file)]

    def kill_exec(self, inst: OciInstance, pid_file: Path, sig: int = signal.SIGKILL) -> None:
        """The exec'd process lives inside the Sentry: ask runsc to signal it."""
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            name = signal.Signals(sig).name.removeprefix("SIG")
            run(
                [*self.runtime_argv(), "kill", "--pid", str(pid), container_id(inst.id), name],
                check=False,
                timeout_s=10,
            )

    def exec_pid(self, pid_file: Path) -> int | None:
        """runsc writes the pid inside the sandbox itself (--internal-pid-file)."""
        try:
            return int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def available(self) -> Availability:
        try:
            runsc = self._runsc()
            cgroup_version()
        except HostError as exc:
            return Availability(False, str(exc))
        if not Path(INIT_BINARY).exists():
            return Availability(
                False, "catatonit is missing: apt-get install catatonit", engine="runsc"
            )
        return Availability(
            True,
            f"runsc (gVisor) with the {_platform(runsc)} platform",
            engine="runsc",
            version=_runsc_version(runsc),
        )


@cache
def _runsc_version(runsc: str) -> str:
    """First line of ``runsc --version``."""
    out = run([runsc, "--version"], check=False, timeout_s=10).stdout.decode().splitlines()
    return out[0] if out else ""


def _load_footprint(path: Path) -> EngineFootprint | None:
    try:
        return EngineFootprint(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
