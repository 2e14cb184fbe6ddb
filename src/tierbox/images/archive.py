"""Recognise docker-archive and oci-archive tarballs and vet them before skopeo reads them.

The outer tarball is scanned header by header (see :mod:`tierbox.images.safety`)
and the paths named by ``manifest.json`` are checked, so a hostile archive is
refused before any tool touches it.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tierbox.errors import ImageError, UnsafeImageError, UsageError
from tierbox.images.refs import same_ref
from tierbox.images.safety import TarScanner, clean_member_name

ArchiveKind = Literal["docker-archive", "oci-archive"]

_OCI_REF_NAME = "org.opencontainers.image.ref.name"
_CONTAINERD_NAME = "io.containerd.image.name"
_MAX_JSON_BYTES = 16 << 20  # a manifest bigger than this is not a real manifest


@dataclass(frozen=True)
class ArchiveInfo:
    """What is inside an archive: its kind, which image to copy, and the name it carries."""

    kind: ArchiveKind
    selector: str  # appended to "<kind>:<path>" for skopeo: "" or ":@0" or ":name:tag"
    embedded_ref: str | None  # e.g. "docker.io/library/busybox:latest"; None when unnamed


def inspect_archive(path: Path, wanted: str | None = None) -> ArchiveInfo:
    """Scan ``path`` and say how skopeo should read it.

    ``wanted`` picks one image from a multi-image archive by its embedded name
    (the first image is used otherwise).
    """
    where = f"archive {path.name}"
    try:
        with tarfile.open(path, mode="r:*") as tar:
            scanner = TarScanner()
            members: dict[str, tarfile.TarInfo] = {}
            for member in tar:
                scanner.check(member, where)
                members[clean_member_name(member.name, where)] = member
            if "manifest.json" in members:
                manifest = _read_json(tar, members["manifest.json"], where)
                return _docker_info(manifest, wanted, where)
            if "oci-layout" in members and "index.json" in members:
                index = _read_json(tar, members["index.json"], where)
                return _oci_info(index, wanted, where)
    except (OSError, tarfile.TarError) as exc:
        raise ImageError(
            f"{path} is not a readable tar archive ({exc}): expected `docker save`, "
            "`podman save` or `skopeo copy ... oci-archive:` output"
        ) from exc
    raise ImageError(
        f"{path} is neither a docker-archive (no manifest.json) nor an oci-archive "
        "(no oci-layout/index.json)"
    )


def _read_json(tar: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> Any:
    if not member.isfile() or member.size > _MAX_JSON_BYTES:
        raise ImageError(f"{where}: {member.name} is not a small regular file")
    fh = tar.extractfile(member)
    if fh is None:
        raise ImageError(f"{where}: cannot read {member.name}")
    try:
        return json.loads(fh.read())
    except ValueError as exc:
        raise ImageError(f"{where}: {member.name} is not valid JSON: {exc}") from exc


def _docker_info(manifest: Any, wanted: str | None, where: str) -> ArchiveInfo:
    if not isinstance(manifest, list) or not manifest:
        raise ImageError(f"{where}: manifest.json lists no images")
    chosen = 0
    for i, entry in enumerate(manifest):
        if not isinstance(entry, dict):
            raise ImageError(f"{where}: manifest.json entry {i} is not an object")
        paths = [entry.get("Config"), *(entry.get("Layers") or [])]
        for p in paths:
            if not isinstance(p, str):
                raise ImageError(f"{where}: manifest.json entry {i} has a non-string path {p!r}")
            try:
                clean_member_name(p, where)
            except UnsafeImageError:
                raise UnsafeImageError(
                    f"{where}: manifest.json points at {p!r}, outside the archive; refusing it"
                ) from None
        tags = entry.get("RepoTags") or []
        if wanted is not None and any(same_ref(wanted, str(tag)) for tag in tags):
            chosen = i
    tags = manifest[chosen].get("RepoTags") or []
    embedded = tags[0] if tags and isinstance(tags[0], str) else None
    return ArchiveInfo("docker-archive", f":@{chosen}", embedded)


def _oci_info(index: Any, wanted: str | None, where: str) -> ArchiveInfo:
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ImageError(f"{where}: index.json lists no images")
    names: list[tuple[str | None, str | None]] = []  # (ref.name, full name)
    for entry in entries:
        notes = (entry.get("annotations") or {}) if isinstance(entry, dict) else {}
        names.append((notes.get(_OCI_REF_NAME), notes.get(_CONTAINERD_NAME)))
    chosen = 0
    for i, (ref_name, full) in enumerate(names):
        if wanted is not None and any(same_ref(wanted, n) for n in (ref_name, full) if n):
            chosen = i
    ref_name, full = names[chosen]
    if len(entries) > 1 and not ref_name:
        raise UsageError(
            f"{where} holds {len(entries)} images without names; "
            "export a single image to its own archive first"
        )
    selector = f":{ref_name}" if len(entries) > 1 and ref_name else ""
    embedded = full or (ref_name if ref_name and ":" in ref_name else None)
    return ArchiveInfo("oci-archive", selector, embedded)
