"""Turn results into a rich table, results.json, report.md and report.html."""

from __future__ import annotations

import html
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from tierbox.bench.probes import LABELS, PROBES, QUESTIONS
from tierbox.bench.stats import fmt_bytes, fmt_ms

COLUMNS = (
    "tier",
    "cold start p50 (p95, n)",
    "template restore / snapshot start",
    "exec p50",
    "idle memory",
    "avg per instance",
    "density",
    "isolation (measured)",
    "runs ended",
)


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def primary_workload(results: dict[str, Any]) -> str:
    wl = results.get("config", {}).get("workloads") or ["hello"]
    return str(wl[0])


def _na(d: dict[str, Any], n: int = 60) -> str:
    status = d.get("status", "-")
    why = d.get("reason") or d.get("error") or ""
    if status == "n/a" and why.startswith("n/a"):
        return _short(why, n)
    return _short(f"{status}: {why}" if why else status, n)


def cold_cell(t: dict[str, Any], w: str, n: int = 60) -> str:
    cs = t.get("cold_start", {}).get(w, {})
    if cs.get("status") != "ok":
        return _na(cs, n) if cs else "-"
    return (
        f"{fmt_ms(cs['p50_ms'])} (p95 {fmt_ms(cs['p95_ms'])}, n={cs['n']}"
        + (f" +{cs['warmup']} warm-up" if cs.get("warmup") else "")
        + ")"
        + (f" {cs['kind']}" if cs.get("kind") else "")
    )


def warm_label(ws: dict[str, Any]) -> str:
    """What the warm start really was, named (older results carry no label)."""
    if ws.get("label"):
        return str(ws["label"])
    return "revert in place" if str(ws.get("method", "")).startswith("revert") else "restore"


def other_starts(t: dict[str, Any], w: str) -> list[tuple[str, dict[str, Any]]]:
    """Starts that are not cold boots, each with its name: a saved template
    restored, a clone of a booted snapshot, a revert in place."""
    out = []
    tr = (t.get("template_restore") or {}).get(w) or {}
    if tr.get("status") == "ok" and tr.get("p50_ms") is not None:
        out.append(("template restore", tr))
    ws = t.get("warm_start", {})
    if ws.get("status") == "ok" and ws.get("p50_ms") is not None:
        out.append((warm_label(ws), ws))
    return out


def warm_cell(t: dict[str, Any], n: int = 60, w: str = "hello") -> str:
    starts = other_starts(t, w)
    if starts:
        return "; ".join(
            f"{label} {fmt_ms(s['p50_ms'])} (p95 {fmt_ms(s['p95_ms'])}, n={s['n']})"
            for label, s in starts
        )
    ws = t.get("warm_start", {})
    if ws.get("status") == "n/a" and ws.get("reason"):
        return _short(str(ws["reason"]).split(";")[0], n)  # the why; the rest is in the report
    return _na(ws, n) if ws else "-"


def exec_cell(t: dict[str, Any], w: str) -> str:
    ex = t.get("exec_latency", {}).get(w, {})
    if ex.get("status") == "ok" and ex.get("p50_ms") is not None:
        return f"{fmt_ms(ex['p50_ms'])} (p95 {fmt_ms(ex['p95_ms'])}, n={ex['n']})"
    return _na(ex) if ex else "-"


def memory_cells(t: dict[str, Any]) -> tuple[str, str]:
    m = t.get("memory", {})
    if m.get("status") != "ok":
        return (_na(m) if m else "-"), ""
    idle = m.get("idle_pss_bytes")
    kind = "in-process" if t.get("in_process") else "PSS"
    idle_s = f"{fmt_bytes(idle)} {kind}" if idle is not None else "-"
    if m.get("idle_cgroup_bytes"):
        idle_s += f" (cgroup {fmt_bytes(m['idle_cgroup_bytes'])})"
    if t.get("in_process") and m.get("idle_note"):
        idle_s += f" ({m['idle_note'].replace('averaged over', 'avg of')})"
    pts = ", ".join(
        f"@{r['instances']} {fmt_bytes(r.get('avg_pss_bytes', r['avg_bytes']))}"
        for r in m.get("checkpoints", [])
        if r["instances"] > 1
    )
    return idle_s, pts or "-"


