"""Read docker-archive and oci-archive tarballs: pick the image, its config and its layers.

The outer tarball is parsed once by the same bounded reader as the layers
(:mod:`tierbox.images.tarstream`) and checked entry by entry; its members are
then read by the offsets that parse found, so nothing else interprets it. A
compressed outer tarball is first decompressed into the import's scratch
directory, within the import's limits.
"""

from __future__ import annotations

import json
import platform
import posixpath
import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from tierbox.errors import ImageError, NotTarError, UnsafeImageError, UsageError
from tierbox.images import tarstream
from tierbox.images.refs import same_ref
from tierbox.images.safety import TarScanner, clean_member_name

ArchiveKind = Literal["docker-archive", "oci-archive"]

ACCEPTED_KINDS = (
    "a docker-archive (docker save, podman save) or an oci-archive "
    "(skopeo copy ... oci-archive:), as .tar, .tar.gz, .tar.bz2 or .tar.xz"
)
_OCI_REF_NAME = "org.opencontainers.image.ref.name"
_CONTAINERD_NAME = "io.containerd.image.name"
_MAX_JSON_BYTES = 16 << 20  # a manifest bigger than this is not a real manifest
_MAX_LINK_HOPS = 8
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
_CONFIG_TYPES = frozenset(
    {
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.docker.container.image.v1+json",
    }
)
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


@dataclass(frozen=True)
class Layer:
    """One layer: the archive member holding it and, for oci-archive, its expected digest."""

    member: tarfile.TarInfo
    digest: str | None


@dataclass
class ImageArchive:
    """The image chosen from an archive, ready for its layers to be read in order."""

    kind: ArchiveKind
    embedded_ref: str | None  # e.g. "docker.io/library/busybox:latest"; None when unnamed
    config: dict[str, Any]
    layers: list[Layer]
    annotations: dict[str, str] = field(default_factory=dict)  # of the oci manifest
    tar: tarfile.TarFile | None = None

    def open_layer(self, layer: Layer) -> IO[bytes]:
        """The layer's bytes as stored in the archive (possibly compressed)."""
        assert self.tar is not None
        fh = self.tar.extractfile(layer.member)
        assert fh is not None  # members are regular files, resolved by _Members.regular
        return fh


@contextmanager
def open_image(
    path: Path, scratch: Path, *, wanted: str | None, tally: tarstream.Tally
) -> Iterator[ImageArchive]:
    """Parse the archive at ``path`` and pick the image (``wanted`` by name, else the first).

    Raises UsageError when the file is no image archive at all.
    """
    where = f"archive {path.name}"
    with _plain_tar(path, scratch, where, tally) as plain, plain.open("rb") as fh:
        stream = tarstream.TarStream(fh, where, seekable=True)
        try:
            tar = tarstream.open_tar(stream, where)
        except NotTarError:
            raise UsageError(
                f"{path.name} is not an image archive: expected {ACCEPTED_KINDS}"
            ) from None
        with tar:
            found = _Members(tar, where)
            scanner = TarScanner()
            scanner.begin_layer()
            for member in tarstream.members(tar, stream, where, tally, sized=False):
                found.add(scanner.check(member, where), member)
            image = found.image(wanted, path)
            image.tar = tar
            yield image


@contextmanager
def _plain_tar(path: Path, scratch: Path, where: str, tally: tarstream.Tally) -> Iterator[Path]:
    """``path`` itself, or its decompressed copy in ``scratch`` (bounded like a tar stream)."""
    with path.open("rb") as fh:
        kind = tarstream.compression(fh.read(6))
    if kind is None:
        yield path
        return
    if kind == "zstd":
        raise UsageError(f"{path.name} is zstd-compressed: decompress it first (unzstd)")
    plain = scratch / "archive.tar"
    limit = tally.limits.max_stream_bytes if tally.limits else None
    try:
        with path.open("rb") as fh, plain.open("wb") as out, tarstream.decoding_errors(where):
            _copy_bounded(tarstream.decompressed(fh, where), out, limit, where)
        yield plain
    finally:
        plain.unlink(missing_ok=True)


