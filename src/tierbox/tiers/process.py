"""The ``process`` tier: a plain host process in its own cgroup.

This tier gives NO isolation: the workload sees the host filesystem, host
processes and the network, and runs as the calling user. It exists as the
baseline rung: limits (memory, pids, cpu, wall clock, output) still hold,
through a per-sandbox cgroup and rlimits.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tierbox.errors import HostError, SandboxClosedError, SandboxError
from tierbox.host import capture
from tierbox.host.cgroups import SandboxCgroup, cgroup_version
from tierbox.spec import ExecResult, SandboxSpec, Stats, Termination
from tierbox.tiers import _pool, _state
from tierbox.tiers.base import Availability, DirectoryFiles, Instance, Tier
from tierbox.tiers.outcome import classify

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NOFILE_LIMIT = 4096  # root lacks CAP_SYS_RESOURCE here; stay below the host's hard cap


def _apply_rlimits(pid: int, spec: SandboxSpec) -> None:
    """rlimits cgroups do not cover. Applied right after spawn: Python offers no
    race-free hook short of ``preexec_fn``, which triples spawn time; the cgroup
    (joined before the child exists) carries the limits that matter."""
    with contextlib.suppress(OSError):
        resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))
        hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
        soft = NOFILE_LIMIT if hard == resource.RLIM_INFINITY else min(NOFILE_LIMIT, hard)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, soft))
        if spec.limits.disk_mib is not None:
            size = spec.limits.disk_mib * 1024 * 1024
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, size))


class ProcessInstance(DirectoryFiles, Instance):
    tier_name = "process"

    def __init__(
        self, sandbox_id: str, spec: SandboxSpec, cg: SandboxCgroup, workdir: Path
    ) -> None:
        self.id = sandbox_id
        self.spec = spec
        self.cg = cg
        self.workdir = workdir
        self._closed = False
        #: (oom_kills, pids_max_hits) after the last exec: the next one's baseline
        self.counters: tuple[int, int] | None = None

    def _env(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        env = {"PATH": DEFAULT_PATH, "HOME": str(self.workdir), "LANG": "C.UTF-8"}
        env.update(self.spec.env)
        if extra:
            env.update(extra)
        return env

    def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> ExecResult:
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed")
        if not argv:
            raise SandboxError("no command given: pass the program and its arguments")
        timeout = timeout_s if timeout_s is not None else self.spec.limits.timeout_s
        # Counters only move while work runs: after the first exec, the values
        # read at the end of the previous one are the baseline (one-shot hot path).
        before, hits = self.counters or (self.cg.oom_kills(), self.cg.pids_max_hits())
        started = time.monotonic()
        try:
            proc = self.cg.popen(
                argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env(env),
                cwd=self.workdir,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise SandboxError(f"command not found: {argv[0]!r}") from exc
        except PermissionError as exc:
            raise SandboxError(f"command not executable: {argv[0]!r}") from exc
        _apply_rlimits(proc.pid, self.spec)
        cap = capture.communicate(
            proc,
            stdin=stdin,
            timeout_s=timeout,
            output_bytes=self.spec.limits.output_bytes,
            kill=self.cg.kill_all,
            started=started,
        )
        # Children that outlived the main process (daemonized) die with the run.
        if self.cg.has_tasks():
            self.cg.kill_all()
        result = classify(
            cap,
            limits=self.spec.limits,
            timeout_s=timeout,
            cg=self.cg,
            oom_kills_before=before,
            pids_hits_before=hits,
            status_from_runtime=False,
        )
        self.counters = (self.cg.oom_kills(), self.cg.pids_max_hits())
        return result

    def _path(self, path: str) -> Path:
        """No isolation means no private filesystem: absolute paths are host
        paths, relative ones live in the sandbox's working directory (its cwd)."""
        return Path(path) if path.startswith("/") else _state.safe_join(self.workdir, path)

    def stats(self) -> Stats:
        return self.cg.stats()

    def state(self) -> dict[str, Any]:
        return {"cgroup": self.cg.relpath, "workdir": str(self.workdir)}

    def close(self) -> Termination | None:
        if self._closed:
            return None
        self._closed = True
        self.cg.destroy()
        _pool.discard_dir(self.workdir.parent)
        return None


class ProcessTier(Tier):
    name = "process"
    isolation = "none: host filesystem, processes and network are visible; limits via cgroup"

    def __init__(self) -> None:
        self._pool = _pool.SlotPool()

    def run(
        self, spec: SandboxSpec, argv: Sequence[str], *, stdin: bytes | None = None
    ) -> ExecResult:
        """One-shot on a pooled empty slot (see tiers/_pool.py)."""
        slot = self._pool.acquire(spec.limits)
        workdir = slot.dir / "work"
        workdir.mkdir(exist_ok=True)
        inst = ProcessInstance(slot.id, spec, slot.cg, workdir)
        inst.counters = slot.counters
        try:
            return inst.exec(argv, stdin=stdin, timeout_s=spec.limits.timeout_s)
        finally:
            slot.counters = inst.counters or slot.counters
            self._pool.release(slot, pristine=not any(os.scandir(workdir)))

    def available(self) -> Availability:
        try:
            version = cgroup_version()
        except HostError as exc:
            return Availability(False, str(exc), engine="subprocess")
        return Availability(True, f"subprocess with cgroup v{version} limits", engine="subprocess")

    def create(self, spec: SandboxSpec) -> ProcessInstance:
        slot = _pool.new_slot(spec.limits)
        workdir = slot.dir / "work"
        workdir.mkdir()
        return ProcessInstance(slot.id, spec, slot.cg, workdir)

    def attach(self, sandbox_id: str, state: dict[str, Any]) -> ProcessInstance:
        cg = SandboxCgroup(relpath=state["cgroup"], version=cgroup_version())
        spec = SandboxSpec.from_dict(state["spec"])
        return ProcessInstance(sandbox_id, spec, cg, Path(state["workdir"]))
