"""Many create -> exec -> close cycles through ``Sandbox`` on one tier, then
a look for anything of them left on the host once the background teardown
is done (SPECIFICATION.md, "Long-lived sandboxes": zero leftovers after
1,000 cycles).

Promise: 0 leftovers (directory, trash entry, cgroup, mount, process or the
runtime's state of any of the sandboxes made). Also printed: the time per
cycle and close()'s p50/p99.
Usage: python benchmarks/bench_cycles.py [--tier container] [--cycles 1000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Promise, p50, report
from tierbox import Sandbox, wait_closed
from tierbox.host import mntns
from tierbox.host.cgroups import CGROUP_ROOT
from tierbox.paths import MARKER, run_dir, sandboxes_dir


def leftovers(ids: set[str]) -> list[str]:
    """Anything on the host that names one of ``ids``."""
    base = sandboxes_dir()
    found = [str(p) for p in base.iterdir() if any(i in p.name for i in ids)]
    found += [str(p) for p in (base / ".trash").glob("*") if any(i in p.name for i in ids)]
    found += [str(p) for p in CGROUP_ROOT.glob(f"*/{MARKER}/*") if p.name in ids]
    found += [str(m) for m in mntns.mounts_under(base) if any(i in str(m) for i in ids)]
    for runtime in ("crun", "runsc"):
        state = run_dir() / runtime
        found += [str(p) for p in state.glob("*") if any(i in p.name for i in ids)]
    procs = subprocess.run(["pgrep", "-af", MARKER], capture_output=True, text=True).stdout
    found += [line for line in procs.splitlines() if any(i in line for i in ids)]
    return found


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tier", default="container", help="the tier (default: container)")
    ap.add_argument("--cycles", type=int, default=1000, help="how many (default: 1000)")
    args = ap.parse_args()
    if args.cycles < 1:
        ap.error(f"--cycles must be positive, not {args.cycles}")
    image = None if args.tier == "process" else "busybox"
    ids: set[str] = set()
    closes: list[float] = []
    started = time.monotonic()
    for _ in range(args.cycles):
        sb = Sandbox.create(image, tier=args.tier, memory_mib=32, pids=16)
        if not sb.run(["true"]).ok:
            raise SystemExit(f"{args.tier}: `true` failed in sandbox {sb.id}")
        ids.add(sb.id)
        t0 = time.perf_counter()
        sb.close()
        closes.append(time.perf_counter() - t0)
    elapsed_s = time.monotonic() - started
    if not wait_closed(timeout_s=300):
        raise SystemExit("background teardown still running after 300 s")
    left = leftovers(ids)
    closes.sort()
    print(
        f"{args.cycles} {args.tier} cycles in {elapsed_s:.1f} s "
        f"({elapsed_s / args.cycles * 1e3:.1f} ms each); close() p50 {p50(closes) * 1e3:.2f} ms, "
        f"p99 {closes[int(len(closes) * 0.99)] * 1e3:.2f} ms"
    )
    for item in left[:20]:
        print(f"  left: {item}")
    return report([Promise(f"{args.tier} leftovers after {args.cycles} cycles", len(left), 0, "")])


if __name__ == "__main__":
    sys.exit(main())
