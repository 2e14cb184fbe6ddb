"""What a diagnosis says: one cause word, the facts behind it, and fixes
(a tierbox flag and a Kubernetes resources patch where a limit is the fix)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import yaml


class Cause(enum.StrEnum):
    """Why a workload ended badly; ``cause`` in ``tierbox doctor --json``."""

    LEAK = "leak"
    SPIKE = "spike"
    WORKING_SET_TOO_LARGE = "working_set_too_large"
    CHILD_OOM = "child_oom"
    #: killed for memory, with no memory history to tell how (a pod, docker inspect)
    OOM_KILLED = "oom_killed"
    CPU_THROTTLED = "cpu_throttled"
    TIMED_OUT = "timed_out"
    PIDS_LIMIT = "pids_limit"
    OUTPUT_LIMIT = "output_limit"
    CRASH_LOOP = "crash_loop"
    NONE = "none"


#: memory headroom over a measured peak: what a new limit adds
HEADROOM = 1.25
#: over a limit the workload was killed at (its real need is unknown, only "more")
OOM_HEADROOM = 1.5


def round_up_mib(mib: float, step: int = 16) -> int:
    """A limit people can read: up to the next multiple of ``step`` MiB."""
    return max(step, math.ceil(mib / step) * step)


def memory_patch(container: str, memory_mib: int) -> dict[str, Any]:
    """A strategic merge patch for a Deployment/StatefulSet (pod template):
    request equal to limit, since memory cannot be throttled, only killed."""
    q = f"{memory_mib}Mi"
    return {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": container,
                            "resources": {"requests": {"memory": q}, "limits": {"memory": q}},
                        }
                    ]
                }
            }
        }
    }


def cpu_patch(container: str, cpus: float) -> dict[str, Any]:
    """Raise the CPU request and drop the CPU limit (CFS throttling) in one patch."""
    return {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": container,
                            "resources": {
                                "requests": {"cpu": f"{max(1, round(cpus * 1000))}m"},
                                "limits": {"cpu": None},
                            },
                        }
                    ]
                }
            }
        }
    }


@dataclass
class Fix:
    """One thing to do. ``tierbox_flags`` for a tierbox run, ``kubernetes_patch``
    a strategic merge patch (``kubectl patch deploy NAME --patch-file``)."""

    summary: str
    tierbox_flags: list[str] = field(default_factory=list)
    kubernetes_patch: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "tierbox_flags": self.tierbox_flags,
            "kubernetes_patch": self.kubernetes_patch,
        }


@dataclass
class Diagnosis:
    """Why one workload ended as it did."""

    cause: Cause
    subject: str
    source: str  # tierbox-run | pod | docker-inspect | cgroup
    summary: str
    findings: list[str] = field(default_factory=list)
    fixes: list[Fix] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ended_badly(self) -> bool:
        return self.cause is not Cause.NONE or bool(self.facts.get("ended_badly"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "cause": self.cause.value,
            "subject": self.subject,
            "source": self.source,
            "summary": self.summary,
            "findings": self.findings,
            "fixes": [f.to_dict() for f in self.fixes],
            "facts": self.facts,
        }

    def render(self) -> str:
        """The text ``tierbox doctor`` prints."""
        lines = [f"{self.subject}", f"cause: {self.cause.value}", f"  {self.summary}"]
        if self.findings:
            lines.append("findings:")
            lines += [f"  - {f}" for f in self.findings]
        for i, fix in enumerate(self.fixes, 1):
            lines.append(f"fix {i}: {fix.summary}")
            if fix.tierbox_flags:
                lines.append(f"  tierbox: {' '.join(fix.tierbox_flags)}")
            if fix.kubernetes_patch is not None:
                lines.append("  kubernetes (strategic merge patch):")
                patch = yaml.safe_dump(fix.kubernetes_patch, sort_keys=False).rstrip()
                lines += [f"    {line}" for line in patch.splitlines()]
        return "\n".join(lines)
