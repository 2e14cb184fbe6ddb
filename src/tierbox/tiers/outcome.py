"""Turn what was observed about a run into a Termination with evidence.

Shared by every tier that runs host processes under a tierbox cgroup, so the
rules (timeout beats OOM beats exit status) are written once.
"""

from __future__ import annotations

import signal
from dataclasses import replace
from typing import Any

from tierbox.host.capture import Captured, StopReason
from tierbox.host.cgroups import SandboxCgroup
from tierbox.spec import MIB, ExecResult, Limits, Termination, TerminationKind


def cgroup_evidence(cg: SandboxCgroup | None, limits: Limits) -> dict[str, Any]:
    if cg is None:
        return {}
    st = cg.stats()
    ev: dict[str, Any] = {}
    if limits.memory_mib is not None:
        ev["limit_mib"] = limits.memory_mib
    cg_limit = cg.memory_limit_bytes()
    if (
        limits.memory_mib is not None
        and cg_limit is not None
        and cg_limit // MIB != limits.memory_mib
    ):
        ev["cgroup_limit_mib"] = cg_limit // MIB  # workload limit plus the engine's own overhead
    if st.memory_peak_bytes is not None:
        ev["peak_mib"] = round(st.memory_peak_bytes / MIB, 1)
    return ev


def classify(
    cap: Captured,
    *,
    limits: Limits,
    timeout_s: float | None,
    cg: SandboxCgroup | None,
    oom_kills_before: int,
    status_from_runtime: bool,
    pids_hits_before: int = 0,
) -> ExecResult:
    """Build the ExecResult. ``status_from_runtime``: the return code came from an
    OCI runtime, which reports a signal death as 128+signal rather than -signal."""
    oom_delta = (cg.oom_kills() - oom_kills_before) if cg is not None else 0
    rc = cap.returncode
    sig: int | None = None
    if rc < 0:
        sig = -rc
    elif status_from_runtime and 128 < rc < 128 + signal.NSIG:
        sig = rc - 128
    term: Termination
    if cap.stop is StopReason.TIMEOUT and oom_delta > 0:
        # memory ran out first; what hung afterwards (a gVisor Sentry whose
        # helper the host's OOM killer took) waited for the timeout's kill
        ev = cgroup_evidence(cg, limits)
        ev.update(oom_kill=oom_delta, then_timed_out_s=timeout_s)
        term = Termination(TerminationKind.OOM_KILLED, signal=int(signal.SIGKILL), evidence=ev)
    elif cap.stop is StopReason.TIMEOUT:
        term = Termination(
            TerminationKind.TIMED_OUT, signal=int(signal.SIGKILL), evidence={"timeout_s": timeout_s}
        )
    elif cap.stop is StopReason.OUTPUT_LIMIT:
        term = Termination(
            TerminationKind.OUTPUT_LIMIT,
            signal=int(signal.SIGKILL),
            evidence={"output_bytes": limits.output_bytes},
        )
    elif oom_delta > 0:
        ev = cgroup_evidence(cg, limits)
        ev["oom_kill"] = oom_delta
        term = Termination(
            TerminationKind.OOM_KILLED,
            exit_code=rc if sig is None else None,
            signal=sig,
            evidence=ev,
        )
    elif sig is not None:
        term = Termination(
            TerminationKind.SIGNALED, signal=sig, evidence={"signal_name": signame(sig)}
        )
    else:
        term = Termination(TerminationKind.EXITED, exit_code=rc)
    pids_hits = (cg.pids_max_hits() - pids_hits_before) if cg is not None else 0
    if pids_hits > 0:
        term.evidence["pids_max_hits"] = pids_hits
        term.evidence["pids_limit"] = limits.pids
    return ExecResult(
        stdout=cap.stdout,
        stderr=cap.stderr,
        termination=term,
        duration_s=cap.duration_s,
        stdout_truncated=cap.stdout_truncated,
        stderr_truncated=cap.stderr_truncated,
    )