def _copy_bounded(source: IO[bytes], out: IO[bytes], limit: int | None, where: str) -> None:
    copied = 0
    while chunk := source.read(1 << 20):
        copied += len(chunk)
        if limit is not None and copied > limit:
            raise UnsafeImageError(
                f"{where} decompresses to more than {limit:,} bytes; refusing it"
            )
        out.write(chunk)


class _Members:
    """The outer archive's entries by normalised name, and how to read one."""

    def __init__(self, tar: tarfile.TarFile, where: str) -> None:
        self._tar = tar
        self._where = where
        self._by_name: dict[str, tarfile.TarInfo] = {}

    def add(self, name: str, member: tarfile.TarInfo) -> None:
        self._by_name[name] = member

    def regular(self, raw_name: str, what: str) -> tarfile.TarInfo:
        """The regular file ``raw_name`` names, following links inside the archive."""
        name = raw_name
        for _ in range(_MAX_LINK_HOPS):
            try:
                name = clean_member_name(name, self._where)
            except UnsafeImageError:
                raise UnsafeImageError(
                    f"{self._where}: {what} points at {raw_name!r}, outside the archive; "
                    "refusing it"
                ) from None
            member = self._by_name.get(name)
            if member is None:
                raise ImageError(f"{self._where}: {what} names {raw_name!r}, which is missing")
            if member.isreg():
                return member
            if member.issym():
                name = posixpath.join(posixpath.dirname(name), member.linkname)
            elif member.islnk():
                name = member.linkname
            else:
                raise ImageError(f"{self._where}: {what} {raw_name!r} is not a regular file")
        raise ImageError(f"{self._where}: {what} {raw_name!r} is behind too many links")

    def json(self, raw_name: str, what: str, digest: str | None = None) -> Any:
        """A small JSON member, checked against ``digest`` when one is given."""
        member = self.regular(raw_name, what)
        if member.size > _MAX_JSON_BYTES:
            raise ImageError(f"{self._where}: {what} {raw_name!r} is too large")
        fh = self._tar.extractfile(member)
        assert fh is not None
        with tarstream.decoding_errors(self._where):
            data = fh.read()
        if digest is not None:
            hashed = tarstream.HashingWriter()
            hashed.write(data)
            if hashed.digest != digest:
                raise ImageError(f"{self._where}: blob {digest} is corrupt")
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ImageError(f"{self._where}: {what} {raw_name!r} is not JSON: {exc}") from exc

    def image(self, wanted: str | None, path: Path) -> ImageArchive:
        if "manifest.json" in self._by_name:
            return self._docker(wanted)
        if "oci-layout" in self._by_name and "index.json" in self._by_name:
            return self._oci(wanted)
        raise UsageError(
            f"{path.name} is a tar archive but not an image archive (no manifest.json, no "
            f"oci-layout with index.json): expected {ACCEPTED_KINDS}"
        )

    def _docker(self, wanted: str | None) -> ImageArchive:
        manifest = self.json("manifest.json", "manifest.json")
        if not isinstance(manifest, list) or not manifest:
            raise ImageError(f"{self._where}: manifest.json lists no images")
        chosen = 0
        for i, entry in enumerate(manifest):
            if not isinstance(entry, dict):
                raise ImageError(f"{self._where}: manifest.json entry {i} is not an object")
            tags = entry.get("RepoTags") or []
            if wanted is not None and any(same_ref(wanted, str(tag)) for tag in tags):
                chosen = i
        entry = manifest[chosen]
        paths = [entry.get("Config"), *(entry.get("Layers") or [])]
        if not all(isinstance(p, str) for p in paths):
            raise ImageError(f"{self._where}: manifest.json entry {chosen} has a non-string path")
        what = "manifest.json"
        config = self.json(paths[0], what)
        layers = [Layer(self.regular(p, what), None) for p in paths[1:]]
        tags = entry.get("RepoTags") or []
        embedded = tags[0] if tags and isinstance(tags[0], str) else None
        return ImageArchive("docker-archive", embedded, _config_object(config, self._where), layers)

    def _oci(self, wanted: str | None) -> ImageArchive:
        index = self.json("index.json", "index.json")
        entries = index.get("manifests") if isinstance(index, dict) else None
        if (
            not isinstance(entries, list)
            or not entries
            or not all(isinstance(e, dict) for e in entries)
        ):
            raise ImageError(f"{self._where}: index.json lists no images")
        names = [_oci_names(entry) for entry in entries]
        chosen = 0
        for i, (ref_name, full) in enumerate(names):
            if wanted is not None and any(same_ref(wanted, n) for n in (ref_name, full) if n):
                chosen = i
        ref_name, full = names[chosen]
        if len(entries) > 1 and not ref_name and wanted is None:
            raise UsageError(
                f"{self._where} holds {len(entries)} images without names; "
                "export a single image to its own archive first"
            )
        desc = entries[chosen]
        if desc.get("mediaType") in _INDEX_TYPES:
            desc = _for_this_platform(self._blob_json(desc, "image index"), self._where)
        manifest = self._blob_json(desc, "manifest")
        config_desc = manifest.get("config") if isinstance(manifest, dict) else None
        if not isinstance(config_desc, dict) or config_desc.get("mediaType") not in _CONFIG_TYPES:
            raise ImageError(f"{self._where}: the manifest does not describe a container image")
        config = self._blob_json(config_desc, "config")
        layers = []
        for layer in manifest.get("layers") or []:
            digest = _digest(layer, self._where)
            layers.append(Layer(self.regular(_blob_name(digest), "manifest"), digest))
        notes = manifest.get("annotations") or {}
        embedded = full or (ref_name if ref_name and ":" in ref_name else None)
        return ImageArchive(
            "oci-archive",
            embedded,
            _config_object(config, self._where),
            layers,
            {str(k): str(v) for k, v in notes.items()} if isinstance(notes, dict) else {},
        )

    def _blob_json(self, desc: Any, what: str) -> Any:
        digest = _digest(desc, self._where)
        return self.json(_blob_name(digest), what, digest)


