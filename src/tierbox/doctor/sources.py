"""Endings tierbox did not run itself: a Kubernetes pod (``kubectl get pod
-o json|yaml``, with the node's events when given), ``docker inspect`` or
``podman inspect`` output, and a cgroup directory (v1 or v2 counters).

None of these carries a memory history, so an OOM kill is named
``oom_killed``: only the limit and the counters are known."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import yaml

from tierbox.autoscale.quantity import parse_quantity
from tierbox.doctor.model import OOM_HEADROOM, Cause, Diagnosis, Fix, memory_patch, round_up_mib
from tierbox.errors import DoctorInputError, HPASpecError

MIB = 1 << 20
#: restarts after which a container that keeps failing is a crash loop
CRASH_LOOP_RESTARTS = 3
#: event reasons worth showing next to a pod's ending
_EVENT_REASONS = {
    "OOMKilling",
    "SystemOOM",
    "Evicted",
    "Killing",
    "BackOff",
    "Unhealthy",
    "FailedScheduling",
    "OOMKilled",
}


def parse_document(text: str, where: str) -> Any:
    """JSON, else YAML (kubectl writes either); DoctorInputError when neither."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise DoctorInputError(f"{where}: neither JSON nor YAML: {exc}") from exc
    if len(docs) == 1:
        return docs[0]
    return {"kind": "List", "items": docs}


def kind_of(data: Any) -> str:
    """pod, docker-inspect or unknown."""
    if isinstance(data, dict) and data.get("kind") == "Pod":
        return "pod"
    if isinstance(data, dict) and data.get("kind") in ("List", "PodList"):
        items = data.get("items") or []
        if items and all(isinstance(i, dict) and i.get("kind", "Pod") == "Pod" for i in items):
            return "pod"
    objs = data if isinstance(data, list) else [data]
    if objs and all(isinstance(o, dict) and "State" in o for o in objs):
        return "docker-inspect"
    return "unknown"


def _mib(quantity: Any) -> float | None:
    if quantity is None:
        return None
    try:
        return float(parse_quantity(quantity, "memory")) / MIB
    except HPASpecError:
        return None


# ---- pods -------------------------------------------------------------------------------


def diagnose_pods(data: Any, events: Any = None) -> list[Diagnosis]:
    """One diagnosis per pod in ``data`` (a Pod or a List)."""
    pods = data.get("items", []) if data.get("kind") != "Pod" else [data]
    event_items = (events or {}).get("items", []) if isinstance(events, dict) else (events or [])
    return [_pod(p, event_items) for p in pods]


