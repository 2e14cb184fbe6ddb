"""How memory grew before an OOM kill: a leak, a spike or a working set
larger than the limit, from the samples the run history took.

The series is split where the growth that ended at the peak began:

- **leak**: memory rose steadily for at least :data:`LEAK_MIN_S` over at
  least :data:`LEAK_MIN_POINTS` samples, fitting a straight line well
  (R² >= :data:`LEAK_MIN_R2`) with no single step carrying most of it. The
  slope is an ordinary least-squares fit (numpy) with its standard error.
- **spike**: memory was steady for at least :data:`STEADY_MIN_S`, then rose
  to the peak in less time than it had been steady and in under
  :data:`LEAK_MIN_S`, over fewer than :data:`LEAK_MIN_POINTS` samples or in
  bursts no line fits within :data:`SPIKE_MAX_S`: one large allocation
  after normal running.
- **working set too large**: memory climbed to the limit quickly from the
  start (loading what it works on), or ran for :data:`PLATEAU_MIN_S` within
  :data:`PLATEAU_FRACTION` of the limit before a small rise pushed it over.

The thresholds are in seconds of a run sampled every 100 ms; a leak slower
than a MiB a minute still fits, as long as the run lasted a second.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

LEAK_MIN_S = 1.0
LEAK_MIN_POINTS = 8
LEAK_MIN_R2 = 0.9
#: the largest single step a leak may have, as a share of the whole rise
LEAK_MAX_STEP = 0.35
STEADY_MIN_S = 0.3
#: the longest a rise in bursts may take and still be one allocation (a
#: stalled sandbox showing it slowly); longer, stepwise growth is a leak
#: or loading, not a spike
SPIKE_MAX_S = 3.0
PLATEAU_MIN_S = 1.0
PLATEAU_FRACTION = 0.85


@dataclass(frozen=True)
class Fit:
    """memory = slope * t + intercept over the growth, in MiB and seconds."""

    slope_mib_s: float
    stderr_mib_s: float
    r2: float
    points: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "slope_mib_per_s": round(self.slope_mib_s, 3),
            "slope_stderr_mib_per_s": round(self.stderr_mib_s, 3),
            "r2": round(self.r2, 4),
            "points": self.points,
        }


@dataclass(frozen=True)
class Shape:
    """What the series says; ``kind`` is leak, spike, working_set or unknown."""

    kind: str
    reason: str
    base_mib: float = 0.0
    peak_mib: float = 0.0
    growth_s: float = 0.0
    steady_s: float = 0.0
    largest_step_mib: float = 0.0
    fit: Fit | None = None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "shape": self.kind,
            "reason": self.reason,
            "base_mib": round(self.base_mib, 1),
            "peak_mib": round(self.peak_mib, 1),
            "growth_s": round(self.growth_s, 3),
            "steady_before_growth_s": round(self.steady_s, 3),
            "largest_step_mib": round(self.largest_step_mib, 1),
        }
        if self.fit is not None:
            out["fit"] = self.fit.to_dict()
        return out


def fit_line(t: list[float], m: list[float]) -> Fit | None:
    """Least squares through (t, m), with the slope's standard error."""
    n = len(t)
    if n < 3:
        return None
    x = np.asarray(t, dtype=float)
    y = np.asarray(m, dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    sxx = float(np.sum((x - x.mean()) ** 2))
    stderr = float(np.sqrt(ss_res / (n - 2) / sxx)) if sxx > 0 else float("inf")
    return Fit(float(slope), stderr, r2, n)


def shape(points: list[tuple[float, float]], limit_mib: float | None) -> Shape:
    """Classify ``points`` (seconds, MiB; the run's end included) that ended
    at the memory limit."""
    pts = sorted(points)
    if len(pts) < 2:
        return Shape("unknown", "fewer than two memory samples")
    t = [p[0] for p in pts]
    m = [p[1] for p in pts]
    # the base is the lowest of the first samples; growth is looked for only
    # after it (a VM's first sample can still carry its boot's memory)
    b = min(range(min(3, len(m))), key=m.__getitem__)
    base = m[b]
    peak = max(m)
    rise = peak - base
    least = max(2.0, 0.05 * limit_mib) if limit_mib else 2.0
    if rise < least:
        return Shape(
            "unknown",
            f"memory barely moved ({base:.1f} -> {peak:.1f} MiB) while sampled",
            base_mib=base,
            peak_mib=peak,
        )
    lo, hi = base + 0.1 * rise, base + 0.9 * rise
    g = next(i for i in range(b, len(m)) if m[i] > lo)
    e = next(i for i in range(g, len(m)) if m[i] >= hi)
    first = max(g - 1, 0)
    start_t = t[first]
    growth_s = t[e] - start_t
    steady_s = start_t - t[0]
    window_t, window_m = t[first : e + 1], m[first : e + 1]
    fit = fit_line(window_t, window_m)
    # a step is what a sample rose beyond the line over its own time gap: a
    # sampler that fell behind on a loaded host makes one long step, not a spike
    slope = max(fit.slope_mib_s, 0.0) if fit is not None else 0.0
    pairs = itertools.pairwise(zip(window_t, window_m, strict=True))
    steps = [(m1 - m0) - slope * (t1 - t0) for (t0, m0), (t1, m1) in pairs] or [rise]
    step = max(steps)
    common = {
        "base_mib": base,
        "peak_mib": peak,
        "growth_s": growth_s,
        "steady_s": steady_s,
        "largest_step_mib": step,
        "fit": fit,
    }
    if (
        fit is not None
        and growth_s >= LEAK_MIN_S
        and fit.points >= LEAK_MIN_POINTS
        and fit.r2 >= LEAK_MIN_R2
        and fit.slope_mib_s > 0
        and step <= LEAK_MAX_STEP * rise
    ):
        return Shape(
            "leak",
            f"memory rose steadily for {growth_s:.1f} s at {fit.slope_mib_s:.1f} MiB/s "
            f"(R² {fit.r2:.2f} over {fit.points} samples) until the limit",
            **common,  # type: ignore[arg-type]
        )
    if limit_mib:
        near = [ti for ti, v in zip(t, m, strict=False) if v >= PLATEAU_FRACTION * limit_mib]
        if near and near[-1] - near[0] >= PLATEAU_MIN_S and (fit is None or fit.r2 < LEAK_MIN_R2):
            return Shape(
                "working_set",
                f"memory held at {PLATEAU_FRACTION:.0%}+ of the {limit_mib:.0f} MiB limit for "
                f"{near[-1] - near[0]:.1f} s before a small rise pushed it over",
                **common,  # type: ignore[arg-type]
            )
    # fewer samples than a line needs is one allocation too, however long a
    # loaded host (or a TCG guest touching its pages) took to show it; so is a
    # rise in bursts that no line fits (a sandbox whose page faults stalled)
    sudden = (
        growth_s < LEAK_MIN_S
        or e - first < LEAK_MIN_POINTS
        or fit is None
        or (fit.r2 < LEAK_MIN_R2 and growth_s <= SPIKE_MAX_S)
    )
    if steady_s >= STEADY_MIN_S and sudden and growth_s <= steady_s:
        return Shape(
            "spike",
            f"memory was steady at ~{base:.0f} MiB for {steady_s:.1f} s, then jumped by "
            f"{rise:.0f} MiB in {growth_s:.2f} s",
            **common,  # type: ignore[arg-type]
        )
    return Shape(
        "working_set",
        f"memory climbed from {base:.0f} to {peak:.0f} MiB within {growth_s:.2f} s of "
        f"{'the start' if steady_s < STEADY_MIN_S else 'a short steady phase'}: "
        "what it loads is larger than the limit",
        **common,  # type: ignore[arg-type]
    )
