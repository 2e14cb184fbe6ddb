"""The vm tier's QEMU jail, on real libvirt domains (qemu:///system).

What a QEMU taken over by its guest could do is bounded by the host user it
runs as: these tests check that user is libvirt's unprivileged one with no
capabilities, that QEMU's own monitor (the most powerful interface it has)
cannot open root's files, that the files holding guest disk and memory are
0600, and that ``disk_mib`` bounds the disk inside the guest (ENOSPC there)
and on the host. Nothing here skips under ``TIERBOX_TEST_NO_SKIP``.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_image, require_tier
from tierbox import libvirt_host as lvh
from tierbox import make_spec
from tierbox.spec import MIB
from tierbox.tiers import get_tier
from tierbox.tiers.vm import VMInstance, VMTier
from tierbox.vmm import libvirt_guest as guestmod
from tierbox.vmm import libvirt_template as templates

IMAGE = "busybox:latest"
DISK_MIB = 64
MEMORY_MIB = 128
#: What qcow2 may add on the host beyond the guest's data: its header, L1/L2
#: tables and refcount blocks (~1 MiB for a 64 MiB disk), with room to spare.
QCOW2_SLACK_MIB = 8


@pytest.fixture(scope="module")
def tier() -> VMTier:
    require_tier("vm")
    require_image(IMAGE)
    t = get_tier("vm")
    assert isinstance(t, VMTier)
    return t


@pytest.fixture(scope="module")
def vm(tier: VMTier) -> Iterator[VMInstance]:
    inst = tier.create(make_spec(IMAGE, memory_mib=MEMORY_MIB, disk_mib=DISK_MIB))
    assert isinstance(inst, VMInstance)
    try:
        yield inst
    finally:
        inst.close()


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _assert_unprivileged(inst: VMInstance) -> None:
    pid = inst.qemu_pid()
    assert pid is not None, f"VM {inst.name} has no QEMU"
    st = _status(pid)
    uid, gid = guestmod.qemu_ids()
    assert [int(x) for x in st["Uid"].split()] == [uid] * 4, st["Uid"]
    assert [int(x) for x in st["Gid"].split()] == [gid] * 4, st["Gid"]
    assert uid != 0 and gid != 0
    for cap in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert int(st[cap], 16) == 0, f"QEMU holds capabilities: {cap} {st[cap]}"
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", st
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")


def _qmp(inst: VMInstance, command: dict[str, Any]) -> str:
    """QEMU's reply (or libvirt's error) to a QMP command through libvirt."""
    lvq = lvh.qemu_binding()
    try:
        return str(lvq.qemuMonitorCommand(inst.domain(), json.dumps(command), 0))
    except lvh.binding().libvirtError as exc:
        return str(exc)


def test_qemu_runs_unprivileged_with_no_capabilities(vm: VMInstance) -> None:
    _assert_unprivileged(vm)
    assert vm.exec(["true"]).exit_code == 0


@pytest.mark.parametrize(
    "path",
    [
        "/etc/shadow",
        "/root/.bashrc",
        str(guestmod.guest_dir() / "initramfs.json"),  # under /root (0700)
    ],
)
def test_monitor_cannot_open_root_files(vm: VMInstance, path: str) -> None:
    target = Path(path)
    if not target.exists():
        target = Path("/etc/shadow")  # the probe needs a file that exists
    reply = _qmp(
        vm,
        {
            "execute": "blockdev-add",
            "arguments": {
                "driver": "file",
                "node-name": "tbxprobe",
                "filename": str(target),
                "read-only": True,
            },
        },
    )
    try:
        assert "Permission denied" in reply, f"QEMU opened {target}: {reply}"
    finally:
        if '"error"' not in reply and "Permission denied" not in reply:
            _qmp(vm, {"execute": "blockdev-del", "arguments": {"node-name": "tbxprobe"}})


def test_monitor_cannot_write_shared_boot_files(vm: VMInstance) -> None:
    """The kernel, initramfs and base disk every VM boots are root's, 0444:
    QEMU reads them and can change none of them."""
    uid, _ = guestmod.qemu_ids()
    xml = vm.domain().XMLDesc(0)
    shared = [
        p
        for p in (guestmod.boot_dir().iterdir())
        if p.suffix in (".vmlinux", ".initramfs") and str(p) in xml
    ]
    assert len(shared) == 2, f"the domain boots files outside {guestmod.boot_dir()}: {xml}"
    info = json.loads(_qmp(vm, {"execute": "query-block"}))
    backing = info["return"][0]["inserted"]["image"]["backing-image"]["filename"]
    shared.append(Path(backing))
    for p in shared:
        st = p.stat()
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o444, (p, oct(st.st_mode))
        assert st.st_uid != uid
    reply = _qmp(
        vm,
        {
            "execute": "blockdev-add",
            "arguments": {"driver": "file", "node-name": "tbxrw", "filename": backing},
        },
    )
    assert "Permission denied" in reply, f"QEMU opened the shared base disk for writing: {reply}"


def _private(path: Path, owner: int | None = None) -> None:
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) & 0o077 == 0, f"{path} is {oct(stat.S_IMODE(st.st_mode))}"
    if owner is not None:
        assert st.st_uid == owner, f"{path} belongs to uid {st.st_uid}"


def test_disk_snapshot_console_and_dirs_are_private(vm: VMInstance) -> None:
    uid, gid = guestmod.qemu_ids()
    vm.exec(["sh", "-c", "echo secret > /root-secret; sync"])
    vm.create_snapshot("jail-1")
    try:
        disk = Path(vm.meta.disk)
        _private(disk, owner=uid)  # holds the disk and the snapshot's RAM
        _private(Path(vm.meta.console), owner=0)
        d = Path(vm.meta.dir)
        for p in (d, *[q for q in d.parents if guestmod.state_dir() in (q, *q.parents)]):
            st = p.stat()
            assert stat.S_IMODE(st.st_mode) & 0o007 == 0, f"{p} is {oct(st.st_mode)}"
            assert st.st_uid == 0 and st.st_gid == gid, p
        assert Path(vm.meta.socket).stat().st_mode & 0o002 == 0
    finally:
        vm.delete_snapshot("jail-1")


def test_templates_are_private_and_restore_unprivileged(tier: VMTier, vm: VMInstance) -> None:
    """The shape's template (built in the background after the first create)
    is root's and 0600, and a VM restored from it runs unprivileged."""
    spec = make_spec(IMAGE, memory_mib=MEMORY_MIB, disk_mib=DISK_MIB)
    key = tier.shape(spec).key
    deadline = time.monotonic() + 60
    tpl = templates.load(key)
    while tpl is None and templates.is_locked(key) and time.monotonic() < deadline:
        time.sleep(0.2)  # the background build of the first create
        tpl = templates.load(key)
    if tpl is None:
        tpl = tier.build_template(spec)  # none ran here (or it failed): build it now
    assert tpl is not None, f"no template {key} within 60 s"
    for name in ("state.save", "disk.qcow2", "console.log"):
        _private(tpl.dir / name, owner=0)
    clone = tier.create(spec)
    assert isinstance(clone, VMInstance)
    try:
        assert clone.timings.get("from_template") == 1.0, clone.timings
        _assert_unprivileged(clone)
        xml = clone.domain().XMLDesc(0)
        assert str(tpl.dir) not in xml, "the clone writes into its template's directory"
        assert f"file='{clone.meta.console}'" in xml
        _private(Path(clone.meta.disk), owner=guestmod.qemu_ids()[0])
    finally:
        clone.close()


