"""PNG charts of a bench run (matplotlib, Agg backend: no display needed).

- start_latency.png: every timed cold start (dots) and its p50 (bar) per
  tier on a log scale, warm starts (restore) beside them, the claimed range
  as a shaded band;
- memory.png: memory per idle instance at 1, 10, 50... instances;
- density.png: idle instances that fit in the memory budget (hatched where the
  bench stopped before the budget, with the projection).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tierbox.bench.claims import START_CLAIMS
from tierbox.spec import MIB


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ran(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(n, t) for n, t in results["tiers"].items() if t["status"] != "unavailable"]


def start_latency(results: dict[str, Any], path: Path) -> Path | None:
    plt = _plt()
    wl = (results.get("config", {}).get("workloads") or ["hello"])[0]
    rows = []
    for name, t in _ran(results):
        cs = t.get("cold_start", {}).get(wl, {})
        ws = t.get("warm_start", {})
        cold = cs.get("samples_ms") or []
        warm = ws.get("samples_ms") or [] if ws.get("status") == "ok" else []
        if cold or warm:
            rows.append((name, cold, cs.get("p50_ms"), warm, ws.get("p50_ms")))
    if not rows:
        return None
    claims = {c.tier: c for c in START_CLAIMS}
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.9 * len(rows)))
    for i, (name, cold, p50, warm, wp50) in enumerate(rows):
        y = len(rows) - 1 - i
        c = claims.get(name)
        if c is not None:
            ax.fill_betweenx(
                [y - 0.4, y + 0.4],
                c.low_ms,
                c.high_ms,
                color="#bbbbbb",
                alpha=0.45,
                label="claimed range",
            )
        if cold:
            ax.scatter(
                cold,
                [y + 0.12] * len(cold),
                s=14,
                color="#1f77b4",
                alpha=0.6,
                label="cold start (each run)",
            )
            if p50:
                ax.plot([p50, p50], [y, y + 0.3], color="#1f77b4", linewidth=3)
        if warm:
            ax.scatter(
                warm,
                [y - 0.12] * len(warm),
                s=14,
                color="#d62728",
                alpha=0.6,
                marker="s",
                label="warm start: restore",
            )
            if wp50:
                ax.plot([wp50, wp50], [y - 0.3, y], color="#d62728", linewidth=3)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in reversed(rows)])
    ax.set_xlabel("milliseconds, log scale (create -> first result; thick tick = p50)")
    ax.set_title(f"Start latency per tier (workload '{wl}')")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for h, lab in zip(handles, labels, strict=False):
        seen.setdefault(lab, h)
    ax.legend(seen.values(), seen.keys(), loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory(results: dict[str, Any], path: Path) -> Path | None:
    plt = _plt()
    data = []
    for name, t in _ran(results):
        recs = t.get("memory", {}).get("checkpoints") or []
        if recs:
            data.append(
                (name, {r["instances"]: r.get("avg_pss_bytes", r["avg_bytes"]) for r in recs})
            )
    if not data:
        return None
    counts = sorted({k for _, d in data for k in d})
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(counts))
    floor = 1.0 / 1024  # 1 KiB in MiB: zero bars would vanish on a log scale
    for j, k in enumerate(counts):
        xs, ys, zero = [], [], []
        for i, (_name, d) in enumerate(data):
            if k in d:
                xs.append(i + (j - (len(counts) - 1) / 2) * width)
                v = d[k] / MIB
                ys.append(max(v, floor))
                zero.append(v < floor)
        bars = ax.bar(xs, ys, width=width, label=f"{k} instance{'s' if k > 1 else ''}")
        for b, z in zip(bars, zero, strict=False):
            if z:
                ax.annotate(
                    "~0",
                    (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_yscale("log")
    ax.set_xticks(range(len(data)))
    ax.set_xticklabels([f"{n}\n({'in-process' if n == 'wasm' else 'PSS'})" for n, _ in data])
    ax.set_ylabel("MiB per idle instance (log)")
    ax.set_title("Memory per idle instance, averaged over N instances")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def density(results: dict[str, Any], path: Path) -> Path | None:
    plt = _plt()
    data = []
    for name, t in _ran(results):
        d = t.get("density", {})
        if d.get("status") == "ok":
            data.append((name, d))
    if not data:
        return None
    budget = data[0][1]["budget_bytes"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, (_name, d) in enumerate(data):
        capped = d.get("bound") != "budget"
        bar = ax.bar(
            i,
            max(d["fit"], 1),
            color="#2ca02c" if not capped else "#98df8a",
            hatch="//" if capped else None,
            edgecolor="#2c6e2c",
        )
        label = f"≥{d['fit']}" if capped else str(d["fit"])
        ax.annotate(label, (i, bar[0].get_height()), ha="center", va="bottom", fontsize=8)
        if d.get("projected_fit"):
            ax.scatter(
                [i],
                [d["projected_fit"]],
                marker="_",
                s=400,
                color="#d62728",
                label="projected (budget / measured average)",
            )
            ax.annotate(
                f"~{d['projected_fit']}", (i + 0.1, d["projected_fit"]), fontsize=7, color="#d62728"
            )
    ax.set_yscale("log")
    ax.set_xticks(range(len(data)))
    ax.set_xticklabels([n for n, _ in data])
    ax.set_ylabel("idle instances (log)")
    ax.set_title(
        f"Density: idle instances in {budget / (1 << 30):.0f} GiB "
        "(hatched: stopped by count/time cap before the budget)"
    )
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(
            handles[:1], labels[:1], fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08)
        )
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_charts(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Title -> written PNG, for the charts there is data for."""
    out: dict[str, Path] = {}
    for title, fn, name in (
        ("Start latency per tier (log scale)", start_latency, "start_latency.png"),
        ("Memory per idle instance", memory, "memory.png"),
        ("Density in the memory budget", density, "density.png"),
    ):
        p = fn(results, out_dir / name)
        if p is not None:
            out[title] = p
    return out
