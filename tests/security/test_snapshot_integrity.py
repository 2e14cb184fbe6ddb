"""microVM snapshot integrity against in-place edits and swaps, on real QEMU.

A RAM file edited in place with its mtime set back used to restore without
error (the digest cache was keyed by inode, size and mtime). Now the digest
is remembered only for files tierbox sealed (its own, read-only, one link)
under a key that includes the ctime, in tierbox's private directory, and
QEMU is handed the very files that were verified. The cost of hashing is
measured here too (the reason a sound cache is kept at all).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_image, require_tier
from tierbox.errors import SnapshotError
from tierbox.spec import Limits, SandboxSpec
from tierbox.tiers import get_tier
from tierbox.tiers.base import SnapshotRef
from tierbox.tiers.microvm import MicroVMInstance, MicroVMTier
from tierbox.vmm import snapshot as snapfmt
from tierbox.vmm.jail import SNAPSHOT_GID

pytestmark = pytest.mark.timeout(600)

MIB = 1 << 20


@pytest.fixture(scope="module")
def tier() -> MicroVMTier:
    require_tier("microvm")
    require_image("busybox:latest")
    t = get_tier("microvm")
    assert isinstance(t, MicroVMTier)
    return t


@pytest.fixture(scope="module")
def vm(tier: MicroVMTier) -> Iterator[MicroVMInstance]:
    inst = tier.create(SandboxSpec(image="busybox", limits=Limits(memory_mib=256, timeout_s=60)))
    try:
        inst.put_file("/tmp/marker", b"from the snapshot\n")
        yield inst
    finally:
        inst.close()


@pytest.fixture
def snap(vm: MicroVMInstance) -> Iterator[SnapshotRef]:
    """A fresh snapshot per test: the tests edit and swap its files."""
    ref = vm.snapshot()
    try:
        yield ref
    finally:
        shutil.rmtree(ref.path, ignore_errors=True)


def _our_qemus() -> int:
    return sum(
        1
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _ppid(p) == os.getpid() and b"qemu" in _cmd(p)
    )


def _ppid(p: Path) -> int:
    try:
        return int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _cmd(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""


def test_hashing_cost_is_measured(snap: SnapshotRef, tmp_path: Path) -> None:
    """The numbers behind the decision in vmm/snapshot.py's docstring."""
    ram = Path(snap.path) / snapfmt.RAM
    rows = []
    for mib in (128, 256):
        f = tmp_path / f"ram{mib}.bin"
        with open(f, "wb") as out:  # like guest RAM: touched pages between holes
            for i in range(0, mib, 4):
                out.seek(i * MIB)
                out.write(os.urandom(MIB))
            out.truncate(mib * MIB)
        for _ in range(2):
            t0 = time.monotonic()
            snapfmt.sha256_file(f)
            rows.append((f"{mib} MiB file", time.monotonic() - t0))
    used_mib = ram.stat().st_blocks * 512 // MIB
    t0 = time.monotonic()
    snapfmt.sha256_file(ram)
    rows.append((f"ram.bin of a 256 MiB guest ({used_mib} MiB used)", time.monotonic() - t0))
    for what, took in rows:
        print(f"sha256 of {what}: {took * 1000:.0f} ms")
    assert all(took < 10 for _, took in rows)


def test_snapshot_files_are_sealed_and_restores_use_the_record(
    tier: MicroVMTier, snap: SnapshotRef
) -> None:
    d = Path(snap.path)
    for name in (snapfmt.RAM, snapfmt.STATE, snapfmt.MANIFEST):
        st = (d / name).stat()
        assert st.st_uid == os.geteuid()
        assert not st.st_mode & stat.S_IWOTH, name
        # group-writable only for restored QEMUs (QEMU 7.2 opens it read-write)
        assert not st.st_mode & stat.S_IWGRP or st.st_gid == SNAPSHOT_GID, name
    if os.geteuid() == 0:
        ram = (d / snapfmt.RAM).stat()
        assert (stat.S_IMODE(ram.st_mode), ram.st_gid) == (0o660, SNAPSHOT_GID)
    # no record in the snapshot itself: whoever can write it could forge one
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [snapfmt.RAM, snapfmt.STATE, snapfmt.MANIFEST]
    )
    with snapfmt.open_snapshot(d) as opened:
        assert opened.ram_check == "cached"
    t0 = time.monotonic()
    (clone,) = tier.clone(snap)
    cached_s = time.monotonic() - t0
    try:
        assert clone.get_file("/tmp/marker") == b"from the snapshot\n"
    finally:
        clone.close()
    os.environ[snapfmt.VERIFY_ENV] = "always"
    try:
        with snapfmt.open_snapshot(d) as opened:
            assert opened.ram_check == "hashed"
        t0 = time.monotonic()
        (clone,) = tier.clone(snap)
        hashed_s = time.monotonic() - t0
        clone.close()
    finally:
        del os.environ[snapfmt.VERIFY_ENV]
    print(f"restore with the record: {cached_s:.3f} s; hashing every time: {hashed_s:.3f} s")


