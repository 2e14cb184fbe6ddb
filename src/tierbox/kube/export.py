"""Kubernetes manifests for a tierbox workload (``tierbox kube export``).

Each tier maps onto a RuntimeClass (its handler configurable) or, for the
``vm`` tier, a KubeVirt VirtualMachine:

======== ================================== =====================================
tier     Kubernetes                          default handler
======== ================================== =====================================
process  the default runtime (no isolation)  ``runc``
container RuntimeClass                       ``runc`` (``crun`` where nodes use it)
gvisor   RuntimeClass                        ``runsc``
microvm  RuntimeClass (Kata Containers)      ``kata-qemu``
wasm     RuntimeClass (runwasi shim)         ``wasmtime``
vm       KubeVirt VirtualMachine             (none)
======== ================================== =====================================

A RuntimeClass's ``overhead.podFixed.memory`` is what ``tierbox bench``
measured for one idle sandbox of that tier on this machine (its
results.json), said in a comment. Requests and limits come from the peaks
of the run history (:mod:`tierbox.history`) with headroom when it holds runs
of the image on the tier, else from the limits given. Pods run as tierbox's
container tier runs a workload: non-root (65534), read-only root with an
emptyDir ``/tmp``, no capabilities, RuntimeDefault seccomp, no privilege
escalation, no service account token.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from tierbox import history, paths
from tierbox.errors import ManifestError

MIB = 1 << 20
DEFAULT_HANDLERS: dict[str, str] = {
    "process": "runc",
    "container": "runc",
    "gvisor": "runsc",
    "microvm": "kata-qemu",
    "wasm": "wasmtime",
}
RUNTIME_TIERS = tuple(DEFAULT_HANDLERS)
TIERS = (*RUNTIME_TIERS, "vm")
#: memory headroom over the run history's peak
HEADROOM = 1.25
#: CPU request headroom over the average the run history measured
CPU_HEADROOM = 1.2
#: the user tierbox's container tier runs workloads as
NONROOT_UID = 65534
DEFAULT_DISK_MIB = 64
BENCH_ENV = "TIERBOX_BENCH_RESULTS"
LABEL = "app.kubernetes.io/name"
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SECRETISH = re.compile(r"(pass|secret|token|key|credential|auth)", re.IGNORECASE)
#: Kubernetes' default HPA behavior (pkg/apis/autoscaling/v2/defaults.go), written out
DEFAULT_BEHAVIOR: dict[str, Any] = {
    "scaleUp": {
        "stabilizationWindowSeconds": 0,
        "selectPolicy": "Max",
        "policies": [
            {"type": "Percent", "value": 100, "periodSeconds": 15},
            {"type": "Pods", "value": 4, "periodSeconds": 15},
        ],
    },
    "scaleDown": {
        "stabilizationWindowSeconds": 300,
        "selectPolicy": "Max",
        "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}],
    },
}


@dataclass(frozen=True)
class Workload:
    """What is exported: one service on one tier."""

    name: str
    image: str
    tier: str = "container"
    replicas: int = 2
    max_replicas: int | None = None
    memory_mib: int | None = 256
    cpus: float | None = None
    disk_mib: int | None = None
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    port: int | None = 8080
    target_cpu: int = 70
    namespace: str | None = None
    behavior: Mapping[str, Any] | None = None
    min_available: int | str | None = None
    max_unavailable: int | str | None = None
    snapshots: tuple[str, ...] = ()
    #: where the workload came from, for the header comment
    origin: str = "flags"

    def checked(self) -> Workload:
        if not isinstance(self.name, str) or not _DNS1123.match(self.name) or len(self.name) > 63:
            raise ManifestError(
                f"name {self.name!r}: Kubernetes names are 1-63 lowercase letters, digits "
                "and '-', starting and ending with a letter or digit"
            )
        if not self.image:
            raise ManifestError("an image is needed: --image IMAGE")
        if self.tier not in TIERS:
            raise ManifestError(f"tier {self.tier!r}: use one of {', '.join(TIERS)}")
        if self.replicas < 1:
            raise ManifestError(f"replicas={self.replicas}: at least 1")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ManifestError(
                f"max_replicas={self.max_replicas} is below replicas={self.replicas}"
            )
        if not 1 <= self.target_cpu <= 100:
            raise ManifestError(f"target_cpu={self.target_cpu}: a percentage from 1 to 100")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ManifestError(f"port={self.port}: 1 to 65535")
        return self


@dataclass(frozen=True)
class Overhead:
    """A tier's measured memory, from a bench results.json."""

    memory_bytes: int
    source: str

    @property
    def quantity(self) -> str:
        return f"{max(1, math.ceil(self.memory_bytes / MIB))}Mi"


