"""The ``gvisor`` tier: the same OCI bundle as ``container``, run by runsc.

gVisor's Sentry implements the Linux system call surface in user space, so
the workload never talks to the host kernel directly. On hosts without KVM
support for gVisor (this includes nested VMs) the ``ptrace`` platform is used;
``systrap`` where the installed runsc has it.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

from tierbox.errors import CommandError, HostError, SandboxError
from tierbox.host.cgroups import cgroup_version
from tierbox.host.runner import run, which
from tierbox.spec import ExecResult, Limits, NetworkPolicy, SandboxSpec
from tierbox.tiers.base import Availability
from tierbox.tiers.container import INIT_BINARY, OciInstance, OciTier, container_id

SENTRY_OVERHEAD_MIB = 96  # measured RSS of an idle runsc sandbox is ~60-80 MiB
SENTRY_THREADS = 256  # Go runtime and ptrace stub threads of runsc


@cache
def _platform(runsc: str) -> str:
    """systrap (faster) when this runsc knows it, else ptrace."""
    try:
        text = run([runsc, "help", "platforms"], timeout_s=10, check=False).stdout.decode()
    except CommandError:
        text = ""
    return "systrap" if "systrap" in text else "ptrace"


def _why(r: ExecResult) -> str:
    return r.stderr.decode(errors="replace").strip() or r.termination.describe()


class GVisorInstance(OciInstance):
    """Files move through ``exec`` (cat): the sandbox's /tmp lives in the
    Sentry's memory, invisible from the host."""

    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._check_open()
        script = 'cat > "$1" && chmod "$2" "$1"'
        r = self.exec(["sh", "-c", script, "sh", path, f"{mode:o}"], stdin=data)
        if not r.ok:
            raise SandboxError(f"cannot write {path} in sandbox {self.id}: {_why(r)}")

    def get_file(self, path: str) -> bytes:
        self._check_open()
        r = self.exec(["cat", path])
        if not r.ok:
            raise SandboxError(f"cannot read {path} in sandbox {self.id}: {_why(r)}")
        return r.stdout

    def list_dir(self, path: str) -> list[str]:
        self._check_open()
        r = self.exec(["ls", "-1a", path])
        if not r.ok:
            raise SandboxError(f"cannot list {path} in sandbox {self.id}: {_why(r)}")
        return sorted(n for n in r.stdout.decode().splitlines() if n not in (".", ".."))


class GVisorTier(OciTier):
    name = "gvisor"
    runtime = "runsc"
    instance_cls = GVisorInstance
    # runsc rejects the OCI seccomp section unless run with --oci-seccomp; the
    # Sentry already filters every syscall, so the bundle carries none.
    seccomp = False
    isolation = (
        "user-space kernel (gVisor Sentry) intercepts every syscall; namespaces, "
        "non-root, loopback-only network; host kernel not reachable directly"
    )

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

    def cgroup_limits(self, spec: SandboxSpec) -> Limits:
        """The host cgroup holds runsc itself (Sentry, Gofer, Go threads), so it
        gets the workload's limits plus the engine's overhead. The workload's
        own process count is limited inside the sandbox by RLIMIT_NPROC."""
        lim = spec.limits
        return replace(
            lim,
            memory_mib=lim.memory_mib + SENTRY_OVERHEAD_MIB if lim.memory_mib is not None else None,
            pids=lim.pids + SENTRY_THREADS if lim.pids is not None else None,
        )

    def process_rlimits(self, spec: SandboxSpec) -> list[dict[str, Any]]:
        if spec.limits.pids is None:
            return []
        return [{"type": "RLIMIT_NPROC", "hard": spec.limits.pids, "soft": spec.limits.pids}]

    def global_args(self, spec: SandboxSpec) -> list[str]:
        return ["--network=none" if spec.network is NetworkPolicy.NONE else "--network=host"]

    def exec_pid_args(self, pid_file: Path) -> list[str]:
        return ["--internal-pid-file", str(pid_file)]

    def kill_exec(self, inst: OciInstance, pid_file: Path) -> None:
        """The exec'd process lives inside the Sentry: ask runsc to kill it."""
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            run(
                [*self.runtime_argv(), "kill", "--pid", str(pid), container_id(inst.id), "KILL"],
                check=False,
                timeout_s=10,
            )

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
        version = run([runsc, "--version"], check=False, timeout_s=10).stdout.decode().splitlines()
        return Availability(
            True,
            f"runsc (gVisor) with the {_platform(runsc)} platform",
            engine="runsc",
            version=version[0] if version else "",
        )
