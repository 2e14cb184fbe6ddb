"""The microVM's QEMU is jailed: tried as a guest that has taken over QEMU
would, through QEMU's own monitor (QMP ``blockdev-add`` and ``object-add``
open host paths with QEMU's credentials), on real guests.

Each QEMU runs as a uid of its own with no capability; the monitor gets
"Permission denied" for /etc/shadow, for a world-readable file under /root,
for another sandbox's RAM file and console, and cannot create files in /etc
or /root; a positive control (a world-readable file outside /root) shows
the probe itself works. Guest RAM is 0600 and the VMM's; a snapshot's RAM
is nobody else's to read; a clone's QEMU is as confined; uids are freed on
close and by the reaper.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tier
from tierbox.errors import QMPError
from tierbox.host import uids
from tierbox.spec import Limits, SandboxSpec
from tierbox.tiers import _state, get_tier
from tierbox.tiers.microvm import MicroVMInstance, MicroVMTier
from tierbox.vmm import artifacts, jail

pytestmark = pytest.mark.timeout(300)


def _spec() -> SandboxSpec:
    return SandboxSpec(limits=Limits(memory_mib=128, timeout_s=30))


@pytest.fixture(scope="module")
def tier() -> MicroVMTier:
    require_tier("microvm")
    if not jail.enabled():
        pytest.fail(f"{jail.NO_JAIL_ENV}=1 is a benchmark knob: unset it for the tests")
    t = get_tier("microvm")
    assert isinstance(t, MicroVMTier)
    return t


@pytest.fixture(scope="module")
def pair(tier: MicroVMTier) -> Iterator[tuple[MicroVMInstance, MicroVMInstance]]:
    a = tier.create(_spec())
    try:
        b = tier.create(_spec())
    except BaseException:
        a.close()
        raise
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture(scope="module")
def clone(
    tier: MicroVMTier, pair: tuple[MicroVMInstance, MicroVMInstance]
) -> Iterator[tuple[MicroVMInstance, Path]]:
    snap = pair[0].snapshot()
    (c,) = tier.clone(snap)
    try:
        yield c, Path(snap.path)
    finally:
        c.close()


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def _qmp_error(inst: MicroVMInstance, command: str, args: dict[str, Any]) -> str:
    """The monitor's answer to ``command``; fails the test if it succeeded."""
    client = inst._qmp_client()
    try:
        client.execute(command, args)
    except QMPError as exc:
        return str(exc)
    raise AssertionError(f"QEMU's monitor did {command} {args}: the jail let it through")


def _open_via_monitor(inst: MicroVMInstance, path: Path | str) -> str:
    return _qmp_error(
        inst,
        "blockdev-add",
        {"driver": "file", "filename": str(path), "node-name": "probe", "read-only": True},
    )


def _create_via_monitor(inst: MicroVMInstance, path: Path | str) -> str:
    return _qmp_error(
        inst,
        "object-add",
        {
            "qom-type": "memory-backend-file",
            "id": "probe",
            "mem-path": str(path),
            "size": 1 << 20,
            "share": True,
        },
    )


def test_qemu_runs_as_its_own_uid_without_capabilities(
    pair: tuple[MicroVMInstance, MicroVMInstance], clone: tuple[MicroVMInstance, Path]
) -> None:
    seen: set[int] = set()
    for inst in (*pair, clone[0]):
        st = _status(inst.proc.pid)
        ruid, euid, suid, fsuid = (int(x) for x in st["Uid"].split())
        assert ruid == euid == suid == fsuid != 0
        assert int(st["Gid"].split()[0]) != 0
        assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
        assert inst.vmm_user is not None and inst.vmm_user.uid == euid
        assert (uids.uids_dir() / str(euid)).read_text() == inst.id
        seen.add(euid)
    assert len(seen) == 3, "every QEMU has a uid of its own"
    assert _status(pair[0].proc.pid)["Groups"] == ""
    assert _status(clone[0].proc.pid)["Groups"].split() == [str(jail.SNAPSHOT_GID)]


