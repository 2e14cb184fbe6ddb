"""File access inside a sandbox's root from the host, in one step that cannot
leave that root.

Every path is resolved by the kernel with ``openat2(root_fd, path,
RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)``: ``..`` stops at the root, absolute
symlinks are taken relative to it, and ``/proc/*/root``-style magic links are
refused. There is no check-then-open gap for a hostile workload to race
(swapping a directory for a symlink to ``/`` while tierbox works). Where
openat2 is missing (Linux < 5.6) every call fails closed with HostError.

The work runs in a short-lived thread whose filesystem credentials are the
workload's (``setfsuid``/``setfsgid``, no supplementary groups): the kernel
drops CAP_DAC_OVERRIDE and friends for it, so tierbox can read and write only
what the workload itself could, and what it creates belongs to the workload.
Only regular files are read or written; FIFOs, sockets and devices are opened
non-blocking and refused, and procfs/sysfs files are refused outright.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from tierbox.errors import (
    FileTooLargeError,
    HostError,
    NotRegularFileError,
    SandboxFileError,
)
from tierbox.spec import FileEntry, FileKind

T = TypeVar("T")

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
IN_ROOT = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS

# Per-architecture numbers of the raw syscalls used here. Raw, because glibc's
# setgroups() changes every thread of the process (the setxid broadcast), and
# only this worker thread may change.
_SYSCALLS = {
    "x86_64": {"openat2": 437, "setgroups": 116, "setfsuid": 122, "setfsgid": 123},
    "aarch64": {"openat2": 437, "setgroups": 159, "setfsuid": 151, "setfsgid": 152},
}
_NR = _SYSCALLS.get(platform.machine(), {})

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long

#: filesystems whose "regular files" are kernel interfaces, not data
_PSEUDO_FS = {
    0x9FA0: "procfs",
    0x62656572: "sysfs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0xCAFE4A11: "bpf",
}
CHUNK = 1 << 20


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux starts with f_type (long); the rest is
    # not read. Sized generously for the kernel to fill.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = IN_ROOT) -> int:
    """openat2(2); raises OSError like os.open, HostError where it does not exist."""
    nr = _NR.get("openat2")
    if nr is None:
        raise HostError(f"openat2 is not known on {platform.machine()}: cannot reach sandbox files")
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(nr, dirfd, path.encode(), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            raise HostError("this kernel has no openat2 (Linux 5.6+): cannot reach sandbox files")
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def _fs_type(fd: int) -> int:
    buf = _Statfs()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(buf.f_type) & 0xFFFFFFFF


def _kind(mode: int) -> FileKind:
    if stat.S_ISREG(mode):
        return FileKind.FILE
    if stat.S_ISDIR(mode):
        return FileKind.DIR
    if stat.S_ISLNK(mode):
        return FileKind.SYMLINK
    return FileKind.OTHER


def _what(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def run_as(uid: int | None, gid: int | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread with filesystem uid/gid ``uid``/``gid`` and
    no supplementary groups; ``None`` keeps tierbox's own. The thread ends
    with ``fn``, and its credentials with it."""
    if uid is None and gid is None:
        return fn()
    box: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            _drop_to(uid, gid)
            box.append(fn())
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    t = threading.Thread(target=target, name="tierbox-files", daemon=True)
    t.start()
    t.join()
    if failure:
        raise failure[0]
    return box[0]


def _drop_to(uid: int | None, gid: int | None) -> None:
    if not _NR:
        raise HostError(f"per-thread credentials are not known on {platform.machine()}")
    if _libc.syscall(_NR["setgroups"], 0, None) != 0:
        err = ctypes.get_errno()
        raise HostError(f"cannot drop supplementary groups: {os.strerror(err)}")
    if gid is not None:
        _libc.syscall(_NR["setfsgid"], gid)
        if _libc.syscall(_NR["setfsgid"], -1) != gid:  # -1 is invalid: returns the current one
            raise HostError(f"cannot switch the file system gid to {gid}")
    if uid is not None:
        _libc.syscall(_NR["setfsuid"], uid)
        if _libc.syscall(_NR["setfsuid"], -1) != uid:
            raise HostError(f"cannot switch the file system uid to {uid}")