def _pod(pod: dict[str, Any], events: list[Any]) -> Diagnosis:
    meta = pod.get("metadata") or {}
    name = meta.get("name", "?")
    ns = meta.get("namespace", "default")
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    containers = {
        c.get("name"): c for c in spec.get("containers", []) + spec.get("initContainers", [])
    }
    statuses = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
    owner: dict[str, Any] = next(iter(meta.get("ownerReferences") or []), {})
    subject = f"pod {ns}/{name}" + (
        f" (owned by {owner.get('kind')} {owner.get('name')})" if owner else ""
    )
    findings: list[str] = []
    facts: dict[str, Any] = {"pod": name, "namespace": ns, "phase": status.get("phase")}
    if status.get("reason"):
        findings.append(f"pod status: {status['reason']}: {status.get('message', '')}".strip())
    worst: tuple[int, Cause, str, list[Fix]] = (
        0,
        Cause.NONE,
        "the pod's containers show no bad ending",
        [],
    )
    per_container: list[dict[str, Any]] = []
    for cs in statuses:
        cname = cs.get("name", "?")
        res = (containers.get(cname) or {}).get("resources") or {}
        limit = _mib((res.get("limits") or {}).get("memory"))
        request = _mib((res.get("requests") or {}).get("memory"))
        restarts = int(cs.get("restartCount") or 0)
        waiting = ((cs.get("state") or {}).get("waiting") or {}).get("reason")
        ends = [
            ("current", (cs.get("state") or {}).get("terminated")),
            ("last", (cs.get("lastState") or {}).get("terminated")),
        ]
        info = {
            "container": cname,
            "restart_count": restarts,
            "waiting": waiting,
            "memory_limit_mib": limit,
            "memory_request_mib": request,
        }
        per_container.append(info)
        for when, t in ends:
            if not t:
                continue
            info[f"{when}_termination"] = {
                k: t.get(k) for k in ("reason", "exitCode", "signal", "startedAt", "finishedAt")
            }
            findings.append(
                f"container {cname}: {when} termination {t.get('reason')} "
                f"(exit code {t.get('exitCode')}), restarts {restarts}"
            )
        reasons = {t.get("reason") for _, t in ends if t}
        codes = {t.get("exitCode") for _, t in ends if t}
        if "OOMKilled" in reasons:
            need = round_up_mib((limit or 256) * OOM_HEADROOM)
            fixes = [
                Fix(
                    f"raise its memory to {need} MiB (limit and request; it was killed at "
                    f"{_fmt(limit)} and needs more than that), on the "
                    f"{owner.get('kind', 'workload')} that owns the pod",
                    [f"--memory {need}m"],
                    memory_patch(cname, need),
                ),
                Fix(
                    "run it under tierbox with the same limit and `tierbox doctor --last` "
                    "to tell a leak from a spike: a pod keeps no memory history"
                ),
            ]
            if request is not None and limit is not None and request < limit:
                findings.append(
                    f"container {cname}: memory request {_fmt(request)} < limit {_fmt(limit)}: "
                    "the node can run out before the limit is reached"
                )
            summary = (
                f"container {cname} was OOMKilled (exit code 137) at its memory limit of "
                f"{_fmt(limit)}; no memory history exists for a pod"
                + (
                    f", and it is in CrashLoopBackOff after {restarts} restarts"
                    if waiting == "CrashLoopBackOff"
                    else ""
                )
            )
            cand = (3, Cause.OOM_KILLED, summary, fixes)
        elif waiting == "CrashLoopBackOff" or (
            restarts >= CRASH_LOOP_RESTARTS and codes - {0, None}
        ):
            code = next(iter(codes - {None}), None)
            cand = (
                2,
                Cause.CRASH_LOOP,
                f"container {cname} keeps crashing and restarting ({restarts} restarts, last exit "
                f"code {code}); Kubernetes backs off between restarts",
                [
                    Fix(
                        f"read why it exits: kubectl logs {name} -c {cname} --previous; "
                        "exit code 1 is the program's own error, 137 a SIGKILL (a liveness probe?)"
                    )
                ],
            )
        elif "DeadlineExceeded" in reasons or status.get("reason") == "DeadlineExceeded":
            cand = (2, Cause.TIMED_OUT, f"pod {name} ran past activeDeadlineSeconds", [])
        else:
            continue
        if cand[0] > worst[0]:
            worst = cand
    facts["containers"] = per_container
    for ev in events:
        involved = ev.get("involvedObject") or {}
        if ev.get("reason") in _EVENT_REASONS and (
            involved.get("name") == name or involved.get("kind") == "Node"
        ):
            findings.append(
                f"event {involved.get('kind')}/{involved.get('name')}: {ev.get('reason')}: "
                f"{(ev.get('message') or '').strip()}"
            )
    return Diagnosis(worst[1], subject, "pod", worst[2], findings, worst[3], facts)


def _fmt(mib: float | None) -> str:
    return "no limit" if mib is None else f"{mib:.0f} MiB"


# ---- docker / podman inspect ---------------------------------------------------------------


def diagnose_inspect(data: Any) -> list[Diagnosis]:
    objs = data if isinstance(data, list) else [data]
    return [_container(o) for o in objs]


