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


#: Syscalls Docker's default profile allows only with a capability (CAP_SYS_ADMIN,
#: CAP_SYS_BOOT, CAP_SYS_PTRACE, CAP_SYS_NICE, CAP_SYSLOG) or never, that
#: containers-common allows to every process. The workload holds no capability,
#: so each is refused with EPERM, as Docker refuses it.
DENIED_WITHOUT_CAPS: tuple[str, ...] = (
    # namespaces and mounts: with user namespaces, "no capabilities" is not enough
    "unshare",
    "setns",
    "mount",
    "umount",
    "umount2",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "pivot_root",
    # the kernel keyring is not namespaced
    "keyctl",
    "add_key",
    "request_key",
    # kernel log, accounting and identity
    "syslog",
    "reboot",
    "bpf",
    "perf_event_open",
    "fanotify_init",
    "lookup_dcookie",
    "quotactl",
    "quotactl_fd",
    "sethostname",
    "setdomainname",
    # other processes and NUMA policy
    "pidfd_getfd",
    "kcmp",
    "process_madvise",
    "get_mempolicy",
    "set_mempolicy",
    "set_mempolicy_home_node",
    "mbind",
)

#: clone() flags that create namespaces; Docker allows clone only with none set.
CLONE_NAMESPACE_FLAGS: dict[str, int] = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
CLONE_NAMESPACE_MASK = sum(CLONE_NAMESPACE_FLAGS.values())  # 0x7e020000, Docker's mask
AF_NETLINK = 16
NETLINK_AUDIT = 9
AF_VSOCK = 40
EPERM = 1
EINVAL = 22
ENOSYS = 38


def _arg(index: int, value: int, op: str, value_two: int = 0) -> dict[str, Any]:
    return {"index": index, "value": value, "valueTwo": value_two, "op": op}


def _masked(index: int, mask: int, value: int) -> dict[str, Any]:
    return _arg(index, mask, "SCMP_CMP_MASKED_EQ", value)


def _clone_rules(arch: str) -> list[dict[str, Any]]:
    """clone without namespace flags (fork, threads); clone3 ENOSYS, so libc falls back.

    clone3 passes its flags in memory, where seccomp cannot look: Docker refuses
    it with ENOSYS and glibc (>= 2.34) then retries with clone. A namespace flag
    on clone gets EPERM, one rule per flag: a rule set must be disjoint, since
    libseccomp gives no order to overlapping rules of different actions.
    """
    index = 1 if arch in ("s390", "s390x") else 0  # s390 swaps clone's first two arguments
    rules: list[dict[str, Any]] = [
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [_masked(index, CLONE_NAMESPACE_MASK, 0)],
        }
    ]
    for flag in CLONE_NAMESPACE_FLAGS.values():
        rules.append(
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": EPERM,
                "args": [_masked(index, flag, flag)],
            }
        )
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
    return rules


