"""Copying files and directory trees between the host and a sandbox.

Written once against the contract's file primitives (``entries``,
``copy_out``, ``put_file``), so it behaves the same on every tier and inherits
their guarantees: every open inside the sandbox cannot leave it, reads are
regular files only. What comes out is bounded (total bytes, entry count,
depth), written to disk as it streams, and never followed: symlinks and
special files inside the sandbox are not copied, every host-side write goes
through an open directory descriptor with O_NOFOLLOW, and a file is created
under a fresh name with O_EXCL and renamed into place, so nothing on the host
is written through a symlink. Permission bits travel where the tier reports
them (never set-uid or set-gid bits).

Directories go into a container, gVisor, microVM or VM as one tar stream
unpacked inside it by its own ``tar``, as the workload's user (so they
belong to it, modes and empty directories kept, one command instead of one
per file); into a sandbox whose files are a host directory (process, wasm),
or one without a shell and tar, file by file through ``put_file``.

:func:`cp_in` and :func:`cp_out` add ``docker cp``'s rules for where a copy
lands (into an existing directory under its own name; ``SRC/.`` for a
directory's contents; an existing file replaced).
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import secrets
import stat
import tarfile
from pathlib import Path
from typing import BinaryIO

from tierbox.errors import FileTooLargeError, SandboxFileError, TierboxError, UsageError
from tierbox.spec import FileEntry, FileKind, sandbox_path
from tierbox.tiers.base import DirectoryFiles, Instance

#: Defaults for what one download may bring out of a sandbox.
DOWNLOAD_MAX_BYTES = 1 << 30
DOWNLOAD_MAX_ENTRIES = 100_000
MAX_DEPTH = 64
#: A directory upload larger than this goes file by file instead of as one
#: tar stream (which is built in memory).
UPLOAD_TAR_MAX_BYTES = 256 << 20
#: Time for the sandbox's tar to unpack an upload.
UPLOAD_TIMEOUT_S = 600.0
#: Status of a shell that could not find a program (no sh, no tar).
_NOT_FOUND = 127
#: Unpacks the upload's stream into "$1" (made, with mode "$2", if missing)
#: as the workload: modes as in the stream, owned by the workload's user.
_UNTAR = (
    "umask 022; new=; "
    'if [ ! -d "$1" ]; then new=1; mkdir -p -- "$1" || exit 1; fi; '
    'cd -- "$1" && tar -xpof - || exit $?; '
    '[ -z "$new" ] || chmod "$2" .'
)
#: Permission bits a copy keeps: never set-uid or set-gid.
FILE_MODE_MASK = 0o777
DIR_MODE_MASK = 0o1777


class _Budget:
    def __init__(self, max_bytes: int | None, max_entries: int) -> None:
        self.bytes_left = max_bytes
        self.entries_left = max_entries
        self.copied = 0

    def entry(self, path: str) -> None:
        self.entries_left -= 1
        if self.entries_left < 0:
            raise SandboxFileError(
                f"download of {path} stopped: more entries than max_entries", path=path
            )


def _entry_of(inst: Instance, path: str) -> FileEntry:
    """``path``'s entry from its parent's listing (links not followed)."""
    if path == "/":
        return FileEntry("/", FileKind.DIR)
    parent, name = posixpath.split(path)
    for e in inst.entries(parent):
        if e.name == name:
            return e
    raise SandboxFileError(f"cannot copy {path}: No such file or directory", path=path)


# ---- out of a sandbox ----------------------------------------------------------------------


def download(
    inst: Instance,
    path: str,
    local: Path,
    *,
    max_bytes: int | None = DOWNLOAD_MAX_BYTES,
    max_entries: int = DOWNLOAD_MAX_ENTRIES,
    overwrite: bool = False,
) -> int:
    """Copy ``path`` (file or directory) from the sandbox to ``local``; returns
    the bytes copied. An existing directory ``local`` receives it under its
    own name, as ``docker cp`` does. An existing host file is replaced only
    with ``overwrite`` (then existing directories are merged into), and
    never through a symlink."""
    src = sandbox_path(path, cwd=inst.workdir)
    if local.is_dir():
        local = local / (posixpath.basename(src) or "root")
    if not overwrite and (local.exists() or local.is_symlink()):
        raise UsageError(f"{local} already exists: tierbox never overwrites a host file")
    return _download_to(inst, src, local, max_bytes, max_entries, overwrite=overwrite)


def _download_to(
    inst: Instance,
    src: str,
    local: Path,
    max_bytes: int | None,
    max_entries: int,
    *,
    overwrite: bool,
) -> int:
    """Copy ``src`` to exactly ``local`` (whose parent must exist)."""
    budget = _Budget(max_bytes, max_entries)
    entry = _entry_of(inst, src)
    if entry.kind not in (FileKind.DIR, FileKind.FILE):
        raise SandboxFileError(
            f"cannot copy {src}: it is a {entry.kind.value}, not a file or directory", path=src
        )
    try:
        parent = os.open(local.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"{local.parent}: {exc.strerror}") from exc
    try:
        _copy_entry(inst, src, entry, parent, local.name, budget, 0, overwrite, str(local))
    finally:
        os.close(parent)
    return budget.copied


def _copy_entry(
    inst: Instance,
    src: str,
    entry: FileEntry,
    parent: int,
    name: str,
    budget: _Budget,
    depth: int,
    overwrite: bool,
    shown: str,
) -> None:
    if entry.kind is FileKind.DIR:
        _download_dir(inst, src, entry, parent, name, budget, depth, overwrite, shown)
    elif entry.kind is FileKind.FILE:
        _download_file(inst, src, entry, parent, name, budget, overwrite, shown)
    # symlinks and special files are not followed or copied: a link's
    # target is the sandbox's to interpret, not the host's


def _existing(parent: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _download_file(
    inst: Instance,
    src: str,
    entry: FileEntry,
    parent: int,
    name: str,
    budget: _Budget,
    overwrite: bool,
    shown: str,
) -> None:
    budget.entry(src)
    there = _existing(parent, name)
    if there is not None:
        if not overwrite:
            raise UsageError(f"{shown} already exists: tierbox never overwrites a host file")
        if stat.S_ISLNK(there.st_mode):
            raise UsageError(f"{shown} is a symlink: tierbox never writes through one")
        if not stat.S_ISREG(there.st_mode):
            raise UsageError(f"{shown} exists and is not a regular file: not replaced")
    mode = 0o644 if entry.mode is None else entry.mode & FILE_MODE_MASK
    # Made with O_EXCL|O_NOFOLLOW; a replacement is made under a fresh name
    # and renamed over the old file, so a symlink planted at ``name``
    # meanwhile is replaced, never written through.
    made = f".{name[:200]}.tierbox-{secrets.token_hex(6)}" if overwrite else name
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(made, flags, 0o600, dir_fd=parent)
    except FileExistsError as exc:
        raise UsageError(f"{shown} already exists: tierbox never overwrites a host file") from exc
    done = False
    try:
        with os.fdopen(fd, "wb") as out:
            n = inst.copy_out(src, out, max_bytes=budget.bytes_left)
            os.fchmod(out.fileno(), mode)
        budget.copied += n
        if budget.bytes_left is not None:
            budget.bytes_left -= n
        if made != name:
            os.replace(made, name, src_dir_fd=parent, dst_dir_fd=parent)
        done = True
    except FileTooLargeError as exc:
        raise FileTooLargeError(
            f"download stopped at {src}: over the max_bytes budget ({exc})", path=src
        ) from exc
    finally:
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(made, dir_fd=parent)


def _download_dir(
    inst: Instance,
    src: str,
    entry: FileEntry,
    parent: int,
    name: str,
    budget: _Budget,
    depth: int,
    overwrite: bool,
    shown: str,
) -> None:
    if depth > MAX_DEPTH:
        raise SandboxFileError(f"download of {src} stopped: deeper than {MAX_DEPTH}", path=src)
    budget.entry(src)
    there = _existing(parent, name)
    if there is None:
        os.mkdir(name, 0o700, dir_fd=parent)  # opened up to its mode once filled
    elif not overwrite:
        raise UsageError(f"{shown} already exists: tierbox never overwrites a host file")
    elif not stat.S_ISDIR(there.st_mode):
        what = "a symlink" if stat.S_ISLNK(there.st_mode) else "not a directory"
        raise UsageError(f"cannot copy directory {src} to {shown}: it is {what}")
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, dir_fd=parent)
    try:
        for e in inst.entries(src):
            child = posixpath.join(src, e.name)
            _copy_entry(
                inst, child, e, fd, e.name, budget, depth + 1, overwrite, f"{shown}/{e.name}"
            )
        if there is None:
            os.fchmod(fd, 0o755 if entry.mode is None else entry.mode & DIR_MODE_MASK)
    finally:
        os.close(fd)


def cp_out(
    inst: Instance,
    src: str,
    dest: str,
    *,
    max_bytes: int | None = DOWNLOAD_MAX_BYTES,
    max_entries: int = DOWNLOAD_MAX_ENTRIES,
) -> int:
    """``docker cp ID:SRC DEST``: a file lands at DEST (replacing a file
    there) or, if DEST is a directory, in it under its own name; a directory
    becomes DEST if DEST is missing, else goes into it under its own name
    (``SRC/.``: its contents do), merged with what is there."""
    contents = src.endswith("/.") or src == "."
    path = sandbox_path(src, cwd=inst.workdir)
    entry = _entry_of(inst, path)
    local = Path(dest)
    is_dir = local.is_dir()  # the host path as given: a link to a directory is one
    if entry.kind is FileKind.FILE:
        if is_dir:
            local = local / posixpath.basename(path)
        elif dest.endswith("/"):
            raise UsageError(f"{dest}: no such directory (a copy does not create it)")
    elif entry.kind is FileKind.DIR:
        if is_dir and not contents:
            local = local / (posixpath.basename(path) or "root")
        elif not is_dir and (local.exists() or local.is_symlink()):
            raise UsageError(f"cannot copy directory {src} to {dest}: it is not a directory")
    if not local.parent.is_dir():
        raise UsageError(f"{local.parent}: no such directory (a copy does not create it)")
    return _download_to(inst, path, local, max_bytes, max_entries, overwrite=True)


# ---- into a sandbox ----------------------------------------------------------------------


def upload(inst: Instance, local: Path, path: str) -> int:
    """Copy the host file or directory ``local`` to ``path`` in the sandbox
    (a directory merges into one already there); returns the bytes copied.
    Host symlinks are not followed; inside a directory they are copied as
    symlinks where the sandbox's tar unpacks it."""
    dest = sandbox_path(path, cwd=inst.workdir)
    if local.is_symlink() or not (local.is_file() or local.is_dir()):
        raise UsageError(f"{local} is not a regular file or directory")
    if local.is_file():
        data = local.read_bytes()
        inst.put_file(dest, data, local.stat().st_mode & FILE_MODE_MASK)
        return len(data)
    # a tier whose files live in one host directory writes them directly
    # (one openat2 each, confined to that directory); elsewhere each file
    # would be a command or agent call, and the sandbox's tar does it at once
    archive = None if isinstance(inst, DirectoryFiles) else _tar_of(local)
    if archive is not None:
        data, total = archive
        mode = f"{stat.S_IMODE(local.stat().st_mode) & DIR_MODE_MASK:o}"
        r = inst.exec(
            ["sh", "-c", _UNTAR, "sh", dest, mode], stdin=data, timeout_s=UPLOAD_TIMEOUT_S
        )
        if r.ok:
            return total
        if r.exit_code != _NOT_FOUND:
            why = r.stderr_text.strip() or r.termination.describe()
            raise SandboxFileError(f"cannot copy {local} to {dest}: {why}", path=dest)
    return _upload_files(inst, local, dest)


