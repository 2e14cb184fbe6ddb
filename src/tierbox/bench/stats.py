"""Robust summaries of timing samples: p50/p95, spread, outliers.

Warm-up runs are discarded by the caller before samples reach here; this
module only summarizes what was kept. Percentiles interpolate linearly
between closest ranks (numpy's default), which stays sensible for the small
N a quick bench takes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``samples``, linearly interpolated."""
    if not samples:
        raise ValueError("percentile of no samples")
    xs = sorted(samples)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize_ms(samples_s: Sequence[float], *, warmup: int = 0) -> dict[str, Any]:
    """Summary of durations given in seconds, reported in milliseconds.

    ``spread_pct`` is (p95 - p50) / p50: how far the slow tail sits from the
    typical run. ``outliers`` counts samples above Q3 + 1.5 IQR (Tukey); they
    are kept in the samples and in p95 but cannot move p50.
    """
    ms = [s * 1000.0 for s in samples_s]
    if not ms:
        return {"n": 0, "warmup": warmup, "samples_ms": []}
    p50 = percentile(ms, 50)
    p95 = percentile(ms, 95)
    q1 = percentile(ms, 25)
    q3 = percentile(ms, 75)
    iqr = q3 - q1
    fence = q3 + 1.5 * iqr
    return {
        "n": len(ms),
        "warmup": warmup,
        "p50_ms": p50,
        "p95_ms": p95,
        "min_ms": min(ms),
        "max_ms": max(ms),
        "mean_ms": statistics.fmean(ms),
        "stdev_ms": statistics.stdev(ms) if len(ms) > 1 else 0.0,
        "iqr_ms": iqr,
        "spread_pct": (p95 - p50) / p50 * 100.0 if p50 > 0 else 0.0,
        "outliers": sum(1 for x in ms if x > fence) if len(ms) >= 4 else 0,
        "samples_ms": [round(x, 4) for x in ms],
    }


def fmt_ms(ms: float | None) -> str:
    """A duration for people: 12 µs, 3.4 ms, 120 ms, 1.85 s."""
    if ms is None or math.isnan(ms):
        return "-"
    if ms < 1.0:
        return f"{ms * 1000:.0f} µs"
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    return f"{ms / 1000:.2f} s"


def fmt_bytes(n: float | None) -> str:
    """A size for people, binary units: 512 KiB, 31.2 MiB."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024.0
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if n >= 100 else f"{n:.1f} {unit}"
    return f"{n:.1f} TiB"  # pragma: no cover
