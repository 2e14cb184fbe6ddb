"""``tierbox doctor``: why a workload ended badly, and what to change.

It reads a tierbox run from the run history (:mod:`tierbox.history`: how it
ended, its limits and the memory, CPU and processes sampled while it ran),
a Kubernetes pod, ``docker``/``podman inspect`` output or a cgroup
directory, and names one cause (:class:`~tierbox.doctor.model.Cause`) with
the facts behind it and fixes: a tierbox flag and a Kubernetes resources
patch where a limit is the fix.

- :mod:`~tierbox.doctor.memory`: leak, spike or working set, from samples;
- :mod:`~tierbox.doctor.runs`: tierbox runs;
- :mod:`~tierbox.doctor.sources`: pods, inspect output, cgroup directories;
- :mod:`~tierbox.doctor.explain`: the optional plain-language account from a
  chat endpoint, with secrets redacted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tierbox import history
from tierbox.doctor.model import Cause, Diagnosis, Fix
from tierbox.doctor.runs import diagnose_run
from tierbox.doctor.sources import (
    diagnose_cgroup,
    diagnose_inspect,
    diagnose_pods,
    is_cgroup_dir,
    kind_of,
    parse_document,
)
from tierbox.errors import DoctorInputError

__all__ = [
    "Cause",
    "Diagnosis",
    "Fix",
    "diagnose",
    "diagnose_cgroup",
    "diagnose_inspect",
    "diagnose_pods",
    "diagnose_run",
    "last",
]


def diagnose(ref: str, *, events: str | None = None) -> tuple[list[Diagnosis], Any]:
    """Diagnoses of ``ref`` (a file, ``-`` for stdin, a cgroup directory, a
    run id, or a sandbox id or name) and the raw input they came from."""
    path = Path(ref)
    if ref != "-" and path.is_dir():
        if not is_cgroup_dir(path):
            raise DoctorInputError(f"{ref} is a directory but not a cgroup (no memory.* files)")
        return [diagnose_cgroup(path)], None
    if ref == "-" or path.is_file():
        text = sys.stdin.read() if ref == "-" else path.read_text()
        data = parse_document(text, ref)
        kind = kind_of(data)
        if kind == "pod":
            ev = parse_document(Path(events).read_text(), events) if events else None
            return diagnose_pods(data, ev), data
        if kind == "docker-inspect":
            return diagnose_inspect(data), data
        raise DoctorInputError(
            f"{ref}: not a pod (kubectl get pod -o json|yaml), nor docker/podman inspect "
            "output, nor a cgroup directory"
        )
    rec = history.find(ref)
    return [diagnose_run(rec)], rec


def last() -> tuple[list[Diagnosis], Any]:
    """The newest run or sandbox command of this user."""
    rec = history.last()
    return [diagnose_run(rec)], rec
