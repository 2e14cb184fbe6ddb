"""The microVM's QEMU is jailed: tried as a guest that has taken over QEMU
would, through QEMU's own monitor (QMP ``blockdev-add`` and ``object-add``
open host paths with QEMU's credentials, in QEMU's namespaces), on real
guests.

Each QEMU runs as a uid of its own with no capability, in mount, PID, user
and network namespaces of its own whose root holds /usr read-only, a
minimal /dev, its /proc and its sandbox's files. The monitor cannot open
/etc/shadow, a world-readable file under /root, another sandbox's RAM file
or console, nor create files; a positive control (a file in /usr) shows the
probe itself works. A probe with the same credentials but the host's mount
namespace (``setpriv``) gets "Permission denied" for the same files: the
uid alone keeps them out. Guest RAM is 0600 and the VMM's; a snapshot's
RAM is nobody else's to read; a clone's QEMU is as confined; uids are freed
on close and by the reaper.
"""

from __future__ import annotations

import os
import stat
import subprocess
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


#: How a refused open reads: the path is not in QEMU's root, or the uid may not
REFUSED = ("Permission denied", "No such file or directory", "Read-only file system")


def _refused(err: str) -> bool:
    return any(r in err for r in REFUSED)


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
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[cap], 16) == 0, (cap, st[cap])
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
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
        assert _refused(err), f"{path}: {err}"
    # the control: the same probe opens what the jail holds (QEMU's firmware)
    client = a._qmp_client()
    client.execute(
        "blockdev-add",
        {"driver": "file", "filename": "/usr/bin/true", "node-name": "ok", "read-only": True},
    )
    client.execute("blockdev-del", {"node-name": "ok"})
    # and the uid alone keeps the same files out, namespaces aside
    assert a.vmm_user is not None
    for path in hostile:
        probe = subprocess.run(
            ["setpriv", f"--reuid={a.vmm_user.uid}", f"--regid={a.vmm_user.gid}",
             "--clear-groups", "--inh-caps=-all", "head", "-c1", str(path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert probe.returncode != 0 and "Permission denied" in probe.stderr, (path, probe)


def test_qemu_sees_only_its_own_root_pids_and_no_network(
    pair: tuple[MicroVMInstance, MicroVMInstance],
) -> None:
    a, b = pair
    pid = a.proc.pid
    for ns in ("mnt", "pid", "net", "user", "ipc"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink(f"/proc/{b.proc.pid}/ns/mnt")
    root = Path(f"/proc/{pid}/root")
    assert {p.name for p in root.iterdir()} <= {"usr", "bin", "lib", "lib64", "dev", "proc", "run"}
    assert not (root / "etc").exists() and not (root / "root").exists()
    assert (root / str(a.files.vmm_dir).lstrip("/")).is_dir()
    assert a.ram_path is not None and (root / str(a.ram_path).lstrip("/")).is_file()
    assert b.ram_path is not None and not (root / str(b.ram_path).lstrip("/")).exists()
    assert _status(pid)["NSpid"].split()[-1] == "1"  # QEMU is alone in its PID namespace
    devs = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    assert [d.split(":")[0].strip() for d in devs] == ["lo"]


def test_monitor_cannot_create_host_files(pair: tuple[MicroVMInstance, MicroVMInstance]) -> None:
    a = pair[0]
    for path in (
        Path("/etc/tierbox-jail-probe"),
        Path("/root/tierbox-jail-probe"),
        Path("/usr/tierbox-jail-probe"),
        a.files.dir / "vm.json",  # tierbox's record beside QEMU's directory
    ):
        before = path.read_bytes() if path.exists() else None
        err = _create_via_monitor(a, path)
        assert _refused(err), f"{path}: {err}"
        assert (path.read_bytes() if path.exists() else None) == before
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
        assert _refused(err), f"{path}: {err}"


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