def _oci_names(entry: dict[str, Any]) -> tuple[str | None, str | None]:
    notes = entry.get("annotations") or {}
    if not isinstance(notes, dict):
        return None, None
    ref_name, full = notes.get(_OCI_REF_NAME), notes.get(_CONTAINERD_NAME)
    return (
        ref_name if isinstance(ref_name, str) else None,
        full if isinstance(full, str) else None,
    )


def _digest(desc: Any, where: str) -> str:
    digest = desc.get("digest") if isinstance(desc, dict) else None
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise ImageError(f"{where}: unsupported or malformed digest {digest!r}")
    return digest


def _blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def _config_object(config: Any, where: str) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise ImageError(f"{where}: the image config is not a JSON object")
    return config


def _for_this_platform(index: Any, where: str) -> dict[str, Any]:
    """The manifest in a multi-platform index that runs here (linux on this machine's arch)."""
    arch = _GOARCH.get(platform.machine(), platform.machine())
    entries = index.get("manifests") if isinstance(index, dict) else None
    seen = []
    for entry in entries or []:
        plat = entry.get("platform") if isinstance(entry, dict) else None
        if isinstance(plat, dict):
            seen.append(f"{plat.get('os')}/{plat.get('architecture')}")
            if plat.get("os") == "linux" and plat.get("architecture") == arch:
                return dict(entry)
    raise ImageError(
        f"{where}: the image index has no linux/{arch} image (it has {', '.join(seen) or 'none'})"
    )
