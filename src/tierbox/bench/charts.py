"""PNG charts of a bench run (matplotlib, Agg backend: no display needed).

Each chart is meant to be read in a few seconds, with its value printed
where a bar alone would leave a guess:

- start_latency.png: every timed start per tier on a log scale, the cold
  start (a boot where the tier boots) apart from starts that are not boots
  (template restore, clone of a booted snapshot, restore, revert); claimed
  ranges as bands, hatched and labelled "KVM claim" where the claim holds
  only on KVM and so is not comparable with a TCG host;
- memory.png: one horizontal bar per tier, memory per idle instance at its
  largest measured count, the value printed; PSS solid, in-process growth
  (Wasm) hatched;
- memory_scaling.png: a small panel, memory per instance from one instance
  to many;
- density.png: idle instances in the memory budget; where the run stopped at
  its cap, the bar is the projection (hatched, marked projected) and a marker
  shows the count really measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierbox.bench.claims import START_CLAIMS
from tierbox.bench.stats import fmt_bytes
from tierbox.spec import MIB

COLD = "#1f77b4"
TEMPLATE = "#9467bd"
WARM = "#d62728"
PSS = "#1f77b4"
IN_PROCESS = "#ff7f0e"


@dataclass(frozen=True)
class Chart:
    """One chart's file and the words on it (the HTML report repeats them)."""

    title: str
    file: str
    x_label: str
    y_label: str


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ran(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(n, t) for n, t in results["tiers"].items() if t["status"] != "unavailable"]


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _starts(t: dict[str, Any], wl: str) -> list[tuple[str, list[float], float | None]]:
    """(series, samples_ms, p50_ms) of one tier: cold start first, then the
    starts that are not boots, each under its own name."""
    from tierbox.bench.report import warm_label

    out = []
    cs = t.get("cold_start", {}).get(wl, {})
    if cs.get("samples_ms"):
        out.append(("cold start", list(cs["samples_ms"]), cs.get("p50_ms")))
    tr = (t.get("template_restore") or {}).get(wl) or {}
    if tr.get("status") == "ok" and tr.get("samples_ms"):
        out.append(("template restore", list(tr["samples_ms"]), tr.get("p50_ms")))
    ws = t.get("warm_start", {})
    if ws.get("status") == "ok" and ws.get("samples_ms"):
        out.append((warm_label(ws), list(ws["samples_ms"]), ws.get("p50_ms")))
    return out


