"""Kubernetes for tierbox workloads: manifests from a sandbox, a pool, a
workload file or flags (:mod:`~tierbox.kube.export`, each tier as a
RuntimeClass or a KubeVirt VirtualMachine), advice on existing manifests
(:mod:`~tierbox.kube.advise`) and server-side apply with the official client
(:mod:`~tierbox.kube.apply`; the submodules keep their functions' names,
``advise.advise`` and ``apply.apply``). Built on the facade and the run history; it
never reaches into a tier."""

from tierbox.kube.advise import RULES, Finding
from tierbox.kube.apply import Applied
from tierbox.kube.export import (
    DEFAULT_HANDLERS,
    Document,
    Overhead,
    Workload,
    documents,
    load_overheads,
    runtime_classes,
    to_yaml,
)

__all__ = [
    "DEFAULT_HANDLERS",
    "RULES",
    "Applied",
    "Document",
    "Finding",
    "Overhead",
    "Workload",
    "documents",
    "load_overheads",
    "runtime_classes",
    "to_yaml",
]
