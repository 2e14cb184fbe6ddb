"""Copying files and directory trees between the host and a sandbox.

Written once against the contract's file primitives (``entries``,
``copy_out``, ``put_file``), so it behaves the same on every tier and inherits
their guarantees: every open inside the sandbox cannot leave it, reads are
regular files only. What comes out is bounded (total bytes, entry count,
depth), written to disk as it streams, and never followed: a symlink inside
the sandbox is recreated as a symlink, not resolved on the host, and files are
created with O_EXCL so nothing already on the host is overwritten through one.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from pathlib import Path
from typing import BinaryIO

from tierbox.errors import FileTooLargeError, SandboxFileError, UsageError
from tierbox.spec import FileKind, sandbox_path
from tierbox.tiers.base import Instance

#: Defaults for what one download may bring out of a sandbox.
DOWNLOAD_MAX_BYTES = 1 << 30
DOWNLOAD_MAX_ENTRIES = 100_000
MAX_DEPTH = 64


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


def _kind_of(inst: Instance, path: str) -> FileKind:
    """What ``path`` is, from its parent's listing (links not followed)."""
    if path == "/":
        return FileKind.DIR
    parent, name = posixpath.split(path)
    for e in inst.entries(parent):
        if e.name == name:
            return e.kind
    raise SandboxFileError(f"cannot copy {path}: No such file or directory", path=path)


def download(
    inst: Instance,
    path: str,
    local: Path,
    *,
    max_bytes: int | None = DOWNLOAD_MAX_BYTES,
    max_entries: int = DOWNLOAD_MAX_ENTRIES,
) -> int:
    """Copy ``path`` (file or directory) from the sandbox to ``local``; returns
    the bytes copied. An existing directory ``local`` receives it under its
    own name, as ``docker cp`` does; an existing file is never replaced."""
    src = sandbox_path(path, cwd=inst.workdir)
    if local.is_dir():
        local = local / (posixpath.basename(src) or "root")
    if local.exists() or local.is_symlink():
        raise UsageError(f"{local} already exists: tierbox never overwrites a host file")
    budget = _Budget(max_bytes, max_entries)
    kind = _kind_of(inst, src)
    if kind is FileKind.DIR:
        _download_dir(inst, src, local, budget, 0)
    elif kind is FileKind.FILE:
        _download_file(inst, src, local, budget)
    else:
        raise SandboxFileError(f"cannot copy {src}: it is a {kind.value}, not a file", path=src)
    return budget.copied


def _download_file(inst: Instance, src: str, local: Path, budget: _Budget) -> None:
    budget.entry(src)
    fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    ok = False
    try:
        with os.fdopen(fd, "wb") as out:
            n = inst.copy_out(src, out, max_bytes=budget.bytes_left)
        budget.copied += n
        if budget.bytes_left is not None:
            budget.bytes_left -= n
        ok = True
    except FileTooLargeError as exc:
        raise FileTooLargeError(
            f"download stopped at {src}: over the max_bytes budget ({exc})", path=src
        ) from exc
    finally:
        if not ok:
            with contextlib.suppress(OSError):
                local.unlink()


def _download_dir(inst: Instance, src: str, local: Path, budget: _Budget, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise SandboxFileError(f"download of {src} stopped: deeper than {MAX_DEPTH}", path=src)
    budget.entry(src)
    local.mkdir(mode=0o755)
    for e in inst.entries(src):
        child_src = posixpath.join(src, e.name)
        child = local / e.name
        if e.kind is FileKind.DIR:
            _download_dir(inst, child_src, child, budget, depth + 1)
        elif e.kind is FileKind.FILE:
            _download_file(inst, child_src, child, budget)
        # symlinks and special files are not followed or copied: a link's
        # target is the sandbox's to interpret, not the host's


def upload(inst: Instance, local: Path, path: str) -> int:
    """Copy the host file or directory ``local`` to ``path`` in the sandbox;
    returns the bytes copied. Host symlinks are not followed."""
    dest = sandbox_path(path, cwd=inst.workdir)
    if local.is_symlink() or not (local.is_file() or local.is_dir()):
        raise UsageError(f"{local} is not a regular file or directory")
    if local.is_file():
        data = local.read_bytes()
        inst.put_file(dest, data, local.stat().st_mode & 0o777)
        return len(data)
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
            inst.put_file(target, data, p.stat().st_mode & 0o777)
            total += len(data)
    return total


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