def start_latency(results: dict[str, Any], path: Path) -> Chart | None:
    plt = _plt()
    wl = (results.get("config", {}).get("workloads") or ["hello"])[0]
    rows = [(name, _starts(t, wl)) for name, t in _ran(results)]
    rows = [(n, s) for n, s in rows if s]
    if not rows:
        return None
    claims = {c.tier: c for c in START_CLAIMS}
    kvm_here = results.get("machine", {}).get("accelerator", {}).get("kind") == "KVM"
    x_label = "milliseconds, log scale (create -> first result; thick tick = p50)"
    title = f"Start latency per tier (workload '{wl}')"
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.8 * len(rows)))
    styles = {"cold start": (COLD, "o")}
    for i, (name, series) in enumerate(rows):
        y = len(rows) - 1 - i
        c = claims.get(name)
        if c is not None:
            kvm = c.needs_kvm and not kvm_here
            ax.fill_betweenx(
                [y - 0.42, y + 0.42],
                c.low_ms,
                c.high_ms,
                facecolor="none" if kvm else "#bbbbbb",
                edgecolor="#888888",
                hatch="///" if kvm else None,
                alpha=0.8 if kvm else 0.45,
                label="KVM claim (not comparable here)" if kvm else "claimed range",
            )
            if kvm:
                ax.text(
                    (c.low_ms * c.high_ms) ** 0.5,
                    y + 0.3,
                    "KVM claim",
                    ha="center",
                    va="center",
                    fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
                )
        offsets = [0.15, -0.15, -0.3] if len(series) > 1 else [0.0]
        for (label, samples, p50), dy in zip(series, offsets, strict=False):
            color, marker = styles.get(
                label, (TEMPLATE, "^") if label == "template restore" else (WARM, "s")
            )
            key = label if label in ("cold start", "template restore") else "from a snapshot"
            ax.scatter(
                samples,
                [y + dy] * len(samples),
                s=16,
                color=color,
                marker=marker,
                alpha=0.65,
                label=f"{key} (each run)",
            )
            if p50:
                ax.plot([p50, p50], [y + dy - 0.12, y + dy + 0.12], color=color, linewidth=3)
                ax.annotate(
                    label if label != "cold start" else "",
                    (max(samples), y + dy),
                    xytext=(6, -3),
                    textcoords="offset points",
                    fontsize=7,
                    color=color,
                )
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in reversed(rows)])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel(x_label)
    ax.set_ylabel("tier")
    ax.set_title(title)
    ax.grid(True, axis="x", which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for h, lab in zip(handles, labels, strict=False):
        seen.setdefault(lab, h)
    ax.legend(seen.values(), seen.keys(), loc="upper right", fontsize=7)
    _save(plt, fig, path)
    return Chart(title, path.name, x_label, "tier")


def _largest(t: dict[str, Any]) -> tuple[float, int] | None:
    """(bytes per idle instance, instances) at the tier's largest measured count."""
    recs = t.get("memory", {}).get("checkpoints") or []
    if t.get("memory", {}).get("status") != "ok" or not recs:
        return None
    last = recs[-1]
    return float(last.get("avg_pss_bytes", last["avg_bytes"])), int(last["instances"])


def _bytes_ticks(ax: Any, axis: str, low_mib: float, high_mib: float) -> None:
    """Log ticks at 1, 32, 1024... bytes written as KiB/MiB, not as 1e-3."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks = [
        v / MIB
        for k in range(0, 5)
        for v in (1024.0**k, 32 * 1024.0**k)
        if low_mib <= v / MIB <= high_mib
    ]
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(FixedLocator(ticks))
    target.set_minor_locator(NullLocator())
    target.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_bytes(v * MIB)))


def memory(results: dict[str, Any], path: Path) -> Chart | None:
    plt = _plt()
    data = []
    for name, t in _ran(results):
        got = _largest(t)
        if got is not None:
            data.append((name, got[0], got[1], bool(t.get("in_process"))))
    if not data:
        return None
    title = "Memory per idle instance, at each tier's largest measured count"
    x_label = "memory per idle instance (log scale)"
    y_label = "tier (instances measured)"
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.55 * len(data)))
    positive = [v for _, v, _, _ in data if v > 0] or [1024.0]
    floor_mib = min(positive) / MIB / 4
    top_mib = max(positive) / MIB * 8
    for i, (_name, value, _n, in_proc) in enumerate(data):
        y = len(data) - 1 - i
        mib = max(value / MIB, floor_mib)
        if value <= 0:  # nothing measurable: no bar, and the text says so
            ax.annotate(
                "0 B measured (no idle process of its own)",
                (floor_mib, y),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
            continue
        ax.barh(
            y,
            mib - floor_mib,
            left=floor_mib,
            height=0.6,
            color="white" if in_proc else PSS,
            edgecolor=IN_PROCESS if in_proc else PSS,
            hatch="///" if in_proc else None,
            label="in-process growth (Wasm)" if in_proc else "PSS of its host processes",
        )
        ax.annotate(
            f"{fmt_bytes(value)} {'in-process' if in_proc else 'PSS'}",
            (mib, y),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlim(floor_mib, top_mib)
    _bytes_ticks(ax, "x", floor_mib, top_mib)
    ax.set_yticks(range(len(data)))
    ax.set_yticklabels([f"{n} ({k})" for n, _, k, _ in reversed(data)])
    ax.set_ylim(-0.6, len(data) - 0.3)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(True, axis="x", which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for h, lab in zip(handles, labels, strict=False):
        seen.setdefault(lab, h)
    ax.legend(seen.values(), seen.keys(), loc="lower right", fontsize=7)
    _save(plt, fig, path)
    return Chart(title, path.name, x_label, y_label)


def memory_scaling(results: dict[str, Any], path: Path) -> Chart | None:
    plt = _plt()
    lines = []
    for name, t in _ran(results):
        recs = t.get("memory", {}).get("checkpoints") or []
        pts = [
            (int(r["instances"]), float(r.get("avg_pss_bytes", r["avg_bytes"])))
            for r in recs
            if float(r.get("avg_pss_bytes", r["avg_bytes"])) > 0
        ]
        if t.get("memory", {}).get("status") == "ok" and pts:
            lines.append((name, pts, bool(t.get("in_process"))))
    if not lines:
        return None
    title = "One vs many: memory per instance as instances grow"
    x_label = "idle instances (log scale)"
    y_label = "memory per instance (log scale)"
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, pts, in_proc in lines:
        xs = [p[0] for p in pts]
        ys = [p[1] / MIB for p in pts]
        ax.plot(xs, ys, marker="o", markersize=3, linestyle="--" if in_proc else "-", label=name)
        ax.annotate(name, (xs[-1], ys[-1]), xytext=(3, 0), textcoords="offset points", fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    all_mib = [p[1] / MIB for _, pts, _ in lines for p in pts]
    _bytes_ticks(ax, "y", min(all_mib) / 2, max(all_mib) * 2)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=6, loc="best")
    _save(plt, fig, path)
    return Chart(title, path.name, x_label, y_label)


def density(results: dict[str, Any], path: Path) -> Chart | None:
    plt = _plt()
    data = [
        (n, t["density"]) for n, t in _ran(results) if t.get("density", {}).get("status") == "ok"
    ]
    if not data:
        return None
    budget = data[0][1]["budget_bytes"]
    title = f"Density: idle instances that fit in {fmt_bytes(budget)}"
    y_label = "idle instances (log scale)"
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, (_name, d) in enumerate(data):
        fit = int(d["fit"])
        projected = d.get("projected_fit") if d.get("bound") != "budget" else None
        if projected:
            ax.bar(
                i,
                projected,
                color="white",
                hatch="//",
                edgecolor="#2c6e2c",
                label="projected (budget / measured average)",
            )
            ax.annotate(
                f"~{projected} projected", (i, projected), ha="center", va="bottom", fontsize=8
            )
            ax.scatter(
                [i],
                [max(fit, 1)],
                marker="D",
                s=36,
                color="black",
                zorder=3,
                label="measured (run stopped at its cap)",
            )
            ax.annotate(
                f"{fit} measured",
                (i, max(fit, 1)),
                xytext=(8, -3),
                textcoords="offset points",
                fontsize=7,
            )
        elif d.get("bound") != "budget":
            ax.bar(
                i,
                max(fit, 1),
                color="#98df8a",
                edgecolor="#2c6e2c",
                label="measured, stopped before the budget",
            )
            ax.annotate(
                f"≥{fit} (not memory-bound)", (i, max(fit, 1)), ha="center", va="bottom", fontsize=8
            )
        else:
            ax.bar(
                i,
                max(fit, 1),
                color="#2ca02c",
                edgecolor="#2c6e2c",
                label="measured: the budget was reached",
            )
            ax.annotate(str(fit), (i, max(fit, 1)), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(data)))
    ax.set_xticklabels([n for n, _ in data])
    ax.set_xlabel("tier")
    ax.set_ylabel(y_label)
    ax.set_title(title)
    top = max(max(int(d.get("projected_fit") or 0), int(d["fit"])) for _, d in data)
    ax.set_ylim(0.8, max(top, 1) * 4)
    handles, labels = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for h, lab in zip(handles, labels, strict=False):
        seen.setdefault(lab, h)
    ax.legend(seen.values(), seen.keys(), fontsize=7, loc="upper left")
    ax.grid(True, axis="y", which="major", alpha=0.3)
    _save(plt, fig, path)
    return Chart(title, path.name, "tier", y_label)


CHARTS = (
    (start_latency, "start_latency.png"),
    (memory, "memory.png"),
    (memory_scaling, "memory_scaling.png"),
    (density, "density.png"),
)


def write_charts(results: dict[str, Any], out_dir: Path) -> list[Chart]:
    """The charts there is data for, written into ``out_dir``."""
    out = []
    for fn, name in CHARTS:
        chart = fn(results, out_dir / name)
        if chart is not None:
            out.append(chart)
    return out
