"""Snapshot files of the microvm tier and their manifest.

A snapshot is a directory::

    manifest.json   format, machine, digests, guest settings (below)
    state.bin       QEMU's migration stream: device state, no RAM
                    (saved with the ``x-ignore-shared`` capability)
    ram.bin         guest RAM, a sparse file; restored guests map it
                    copy-on-write (memory-backend-file share=off)

The writable layer of the root filesystem is a tmpfs inside the guest, so it
is part of RAM; the read-only root disk is referenced by path, size and image
digest and must be unchanged at restore.

Checks at restore, cheapest first, each failing with a SnapshotError that
names the file and what is wrong: the manifest parses and has our format;
every file exists with the recorded size; the state stream's sha256 matches
(it is small); the RAM file's sha256 matches - hashed once, then remembered
in ``.ram.verified`` keyed by inode, size and mtime, so clones do not re-hash
256 MiB each.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierbox.errors import SandboxError

FORMAT = "tierbox-microvm-snapshot/1"
STATE = "state.bin"
RAM = "ram.bin"
MANIFEST = "manifest.json"
VERIFIED = ".ram.verified"


class SnapshotError(SandboxError):
    """A snapshot is missing, truncated, corrupted or made for another machine."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


@dataclass(frozen=True)
class Manifest:
    path: Path
    data: dict[str, Any]

    @property
    def machine(self) -> dict[str, Any]:
        m: dict[str, Any] = self.data["machine"]
        return m

    @property
    def guest(self) -> dict[str, Any]:
        g: dict[str, Any] = self.data["guest"]
        return g


def write_manifest(snap_dir: Path, data: dict[str, Any]) -> Manifest:
    """Record sizes and digests of the snapshot's files and write the manifest."""
    files: dict[str, Any] = {}
    for name in (STATE, RAM):
        p = snap_dir / name
        files[name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    data = {**data, "format": FORMAT, "created_unix": time.time(), "files": files}
    tmp = snap_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, snap_dir / MANIFEST)
    # we just hashed RAM ourselves: later restores can trust it until it changes
    (snap_dir / VERIFIED).write_text(f"{_stamp(snap_dir / RAM)} {files[RAM]['sha256']}\n")
    return Manifest(snap_dir, data)


def load_manifest(snap_dir: Path) -> Manifest:
    """Read and check a snapshot; SnapshotError says exactly what is wrong."""
    mpath = snap_dir / MANIFEST
    try:
        data = json.loads(mpath.read_text())
    except FileNotFoundError as exc:
        raise SnapshotError(f"{snap_dir} is not a microvm snapshot: no {MANIFEST}") from exc
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"snapshot manifest {mpath} is unreadable or corrupted: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else None
        raise SnapshotError(f"snapshot {snap_dir} has format {got!r}, expected {FORMAT!r}")
    files = data.get("files")
    if not isinstance(files, dict) or STATE not in files or RAM not in files:
        raise SnapshotError(f"snapshot manifest {mpath} lists no state or RAM file")
    for name, rec in files.items():
        p = snap_dir / name
        try:
            size = p.stat().st_size
        except OSError as exc:
            raise SnapshotError(f"snapshot {snap_dir} is incomplete: {name} is missing") from exc
        if size != rec.get("size"):
            raise SnapshotError(
                f"snapshot {snap_dir} is truncated or corrupted: {name} is {size} bytes, "
                f"the manifest says {rec.get('size')}"
            )
    if sha256_file(snap_dir / STATE) != files[STATE].get("sha256"):
        raise SnapshotError(f"snapshot {snap_dir} is corrupted: {STATE} does not match its sha256")
    _verify_ram(snap_dir, str(files[RAM].get("sha256")))
    return Manifest(snap_dir, data)


def _verify_ram(snap_dir: Path, expected: str) -> None:
    ram = snap_dir / RAM
    stamp = _stamp(ram)
    try:
        seen_stamp, seen_digest = (snap_dir / VERIFIED).read_text().split()
        if seen_stamp == stamp and seen_digest == expected:
            return
    except (OSError, ValueError):
        pass
    if sha256_file(ram) != expected:
        raise SnapshotError(f"snapshot {snap_dir} is corrupted: {RAM} does not match its sha256")
    with contextlib.suppress(OSError):  # a read-only snapshot dir: verify again next time
        (snap_dir / VERIFIED).write_text(f"{stamp} {expected}\n")
