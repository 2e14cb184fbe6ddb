"""The ``gvisor`` tier: the same OCI bundle as ``container``, run by runsc.

gVisor's Sentry implements the Linux system call surface in user space, so
the workload never talks to the host kernel directly. On hosts without KVM
support for gVisor (this includes nested VMs) the ``ptrace`` platform is used;
``systrap`` where the installed runsc has it.
"""

from __future__ import annotations

import contextlib
import itertools
import stat
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

from tierbox.errors import (
    CommandError,
    FileTooLargeError,
    HostError,
    NotRegularFileError,
    NotSupportedError,
    SandboxFileError,
)
from tierbox.host.cgroups import cgroup_version
from tierbox.host.rootfs import RootDir
from tierbox.host.runner import run, which
from tierbox.spec import FileEntry, FileKind, Limits, NetworkPolicy, SandboxSpec
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

    def _file_op(
        self, verb: str, path: str, script: str, args: list[str], stdin: bytes | None, cap: int
    ) -> bytes:
        """Run a file script; its exit code says what went wrong."""
        self._check_open()
        r = self._exec(
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
            entries.append(
                FileEntry(
                    name.decode(errors="surrogateescape"),
                    _kind(int(mode_hex, 16)),
                    int(size or 0),
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

    def helper_binds(self) -> dict[str, str]:
        return {BUSYBOX: BUSYBOX_HOST}

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