def density_cell(t: dict[str, Any]) -> str:
    d = t.get("density", {})
    if d.get("status") != "ok":
        return _na(d) if d else "-"
    budget = fmt_bytes(d["budget_bytes"])
    if d.get("bound") == "budget":
        return f"{d['fit']} in {budget}"
    text = f"≥{d['fit']} in {budget} (stopped: {d['bound']})"
    if d.get("projected_fit"):
        text += f"; ~{d['projected_fit']} projected"
    elif d.get("note", "").startswith("idle instances hold no"):
        text += "; not memory-bound (no idle process)"
    return text


def isolation_cell(t: dict[str, Any]) -> str:
    iso = t.get("isolation", {})
    if iso.get("status") == "failed":
        return _short(f"probes failed: {iso.get('error', '?')}", 70)
    s = iso.get("summary")
    if s:
        return str(s["text"])
    return _na(iso) if iso else "-"


def terminations_cell(t: dict[str, Any]) -> str:
    term = t.get("terminations", {})
    if not term:
        return "-"
    return ", ".join(f"{n} {k}" for k, n in sorted(term.items(), key=lambda kv: -kv[1]))


def tier_cell(name: str, t: dict[str, Any]) -> str:
    s = t.get("status", "?")
    if s == "partial":
        n = len([e for e in t.get("errors", []) if e["phase"] != "cleanup"])
        return f"{name} (partial: {n} error{'s' if n != 1 else ''})"
    if s in ("ok", "running"):
        return name
    return f"{name} ({s})"


def status_cell(t: dict[str, Any]) -> str:
    s = t.get("status", "?")
    if s in ("unavailable", "failed"):
        return f"{s}: {_short(t.get('error') or '', 200)}"
    return str(s)


def summary_rows(results: dict[str, Any]) -> list[list[str]]:
    w = primary_workload(results)
    rows = []
    for name, t in results["tiers"].items():
        if t["status"] in ("unavailable", "failed") and not t.get("cold_start"):
            rows.append([tier_cell(name, t), status_cell(t), *["-"] * (len(COLUMNS) - 2)])
            continue
        idle, pts = memory_cells(t)
        rows.append(
            [
                tier_cell(name, t),
                cold_cell(t, w) if t["status"] != "failed" else status_cell(t),
                warm_cell(t, w=w),
                exec_cell(t, w),
                idle,
                pts,
                density_cell(t),
                isolation_cell(t),
                terminations_cell(t),
            ]
        )
    return rows


def machine_line(results: dict[str, Any]) -> str:
    m = results["machine"]
    acc = m.get("accelerator", {})
    mem = m.get("memory_total_bytes")
    return (
        f"{m.get('cores')} cores ({m.get('cpu_model')}), {fmt_bytes(mem)} RAM, "
        f"{m.get('os')}, kernel {m.get('kernel')}"
        + (", itself a VM" if m.get("host_is_vm") else "")
        + f"; accelerator for VM tiers: {acc.get('kind', 'unknown')}"
    )


def engine_label(e: dict[str, Any]) -> str:
    """Engine and version once ("crun version 1.8.1", not "crun crun version
    1.8.1"); libvirt with the QEMU version its availability text names."""
    engine = str(e.get("engine") or "").strip()
    version = str(e.get("version") or "").strip()
    first = engine.split()[0] if engine else ""
    if version and first and version.lower().startswith(first.lower()):
        label = version
        rest = engine[len(first) :].strip()
        parts = rest.split()
        # keep what the engine adds beyond its own name and version ("+ qemu-system-x86_64")
        if parts and parts[0] in version.split():
            parts = parts[1:]
        if parts:
            label = f"{version} {' '.join(parts)}"
    else:
        label = f"{engine} {version}".strip() or "?"
    qemu = re.search(r"QEMU (\d+\.\d+(?:\.\d+)?)", str(e.get("reason") or ""))
    if qemu and "qemu" in label.lower() and qemu.group(1) not in label:
        label = re.sub(r"qemu-system-\S+", f"QEMU {qemu.group(1)}", label, count=1)
        label = label.removesuffix(f" {qemu.group(1)}") if label.count(qemu.group(1)) > 1 else label
        if qemu.group(1) not in label:
            label += f" + QEMU {qemu.group(1)}"
    return label


