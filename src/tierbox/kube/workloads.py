"""Where an exported workload comes from: flags, a small workload file, a
live sandbox's recorded spec, or a warm pool's saved spec
(:mod:`tierbox.pools`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tierbox.errors import ManifestError, PoolNotFoundError, TierboxError
from tierbox.kube.export import Workload
from tierbox.spec import SandboxSpec, parse_memory_mib

#: keys of a workload file (YAML or JSON), as ``tierbox kube export -f`` reads it
FILE_KEYS = {
    "name",
    "image",
    "tier",
    "replicas",
    "max_replicas",
    "memory",
    "cpus",
    "disk",
    "command",
    "env",
    "port",
    "target_cpu",
    "namespace",
    "behavior",
    "min_available",
    "max_unavailable",
    "snapshots",
    "handlers",
}


def _kube_name(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:63] or "app"


def from_file(path: str | Path) -> tuple[Workload, dict[str, str]]:
    """A workload file::

        name: web
        image: registry.example/web:1.2
        tier: gvisor
        replicas: 3
        memory: 256m
        cpus: 0.5
        port: 8080
        command: [python3, -m, http.server, "8080"]
        env: {LOG_LEVEL: info}

    Returns the workload and its ``handlers`` (tier -> RuntimeClass handler)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{p}: cannot be read as YAML or JSON: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ManifestError(f"{p}: a workload file is a mapping (name:, image:, tier: ...)")
    unknown = sorted(set(data) - FILE_KEYS)
    if unknown:
        raise ManifestError(
            f"{p}: unknown key {unknown[0]!r} (known: {', '.join(sorted(FILE_KEYS))})"
        )
    for key in ("name", "image"):
        if not isinstance(data.get(key), str):
            raise ManifestError(f"{p}: {key}: a string is required")
    try:
        w = Workload(
            name=data["name"],
            image=data["image"],
            tier=str(data.get("tier", "container")),
            replicas=int(data.get("replicas", 2)),
            max_replicas=int(data["max_replicas"]) if data.get("max_replicas") else None,
            memory_mib=parse_memory_mib(str(data["memory"])) if data.get("memory") else 256,
            cpus=float(data["cpus"]) if data.get("cpus") is not None else None,
            disk_mib=parse_memory_mib(str(data["disk"])) if data.get("disk") else None,
            command=tuple(str(a) for a in data.get("command") or ()),
            env={str(k): str(v) for k, v in (data.get("env") or {}).items()},
            port=int(data["port"]) if data.get("port") is not None else 8080,
            target_cpu=int(data.get("target_cpu", 70)),
            namespace=data.get("namespace"),
            behavior=data.get("behavior"),
            min_available=data.get("min_available"),
            max_unavailable=data.get("max_unavailable"),
            snapshots=tuple(str(s) for s in data.get("snapshots") or ()),
            origin=f"workload file {p}",
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{p}: {exc}") from exc
    except TierboxError as exc:
        raise ManifestError(f"{p}: {exc}") from exc
    handlers = {str(k): str(v) for k, v in (data.get("handlers") or {}).items()}
    return w.checked(), handlers


def _from_spec(name: str, tier: str, spec: SandboxSpec, origin: str, **more: Any) -> Workload:
    if not spec.image:
        raise ManifestError(
            f"{origin} has no image (a process-tier sandbox runs host programs): "
            "give --image IMAGE for the container image to deploy"
        )
    lim = spec.limits
    return Workload(
        name=_kube_name(name),
        image=spec.image,
        tier=tier,
        memory_mib=lim.memory_mib,
        cpus=lim.cpus,
        disk_mib=lim.disk_mib,
        env=dict(spec.env),
        origin=origin,
        **more,
    )


def from_sandbox(ref: str, *, image: str | None = None) -> Workload:
    """A live sandbox's recorded spec (``tierbox sandbox ls``), by id or name."""
    from tierbox.tiers import _state

    sandbox_id = _state.resolve(ref)
    state = _state.read_state(sandbox_id)
    spec = SandboxSpec.from_dict(state["spec"])
    if image is not None:
        spec = SandboxSpec.from_dict({**spec.to_dict(), "image": image})
    elif state.get("image"):
        spec = SandboxSpec.from_dict({**spec.to_dict(), "image": state["image"]})
    return _from_spec(state.get("name") or sandbox_id, state["tier"], spec, f"sandbox {sandbox_id}")


def from_pool(name: str, *, image: str | None = None) -> Workload:
    """A warm pool's saved spec (:class:`tierbox.pools.PoolSpec`): its members
    are the replicas, ``min_ready``/``max_size`` the HPA's bounds, its target
    the CPU utilization target, its behavior the HPA's, its disruption
    budget the PodDisruptionBudget."""
    from tierbox.pools import store
    from tierbox.pools.spec import PoolSpec

    record = store.read(store.pool_file(name))
    if record is None or "spec" not in record:
        raise PoolNotFoundError(f"no pool named {name!r}: tierbox pool ls lists them")
    spec = PoolSpec.from_dict(record["spec"])
    sandbox = spec.sandbox
    if image is not None:
        sandbox = SandboxSpec.from_dict({**sandbox.to_dict(), "image": image})
    budget = spec.budget.to_dict()
    target = round(spec.target) if spec.metric.value == "utilization" else 70
    return _from_spec(
        spec.name,
        spec.tier,
        sandbox,
        f"pool {spec.name}",
        replicas=max(1, spec.min_ready),
        max_replicas=max(spec.max_size, spec.min_ready, 1),
        target_cpu=min(max(target, 1), 100),
        behavior=spec.behavior,
        min_available=budget.get("min_available"),
        max_unavailable=budget.get("max_unavailable"),
    )