def _socket_rules() -> list[dict[str, Any]]:
    """socket(): containers-common's rule for a process without CAP_AUDIT_WRITE
    (NETLINK_AUDIT gets EINVAL) plus Docker's refusal of AF_VSOCK, which no
    network namespace confines (it reaches the hypervisor and its host).

    libseccomp ANDs comparisons of different arguments only, so "neither 16 nor
    40" is spelled as disjoint ranges of the domain: <16, 17, 18-19, 20-23,
    24-31, 32-39, >40 (masked compares select the power-of-two blocks).
    """
    domain_ok = [
        _arg(0, AF_NETLINK, "SCMP_CMP_LT"),
        _arg(0, 17, "SCMP_CMP_EQ"),
        _masked(0, ~1 & 0xFFFFFFFFFFFFFFFF, 18),
        _masked(0, ~3 & 0xFFFFFFFFFFFFFFFF, 20),
        _masked(0, ~7 & 0xFFFFFFFFFFFFFFFF, 24),
        _masked(0, ~7 & 0xFFFFFFFFFFFFFFFF, 32),
        _arg(0, AF_VSOCK, "SCMP_CMP_GT"),
    ]
    rules: list[dict[str, Any]] = [
        {"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [cmp]} for cmp in domain_ok
    ]
    rules += [
        {
            "names": ["socket"],
            "action": "SCMP_ACT_ALLOW",
            "args": [
                _arg(0, AF_NETLINK, "SCMP_CMP_EQ"),
                _arg(2, NETLINK_AUDIT, "SCMP_CMP_NE"),
            ],
        },
        {
            "names": ["socket"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EINVAL,
            "args": [
                _arg(0, AF_NETLINK, "SCMP_CMP_EQ"),
                _arg(2, NETLINK_AUDIT, "SCMP_CMP_EQ"),
            ],
        },
        {
            "names": ["socket"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EPERM,
            "args": [_arg(0, AF_VSOCK, "SCMP_CMP_EQ")],
        },
    ]
    return rules


@cache
def seccomp_profile() -> dict[str, Any]:
    """The container tier's seccomp profile, in the OCI format, for a process
    holding no capabilities on this architecture.

    Origin: the default profile of Debian's golang-github-containers-common
    (``/usr/share/containers/seccomp.json``, what Podman applies). Its rules
    with ``includes.caps`` are dropped (the workload has no capability), its
    ``arches`` and ``minKernel`` conditions are applied to this host.

    containers-common allows namespace creation, mounts and the keyring to
    every process and relies on missing capabilities to stop them; inside a
    user namespace a process has all capabilities again. So, as Docker's
    default profile (moby profiles/seccomp/default.json) does for a process
    without CAP_SYS_ADMIN, the conversion also:

    - refuses with EPERM every syscall in :data:`DENIED_WITHOUT_CAPS`
      (unshare, setns, the mount family, pivot_root, keyctl, add_key,
      request_key, syslog, reboot, bpf, perf_event_open, ...);
    - allows ``clone`` only without namespace flags (arg 0 masked with
      0x7e020000 equals 0) and refuses it with EPERM otherwise;
    - answers ``clone3`` with ENOSYS, so libc falls back to ``clone``;
    - refuses ``socket(AF_VSOCK, ...)`` with EPERM.

    Kept from containers-common where Docker differs: the default action is
    ENOSYS (Docker: EPERM), so syscalls newer than the profile look absent;
    io_uring, io_pgetevents, vmsplice and futex_waitv stay refused (Docker
    allows them); legacy i386 entry points (sigaction, signal, sigpending,
    sigsuspend, readdir, timerfd) and MIPS ``syscall`` stay allowed;
    NETLINK_AUDIT sockets get EINVAL.
    """
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
    replaced = {*DENIED_WITHOUT_CAPS, "clone", "clone3", "socket"}
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
        names = [n for n in rule["names"] if n not in replaced]
        if not names:
            continue
        out: dict[str, Any] = {"names": names, "action": rule["action"]}
        if rule.get("args"):
            out["args"] = rule["args"]
        if "errnoRet" in rule:
            out["errnoRet"] = rule["errnoRet"]
        syscalls.append(out)
    syscalls += _clone_rules(arch)
    syscalls += _socket_rules()
    syscalls.append(
        {"names": list(DENIED_WITHOUT_CAPS), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}
    )
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
    user: str | None = None,
) -> dict[str, Any]:
    """The OCI ``process``: ``user`` overrides the spec's for one exec."""
    uid, gid = parse_user(user if user is not None else spec.user)
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
    netns_path: str | None = None,
) -> dict[str, Any]:
    """The whole config.json. ``netns_path``: the network namespace to join
    (an egress sandbox's, made by its gateway). ``binds``: sandbox path -> host file
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
    for m in spec.mounts:  # host directories the caller asked for (Mount.checked)
        mounts.append(
            {
                "destination": m.path,
                "type": "bind",
                "source": m.host,
                "options": ["rbind", "ro" if m.read_only else "rw", "nosuid", "nodev"],
            }
        )
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
    if netns_path is not None:
        namespaces.append({"type": "network", "path": netns_path})
    elif spec.network is not NetworkPolicy.HOST:  # only "host" shares the host's
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