def engines_line(results: dict[str, Any]) -> str:
    parts = []
    for name, e in results["machine"].get("engines", {}).items():
        if e.get("available"):
            parts.append(f"{name}: {engine_label(e)}")
    return "; ".join(parts)


# ---------------------------------------------------------------- rich


#: Width the terminal summary is laid out for; a pipe gets the same layout.
TERMINAL_COLUMNS = 100
TERMINAL_HEADER = (
    "tier",
    "cold start",
    "other start",
    "exec",
    "mem/inst",
    "density",
    "contained",
)
#: Short names of the starts that are not boots, for the 100-column table.
SHORT_START = {
    "template restore": "template",
    "clone from a booted snapshot": "clone",
    "restore from snapshot": "restore",
    "revert in place": "revert",
    "restore": "restore",
}


def _p50(s: dict[str, Any]) -> str:
    return fmt_ms(s["p50_ms"]) if s.get("status") == "ok" and s.get("p50_ms") is not None else "-"


def terminal_rows(results: dict[str, Any]) -> tuple[list[list[str]], list[str]]:
    """The summary cut to what a 100-column terminal shows (p50s, one memory
    figure, the probe count), and the notes that explain its marks."""
    w = primary_workload(results)
    rows: list[list[str]] = []
    notes: list[str] = []
    for name, t in results["tiers"].items():
        status = t.get("status", "?")
        if status in ("unavailable", "failed") and not t.get("cold_start"):
            rows.append([name, status, *["-"] * (len(TERMINAL_HEADER) - 2)])
            notes.append(f"{name} {status}: {_short(t.get('error') or '', 180)}")
            continue
        label = name
        if status == "partial":
            label += "*"
            n = len([e for e in t.get("errors", []) if e["phase"] != "cleanup"])
            notes.append(f"{name}*: {n} phase error{'s' if n != 1 else ''} (see the report)")
        cs = t.get("cold_start", {}).get(w, {})
        cold = _p50(cs) if status != "failed" else "failed"
        others = "\n".join(
            f"{SHORT_START.get(lab, lab)} {fmt_ms(st['p50_ms'])}" for lab, st in other_starts(t, w)
        )
        m = t.get("memory", {})
        mem = "-"
        recs = m.get("checkpoints") or []
        if m.get("status") == "ok" and recs:
            last = recs[-1]
            kind = " in-proc" if t.get("in_process") else ""
            mem = f"{fmt_bytes(last.get('avg_pss_bytes', last['avg_bytes']))}{kind}"
        d = t.get("density", {})
        den = "-"
        if d.get("status") == "ok":
            if d.get("bound") == "budget":
                den = str(d["fit"])
            elif d.get("projected_fit"):
                den = f"~{d['projected_fit']} proj."
            else:
                den = f">={d['fit']} cap"
        iso = (t.get("isolation", {}).get("summary") or {}).get("text", "-")
        iso = str(iso).split(";")[0].removesuffix(" contained")
        rows.append(
            [label, cold, others or "-", _p50(t.get("exec_latency", {}).get(w, {})), mem, den, iso]
        )
    return rows, notes


