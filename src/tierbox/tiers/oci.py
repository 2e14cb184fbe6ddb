"""OCI runtime bundles (config.json) for the container and gvisor tiers.

Written in Python from the runtime-spec, with the hardening Docker and Podman
apply by default: non-root user, no capabilities, no_new_privs, the standard
seccomp profile, masked /proc paths, read-only root, loopback-only network.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from tierbox.errors import HostError
from tierbox.host.cgroups import CPU_PERIOD_US
from tierbox.spec import Limits, NetworkPolicy, SandboxSpec
from tierbox.spec import parse_user as spec_user

SECCOMP_PROFILE = Path("/usr/share/containers/seccomp.json")
DEFAULT_USER = (65534, 65534)  # nobody:nogroup
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INIT_PATH = "/.tierbox/init"  # where the long-lived sandbox's init is bind-mounted

MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/dev/block",
]
READONLY_PATHS = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
]


def parse_user(user: str | None) -> tuple[int, int]:
    """The spec's user, or nobody:nogroup."""
    return spec_user(user) or DEFAULT_USER


_DOCKER_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


@cache
def seccomp_profile() -> dict[str, Any]:
    """The standard default profile, converted from Docker's JSON format to
    the OCI one for a process holding no capabilities on this architecture."""
    try:
        raw = json.loads(SECCOMP_PROFILE.read_text())
    except OSError as exc:
        raise HostError(
            f"{SECCOMP_PROFILE} is missing: apt-get install golang-github-containers-common"
        ) from exc
    arch = _DOCKER_ARCH.get(platform.machine(), platform.machine())
    kernel = tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2])
    architectures: list[str] = []
    for entry in raw.get("archMap", []):
        if entry["architecture"] == f"SCMP_ARCH_{platform.machine().upper()}":
            architectures = [entry["architecture"], *entry.get("subArchitectures", [])]
    syscalls = []
    for rule in raw["syscalls"]:
        inc = rule.get("includes") or {}
        excl = rule.get("excludes") or {}
        if inc.get("caps"):  # needs a capability we never grant
            continue
        if inc.get("arches") and arch not in inc["arches"]:
            continue
        if excl.get("arches") and arch in excl["arches"]:
            continue
        if inc.get("minKernel"):
            want = tuple(int(x) for x in inc["minKernel"].split(".")[:2])
            if kernel < want:
                continue
        out: dict[str, Any] = {"names": rule["names"], "action": rule["action"]}
        if rule.get("args"):
            out["args"] = rule["args"]
        if "errnoRet" in rule:
            out["errnoRet"] = rule["errnoRet"]
        syscalls.append(out)
    profile: dict[str, Any] = {
        "defaultAction": raw["defaultAction"],
        "architectures": architectures,
        "syscalls": syscalls,
    }
    if "defaultErrnoRet" in raw:
        profile["defaultErrnoRet"] = raw["defaultErrnoRet"]
    return profile


def process_json(
    argv: Sequence[str],
    spec: SandboxSpec,
    *,
    env: Mapping[str, str],
    cwd: str,
    rlimits: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    uid, gid = parse_user(spec.user)
    return {
        "terminal": False,
        "user": {"uid": uid, "gid": gid},
        "args": list(argv),
        "env": [f"{k}={v}" for k, v in env.items()],
        "cwd": cwd,
        "capabilities": {
            "bounding": [],
            "effective": [],
            "inheritable": [],
            "permitted": [],
            "ambient": [],
        },
        "noNewPrivileges": True,
        "rlimits": [
            {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024},
            {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
            *rlimits,
        ],
    }


def resources(limits: Limits) -> dict[str, Any]:
    """OCI linux.resources for the limits (swap equal to memory)."""
    out: dict[str, Any] = {}
    if limits.memory_mib is not None:
        size = limits.memory_mib * 1024 * 1024
        out["memory"] = {"limit": size, "swap": size}
    if limits.pids is not None:
        out["pids"] = {"limit": limits.pids}
    if limits.cpus is not None:
        out["cpu"] = {"quota": int(limits.cpus * CPU_PERIOD_US), "period": CPU_PERIOD_US}
    return out


def bundle_config(
    *,
    rootfs: Path,
    process: dict[str, Any],
    spec: SandboxSpec,
    cgroups_path: str | None,
    hostname: str,
    binds: Mapping[str, str] | None = None,
    seccomp: bool = True,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The whole config.json. ``binds``: sandbox path -> host file
    bind-mounted read-only (the long-lived sandbox's init at INIT_PATH). ``cgroups_path`` None: the
    runtime manages no cgroup; the container stays in the one it was started in."""
    tmp_mib = spec.limits.disk_mib or 64
    mounts: list[dict[str, Any]] = [
        {
            "destination": "/proc",
            "type": "proc",
            "source": "proc",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777", f"size={tmp_mib}m"],
        },
    ]
    for destination, source in (binds or {}).items():
        mounts.append(
            {
                "destination": destination,
                "type": "bind",
                "source": source,
                "options": ["bind", "ro", "nosuid"],
            }
        )
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")]
    if spec.network is NetworkPolicy.NONE:
        namespaces.append({"type": "network"})
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "maskedPaths": MASKED_PATHS,
        "readonlyPaths": READONLY_PATHS,
    }
    if cgroups_path is not None:
        # The runtime manages this cgroup and rewrites its limits: give it ours.
        linux["cgroupsPath"] = "/" + cgroups_path
        linux["resources"].update(resources(spec.limits))
    if seccomp:
        linux["seccomp"] = seccomp_profile()
    return {
        "ociVersion": "1.0.2",
        "annotations": dict(annotations or {}),
        "process": process,
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": hostname,
        "mounts": mounts,
        "linux": linux,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data))  # dumps uses the C encoder; dump() does not