@dataclass(frozen=True)
class Sizing:
    """Requests and limits, and where they came from."""

    memory_mib: int | None
    cpu_milli: int | None
    note: str


@dataclass
class Document:
    """One object of the output and the comment above it."""

    obj: dict[str, Any]
    comment: list[str] = field(default_factory=list)


# ---- measured inputs ---------------------------------------------------------------------


def bench_results_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The bench results to read: ``explicit`` (a results.json or the
    directory ``tierbox bench --out`` wrote), else ``$TIERBOX_BENCH_RESULTS``,
    else the newest run of ``tierbox bench`` (``latest/`` in
    ``$TIERBOX_BENCH_DIR`` or ``$TIERBOX_HOME/bench``), else
    ``./report/results.json``."""
    for cand in (explicit, os.environ.get(BENCH_ENV)):
        if cand:
            p = Path(cand)
            return p / "results.json" if p.is_dir() else p
    bench_home = Path(os.environ.get("TIERBOX_BENCH_DIR") or paths.home() / "bench")
    for p in (bench_home / "latest" / "results.json", Path("report") / "results.json"):
        if p.is_file():
            return p
    return None


def load_overheads(path: Path | None) -> dict[str, Overhead]:
    """Per tier, the PSS of one idle sandbox as ``tierbox bench`` measured it."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"bench results {path}: cannot be read: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("tiers"), dict):
        raise ManifestError(f"bench results {path}: no 'tiers' object (is it results.json?)")
    machine = data.get("machine") or {}
    host = machine.get("hostname") or machine.get("kernel") or "this machine"
    when = data.get("finished_at") or data.get("started_at") or "?"
    out: dict[str, Overhead] = {}
    for tier, res in data["tiers"].items():
        mem = (res or {}).get("memory") or {}
        pss = mem.get("idle_pss_bytes")
        if isinstance(pss, int | float) and pss > 0:
            out[tier] = Overhead(
                int(pss),
                f"idle PSS of one {tier} sandbox, tierbox bench on {host} at {when} ({path})",
            )
    return out


def sizing(w: Workload, *, use_history: bool = True) -> Sizing:
    """From the run history's peaks of this image on this tier (with
    headroom) when it has any, else from the workload's own limits."""
    runs = history.usage(image=w.image, tier=w.tier) if use_history else []
    given_cpu = None if w.cpus is None else max(1, round(w.cpus * 1000))
    if runs:
        peak = max(float(r["peak_mib"] or 0.0) for r in runs)
        rates = [float(c) for r in runs if (c := r.get("cpu")) is not None]
        mem = math.ceil(peak * HEADROOM)
        cpu = max(10, math.ceil(max(rates) * CPU_HEADROOM * 1000)) if rates else given_cpu
        return Sizing(
            mem,
            cpu,
            f"requests and limits from {len(runs)} run(s) of {w.image} on {w.tier} in this "
            f"user's run history: peak {peak:.1f} MiB + {HEADROOM - 1:.0%} headroom"
            + (f", {max(rates):.2f} CPU average + {CPU_HEADROOM - 1:.0%}" if rates else ""),
        )
    return Sizing(
        w.memory_mib,
        given_cpu,
        f"requests and limits from the given limits (no run history of {w.image} on {w.tier})",
    )


# ---- objects -------------------------------------------------------------------------------


def _labels(w: Workload) -> dict[str, str]:
    return {LABEL: w.name, "app.kubernetes.io/managed-by": "tierbox", "tierbox.dev/tier": w.tier}


def _meta(w: Workload, name: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name or w.name, "labels": _labels(w)}
    if w.namespace:
        meta["namespace"] = w.namespace
    return meta


def _env(w: Workload) -> tuple[list[dict[str, Any]], list[str]]:
    """Environment entries; secret-looking names come from a Secret, not the manifest."""
    out: list[dict[str, Any]] = []
    secret: list[str] = []
    for k, v in w.env.items():
        if _SECRETISH.search(k):
            secret.append(k)
            out.append(
                {
                    "name": k,
                    "valueFrom": {"secretKeyRef": {"name": f"{w.name}-secrets", "key": k}},
                }
            )
        else:
            out.append({"name": k, "value": v})
    return out, secret


