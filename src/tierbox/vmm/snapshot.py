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
(it is small, hashed every time); the RAM file's sha256 matches.

The RAM digest, and what is cached. Hashing RAM costs about 0.7 ms per MiB
here (sha256 with SHA-NI: 128 MiB in 0.09 s, 256 MiB in 0.18 s from the page
cache; 0.33 s and 0.70 s the first time a sparse file is read), while a
restore takes 30-50 ms: verifying on every restore would make each one 3-5
times slower. So a digest is remembered, but only for a RAM file tierbox
sealed itself, under a key no writer can fake:

- sealed: a regular file with one link, owned by tierbox's effective uid,
  writable by nobody else but the restored QEMUs' group
  (:data:`~tierbox.vmm.jail.SNAPSHOT_GID`: ``write_manifest`` makes the RAM
  file 0660 root:that group when tierbox runs as root, because QEMU 7.2
  opens a private RAM file read-write and a jailed QEMU is not root; 0644
  otherwise). Any write through that group still moves the ctime below;
- the key is the inode (``st_dev``, ``st_ino``) and the value its size,
  mtime, ctime and digest. Any write, truncate, chmod or ``utime`` - also an
  edit that sets the mtime back - moves the ctime, which no unprivileged
  call can set: the record stops matching and the file is hashed again;
- records live in tierbox's own 0700 directory
  (``$TIERBOX_HOME/microvm/ram-verified``), never next to the snapshot,
  where whoever can write the snapshot could forge one;
- a record is written only from a hash whose before and after ``fstat``
  matched and whose ctime is older than the hash's start by more than the
  kernel's timestamp granularity (a write during the hash cannot hide).

Anything else - a copied, moved-in or group-writable snapshot, a hard link,
or ``TIERBOX_SNAPSHOT_VERIFY=always`` - is hashed on every restore.

The state and RAM files are opened once and verified through those
descriptors; QEMU gets the same open files (``/proc/self/fd/N`` paths, the
RAM descriptor passed to it), so swapping a file after the check changes
nothing QEMU reads. Root on the host is trusted (it can rewrite anything).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tierbox import paths
from tierbox.errors import SnapshotError
from tierbox.vmm.jail import SNAPSHOT_GID