def _container(obj: dict[str, Any]) -> Diagnosis:
    state = obj.get("State") or {}
    host = obj.get("HostConfig") or {}
    name = str(obj.get("Name") or obj.get("Id", "?")[:12]).lstrip("/")
    image = (obj.get("Config") or {}).get("Image") or obj.get("ImageName") or "?"
    subject = f"container {name} (image {image})"
    limit = host.get("Memory") or None
    limit_mib = limit / MIB if limit else None
    code = state.get("ExitCode")
    restarts = int(obj.get("RestartCount") or 0)
    facts = {
        "status": state.get("Status"),
        "oom_killed": bool(state.get("OOMKilled")),
        "exit_code": code,
        "restart_count": restarts,
        "memory_limit_mib": limit_mib,
        "pids_limit": host.get("PidsLimit"),
    }
    findings = [
        f"state {state.get('Status')}, exit code {code}, OOMKilled {bool(state.get('OOMKilled'))}, "
        f"restarts {restarts}, memory limit {_fmt(limit_mib)}"
    ]
    if state.get("Error"):
        findings.append(f"error: {state['Error']}")
    if state.get("OOMKilled"):
        need = round_up_mib((limit_mib or 256) * OOM_HEADROOM)
        return Diagnosis(
            Cause.OOM_KILLED,
            subject,
            "docker-inspect",
            f"it was OOM-killed at its memory limit of {_fmt(limit_mib)}; no memory history "
            "exists to tell a leak from a spike",
            findings,
            [
                Fix(
                    f"give it {need} MiB (docker run --memory {need}m)",
                    [f"--memory {need}m"],
                    memory_patch(name, need),
                )
            ],
            facts,
        )
    if restarts >= CRASH_LOOP_RESTARTS and code not in (0, None):
        return Diagnosis(
            Cause.CRASH_LOOP,
            subject,
            "docker-inspect",
            f"it keeps exiting with code {code} and being restarted ({restarts} restarts)",
            findings,
            [Fix(f"read why it exits: docker logs {name}")],
            facts,
        )
    if code == 137:
        findings.append(
            "exit code 137 without OOMKilled: something sent SIGKILL (docker kill or stop "
            "after its grace period, or the host's OOM killer outside the container's limit)"
        )
    return Diagnosis(
        Cause.NONE,
        subject,
        "docker-inspect",
        "no limit ended it" if code else "it ended well",
        findings,
        [],
        {**facts, "ended_badly": bool(code)},
    )


# ---- cgroup directories ------------------------------------------------------------------


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _int(path: Path) -> int | None:
    text = _read(path).strip()
    return int(text) if text.lstrip("-").isdigit() else None


def _keyed(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value.strip())
    return out


def is_cgroup_dir(path: Path) -> bool:
    return path.is_dir() and any(
        (path / f).exists() for f in ("memory.events", "memory.oom_control", "cgroup.procs")
    )