def test_guest_ram_is_private_to_its_vmm(pair: tuple[MicroVMInstance, MicroVMInstance]) -> None:
    for inst in pair:
        assert inst.ram_path is not None and inst.vmm_user is not None
        st = os.stat(inst.ram_path)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_uid, st.st_gid) == (inst.vmm_user.uid, inst.vmm_user.gid)
        vmm_dir = os.stat(inst.files.vmm_dir)
        assert stat.S_IMODE(vmm_dir.st_mode) == 0o700 and vmm_dir.st_uid == inst.vmm_user.uid
        # tierbox's own records are out of QEMU's reach: it may only pass through
        top = os.stat(inst.files.dir)
        assert top.st_uid == 0 and stat.S_IMODE(top.st_mode) == 0o710


def test_monitor_cannot_open_host_or_other_sandbox_files(
    pair: tuple[MicroVMInstance, MicroVMInstance],
) -> None:
    a, b = pair
    assert b.ram_path is not None
    hostile = [
        Path("/etc/shadow"),
        artifacts.ensure_guest(build=False).kernel.vmlinux,  # 0644, but under /root
        b.ram_path,
        b.files.console,
    ]
    for path in hostile:
        assert path.exists()
        err = _open_via_monitor(a, path)
        assert "Permission denied" in err, f"{path}: {err}"
    # the control: the same probe opens a world-readable file outside /root
    client = a._qmp_client()
    client.execute(
        "blockdev-add",
        {"driver": "file", "filename": "/etc/hostname", "node-name": "ok", "read-only": True},
    )
    client.execute("blockdev-del", {"node-name": "ok"})


def test_monitor_cannot_create_host_files(pair: tuple[MicroVMInstance, MicroVMInstance]) -> None:
    a = pair[0]
    for path in (Path("/etc/tierbox-jail-probe"), Path("/root/tierbox-jail-probe")):
        err = _create_via_monitor(a, path)
        assert "Permission denied" in err, f"{path}: {err}"
        assert not path.exists()
    assert a.exec(["true"]).ok  # the probes did not hurt the guest


def test_snapshot_ram_is_not_world_readable_and_clone_is_confined(
    pair: tuple[MicroVMInstance, MicroVMInstance], clone: tuple[MicroVMInstance, Path]
) -> None:
    c, snap_dir = clone
    st = os.stat(snap_dir / "ram.bin")
    assert st.st_uid == 0 and st.st_gid == jail.SNAPSHOT_GID
    assert not st.st_mode & 0o007, oct(st.st_mode)
    assert c.exec(["echo", "ok"]).stdout == b"ok\n"
    a_ram = pair[0].ram_path
    assert a_ram is not None
    for path in (Path("/etc/shadow"), a_ram, snap_dir / "state.bin"):
        err = _open_via_monitor(c, path)
        assert "Permission denied" in err, f"{path}: {err}"


def test_uids_are_freed_on_close_and_by_the_reaper(tier: MicroVMTier) -> None:
    closed = tier.create(_spec())
    assert closed.vmm_user is not None
    claim = uids.uids_dir() / str(closed.vmm_user.uid)
    assert claim.exists()
    closed.close()
    assert not claim.exists()

    crashed = tier.create(_spec())
    assert crashed.vmm_user is not None
    claim = uids.uids_dir() / str(crashed.vmm_user.uid)
    pid = crashed.proc.pid
    # its owner "crashes": everything live but this one is kept (asked again
    # for a sandbox made meanwhile, as gc does)
    removed = tier.reap(_AllBut(crashed.id, _state.live_ids()))
    assert any(crashed.id in line for line in removed)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not crashed.proc.alive()
    assert not claim.exists()
    crashed.close()


class _AllBut(_state.LiveIds):
    """The live sandboxes, less one taken for crashed."""

    def __init__(self, crashed: str, live: _state.LiveIds) -> None:
        super().__init__(live - {crashed})
        self.crashed = crashed

    def __contains__(self, sandbox_id: object) -> bool:
        return sandbox_id != self.crashed and super().__contains__(sandbox_id)
