"""Refuse hostile tarballs before anything unpacks them.

Only tar *headers* are read here (Python's tarfile); unpacking is left to umoci
and skopeo. An archive is refused when an entry would land outside the image
root: ``..`` components, absolute names, hardlinks to outside, a file written
*through* a symlink, relative symlinks that climb above the root, or device
nodes. Absolute symlinks such as ``/bin/sh -> /bin/busybox`` are normal in
images and allowed: they resolve inside the container's root.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

from tierbox.errors import ImageError, UnsafeImageError

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"


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


class TarScanner:
    """Checks the entries of one archive, or of an image's layers in order.

    Symlinks are remembered across layers so that a later layer cannot write a
    file through a symlink an earlier layer planted.
    """

    def __init__(self) -> None:
        self._symlinks: set[str] = set()

    def scan_file(self, path: Path, where: str) -> None:
        """Scan every header of the (possibly gzip/bzip2/xz compressed) tarball at ``path``."""
        with path.open("rb") as fh:
            if fh.read(4) == _ZSTD_MAGIC:
                raise ImageError(
                    f"{where} is zstd-compressed, which umoci 0.4.7 cannot unpack: "
                    "re-export the image with gzip layers (skopeo copy --dest-compress-format gzip)"
                )
            fh.seek(0)
            try:
                with tarfile.open(fileobj=fh, mode="r|*") as tar:
                    for member in tar:
                        self.check(member, where)
            except tarfile.TarError as exc:
                raise ImageError(f"{where} is not a readable tar archive: {exc}") from exc

    def check(self, member: tarfile.TarInfo, where: str) -> None:
        """Raise UnsafeImageError if ``member`` could write outside the root."""
        name = clean_member_name(member.name, where)
        if not name and not member.isdir():
            raise UnsafeImageError(f"{where}: entry {member.name!r} replaces the root directory")
        if member.ischr() or member.isblk():
            raise UnsafeImageError(
                f"{where}: entry {member.name!r} is a device node; images may not carry devices"
            )
        self._check_not_through_symlink(member.name, name, where)
        base = PurePosixPath(name).name
        parent = str(PurePosixPath(name).parent) if "/" in name else ""
        if base == _OPAQUE:
            self._forget_under(parent)
            return
        if base.startswith(_WHITEOUT):
            self._forget_under(f"{parent}/{base[len(_WHITEOUT) :]}".lstrip("/"), itself=True)
            return
        if member.issym():
            target = member.linkname
            if not target.startswith("/") and _escapes_root(parent, target):
                raise UnsafeImageError(
                    f"{where}: symlink {member.name!r} -> {target!r} points outside the image root"
                )
            self._symlinks.add(name)
            return
        if member.islnk():
            try:
                target = clean_member_name(member.linkname, where)
            except UnsafeImageError:
                raise UnsafeImageError(
                    f"{where}: hardlink {member.name!r} -> {member.linkname!r} "
                    "points outside the image root"
                ) from None
            self._check_not_through_symlink(member.linkname, target, where)
        self._symlinks.discard(name)

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
