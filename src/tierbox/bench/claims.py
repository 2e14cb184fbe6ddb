"""Common claims about the isolation ladder, next to what was measured here.

The claimed figures are the ones articles repeat: a full VM starts in
30-60 s, a container in 100-500 ms, a microVM in 50-150 ms, Wasm in
microseconds with 90% less memory; VMs and microVMs isolate strongly,
containers moderately. Each row says "measured here" with the ratio, or why
the measurement cannot be made on this machine (e.g. a KVM microVM start
when only TCG emulation is usable), or why the tier did not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tierbox.bench.machine import tier_accelerator
from tierbox.bench.stats import fmt_bytes, fmt_ms


@dataclass(frozen=True)
class StartClaim:
    id: str
    claim: str
    claimed: str
    tier: str
    low_ms: float
    high_ms: float
    needs_kvm: bool = False


START_CLAIMS = (
    StartClaim("vm_start", "Full VM start", "30-60 s", "vm", 30_000, 60_000, needs_kvm=True),
    StartClaim("container_start", "Container start", "100-500 ms", "container", 100, 500),
    StartClaim("microvm_start", "MicroVM start", "50-150 ms", "microvm", 50, 150, needs_kvm=True),
    StartClaim("wasm_start", "Wasm start", "microseconds (< 1 ms)", "wasm", 0.001, 1.0),
)


def _tier_missing(tiers: dict[str, Any], name: str) -> str | None:
    t = tiers.get(name)
    if t is None:
        return f"the {name} tier was not selected for this run"
    if t["status"] == "unavailable":
        return f"the {name} tier is unavailable here: {t.get('error')}"
    if t["status"] == "failed":
        return f"the {name} tier failed: {t.get('error')}"
    return None


def _cold_p50(t: dict[str, Any]) -> tuple[float | None, str | None]:
    cs = t.get("cold_start", {}).get("hello", {})
    if cs.get("status") == "ok" and cs.get("p50_ms") is not None:
        return float(cs["p50_ms"]), None
    return None, cs.get("error") or cs.get("reason") or "no cold start of the hello workload"


def _compare(measured: float, low: float, high: float) -> str:
    if measured < low:
        return f"{low / measured:.1f}x faster than the claim's low end"
    if measured > high:
        return f"{measured / high:.1f}x slower than the claim's high end"
    return f"within the claimed range ({measured / high:.2f}x its high end)"


def _start_row(c: StartClaim, results: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": c.id,
        "claim": c.claim,
        "claimed": c.claimed,
        "tier": c.tier,
        "claimed_low_ms": c.low_ms,
        "claimed_high_ms": c.high_ms,
        "measured_ms": None,
        "ratio_to_low": None,
        "ratio_to_high": None,
    }
    tiers = results["tiers"]
    missing = _tier_missing(tiers, c.tier)
    if missing:
        row.update(status="not run", measured=f"not measured: {missing}", ratio="n/a")
        return row
    p50, why = _cold_p50(tiers[c.tier])
    if p50 is None:
        row.update(status="not run", measured=f"not measured: {why}", ratio="n/a")
        return row
    row["measured_ms"] = p50
    accel = results["machine"].get("accelerator", {})
    own = results["machine"].get("engines", {}).get(c.tier)
    if own and own.get("available"):  # the tier's own word on its accelerator
        accel = {"kind": tier_accelerator(own), "source": f"{c.tier} tier: {own.get('reason')}"}
    other = _other_starts(tiers[c.tier])
    if c.needs_kvm:
        row["kvm_claim"] = True
        row["claimed"] = f"{c.claimed} (KVM claim)"
    if c.needs_kvm and accel.get("kind") != "KVM":
        kind = accel.get("kind", "unknown")
        row.update(
            status="not measurable here",
            measured=f"cold boot p50 {fmt_ms(p50)} under {kind}" + other,
            ratio=f"n/a: not comparable ({kind} here)",
            footnote=(
                f"KVM claim: the claimed figure holds only on KVM. The VM tiers here run "
                f"under {kind} ({_why_not_kvm(results)}), so the numbers beside it are "
                "not comparable."
            ),
        )
        return row
    row["ratio_to_low"] = p50 / c.low_ms
    row["ratio_to_high"] = p50 / c.high_ms
    text = f"cold start p50 {fmt_ms(p50)} (create -> first result)" + other
    if c.tier == "wasm":
        inst = tiers["wasm"].get("memory", {}).get("instantiate_us")
        if inst and inst.get("p50_ms") is not None:
            text += f"; wasmtime instantiate alone {fmt_ms(inst['p50_ms'])}"
    row.update(status="measured", measured=text, ratio=_compare(p50, c.low_ms, c.high_ms))
    return row


def _why_not_kvm(results: dict[str, Any]) -> str:
    """The machine's one word on its accelerator, short: one footnote for every row."""
    source = str(results["machine"].get("accelerator", {}).get("source", "unknown"))
    source = source.split(":", 1)[1].strip() if ":" in source else source
    return source if len(source) <= 120 else source[:119] + "…"