def _resources(w: Workload, size: Sizing) -> dict[str, Any]:
    disk = f"{w.disk_mib or DEFAULT_DISK_MIB}Mi"
    requests: dict[str, Any] = {"ephemeral-storage": disk}
    limits: dict[str, Any] = {"ephemeral-storage": disk}
    if size.cpu_milli is not None:
        requests["cpu"] = f"{size.cpu_milli}m"
    else:
        requests["cpu"] = "100m"
    if size.memory_mib is not None:
        # memory cannot be throttled, only killed: request = limit (no overcommit)
        requests["memory"] = limits["memory"] = f"{size.memory_mib}Mi"
    return {"requests": requests, "limits": limits}


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def deployment(w: Workload, size: Sizing, *, runtime_class: str | None) -> Document:
    env, secret = _env(w)
    container: dict[str, Any] = {
        "name": w.name,
        "image": w.image,
        "imagePullPolicy": "IfNotPresent",
    }
    if w.command:
        container["command"] = list(w.command)
    if env:
        container["env"] = env
    if w.port is not None:
        container["ports"] = [{"name": "http", "containerPort": w.port, "protocol": "TCP"}]
        probe = {"tcpSocket": {"port": "http"}}
        container["readinessProbe"] = {**probe, "periodSeconds": 5, "failureThreshold": 3}
        container["livenessProbe"] = {
            **probe,
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "failureThreshold": 3,
        }
    else:  # nothing to connect to: the process being alive is what can be checked
        alive = {"exec": {"command": ["/bin/sh", "-c", "kill -0 1"]}}
        container["readinessProbe"] = {**alive, "periodSeconds": 5}
        container["livenessProbe"] = {**alive, "periodSeconds": 10}
    container["resources"] = _resources(w, size)
    container["securityContext"] = _container_security()
    container["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"}]
    disk = w.disk_mib or DEFAULT_DISK_MIB
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": NONROOT_UID,
            "runAsGroup": NONROOT_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": f"{disk}Mi"}}],
    }
    if runtime_class is not None:
        pod = {"runtimeClassName": runtime_class, **pod}
    obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(w),
        "spec": {
            "selector": {"matchLabels": {LABEL: w.name}},
            "template": {"metadata": {"labels": _labels(w)}, "spec": pod},
        },
    }
    comment = [
        f"{w.name} on the {w.tier} tier, exported by tierbox from {w.origin}",
        size.note,
        f"replicas: owned by the HorizontalPodAutoscaler below (minReplicas {w.replicas}), "
        "so re-applying this file does not undo its scaling",
        "security as tierbox's container tier: uid 65534, read-only root, /tmp an emptyDir, "
        "no capabilities, RuntimeDefault seccomp, no privilege escalation",
    ]
    if size.cpu_milli is not None:
        comment.append(
            "no CPU limit: a CFS quota throttles even an idle node; the request reserves"
        )
    if secret:
        comment.append(
            f"{', '.join(secret)} come from Secret {w.name}-secrets: kubectl create secret "
            f"generic {w.name}-secrets --from-literal=NAME=VALUE"
        )
    return Document(obj, comment)


def service(w: Workload) -> Document:
    assert w.port is not None
    obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(w),
        "spec": {
            "selector": {LABEL: w.name},
            "ports": [{"name": "http", "port": 80, "targetPort": w.port, "protocol": "TCP"}],
        },
    }
    return Document(obj, [f"port 80 -> the workload's {w.port}"])


def hpa(w: Workload) -> Document:
    top = w.max_replicas or max(w.replicas * 3, w.replicas + 1)
    obj = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(w),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": w.name},
            "minReplicas": w.replicas,
            "maxReplicas": top,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": w.target_cpu},
                    },
                }
            ],
            "behavior": dict(w.behavior) if w.behavior is not None else DEFAULT_BEHAVIOR,
        },
    }
    return Document(
        obj,
        [
            f"{w.replicas} to {top} replicas at {w.target_cpu}% of the CPU request"
            + ("" if w.behavior is not None else "; behavior: Kubernetes' defaults, written out")
        ],
    )


def pdb(w: Workload) -> Document:
    spec: dict[str, Any] = {"selector": {"matchLabels": {LABEL: w.name}}}
    if w.min_available is not None:
        spec["minAvailable"] = w.min_available
        note = f"at least {w.min_available} available during voluntary disruptions"
    else:
        spec["maxUnavailable"] = w.max_unavailable if w.max_unavailable is not None else 1
        note = f"at most {spec['maxUnavailable']} down at once: node drains go on, one by one"
    obj = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(w),
        "spec": spec,
    }
    return Document(obj, [note])