def rich_report(results: dict[str, Any]) -> Group:
    """The terminal view: fits TERMINAL_COLUMNS; everything else is in the report."""
    w = primary_workload(results)
    title = (
        f"tierbox bench ({results['mode']}) — workload '{w}' — {results.get('duration_s', 0):.0f} s"
    )
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in TERMINAL_HEADER:
        table.add_column(col, no_wrap=True)
    rows, notes = terminal_rows(results)
    for row in rows:
        style = "red" if row[1] in ("failed", "unavailable") else None
        table.add_row(*row, style=style)
    notes.insert(
        0,
        "cold start = create -> first result, booting where the tier boots; other start = "
        "template restore, clone of a booted snapshot, restore or revert; all p50. "
        "mem/inst: PSS per idle instance at the largest count measured (in-proc: growth of "
        "the bench's own process, wasm). density: instances in the budget ('proj.' = budget / "
        "measured average, the run stopped at its cap). contained: isolation probes "
        "contained / run.",
    )
    claims = Table(
        title="claimed vs measured here", title_justify="left", box=box.SIMPLE_HEAD, expand=True
    )
    for col, share in (("claim", 3), ("claimed", 3), ("measured here", 8), ("ratio", 4)):
        claims.add_column(col, ratio=share)
    crows, footnotes = claim_rows(results)
    for row in crows:
        claims.add_row(*row)
    parts: list[Any] = [
        Text("machine: " + machine_line(results)),
        Text("engines: " + engines_line(results)),
        table,
        *[Text(n, style="dim") for n in notes],
    ]
    extra = _other_workloads(results)
    if extra is not None:
        parts.append(extra)
    parts.append(claims)
    parts += [Text(f"[{i + 1}] {f}", style="dim") for i, f in enumerate(footnotes)]
    return Group(*parts)


def _workload_start(t: dict[str, Any], w: str) -> str:
    """Cold start p50 of one workload; a template restore, named, where only that ran."""
    cold = _p50(t.get("cold_start", {}).get(w, {}))
    restored = _p50((t.get("template_restore") or {}).get(w) or {})
    if cold == "-" and restored != "-":
        return f"template {restored}"
    return cold