def test_disk_mib_is_enforced_in_the_guest_and_on_the_host(vm: VMInstance) -> None:
    r = vm.exec(["sh", "-c", "df -k / | tail -1"])
    size_kib = int(r.stdout.split()[1])
    assert DISK_MIB * 1024 * 0.8 <= size_kib <= DISK_MIB * 1024, r.stdout
    before = Path(vm.meta.disk).stat().st_blocks * 512
    r = vm.exec(
        ["sh", "-c", f"dd if=/dev/urandom of=/fill bs=1M count={DISK_MIB * 3}; sync"],
        timeout_s=120,
    )
    assert b"No space left on device" in r.stderr, r.stderr[-400:]
    grown = Path(vm.meta.disk).stat().st_blocks * 512 - before
    assert grown <= (DISK_MIB + QCOW2_SLACK_MIB) * MIB, f"the overlay grew {grown / MIB:.1f} MiB"
    info = json.loads(_qmp(vm, {"execute": "query-block"}))
    assert info["return"][0]["inserted"]["image"]["virtual-size"] == DISK_MIB * MIB
    vm.exec(["rm", "-f", "/fill"])
    os.sync()


#: virtlogd's defaults (virtlogd.conf max_size, max_backups): the console log
#: rotates at 2 MiB and keeps 3 older files.
CONSOLE_FILE_MIB = 2
CONSOLE_BACKUPS = 3


def test_console_flood_is_capped_and_rotated(vm: VMInstance) -> None:
    """A guest root writing to its serial console fills at most
    (1 + backups) x 2 MiB on the host, every file root's and 0600. The
    serial port under TCG moves ~0.1 MB/s, so the flood is just past one
    rotation."""
    r = vm.exec(["sh", "-c", "head -c 2200000 /dev/zero | tr '\\0' x > /dev/ttyS0"], timeout_s=120)
    assert r.exit_code == 0, r.stderr
    console = Path(vm.meta.console)
    logs = sorted(console.parent.glob(console.name + "*"))
    assert console.with_name(console.name + ".0") in logs, logs
    assert len(logs) <= 1 + CONSOLE_BACKUPS, logs
    for p in logs:
        assert p.stat().st_size <= CONSOLE_FILE_MIB * MIB, (p, p.stat().st_size)
        _private(p, owner=0)
