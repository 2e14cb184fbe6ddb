"""The data model shared by every tier: specs, limits, results and how runs end."""

from __future__ import annotations

import enum
import math
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tierbox.errors import SpecError, UsageError
from tierbox.network import (
    Egress,
    NetworkPolicy,
    NetworkSpec,
    PortMap,
    network_from_dict,
    network_mode,
    network_to_dict,
)

__all__ = ["Egress", "NetworkPolicy", "PortMap"]  # re-exported: the spec's network types

#: One mebibyte, the unit of every ``*_mib`` limit.
MIB = 1 << 20
#: PATH a workload gets unless its image or spec says otherwise (Debian's default)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_OUTPUT_LIMIT_BYTES = 1 << 20  # 1 MiB per stream, like a terminal scrollback
#: Reads from a sandbox (files.read, get_file) return at most this much unless
#: the caller passes another ``max_bytes``: a hostile workload can offer an
#: 8 GB sparse file or a link to /dev/zero.
DEFAULT_READ_MAX_BYTES = 64 << 20


class TerminationKind(enum.StrEnum):
    """How a run ended."""

    EXITED = "exited"
    SIGNALED = "signaled"
    OOM_KILLED = "oom_killed"
    TIMED_OUT = "timed_out"
    CPU_LIMIT = "cpu_limit"
    OUTPUT_LIMIT = "output_limit"


@dataclass(frozen=True)
class Termination:
    """How a run ended, with the evidence that says so.

    ``evidence`` holds counter values and limits, e.g. ``{"limit_mib": 64,
    "peak_mib": 64.0, "oom_kill": 1}`` for an OOM kill.
    """

    kind: TerminationKind
    exit_code: int | None = None
    signal: int | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def shell_status(self) -> int:
        """The exit status a shell would report: the code, 124 for a timeout
        (as timeout(1) reports it), 137 for an OOM kill, else 128+signal."""
        if self.kind is TerminationKind.EXITED and self.exit_code is not None:
            return self.exit_code
        if self.kind is TerminationKind.TIMED_OUT:
            return 124
        if self.kind is TerminationKind.OOM_KILLED:
            return 137
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code if self.exit_code is not None else 1

    def describe(self) -> str:
        """One line a person can read."""
        ev = ", ".join(f"{k}={v}" for k, v in self.evidence.items())
        base = {
            TerminationKind.EXITED: f"exited with code {self.exit_code}",
            TerminationKind.SIGNALED: f"killed by signal {self.signal}",
            TerminationKind.OOM_KILLED: "killed: out of memory",
            TerminationKind.TIMED_OUT: "killed: timed out",
            TerminationKind.CPU_LIMIT: "stopped: CPU budget exhausted",
            TerminationKind.OUTPUT_LIMIT: "killed: output limit exceeded",
        }[self.kind]
        return f"{base} ({ev})" if ev else base

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "evidence": self.evidence,
        }


@dataclass(frozen=True)
class ExecResult:
    """What one command produced; stdout and stderr are capped at the output limit."""

    stdout: bytes
    stderr: bytes
    termination: Termination
    duration_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def exit_code(self) -> int:
        """Shell-style status: the exit code, or 128+signal, 137 on OOM."""
        return self.termination.shell_status

    @property
    def ok(self) -> bool:
        return self.termination.kind is TerminationKind.EXITED and self.termination.exit_code == 0

    @property
    def stdout_text(self) -> str:
        """stdout decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stdout.decode(errors="replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode(errors="replace")

    text = stdout_text

    def to_dict(self) -> dict[str, Any]:
        return {
            "stdout": self.stdout.decode(errors="replace"),
            "stderr": self.stderr.decode(errors="replace"),
            "exit_code": self.exit_code,
            "termination": self.termination.to_dict(),
            "duration_s": round(self.duration_s, 6),
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
        }


class FileKind(enum.StrEnum):
    """What a directory entry inside a sandbox is (never followed)."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    OTHER = "other"  # FIFO, socket, device


@dataclass(frozen=True)
class FileEntry:
    """One entry of a directory inside a sandbox."""

    name: str
    kind: FileKind
    size: int = 0
    #: permission bits (0o7777), where the tier reports them (None: unknown)
    mode: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind.value, "size": self.size, "mode": self.mode}