def _tar_of(local: Path) -> tuple[bytes, int] | None:
    """The directory's contents as a tar stream (names relative to it;
    owners dropped, set-uid/set-gid bits cleared, only files, directories
    and symlinks) and its file bytes; None when over UPLOAD_TAR_MAX_BYTES."""
    total = 0
    for root, dirs, files in os.walk(local):
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(Path(root) / name)
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
        if total > UPLOAD_TAR_MAX_BYTES:
            return None

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if not (info.isfile() or info.isdir() or info.issym() or info.islnk()):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode &= DIR_MODE_MASK if info.isdir() else FILE_MODE_MASK
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for child in sorted(os.listdir(local)):
            tar.add(local / child, arcname=child, recursive=True, filter=clean)
    return buf.getvalue(), total


def _upload_files(inst: Instance, local: Path, dest: str) -> int:
    """File by file through put_file (directories made as parents)."""
    total = 0
    for root, dirs, files in os.walk(local):
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]
        rel = os.path.relpath(root, local)
        for name in files:
            p = Path(root) / name
            if p.is_symlink() or not p.is_file():
                continue
            target = posixpath.normpath(posixpath.join(dest, rel, name))
            data = p.read_bytes()
            inst.put_file(target, data, p.stat().st_mode & FILE_MODE_MASK)
            total += len(data)
    return total


