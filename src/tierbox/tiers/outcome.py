"""Turn what was observed about a run into a Termination with evidence.

Shared by every tier that runs host processes under a tierbox cgroup, so the
rules (timeout beats OOM beats exit status) are written once.
"""

from __future__ import annotations

import signal
from typing import Any

from tierbox.host.capture import Captured, StopReason
from tierbox.host.cgroups import SandboxCgroup
from tierbox.spec import ExecResult, Limits, Termination, TerminationKind

MIB = 1024 * 1024


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
    if cap.stop is StopReason.TIMEOUT:
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
            TerminationKind.SIGNALED, signal=sig, evidence={"signal_name": _signame(sig)}
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


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)