def _other_starts(t: dict[str, Any]) -> str:
    """Starts that are not boots, named apart from the cold start: a saved
    template restored (vm), a clone of a booted snapshot (microvm)."""
    out = ""
    tr = (t.get("template_restore") or {}).get("hello") or {}
    if tr.get("status") == "ok" and tr.get("p50_ms") is not None:
        out += f"; template restore p50 {fmt_ms(tr['p50_ms'])} (not a boot)"
    ws = t.get("warm_start") or {}
    if ws.get("status") == "ok" and ws.get("p50_ms") is not None and ws.get("label"):
        out += f"; {ws['label']} p50 {fmt_ms(ws['p50_ms'])}"
    return out


def _per_instance(t: dict[str, Any]) -> tuple[float | None, int | None]:
    """(bytes per idle instance at the largest checkpoint, that checkpoint)."""
    recs = t.get("memory", {}).get("checkpoints") or []
    if not recs:
        return None, None
    last = recs[-1]
    return float(last.get("avg_pss_bytes", last["avg_bytes"])), int(last["instances"])


def _memory_row(results: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": "wasm_memory",
        "claim": "Wasm memory per instance",
        "claimed": "90% less than a container",
        "tier": "wasm",
        "claimed_reduction_pct": 90.0,
        "measured_reduction_pct": None,
    }
    tiers = results["tiers"]
    for name in ("wasm", "container"):
        missing = _tier_missing(tiers, name)
        if missing:
            row.update(status="not run", measured=f"not measured: {missing}", ratio="n/a")
            return row
    w, wk = _per_instance(tiers["wasm"])
    c, ck = _per_instance(tiers["container"])
    if w is None or c is None or c <= 0:
        row.update(
            status="not run",
            measured="not measured: the memory phase of wasm or container did not finish",
            ratio="n/a",
        )
        return row
    reduction = (1 - w / c) * 100.0
    row["measured_reduction_pct"] = reduction
    text = (
        f"wasm {fmt_bytes(w)} (in-process growth, avg of {wk}) vs container {fmt_bytes(c)} "
        f"(PSS, avg of {ck}): {abs(reduction):.0f}% {'less' if reduction >= 0 else 'more'}"
    )
    charge = (tiers["container"]["memory"].get("checkpoints") or [{}])[-1].get("avg_cgroup_bytes")
    if charge:
        text += f"; vs the container's cgroup charge {fmt_bytes(charge)}: "
        text += f"{(1 - w / charge) * 100:.0f}% less"
    ratio = f"{reduction / 90.0:.2f}x the claimed reduction"
    row.update(status="measured", measured=text, ratio=ratio)
    return row


def _isolation_text(tiers: dict[str, Any], name: str) -> str:
    missing = _tier_missing(tiers, name)
    if missing:
        return f"{name}: not measured ({missing})"
    s = tiers[name].get("isolation", {}).get("summary") or {}
    if not s:
        return f"{name}: probes did not run"
    return f"{name}: {s['text']}"


def _isolation_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    tiers = results["tiers"]
    rows = []
    for rid, claim, claimed, names in (
        ("vm_isolation", "VMs and microVMs isolate", "strongly", ("microvm", "vm")),
        ("container_isolation", "Containers isolate", "moderately", ("container", "gvisor")),
    ):
        parts = [_isolation_text(tiers, n) for n in names]
        measured_any = any(
            (tiers.get(n, {}).get("isolation", {}).get("summary") or {}).get("measured")
            for n in names
        )
        rows.append(
            {
                "id": rid,
                "claim": claim,
                "claimed": claimed,
                "tier": ",".join(names),
                "status": "measured" if measured_any else "not run",
                "measured": "; ".join(parts),
                "ratio": "n/a (probe counts, see isolation)",
            }
        )
    return rows


def evaluate_claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [_start_row(c, results) for c in START_CLAIMS]
    rows.append(_memory_row(results))
    rows.extend(_isolation_rows(results))
    return rows