def _other_workloads(results: dict[str, Any]) -> Table | None:
    wl = results.get("config", {}).get("workloads") or []
    if len(wl) < 2:
        return None
    table = Table(title="cold start by workload (p50)", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("tier")
    for w in wl:
        table.add_column(w, overflow="fold")
    for name, t in results["tiers"].items():
        if t["status"] == "unavailable":
            continue
        table.add_row(name, *[_workload_start(t, w) for w in wl])
    return table


# ---------------------------------------------------------------- markdown


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _stats_row(label: str, s: dict[str, Any]) -> list[str]:
    if s.get("status") not in (None, "ok") or s.get("p50_ms") is None:
        return [label, "-", "-", "-", "-", "-", "-", _na(s, 200) if s else "-"]
    return [
        label,
        str(s["n"]),
        fmt_ms(s["p50_ms"]),
        fmt_ms(s["p95_ms"]),
        f"{fmt_ms(s['min_ms'])} - {fmt_ms(s['max_ms'])}",
        f"{s['spread_pct']:.0f}%",
        str(s.get("outliers", 0)),
        s.get("note", ""),
    ]


STATS_HEADER = ["", "n", "p50", "p95", "min - max", "spread (p95/p50-1)", "outliers", "note"]


def tier_details(name: str, t: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """Sections of one tier as (kind, title, payload): kind is table or text."""
    out: list[tuple[str, str, Any]] = []
    if t["status"] == "unavailable":
        out.append(("text", "", f"Unavailable here: {t.get('error')}"))
        return out
    out.append(
        ("text", "", f"Status: {status_cell(t)}. Claimed isolation: {t.get('isolation_claimed')}")
    )
    rows = []
    for w, cs in t.get("cold_start", {}).items():
        rows.append(_stats_row(f"cold start: {w}", cs))
        if cs.get("status") == "ok":
            for part in ("create_ms", "first_exec_ms", "close_ms"):
                sub = cs.get(part) or {}
                if sub.get("n"):
                    rows.append(_stats_row(f"  {part[:-3].replace('_', ' ')}: {w}", sub))
    for w, ex in t.get("exec_latency", {}).items():
        rows.append(_stats_row(f"exec: {w}", ex))
    ws = t.get("warm_start", {})
    rows.append(_stats_row(f"warm start: {ws.get('method', 'restore')}", ws))
    inst = t.get("memory", {}).get("instantiate_us")
    if inst:
        rows.append(_stats_row("wasmtime instantiate only", inst))
    out.append(("table", "Timings", (STATS_HEADER, rows)))
    m = t.get("memory", {})
    if m.get("status") == "ok":
        wasm = bool(t.get("in_process"))
        mrows = [
            [
                str(r["instances"]),
                fmt_bytes(r.get("avg_pss_bytes", r.get("avg_rss_growth_bytes"))),
                fmt_bytes(r.get("avg_cgroup_bytes", r.get("avg_heap_growth_bytes"))),
                fmt_bytes(r["avg_bytes"]),
                fmt_bytes(r["total_bytes"]),
            ]
            for r in m.get("checkpoints", [])
        ]
        header = (
            ["instances", "avg RSS growth", "avg heap growth", "avg cost (larger)", "total"]
            if wasm
            else ["instances", "avg PSS", "avg cgroup charge", "avg cost (larger)", "total"]
        )
        note = " ".join(x for x in (m.get("note"), m.get("address_space_note")) if x)
        out.append(("text", "", f"Memory method: {m.get('method')}. {note}".strip()))
        out.append(
            (
                "table",
                "Memory per idle instance",
                (header, mrows),
            )
        )
    else:
        out.append(("text", "", f"Memory: {_na(m, 300) if m else '-'}"))
    d = t.get("density", {})
    dtext = density_cell(t)
    if d.get("stop_reason"):
        dtext += f" — {d['stop_reason']} after {d.get('elapsed_s')} s"
    out.append(("text", "", f"Density: {dtext}"))
    iso = t.get("isolation", {})
    probes = iso.get("probes") or {}
    if probes:
        prow = []
        for p in PROBES:
            v = probes.get(p)
            if v is None:
                continue
            run = v.get("run")
            ran = (
                f"{run['termination']} ({run['exit_code']}) in {fmt_ms(run['duration_ms'])}"
                if run
                else "no run"
            )
            contained = {True: "yes", False: "NO", None: "n/a"}[v.get("contained")]
            prow.append(
                [f"can it {QUESTIONS[p]}?", str(v["value"]), contained, str(v["detail"]), ran]
            )
        summary = (iso.get("summary") or {}).get("text", "")
        out.append(
            (
                "table",
                f"Isolation probes: {summary}",
                (["probe", "value", "contained", "evidence", "run"], prow),
            )
        )
    else:
        out.append(("text", "", f"Isolation: {_na(iso, 300) if iso else '-'}"))
    out.append(("text", "", f"Runs ended: {terminations_cell(t)}"))
    errs = t.get("errors", [])
    if errs:
        out.append(
            ("table", "Errors", (["phase", "error"], [[e["phase"], e["error"]] for e in errs]))
        )
    return out


def machine_rows(results: dict[str, Any]) -> list[list[str]]:
    m = results["machine"]
    acc = m.get("accelerator", {})
    rows = [
        ["cores", f"{m.get('cores')} ({m.get('cores_usable')} usable)"],
        ["CPU", str(m.get("cpu_model"))],
        ["memory", fmt_bytes(m.get("memory_total_bytes"))],
        ["OS / kernel", f"{m.get('os')} / {m.get('kernel')} ({m.get('arch')})"],
        ["host is a VM", "yes" if m.get("host_is_vm") else "no"],
        ["accelerator (VM tiers)", f"{acc.get('kind')} — {acc.get('source')}"],
        [
            "python / tierbox / wasmtime",
            f"{m.get('python')} / {m.get('tierbox')} / {m.get('wasmtime')}",
        ],
    ]
    for name, e in m.get("engines", {}).items():
        what = engine_label(e)
        rows.append(
            [f"engine: {name}", what if e.get("available") else f"unavailable: {e.get('reason')}"]
        )
    return rows


def method_notes(results: dict[str, Any]) -> list[str]:
    cfg = results.get("config", {})
    return [
        f"Cold start = Sandbox.create -> first result of the workload; {cfg.get('warmup')} warm-up "
        f"run(s) discarded, up to {cfg.get('runs')} timed (each timed loop stops early at "
        f"{cfg.get('phase_time_s')} s). p50/p95 interpolated; spread = p95/p50 - 1; outliers "
        "(> Q3 + 1.5 IQR) are counted, kept in p95, and cannot move p50.",
        "Warm start = Sandbox.restore(snapshot of an idle sandbox) -> first result; where a "
        "tier can only revert in place (vm), revert(snapshot) -> first result.",
        "Memory = PSS summed over the sandbox's host processes (cgroup pids, or the VMM "
        "process); the bench's own process is excluded. The cgroup's charge (which also holds "
        "kernel memory) is shown beside it, and density counts the larger of the two. "
        "Wasm runs in-process: its cost is the "
        "bench process's growth per instance over many (the larger of RSS growth and malloc "
        "heap growth: freed heap pages being reused hide growth from RSS).",
        f"Density = idle instances added one at a time until their measured memory exceeds "
        f"{fmt_bytes(cfg.get('budget_bytes'))}; stopped early at {cfg.get('density_cap')} "
        f"instances (x10 for tiers creating one in < 20 ms) or {cfg.get('density_time_s')} s, "
        "or when the host's MemAvailable nears its floor; 'projected' divides the budget by the "
        "measured average.",
        "Isolation = probes run inside each tier against things the bench planted on the host "
        "(a canary process, a secret file, a TCP listener); values come from those runs. "
        "Three are attacks: a user namespace with a tmpfs mounted in it, the kernel keyring "
        "(keyctl, add_key), and the file-API race (the workload swaps a directory with a link "
        "to / while the host reads a file under it through the files API; every read that "
        "returns the host's planted file is a leak). "
        "'contained' is judged from the host's side.",
    ]


def claim_rows(results: dict[str, Any]) -> tuple[list[list[str]], list[str]]:
    """Claims as table rows, each explanation once as a numbered footnote."""
    rows: list[list[str]] = []
    notes: list[str] = []
    for c in results.get("claims", []):
        mark = ""
        if c.get("footnote"):
            if c["footnote"] not in notes:
                notes.append(c["footnote"])
            mark = f" [{notes.index(c['footnote']) + 1}]"
        rows.append([c["claim"], c["claimed"] + mark, c["measured"], c["ratio"]])
    return rows, notes


def markdown(results: dict[str, Any], charts: list[dict[str, str]]) -> str:
    w = primary_workload(results)
    lines = [
        "# tierbox bench",
        "",
        f"Mode **{results['mode']}**, started {results['started_at']}, took "
        f"{results.get('duration_s')} s. Primary workload: `{w}`.",
        "",
        "## Machine",
        "",
        _md_table(["fact", "value"], machine_rows(results)),
        "",
        "## Summary",
        "",
        _md_table(list(COLUMNS), summary_rows(results)),
        "",
        "## Claimed vs measured here",
        "",
        _md_table(["claim", "claimed", "measured here", "ratio"], claim_rows(results)[0]),
        "",
        *[f"[{i + 1}] {f}" for i, f in enumerate(claim_rows(results)[1])],
        "",
    ]
    if charts:
        lines += ["## Charts", ""]
        for c in charts:
            lines += [f"![{c['title']}]({c['file']})", "", f"*{c['title']}*", ""]
    lines += ["## Tiers", ""]
    for name, t in results["tiers"].items():
        lines += [f"### {name}", ""]
        for kind, title, payload in tier_details(name, t):
            if kind == "text":
                lines += [payload, ""]
            else:
                header, rows = payload
                lines += [f"**{title}**", "", _md_table(header, rows), ""]
    lines += ["## Method", ""] + [f"- {n}" for n in method_notes(results)] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- html

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f2f2f2}
tr.bad td{color:#a00}
td.no{color:#a00;font-weight:bold}
img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}
code{background:#f4f4f4;padding:0 3px}
td.kvm{background:repeating-linear-gradient(45deg,#fff,#fff 4px,#e4e4e4 4px,#e4e4e4 8px)}
p.note{font-size:0.85em;color:#555}
figure.chart{display:inline-block;vertical-align:top;margin:0 1em 1em 0}
"""


def _cell_class(c: str) -> str:
    if c == "NO":
        return " class=no"
    if "(KVM claim)" in c:
        return " class=kvm"
    return ""


def _html_table(
    header: list[str],
    rows: list[list[str]],
    bad_col: int | None = None,
    table_id: str | None = None,
) -> str:
    ident = f" id='{table_id}'" if table_id else ""
    out = [f"<table{ident}><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        cls = ""
        if bad_col is not None and str(r[bad_col]).endswith(("(failed)", "(unavailable)")):
            cls = ' class="bad"'
        cells = "".join(f"<td{_cell_class(str(c))}>{html.escape(str(c))}</td>" for c in r)
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def html_report(results: dict[str, Any], charts: list[dict[str, str]]) -> str:
    w = primary_workload(results)
    notes = claim_rows(results)[1]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>tierbox bench</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>tierbox bench</h1>",
        f"<p>Mode <b>{html.escape(results['mode'])}</b>, started "
        f"{html.escape(results['started_at'])}, took {results.get('duration_s')} s. "
        f"Primary workload: <code>{html.escape(w)}</code>.</p>",
        "<h2>Machine</h2>",
        _html_table(["fact", "value"], machine_rows(results)),
        "<h2>Summary</h2>",
        _html_table(list(COLUMNS), summary_rows(results), bad_col=0, table_id="summary"),
        "<h2>Claimed vs measured here</h2>",
        _html_table(
            ["claim", "claimed", "measured here", "ratio"],
            claim_rows(results)[0],
            table_id="claims",
        ),
        *[f"<p class='note'>[{i + 1}] {html.escape(f)}</p>" for i, f in enumerate(notes)],
    ]
    if charts:
        parts.append("<h2>Charts</h2>")
        for c in charts:
            parts.append(
                f"<figure class='chart' id='chart-{html.escape(Path(c['file']).stem)}'>"
                f"<img src='{html.escape(c['file'])}' alt='{html.escape(c['title'])}'>"
                f"<figcaption><b class='title'>{html.escape(c['title'])}</b><br>"
                f"<span class='axis x'>x: {html.escape(c['x_label'])}</span>; "
                f"<span class='axis y'>y: {html.escape(c['y_label'])}</span></figcaption>"
                "</figure>"
            )
    parts.append("<h2>Tiers</h2>")
    for name, t in results["tiers"].items():
        parts.append(f"<h3>{html.escape(name)}</h3>")
        for kind, title, payload in tier_details(name, t):
            if kind == "text":
                parts.append(f"<p>{html.escape(payload)}</p>")
            else:
                header, rows = payload
                parts.append(f"<p><b>{html.escape(title)}</b></p>")
                parts.append(_html_table(header, rows))
    parts.append("<h2>Method</h2><ul>")
    parts += [f"<li>{html.escape(n)}</li>" for n in method_notes(results)]
    parts.append("</ul></body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------- files


def to_json(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=1, default=str)


def write_reports(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """results.json, report.md, report.html and the PNG charts in ``out_dir``."""
    from tierbox.bench.charts import write_charts

    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    try:
        charts = [asdict(c) for c in write_charts(results, out_dir)]
    except Exception as exc:  # e.g. matplotlib missing: the reports still get written
        charts = []
        results["charts_error"] = f"{type(exc).__name__}: {exc}"
    # title -> file is what the daemon's dashboard reads; the axes ride beside it
    results["charts"] = {c["title"]: c["file"] for c in charts}
    results["chart_axes"] = {c["file"]: [c["x_label"], c["y_label"]] for c in charts}
    (out_dir / "results.json").write_text(to_json(results) + "\n")
    (out_dir / "report.md").write_text(markdown(results, charts))
    (out_dir / "report.html").write_text(html_report(results, charts))
    written["results.json"] = out_dir / "results.json"
    written["report.md"] = out_dir / "report.md"
    written["report.html"] = out_dir / "report.html"
    for c in charts:
        written[c["title"]] = out_dir / c["file"]
    return written


def render_saved(results_json: Path, out_dir: Path) -> dict[str, Path]:
    """The report and charts again from a saved results.json (no measuring)."""
    results = json.loads(results_json.read_text())
    results.pop("charts_error", None)
    return write_reports(results, out_dir)


__all__ = [
    "COLUMNS",
    "LABELS",
    "html_report",
    "markdown",
    "rich_report",
    "summary_rows",
    "to_json",
    "write_reports",
]