class RootDir:
    """A sandbox's root directory, pinned by an ``O_PATH`` fd for its whole
    life, and every file operation tierbox does inside it.

    ``uid``/``gid``: the workload's user, whose credentials file work uses.
    ``label`` names the sandbox in error messages; ``shown_at`` is where the
    directory appears inside the sandbox, so messages carry sandbox paths.
    """

    def __init__(
        self, fd: int, *, uid: int | None, gid: int | None, label: str, shown_at: str = "/"
    ) -> None:
        self.fd = fd
        self.uid = uid
        self.gid = gid
        self.label = label
        self.shown_at = shown_at.rstrip("/")

    @classmethod
    def open(
        cls, path: str, *, uid: int | None, gid: int | None, label: str, shown_at: str = "/"
    ) -> RootDir:
        """Pin the directory at host path ``path`` (e.g. ``/proc/PID/root``)."""
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return cls(fd, uid=uid, gid=gid, label=label, shown_at=shown_at)

    def _show(self, path: str) -> str:
        return (self.shown_at + path if path != "/" else self.shown_at) or "/"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ---- errors ----------------------------------------------------------------
    def _fail(self, verb: str, path: str, exc: OSError) -> SandboxFileError:
        hint = ""
        if exc.errno == errno.EROFS:
            hint = ": the sandbox's root is read-only; write under /tmp"
        elif exc.errno == errno.ELOOP:
            hint = ": too many symlinks, or a link tierbox does not follow"
        elif exc.errno == errno.EXDEV:
            hint = ": a link that leaves the sandbox"
        return SandboxFileError(
            f"cannot {verb} {self._show(path)} in sandbox {self.label}: {exc.strerror}{hint}",
            path=self._show(path),
        )

    def _open_regular(self, path: str, flags: int, mode: int = 0) -> tuple[int, os.stat_result]:
        """Open and prove it is a regular file on a data filesystem (non-blocking
        open, so a FIFO or device cannot stall us; refused before any read)."""
        fd = openat2(self.fd, path, flags | os.O_NONBLOCK | os.O_NOCTTY, mode)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotRegularFileError(
                    f"cannot use {self._show(path)} in sandbox {self.label}: "
                    f"it is {_what(st.st_mode)}, not a regular file",
                    path=self._show(path),
                )
            fs = _PSEUDO_FS.get(_fs_type(fd))
            if fs is not None:
                raise NotRegularFileError(
                    f"cannot use {self._show(path)} in sandbox {self.label}: it is a {fs} kernel "
                    "interface, not a file",
                    path=self._show(path),
                )
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    # ---- reads -------------------------------------------------------------
    def read_file(self, path: str, max_bytes: int) -> bytes:
        chunks: list[bytes] = []

        class _Sink:
            def write(self, b: bytes) -> int:
                chunks.append(b)
                return len(b)

        self.copy_out(path, _Sink(), max_bytes)  # type: ignore[arg-type]
        return b"".join(chunks)

    def copy_out(self, path: str, out: BinaryIO, max_bytes: int | None) -> int:
        """Copy the regular file ``path`` into ``out``, at most ``max_bytes``
        (a file that grows past it while read fails too)."""

        def work() -> int:
            try:
                fd, st = self._open_regular(path, os.O_RDONLY)
            except OSError as exc:
                raise self._fail("read", path, exc) from exc
            try:
                if max_bytes is not None and st.st_size > max_bytes:
                    raise FileTooLargeError(
                        f"{self._show(path)} in sandbox {self.label} is {st.st_size} bytes, "
                        f"over the max_bytes cap of {max_bytes}: pass a larger max_bytes "
                        "or use download",
                        path=self._show(path),
                    )
                total = 0
                while True:
                    want = CHUNK if max_bytes is None else min(CHUNK, max_bytes + 1 - total)
                    chunk = os.read(fd, max(want, 1))
                    if not chunk:
                        return total
                    total += len(chunk)
                    if max_bytes is not None and total > max_bytes:
                        raise FileTooLargeError(
                            f"{self._show(path)} in sandbox {self.label} grew past the "
                            f"max_bytes cap of {max_bytes} while it was read",
                            path=self._show(path),
                        )
                    out.write(chunk)
            except OSError as exc:
                raise self._fail("read", path, exc) from exc
            finally:
                os.close(fd)

        return run_as(self.uid, self.gid, work)

    def entries(self, path: str) -> list[FileEntry]:
        def work() -> list[FileEntry]:
            try:
                dfd = openat2(self.fd, path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as exc:
                raise self._fail("list", path, exc) from exc
            out = []
            try:
                for name in os.listdir(dfd):
                    try:
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while we listed
                    mode = stat.S_IMODE(st.st_mode)
                    out.append(FileEntry(name, _kind(st.st_mode), st.st_size, mode))
            except OSError as exc:
                raise self._fail("list", path, exc) from exc
            finally:
                os.close(dfd)
            return out

        return run_as(self.uid, self.gid, work)

    # ---- writes ----------------------------------------------------------------
    def _ensure_dir(self, path: str) -> None:
        """``mkdir -p`` inside the root: each missing level is made with
        mkdirat in an already opened (so already resolved) parent."""
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts) + 1):
            sub = "/" + "/".join(parts[:i])
            try:
                os.close(openat2(self.fd, sub, os.O_PATH | os.O_DIRECTORY))
                continue
            except FileNotFoundError:
                pass
            parent = openat2(self.fd, "/" + "/".join(parts[: i - 1]), os.O_PATH | os.O_DIRECTORY)
            try:
                os.mkdir(parts[i - 1], 0o755, dir_fd=parent)
            except FileExistsError:
                pass  # made meanwhile; the next level's open checks it is a directory
            finally:
                os.close(parent)

    def write_file(self, path: str, data: bytes, mode: int) -> None:
        def work() -> None:
            parent = path.rsplit("/", 1)[0] or "/"
            try:
                self._ensure_dir(parent)
                fd, _st = self._open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            except OSError as exc:
                raise self._fail("write", path, exc) from exc
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view[:CHUNK])
                    view = view[n:]
                os.fchmod(fd, mode)
            except OSError as exc:
                raise self._fail("write", path, exc) from exc
            finally:
                os.close(fd)

        run_as(self.uid, self.gid, work)


def resolve_static(root: Path, inner: str) -> Path:
    """``inner`` resolved under ``root`` as if ``root`` were ``/`` (a link to
    ``/etc`` stays inside), as a host path.

    Only for trees nobody changes while tierbox reads them (an unpacked image
    in the store): resolving first and opening later is a race a workload
    wins in a live sandbox, where :class:`RootDir` must be used instead.
    """
    parts: list[str] = []
    todo = [p for p in inner.split("/") if p not in ("", ".")]
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if parts:
                parts.pop()
            continue
        candidate = root.joinpath(*parts, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise OSError(f"too many symlinks resolving {inner}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                parts = []
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        parts.append(part)
    return root.joinpath(*parts)
