"""The microvm tier with real QEMU (TCG on this kind of host), no mocks.

One guest booted for the module (``vm``) serves the tests that leave it
healthy; one snapshot of it (``snap``) feeds cheap clones to the tests that
wreck their guest (panic, killed QEMU, hung agent). Skipped, with the reason
printed, only when QEMU or the guest kernel is missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierbox.errors import (
    SandboxDeadError,
    SandboxError,
    SnapshotError,
    SpecError,
    UsageError,
)
from tierbox.paths import sandboxes_dir
from tierbox.spec import Limits, SandboxSpec, TerminationKind
from tierbox.tiers import _state, get_tier
from tierbox.tiers.base import SnapshotRef
from tierbox.tiers.microvm import MicroVMInstance, MicroVMTier
from tierbox.vmm import artifacts, qemu
from tierbox.vmm.snapshot import sha256_file

pytestmark = pytest.mark.timeout(600)


def _require_microvm() -> MicroVMTier:
    if qemu.qemu_path() is None:
        print("microvm tests skipped: qemu-system-x86_64 is not installed")
        pytest.skip("qemu-system-x86_64 is not installed (make setup)")
    if artifacts.load_kernel() is None:
        print("microvm tests skipped: the guest kernel is not built")
        pytest.skip("microVM guest kernel not built (make setup)")
    tier = get_tier("microvm")
    assert isinstance(tier, MicroVMTier)
    a = tier.available()
    assert a.available, a.reason
    return tier


def _spec(**limits: object) -> SandboxSpec:
    base: dict[str, object] = {"memory_mib": 128, "pids": 64, "timeout_s": 30.0}
    base.update(limits)
    return SandboxSpec(limits=Limits(**base))  # type: ignore[arg-type]


def _our_qemus() -> set[int]:
    """QEMUs this test process started (other runs on the host are not ours)."""
    out = set()
    for pid in qemu.find_marked_qemus(sandboxes_dir()).values():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
            out.add(pid)
    return out


@pytest.fixture(scope="module")
def tier() -> MicroVMTier:
    return _require_microvm()


@pytest.fixture(scope="module")
def vm(tier: MicroVMTier) -> Iterator[MicroVMInstance]:
    inst = tier.create(_spec())
    try:
        yield inst
    finally:
        inst.close()
    # nothing of this module's guests may be left on the host
    assert _our_qemus() == set()
    assert not inst.files.dir.exists()
    assert inst.ram_path is not None and not inst.ram_path.exists()


@pytest.fixture(scope="module")
def snap(vm: MicroVMInstance) -> Iterator[SnapshotRef]:
    vm.put_file("/tmp/snapshot-marker", b"from the snapshot\n")
    ref = vm.snapshot()
    try:
        yield ref
    finally:
        shutil.rmtree(ref.path, ignore_errors=True)


# ---- the guest is a different machine ------------------------------------------------


def test_guest_runs_its_own_kernel(vm: MicroVMInstance) -> None:
    r = vm.exec(["uname", "-r"])
    assert r.ok, r.stderr
    guest = r.stdout.decode().strip()
    kernel = artifacts.load_kernel()
    assert kernel is not None
    assert guest == kernel.release
    assert guest != os.uname().release


def test_exit_codes_output_stdin_env(vm: MicroVMInstance) -> None:
    r = vm.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 7)
    assert r.termination.kind is TerminationKind.EXITED
    assert vm.exec(["true"]).exit_code == 0
    assert vm.exec(["cat"], stdin=b"x" * 300_000).stdout == b"x" * 300_000
    assert vm.exec(["sh", "-c", "echo $GREETING"], env={"GREETING": "hi"}).stdout == b"hi\n"
    r = vm.exec(["sh", "-c", "kill -TERM $$"])
    assert r.termination.kind is TerminationKind.SIGNALED
    assert r.termination.signal == signal.SIGTERM
    assert vm.exec(["id", "-u"]).stdout == b"65534\n"  # non-root by default
    r = vm.exec(["no-such-program"])  # a result, as on every tier
    assert r.exit_code == 127 and b"command not found" in r.stderr, r
    with pytest.raises(UsageError):
        vm.exec([])


def test_put_get_list_files(vm: MicroVMInstance) -> None:
    data = os.urandom(700_000)
    vm.put_file("/tmp/sub/dir/blob.bin", data, mode=0o600)
    assert vm.get_file("/tmp/sub/dir/blob.bin") == data
    assert "blob.bin" in vm.list_dir("/tmp/sub/dir")
    assert vm.exec(["stat", "-c", "%a %u", "/tmp/sub/dir/blob.bin"]).stdout == b"600 65534\n"
    vm.exec(["sh", "-c", "echo made inside > /tmp/out.txt"])
    assert vm.get_file("/tmp/out.txt") == b"made inside\n"
    with pytest.raises(SandboxError, match="No such file"):
        vm.get_file("/tmp/does-not-exist")
    # paths resolve inside the guest root, never the agent's own
    vm.put_file("../../../../tmp/escape.txt", b"x")
    assert vm.exec(["cat", "/tmp/escape.txt"]).stdout == b"x"


def test_output_disk_and_cpu_limits(tier: MicroVMTier) -> None:
    limits = Limits(memory_mib=96, timeout_s=30, output_bytes=4096, disk_mib=8, cpus=1.5)
    inst = tier.create(SandboxSpec(limits=limits))
    try:
        r = inst.exec(["yes"])
        assert r.termination.kind is TerminationKind.OUTPUT_LIMIT
        assert len(r.stdout) == 4096 and r.stdout_truncated
        assert inst.exec(["echo", "still fine"]).stdout == b"still fine\n"
        # disk_mib caps the writable layer
        r = inst.exec(["dd", "if=/dev/zero", "of=/tmp/big", "bs=1M", "count=20"])
        assert r.exit_code != 0 and b"No space left" in r.stderr
        # cpus: vCPUs rounded up, and a CFS quota on QEMU's cgroup
        assert inst.exec(["nproc"]).stdout == b"2\n"
        assert inst.cgroup is not None
        cpu_dirs = [d for c, d in inst.cgroup.dirs().items() if c in ("cpu", "")]
        quota = [
            (d / f).read_text().split()[0]
            for d in cpu_dirs
            for f in ("cpu.cfs_quota_us", "cpu.max")
            if (d / f).exists()
        ]
        assert quota == ["150000"]
        assert str(inst.proc.pid) in (cpu_dirs[0] / "cgroup.procs").read_text().split()
    finally:
        inst.close()


def test_network_other_than_none_is_refused(tier: MicroVMTier) -> None:
    from tierbox.errors import NotSupportedError
    from tierbox.spec import NetworkPolicy

    with pytest.raises(NotSupportedError, match="microvm tier cannot give network=host"):
        tier.create(SandboxSpec(network=NetworkPolicy.HOST))


def test_stats_and_limits(vm: MicroVMInstance) -> None:
    st = vm.stats()
    assert st.memory_bytes is not None and st.memory_bytes > 10 * 1024 * 1024
    assert st.memory_peak_bytes is not None and st.memory_peak_bytes >= st.memory_bytes
    assert st.cpu_s is not None and st.cpu_s > 0
    assert st.pids is not None and st.pids >= 1
    assert st.oom_kills is not None
    total_kib = int(vm.guest_stats()["MemTotal"])
    assert 64 * 1024 < total_kib <= 128 * 1024  # memory_mib=128 is the guest's RAM


def test_too_little_memory_is_refused(tier: MicroVMTier) -> None:
    with pytest.raises(SpecError, match="at least"):
        tier.create(_spec(memory_mib=qemu.MIN_MEMORY_MIB - 8))


# ---- isolation -----------------------------------------------------------------------


def test_host_files_processes_network_invisible(vm: MicroVMInstance, tmp_path: Path) -> None:
    marker = tmp_path / f"host-secret-{os.getpid()}"
    marker.write_text("secret")
    r = vm.exec(["sh", "-c", f"cat {marker}; ls /work /root/.local 2>&1; echo done"])
    assert b"secret" not in r.stdout and r.stdout.endswith(b"done\n")
    # processes: the guest sees only its own (no QEMU, no pytest)
    ps = vm.exec(["ps", "-o", "comm"]).stdout.decode()
    assert "qemu" not in ps and "pytest" not in ps and "python" not in ps
    guest_pids = vm.exec(["sh", "-c", "ls -d /proc/[0-9]* | wc -l"]).stdout
    assert int(guest_pids) < 100
    # network: loopback only, and the guest's 127.0.0.1 is not the host's
    assert vm.exec(["ls", "/sys/class/net"]).stdout.split() == [b"lo"]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        r = vm.exec(["sh", "-c", f"echo hi | nc -w 2 127.0.0.1 {port}; echo rc=$?"])
        assert b"rc=0" not in r.stdout
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


def test_image_root_disk_is_read_only_under_a_writable_overlay(tier: MicroVMTier) -> None:
    from tierbox.images.store import default_store

    default_store().ensure_busybox()
    inst = tier.create(
        SandboxSpec(image="busybox", limits=Limits(memory_mib=96, timeout_s=30), user="0")
    )
    try:
        r = inst.exec(["sh", "-c", "echo changed > /etc/motd && cat /etc/motd && uname -r"])
        assert r.ok, r.stderr
        assert r.stdout.startswith(b"changed\n")
        mounts = inst.exec(["cat", "/proc/mounts"]).stdout.decode()
        assert mounts.splitlines()[0].startswith("overlay / overlay")
        disk = inst.exec(["sh", "-c", "grep -c vda /proc/partitions"]).stdout
        assert disk.strip() == b"1"
        assert inst.disk_info is not None and inst.disk_info["image"] == "busybox:latest"
    finally:
        inst.close()
    # the disk image itself is untouched: a fresh guest sees no change
    again = tier.create(SandboxSpec(image="busybox", limits=Limits(memory_mib=96, timeout_s=30)))
    try:
        assert b"changed" not in again.exec(["sh", "-c", "cat /etc/motd; true"]).stdout
    finally:
        again.close()


# ---- faults: each must end with the right Termination, quickly ------------------------


def test_infinite_loop_times_out(vm: MicroVMInstance) -> None:
    t0 = time.monotonic()
    r = vm.exec(["sh", "-c", "while :; do :; done"], timeout_s=2)
    assert r.termination.kind is TerminationKind.TIMED_OUT
    assert r.termination.evidence["timeout_s"] == 2
    assert time.monotonic() - t0 < 8
    assert vm.exec(["echo", "alive"]).stdout == b"alive\n"


def test_fork_bomb_hits_the_pids_limit(vm: MicroVMInstance) -> None:
    t0 = time.monotonic()
    r = vm.exec(["sh", "-c", "b() { b | b & }; b; sleep 100"], timeout_s=6)
    assert r.termination.kind is TerminationKind.TIMED_OUT
    assert r.termination.evidence.get("pids_max_hits", 0) > 0
    assert r.termination.evidence["pids_limit"] == 64
    assert time.monotonic() - t0 < 20
    # every process of the bomb is gone and the guest is healthy
    assert vm.exec(["sh", "-c", "ps | grep -c ' b$' || true"]).stdout.strip() in (b"0", b"")
    assert vm.exec(["echo", "alive"]).stdout == b"alive\n"


def test_memory_bomb_is_oom_killed_with_guest_evidence(vm: MicroVMInstance) -> None:
    before = vm.stats().oom_kills or 0
    t0 = time.monotonic()
    r = vm.exec(["awk", 'BEGIN { while (1) a[i++] = sprintf("%0500d", i) }'], timeout_s=60)
    assert r.termination.kind is TerminationKind.OOM_KILLED, r.termination
    ev = r.termination.evidence
    assert ev["oom_kill"] >= 1 and ev["limit_mib"] == 128
    assert "Killed process" in ev.get("guest_kernel", "") or "oom" in ev.get("guest_kernel", "")
    assert r.exit_code == 137
    assert time.monotonic() - t0 < 60
    assert (vm.stats().oom_kills or 0) > before
    assert vm.exec(["echo", "alive"]).stdout == b"alive\n"


def test_kernel_panic_ends_the_sandbox_with_evidence(tier: MicroVMTier, snap: SnapshotRef) -> None:
    (inst,) = tier.clone(snap)
    try:
        # the snapshot's user is nobody; the panic needs guest root
        inst.put_file("/tmp/panic.sh", b"echo c > /proc/sysrq-trigger\n", mode=0o755)
        inst.guest = dataclasses.replace(inst.guest, uid=0, gid=0)
        t0 = time.monotonic()
        r = inst.exec(["sh", "/tmp/panic.sh"], timeout_s=20)
        assert time.monotonic() - t0 < 20
        assert r.termination.kind is TerminationKind.SIGNALED
        assert "Kernel panic" in r.termination.evidence["guest_kernel_panic"]
        with pytest.raises(SandboxDeadError, match="close it and create a new one"):
            inst.exec(["true"])
    finally:
        term = inst.close()
    assert term is not None and "guest_kernel_panic" in term.evidence
    assert inst.close() is None  # idempotent


def test_qemu_killed_from_outside(tier: MicroVMTier, snap: SnapshotRef) -> None:
    (inst,) = tier.clone(snap)
    try:
        threading.Timer(1.0, os.kill, (inst.proc.pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        r = inst.exec(["sleep", "30"], timeout_s=30)
        assert time.monotonic() - t0 < 10
        assert r.termination.kind is TerminationKind.SIGNALED
        assert "signal 9" in r.termination.evidence["vmm"]
        with pytest.raises(SandboxDeadError, match="killed by signal 9"):
            inst.get_file("/tmp/snapshot-marker")
    finally:
        inst.close()


def test_close_from_another_thread_ends_a_running_exec(
    tier: MicroVMTier, snap: SnapshotRef
) -> None:
    (inst,) = tier.clone(snap)
    threading.Timer(1.0, inst.close).start()
    t0 = time.monotonic()
    r = inst.exec(["sleep", "30"], timeout_s=30)
    assert time.monotonic() - t0 < 10
    assert r.termination.kind is TerminationKind.SIGNALED
    assert "closed" in r.termination.evidence["vmm"]
    time.sleep(0.5)
    assert not inst.files.dir.exists()


def test_agent_never_answers_at_boot() -> None:
    _require_microvm()
    mute = MicroVMTier(start_agent=False, boot_timeout_s=8)
    before = _our_qemus()
    t0 = time.monotonic()
    with pytest.raises(SandboxError, match="agent did not answer") as err:
        mute.create(_spec())
    assert time.monotonic() - t0 < 15
    assert "agent disabled" in str(err.value)  # the console tail is in the message
    assert _our_qemus() <= before


def test_agent_stops_answering_mid_exec(snap: SnapshotRef) -> None:
    impatient = MicroVMTier(exec_grace_s=1.0)
    (inst,) = impatient.clone(snap)
    try:
        inst._qmp_client().execute("stop")  # the guest freezes: nothing answers
        t0 = time.monotonic()
        r = inst.exec(["echo", "never"], timeout_s=1)
        assert time.monotonic() - t0 < 8
        assert r.termination.kind is TerminationKind.TIMED_OUT
        assert "stopped answering" in r.termination.evidence["guest"]
        assert not inst.proc.alive()  # a guest that hangs is not left running
    finally:
        inst.close()


# ---- snapshots and clones ------------------------------------------------------------


def test_restore_brings_back_the_snapshot_state(
    tier: MicroVMTier, vm: MicroVMInstance, snap: SnapshotRef
) -> None:
    vm.put_file("/tmp/snapshot-marker", b"changed after the snapshot\n")
    t0 = time.monotonic()
    inst = tier.restore(snap)
    try:
        r = inst.exec(["cat", "/tmp/snapshot-marker"])
        assert r.stdout == b"from the snapshot\n"
        assert time.monotonic() - t0 < 5
        # the clock was set at restore
        guest_now = int(inst.exec(["date", "+%s"]).stdout)
        assert abs(guest_now - time.time()) < 5
    finally:
        inst.close()
    assert vm.get_file("/tmp/snapshot-marker") == b"changed after the snapshot\n"


def test_clones_are_independent_and_reseeded(tier: MicroVMTier, snap: SnapshotRef) -> None:
    clones = tier.clone(snap, count=3)
    try:
        assert len({c.id for c in clones}) == 3
        clones[0].put_file("/tmp/only-in-0", b"0")
        names = [c.list_dir("/tmp") for c in clones]
        assert "only-in-0" in names[0] and "only-in-0" not in names[1]
        rand = [c.exec(["head", "-c", "16", "/dev/urandom"]).stdout for c in clones]
        assert len(set(rand)) == 3
        for c in clones:  # RAM is a private copy-on-write map of the snapshot file
            maps = Path(f"/proc/{c.proc.pid}/maps").read_text()
            assert "ram.bin" in maps
    finally:
        for c in clones:
            c.close()


def test_snapshot_of_a_restored_guest(tier: MicroVMTier, snap: SnapshotRef) -> None:
    (inst,) = tier.clone(snap)
    second: SnapshotRef | None = None
    try:
        inst.put_file("/tmp/generation", b"2")
        second = inst.snapshot()
        (grandchild,) = tier.clone(second)
        try:
            assert grandchild.get_file("/tmp/generation") == b"2"
            assert grandchild.get_file("/tmp/snapshot-marker") == b"from the snapshot\n"
        finally:
            grandchild.close()
    finally:
        inst.close()
        if second is not None:
            shutil.rmtree(second.path, ignore_errors=True)


def _copy_snapshot(snap: SnapshotRef, dest: Path) -> SnapshotRef:
    shutil.copytree(snap.path, dest)
    return SnapshotRef(tier="microvm", path=str(dest), meta=snap.meta)


def test_corrupted_or_truncated_snapshot_is_refused(
    tier: MicroVMTier, snap: SnapshotRef, tmp_path: Path
) -> None:
    before = _our_qemus()
    truncated = _copy_snapshot(snap, tmp_path / "truncated")
    state = Path(truncated.path) / "state.bin"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(SnapshotError, match="truncated"):
        tier.restore(truncated)

    flipped = _copy_snapshot(snap, tmp_path / "flipped")
    ram = Path(flipped.path) / "ram.bin"
    with open(ram, "r+b") as f:
        f.seek(4096 * 300)
        f.write(b"\xff" * 4096)
    with pytest.raises(SnapshotError, match="sha256"):
        tier.restore(flipped)

    # a stream that matches its (rewritten) manifest but is garbage: QEMU refuses
    # it and exits; we report that instead of waiting on a guest that never runs

    forged = _copy_snapshot(snap, tmp_path / "forged")
    fstate = Path(forged.path) / "state.bin"
    blob = bytearray(fstate.read_bytes())
    blob[200:400] = os.urandom(200)
    fstate.write_bytes(bytes(blob))
    mpath = Path(forged.path) / "manifest.json"
    m = json.loads(mpath.read_text())
    m["files"]["state.bin"]["sha256"] = sha256_file(fstate)
    mpath.write_text(json.dumps(m))
    t0 = time.monotonic()
    with pytest.raises(SnapshotError, match="could not load"):
        tier.restore(forged)
    assert time.monotonic() - t0 < 25
    assert _our_qemus() <= before

    with pytest.raises(SnapshotError, match="no manifest"):
        tier.restore(SnapshotRef(tier="microvm", path=str(tmp_path), meta={}))


# ---- cleanup -------------------------------------------------------------------------


def test_close_removes_everything(tier: MicroVMTier, snap: SnapshotRef) -> None:
    before_procs = _our_qemus()
    inst = tier.create(_spec(memory_mib=96))
    (clone,) = tier.clone(snap)
    d, pid, ram = inst.files.dir, inst.proc.pid, inst.ram_path
    assert ram is not None and ram.exists() and d.is_dir()
    inst.close()
    clone.close()
    assert not d.exists() and not ram.exists() and not clone.files.dir.exists()
    assert not Path(f"/proc/{pid}").exists()
    assert _our_qemus() <= before_procs
    assert inst.close() is None


def test_reap_removes_a_crashed_runs_leftovers(
    tier: MicroVMTier, vm: MicroVMInstance, snap: SnapshotRef
) -> None:
    (orphan,) = tier.clone(snap)
    crashed = tier.create(_spec(memory_mib=96))
    orphan_dir, crashed_dir = orphan.files.dir, crashed.files.dir
    # the owner "crashes": every other sandbox on this host (other runs'
    # too) is still live, these two are not
    live = _state.live_ids() - {orphan.id, crashed.id}
    removed = tier.reap(live | {vm.id})
    assert any(orphan.id in line for line in removed)
    assert any(crashed.id in line for line in removed)
    time.sleep(0.2)
    assert not orphan.proc.alive() and not crashed.proc.alive()
    assert not orphan_dir.exists() and not crashed_dir.exists()
    assert crashed.ram_path is not None and not crashed.ram_path.exists()
    assert vm.exec(["true"]).ok  # the live one is untouched
    orphan.close()
    crashed.close()


def test_cli_runs_busybox_in_its_own_kernel() -> None:
    _require_microvm()
    from tierbox.images.store import default_store

    default_store().ensure_busybox()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tierbox.cli",
            "run",
            "--tier",
            "microvm",
            "busybox",
            "--",
            "uname",
            "-r",
        ],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    kernel = artifacts.load_kernel()
    assert kernel is not None
    assert proc.stdout.decode().strip() == kernel.release != os.uname().release


@pytest.mark.slow
def test_python_image_runs_in_the_guest(tier: MicroVMTier) -> None:
    from tierbox.errors import ImageNotFoundError
    from tierbox.images.store import default_store

    try:
        default_store().resolve("python:3.11")
    except ImageNotFoundError:
        default_store().bootstrap("python:3.11")
    r = tier.run(
        SandboxSpec(image="python:3.11", limits=Limits(memory_mib=256, timeout_s=120)),
        ["python3", "-c", "print(2+2)"],
    )
    assert r.ok, r.stderr
    assert r.stdout == b"4\n"