def parse_user(user: str | None) -> tuple[int, int] | None:
    """``"uid[:gid]"`` as numbers; None (the tier's own default) stays None."""
    if user is None:
        return None
    uid_s, _, gid_s = user.partition(":")
    try:
        uid = int(uid_s)
        gid = int(gid_s) if gid_s else uid
    except ValueError as exc:
        raise SpecError(f"bad user {user!r}: give a numeric uid[:gid], like 1000:1000") from exc
    if not (0 <= uid < 2**32 - 1 and 0 <= gid < 2**32 - 1):
        raise SpecError(f"bad user {user!r}: uid and gid must be between 0 and 4294967294")
    return uid, gid


def sandbox_path(path: object, *, cwd: str = "/", param: str = "path") -> str:
    """Normalise a path inside a sandbox once, before any tier sees it:
    absolute, no ``.``/``..``/``//`` left; relative paths are taken from
    ``cwd``. ``..`` cannot climb above ``/`` (as in the sandbox itself).
    Raises UsageError for what no tier could mean: a non-string, an empty
    path, a NUL byte (the C side of every tier would silently cut there)."""
    if isinstance(path, bytes | bytearray):
        raise UsageError(f"{param} must be a str, not bytes: decode it first")
    if not isinstance(path, str):
        kind = type(path).__name__
        raise UsageError(f"{param} must be a str path inside the sandbox, not {kind}")
    if not path:
        raise UsageError(f"{param} is empty: give a path inside the sandbox, like /tmp/app.py")
    if "\0" in path:
        raise UsageError(f"{param} {path!r} contains a NUL byte, which no file name can hold")
    joined = posixpath.join(cwd, path)
    norm = posixpath.normpath(joined)
    # normpath keeps a leading "//" (POSIX allows it to mean something else)
    return "/" + norm.lstrip("/")


@dataclass(frozen=True)
class ProcessInfo:
    """One process running in a sandbox, as the sandbox sees it."""

    pid: int
    ppid: int
    user: str  # uid inside the sandbox
    argv: list[str]
    state: str  # R, S, D, Z, T... as /proc reports it

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "ppid": self.ppid,
            "user": self.user,
            "argv": self.argv,
            "state": self.state,
        }


@dataclass(frozen=True)
class Stats:
    """Resource use of a sandbox right now.

    ``memory_limit_bytes`` and ``engine_memory_bytes`` are set by tiers whose
    engine shares the sandbox's cgroup with the workload (gVisor): then
    ``memory_bytes`` is the workload's own, measured against
    ``memory_limit_bytes``, and the engine's memory is reported apart.
    """

    memory_bytes: int | None = None
    memory_peak_bytes: int | None = None
    cpu_s: float | None = None
    pids: int | None = None
    oom_kills: int | None = None
    memory_limit_bytes: int | None = None
    engine_memory_bytes: int | None = None
    #: time the CPU quota held the sandbox back (cgroup cpu.stat), where there is one
    cpu_throttled_s: float | None = None
    #: bytes the sandbox sent and received over its network (egress policy
    #: only: loopback traffic is not counted)
    net_tx_bytes: int | None = None
    net_rx_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "memory_bytes": self.memory_bytes,
            "memory_peak_bytes": self.memory_peak_bytes,
            "cpu_s": self.cpu_s,
            "pids": self.pids,
            "oom_kills": self.oom_kills,
            "memory_limit_bytes": self.memory_limit_bytes,
            "engine_memory_bytes": self.engine_memory_bytes,
            "cpu_throttled_s": self.cpu_throttled_s,
            "net_tx_bytes": self.net_tx_bytes,
            "net_rx_bytes": self.net_rx_bytes,
        }