def _sandbox_kind(inst: Instance, path: str) -> FileKind | None:
    """What ``path`` is in the sandbox (a link to a directory counts as a
    directory, as it does for docker cp); None if it does not exist."""
    try:
        inst.entries(path)
        return FileKind.DIR
    except TierboxError:
        pass
    try:
        return _entry_of(inst, path).kind
    except SandboxFileError:
        return None


def cp_in(inst: Instance, src: str, dest: str) -> int:
    """``docker cp SRC ID:DEST``: a file lands at DEST (replacing a file
    there) or, if DEST is a directory, in it under its own name; a directory
    becomes DEST if DEST is missing, else goes into it under its own name
    (``SRC/.``: its contents do)."""
    contents = src.endswith("/.") or src == "."
    local = Path(src)
    if local.is_symlink() or not (local.is_file() or local.is_dir()):
        raise UsageError(f"{src}: not a regular file or directory on the host")
    target = sandbox_path(dest, cwd=inst.workdir)
    kind = _sandbox_kind(inst, target)
    if local.is_file():
        if kind is FileKind.DIR:
            target = posixpath.join(target, local.name)
        elif kind is None and dest.endswith("/"):
            raise UsageError(
                f"{dest}: no such directory in the sandbox (a copy does not create it)"
            )
    elif kind is FileKind.DIR and not contents:
        target = posixpath.join(target, local.resolve().name)
    elif kind is not None and kind is not FileKind.DIR:
        raise UsageError(f"cannot copy directory {src} to {dest}: it is not a directory")
    parent = posixpath.dirname(target)
    if _sandbox_kind(inst, parent) is not FileKind.DIR:
        inst.entries(parent)  # the sandbox's own error (outside what it reaches)
        raise UsageError(f"{parent}: no such directory in the sandbox")
    return upload(inst, local, target)


