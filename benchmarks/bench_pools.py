"""Warm pools: claim -> first exec against making a sandbox, and a steady load.

Promises (SPECIFICATION.md), on the accelerator the microvm tier picked
(TCG on hosts without usable KVM):
- microVM: claim -> first exec result p50 <= 40 ms under TCG, and at least
  4x faster than ``Sandbox.restore(snap)`` -> first exec of the pool's own
  template snapshot, the two alternating in one loop;
- container: claim -> first exec result <= 0.5x ``Sandbox.create`` -> first
  exec, alternating in one loop;
- a steady load of 5 claims per second for 60 s against a microVM pool
  (arrivals on a fixed schedule, each claim runs ``true`` and closes its
  sandbox): p95 claim latency <= 100 ms after the first 10 s.

Between two claims of the first two loops the pool is given time to refill,
so each claim is a warm one (the steady-load run measures what happens when
it is not given that time). Usage: python benchmarks/bench_pools.py [N] [LOAD_S]
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import count_args, p50, p95
from tierbox import Sandbox
from tierbox.images.store import default_store
from tierbox.pools import Pool
from tierbox.tiers import get_tier
from tierbox.tiers.microvm import MicroVMTier

CMD = ["true"]


@dataclass
class Line:
    """One promise: what, measured, target, and which way it must hold."""

    promise: str
    measured: float
    target: float
    unit: str
    at_most: bool = True

    @property
    def ok(self) -> bool:
        return self.measured <= self.target if self.at_most else self.measured >= self.target

    def __str__(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        op = "<=" if self.at_most else ">="
        return (
            f"{verdict}  {self.promise}: measured {self.measured:.3f}{self.unit}, "
            f"target {op} {self.target}{self.unit}"
        )


def _wait_ready(pool: Pool, n: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pool.status()["ready"] < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"pool {pool.name} did not reach {n} ready: {pool.status()}")
        time.sleep(0.01)


def claim_to_result(pool: Pool) -> float:
    t0 = time.perf_counter()
    sb = pool.claim()
    r = sb.run(CMD)
    elapsed = time.perf_counter() - t0
    sb.close()
    assert r.ok, r.termination.describe()
    return elapsed


def microvm(n: int, accel: str) -> list[Line]:
    pool = Pool("busybox", "microvm", min_ready=2, max_size=4, memory_mib=128, name="bench-mvm")
    try:
        _wait_ready(pool, 2)
        snap = pool.template
        assert snap is not None
        claims: list[float] = []
        restores: list[float] = []
        for _ in range(n):
            _wait_ready(pool, 2)
            claims.append(claim_to_result(pool))
            t0 = time.perf_counter()
            sb = Sandbox.restore(snap)
            r = sb.run(CMD)
            restores.append(time.perf_counter() - t0)
            sb.close()
            assert r.ok
    finally:
        pool.close()
    ratio = p50(restores) / p50(claims)
    print(
        f"microvm ({accel}): claim -> first exec p50 {p50(claims) * 1000:.1f} ms, p95 "
        f"{p95(claims) * 1000:.1f} ms; Sandbox.restore(template) -> first exec p50 "
        f"{p50(restores) * 1000:.1f} ms, p95 {p95(restores) * 1000:.1f} ms (n={n}); "
        f"claim is {ratio:.1f}x faster"
    )
    target = 40.0 if accel == "tcg" else 10.0
    return [
        Line(
            f"microvm claim -> first exec result p50 ({accel})", p50(claims) * 1000, target, " ms"
        ),
        Line("microvm restore / claim (first exec results, p50)", ratio, 4.0, "x", at_most=False),
    ]


def container(n: int) -> list[Line]:
    pool = Pool("busybox", "container", min_ready=2, max_size=4, memory_mib=64, name="bench-ctr")
    try:
        _wait_ready(pool, 2)
        for _ in range(3):  # warm caches on both paths
            claim_to_result(pool)
            with Sandbox.create("busybox", tier="container", memory_mib=64) as sb:
                sb.run(CMD)
        claims: list[float] = []
        creates: list[float] = []
        for _ in range(n):
            _wait_ready(pool, 2)
            claims.append(claim_to_result(pool))
            t0 = time.perf_counter()
            sb = Sandbox.create("busybox", tier="container", memory_mib=64)
            r = sb.run(CMD)
            creates.append(time.perf_counter() - t0)
            sb.close()
            assert r.ok
    finally:
        pool.close()
    ratio = p50(claims) / p50(creates)
    print(
        f"container: claim -> first exec p50 {p50(claims) * 1000:.1f} ms, p95 "
        f"{p95(claims) * 1000:.1f} ms; Sandbox.create -> first exec p50 "
        f"{p50(creates) * 1000:.1f} ms, p95 {p95(creates) * 1000:.1f} ms (n={n}); "
        f"ratio {ratio:.2f}x"
    )
    return [Line("container claim / create (first exec results, p50)", ratio, 0.5, "x")]


def steady_load(duration_s: float, rate_per_s: float = 5.0, skip_s: float = 10.0) -> list[Line]:
    pool = Pool(
        "busybox",
        "microvm",
        min_ready=3,
        max_size=10,
        memory_mib=128,
        name="bench-load",
        metric="claims_per_second",
        target=1.0,
    )
    lat: list[tuple[float, float]] = []
    failures: list[str] = []
    lock = threading.Lock()
    try:
        _wait_ready(pool, 3)
        start = time.perf_counter()

        def one(at: float) -> None:
            try:
                t0 = time.perf_counter()
                sb = pool.claim(timeout_s=30)
                claimed = time.perf_counter() - t0
                try:
                    r = sb.run(CMD)
                finally:
                    sb.close()
                with lock:
                    lat.append((at, claimed))
                    if not r.ok:
                        failures.append(r.termination.describe())
            except Exception as exc:  # counted, reported below
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")

        threads = []
        total = int(duration_s * rate_per_s)
        for i in range(total):
            at = i / rate_per_s
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            t = threading.Thread(target=one, args=(at,), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(60)
        st = pool.status()
    finally:
        pool.close()
    after = [c for at, c in lat if at >= skip_s]
    print(
        f"steady load: {len(lat)} claims at {rate_per_s:g}/s over {duration_s:g} s against a "
        f"microVM pool; after the first {skip_s:g} s claim latency p50 "
        f"{p50(after) * 1000:.1f} ms, p95 {p95(after) * 1000:.1f} ms, max "
        f"{max(after) * 1000:.1f} ms; {len(failures)} failures; pool at the end: "
        f"{st['ready']} ready, size {st['desired']}, last reason "
        f"{(st['decision'] or {}).get('reason')}"
    )
    for f in failures[:5]:
        print(f"  failure: {f}")
    return [
        Line(
            f"steady {rate_per_s:g} claims/s: claim latency p95 after {skip_s:g} s",
            p95(after),
            0.100,
            " s",
        ),
        Line("steady load: failed claims", float(len(failures)), 0.0, ""),
    ]


def main() -> int:
    n_f, load_s = count_args(
        __doc__, ("N", int, 20, "measured runs"), ("LOAD_S", float, 60.0, "seconds of load")
    )
    n = int(n_f)
    default_store().ensure_busybox()
    lines: list[Line] = []
    tier = get_tier("microvm")
    a = tier.available()
    if a.available:
        assert isinstance(tier, MicroVMTier)
        accel, _ = tier.accelerator()
        lines += microvm(n, accel)
        lines += steady_load(load_s)
    else:
        print(f"SKIP  microvm tier unavailable: {a.reason}")
    if get_tier("container").available().available:
        lines += container(n)
    else:
        print("SKIP  container tier unavailable")
    for line in lines:
        print(line)
    return 0 if all(line.ok for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