FORMAT = "tierbox-microvm-snapshot/1"
STATE = "state.bin"
RAM = "ram.bin"
MANIFEST = "manifest.json"
#: ``always``: hash the RAM file on every restore, never trust a record.
VERIFY_ENV = "TIERBOX_SNAPSHOT_VERIFY"
#: A hash is remembered only if the file's ctime is this much older than the
#: hash's start: more than a few ticks of the kernel's coarse clock.
CTIME_MARGIN_NS = 50_000_000
#: At most this many remembered digests (the oldest go first).
MAX_RECORDS = 512
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_fd(fd: int) -> str:
    """sha256 of an open file from its start (the offset is not moved)."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    off = 0
    while True:
        n = os.preadv(fd, [buf], off)
        if n == 0:
            return h.hexdigest()
        h.update(view[:n])
        off += n


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


class OpenSnapshot:
    """A checked snapshot whose state and RAM files stay open until ``close``.

    Give QEMU :attr:`ram_path` (passing :attr:`ram_fd` to it) and
    :attr:`state_path`: both name the very files that were verified.
    ``ram_check`` says how RAM was verified: ``"hashed"`` or ``"cached"``.
    """

    def __init__(self, manifest: Manifest, state_fd: int, ram_fd: int, ram_check: str) -> None:
        self.manifest = manifest
        self.state_fd = state_fd
        self.ram_fd = ram_fd
        self.ram_check = ram_check

    @property
    def ram_path(self) -> Path:
        """The RAM file as QEMU (started with ``pass_fds=(ram_fd,)``) opens it."""
        return Path(f"/proc/self/fd/{self.ram_fd}")

    @property
    def state_path(self) -> Path:
        """The state stream as this process reopens it."""
        return Path(f"/proc/self/fd/{self.state_fd}")

    def close(self) -> None:
        for fd in (self.state_fd, self.ram_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.state_fd = self.ram_fd = -1

    def __enter__(self) -> OpenSnapshot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# ---- writing ------------------------------------------------------------------------


def _ram_mode() -> int:
    # QEMU 7.2 opens a share=off RAM file O_RDWR: a jailed restored QEMU gets
    # in through the group only (see tierbox.vmm.jail); nobody else reads it
    return 0o660 if os.geteuid() == 0 else 0o644


def share_with_vmms(ram_fd: int) -> None:
    """Let restored QEMUs (group SNAPSHOT_GID) open the RAM file of a snapshot
    sealed before they were jailed (root:root 0444); root's own files only,
    after they were verified through ``ram_fd``."""
    if os.geteuid() != 0:
        return
    st = os.fstat(ram_fd)
    if st.st_uid == 0 and (st.st_gid, stat.S_IMODE(st.st_mode)) != (SNAPSHOT_GID, _ram_mode()):
        os.fchown(ram_fd, 0, SNAPSHOT_GID)
        os.fchmod(ram_fd, _ram_mode())


def write_manifest(snap_dir: Path, data: dict[str, Any]) -> Manifest:
    """Seal the snapshot's files, record their sizes and digests, write the
    manifest, and remember the RAM digest (see the module docstring)."""
    os.chmod(snap_dir / STATE, 0o444)
    if os.geteuid() == 0:
        os.chown(snap_dir / RAM, 0, SNAPSHOT_GID)
    os.chmod(snap_dir / RAM, _ram_mode())
    sealed_ns = time.time_ns()
    files: dict[str, Any] = {}
    p = snap_dir / STATE
    files[STATE] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    # let the coarse clock move past the chmod, so this hash can be remembered
    wait_ns = sealed_ns + CTIME_MARGIN_NS + 1_000_000 - time.time_ns()
    if wait_ns > 0:
        time.sleep(wait_ns / 1e9)
    fd = os.open(snap_dir / RAM, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        digest = _hash_and_remember(fd)
        files[RAM] = {"size": os.fstat(fd).st_size, "sha256": digest}
    finally:
        os.close(fd)
    data = {**data, "format": FORMAT, "created_unix": time.time(), "files": files}
    tmp = snap_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.chmod(0o444)
    os.replace(tmp, snap_dir / MANIFEST)
    return Manifest(snap_dir, data)


# ---- reading and checking -------------------------------------------------------------


def load_manifest(snap_dir: Path) -> Manifest:
    """Read and check a snapshot; SnapshotError says exactly what is wrong."""
    with open_snapshot(snap_dir) as snap:
        return snap.manifest


def open_snapshot(snap_dir: Path) -> OpenSnapshot:
    """Read and check a snapshot, keeping its state and RAM files open for
    QEMU; SnapshotError says exactly what is wrong."""
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
    fds: dict[str, int] = {}
    try:
        for name in (STATE, RAM):
            rec = files[name]
            try:
                fd = os.open(snap_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                raise SnapshotError(
                    f"snapshot {snap_dir} is incomplete: {name} is missing or unreadable ({exc})"
                ) from exc
            fds[name] = fd
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SnapshotError(f"snapshot {snap_dir} is corrupted: {name} is not a file")
            if not isinstance(rec, dict) or st.st_size != rec.get("size"):
                want = rec.get("size") if isinstance(rec, dict) else None
                raise SnapshotError(
                    f"snapshot {snap_dir} is truncated or corrupted: {name} is {st.st_size} "
                    f"bytes, the manifest says {want}"
                )
        if sha256_fd(fds[STATE]) != files[STATE].get("sha256"):
            raise SnapshotError(
                f"snapshot {snap_dir} is corrupted: {STATE} does not match its sha256"
            )
        ram_check = _verify_ram(snap_dir, fds[RAM], str(files[RAM].get("sha256")))
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return OpenSnapshot(Manifest(snap_dir, data), fds[STATE], fds[RAM], ram_check)


def _verify_ram(snap_dir: Path, fd: int, expected: str) -> str:
    """``"cached"`` when a sound record vouches for this very file, else
    ``"hashed"`` after hashing it; SnapshotError when it does not match."""
    if os.environ.get(VERIFY_ENV, "") != "always":
        st = os.fstat(fd)
        if _sealed(st) and _recalled(st) == expected:
            return "cached"
    if _hash_and_remember(fd) != expected:
        raise SnapshotError(f"snapshot {snap_dir} is corrupted: {RAM} does not match its sha256")
    return "hashed"


# ---- the digest records ---------------------------------------------------------------


def records_dir() -> Path:
    """Where remembered RAM digests live: tierbox's own, never a snapshot's."""
    return paths.home() / "microvm" / "ram-verified"


def _sealed(st: os.stat_result) -> bool:
    """Only tierbox's own single-link file that nobody else can write."""
    group_ok = st.st_gid == SNAPSHOT_GID or not st.st_mode & stat.S_IWGRP
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_nlink == 1
        and st.st_uid == os.geteuid()
        and group_ok
        and not st.st_mode & stat.S_IWOTH
    )


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _record_path(st: os.stat_result) -> Path:
    return records_dir() / f"{st.st_dev:x}-{st.st_ino:x}"


def _private_dir(create: bool) -> Path | None:
    """The records directory if it is tierbox's alone (0700, ours), else None."""
    d = records_dir()
    if create:
        with contextlib.suppress(OSError):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        st = os.lstat(d)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return None
    return d


def _recalled(st: os.stat_result) -> str | None:
    """The digest remembered for exactly this inode state, if any."""
    if _private_dir(create=False) is None:
        return None
    try:
        fd = os.open(_record_path(st), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        stamp, digest = os.read(fd, 4096).decode().split()
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)
    return digest if stamp == _stamp(st) else None


def _hash_and_remember(fd: int) -> str:
    """Hash an open file; remember the digest when the file is sealed and did
    not change (by fstat, ctime included) while it was hashed."""
    started_ns = time.time_ns()
    before = os.fstat(fd)
    digest = sha256_fd(fd)
    after = os.fstat(fd)
    if (
        os.environ.get(VERIFY_ENV, "") != "always"
        and _sealed(before)
        and _stamp(before) == _stamp(after)
        and before.st_ctime_ns < started_ns - CTIME_MARGIN_NS
    ):
        _remember(before, digest)
    return digest


def _remember(st: os.stat_result, digest: str) -> None:
    d = _private_dir(create=True)
    if d is None:
        return
    target = _record_path(st)
    tmp = d / f".{target.name}.{os.getpid()}.tmp"
    with contextlib.suppress(OSError):
        tmp.write_text(f"{_stamp(st)} {digest}\n")
        os.replace(tmp, target)
        _prune(d)


def _prune(d: Path) -> None:
    """Keep the newest MAX_RECORDS records (a stale one only costs a re-hash)."""
    try:
        names = [e for e in os.scandir(d) if not e.name.startswith(".")]
    except OSError:
        return
    if len(names) <= MAX_RECORDS:
        return
    names.sort(key=_mtime_ns)
    for e in names[: len(names) - MAX_RECORDS]:
        with contextlib.suppress(OSError):
            os.unlink(e.path)


def _mtime_ns(entry: os.DirEntry[str]) -> int:
    try:
        return entry.stat(follow_symlinks=False).st_mtime_ns
    except OSError:
        return 0
