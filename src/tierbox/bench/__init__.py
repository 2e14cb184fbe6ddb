"""``tierbox bench``: numbers measured here next to what articles assert.

The same workloads on every available tier: cold start (p50/p95 over N runs,
warm-up discarded), warm start from a snapshot where the tier has one, exec
latency, memory (PSS) per idle instance at 1/10/50 instances, density in a
memory budget, and isolation measured by probes run inside each tier. Every
result carries the machine it was measured on.

    from tierbox.bench import BenchConfig, run_bench
    results = run_bench(BenchConfig.quick(tiers=["container", "wasm"]))
"""

from tierbox.bench.runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