def engine_evidence(
    result: ExecResult, *, engine_mib: float | None, engine_pids_limit: int | None
) -> ExecResult:
    """Evidence for an engine that shares the sandbox's cgroup with the
    workload (gVisor's Sentry): the cgroup's peak and pids counter are split
    into the workload's and the engine's, so ``limit_mib`` and ``peak_mib``
    mean the workload's on every tier. ``engine_mib``: what the engine held
    when the run began (its share cannot be read once an OOM kill stopped it)."""
    old = result.termination.evidence
    ev: dict[str, Any] = {}
    if result.termination.kind is TerminationKind.OOM_KILLED and engine_mib is not None:
        if "limit_mib" in old:
            ev["limit_mib"] = old["limit_mib"]
        if "peak_mib" in old:  # the cgroup's peak, engine included
            ev["peak_mib"] = round(max(float(old["peak_mib"]) - engine_mib, 0.0), 1)
        ev["engine_overhead_mib"] = round(engine_mib, 1)
    for key, value in old.items():
        if key == "pids_max_hits":  # the host cgroup's task cap is the engine's
            ev["engine_pids_max_hits"] = value
            ev["engine_pids_limit"] = engine_pids_limit
        elif key != "pids_limit":
            ev.setdefault(key, value)
    if ev == old:
        return result
    return replace(result, termination=replace(result.termination, evidence=ev))


def not_runnable(program: str, exc: OSError, duration_s: float) -> ExecResult:
    """The one result for a command the sandbox cannot run, on every tier:
    exit status 127 (not found) or 126 (not executable) with one line on
    stderr, as a shell reports it."""
    missing = isinstance(exc, FileNotFoundError)
    why = "command not found" if missing else (exc.strerror or "cannot execute")
    code = 127 if missing else 126
    return ExecResult(
        stdout=b"",
        stderr=f"tierbox: {program}: {why}\n".encode(),
        termination=Termination(TerminationKind.EXITED, exit_code=code),
        duration_s=duration_s,
    )


def signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def classify_agent(
    out: Any, *, timeout_s: float | None, output_bytes: int, memory_mib: int | None
) -> ExecResult:
    """One exec as reported by the guest agent (microvm and vm tiers): the
    agent's reason, exit status and the guest kernel's counters, as an ExecResult."""
    f: dict[str, str] = out.fields

    def num(key: str) -> int | None:
        try:
            return int(f[key])
        except (KeyError, ValueError):
            return None

    reason = f.get("reason", "exited")
    sig = num("signal")
    code = num("exit_code")
    oom_delta = (num("oom_kill_after") or 0) - (num("oom_kill_before") or 0)
    cg_oom = max(num("cgroup_oom_kill") or 0, 0)
    extra: dict[str, Any] = {}
    hits = num("pids_max_hit") or 0
    if hits > 0:
        extra = {"pids_limit": num("pids_max"), "pids_max_hits": hits}
    term: Termination
    if reason == "timeout":
        term = Termination(
            TerminationKind.TIMED_OUT,
            signal=int(signal.SIGKILL),
            evidence={"timeout_s": timeout_s, **extra},
        )
    elif reason == "output_limit":
        term = Termination(
            TerminationKind.OUTPUT_LIMIT,
            signal=int(signal.SIGKILL),
            evidence={"output_bytes": output_bytes},
        )
    elif cg_oom > 0 or (oom_delta > 0 and sig == signal.SIGKILL):
        ev: dict[str, Any] = {
            "limit_mib": memory_mib,
            "oom_kill": max(cg_oom, oom_delta),
            "guest_oom_kill_total": num("oom_kill_after"),
        }
        peak = num("memory_peak_bytes")
        if peak is not None:
            ev["peak_mib"] = round(peak / MIB, 1)
        total = num("mem_total_kib")
        if total is not None:
            ev["guest_mem_total_mib"] = round(total / 1024, 1)
        if f.get("kmsg"):
            ev["guest_kernel"] = f["kmsg"].splitlines()[-1]
        term = Termination(
            TerminationKind.OOM_KILLED,
            exit_code=code if sig is None else None,
            signal=sig,
            evidence=ev,
        )
    elif reason == "killed":  # the host's deadline passed before the guest's own
        term = Termination(
            TerminationKind.TIMED_OUT,
            signal=int(signal.SIGKILL),
            evidence={"timeout_s": timeout_s, "killed_by": "host", **extra},
        )
    elif sig is not None:
        term = Termination(
            TerminationKind.SIGNALED, signal=sig, evidence={"signal_name": signame(sig), **extra}
        )
    else:
        term = Termination(TerminationKind.EXITED, exit_code=code, evidence=extra)
    return ExecResult(
        stdout=out.stdout,
        stderr=out.stderr,
        termination=term,
        duration_s=out.duration_s,
        stdout_truncated=out.stdout_truncated,
        stderr_truncated=out.stderr_truncated,
    )
