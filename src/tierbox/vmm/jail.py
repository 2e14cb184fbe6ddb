"""Who a microVM's QEMU runs as, and the files it is given.

A QEMU bug under a hostile guest gives the guest that process's powers, so
each QEMU runs as a host user of its own (uid = gid, claimed per sandbox
from :mod:`tierbox.host.uids`' private range), holding no capability and no
supplementary group but :data:`SNAPSHOT_GID` for a restored guest. It is
started directly as that user (``Popen(user=, group=, extra_groups=)``):
QEMU's ``-runas`` drops privileges after QEMU's own seccomp filter is in
place, and ``-sandbox ...,elevateprivileges=deny`` then kills it (SIGSYS).

It runs inside bubblewrap (Debian's ``bwrap``, started as that user, so
unprivileged: a user namespace mapping only its own uid) in new user, mount,
PID, network, IPC, UTS and cgroup namespaces, as PID 1 of its own, with no
capability even there and no further user namespaces (``--disable-userns``).
Its root is a fresh tmpfs holding ``/usr`` read-only (QEMU, its libraries
and firmware), a minimal ``/dev`` (null, zero, random, urandom, tty; plus
``/dev/kvm`` under KVM), its own ``/proc``, and read-write only its
sandbox's ``vmm/`` directory and RAM file, bound at the same paths (the
root itself is remounted read-only). The network namespace holds only
loopback: the guest's NIC is an already-open tap fd.

QEMU opens nothing of tierbox's by its host path: the kernel, initramfs and
root disk (under root's 0700 home) are inherited read-only descriptors named
``/proc/self/fd/N`` (the kernel reopens the very inode, checking only the
file's own mode), the egress tap is an open fd, the guest's RAM file in
/dev/shm is made 0600 and owned by the VMM's uid before QEMU starts, and its
sockets, console FIFO and pid file live in the sandbox's ``vmm/`` directory,
0700 and the VMM's (tierbox's own records stay in the root-owned parent,
out of QEMU's reach).

A snapshot's ``ram.bin`` is owned by root, mode 0660, group
:data:`SNAPSHOT_GID`: QEMU 7.2 opens a ``share=off`` RAM file read-write
(``readonly=on`` maps it as ROM; the read-only-file-private-mapping pair,
``rom=off``, came in QEMU 8.2), so a restored guest's QEMU needs write
permission although it maps the file private copy-on-write. Only restored
QEMUs hold that group, and they reach no snapshot but the one they are
handed as an fd (the snapshots live under root's 0700 home).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import time
from dataclasses import dataclass, field
from pathlib import Path

from tierbox.errors import HostError
from tierbox.host import uids
from tierbox.host.runner import which

#: The group of snapshot RAM files: only restored QEMUs hold it. Just below
#: the per-sandbox range, so no sandbox uid/gid can be it.
SNAPSHOT_GID = uids.UID_BASE - 1
#: Benchmark knob, read only here: ``1`` runs QEMU as tierbox's own user
#: (root) in the host's namespaces, so benchmarks/bench_jail.py can measure
#: what the jail costs. Nothing else sets it.
NO_JAIL_ENV = "TIERBOX_BENCH_NO_VMM_JAIL"
#: Memory QEMU itself needs beyond guest RAM, for its cgroup's limit.
#: Measured under TCG (QEMU 7.2, 256 MiB guest, boot + exec): QEMU's
#: anonymous memory (heap, TCG's translation cache) was 64 MiB for a
#: busybox shell loop on 1 vCPU and 104 MiB for Python 3.11 importing a dozen
#: modules on 2 vCPUs; cgroup peak minus touched guest RAM was 66 and 113 MiB
#: (libraries and disk page cache included, reclaimable). 192 MiB leaves a
#: margin: TCG's translation cache may grow to 1 GiB for a guest running a
#: great deal of distinct code, and such a QEMU is OOM-killed in its cgroup.
OVERHEAD_MIB = 192


@dataclass(frozen=True)
class VmmUser:
    """The credentials one QEMU runs with."""

    uid: int
    gid: int
    extra_groups: tuple[int, ...] = field(default=())

    def popen_kwargs(self) -> dict[str, object]:
        return {
            "user": self.uid,
            "group": self.gid,
            "extra_groups": list(self.extra_groups),
            "umask": 0o077,
        }


def enabled() -> bool:
    """Jail QEMUs unless the benchmark knob says not to; only root can (a
    tierbox run by another user starts QEMU as that user, unjailed)."""
    return os.geteuid() == 0 and os.environ.get(NO_JAIL_ENV, "") != "1"


def claim(sandbox_id: str, *, restored: bool = False) -> VmmUser | None:
    """A fresh uid for ``sandbox_id``'s QEMU (None with the benchmark knob
    set); a restored guest's also holds :data:`SNAPSHOT_GID`."""
    if not enabled():
        return None
    uid = uids.claim(sandbox_id)
    return VmmUser(uid, uid, (SNAPSHOT_GID,) if restored else ())


