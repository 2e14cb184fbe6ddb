"""What the process tier's own network namespace costs (``network="none"``).

``none`` gives each process sandbox a network namespace holding only ``lo``,
made with its private mount namespace in one ``unshare`` and pinned in the
sandbox directory; ``host`` shares the host's, so it is the baseline. The
kernel frees a namespace asynchronously after close (a kernel worker), so
that part of the cost lands on the machine, not on ``close``.

Promises (SPECIFICATION.md):
- create, network none vs host: p50 <= 1.5 ms more;
- one-shot run, none vs host: p50 <= 1.2x (the namespace lives in the pooled
  slot's thread, made once per slot, not per run).

Both policies alternate in one loop, so noise hits them alike. Usage:
python benchmarks/bench_process_network.py [N]
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Promise, interleaved, p50, p95, report, runs_arg
from tierbox import make_spec
from tierbox.spec import SandboxSpec
from tierbox.tiers import Instance, get_tier


def main() -> int:
    n = runs_arg(__doc__, 40)
    tier = get_tier("process")
    specs = {
        net: tier.prepare(make_spec(None, memory_mib=128, pids=64, timeout_s=30, network=net))
        for net in ("none", "host")
    }
    made: list[Instance] = []

    def create(spec: SandboxSpec) -> None:
        made.append(tier.create(spec))

    t = interleaved({net: partial(create, spec) for net, spec in specs.items()}, n)
    for inst in made:
        inst.close()
    one = interleaved(
        {net: partial(tier.run, spec, ["/bin/true"]) for net, spec in specs.items()}, n
    )
    for title, res in (("create", t), ("one-shot /bin/true", one)):
        print(title)
        for net, xs in res.items():
            print(f"  {net:5s} p50 {p50(xs) * 1000:6.2f} ms  p95 {p95(xs) * 1000:6.2f} ms")
    return report(
        [
            Promise(
                "process create, none - host",
                (p50(t["none"]) - p50(t["host"])) * 1000,
                1.5,
                "ms",
            ),
            Promise("process one-shot, none / host", p50(one["none"]) / p50(one["host"]), 1.2, "x"),
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
