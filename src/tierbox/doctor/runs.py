"""Diagnose a tierbox run from its history record (:mod:`tierbox.history`):
how it ended, its limits, and the samples taken while it ran."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tierbox.doctor import memory
from tierbox.doctor.model import (
    HEADROOM,
    OOM_HEADROOM,
    Cause,
    Diagnosis,
    Fix,
    cpu_patch,
    memory_patch,
    round_up_mib,
)

MIB = 1 << 20
#: a run whose CPU time ran at this share of its quota (or was throttled this
#: share of the time) was held back by it
THROTTLED_SHARE = 0.8
THROTTLED_TIME_SHARE = 0.2
#: evidence keys that say the memory evidence is the guest's, the samples the VMM's
_GUEST_KEYS = ("guest_mem_total_mib", "guest_oom_kill_total")


def _subject(rec: dict[str, Any]) -> str:
    where = rec.get("sandbox_name") or rec.get("sandbox_id")
    argv = " ".join(rec.get("argv") or [])[:80] or "(the image's command)"
    sandbox = f" in sandbox {where}" if where else " (one-shot)"
    return (
        f"run {rec.get('run_id')}: {argv!r} on {rec.get('tier')}"
        f"{sandbox}, image {rec.get('image') or '-'}"
    )


def _series(rec: dict[str, Any]) -> dict[str, list[Any]]:
    s = rec.get("samples") or {}
    return {k: list(v) for k, v in s.items() if isinstance(v, list)}


def _memory_points(
    rec: dict[str, Any], ev: dict[str, Any]
) -> tuple[list[tuple[float, float]], str]:
    """(seconds, MiB) of the workload, and the scope of those numbers: the
    run's end is added from the evidence (the cgroup's peak) when both speak
    of the same memory."""
    s = _series(rec)
    t, mem = s.get("t_s", []), s.get("memory_bytes", [])
    engine = s.get("engine_memory_bytes", [])
    vmm = any(k in ev for k in _GUEST_KEYS)
    scope = "vmm" if vmm else "workload"
    # a one-shot gVisor cgroup holds runsc too; its measured share is in the evidence
    overhead = 0.0
    if not any(e is not None for e in engine) and "engine_overhead_mib" in ev:
        overhead = float(ev["engine_overhead_mib"])
    pts = [
        (float(ti), max(float(mi) / MIB - overhead, 0.0))
        for ti, mi in zip(t, mem, strict=False)
        if ti is not None and mi is not None
    ]
    if rec.get("kind") == "one_shot" and not vmm and (not pts or pts[0][0] > 0.0):
        pts.insert(0, (0.0, 0.0))  # a one-shot sandbox starts empty
    peak = _demand_mib(ev)
    duration = float(rec.get("duration_s") or 0.0)
    if not vmm and peak is not None and (not pts or peak > pts[-1][1]):
        end = max(duration, pts[-1][0] + 0.001 if pts else duration)
        pts.append((end, peak))
    return pts, scope


def _demand_mib(ev: dict[str, Any]) -> float | None:
    """The memory the workload reached, or asked to reach: where growth is
    refused rather than killed (wasm), the size its refused request asked for
    (the current size included)."""
    peak = ev.get("peak_mib")
    if not isinstance(peak, int | float):
        return None
    asked = ev.get("memory_grow_last_requested_mib")
    return max(float(peak), float(asked) if isinstance(asked, int | float) else 0.0)


def _cpu(rec: dict[str, Any]) -> dict[str, float]:
    """CPU time used and throttled over the sampled span, as rates."""
    s = _series(rec)
    t = s.get("t_s", [])
    out: dict[str, float] = {}
    for key in ("cpu_s", "cpu_throttled_s"):
        vals = [(ti, v) for ti, v in zip(t, s.get(key, []), strict=False) if v is not None]
        if len(vals) >= 2 and vals[-1][0] > vals[0][0]:
            span = vals[-1][0] - vals[0][0]
            out[key] = vals[-1][1] - vals[0][1]
            out[f"{key}_per_s"] = (vals[-1][1] - vals[0][1]) / span
            out["span_s"] = span
    return out


def _peak_mib(rec: dict[str, Any], ev: dict[str, Any]) -> float | None:
    peak = ev.get("peak_mib")
    if isinstance(peak, int | float):
        return float(peak)
    mem = [m for m in _series(rec).get("memory_bytes", []) if m is not None]
    return max(mem) / MIB if mem else None


def diagnose_run(rec: dict[str, Any]) -> Diagnosis:
    """The diagnosis of one run record."""
    term = rec.get("termination") or {}
    kind = term.get("kind")
    ev: dict[str, Any] = dict(term.get("evidence") or {})
    limits: dict[str, Any] = rec.get("limits") or {}
    limit_mib = ev.get("limit_mib", limits.get("memory_mib"))
    name = rec.get("sandbox_name") or "app"
    facts: dict[str, Any] = {
        "run_id": rec.get("run_id"),
        "tier": rec.get("tier"),
        "image": rec.get("image"),
        "termination": term,
        "exit_code": rec.get("exit_code"),
        "limits": limits,
        "duration_s": rec.get("duration_s"),
        "samples": len(_series(rec).get("t_s", [])),
    }
    subject = _subject(rec)
    cpu = _cpu(rec)
    if cpu:
        facts["cpu"] = {k: round(v, 3) for k, v in cpu.items()}
    findings = [f"ended: {_describe(term)} after {float(rec.get('duration_s') or 0):.2f} s"]
    if rec.get("error"):
        findings.append(f"the command raised {rec['error']}")
    if rec.get("sampling_error"):
        findings.append(f"sampling stopped: {rec['sampling_error']}")

    def done(cause: Cause, summary: str, fixes: list[Fix]) -> Diagnosis:
        return Diagnosis(cause, subject, "tierbox-run", summary, findings, fixes, facts)

    if kind is None:
        return done(
            Cause.NONE,
            "the run did not finish with a result (the command raised); nothing to diagnose",
            [],
        )
    if kind == "output_limit":
        cap = ev.get("output_bytes", limits.get("output_bytes"))
        findings.append(f"a stream passed the output cap of {cap} bytes and the run was stopped")
        return done(
            Cause.OUTPUT_LIMIT,
            f"it wrote more than {cap} bytes to stdout or stderr",
            [
                Fix(
                    "write large output to a file in the sandbox and copy it out "
                    "(sb.files.download), or raise the cap (Limits.output_bytes / "
                    "make_spec(output_bytes=...))",
                )
            ],
        )
    cpus = limits.get("cpus")
    throttled = _throttled(cpu, cpus, float(rec.get("duration_s") or 0.0))
    ok_exit = kind == "exited" and term.get("exit_code") == 0
    if kind == "cpu_limit" or ((kind == "timed_out" or ok_exit) and throttled):
        if kind == "cpu_limit":
            findings.append(
                "the CPU budget ran out: the wasm tier turns --cpus into fuel "
                "(cpus x timeout_s x the engine's fuel per CPU-second)"
            )
        else:
            findings.append(throttled)
        more = round(max((cpus or 1.0) * 2, 0.1), 2)
        return done(
            Cause.CPU_THROTTLED,
            f"its CPU limit ({cpus} CPU) held it back"
            + (" until it timed out" if kind == "timed_out" else ""),
            [
                Fix(
                    f"give it more CPU: {more} CPU (Kubernetes: a request, and no CPU limit, "
                    "which throttles even an idle node)",
                    [f"--cpus {more}"],
                    cpu_patch(name, more),
                )
            ],
        )
    if kind == "timed_out":
        timeout = ev.get("timeout_s", limits.get("timeout_s"))
        rate = cpu.get("cpu_s_per_s")
        if rate is not None:
            findings.append(
                f"it used {rate:.2f} CPU on average: "
                + ("busy computing" if rate > 0.5 else "mostly waiting (I/O, sleep, a lock)")
            )
        longer = f"{round(float(timeout) * 2)}s" if timeout else "120s"
        return done(
            Cause.TIMED_OUT,
            f"it was still running when its {timeout} s time limit ran out",
            [Fix(f"give it longer ({longer}) or find what it waits for", [f"--timeout {longer}"])],
        )
    if kind == "oom_killed":
        return _oom(rec, ev, limit_mib, name, findings, done)
    hits = ev.get("pids_max_hits") or ev.get("engine_pids_max_hits")
    if hits:
        pids = ev.get("pids_limit", limits.get("pids"))
        findings.append(f"{hits} fork(s) were refused at the pids limit of {pids}")
        more = int(pids) * 2 if pids else 256
        return done(
            Cause.PIDS_LIMIT,
            f"it tried to run more than {pids} processes or threads at once",
            [Fix(f"raise the pids limit to {more}, or bound its workers", [f"--pids {more}"])],
        )
    if kind == "signaled":
        findings.append(
            f"killed by {ev.get('signal_name', term.get('signal'))}: not a limit tierbox "
            "enforces; a crash in the program (or something sent it the signal)"
        )
        facts["ended_badly"] = True
        return done(Cause.NONE, "no resource limit ended it: the program crashed", [])
    code = term.get("exit_code")
    if code not in (0, None):
        facts["ended_badly"] = True
        tail = (rec.get("stderr_tail") or "").strip().splitlines()[-3:]
        if tail:
            findings.append("stderr ends: " + " | ".join(tail))
        return done(Cause.NONE, f"it exited with code {code}; no limit was reached", [])
    return done(Cause.NONE, "it ended well: exit code 0, no limit reached", [])


def _throttled(cpu: dict[str, float], cpus: float | None, duration_s: float) -> str:
    """Why the CPU limit held the run back, or '' when it did not."""
    if not cpus:
        return ""
    rate = cpu.get("cpu_s_per_s")
    thr = cpu.get("cpu_throttled_s_per_s")
    if thr is not None and thr >= THROTTLED_TIME_SHARE:
        return (
            f"the CPU quota throttled it {cpu.get('cpu_throttled_s', 0):.2f} s over "
            f"{cpu.get('span_s', duration_s):.2f} s (cgroup cpu.stat), using "
            f"{rate or 0:.2f} of its {cpus} CPU"
        )
    if rate is not None and rate >= THROTTLED_SHARE * cpus:
        return (
            f"it used {rate:.2f} CPU on average against a limit of {cpus} CPU: pinned at its quota"
        )
    return ""


def _oom(
    rec: dict[str, Any],
    ev: dict[str, Any],
    limit_mib: Any,
    name: str,
    findings: list[str],
    done: Callable[[Cause, str, list[Fix]], Diagnosis],
) -> Diagnosis:
    peak = _peak_mib(rec, ev)
    limit = float(limit_mib) if isinstance(limit_mib, int | float) else None
    findings.append(
        f"the kernel's OOM killer struck ({ev.get('oom_kill', '?')} kill(s)) at a limit of "
        f"{limit_mib} MiB; peak {peak if peak is not None else '?'} MiB"
        + (
            f" (the engine's own {ev['engine_overhead_mib']} MiB apart; on gVisor the host's "
            "OOM killer stops the whole sandbox)"
            if "engine_overhead_mib" in ev
            else ""
        )
    )
    pts, scope = _memory_points(rec, ev)
    shape = memory.shape(pts, limit if scope == "workload" else None)
    diag_facts = {"memory": {"scope": scope, **shape.to_dict()}, "limit_mib": limit_mib}
    if peak is not None:
        diag_facts["peak_mib"] = peak
    if scope == "vmm":
        findings.append(
            "samples are the VM's host memory (QEMU, guest kernel and workload): their shape "
            "is the workload's growth, their level is not"
        )
    demand = _demand_mib(ev)
    if demand is not None and "memory_grow_last_requested_mib" in ev:
        findings.append(
            f"its last request to grow to {ev['memory_grow_last_requested_mib']} MiB was "
            f"refused at {peak} MiB: it needed at least {demand:.0f} MiB"
        )
        need = round_up_mib(demand * HEADROOM)
    else:
        need = round_up_mib(max(peak or 0.0, limit or 0.0) * OOM_HEADROOM)
    bigger = Fix(
        f"give it {need} MiB: it was killed at {limit_mib} MiB, so it needs more than that "
        "(measure again with the new limit)",
        [f"--memory {need}m"],
        memory_patch(name, need),
    )
    code = ev.get("exit_code", (rec.get("termination") or {}).get("exit_code"))
    if code == 0 and (rec.get("termination") or {}).get("signal") is None:
        findings.append("the main process exited 0 after the kill: the process killed was a child")
        diag = done(
            Cause.CHILD_OOM,
            "a child process was killed for memory while the main process survived and "
            "exited 0: its work may be missing from the result",
            [bigger, Fix("make the parent check its children's exit status (137 = SIGKILL)")],
        )
        diag.facts.update(diag_facts)
        return diag
    findings.append(f"memory: {shape.reason}")
    if shape.kind == "leak" and shape.fit is not None:
        fit = shape.fit
        per_100ms = fit.slope_mib_s / 10
        diag = done(
            Cause.LEAK,
            f"memory grew {per_100ms:.1f} MiB per 100 ms (± {fit.stderr_mib_s / 10:.2f}, "
            f"R² {fit.r2:.2f}) until the {limit_mib} MiB limit: a leak",
            [
                Fix(
                    "this looks like a leak: raising the limit only delays it "
                    f"(at {fit.slope_mib_s:.1f} MiB/s, {need} MiB lasts "
                    f"{max(need - shape.base_mib, 0) / fit.slope_mib_s:.1f} s); find what "
                    "keeps growing (a cache without bound, buffers kept per request)"
                )
            ],
        )
    elif shape.kind == "spike":
        diag = done(
            Cause.SPIKE,
            f"memory jumped by {shape.peak_mib - shape.base_mib:.0f} MiB at once after "
            f"{shape.steady_s:.1f} s steady at {shape.base_mib:.0f} MiB, past the "
            f"{limit_mib} MiB limit",
            [bigger, Fix("or bound that one allocation: stream or chunk the input it loads")],
        )
    elif shape.kind == "working_set":
        diag = done(
            Cause.WORKING_SET_TOO_LARGE,
            f"what it holds at once is larger than the {limit_mib} MiB limit: {shape.reason}",
            [bigger],
        )
    else:
        findings.append("too few samples to tell a leak from a spike")
        diag = done(
            Cause.OOM_KILLED,
            f"killed for memory at the {limit_mib} MiB limit",
            [bigger],
        )
    diag.facts.update(diag_facts)
    return diag


def _describe(term: dict[str, Any]) -> str:
    kind = term.get("kind", "?")
    if kind == "exited":
        return f"exited with code {term.get('exit_code')}"
    if kind == "signaled":
        return f"killed by signal {term.get('signal')}"
    ev = term.get("evidence") or {}
    detail = ", ".join(f"{k}={v}" for k, v in ev.items() if k not in ("guest_kernel",))
    return f"{kind} ({detail})" if detail else kind
