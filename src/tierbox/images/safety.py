"""Refuse hostile tar entries before anything unpacks them.

Entries reach :class:`TarScanner` from :mod:`tierbox.images.tarstream`, the one
tar reader of an import; what passes is written back canonically and only that
copy reaches umoci, so these rules hold for what is unpacked. An entry is
refused when it would land outside the image root (``..`` components, absolute
names, hardlinks to outside, a file written *through* a symlink, relative
symlinks that climb above the root), when it is not a plain file, directory,
symlink or hardlink (device nodes, FIFOs, anything tar readers interpret
differently), when it carries extended attributes a kernel acts on
(``trusted.*``, such as overlayfs' own), or when tar readers could disagree on
it (the same name twice in a layer, a hardlink to an entry that comes later).
Absolute symlinks such as ``/bin/sh -> /bin/busybox`` are normal in images and
allowed: they resolve inside the container's root.
"""

from __future__ import annotations

import tarfile
from pathlib import PurePosixPath

from tierbox.errors import UnsafeImageError

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
XATTR_PREFIX = "SCHILY.xattr."
#: Extended attributes an image may carry; the kernel acts on trusted.* (overlayfs).
_XATTR_NAMESPACES = ("user.", "security.")
_XATTR_NAMES = frozenset({"system.posix_acl_access", "system.posix_acl_default"})


def clean_member_name(name: str, where: str) -> str:
    """Normalise a tar entry name to ``a/b/c``; ``""`` is the root itself.

    Raises UnsafeImageError for absolute names and ``..`` components.
    """
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") and parts:
        raise UnsafeImageError(f"{where}: entry {name!r} is an absolute path; refusing it")
    if ".." in parts:
        raise UnsafeImageError(f"{where}: entry {name!r} climbs out of the root with '..'")
    return "/".join(parts)


def _escapes_root(parent: str, target: str) -> bool:
    """Whether a relative link ``target`` seen from directory ``parent`` climbs above the root."""
    depth = len([p for p in parent.split("/") if p])
    for part in target.split("/"):
        if part in ("", "."):
            continue
        depth = depth - 1 if part == ".." else depth + 1
        if depth < 0:
            return True
    return False


def check_entry_type(member: tarfile.TarInfo, where: str) -> None:
    """Refuse anything but regular files, directories, symlinks and hardlinks."""
    if member.isreg() or member.isdir() or member.issym() or member.islnk():
        return
    if member.ischr() or member.isblk():
        raise UnsafeImageError(
            f"{where}: entry {member.name!r} is a device node; images may not carry devices"
        )
    if member.isfifo():
        raise UnsafeImageError(
            f"{where}: entry {member.name!r} is a FIFO; images may not carry FIFOs or sockets"
        )
    raise UnsafeImageError(
        f"{where}: entry {member.name!r} has tar type {member.type!r}, which images may not "
        "carry (only files, directories, symlinks and hardlinks; no sockets, FIFOs or devices)"
    )


def image_xattrs(member: tarfile.TarInfo, where: str) -> dict[str, str]:
    """The entry's extended attributes as PAX records; refuses namespaces images may not set."""
    kept: dict[str, str] = {}
    for key, value in member.pax_headers.items():
        if not key.startswith(XATTR_PREFIX):
            continue
        attr = key[len(XATTR_PREFIX) :]
        if not (attr.startswith(_XATTR_NAMESPACES) or attr in _XATTR_NAMES):
            raise UnsafeImageError(
                f"{where}: entry {member.name!r} carries the extended attribute {attr!r}; "
                "images may carry only user.*, security.* and POSIX ACL attributes"
            )
        kept[key] = value
    return kept


class TarScanner:
    """Checks the entries of one archive, or of an image's layers in order.

    Symlinks are remembered across layers so that a later layer cannot write a
    file through a symlink an earlier layer planted; names are remembered per
    layer (:meth:`begin_layer`) to refuse duplicates and forward hardlinks.
    """

    def __init__(self) -> None:
        self._symlinks: set[str] = set()
        self._seen_dirs: dict[str, bool] = {}  # name -> is a directory, this layer
        self._files: set[str] = set()  # regular files and hardlinks, this layer

    def begin_layer(self) -> None:
        """Start the next layer: names may repeat across layers, not within one."""
        self._seen_dirs = {}
        self._files = set()

    def check(self, member: tarfile.TarInfo, where: str) -> str:
        """Raise UnsafeImageError if ``member`` is refused; return its normalised name."""
        name = clean_member_name(member.name, where)
        check_entry_type(member, where)
        if not name and not member.isdir():
            raise UnsafeImageError(f"{where}: entry {member.name!r} replaces the root directory")
        image_xattrs(member, where)
        self._check_not_through_symlink(member.name, name, where)
        self._check_first_time(member, name, where)
        base = PurePosixPath(name).name
        parent = str(PurePosixPath(name).parent) if "/" in name else ""
        if base == _OPAQUE:
            self._forget_under(parent)
            return name
        if base.startswith(_WHITEOUT):
            self._forget_under(f"{parent}/{base[len(_WHITEOUT) :]}".lstrip("/"), itself=True)
            return name
        if member.issym():
            target = member.linkname
            if not target.startswith("/") and _escapes_root(parent, target):
                raise UnsafeImageError(
                    f"{where}: symlink {member.name!r} -> {target!r} points outside the image root"
                )
            self._symlinks.add(name)
            return name
        if member.islnk():
            self._check_hardlink(member, where)
        if not member.isdir():
            self._files.add(name)
        self._symlinks.discard(name)
        return name

    def _check_first_time(self, member: tarfile.TarInfo, name: str, where: str) -> None:
        """A name once per layer (directories may repeat): readers differ on which copy wins."""
        was_dir = self._seen_dirs.get(name)
        if was_dir is not None and not (was_dir and member.isdir()):
            raise UnsafeImageError(
                f"{where}: entry {member.name!r} appears twice in one layer; refusing it"
            )
        self._seen_dirs[name] = member.isdir()

    def _check_hardlink(self, member: tarfile.TarInfo, where: str) -> None:
        try:
            target = clean_member_name(member.linkname, where)
        except UnsafeImageError:
            raise UnsafeImageError(
                f"{where}: hardlink {member.name!r} -> {member.linkname!r} "
                "points outside the image root"
            ) from None
        self._check_not_through_symlink(member.linkname, target, where)
        if target not in self._files:
            raise UnsafeImageError(
                f"{where}: hardlink {member.name!r} -> {member.linkname!r} does not point at a "
                "regular file earlier in the same layer; refusing it"
            )

    def _check_not_through_symlink(self, raw: str, name: str, where: str) -> None:
        if not self._symlinks:
            return
        parts = name.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in self._symlinks:
                raise UnsafeImageError(
                    f"{where}: entry {raw!r} would be written through the symlink {prefix!r}"
                )

    def _forget_under(self, directory: str, *, itself: bool = False) -> None:
        prefix = f"{directory}/" if directory else ""
        self._symlinks = {
            s for s in self._symlinks if not (s.startswith(prefix) or (itself and s == directory))
        }
