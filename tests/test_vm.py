"""The vm tier on real libvirt domains (qemu:///system), no mocks.

One VM is shared by most tests (module scope); tests that need a VM of their
own (faults, reaping, the CLI walk-through) make one and remove it. Skips
only when libvirt truly cannot run here, with the reason printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_image, require_tier
from tierbox import Sandbox, TerminationKind, make_spec
from tierbox.errors import (
    LibvirtUnreachableError,
    NotSupportedError,
    SandboxError,
    SnapshotExistsError,
    SnapshotHasChildrenError,
    SnapshotNotFoundError,
    SpecError,
    TierboxError,
    UsageError,
    VMExistsError,
    VMNotFoundError,
)
from tierbox.tiers import _state, get_tier
from tierbox.tiers.vm import VMInstance, VMTier

IMAGE = "busybox:latest"
#: A counter that keeps running in the guest between execs: what a command
#: leaves running lives on until the VM ends, as in a container.
COUNTER = (
    "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /dev/shm/counter; sleep 0.1; done' "
    "</dev/null >/dev/null 2>&1 & sleep 0.3"
)


@pytest.fixture(scope="module")
def tier() -> VMTier:
    require_tier("vm")
    require_image(IMAGE)
    t = get_tier("vm")
    assert isinstance(t, VMTier)
    return t


@pytest.fixture(scope="module")
def vm(tier: VMTier) -> Iterator[VMInstance]:
    inst = tier.create_vm(make_spec(IMAGE, memory_mib=256, timeout_s=30))
    try:
        yield inst
    finally:
        inst.close()


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60
    )


def sh(inst: VMInstance, script: str) -> str:
    r = inst.exec(["sh", "-c", script])
    assert r.ok, (r.termination, r.stderr)
    return r.stdout.decode()


def counter(inst: VMInstance) -> int:
    return int(sh(inst, "cat /dev/shm/counter"))


def fresh(prefix: str = "snap") -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


# ---- create, exec, files -------------------------------------------------------------------


def test_exec_files_stats(vm: VMInstance) -> None:
    r = vm.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 7)
    assert vm.exec(["cat"], stdin=b"piped").stdout == b"piped"
    assert vm.exec(["sh", "-c", "echo $G"], env={"G": "hi"}).stdout == b"hi\n"
    vm.put_file("/tmp/in.txt", b"payload\n")
    assert sh(vm, "cat /tmp/in.txt") == "payload\n"
    sh(vm, "echo inside > /tmp/out.txt")
    assert vm.get_file("/tmp/out.txt") == b"inside\n"
    assert "in.txt" in vm.list_dir("/tmp")
    st = vm.stats()
    assert st.memory_bytes and st.memory_bytes > 0
    assert st.pids and st.pids > 0
    # a real kernel of its own, root on a virtio disk, no network but loopback
    assert sh(vm, "uname -r").strip() != os.uname().release
    assert "/dev/vda / ext4 rw" in sh(vm, "cat /proc/mounts")
    assert sh(vm, "ls /sys/class/net").split() == ["lo"]


def test_exec_limits_and_errors(vm: VMInstance) -> None:
    r = vm.exec(["sh", "-c", "while :; do :; done"], timeout_s=1)
    assert r.termination.kind is TerminationKind.TIMED_OUT
    assert vm.exec(["true"]).ok  # still usable
    r = vm.exec(["no-such-command"])  # a result, as on every tier
    assert r.exit_code == 127 and b"command not found" in r.stderr, r
    with pytest.raises(UsageError):
        vm.exec([])


def test_domain_is_a_libvirt_domain_with_the_marker(vm: VMInstance) -> None:
    assert vm.domain_name in virsh("list", "--name").stdout.split()
    xml = virsh("dumpxml", vm.domain_name).stdout
    assert "https://tierbox.dev/xmlns/vm/1" in xml
    assert "<type arch='x86_64' machine='pc-q35" in xml
    assert "<interface" not in xml  # no network by default
    assert re.search(r"<domain type='(qemu|kvm)'", xml)
    if vm.meta.accel == "tcg":
        assert "<domain type='qemu'" in xml
    assert "<memory unit='KiB'>262144</memory>" in xml
    # the serial console is logged to a file (by virtlogd)
    assert f"<log file='{vm.meta.console}'" in xml
    sh(vm, "echo tierbox-console-check > /dev/console")
    time.sleep(0.2)
    assert "tierbox-console-check" in vm.console_tail()
    meta = virsh("metadata", vm.domain_name, "https://tierbox.dev/xmlns/vm/1").stdout
    assert json.loads(re.sub(r"^<vm>|</vm>\s*$", "", meta.strip()))["id"] == vm.id


# ---- snapshots ---------------------------------------------------------------------------------


def test_revert_brings_back_disk_and_memory(vm: VMInstance) -> None:
    name = fresh()
    sh(vm, "echo v1 > /srv_app; echo before > /before.txt; echo ram > /dev/shm/ram.txt")
    sh(vm, COUNTER)
    vm.create_snapshot(name, "before the update")
    at_snapshot = counter(vm)
    sh(vm, "echo v2 > /srv_app; echo after > /after.txt; rm /dev/shm/ram.txt")
    time.sleep(2.0)
    later = counter(vm)
    assert later >= at_snapshot + 10
    timings = vm.revert_timed(name)
    assert timings["method"] == "loadvm"
    # the agent line works again with no user action; files and memory are back
    assert sh(vm, "cat /srv_app") == "v1\n"
    assert sh(vm, "cat /before.txt") == "before\n"
    assert vm.exec(["cat", "/after.txt"]).exit_code != 0
    assert sh(vm, "cat /dev/shm/ram.txt") == "ram\n"
    # the counter process came back with the memory and continues from its value
    resumed = counter(vm)
    assert at_snapshot <= resumed < later, (at_snapshot, resumed, later)
    time.sleep(1.0)
    assert counter(vm) > resumed
    vm.delete_snapshot(name)


def test_snapshot_records_match_virsh(vm: VMInstance) -> None:
    a, b, c = fresh("a"), fresh("b"), fresh("c")
    ia = vm.create_snapshot(a, "first")
    ib = vm.create_snapshot(b, "second")
    assert ib.parent == a
    assert ia.state == ib.state == "running" and ia.memory == "internal"
    assert ia.description == "first" and abs(ia.created - time.time()) < 120
    listed = {i.name: i for i in vm.list_snapshots()}
    assert listed[b].current and not listed[a].current
    assert {a, b} <= set(virsh("snapshot-list", vm.domain_name, "--name").stdout.split())
    # the fast revert keeps libvirt's records as its own revert would
    vm.revert(a)
    assert virsh("snapshot-current", vm.domain_name, "--name").stdout.strip() == a
    ic = vm.create_snapshot(c)
    assert ic.parent == a
    parents = virsh("snapshot-list", vm.domain_name, "--parent").stdout
    assert re.search(rf"{c}\s.*\srunning\s+{a}\s*$", parents, re.MULTILINE), parents
    assert virsh("snapshot-info", vm.domain_name, a).returncode == 0
    vm.delete_snapshot(a, children=True)
    assert vm.list_snapshots() == [] or a not in {i.name for i in vm.list_snapshots()}


def test_snapshot_bad_input_leaves_the_vm_working(vm: VMInstance) -> None:
    name = fresh()
    vm.create_snapshot(name)
    with pytest.raises(SnapshotNotFoundError, match="no snapshot 'missing'") as e1:
        vm.revert("missing")
    assert isinstance(e1.value, UsageError)
    with pytest.raises(SnapshotExistsError, match="already has a snapshot"):
        vm.create_snapshot(name)
    child = fresh("child")
    vm.create_snapshot(child)
    with pytest.raises(SnapshotHasChildrenError, match=rf"descendant \({child}\).*--children"):
        vm.delete_snapshot(name)
    with pytest.raises(SpecError, match="bad snapshot name"):
        vm.create_snapshot("has space")
    with pytest.raises(SnapshotNotFoundError):
        vm.delete_snapshot("missing")
    assert sh(vm, "echo alive") == "alive\n"
    assert vm.delete_snapshot(name, children=True) == [name, child]
    assert name not in virsh("snapshot-list", vm.domain_name, "--name").stdout


@pytest.mark.slow
def test_libvirt_revert_restarts_qemu_and_the_agent_reconnects(vm: VMInstance) -> None:
    name = fresh()
    sh(vm, "echo one > /lv.txt")
    vm.create_snapshot(name)
    sh(vm, "echo two > /lv.txt")
    pid = vm.qemu_pid()
    t = vm.revert_timed(name, method="libvirt")
    assert t["method"] == "libvirt"
    assert vm.qemu_pid() != pid  # libvirt started a new QEMU
    assert sh(vm, "cat /lv.txt") == "one\n"
    vm.delete_snapshot(name)


def test_python_api_sandbox_snapshot_and_revert(tier: VMTier) -> None:
    with Sandbox.create(IMAGE, tier="vm", memory_mib=256) as sb:
        sb.run(["sh", "-c", "echo v1 > /srv_app"])
        snap = sb.snapshot()
        assert snap.tier == "vm" and snap.meta["snapshot"]
        sb.run(["sh", "-c", "echo v2 > /srv_app"])
        sb.revert(snap.meta["snapshot"])
        assert sb.run(["cat", "/srv_app"]).stdout == b"v1\n"
        again = Sandbox.connect(sb.id)  # another process would do the same
        assert again.run(["cat", "/srv_app"]).stdout == b"v1\n"
        domain = snap.meta["domain"]
        assert domain in virsh("list", "--name").stdout.split()
    assert domain not in virsh("list", "--all", "--name").stdout.split()


# ---- bad input at create -------------------------------------------------------------------------


def test_create_rejects_bad_specs(tier: VMTier, vm: VMInstance) -> None:
    with pytest.raises(SpecError, match="too small"):
        tier.create_vm(make_spec(IMAGE, memory_mib=16))
    with pytest.raises(NotSupportedError, match="vm tier cannot give network=host"):
        tier.create_vm(make_spec(IMAGE, network="host"))
    with pytest.raises(SpecError, match="bad VM name"):
        tier.create_vm(make_spec(IMAGE), name="../etc")
    with pytest.raises(VMExistsError):
        tier.create_vm(make_spec(IMAGE), name=vm.domain_name)
    with pytest.raises(VMNotFoundError):
        tier.open(f"no-such-vm-{secrets.token_hex(3)}")


# ---- removal and reaping ----------------------------------------------------------------------


def test_close_removes_domain_snapshots_and_disks(tier: VMTier) -> None:
    inst = tier.create_vm(make_spec(IMAGE, memory_mib=256), name=fresh("tbrm"))
    inst.create_snapshot("s1")
    d = Path(inst.meta.dir)
    assert (d / "disk.qcow2").is_file()
    inst.close()
    inst.close()  # idempotent
    assert inst.domain_name not in virsh("list", "--all", "--name").stdout.split()
    assert not d.exists()
    assert not Path(f"/var/lib/libvirt/qemu/snapshot/{inst.domain_name}").exists()
    assert not _state.sandbox_dir(inst.id).exists()


@pytest.mark.slow
def test_reap_removes_vms_of_crashed_runs(tier: VMTier) -> None:
    code = (
        "import sys, time\n"
        "from tierbox import Sandbox\n"
        f"sb = Sandbox.create({IMAGE!r}, tier='vm', memory_mib=256)\n"
        "sb.instance.create_snapshot('s1')\n"
        "print(sb.id, sb.instance.domain_name, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line, proc.stderr.read() if proc.stderr else ""
        sid, domain = line
    finally:
        proc.kill()  # the owner "crashes"
        proc.wait()
    assert domain in virsh("list", "--name").stdout.split()
    removed = tier.reap(_state.live_ids())
    assert any(sid in r for r in removed), removed
    assert domain not in virsh("list", "--all", "--name").stdout.split()
    assert not (tier_domains_dir() / sid).exists()


def tier_domains_dir() -> Path:
    from tierbox.tiers.vm import domains_dir

    return domains_dir()


# ---- faults --------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(size_mib: int) -> Iterator[Path]:
    mnt = Path(f"/tmp/tierbox-vm-full-{secrets.token_hex(3)}")
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


def fill(mnt: Path, leave_kib: int) -> Path:
    filler = mnt / "filler"
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        f.truncate(0)
        os.posix_fallocate(f.fileno(), 0, max(0, free - leave_kib * 1024))
    return filler


@pytest.mark.slow
def test_disk_full_during_snapshot(tier: VMTier, monkeypatch: pytest.MonkeyPatch) -> None:
    with small_filesystem(256) as mnt:
        monkeypatch.setenv("TIERBOX_VM_DOMAINS", str(mnt))
        inst = tier.create_vm(make_spec(IMAGE, memory_mib=256))
        try:
            assert Path(inst.meta.disk).parent.parent == mnt
            sh(inst, "echo kept > /kept.txt")
            filler = fill(mnt, leave_kib=512)
            with pytest.raises(SandboxError, match="no space left for snapshot") as exc:
                inst.create_snapshot("full")
            assert "Free some space" in str(exc.value)
            # no half snapshot recorded, and the VM still works
            assert inst.list_snapshots() == []
            assert "full" not in inst.internal_snapshots()
            assert sh(inst, "cat /kept.txt") == "kept\n"
            assert inst.domain_state() == "running"
            filler.unlink()
            inst.create_snapshot("full")
            sh(inst, "echo changed > /kept.txt")
            inst.revert("full")
            assert sh(inst, "cat /kept.txt") == "kept\n"
        finally:
            inst.close()


def _kill_libvirtd() -> None:
    from tierbox import libvirt_host as lvh

    pid = lvh.daemon_pid("libvirtd")
    assert pid is not None, "no libvirtd pid file"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while lvh.daemon_pid("libvirtd") == pid and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lvh.daemon_pid("libvirtd") is None, "libvirtd did not stop"


@pytest.mark.slow
def test_libvirtd_stopped_in_the_middle(
    tier: VMTier, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tierbox import libvirt_host as lvh

    inst = tier.create_vm(make_spec(IMAGE, memory_mib=256))
    try:
        sh(inst, "echo one > /f.txt")
        # 1. libvirtd gone and tierbox told not to start it: a clear error,
        #    while the VM itself keeps running and answering
        monkeypatch.setenv(lvh.AUTOSTART_ENV, "0")
        _kill_libvirtd()
        with pytest.raises(LibvirtUnreachableError, match="libvirtd -d") as exc:
            inst.create_snapshot("s1")
        assert "TIERBOX_LIBVIRT_AUTOSTART" in str(exc.value)
        assert sh(inst, "cat /f.txt") == "one\n"
        # 2. allowed again: tierbox starts libvirtd, says so, and carries on
        monkeypatch.delenv(lvh.AUTOSTART_ENV)
        with caplog.at_level("WARNING", logger="tierbox"):
            inst.create_snapshot("s1")
        assert "started libvirtd" in caplog.text
        assert lvh.daemon_pid("libvirtd") is not None
        assert inst.domain_name in virsh("list", "--name").stdout.split()
        # 3. libvirtd dies while a snapshot is being taken
        killer = threading.Timer(0.02, _kill_libvirtd)
        killer.start()
        outcome = "ok"
        try:
            inst.create_snapshot("s2")
        except LibvirtUnreachableError as e:
            outcome = str(e)
            assert "libvirtd" in outcome
        killer.join()
        print(f"snapshot while libvirtd died: {outcome}")
        sh(inst, "echo two > /f.txt")  # the guest never noticed
        # the next call brings libvirtd back; records and QEMU agree again
        names = {i.name for i in inst.list_snapshots()}
        assert "s1" in names
        with contextlib.suppress(SnapshotExistsError):
            inst.create_snapshot("s2")
        assert {i.name for i in inst.list_snapshots()} == {"s1", "s2"}
        assert sorted(inst.internal_snapshots()) == ["s1", "s2"]
        inst.revert("s1")
        assert sh(inst, "cat /f.txt") == "one\n"
    finally:
        try:
            inst.close()
        except TierboxError:
            lvh.start_daemons()  # whatever failed above, leave libvirtd and no VM behind
            inst.close()


# ---- the CLI walk-through of the issue -----------------------------------------------------------


def vmcli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tierbox.cli_vm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_cli_walkthrough_debian(tier: VMTier) -> None:
    from tierbox.errors import ImageNotFoundError
    from tierbox.images.store import default_store

    try:
        default_store().resolve("debian:bookworm")
    except ImageNotFoundError:
        default_store().bootstrap("debian:bookworm")  # ~45 s, once per store
    name = fresh("web")
    r = vmcli("create", name, "--image", "debian:bookworm", "--memory", "512m")
    assert r.returncode == 0, r.stderr
    try:
        assert vmcli("exec", name, "--", "sh", "-c", "echo v1 > /srv/app").returncode == 0
        r = vmcli(
            "snapshot", "create", name, "before-update", "--description", "Snapshot before update"
        )
        assert r.returncode == 0, r.stderr
        assert vmcli("exec", name, "--", "sh", "-c", "echo v2 > /srv/app").returncode == 0
        assert vmcli("snapshot", "revert", name, "before-update").returncode == 0
        r = vmcli("exec", name, "--", "cat", "/srv/app")
        assert (r.returncode, r.stdout) == (0, "v1\n")
        rows = json.loads(vmcli("snapshot", "list", name, "--json").stdout)
        assert [(s["name"], s["state"], s["description"], s["parent"]) for s in rows] == [
            ("before-update", "running", "Snapshot before update", None)
        ]
        assert "before-update" in virsh("snapshot-list", name).stdout
        assert "debian" in vmcli("exec", name, "--", "cat", "/etc/os-release").stdout.lower()
        # bad input: exit code 2 and a clear message
        r = vmcli("snapshot", "revert", name, "nope")
        assert r.returncode == 2 and "no snapshot 'nope'" in r.stderr
        r = vmcli("snapshot", "create", name, "before-update")
        assert r.returncode == 2 and "already has a snapshot" in r.stderr
        assert vmcli("snapshot", "create", name, "child").returncode == 0
        r = vmcli("snapshot", "delete", name, "before-update")
        assert r.returncode == 2 and "--children" in r.stderr
        assert vmcli("snapshot", "delete", name, "child").returncode == 0
        assert vmcli("snapshot", "delete", name, "before-update").returncode == 0
        assert json.loads(vmcli("snapshot", "list", name, "--json").stdout) == []
        listed = {v["name"]: v for v in json.loads(vmcli("ls", "--json").stdout)}
        assert listed[name]["state"] == "running" and listed[name]["memory_mib"] == 512
    finally:
        r = vmcli("rm", name)
    assert r.returncode == 0, r.stderr
    assert name not in virsh("list", "--all", "--name").stdout.split()
    assert vmcli("exec", name, "--", "true").returncode == 2


@pytest.mark.slow
def test_stop_and_start_keep_the_disk(tier: VMTier) -> None:
    inst = tier.create_vm(make_spec(IMAGE, memory_mib=256), name=fresh("tbstop"))
    try:
        sh(inst, "echo kept > /kept.txt")  # no sync: stop lets the guest flush
        inst.power_off()
        assert inst.domain_state() == "shutoff"
        inst.power_on()  # a cold boot from the same disk
        assert sh(inst, "cat /kept.txt") == "kept\n"
    finally:
        inst.close()
