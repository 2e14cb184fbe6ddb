"""HorizontalPodAutoscaler objects (autoscaling/v2, as ``kubectl apply``
takes them) read into :mod:`tierbox.autoscale.hpa` types.

Validation follows the API server's (pkg/apis/autoscaling/validation) for
the fields the algorithm reads, and defaulting follows
pkg/apis/autoscaling/v2/defaults.go: ``minReplicas`` 1, a CPU utilization
target of 80 % when no metric is given, and a behavior that is present is
completed field by field from the default scale-up and scale-down rules. An
HPA without ``behavior`` stays without one (the controller's older path).
Every error names the field, as kubectl does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from tierbox.autoscale.hpa import (
    Behavior,
    HPASpec,
    MetricSpec,
    MetricTarget,
    PolicyType,
    ScalingPolicy,
    ScalingRules,
    SelectPolicy,
    SourceType,
    TargetType,
    scale_down_rules,
    scale_up_rules,
)
from tierbox.autoscale.quantity import milli_value, parse_quantity
from tierbox.errors import HPASpecError

API_VERSION = "autoscaling/v2"
#: pkg/apis/autoscaling: DefaultCPUUtilization
DEFAULT_CPU_UTILIZATION = 80
#: validation.go: MaxPeriodSeconds, MaxStabilizationWindowSeconds
MAX_PERIOD_S = 1800
MAX_STABILIZATION_WINDOW_S = 3600

_SOURCE_FIELD = {
    SourceType.RESOURCE: "resource",
    SourceType.CONTAINER_RESOURCE: "containerResource",
    SourceType.PODS: "pods",
    SourceType.OBJECT: "object",
    SourceType.EXTERNAL: "external",
}
#: the target types each source allows (validation.go validateMetricTarget and callers)
_ALLOWED_TARGETS = {
    SourceType.RESOURCE: (TargetType.UTILIZATION, TargetType.AVERAGE_VALUE),
    SourceType.CONTAINER_RESOURCE: (TargetType.UTILIZATION, TargetType.AVERAGE_VALUE),
    SourceType.PODS: (TargetType.AVERAGE_VALUE,),
    SourceType.OBJECT: (TargetType.VALUE, TargetType.AVERAGE_VALUE),
    SourceType.EXTERNAL: (TargetType.VALUE, TargetType.AVERAGE_VALUE),
}


def _map(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise HPASpecError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _int(value: object, where: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HPASpecError(f"{where}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise HPASpecError(f"{where}: must be greater than or equal to {minimum}, got {value}")
    return value


def _known(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise HPASpecError(
            f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})"
        )


def parse_hpa(obj: object, where: str = "hpa") -> HPASpec:
    """A HorizontalPodAutoscaler object (a mapping from YAML or JSON) as an
    :class:`~tierbox.autoscale.hpa.HPASpec`; HPASpecError names a bad field."""
    o = _map(obj, where)
    api = o.get("apiVersion", API_VERSION)
    if api != API_VERSION:
        raise HPASpecError(f"{where}.apiVersion: {api!r} is not supported: use {API_VERSION}")
    kind = o.get("kind", "HorizontalPodAutoscaler")
    if kind != "HorizontalPodAutoscaler":
        raise HPASpecError(f"{where}.kind: expected HorizontalPodAutoscaler, got {kind!r}")
    name = str(_map(o.get("metadata", {}), f"{where}.metadata").get("name", "hpa"))
    spec = _map(o.get("spec"), f"{where}.spec")
    _known(
        spec,
        {"scaleTargetRef", "minReplicas", "maxReplicas", "metrics", "behavior"},
        f"{where}.spec",
    )
    if "maxReplicas" not in spec:
        raise HPASpecError(f"{where}.spec.maxReplicas: Required value")
    min_replicas = _int(spec.get("minReplicas", 1), f"{where}.spec.minReplicas", minimum=0)
    max_replicas = _int(spec["maxReplicas"], f"{where}.spec.maxReplicas", minimum=1)
    if max_replicas < min_replicas:
        raise HPASpecError(
            f"{where}.spec.maxReplicas: must be greater than or equal to `minReplicas` "
            f"({max_replicas} < {min_replicas})"
        )
    raw_metrics = spec.get("metrics") or []
    if not isinstance(raw_metrics, list):
        raise HPASpecError(f"{where}.spec.metrics: expected a list")
    metrics = tuple(
        _metric(m, f"{where}.spec.metrics[{i}]") for i, m in enumerate(raw_metrics)
    ) or (
        MetricSpec(
            SourceType.RESOURCE,
            "cpu",
            MetricTarget(TargetType.UTILIZATION, average_utilization=DEFAULT_CPU_UTILIZATION),
        ),
    )
    if min_replicas == 0 and not any(
        m.type in (SourceType.OBJECT, SourceType.EXTERNAL) for m in metrics
    ):
        # validation.go: minReplicas 0 (HPAScaleToZero) needs an Object or External metric
        raise HPASpecError(
            f"{where}.spec.minReplicas: must be greater than or equal to 1 unless an Object or "
            "External metric is configured (scale to zero)"
        )
    keys = [m.name for m in metrics]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise HPASpecError(
            f"{where}.spec.metrics: two metrics are named {dup[0]!r}: samples are keyed by name"
        )
    behavior = None
    if spec.get("behavior") is not None:
        behavior = parse_behavior(spec["behavior"], f"{where}.spec.behavior")
    return HPASpec(
        max_replicas=max_replicas,
        metrics=metrics,
        min_replicas=min_replicas,
        behavior=behavior,
        name=name,
    )


def _metric(obj: object, where: str) -> MetricSpec:
    m = _map(obj, where)
    try:
        stype = SourceType(str(m.get("type")))
    except ValueError:
        names = ", ".join(s.value for s in SourceType)
        raise HPASpecError(f"{where}.type: {m.get('type')!r} is not one of {names}") from None
    field = _SOURCE_FIELD[stype]
    _known(m, {"type", field}, where)
    src = _map(m.get(field), f"{where}.{field}")
    here = f"{where}.{field}"
    container = ""
    kind = ""
    if stype in (SourceType.RESOURCE, SourceType.CONTAINER_RESOURCE):
        name = src.get("name")
        if not isinstance(name, str) or not name:
            raise HPASpecError(f"{here}.name: Required value (a resource name such as cpu)")
        if stype is SourceType.CONTAINER_RESOURCE:
            container = str(src.get("container") or "")
            if not container:
                raise HPASpecError(f"{here}.container: Required value")
    else:
        ident = _map(src.get("metric"), f"{here}.metric")
        name = ident.get("name")
        if not isinstance(name, str) or not name:
            raise HPASpecError(f"{here}.metric.name: Required value")
        if stype is SourceType.OBJECT:
            described = _map(src.get("describedObject"), f"{here}.describedObject")
            kind = str(described.get("kind") or "")
            if not kind:
                raise HPASpecError(f"{here}.describedObject.kind: Required value")
    target = _target(src.get("target"), f"{here}.target", stype)
    return MetricSpec(stype, name, target, container=container, object_kind=kind)


def _target(obj: object, where: str, stype: SourceType) -> MetricTarget:
    t = _map(obj, where)
    _known(t, {"type", "averageUtilization", "averageValue", "value"}, where)
    try:
        ttype = TargetType(str(t.get("type")))
    except ValueError:
        names = ", ".join(x.value for x in _ALLOWED_TARGETS[stype])
        raise HPASpecError(f"{where}.type: {t.get('type')!r} is not one of {names}") from None
    if ttype not in _ALLOWED_TARGETS[stype]:
        names = ", ".join(x.value for x in _ALLOWED_TARGETS[stype])
        raise HPASpecError(f"{where}.type: a {stype.value} metric takes a target of type {names}")
    if ttype is TargetType.UTILIZATION:
        if "averageUtilization" not in t:
            raise HPASpecError(f"{where}.averageUtilization: Required value")
        util = _int(t["averageUtilization"], f"{where}.averageUtilization", minimum=1)
        return MetricTarget(ttype, average_utilization=util)
    key = "value" if ttype is TargetType.VALUE else "averageValue"
    if key not in t:
        raise HPASpecError(f"{where}.{key}: Required value")
    if parse_quantity(t[key], f"{where}.{key}") <= 0:
        raise HPASpecError(f"{where}.{key}: must be positive")
    milli = milli_value(t[key], f"{where}.{key}")
    if ttype is TargetType.VALUE:
        return MetricTarget(ttype, value_milli=milli)
    return MetricTarget(ttype, average_value_milli=milli)


def parse_behavior(obj: object, where: str = "behavior") -> Behavior:
    """``spec.behavior``, completed from the defaults as the API server does."""
    b = _map(obj, where)
    _known(b, {"scaleUp", "scaleDown"}, where)
    up = _rules(b.get("scaleUp"), f"{where}.scaleUp", scale_up_rules())
    down = _rules(b.get("scaleDown"), f"{where}.scaleDown", scale_down_rules())
    return Behavior(scale_up=up, scale_down=down)


def _rules(obj: object, where: str, defaults: ScalingRules) -> ScalingRules:
    """defaults.go ``copyHPAScalingRules``: the fields that are set replace the defaults."""
    if obj is None:
        return defaults
    r = _map(obj, where)
    _known(r, {"stabilizationWindowSeconds", "selectPolicy", "policies", "tolerance"}, where)
    out = defaults
    if r.get("stabilizationWindowSeconds") is not None:
        window = _int(
            r["stabilizationWindowSeconds"], f"{where}.stabilizationWindowSeconds", minimum=0
        )
        if window > MAX_STABILIZATION_WINDOW_S:
            raise HPASpecError(
                f"{where}.stabilizationWindowSeconds: must be less than or equal to "
                f"{MAX_STABILIZATION_WINDOW_S}"
            )
        out = replace(out, stabilization_window_s=window)
    if r.get("selectPolicy") is not None:
        try:
            out = replace(out, select_policy=SelectPolicy(r["selectPolicy"]))
        except ValueError:
            raise HPASpecError(
                f"{where}.selectPolicy: {r['selectPolicy']!r} is not one of Max, Min, Disabled"
            ) from None
    if r.get("policies") is not None:
        raw = r["policies"]
        if not isinstance(raw, list):
            raise HPASpecError(f"{where}.policies: expected a list")
        if not raw and out.select_policy is not SelectPolicy.DISABLED:
            raise HPASpecError(f"{where}.policies: must specify at least one Policy")
        out = replace(
            out, policies=tuple(_policy(p, f"{where}.policies[{i}]") for i, p in enumerate(raw))
        )
    if r.get("tolerance") is not None:
        tol = parse_quantity(r["tolerance"], f"{where}.tolerance")
        if tol < 0:
            raise HPASpecError(f"{where}.tolerance: must be greater than or equal to 0")
        out = replace(out, tolerance=float(tol))
    return out


def _policy(obj: object, where: str) -> ScalingPolicy:
    p = _map(obj, where)
    _known(p, {"type", "value", "periodSeconds"}, where)
    try:
        ptype = PolicyType(str(p.get("type")))
    except ValueError:
        raise HPASpecError(f"{where}.type: {p.get('type')!r} is not one of Pods, Percent") from None
    value = _int(p.get("value"), f"{where}.value", minimum=1)
    period = _int(p.get("periodSeconds"), f"{where}.periodSeconds", minimum=1)
    if period > MAX_PERIOD_S:
        raise HPASpecError(f"{where}.periodSeconds: must be less than or equal to {MAX_PERIOD_S}")
    return ScalingPolicy(ptype, value, period)
