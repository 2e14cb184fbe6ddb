"""Replay a HorizontalPodAutoscaler against a load curve
(``tierbox autoscale simulate FILE``).

The file (YAML or JSON) is ``{hpa: <HorizontalPodAutoscaler>, steps: [...]}``;
each step is one controller loop::

    {time_s, current_replicas, value_milli,
     pods: [{name, phase: Running|Pending|Failed, ready, deleting,
             cpu_initializing, request_milli, usage_milli}]}

For a Resource metric ``request_milli`` and ``usage_milli`` are the pod's
request and usage of that resource (usage null: no sample); for a Pods
metric ``usage_milli`` is the pod's value; for Object and External metrics
the step's ``value_milli`` is the metric's value and the pods only tell
readiness. With several metrics, ``usage_milli``, ``value_milli`` (and
``request_milli``, when the resources differ) map metric names to values.
All values are milli-units. Steps share one controller, so stabilization
windows and rate limits see the earlier steps. ``current_replicas`` may be
left out (the previous step's desired count, or the number of pods), and
``pods`` too (that many ready, running pods, enough for Object and External
metrics). An optional ``controller: {tolerance, downscale_stabilization_s}``
sets kube-controller-manager's flags.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tierbox.autoscale.hpa import (
    ControllerConfig,
    Decision,
    HorizontalAutoscaler,
    HPASpec,
    MetricStatus,
    Observation,
    PodPhase,
    PodSample,
    SourceType,
    TargetType,
)
from tierbox.autoscale.k8s import parse_hpa
from tierbox.errors import HPASpecError

#: a simulation file larger than this is refused before it is parsed
MAX_FILE_BYTES = 16 << 20

_POD_FIELDS = {
    "name",
    "phase",
    "ready",
    "deleting",
    "cpu_initializing",
    "request_milli",
    "usage_milli",
}


@dataclass(frozen=True)
class Step:
    time_s: float
    current_replicas: int | None
    pods: tuple[PodSample, ...] | None
    values_milli: Mapping[str, int | None]


@dataclass(frozen=True)
class Simulation:
    hpa: HPASpec
    steps: tuple[Step, ...]
    config: ControllerConfig


def load(path: Path) -> Simulation:
    """Read and check a simulation file; HPASpecError names what is wrong."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise HPASpecError(f"{path}: {size} bytes is more than {MAX_FILE_BYTES}")
        text = path.read_text()
    except OSError as exc:
        raise HPASpecError(f"{path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise HPASpecError(f"{path}: not text ({exc})") from exc
    return parse(text, str(path))


def parse(text: str, where: str = "simulation") -> Simulation:
    """A simulation from YAML or JSON text (JSON is YAML)."""
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise HPASpecError(f"{where}: not YAML or JSON: {exc}") from exc
    if not isinstance(data, Mapping):
        raise HPASpecError(f"{where}: expected an object with 'hpa' and 'steps'")
    unknown = sorted(set(data) - {"hpa", "steps", "controller"})
    if unknown:
        raise HPASpecError(f"{where}: unknown field {unknown[0]!r} (known: controller, hpa, steps)")
    if "hpa" not in data:
        raise HPASpecError(f"{where}.hpa: Required value (a HorizontalPodAutoscaler)")
    hpa = parse_hpa(data["hpa"], "hpa")
    config = _controller(data.get("controller"))
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise HPASpecError("steps: Required value (a list of steps, one per controller loop)")
    steps = []
    last = float("-inf")
    for i, raw in enumerate(raw_steps):
        step = _step(raw, f"steps[{i}]", hpa)
        if step.time_s < last:
            raise HPASpecError(f"steps[{i}].time_s: {step.time_s} is before the previous step")
        last = step.time_s
        steps.append(step)
    return Simulation(hpa, tuple(steps), config)


def _controller(obj: object) -> ControllerConfig:
    if obj is None:
        return ControllerConfig()
    if not isinstance(obj, Mapping):
        raise HPASpecError("controller: expected an object")
    unknown = sorted(set(obj) - {"tolerance", "downscale_stabilization_s"})
    if unknown:
        raise HPASpecError(f"controller: unknown field {unknown[0]!r}")
    tol = obj.get("tolerance", ControllerConfig.tolerance)
    window = obj.get("downscale_stabilization_s", ControllerConfig.downscale_stabilization_window_s)
    for name, value in (("tolerance", tol), ("downscale_stabilization_s", window)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise HPASpecError(f"controller.{name}: expected a number >= 0, got {value!r}")
    return ControllerConfig(tolerance=float(tol), downscale_stabilization_window_s=float(window))


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HPASpecError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _milli(value: object, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HPASpecError(f"{where}: expected a number of milli-units or null, got {value!r}")
    return round(value)


def _per_metric(value: object, where: str, keys: list[str]) -> dict[str, int | None]:
    """A value for each metric key: a map by name, or one number when only
    one metric reads this field."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise HPASpecError(
                f"{where}: {unknown[0]!r} is not a metric of this HPA "
                f"(its metrics: {', '.join(keys) or 'none'})"
            )
        return {k: _milli(value.get(k), f"{where}.{k}") for k in keys}
    if value is None:
        return dict.fromkeys(keys)
    if len(keys) != 1:
        raise HPASpecError(
            f"{where}: this HPA has {len(keys)} metrics of this kind ({', '.join(keys)}): "
            "give a map from metric name to value"
        )
    return {keys[0]: _milli(value, where)}


def _step(obj: object, where: str, hpa: HPASpec) -> Step:
    if not isinstance(obj, Mapping):
        raise HPASpecError(f"{where}: expected an object")
    unknown = sorted(set(obj) - {"time_s", "current_replicas", "pods", "value_milli"})
    if unknown:
        raise HPASpecError(
            f"{where}: unknown field {unknown[0]!r} "
            "(known: time_s, current_replicas, pods, value_milli)"
        )
    if "time_s" not in obj:
        raise HPASpecError(f"{where}.time_s: Required value")
    time_s = _number(obj["time_s"], f"{where}.time_s")
    current = obj.get("current_replicas")
    if current is not None and (isinstance(current, bool) or not isinstance(current, int)):
        raise HPASpecError(f"{where}.current_replicas: expected an integer, got {current!r}")
    if current is not None and current < 0:
        raise HPASpecError(f"{where}.current_replicas: must be 0 or more")
    pod_keys = [m.name for m in hpa.metrics if m.type in _POD_SOURCES]
    resources = [
        m.name
        for m in hpa.metrics
        if m.type in (SourceType.RESOURCE, SourceType.CONTAINER_RESOURCE)
    ]
    value_keys = [m.name for m in hpa.metrics if m.type not in _POD_SOURCES]
    pods: tuple[PodSample, ...] | None = None
    if obj.get("pods") is not None:
        raw = obj["pods"]
        if not isinstance(raw, list):
            raise HPASpecError(f"{where}.pods: expected a list")
        pods = tuple(_pod(p, f"{where}.pods[{i}]", pod_keys, resources) for i, p in enumerate(raw))
        names = [p.name for p in pods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise HPASpecError(f"{where}.pods: two pods are named {dup[0]!r}")
    values = _per_metric(obj.get("value_milli"), f"{where}.value_milli", value_keys)
    return Step(time_s, current, pods, values)


_POD_SOURCES = (SourceType.RESOURCE, SourceType.CONTAINER_RESOURCE, SourceType.PODS)


def _pod(obj: object, where: str, keys: list[str], resources: list[str]) -> PodSample:
    if not isinstance(obj, Mapping):
        raise HPASpecError(f"{where}: expected an object")
    unknown = sorted(set(obj) - _POD_FIELDS)
    if unknown:
        raise HPASpecError(
            f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(_POD_FIELDS))})"
        )
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise HPASpecError(f"{where}.name: Required value")
    try:
        phase = PodPhase(obj.get("phase", "Running"))
    except ValueError:
        raise HPASpecError(
            f"{where}.phase: {obj.get('phase')!r} is not one of Running, Pending, Failed"
        ) from None
    flags = {}
    for flag, default in (("ready", True), ("deleting", False), ("cpu_initializing", False)):
        value = obj.get(flag, default)
        if not isinstance(value, bool):
            raise HPASpecError(f"{where}.{flag}: expected true or false, got {value!r}")
        flags[flag] = value
    req = obj.get("request_milli")
    if req is None or isinstance(req, Mapping):
        requests = _per_metric(req, f"{where}.request_milli", resources)
    else:  # one request for every resource metric
        requests = dict.fromkeys(resources, _milli(req, f"{where}.request_milli"))
    usage = _per_metric(obj.get("usage_milli"), f"{where}.usage_milli", keys)
    return PodSample(
        name=name,
        phase=phase,
        ready=flags["ready"],
        deleting=flags["deleting"],
        cpu_initializing=flags["cpu_initializing"],
        request_milli=requests,
        usage_milli=usage,
    )


def run(sim: Simulation) -> list[Decision]:
    """One decision per step, from one controller that remembers the steps before."""
    scaler = HorizontalAutoscaler(sim.hpa, sim.config)
    out: list[Decision] = []
    previous: int | None = None
    for step in sim.steps:
        current = step.current_replicas
        if current is None:
            if previous is not None:
                current = previous
            elif step.pods is not None:
                current = len(step.pods)
            else:
                current = sim.hpa.min_replicas
        pods = step.pods
        if pods is None:
            pods = tuple(PodSample(name=f"pod-{i}") for i in range(current))
        decision = scaler.reconcile(
            step.time_s, Observation(current, pods=pods, values_milli=step.values_milli)
        )
        out.append(decision)
        previous = decision.desired_replicas
    return out


def result_dict(d: Decision) -> dict[str, Any]:
    """One step of ``--json`` output."""
    return {
        "time_s": d.time_s,
        "desired_replicas": d.desired_replicas,
        "reason": d.reason,
        "utilization_percent": d.utilization_percent,
        "current_replicas": d.current_replicas,
        "message": d.message,
        "conditions": [c.to_dict() for c in d.conditions],
    }


def line(d: Decision) -> str:
    """One step as a line of text; each metric as current/target, as the
    TARGETS column of ``kubectl get hpa`` shows it."""
    metrics = " ".join(_metric_text(m) for m in d.metrics)
    return (
        f"t={_fmt_s(d.time_s)} current={d.current_replicas} desired={d.desired_replicas}"
        f"{' ' + metrics if metrics else ''} reason={d.reason}"
    )


def _metric_text(m: MetricStatus) -> str:
    t = m.target
    if t.type is TargetType.UTILIZATION:
        now = "<unknown>" if m.utilization_percent is None else f"{m.utilization_percent}%"
        return f"{m.name}={now}/{t.average_utilization}%"
    if t.type is TargetType.AVERAGE_VALUE:
        now = "<unknown>" if m.average_value_milli is None else f"{m.average_value_milli}m"
        return f"{m.name}={now}/{t.average_value_milli}m(avg)"
    now = "<unknown>" if m.value_milli is None else f"{m.value_milli}m"
    return f"{m.name}={now}/{t.value_milli}m"


def _fmt_s(t: float) -> str:
    return f"{int(t)}s" if float(t).is_integer() else f"{t:g}s"