def release(user: VmmUser | int | None) -> None:
    if user is not None:
        uids.release(user.uid if isinstance(user, VmmUser) else user)


def make_vmm_dir(d: Path, user: VmmUser | None) -> None:
    """The directory QEMU writes to: 0700, the VMM's. Its parent (tierbox's
    sandbox directory) becomes 0710 root:<VMM gid>, so this QEMU alone may
    pass through it, and list or read nothing there."""
    d.mkdir(mode=0o700, exist_ok=True)
    if user is not None:
        os.chown(d, user.uid, user.gid)
        os.chown(d.parent, -1, user.gid)
        os.chmod(d.parent, 0o710)
    os.chmod(d, 0o700)


def private_file(path: Path, user: VmmUser | None) -> None:
    """Create ``path`` empty, 0600, owned by the VMM (a guest RAM file QEMU
    then opens and sizes): never world-readable, not even for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if user is not None:
            os.fchown(fd, user.uid, user.gid)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def open_readonly(path: Path | str) -> int:
    """A read-only fd of ``path`` for QEMU (inheritable only through pass_fds)."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def fd_path(fd: int) -> str:
    """How QEMU names an inherited fd: it reopens the same inode."""
    return f"/proc/self/fd/{fd}"


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# ---- the namespaces ----------------------------------------------------------------

BWRAP = "bwrap"
#: How long bwrap may take to report QEMU's pid (it takes ~15 ms).
INFO_TIMEOUT_S = 10.0


def bwrap_path() -> str:
    found = which(BWRAP)
    if found is None:
        raise HostError(
            "bubblewrap is not installed (the microVM's QEMU runs inside it): "
            "run `make setup` or `apt-get install bubblewrap`"
        )
    return found


def namespaced_argv(argv: list[str], *, binds: list[Path], info_fd: int) -> list[str]:
    """``argv`` inside bwrap: new namespaces, a root holding ``/usr``
    read-only, a minimal /dev, its own /proc, and ``binds`` read-write at
    their own paths. QEMU is PID 1 there; bwrap writes its host pid, as
    JSON, to ``info_fd``."""
    jail = [
        bwrap_path(),
        "--unshare-all", "--unshare-user", "--disable-userns", "--as-pid-1",
        "--info-fd", str(info_fd),
        "--ro-bind", "/usr", "/usr",
        "--symlink", "usr/lib", "/lib",
        "--symlink", "usr/lib64", "/lib64",
        "--symlink", "usr/bin", "/bin",
        "--dev", "/dev",
        "--proc", "/proc",
        "--chdir", "/",
    ]  # fmt: skip
    if "kvm" in argv and Path("/dev/kvm").exists():
        jail += ["--dev-bind", "/dev/kvm", "/dev/kvm"]
    for b in binds:
        jail += ["--bind", str(b), str(b)]
    # the tmpfs root itself read-only: QEMU writes only through the binds
    return [*jail, "--remount-ro", "/", "--", *argv]


def read_child_pid(fd: int, *, timeout_s: float = INFO_TIMEOUT_S) -> int | None:
    """QEMU's host pid from bwrap's info fd (read to its end); None if bwrap
    closed it without one (it failed) or took too long."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        if len(data) > 65536:
            return None
    try:
        pid = json.loads(data or b"{}").get("child-pid")
    except ValueError:
        return None
    return pid if isinstance(pid, int) and pid > 0 else None