def runtime_class(tier: str, handler: str, overhead: Overhead | None) -> Document:
    obj: dict[str, Any] = {
        "apiVersion": "node.k8s.io/v1",
        "kind": "RuntimeClass",
        "metadata": {
            "name": f"tierbox-{tier}",
            "labels": {"app.kubernetes.io/managed-by": "tierbox", "tierbox.dev/tier": tier},
        },
        "handler": handler,
    }
    comment = [f"the {tier} tier: pods run by the node's {handler!r} handler"]
    if tier == "process":
        comment.append("Kubernetes has no bare-process runtime: the nearest is the default runc")
    if overhead is not None:
        obj["overhead"] = {"podFixed": {"memory": overhead.quantity}}
        comment.append(f"overhead.podFixed.memory {overhead.quantity}: measured, {overhead.source}")
    else:
        comment.append(
            "no overhead: no bench results for this tier (tierbox bench --out DIR, then "
            "--bench DIR)"
        )
    return Document(obj, comment)


def virtual_machine(w: Workload, size: Sizing) -> Document:
    mem = f"{size.memory_mib or 256}Mi"
    domain: dict[str, Any] = {
        "cpu": {"cores": max(1, math.ceil(w.cpus or 1))},
        "memory": {"guest": mem},
        "resources": {"requests": {"memory": mem}},
        "devices": {
            "disks": [{"name": "rootdisk", "disk": {"bus": "virtio"}}],
            "rng": {},
            "autoattachSerialConsole": True,
        },
    }
    if size.cpu_milli is not None:
        domain["resources"]["requests"]["cpu"] = f"{size.cpu_milli}m"
    obj = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": _meta(w),
        "spec": {
            "runStrategy": "Always",
            "template": {
                "metadata": {"labels": _labels(w)},
                "spec": {
                    "domain": domain,
                    "terminationGracePeriodSeconds": 30,
                    "volumes": [{"name": "rootdisk", "containerDisk": {"image": w.image}}],
                },
            },
        },
    }
    return Document(
        obj,
        [
            f"{w.name} on the vm tier as a KubeVirt VirtualMachine, exported by tierbox from "
            f"{w.origin}",
            size.note,
            f"{w.image} must be a KubeVirt containerDisk (a disk image under /disk)",
            "one VM: KubeVirt's VirtualMachinePool scales VMs, and KubeVirt makes the "
            "disruption budget for live migration itself",
        ],
    )


def vm_snapshot(w: Workload, snapshot: str) -> Document:
    name = re.sub(r"[^a-z0-9-]+", "-", f"{w.name}-{snapshot}".lower()).strip("-")[:63]
    obj = {
        "apiVersion": "snapshot.kubevirt.io/v1beta1",
        "kind": "VirtualMachineSnapshot",
        "metadata": _meta(w, name),
        "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": w.name}},
    }
    return Document(obj, [f"tierbox snapshot {snapshot!r} of VM {w.name}"])


def documents(
    w: Workload,
    *,
    handlers: Mapping[str, str] | None = None,
    overheads: Mapping[str, Overhead] | None = None,
    use_history: bool = True,
) -> list[Document]:
    """Every object of ``w``, in the order ``kubectl apply`` needs them."""
    w = w.checked()
    size = sizing(w, use_history=use_history)
    names = {**DEFAULT_HANDLERS, **(handlers or {})}
    docs: list[Document] = []
    if w.tier == "vm":
        docs.append(virtual_machine(w, size))
        docs += [vm_snapshot(w, s) for s in w.snapshots]
        if w.port is not None:
            docs.append(service(w))
        return docs
    rc = f"tierbox-{w.tier}"
    docs.append(runtime_class(w.tier, names[w.tier], (overheads or {}).get(w.tier)))
    docs.append(deployment(w, size, runtime_class=rc))
    if w.port is not None:
        docs.append(service(w))
    docs.append(hpa(w))
    docs.append(pdb(w))
    return docs


def runtime_classes(
    handlers: Mapping[str, str] | None = None, overheads: Mapping[str, Overhead] | None = None
) -> list[Document]:
    """A RuntimeClass for every tier that has one (a cluster's one-time set-up)."""
    names = {**DEFAULT_HANDLERS, **(handlers or {})}
    return [runtime_class(t, names[t], (overheads or {}).get(t)) for t in RUNTIME_TIERS]


def to_yaml(docs: Sequence[Document]) -> str:
    """One multi-document YAML stream, each object under its comment."""
    parts = []
    for d in docs:
        head = "".join(f"# {line}\n" for line in d.comment)
        parts.append(head + yaml.safe_dump(d.obj, sort_keys=False, default_flow_style=False))
    return "---\n" + "---\n".join(parts)


def with_changes(w: Workload, **changes: Any) -> Workload:
    return replace(w, **{k: v for k, v in changes.items() if v is not None})
