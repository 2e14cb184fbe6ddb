"""The microvm tier: cold start, restore/clone, idle clone memory, 50 clones.

Promises (SPECIFICATION.md), on the accelerator the tier picked (printed on
every line; TCG on hosts without usable KVM):
- cold create -> first exec result (busybox image): p50 <= 2.0 s under TCG;
- restore/clone -> first exec result: p50 <= 80 ms under TCG, printed with
  the raw QEMU restore of the same snapshot (spawn ``-incoming`` + load the
  state stream + ``cont``, no agent) measured in the same run as the ratio base;
- PSS of an idle clone while 50 clones of one snapshot run: p50 <= 40 MiB;
- 50 clones at once: all 50 answer an exec.

Raw and tierbox restores alternate in one loop so noise on this shared
machine hits both alike. Usage: python benchmarks/bench_microvm.py [N]
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import p50, p95, runs_arg
from tierbox.images.store import default_store
from tierbox.spec import Limits, SandboxSpec
from tierbox.tiers import get_tier
from tierbox.tiers.microvm import MicroVMTier
from tierbox.vmm import artifacts, qemu
from tierbox.vmm.qmp import QMPClient, load_stream
from tierbox.vmm.snapshot import RAM, STATE

MIB = 1024 * 1024
SPEC = SandboxSpec(image="busybox", limits=Limits(memory_mib=128, pids=64, timeout_s=30))
CLONES = 50


@dataclass
class Line:
    """One promise: what, measured, target (an upper bound), unit, accelerator."""

    promise: str
    measured: float
    target: float
    unit: str
    accel: str

    @property
    def ok(self) -> bool:
        return self.measured <= self.target

    def __str__(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        return (
            f"{verdict}  {self.promise}: measured {self.measured:.3f}{self.unit}, "
            f"target <= {self.target}{self.unit}, accelerator {self.accel}"
        )


def pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def raw_boot(tier: MicroVMTier, disk: Path) -> float:
    """QEMU alone booting the same kernel, initramfs and disk until the agent
    prints that it is ready on the console. Seconds."""
    g = artifacts.ensure_guest()
    d = Path(tempfile.mkdtemp(prefix="tierbox-raw-", dir="/run"))
    files = qemu.Files(d)
    accel, _ = tier.accelerator()
    machine = qemu.Machine(memory_mib=128, vcpus=1, accel=accel, disk=str(disk), rw_mib=0)
    ram = qemu.ram_file(f"raw{os.getpid()}")  # tmpfs, as tierbox's
    argv = qemu.boot_argv(
        "raw", machine, files, vmlinux=g.kernel.vmlinux, initramfs=g.initramfs.path,
        hz=g.kernel.hz, ram_path=ram,
    )  # fmt: skip
    t0 = time.perf_counter()
    proc = qemu.QemuProcess.start(argv, files)
    try:
        while b"ready on" not in (files.console.read_bytes() if files.console.exists() else b""):
            if not proc.alive() or time.perf_counter() - t0 > 60:
                raise RuntimeError(f"raw boot failed: {proc.console_tail()}")
            time.sleep(0.002)
        return time.perf_counter() - t0
    finally:
        proc.kill()
        ram.unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)


def raw_restore(tier: MicroVMTier, snap_dir: Path, machine: qemu.Machine) -> float:
    """QEMU alone restoring the snapshot: spawn, load the stream, cont. Seconds."""
    d = Path(tempfile.mkdtemp(prefix="tierbox-raw-", dir="/run"))
    files = qemu.Files(d)
    t0 = time.perf_counter()
    argv = qemu.restore_argv("raw", machine, files, ram_path=snap_dir / RAM, ram_share=False)
    proc = qemu.QemuProcess.start(argv, files)
    try:
        client = QMPClient(files.qmp)
        client.connect(alive=proc.alive)
        load_stream(client, snap_dir / STATE, ignore_shared=True, deadline=time.monotonic() + 30)
        client.execute("cont")
        elapsed = time.perf_counter() - t0
        client.close()
        return elapsed
    finally:
        proc.kill()
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    n = runs_arg(__doc__, 7)
    tier = get_tier("microvm")
    a = tier.available()
    if not a.available:
        print(f"SKIP  microvm tier unavailable: {a.reason}")
        return 0
    assert isinstance(tier, MicroVMTier)
    accel, why = tier.accelerator()
    print(f"microvm: {a.reason}")
    default_store().ensure_busybox()
    lines: list[Line] = []
    cold_target = 2.0 if accel == "tcg" else 0.5
    restore_target = 0.080 if accel == "tcg" else 0.030

    # ---- cold create -> first exec ----------------------------------------------------
    tier.create(SPEC).close()  # warm: the root disk is built on first use
    cold: list[float] = []
    raw_cold: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        inst = tier.create(SPEC)
        r = inst.exec(["true"])
        cold.append(time.perf_counter() - t0)
        disk = Path(inst.machine.disk or "")
        inst.close()
        assert r.ok, r.termination.describe()
        raw_cold.append(raw_boot(tier, disk))
    print(
        f"cold create -> first exec: p50 {p50(cold):.3f} s, p95 {p95(cold):.3f} s (n={n}); "
        f"raw QEMU boot of the same guest to its agent's ready line: p50 {p50(raw_cold):.3f} s; "
        f"ratio {p50(cold) / p50(raw_cold):.2f}x"
    )
    lines.append(Line("cold create -> first exec result p50", p50(cold), cold_target, " s", accel))

    # ---- restore -> first exec, against raw QEMU restore -------------------------------
    base = tier.create(SPEC)
    try:
        base.exec(["true"])
        snap = base.snapshot()
        print(f"snapshot: {snap.meta['timings_s']}")
    finally:
        base.close()
    snap_dir = Path(snap.path)
    try:
        machine = base.machine
        restores: list[float] = []
        ready: list[float] = []
        raws: list[float] = []
        for i in range(max(n * 3, 15)):
            if i % 2 == 0:
                raws.append(raw_restore(tier, snap_dir, machine))
            t0 = time.perf_counter()
            inst = tier.restore(snap)
            ready.append(time.perf_counter() - t0)
            r = inst.exec(["true"])
            restores.append(time.perf_counter() - t0)
            inst.close()
            if i % 2 == 1:
                raws.append(raw_restore(tier, snap_dir, machine))
            assert r.ok, r.termination.describe()
        ratio = p50(restores) / p50(raws)
        print(
            f"restore -> first exec: p50 {p50(restores) * 1000:.1f} ms, p95 "
            f"{p95(restores) * 1000:.1f} ms; raw QEMU restore (spawn + load + cont): p50 "
            f"{p50(raws) * 1000:.1f} ms; ratio {ratio:.2f}x"
        )
        print(
            f"  of which restore() (QEMU, load, cont, clock + RNG sync): p50 "
            f"{p50(ready) * 1000:.1f} ms; the first exec in the restored guest: p50 "
            f"{(p50(restores) - p50(ready)) * 1000:.1f} ms (TCG translating cold code paths)"
        )
        lines.append(
            Line("restore -> first exec result p50", p50(restores), restore_target, " s", accel)
        )

        # ---- 50 clones at once, PSS of idle clones --------------------------------------
        t0 = time.perf_counter()
        clones = tier.clone(snap, count=CLONES)
        t_clone = time.perf_counter() - t0
        try:
            answered = sum(1 for c in clones if c.exec(["true"]).ok)
            t_all = time.perf_counter() - t0
            time.sleep(2.0)  # idle
            psses = [pss_bytes(c.proc.pid) / MIB for c in clones]
            total_pss = sum(psses)
        finally:
            for c in clones:
                c.close()
        print(
            f"{CLONES} clones: started in {t_clone:.2f} s, all answered an exec after "
            f"{t_all:.2f} s; {answered}/{CLONES} answered; idle PSS p50 "
            f"{statistics.median(psses):.1f} MiB, max {max(psses):.1f} MiB, total "
            f"{total_pss:.0f} MiB (guest RAM {machine.memory_mib} MiB each)"
        )
        pss_p50 = statistics.median(psses)
        lines.append(Line("PSS of an idle clone p50", pss_p50, 40.0, " MiB", accel))
        lines.append(
            Line(f"clones of {CLONES} not answering", float(CLONES - answered), 0.0, "", accel)
        )
    finally:
        shutil.rmtree(snap_dir, ignore_errors=True)

    print(f"accelerator: {accel} ({why}); host {os.uname().release}, {os.cpu_count()} cpus")
    print()
    for line in lines:
        print(line)
    return 0 if all(x.ok for x in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