def _number(name: str, value: object, *, hint: str) -> float:
    """A finite real number (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"{name}={value!r} must be a number, {hint}")
    if not math.isfinite(value):
        raise SpecError(f"{name}={value!r} must be a finite number, {hint}")
    return float(value)


def _whole(name: str, value: object, *, minimum: int, unit: str, hint: str) -> None:
    """None (no limit) or a whole number >= ``minimum``."""
    if value is None:
        return
    if isinstance(value, str):
        raise SpecError(
            f"{name}={value!r} is a string: give a whole number of {unit}, {hint}"
            + (" (parse_memory_mib turns '256m' into 256)" if unit == "MiB" else "")
        )
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name}={value!r} must be a whole number of {unit}, {hint}")
    if value < minimum:
        raise SpecError(f"{name}={value} is too small: give at least {minimum} {unit}")


def check_timeout_s(value: object, name: str = "timeout_s") -> float:
    """A positive, finite number of seconds."""
    seconds = _number(name, value, hint="a positive number of seconds like 30")
    if seconds <= 0:
        raise SpecError(f"{name}={value!r} must be positive")
    return seconds


@dataclass(frozen=True)
class Limits:
    """Resource limits. ``None`` means no limit from tierbox.

    ``output_bytes`` caps each of stdout and stderr; the run is stopped and
    reported as ``output_limit`` when a stream exceeds it.
    """

    memory_mib: int | None = 256
    cpus: float | None = None
    pids: int | None = 128
    timeout_s: float | None = 60.0
    disk_mib: int | None = None
    output_bytes: int = DEFAULT_OUTPUT_LIMIT_BYTES

    def __post_init__(self) -> None:
        _whole("memory_mib", self.memory_mib, minimum=4, unit="MiB", hint="like 256")
        if self.cpus is not None:
            cores = os.cpu_count() or 1
            _number("cpus", self.cpus, hint="like 0.5 or 2")
            if not 0.01 <= self.cpus <= cores:
                raise SpecError(
                    f"cpus={self.cpus} is out of range: give 0.01 to {cores} "
                    f"(this host has {cores} cores)"
                )
        _whole("pids", self.pids, minimum=1, unit="processes", hint="like 64")
        if self.timeout_s is not None:
            check_timeout_s(self.timeout_s)
        _whole("disk_mib", self.disk_mib, minimum=1, unit="MiB", hint="like 64")
        _whole("output_bytes", self.output_bytes, minimum=1, unit="bytes", hint="like 1048576")

    def to_dict(self) -> dict[str, Any]:
        return {
            "memory_mib": self.memory_mib,
            "cpus": self.cpus,
            "pids": self.pids,
            "timeout_s": self.timeout_s,
            "disk_mib": self.disk_mib,
            "output_bytes": self.output_bytes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Limits:
        return cls(**data)


#: Host paths a mount may never expose (nor anything below them), besides
#: tierbox's own state directories.
_HOST_DENIED = ("/proc", "/sys", "/dev", "/boot")
#: Sandbox paths a mount may not cover.
_SANDBOX_DENIED = ("/proc", "/sys", "/dev", "/.tierbox")


@dataclass(frozen=True)
class Mount:
    """A host directory or file shown inside a sandbox at ``path``.

    ``host`` is resolved on the host when the mount is made (symlinks
    followed there, once), so what the sandbox sees cannot be swapped for
    another host path later. Read-only unless ``read_only=False``. How each
    tier shows it (bind mount, WASI preopen, a copy into a VM) is in README.
    """

    host: str
    path: str
    read_only: bool = True

    def checked(self) -> Mount:
        """This mount with its host path resolved; UsageError for what no
        tier may mount: the host's / and its kernel interfaces, a path that
        does not exist, a sandbox path over /proc, /sys or /dev."""
        import os

        if not isinstance(self.host, str) or not self.host:
            raise UsageError(f"mount host={self.host!r}: give a host directory or file")
        from tierbox.paths import home, run_dir

        real = os.path.realpath(os.path.expanduser(self.host))
        if not os.path.exists(real):
            raise UsageError(f"mount host={self.host!r}: no such file or directory on the host")
        denied = (*_HOST_DENIED, str(run_dir()), str(home()))
        if real == "/" or any(real == d or real.startswith(d + "/") for d in denied):
            raise UsageError(
                f"mount host={self.host!r} resolves to {real}: the host's / and its kernel "
                "interfaces (/proc, /sys, /dev) and tierbox's own state cannot be mounted"
            )
        path = sandbox_path(self.path, param="mount path")
        if path == "/" or any(path == d or path.startswith(d + "/") for d in _SANDBOX_DENIED):
            raise UsageError(f"mount path={path}: mount below /, away from /proc, /sys and /dev")
        return Mount(host=real, path=path, read_only=bool(self.read_only))

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "path": self.path, "read_only": self.read_only}

    @classmethod
    def parse(cls, text: str) -> Mount:
        """``HOST:PATH[:ro|rw]`` as ``docker run -v`` writes it."""
        parts = text.split(":")
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            return cls(parts[0], parts[1], read_only=parts[2] == "ro")
        if len(parts) == 2:
            return cls(parts[0], parts[1])
        raise UsageError(f"bad mount {text!r}: use HOST:PATH or HOST:PATH:ro|rw")


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a tier needs to create a sandbox."""

    image: str | None = None
    limits: Limits = field(default_factory=Limits)
    #: "none", "host" or an :class:`Egress` allow-list (tierbox.network)
    network: NetworkSpec = NetworkPolicy.NONE
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str | None = None  # "uid[:gid]"; None means the tier's non-root default
    mounts: tuple[Mount, ...] = ()
    #: sandbox ports published on the host (loopback unless an address is given)
    ports: tuple[PortMap, ...] = ()

    @property
    def network_mode(self) -> NetworkPolicy:
        return network_mode(self.network)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "limits": self.limits.to_dict(),
            "network": network_to_dict(self.network),
            "env": self.env,
            "workdir": self.workdir,
            "user": self.user,
            "mounts": [m.to_dict() for m in self.mounts],
            "ports": [p.to_dict() for p in self.ports],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxSpec:
        return cls(
            image=data.get("image"),
            limits=Limits.from_dict(data.get("limits", {})),
            network=network_from_dict(data.get("network")),
            env=dict(data.get("env", {})),
            workdir=data.get("workdir", "/"),
            user=data.get("user"),
            mounts=tuple(Mount(**m) for m in data.get("mounts", [])),
            ports=tuple(PortMap(**p) for p in data.get("ports", [])),
        )