def test_in_place_edit_with_mtime_set_back_is_refused(tier: MicroVMTier, snap: SnapshotRef) -> None:
    d = Path(snap.path)
    ram = d / snapfmt.RAM
    with snapfmt.open_snapshot(d) as opened:
        assert opened.ram_check == "cached"  # a record exists for this inode
    if os.geteuid() != 0:
        pytest.skip("editing the sealed (0444) RAM file in place needs root")
    before = ram.stat()
    with open(ram, "r+b") as f:  # same inode, same size, same mode
        f.seek(4096 * 300)
        f.write(b"\xff" * 4096)
    os.utime(ram, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = ram.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns, after.st_mode) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
        before.st_mode,
    )
    assert after.st_ctime_ns != before.st_ctime_ns  # what no user can set back
    qemus = _our_qemus()
    with pytest.raises(SnapshotError, match=r"ram\.bin does not match its sha256"):
        tier.restore(snap)
    with pytest.raises(SnapshotError, match="sha256"):
        snapfmt.load_manifest(d)
    assert _our_qemus() == qemus


def test_unsealed_or_copied_ram_is_hashed_every_time(snap: SnapshotRef, tmp_path: Path) -> None:
    d = Path(snap.path)
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)  # a new inode: nothing vouches for it yet
    with snapfmt.open_snapshot(copy) as opened:
        assert opened.ram_check == "hashed"
    os.chmod(d / snapfmt.RAM, 0o664)  # writable by a group: not tierbox's alone
    for _ in range(2):
        with snapfmt.open_snapshot(d) as opened:
            assert opened.ram_check == "hashed"
    os.chmod(d / snapfmt.RAM, 0o444)
    os.link(d / snapfmt.RAM, d / "second-name")  # a hard link: another way in
    with snapfmt.open_snapshot(d) as opened:
        assert opened.ram_check == "hashed"


def test_files_swapped_after_the_check_do_not_reach_qemu(
    tier: MicroVMTier, snap: SnapshotRef, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attacker's best moment: right after verification, before QEMU opens
    the files. QEMU gets the verified (open) files, not the swapped-in ones."""
    d = Path(snap.path)
    real_open = snapfmt.open_snapshot

    def open_then_swap(snap_dir: Path) -> snapfmt.OpenSnapshot:
        opened = real_open(snap_dir)
        for name in (snapfmt.RAM, snapfmt.STATE):
            evil = d / f"{name}.evil"
            size = (d / name).stat().st_size
            with open(evil, "wb") as f:
                f.write(os.urandom(min(size, 1 << 16)))
                f.truncate(size)
            os.replace(evil, d / name)
        return opened

    monkeypatch.setattr(snapfmt, "open_snapshot", open_then_swap)
    (clone,) = tier.clone(snap)
    try:
        assert clone.get_file("/tmp/marker") == b"from the snapshot\n"
    finally:
        clone.close()
    monkeypatch.setattr(snapfmt, "open_snapshot", real_open)
    with pytest.raises(SnapshotError, match="sha256"):
        tier.restore(snap)  # the swapped-in files themselves are refused
    digest = hashlib.sha256((d / snapfmt.STATE).read_bytes()).hexdigest()
    assert digest != snap.meta["files"][snapfmt.STATE]["sha256"]