def copy_stream(inst: Instance, path: str, out: BinaryIO, max_bytes: int | None) -> int:
    """Stream one sandbox file to ``out`` (``tierbox sandbox cp ID:PATH -``)."""
    return inst.copy_out(path, out, max_bytes=max_bytes)


def copy_back(inst: Instance, path: str, host: Path, *, max_bytes: int | None = None) -> int:
    """Copy the sandbox's ``path`` (a file or directory) over the host's
    ``host``, as a writable mount of a tier without a shared filesystem
    needs: existing files are replaced, nothing is deleted, symlinks inside
    the sandbox are not copied, and every host-side write resolves inside
    ``host`` (a symlink there cannot lead the copy elsewhere on the host)."""
    from tierbox.host.rootfs import RootDir

    src = sandbox_path(path, cwd=inst.workdir)
    budget = _Budget(
        max_bytes if max_bytes is not None else DOWNLOAD_MAX_BYTES, DOWNLOAD_MAX_ENTRIES
    )
    if host.is_file():
        data = inst.get_file(src, max_bytes=budget.bytes_left or DOWNLOAD_MAX_BYTES)
        root = RootDir.open(str(host.parent), uid=None, gid=None, label="host")
        try:
            root.write_file("/" + host.name, data, host.stat().st_mode & 0o777)
        finally:
            root.close()
        return len(data)
    root = RootDir.open(str(host), uid=None, gid=None, label="host")
    try:
        _copy_tree_back(inst, src, "/", root, budget, 0)
    finally:
        root.close()
    return budget.copied


def _copy_tree_back(
    inst: Instance, src: str, rel: str, root: object, budget: _Budget, depth: int
) -> None:
    from tierbox.host.rootfs import RootDir

    assert isinstance(root, RootDir)
    if depth > MAX_DEPTH:
        raise SandboxFileError(f"copy of {src} stopped: deeper than {MAX_DEPTH}", path=src)
    for e in inst.entries(src):
        child, target = posixpath.join(src, e.name), posixpath.join(rel, e.name)
        budget.entry(child)
        if e.kind is FileKind.DIR:
            _copy_tree_back(inst, child, target, root, budget, depth + 1)
        elif e.kind is FileKind.FILE:
            cap = budget.bytes_left if budget.bytes_left is not None else DOWNLOAD_MAX_BYTES
            data = inst.get_file(child, max_bytes=cap)
            root.write_file(target, data, 0o644)
            budget.copied += len(data)
            if budget.bytes_left is not None:
                budget.bytes_left -= len(data)
