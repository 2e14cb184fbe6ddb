"""The vm tier (libvirt + QEMU q35): create, snapshot, revert, against libvirt's own revert.

Promises (SPECIFICATION.md), on the domain type the tier picked (TCG on hosts
without usable KVM; printed):
- create -> first exec result (busybox image, 512 MiB guest): p50 <= 3.0 s;
- snapshot create (internal, memory + disk, running 512 MiB guest): p50 <= 0.5 s;
- revert -> first exec result: p50 <= 1.0 s, and >= 2x faster than
  ``virsh snapshot-revert`` of the same snapshot followed by the same exec,
  measured in the same run (the two alternate, so noise hits both alike).

Also printed, not promised: a cold boot (no saved template) -> first exec,
for reference. The first create of a shape cold-boots and saves its template;
this benchmark builds the template first (warm-up) so every measured create
is the steady state.

Usage: python benchmarks/bench_vm.py [N]
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Promise, p50, p95, report, runs_arg
from tierbox.spec import Limits, SandboxSpec
from tierbox.tiers import get_tier
from tierbox.tiers.vm import VMInstance, VMTier

SPEC = SandboxSpec(image="busybox:latest", limits=Limits(memory_mib=512, timeout_s=60))


def first_exec(inst: VMInstance) -> None:
    r = inst.exec(["cat", "/srv_app"])
    if not r.ok:
        raise SystemExit(f"exec failed: {r.termination.describe()} {r.stderr!r}")


def timed_create(tier: VMTier, *, template: bool) -> float:
    t0 = time.perf_counter()
    inst = tier.create_vm(SPEC, template=template)
    try:
        r = inst.exec(["true"])
        took = time.perf_counter() - t0
        if not r.ok:
            raise SystemExit(f"first exec failed: {r.termination.describe()}")
    finally:
        inst.close()
    return took


def main() -> int:
    n = runs_arg(__doc__, 5)
    tier = get_tier("vm")
    assert isinstance(tier, VMTier)
    a = tier.available()
    if not a.available:
        print(f"vm tier unavailable: {a.reason}")
        return 1
    accel, why = tier.accelerator()
    dtype = "kvm" if accel == "kvm" else "qemu (TCG)"
    print(f"domain type {dtype}: {why}")
    t0 = time.perf_counter()
    tier.build_template(SPEC)
    print(f"warm-up: template of busybox / 512 MiB ready after {time.perf_counter() - t0:.1f} s")

    # 1. create -> first exec
    creates = [timed_create(tier, template=True) for _ in range(n)]
    colds = [timed_create(tier, template=False) for _ in range(max(2, n // 2))]
    print(
        f"create -> first exec: p50 {p50(creates):.3f} s, p95 {p95(creates):.3f} s "
        f"(cold boot, no template: p50 {p50(colds):.3f} s)"
    )

    inst = tier.create_vm(SPEC)
    try:
        inst.exec(["sh", "-c", "echo base > /srv_app"])
        # 2. snapshot create
        snaps = []
        for i in range(n + 2):
            t0 = time.perf_counter()
            inst.create_snapshot(f"bench-{i}")
            snaps.append(time.perf_counter() - t0)
            inst.delete_snapshot(f"bench-{i}")
        print(f"snapshot create: p50 {p50(snaps):.3f} s, p95 {p95(snaps):.3f} s")

        # 3. revert -> first exec, tierbox against virsh snapshot-revert, alternating
        inst.create_snapshot("bench-base", "bench_vm.py revert base")
        ours: list[float] = []
        virsh: list[float] = []
        methods = set()
        for _ in range(n):
            inst.exec(["sh", "-c", "echo changed > /srv_app"])
            t0 = time.perf_counter()
            t = inst.revert_timed("bench-base")
            first_exec(inst)
            ours.append(time.perf_counter() - t0)
            methods.add(str(t["method"]))
            inst.exec(["sh", "-c", "echo changed > /srv_app"])
            t0 = time.perf_counter()
            argv = ["virsh", "-c", "qemu:///system", "snapshot-revert"]
            subprocess.run([*argv, inst.domain_name, "bench-base"], check=True, capture_output=True)
            first_exec(inst)
            virsh.append(time.perf_counter() - t0)
        print(
            f"revert -> first exec: tierbox p50 {p50(ours):.3f} s ({'/'.join(sorted(methods))}), "
            f"virsh snapshot-revert p50 {p50(virsh):.3f} s, "
            f"ratio {p50(virsh) / p50(ours):.1f}x"
        )
        inst.delete_snapshot("bench-base")
    finally:
        inst.close()

    return report(
        [
            Promise(f"create -> first exec, busybox, 512 MiB, {dtype}", p50(creates), 3.0, " s"),
            Promise(f"snapshot create, 512 MiB guest, {dtype}", p50(snaps), 0.5, " s"),
            Promise(f"revert -> first exec, {dtype}", p50(ours), 1.0, " s"),
            Promise(
                "revert -> first exec vs virsh snapshot-revert (speed-up)",
                p50(virsh) / p50(ours),
                2.0,
                "x",
                higher_is_better=True,
            ),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