def diagnose_cgroup(path: Path) -> Diagnosis:
    """Counters of a cgroup directory: v2 (memory.events, cpu.stat, pids.events)
    or a v1 memory directory with its sibling cpu and pids hierarchies."""
    path = path.resolve()
    if not path.is_dir():
        raise DoctorInputError(f"{path} is not a directory")
    facts: dict[str, Any] = {"path": str(path)}
    if (path / "memory.events").exists() or (path / "cgroup.controllers").exists():
        facts["version"] = 2
        events = _keyed(path / "memory.events")
        limit = _int(path / "memory.max")
        peak = _int(path / "memory.peak")
        cpu = _keyed(path / "cpu.stat")
        throttled_s = cpu["throttled_usec"] / 1e6 if "throttled_usec" in cpu else None
        pids_hits = _keyed(path / "pids.events").get("max")
        pids_max = _int(path / "pids.max")
        quota = _read(path / "cpu.max").split()
        cpus = int(quota[0]) / int(quota[1]) if len(quota) == 2 and quota[0].isdigit() else None
    else:
        facts["version"] = 1
        mem = path
        rel = _v1_relpath(path)
        events = _keyed(mem / "memory.oom_control")
        limit = _int(mem / "memory.limit_in_bytes")
        if limit is not None and limit >= 1 << 60:
            limit = None  # v1's "no limit"
        peak = _int(mem / "memory.max_usage_in_bytes")
        cpu_dir = pids_dir = None
        if rel is not None:  # the other controllers' hierarchies, at the same place
            root = _v1_root(path)
            cpu_dir, pids_dir = root / "cpu" / rel, root / "pids" / rel
        cpu = _keyed(cpu_dir / "cpu.stat") if cpu_dir else {}
        throttled_s = cpu["throttled_time"] / 1e9 if "throttled_time" in cpu else None
        pids_hits = _keyed(pids_dir / "pids.events").get("max") if pids_dir else None
        pids_max = _int(pids_dir / "pids.max") if pids_dir else None
        q = _int(cpu_dir / "cpu.cfs_quota_us") if cpu_dir else None
        p = _int(cpu_dir / "cpu.cfs_period_us") if cpu_dir else None
        cpus = q / p if q and p and q > 0 else None
    oom = events.get("oom_kill", 0)
    limit_mib = limit / MIB if limit else None
    peak_mib = peak / MIB if peak is not None else None
    facts.update(
        oom_kill=oom,
        memory_limit_mib=limit_mib,
        memory_peak_mib=peak_mib,
        cpu_periods=cpu.get("nr_periods"),
        cpu_throttled_periods=cpu.get("nr_throttled"),
        cpu_throttled_s=throttled_s,
        cpus=cpus,
        pids_max_hits=pids_hits,
        pids_max=pids_max,
    )
    subject = f"cgroup {path} (v{facts['version']})"
    findings = [
        f"memory: limit {_fmt(limit_mib)}, peak {_fmt(peak_mib)}, oom_kill {oom}",
    ]
    if cpu.get("nr_periods"):
        findings.append(
            f"cpu: throttled in {cpu.get('nr_throttled', 0)} of {cpu['nr_periods']} periods"
            + (f" ({throttled_s:.2f} s)" if throttled_s is not None else "")
            + (f", quota {cpus:.2f} CPU" if cpus else "")
        )
    if oom:
        need = round_up_mib(max(peak_mib or 0.0, limit_mib or 0.0) * OOM_HEADROOM)
        return Diagnosis(
            Cause.OOM_KILLED,
            subject,
            "cgroup",
            f"the OOM killer struck {oom} time(s) at the {_fmt(limit_mib)} limit (peak "
            f"{_fmt(peak_mib)}); a cgroup keeps no memory history to tell a leak from a spike",
            findings,
            [Fix(f"give it {need} MiB", [f"--memory {need}m"], memory_patch("app", need))],
            facts,
        )
    if pids_hits:
        more = (pids_max or 128) * 2
        return Diagnosis(
            Cause.PIDS_LIMIT,
            subject,
            "cgroup",
            f"{pids_hits} fork(s) were refused at the pids limit of {pids_max}",
            findings,
            [Fix(f"raise the pids limit to {more}", [f"--pids {more}"])],
            facts,
        )
    periods = cpu.get("nr_periods") or 0
    if periods and cpu.get("nr_throttled", 0) / periods >= 0.2:
        faster = round((cpus or 0.5) * 2, 2)
        return Diagnosis(
            Cause.CPU_THROTTLED,
            subject,
            "cgroup",
            f"the CPU quota ({cpus} CPU) throttled it in "
            f"{cpu.get('nr_throttled', 0) / periods:.0%} of its scheduling periods",
            findings,
            [
                Fix(
                    f"give it {faster} CPU (Kubernetes: no CPU limit, a request)",
                    [f"--cpus {faster}"],
                )
            ],
            facts,
        )
    return Diagnosis(Cause.NONE, subject, "cgroup", "no limit was hit", findings, [], facts)


def _v1_root(path: Path) -> Path:
    """/sys/fs/cgroup for /sys/fs/cgroup/memory/a/b."""
    parts = path.parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in ("memory", "memory,memsw") or parts[i].startswith("memory"):
            return Path(*parts[:i])
    return path.parent


def _v1_relpath(path: Path) -> Path | None:
    """a/b for /sys/fs/cgroup/memory/a/b (None when no memory controller is in the path)."""
    parts = path.parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].startswith("memory"):
            return Path(*parts[i + 1 :]) if i + 1 < len(parts) else Path(".")
    return None
