"""What the microVM's VMM jail costs (tierbox.vmm.jail): each QEMU as its
own uid inside bubblewrap's namespaces, against QEMU as tierbox's own user
(root) in the host's namespaces, in one run.

Promises (SPECIFICATION.md), on the accelerator the tier picked:
- cold create -> first exec result (busybox image), jailed / unjailed:
  p50 ratio <= 1.1;
- clone -> first exec result, jailed / unjailed: p50 ratio <= 1.1.

Jailed and unjailed runs alternate in one loop (``_common.interleaved``) so
noise on this shared machine hits both alike; the unjailed runs set the
benchmark knob ``TIERBOX_BENCH_NO_VMM_JAIL=1`` (read only by
``tierbox.vmm.jail.enabled``) around each call.
Usage: python benchmarks/bench_jail.py [N]
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Promise, interleaved, p50, report, runs_arg
from tierbox.images.store import default_store
from tierbox.spec import Limits, SandboxSpec
from tierbox.tiers import get_tier
from tierbox.tiers.microvm import MicroVMTier
from tierbox.vmm import jail

SPEC = SandboxSpec(image="busybox", limits=Limits(memory_mib=128, timeout_s=30))
RATIO_TARGET = 1.1


def _unjailed(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        os.environ[jail.NO_JAIL_ENV] = "1"
        try:
            return fn()
        finally:
            del os.environ[jail.NO_JAIL_ENV]

    return run


def main() -> int:
    n = runs_arg(__doc__, 10)
    tier = get_tier("microvm")
    assert isinstance(tier, MicroVMTier)
    a = tier.available()
    if not a.available:
        print(f"SKIP  microvm tier unavailable: {a.reason}")
        return 0
    print(f"microvm: {a.reason}")
    default_store().ensure_busybox()
    accel, _ = tier.accelerator()

    def cold() -> None:
        inst = tier.create(SPEC)
        try:
            assert inst.exec(["true"]).ok
        finally:
            inst.close()

    base = tier.create(SPEC)
    try:
        snap = base.snapshot()
    finally:
        base.close()

    def clone() -> None:
        (inst,) = tier.clone(snap)
        try:
            assert inst.exec(["true"]).ok
        finally:
            inst.close()

    try:
        cold_s = interleaved({"jailed": cold, "unjailed": _unjailed(cold)}, n, warmup=1)
        clone_s = interleaved({"jailed": clone, "unjailed": _unjailed(clone)}, n, warmup=2)
    finally:
        shutil.rmtree(snap.path, ignore_errors=True)
    promises = []
    for what, times in (("cold create -> first exec", cold_s), ("clone -> first exec", clone_s)):
        j, u = p50(times["jailed"]), p50(times["unjailed"])
        print(
            f"{what} ({accel}, n={n}): jailed p50 {j * 1000:.0f} ms, "
            f"unjailed p50 {u * 1000:.0f} ms, ratio {j / u:.3f}"
        )
        promises.append(Promise(f"{what}, jailed/unjailed p50", j / u, RATIO_TARGET, "x"))
    return report(promises)


if __name__ == "__main__":
    sys.exit(main())
