"""Mounts, and the runtime mount namespace that lets crun run on hybrid hosts.

crun refuses to run on a hybrid cgroup host ("cgroups in hybrid mode not
supported") because it sees cgroup2 at ``/sys/fs/cgroup/unified``. tierbox
therefore keeps one persistent mount namespace, pinned at
``$TIERBOX_RUN/mntns``, in which that cgroup2 mount is unmounted, and runs
crun inside it with ``nsenter``. The sandboxes directory is a shared mount
and the namespace is its slave, so an overlay mounted by tierbox in the host
namespace appears inside the runtime namespace too, and unmounts follow.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
from functools import cache
from pathlib import Path

from tierbox.errors import HostError
from tierbox.host.locks import file_lock
from tierbox.host.runner import require, run
from tierbox.paths import run_dir, sandboxes_dir

UNIFIED = "/sys/fs/cgroup/unified"
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> None:
    """Mount an overlayfs. A direct mount(2): ~0.1 ms, against ~2 ms for mount(8)."""
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    if _libc.mount(b"overlay", str(target).encode(), b"overlay", 0, opts) != 0:
        err = ctypes.get_errno()
        raise HostError(f"cannot mount overlay on {target}: {os.strerror(err)}")


MS_NOSUID, MS_NODEV = 2, 4


def mount_tmpfs(target: Path, options: str) -> None:
    """Mount a nosuid, nodev tmpfs with ``options`` (size=, mode=, uid=...)."""
    flags = MS_NOSUID | MS_NODEV
    if _libc.mount(b"tmpfs", str(target).encode(), b"tmpfs", flags, options.encode()) != 0:
        err = ctypes.get_errno()
        raise HostError(f"cannot mount a tmpfs on {target}: {os.strerror(err)}")


def umount(target: Path) -> None:
    """Lazily unmount ``target``; a path that is not mounted is fine."""
    if _libc.umount2(str(target).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            raise HostError(f"cannot unmount {target}: {os.strerror(err)}")


def mounts_under(prefix: Path, mountinfo: str = "/proc/self/mountinfo") -> list[Path]:
    """Mount points at or below ``prefix``, deepest first."""
    out = []
    with contextlib.suppress(OSError), open(mountinfo) as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(prefix) or point.startswith(str(prefix) + "/"):
                out.append(Path(point))
    return sorted(out, key=lambda p: len(p.parts), reverse=True)


def _is_mountpoint(path: Path, fstype: str | None = None) -> bool:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):
                if fstype is None:
                    return True
                sep = fields.index("-")
                if fields[sep + 1] == fstype:
                    return True
    return False


@cache
def hybrid_cgroups() -> bool:
    """True when cgroup2 is mounted beside v1 controllers (what crun refuses)."""
    return _is_mountpoint(Path(UNIFIED), "cgroup2")


def ns_file() -> Path:
    return run_dir() / "mntns"


def inside_runtime_ns() -> bool:
    pin = ns_file()
    try:
        return os.stat("/proc/self/ns/mnt").st_ino == os.stat(pin).st_ino
    except OSError:
        return False


def _make_bind(path: Path, propagation: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if not _is_mountpoint(path):
        # recursive: a sandbox's mount already below (the process tier's /tmp)
        # must stay visible through the new bind
        run(["mount", "--rbind", str(path), str(path)])
    run(["mount", f"--make-{propagation}", str(path)])


#: pin file -> st_dev of the nsfs mounted on it, when this process last saw it.
#: A stat compares it in ~2 us, so a namespace torn down by ``tierbox gc`` in
#: another process is noticed and made again.
_ensured: dict[Path, int] = {}


def _pinned(pin: Path) -> bool:
    try:
        return _ensured.get(pin) == os.stat(pin).st_dev
    except OSError:
        return False


#: This process's shared lock on ``.mntns.users``: held from its first use of
#: the runtime namespace until it exits, so ``tierbox gc`` (which needs the
#: lock exclusively) never drops the namespace under a process that uses it.
_users_fd: int | None = None


def _users_lock() -> Path:
    return run_dir() / ".mntns.users"


def _hold_users_lock() -> None:
    global _users_fd
    if _users_fd is None:
        run_dir().mkdir(parents=True, exist_ok=True)
        fd = os.open(_users_lock(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        _users_fd = fd


def ensure_runtime_ns() -> None:
    """Create the pinned runtime namespace if it is not there (idempotent)."""
    _hold_users_lock()
    pin = ns_file()
    if _pinned(pin):
        return
    if _is_mountpoint(pin, "nsfs"):
        _ensured[pin] = os.stat(pin).st_dev
        return
    with file_lock(run_dir() / ".mntns.lock"):
        if _is_mountpoint(pin, "nsfs"):
            _ensured[pin] = os.stat(pin).st_dev
            return
        unshare = require("unshare", "util-linux")
        _make_bind(run_dir(), "private")
        _make_bind(sandboxes_dir(), "shared")
        pin.touch()
        run(
            [unshare, f"--mount={pin}", "--propagation", "slave", "umount", "-l", UNIFIED],
            message="cannot create the runtime mount namespace for crun",
        )
        _ensured[pin] = os.stat(pin).st_dev


@cache
def _nsenter() -> str:
    return require("nsenter", "util-linux")


def runtime_prefix() -> list[str]:
    """argv prefix that runs a command inside the runtime namespace ([] when
    not needed: pure v1/v2 host, or this process is already inside)."""
    if not hybrid_cgroups() or inside_runtime_ns():
        return []
    ensure_runtime_ns()
    return [_nsenter(), f"--mount={ns_file()}", "--"]


def teardown_runtime_ns() -> list[str]:
    """Drop the pinned namespace and the bind mounts made for it, but only
    when no sandbox mount is left below them and no other live process uses
    the namespace (it would hold ``.mntns.users``)."""
    global _users_fd
    removed: list[str] = []
    base = sandboxes_dir()
    if not run_dir().is_dir() or any(p != base for p in mounts_under(base)):
        return removed
    fd = _users_fd
    if fd is None:
        fd = os.open(_users_lock(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return removed  # in use by another process
        with file_lock(run_dir() / ".mntns.lock"):
            pin = ns_file()
            for point, fstype in ((pin, "nsfs"), (base, None), (run_dir(), None)):
                if _is_mountpoint(point, fstype):
                    umount(point)
                    if not _is_mountpoint(point, fstype):
                        removed.append(f"mount {point}")
            _ensured.pop(pin, None)
    finally:
        os.close(fd)  # releases the lock; this process re-takes it on next use
        _users_fd = None
    return removed