_SIZE_UNITS = {
    "": 1 / (1024 * 1024),  # bare numbers are bytes, as in docker --memory
    "b": 1 / (1024 * 1024),
    "k": 1 / 1024,
    "kb": 1 / 1024,
    "kib": 1 / 1024,
    "m": 1,
    "mb": 1,
    "mib": 1,
    "g": 1024,
    "gb": 1024,
    "gib": 1024,
}


def parse_memory_mib(text: str) -> int:
    """Parse ``256m``, ``1g``, ``512MiB`` (Docker style) into MiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        raise SpecError(f"bad memory size {text!r}: use a number with a unit, like 256m or 1g")
    mib = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if mib < 1:
        raise SpecError(f"memory size {text!r} is below 1 MiB: did you forget the unit (256m)?")
    return int(mib)


_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration_s(text: str) -> float:
    """Parse ``10s``, ``500ms``, ``2m`` or a bare number of seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _TIME_UNITS:
        raise SpecError(f"bad duration {text!r}: use a number with a unit, like 10s, 500ms or 2m")
    value = float(m.group(1)) * _TIME_UNITS[m.group(2).lower()]
    if value <= 0:
        raise SpecError(f"duration {text!r} must be positive")
    return value


def check_run_args(
    argv: object, stdin: object, env: object, timeout_s: object, *, allow_empty: bool = False
) -> tuple[list[str], bytes | None]:
    """The arguments of every exec, checked once for every tier: argv a list
    of str (a program first; empty only for a one-shot run of the image's own
    command), stdin bytes or str (UTF-8), env str -> str, timeout_s a
    positive finite number."""
    if isinstance(argv, str | bytes):
        raise UsageError(f"argv must be a list of strings, not one string: ['sh', '-c', {argv!r}]")
    if not isinstance(argv, Sequence) or not all(isinstance(a, str) for a in argv):
        raise UsageError("argv must be a list of strings, program first, like ['echo', 'hi']")
    if not argv and not allow_empty:
        raise UsageError("argv is empty: give the program and its arguments, like ['echo', 'hi']")
    if any("\0" in a for a in argv):
        raise UsageError("argv contains a NUL byte, which no argument can hold")
    if isinstance(stdin, str):
        stdin = stdin.encode()
    elif stdin is not None and not isinstance(stdin, bytes | bytearray | memoryview):
        raise UsageError(f"stdin must be bytes or str, not {type(stdin).__name__}")
    if env is not None and (
        not isinstance(env, Mapping)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        raise UsageError("env must map str names to str values, like {'DEBUG': '1'}")
    if timeout_s is not None:
        check_timeout_s(timeout_s)
    return list(argv), bytes(stdin) if stdin is not None else None
