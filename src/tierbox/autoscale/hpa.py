"""The Kubernetes HorizontalPodAutoscaler algorithm (autoscaling/v2), pure.

This module follows the controller in k8s.io/kubernetes
``pkg/controller/podautoscaler``: ``replica_calculator.go`` (how one metric
becomes a replica count: ratios, tolerance, missing and not-yet-ready pods),
``horizontal.go`` (several metrics, min/max, stabilization windows, scaling
policies, conditions) and ``metrics/utilization.go`` (the ratios, in
integer milli-units as Kubernetes computes them). Each rule below names the
function it follows.

Nothing here reads a clock or a metrics server: :meth:`HorizontalAutoscaler.reconcile`
takes the time (seconds, any epoch) and an :class:`Observation` (the pods and
metric samples the controller would have listed), so every decision can be
replayed and tested with time as an input. The autoscaler keeps the state
the controller keeps between its loops (recent recommendations, scale
events) and can save and load it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tierbox.errors import MetricUnavailableError

#: Go's int32 range: replica counts are int32 in the API.
_INT32_MAX = 2**31 - 1
_INT32_MIN = -(2**31)
#: kube-controller-manager defaults (``--horizontal-pod-autoscaler-tolerance``,
#: ``--horizontal-pod-autoscaler-downscale-stabilization``).
DEFAULT_TOLERANCE = 0.1
DEFAULT_DOWNSCALE_STABILIZATION_S = 300.0
#: horizontal.go: without a behavior, one loop may scale up to
#: max(scaleUpLimitFactor x current, scaleUpLimitMinimum).
SCALE_UP_LIMIT_FACTOR = 2.0
SCALE_UP_LIMIT_MINIMUM = 4.0


class SourceType(enum.StrEnum):
    """``spec.metrics[].type``."""

    RESOURCE = "Resource"
    CONTAINER_RESOURCE = "ContainerResource"
    PODS = "Pods"
    OBJECT = "Object"
    EXTERNAL = "External"


class TargetType(enum.StrEnum):
    """``spec.metrics[].*.target.type``."""

    UTILIZATION = "Utilization"
    VALUE = "Value"
    AVERAGE_VALUE = "AverageValue"


class PolicyType(enum.StrEnum):
    PODS = "Pods"
    PERCENT = "Percent"


class SelectPolicy(enum.StrEnum):
    MAX = "Max"
    MIN = "Min"
    DISABLED = "Disabled"


class PodPhase(enum.StrEnum):
    RUNNING = "Running"
    PENDING = "Pending"
    FAILED = "Failed"


@dataclass(frozen=True)
class MetricTarget:
    """One of the three targets; values in milli-units, utilization in percent."""

    type: TargetType
    average_utilization: int | None = None
    average_value_milli: int | None = None
    value_milli: int | None = None


@dataclass(frozen=True)
class MetricSpec:
    """One entry of ``spec.metrics``. ``name`` is the resource name (``cpu``)
    for Resource and ContainerResource metrics, else the metric's name; it is
    also the key of this metric's samples in an :class:`Observation`."""

    type: SourceType
    name: str
    target: MetricTarget
    container: str = ""
    #: Object metrics: the described object's kind, for messages
    object_kind: str = ""

    def describe(self) -> str:
        """The metric as the controller names it in messages and events."""
        if self.type in (SourceType.RESOURCE, SourceType.CONTAINER_RESOURCE):
            container = self.type is SourceType.CONTAINER_RESOURCE
            what = "container resource" if container else "resource"
            if self.target.type is TargetType.UTILIZATION:
                return f"{self.name} {what} utilization (percentage of request)"
            return f"{self.name} resource"
        if self.type is SourceType.PODS:
            return f"pods metric {self.name}"
        if self.type is SourceType.OBJECT:
            return f"{self.object_kind or 'Object'} metric {self.name}"
        return f"external metric {self.name}"


@dataclass(frozen=True)
class ScalingPolicy:
    type: PolicyType
    value: int
    period_s: int


@dataclass(frozen=True)
class ScalingRules:
    """``behavior.scaleUp`` or ``behavior.scaleDown``, after the API server's
    defaulting (:func:`scale_up_rules`, :func:`scale_down_rules`).
    ``stabilization_window_s`` None on scale-down means the controller's
    default window."""

    policies: tuple[ScalingPolicy, ...]
    select_policy: SelectPolicy = SelectPolicy.MAX
    stabilization_window_s: int | None = None
    #: HPAConfigurableTolerance: this direction's tolerance, else the controller's
    tolerance: float | None = None


@dataclass(frozen=True)
class Behavior:
    scale_up: ScalingRules
    scale_down: ScalingRules


def scale_up_rules() -> ScalingRules:
    """The scale-up rules the API server fills in (pkg/apis/autoscaling/v2
    defaults.go, GenerateHPAScaleUpRules): no stabilization, and per 15 s
    the larger of +4 pods and +100 %."""
    return ScalingRules(
        policies=(
            ScalingPolicy(PolicyType.PODS, 4, 15),
            ScalingPolicy(PolicyType.PERCENT, 100, 15),
        ),
        select_policy=SelectPolicy.MAX,
        stabilization_window_s=0,
    )


def scale_down_rules() -> ScalingRules:
    """The scale-down rules the API server fills in (GenerateHPAScaleDownRules):
    the controller's stabilization window (300 s by default) and up to 100 %
    of the pods per 15 s."""
    return ScalingRules(
        policies=(ScalingPolicy(PolicyType.PERCENT, 100, 15),),
        select_policy=SelectPolicy.MAX,
        stabilization_window_s=None,
    )


def default_behavior() -> Behavior:
    """What an empty ``behavior: {}`` becomes after defaulting."""
    return Behavior(scale_up=scale_up_rules(), scale_down=scale_down_rules())


@dataclass(frozen=True)
class HPASpec:
    """The parts of a HorizontalPodAutoscaler's spec the algorithm reads.
    ``behavior`` None is an HPA without one: the controller's older path
    (one downscale window, scale-up limited to 2x or 4 pods per loop)."""

    max_replicas: int
    metrics: tuple[MetricSpec, ...]
    min_replicas: int = 1
    behavior: Behavior | None = None
    name: str = "hpa"


@dataclass(frozen=True)
class ControllerConfig:
    """kube-controller-manager flags that change the algorithm."""

    tolerance: float = DEFAULT_TOLERANCE
    downscale_stabilization_window_s: float = DEFAULT_DOWNSCALE_STABILIZATION_S


@dataclass(frozen=True)
class PodSample:
    """One pod as the controller lists it, with its metric samples.

    ``request_milli`` maps a resource name to the pod's request;
    ``usage_milli`` maps a metric's name to the pod's sample (None: no sample
    was returned for this pod). For CPU, a pod that is not ``ready`` or whose
    sample was taken while it was initializing (``cpu_initializing``) is set
    aside, as the controller does within its CPU initialization period.
    """

    name: str
    phase: PodPhase = PodPhase.RUNNING
    ready: bool = True
    deleting: bool = False
    cpu_initializing: bool = False
    request_milli: Mapping[str, int | None] = field(default_factory=dict)
    usage_milli: Mapping[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Observation:
    """What one controller loop sees: the target's ``spec.replicas``
    (``current_replicas``), its ``status.replicas`` (pods that exist; by
    default those not being deleted and not failed), its pods, and the values
    of Object and External metrics by name (None: no value)."""

    current_replicas: int
    pods: tuple[PodSample, ...] = ()
    values_milli: Mapping[str, int | None] = field(default_factory=dict)
    status_replicas: int | None = None

    def existing_replicas(self) -> int:
        if self.status_replicas is not None:
            return self.status_replicas
        return sum(1 for p in self.pods if not p.deleting and p.phase is not PodPhase.FAILED)


@dataclass(frozen=True)
class Condition:
    """An HPA status condition, as ``kubectl describe hpa`` lists them."""

    type: str
    status: bool
    reason: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": "True" if self.status else "False",
            "reason": self.reason,
            "message": self.message,
        }


@dataclass(frozen=True)
class MetricStatus:
    """One metric's current value and proposal (or why it has none)."""

    name: str
    type: SourceType
    target: MetricTarget
    proposal: int | None = None
    utilization_percent: int | None = None
    average_value_milli: int | None = None
    value_milli: int | None = None
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type.value,
            "proposal": self.proposal,
            "utilization_percent": self.utilization_percent,
            "average_value_milli": self.average_value_milli,
            "value_milli": self.value_milli,
            "error": self.error,
        }


@dataclass(frozen=True)
class Decision:
    """The outcome of one loop. ``reason`` summarises it with a Kubernetes
    condition reason: the limiting reason when ScalingLimited is true
    (ScaleUpLimit, ScaleDownLimit, TooManyReplicas, TooFewReplicas), else the
    stabilization that held the recommendation (ScaleUpStabilized,
    ScaleDownStabilized), else DesiredWithinRange; a loop that could not
    compute a metric gives the metric's failure reason (FailedGetResourceMetric,
    ...) and ScalingDisabled when the target sits at zero replicas."""

    time_s: float
    current_replicas: int
    desired_replicas: int
    reason: str
    message: str
    conditions: tuple[Condition, ...]
    metrics: tuple[MetricStatus, ...] = ()
    #: the recommendation from the metrics, before stabilization and limits
    recommendation: int | None = None
    rescale: bool = False
    #: the event Kubernetes records on a rescale ("cpu ... above target")
    rescale_reason: str = ""

    @property
    def utilization_percent(self) -> int | None:
        """The first utilization metric's current utilization (percent of request)."""
        for m in self.metrics:
            if m.utilization_percent is not None:
                return m.utilization_percent
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "time_s": self.time_s,
            "current_replicas": self.current_replicas,
            "desired_replicas": self.desired_replicas,
            "reason": self.reason,
            "message": self.message,
            "utilization_percent": self.utilization_percent,
            "recommendation": self.recommendation,
            "rescale": self.rescale,
            "rescale_reason": self.rescale_reason,
            "conditions": [c.to_dict() for c in self.conditions],
            "metrics": [m.to_dict() for m in self.metrics],
        }


# ---- replica_calculator.go -----------------------------------------------------------


@dataclass(frozen=True)
class Tolerances:
    """replica_calculator.go ``Tolerances``: a ratio in
    [1 - scale_down, 1 + scale_up] changes nothing."""

    scale_down: float = DEFAULT_TOLERANCE
    scale_up: float = DEFAULT_TOLERANCE

    def is_within(self, ratio: float) -> bool:
        return (1.0 - self.scale_down) <= ratio <= (1.0 + self.scale_up)


def _quo(a: int, b: int) -> int:
    """Go's integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _int32_ceil(x: float) -> int:
    """int32(math.Ceil(x)), saturated instead of Go's undefined overflow."""
    if math.isnan(x):
        return 0
    if x >= _INT32_MAX:
        return _INT32_MAX
    if x <= _INT32_MIN:
        return _INT32_MIN
    return math.ceil(x)


def _ratio(num: float, den: float) -> float:
    """Go float division: x/0 is +Inf (or NaN for 0/0), never an exception."""
    if den == 0:
        if num == 0:
            return math.nan
        return math.inf if num > 0 else -math.inf
    return num / den


@dataclass
class _Groups:
    ready: int
    unready: set[str]
    missing: set[str]
    ignored: set[str]


def group_pods(pods: Sequence[PodSample], metrics: Mapping[str, int], resource: str) -> _Groups:
    """replica_calculator.go ``groupPods``: deleted and failed pods are
    ignored; pending pods are unready; pods without a sample are missing; for
    CPU, pods that are not ready or still initializing are unready too."""
    g = _Groups(0, set(), set(), set())
    for p in pods:
        if p.deleting or p.phase is PodPhase.FAILED:
            g.ignored.add(p.name)
            continue
        if p.phase is PodPhase.PENDING:
            g.unready.add(p.name)
            continue
        if p.name not in metrics:
            g.missing.add(p.name)
            continue
        if resource == "cpu" and (not p.ready or p.cpu_initializing):
            g.unready.add(p.name)
            continue
        g.ready += 1
    return g


def resource_utilization_ratio(
    metrics: Mapping[str, int], requests: Mapping[str, int], target_utilization: int
) -> tuple[float, int, int]:
    """metrics/utilization.go ``GetResourceUtilizationRatio``: (ratio,
    utilization percent truncated to an integer, raw average milli-value)."""
    metrics_total = 0
    requests_total = 0
    entries = 0
    for pod, value in metrics.items():
        request = requests.get(pod)
        if request is None:
            continue  # missing requests are checked elsewhere
        metrics_total += value
        requests_total += request
        entries += 1
    if requests_total == 0:
        raise MetricUnavailableError(
            "no metrics returned matched known pods", reason="FailedGetResourceMetric"
        )
    utilization = _quo(metrics_total * 100, requests_total)
    return utilization / target_utilization, utilization, _quo(metrics_total, entries)


def metric_usage_ratio(metrics: Mapping[str, int], target_usage: int) -> tuple[float, int]:
    """metrics/utilization.go ``GetMetricUsageRatio``: (ratio, average usage)."""
    usage = _quo(sum(metrics.values()), len(metrics))
    return usage / target_usage, usage


def _pod_requests(pods: Sequence[PodSample], resource: str) -> dict[str, int]:
    """replica_calculator.go ``calculateRequests``: every pod needs a request."""
    out: dict[str, int] = {}
    for p in pods:
        request = p.request_milli.get(resource)
        if request is None:
            raise MetricUnavailableError(
                f"missing request for {resource} in Pod {p.name}",
                reason="FailedGetResourceMetric",
            )
        out[p.name] = request
    return out


def _samples(pods: Sequence[PodSample], key: str) -> dict[str, int]:
    """What the metrics client returns: the pods that have a sample."""
    out: dict[str, int] = {}
    for p in pods:
        value = p.usage_milli.get(key)
        if value is not None:
            out[p.name] = value
    return out


def resource_replicas(
    current: int,
    target_utilization: int,
    resource: str,
    tolerances: Tolerances,
    pods: Sequence[PodSample],
    *,
    failure_reason: str = "FailedGetResourceMetric",
) -> tuple[int, int, int]:
    """replica_calculator.go ``GetResourceReplicas``: (replicas, utilization
    percent, raw average milli-value) for a target utilization."""
    if not pods:
        raise MetricUnavailableError(
            "no pods returned by selector while calculating replica count", reason=failure_reason
        )
    metrics = _samples(pods, resource)
    g = group_pods(pods, metrics, resource)
    for name in g.ignored | g.unready:
        metrics.pop(name, None)
    if not metrics:
        raise MetricUnavailableError(
            "did not receive metrics for targeted pods (pods might be unready)",
            reason=failure_reason,
        )
    requests = _pod_requests(pods, resource)
    ratio, utilization, raw = resource_utilization_ratio(metrics, requests, target_utilization)

    scale_up_with_unready = bool(g.unready) and ratio > 1.0
    if not scale_up_with_unready and not g.missing:
        if tolerances.is_within(ratio):
            return current, utilization, raw
        return _int32_ceil(ratio * g.ready), utilization, raw

    if g.missing:
        if ratio < 1.0:
            # scale-down: missing pods use 100 % of their request (or the target
            # when the target is above 100 %)
            fallback = max(100, target_utilization)
            for name in g.missing:
                metrics[name] = _quo(requests[name] * fallback, 100)
        elif ratio > 1.0:
            for name in g.missing:  # scale-up: missing pods use nothing
                metrics[name] = 0
    if scale_up_with_unready:
        for name in g.unready:  # scale-up: not-yet-ready pods use nothing
            metrics[name] = 0

    new_ratio, _, _ = resource_utilization_ratio(metrics, requests, target_utilization)
    if (
        tolerances.is_within(new_ratio)
        or (ratio < 1.0 and new_ratio > 1.0)
        or (ratio > 1.0 and new_ratio < 1.0)
    ):
        return current, utilization, raw  # too small a change, or the direction flips
    replicas = _int32_ceil(new_ratio * len(metrics))
    if (new_ratio < 1.0 and replicas > current) or (new_ratio > 1.0 and replicas < current):
        return current, utilization, raw
    return replicas, utilization, raw


def plain_metric_replicas(
    current: int,
    target_usage: int,
    key: str,
    tolerances: Tolerances,
    pods: Sequence[PodSample],
    *,
    resource: str = "",
    failure_reason: str = "FailedGetPodsMetric",
) -> tuple[int, int]:
    """replica_calculator.go ``calcPlainMetricReplicas`` (Pods metrics and
    Resource metrics with an AverageValue target): (replicas, average usage)."""
    if not pods:
        raise MetricUnavailableError(
            "no pods returned by selector while calculating replica count", reason=failure_reason
        )
    metrics = _samples(pods, key)
    g = group_pods(pods, metrics, resource)
    for name in g.ignored | g.unready:
        metrics.pop(name, None)
    if not metrics:
        raise MetricUnavailableError(
            "did not receive metrics for targeted pods (pods might be unready)",
            reason=failure_reason,
        )
    ratio, usage = metric_usage_ratio(metrics, target_usage)

    scale_up_with_unready = bool(g.unready) and ratio > 1.0
    if not scale_up_with_unready and not g.missing:
        if tolerances.is_within(ratio):
            return current, usage
        return _int32_ceil(ratio * g.ready), usage

    if g.missing:
        if ratio < 1.0:
            for name in g.missing:  # scale-down: missing pods use exactly the target
                metrics[name] = target_usage
        elif ratio > 1.0:
            for name in g.missing:
                metrics[name] = 0
    if scale_up_with_unready:
        for name in g.unready:
            metrics[name] = 0

    new_ratio, _ = metric_usage_ratio(metrics, target_usage)
    if (
        tolerances.is_within(new_ratio)
        or (ratio < 1.0 and new_ratio > 1.0)
        or (ratio > 1.0 and new_ratio < 1.0)
    ):
        return current, usage
    replicas = _int32_ceil(new_ratio * len(metrics))
    if (new_ratio < 1.0 and replicas > current) or (new_ratio > 1.0 and replicas < current):
        return current, usage
    return replicas, usage


def _ready_pods(pods: Sequence[PodSample], reason: str) -> int:
    """replica_calculator.go ``getReadyPodsCount``: running and ready."""
    if not pods:
        raise MetricUnavailableError(
            "unable to calculate ready pods: no pods returned by selector while calculating "
            "replica count",
            reason=reason,
        )
    return sum(1 for p in pods if p.phase is PodPhase.RUNNING and p.ready)


def usage_ratio_replicas(
    current: int, ratio: float, tolerances: Tolerances, pods: Sequence[PodSample], reason: str
) -> int:
    """replica_calculator.go ``getUsageRatioReplicaCount`` (Object and External
    metrics with a Value target): from zero replicas, ceil(ratio) (scale to
    and from zero); otherwise the ratio times the ready pods."""
    if current != 0:
        if tolerances.is_within(ratio):
            return current
        return _int32_ceil(ratio * _ready_pods(pods, reason))
    return _int32_ceil(ratio)


def per_pod_value_replicas(
    status_replicas: int, target_average: int, value: int, tolerances: Tolerances
) -> tuple[int, int]:
    """replica_calculator.go ``GetObjectPerPodMetricReplicas`` and
    ``GetExternalPerPodMetricReplicas`` (an AverageValue target): the value is
    shared by the replicas that exist. Returns (replicas, value per replica)."""
    replicas = status_replicas
    ratio = _ratio(value, target_average * replicas)
    if not tolerances.is_within(ratio):
        replicas = _int32_ceil(value / target_average)
    per_replica = value if status_replicas == 0 else math.ceil(value / status_replicas)
    return replicas, per_replica


# ---- horizontal.go ---------------------------------------------------------------------


@dataclass
class _Recommendation:
    replicas: int
    time_s: float


@dataclass
class _ScaleEvent:
    change: int  # absolute value
    time_s: float
    outdated: bool = False


def _changes_in_period(period_s: int, events: Sequence[_ScaleEvent], now_s: float) -> int:
    """horizontal.go ``getReplicasChangePerPeriod``."""
    cutoff = now_s - period_s
    return sum(e.change for e in events if e.time_s > cutoff)


def scale_up_limit(
    current: int,
    up_events: Sequence[_ScaleEvent],
    down_events: Sequence[_ScaleEvent],
    rules: ScalingRules,
    now_s: float,
) -> int:
    """horizontal.go ``calculateScaleUpLimitWithScalingRules``: each policy
    allows growth from the replica count at the start of its period; Max takes
    the most permissive policy, Min the least, Disabled allows none."""
    if rules.select_policy is SelectPolicy.DISABLED:
        return current
    pick: Callable[[int, int], int]
    if rules.select_policy is SelectPolicy.MIN:
        result, pick = _INT32_MAX, min
    else:
        result, pick = _INT32_MIN, max
    for policy in rules.policies:
        added = _changes_in_period(policy.period_s, up_events, now_s)
        removed = _changes_in_period(policy.period_s, down_events, now_s)
        start = current - added + removed
        if policy.type is PolicyType.PODS:
            proposed = start + policy.value
        else:
            # rounded up, or a small percentage of a small count would never grow it
            proposed = _int32_ceil(start * (1 + policy.value / 100))
        result = pick(result, proposed)
    return result


def scale_down_limit(
    current: int,
    up_events: Sequence[_ScaleEvent],
    down_events: Sequence[_ScaleEvent],
    rules: ScalingRules,
    now_s: float,
) -> int:
    """horizontal.go ``calculateScaleDownLimitWithBehaviors``: the lowest
    count the policies allow from the replica count at each period's start."""
    if rules.select_policy is SelectPolicy.DISABLED:
        return current
    pick: Callable[[int, int], int]
    if rules.select_policy is SelectPolicy.MIN:
        result, pick = _INT32_MIN, max
    else:
        result, pick = _INT32_MAX, min
    for policy in rules.policies:
        added = _changes_in_period(policy.period_s, up_events, now_s)
        removed = _changes_in_period(policy.period_s, down_events, now_s)
        start = current - added + removed
        if policy.type is PolicyType.PODS:
            proposed = start - policy.value
        else:
            proposed = int(start * (1 - policy.value / 100))  # Go's int32() truncates
        result = pick(result, proposed)
    return result


def _longest_period(rules: ScalingRules) -> int:
    return max((p.period_s for p in rules.policies), default=0)


_SCALING_LIMITED_MESSAGES = {
    "ScaleUpLimit": "the desired replica count is increasing faster than the maximum scale rate",
    "ScaleDownLimit": "the desired replica count is decreasing faster than the maximum scale rate",
    "TooManyReplicas": "the desired replica count is more than the maximum replica count",
    "TooFewReplicas": "the desired replica count is less than the minimum replica count",
    "DesiredWithinRange": "the desired count is within the acceptable range",
}
_STABILIZED_MESSAGES = {
    "ScaleUpStabilized": (
        "recent recommendations were lower than current one, applying the lowest recent "
        "recommendation"
    ),
    "ScaleDownStabilized": (
        "recent recommendations were higher than current one, applying the highest recent "
        "recommendation"
    ),
}


class HorizontalAutoscaler:
    """One HPA's controller: its spec and the history its loops keep.

    ``reconcile(now_s, observation)`` is one pass of ``reconcileAutoscaler``;
    call it with increasing times (a sync period apart in Kubernetes, 15 s
    by default). The caller applies ``desired_replicas`` to the target.
    """

    def __init__(self, spec: HPASpec, config: ControllerConfig | None = None) -> None:
        self.spec = spec
        self.config = config or ControllerConfig()
        self._recommendations: list[_Recommendation] = []
        self._up_events: list[_ScaleEvent] = []
        self._down_events: list[_ScaleEvent] = []
        self._conditions: dict[str, Condition] = {}
        self.last: Decision | None = None

    # ---- persistence ----------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The history the next loop depends on, as JSON-able data."""
        return {
            "recommendations": [[r.replicas, r.time_s] for r in self._recommendations],
            "scale_up_events": [[e.change, e.time_s, e.outdated] for e in self._up_events],
            "scale_down_events": [[e.change, e.time_s, e.outdated] for e in self._down_events],
            "conditions": [c.to_dict() for c in self._conditions.values()],
        }

    def load_state(self, data: Mapping[str, Any]) -> None:
        """Continue from :meth:`state` (a restarted process keeps its windows)."""
        self._recommendations = [
            _Recommendation(int(r), float(t)) for r, t in data.get("recommendations", [])
        ]
        self._up_events = [
            _ScaleEvent(int(c), float(t), bool(o)) for c, t, o in data.get("scale_up_events", [])
        ]
        self._down_events = [
            _ScaleEvent(int(c), float(t), bool(o)) for c, t, o in data.get("scale_down_events", [])
        ]
        self._conditions = {
            c["type"]: Condition(c["type"], c["status"] == "True", c["reason"], c["message"])
            for c in data.get("conditions", [])
        }

    def with_spec(self, spec: HPASpec) -> None:
        """Change the spec (bounds, targets) and keep the history, as editing
        an HPA object does."""
        self.spec = spec

    # ---- one loop -------------------------------------------------------------------
    def _set(self, ctype: str, status: bool, reason: str, message: str) -> None:
        self._conditions[ctype] = Condition(ctype, status, reason, message)

    def _limited(self, status: bool, reason: str) -> None:
        self._set("ScalingLimited", status, reason, _SCALING_LIMITED_MESSAGES[reason])

    def _tolerances(self) -> Tolerances:
        """horizontal.go ``computeTolerances``: per-direction tolerances from
        the behavior (HPAConfigurableTolerance), else the controller's."""
        t = self.config.tolerance
        b = self.spec.behavior
        if b is None:
            return Tolerances(t, t)
        down = b.scale_down.tolerance if b.scale_down.tolerance is not None else t
        up = b.scale_up.tolerance if b.scale_up.tolerance is not None else t
        return Tolerances(scale_down=down, scale_up=up)

    def reconcile(self, now_s: float, obs: Observation) -> Decision:
        """One pass of horizontal.go ``reconcileAutoscaler`` at time ``now_s``."""
        spec = self.spec
        current = obs.current_replicas
        # recordInitialRecommendation: the first loop remembers the current size
        if not self._recommendations:
            self._recommendations = [_Recommendation(current, now_s)]
        self._set(
            "AbleToScale",
            True,
            "SucceededGetScale",
            "the HPA controller was able to get the target's current scale",
        )
        statuses: tuple[MetricStatus, ...] = ()
        recommendation: int | None = None
        rescale_reason = ""
        rescale = True
        if current == 0 and spec.min_replicas != 0:
            desired = 0
            rescale = False
            reason = "ScalingDisabled"
            message = "scaling is disabled since the replica count of the target is zero"
            self._set("ScalingActive", False, reason, message)
        elif current > spec.max_replicas:
            desired = spec.max_replicas
            reason, message = "TooManyReplicas", _SCALING_LIMITED_MESSAGES["TooManyReplicas"]
            rescale_reason = "Current number of replicas above Spec.MaxReplicas"
        elif current < spec.min_replicas:
            desired = spec.min_replicas
            reason, message = "TooFewReplicas", _SCALING_LIMITED_MESSAGES["TooFewReplicas"]
            rescale_reason = "Current number of replicas below Spec.MinReplicas"
        else:
            proposal, metric_name, statuses, failure = self._replicas_for_metrics(obs)
            if failure is not None:
                # computeReplicasForMetrics returned -1: nothing is scaled
                decision = Decision(
                    time_s=now_s,
                    current_replicas=current,
                    desired_replicas=current,
                    reason=failure.reason,
                    message=self._conditions["ScalingActive"].message,
                    conditions=tuple(self._conditions.values()),
                    metrics=statuses,
                )
                self.last = decision
                return decision
            recommendation = proposal
            desired = proposal if proposal > 0 else 0
            if desired > current:
                rescale_reason = f"{metric_name} above target"
            if desired < current:
                rescale_reason = "All metrics below target"
            if spec.behavior is None:
                desired, reason = self._normalize(now_s, current, desired)
            else:
                desired, reason = self._normalize_with_behaviors(now_s, current, desired)
            message = _SCALING_LIMITED_MESSAGES.get(reason) or _STABILIZED_MESSAGES[reason]
            rescale = desired != current
        if rescale:
            self._set(
                "AbleToScale",
                True,
                "SucceededRescale",
                f"the HPA controller was able to update the target scale to {desired}",
            )
            self._store_scale_event(now_s, current, desired)
        else:
            desired = current
        decision = Decision(
            time_s=now_s,
            current_replicas=current,
            desired_replicas=desired,
            reason=reason,
            message=message,
            conditions=tuple(self._conditions.values()),
            metrics=statuses,
            recommendation=recommendation,
            rescale=rescale,
            rescale_reason=rescale_reason,
        )
        self.last = decision
        return decision

    def _replicas_for_metrics(
        self, obs: Observation
    ) -> tuple[int, str, tuple[MetricStatus, ...], MetricUnavailableError | None]:
        """horizontal.go ``computeReplicasForMetrics``: the largest proposal of
        the metrics that could be computed. If none could, or some could not
        and the others would scale down, nothing is scaled."""
        replicas = 0
        metric_name = ""
        statuses: list[MetricStatus] = []
        first_error: MetricUnavailableError | None = None
        invalid = 0
        for m in self.spec.metrics:
            try:
                status = self._replicas_for_metric(m, obs)
            except MetricUnavailableError as exc:
                statuses.append(MetricStatus(m.name, m.type, m.target, error=str(exc)))
                if first_error is None:
                    first_error = exc
                invalid += 1
                continue
            statuses.append(status)
            assert status.proposal is not None
            if replicas == 0 or status.proposal > replicas:
                replicas = status.proposal
                metric_name = m.describe()
        if first_error is not None and (
            invalid >= len(self.spec.metrics) or replicas < obs.current_replicas
        ):
            self._set(
                "ScalingActive",
                False,
                first_error.reason,
                f"the HPA was unable to compute the replica count: {first_error}",
            )
            return -1, "", tuple(statuses), first_error
        self._set(
            "ScalingActive",
            True,
            "ValidMetricFound",
            f"the HPA was able to successfully calculate a replica count from {metric_name}",
        )
        return replicas, metric_name, tuple(statuses), None

    def _replicas_for_metric(self, m: MetricSpec, obs: Observation) -> MetricStatus:
        """horizontal.go ``computeReplicasForMetric`` and its computeStatusFor* helpers."""
        current = obs.current_replicas
        tol = self._tolerances()
        t = m.target
        if m.type in (SourceType.RESOURCE, SourceType.CONTAINER_RESOURCE):
            why = (
                "FailedGetContainerResourceMetric"
                if m.type is SourceType.CONTAINER_RESOURCE
                else "FailedGetResourceMetric"
            )
            if t.type is TargetType.AVERAGE_VALUE and t.average_value_milli is not None:
                n, usage = _wrap(
                    f"failed to get {m.name} usage",
                    why,
                    lambda: plain_metric_replicas(
                        current,
                        t.average_value_milli or 0,
                        m.name,
                        tol,
                        obs.pods,
                        resource=m.name,
                        failure_reason=why,
                    ),
                )
                return MetricStatus(m.name, m.type, t, n, average_value_milli=usage)
            if t.average_utilization is None:
                raise MetricUnavailableError(
                    "invalid resource metric source: neither an average utilization target "
                    "nor an average value (usage) target was set",
                    reason=why,
                )
            n, util, raw = _wrap(
                f"failed to get {m.name} utilization",
                why,
                lambda: resource_replicas(
                    current, t.average_utilization or 0, m.name, tol, obs.pods, failure_reason=why
                ),
            )
            return MetricStatus(
                m.name, m.type, t, n, utilization_percent=util, average_value_milli=raw
            )
        if m.type is SourceType.PODS:
            if t.average_value_milli is None:
                raise MetricUnavailableError(
                    "invalid pods metric source: no average value target was set",
                    reason="FailedGetPodsMetric",
                )
            n, usage = plain_metric_replicas(current, t.average_value_milli, m.name, tol, obs.pods)
            return MetricStatus(m.name, m.type, t, n, average_value_milli=usage)
        why = "FailedGetObjectMetric" if m.type is SourceType.OBJECT else "FailedGetExternalMetric"
        value = obs.values_milli.get(m.name)
        if value is None:
            raise MetricUnavailableError(f"unable to get metric {m.name}: no value", reason=why)
        if t.type is TargetType.VALUE and t.value_milli is not None:
            ratio = value / t.value_milli
            n = usage_ratio_replicas(current, ratio, tol, obs.pods, why)
            return MetricStatus(m.name, m.type, t, n, value_milli=value)
        if t.type is TargetType.AVERAGE_VALUE and t.average_value_milli is not None:
            n, per = per_pod_value_replicas(
                obs.existing_replicas(), t.average_value_milli, value, tol
            )
            return MetricStatus(m.name, m.type, t, n, average_value_milli=per, value_milli=value)
        kind = "object" if m.type is SourceType.OBJECT else "external"
        raise MetricUnavailableError(
            f"invalid {kind} metric source: neither a value target nor an average value "
            "target was set",
            reason=why,
        )

    # ---- normalization ----------------------------------------------------------------
    def _normalize(self, now_s: float, current: int, prenormalized: int) -> tuple[int, str]:
        """horizontal.go ``normalizeDesiredReplicas`` (an HPA without a
        behavior): the highest recommendation of the downscale window, then
        min/max and at most max(2 x current, 4) per loop."""
        stabilized = self._stabilize_legacy(now_s, prenormalized)
        if stabilized != prenormalized:
            reason = "ScaleDownStabilized"
            self._set("AbleToScale", True, reason, _STABILIZED_MESSAGES[reason])
        else:
            self._set(
                "AbleToScale", True, "ReadyForNewScale", "recommended size matches current size"
            )
        desired, reason = self._convert_with_rules(current, stabilized)
        self._limited(desired != stabilized, reason)
        if desired == stabilized and stabilized != prenormalized:
            return desired, "ScaleDownStabilized"
        return desired, reason

    def _stabilize_legacy(self, now_s: float, prenormalized: int) -> int:
        """horizontal.go ``stabilizeRecommendation``."""
        highest = prenormalized
        old_index = -1
        cutoff = now_s - self.config.downscale_stabilization_window_s
        for i, rec in enumerate(self._recommendations):
            if rec.time_s < cutoff:
                old_index = i
            elif rec.replicas > highest:
                highest = rec.replicas
        self._record(old_index, prenormalized, now_s)
        return highest

    def _record(self, old_index: int, replicas: int, now_s: float) -> None:
        """Replace an outdated recommendation, or keep one more."""
        if old_index >= 0:
            self._recommendations[old_index] = _Recommendation(replicas, now_s)
        else:
            self._recommendations.append(_Recommendation(replicas, now_s))

    def _convert_with_rules(self, current: int, desired: int) -> tuple[int, str]:
        """horizontal.go ``convertDesiredReplicasWithRules``."""
        limit = int(max(SCALE_UP_LIMIT_FACTOR * current, SCALE_UP_LIMIT_MINIMUM))
        if self.spec.max_replicas > limit:
            maximum, limited = limit, "ScaleUpLimit"
        else:
            maximum, limited = self.spec.max_replicas, "TooManyReplicas"
        if desired < self.spec.min_replicas:
            return self.spec.min_replicas, "TooFewReplicas"
        if desired > maximum:
            return maximum, limited
        return desired, "DesiredWithinRange"

    def _normalize_with_behaviors(
        self, now_s: float, current: int, prenormalized: int
    ) -> tuple[int, str]:
        """horizontal.go ``normalizeDesiredReplicasWithBehaviors``:
        stabilization windows first, then the scaling policies and min/max."""
        behavior = self.spec.behavior
        assert behavior is not None
        up = behavior.scale_up
        down = behavior.scale_down
        # maybeInitScaleDownStabilizationWindow
        down_window = (
            down.stabilization_window_s
            if down.stabilization_window_s is not None
            else self.config.downscale_stabilization_window_s
        )
        up_window = up.stabilization_window_s or 0
        stabilized, stab_reason = self._stabilize_with_behaviors(
            now_s, current, prenormalized, up_window, down_window
        )
        if stabilized != prenormalized:
            self._set("AbleToScale", True, stab_reason, _STABILIZED_MESSAGES[stab_reason])
        else:
            self._set(
                "AbleToScale", True, "ReadyForNewScale", "recommended size matches current size"
            )
        desired, reason = self._convert_with_behavior_rate(now_s, current, stabilized, up, down)
        self._limited(desired != stabilized, reason)
        if desired == stabilized and stabilized != prenormalized:
            return desired, stab_reason
        return desired, reason

    def _stabilize_with_behaviors(
        self, now_s: float, current: int, prenormalized: int, up_window: float, down_window: float
    ) -> tuple[int, str]:
        """horizontal.go ``stabilizeRecommendationWithBehaviors``: scale up to
        no more than the lowest recommendation of the scale-up window, down to
        no less than the highest of the scale-down window."""
        up_rec = prenormalized
        down_rec = prenormalized
        up_cutoff = now_s - up_window
        down_cutoff = now_s - down_window
        old_index = -1
        for i, rec in enumerate(self._recommendations):
            if rec.time_s > up_cutoff:
                up_rec = min(rec.replicas, up_rec)
            if rec.time_s > down_cutoff:
                down_rec = max(rec.replicas, down_rec)
            if rec.time_s < up_cutoff and rec.time_s < down_cutoff:
                old_index = i
        recommendation = current
        if recommendation < up_rec:
            recommendation = up_rec
        if recommendation > down_rec:
            recommendation = down_rec
        self._record(old_index, prenormalized, now_s)
        reason = "ScaleUpStabilized" if prenormalized >= current else "ScaleDownStabilized"
        return recommendation, reason

    def _convert_with_behavior_rate(
        self, now_s: float, current: int, desired: int, up: ScalingRules, down: ScalingRules
    ) -> tuple[int, str]:
        """horizontal.go ``convertDesiredReplicasWithBehaviorRate``."""
        if desired > current:
            limit = scale_up_limit(current, self._up_events, self._down_events, up, now_s)
            limit = max(limit, current)  # no further scale-up until old events age out
            if self.spec.max_replicas > limit:
                maximum, reason = limit, "ScaleUpLimit"
            else:
                maximum, reason = self.spec.max_replicas, "TooManyReplicas"
            if desired > maximum:
                return maximum, reason
        elif desired < current:
            limit = scale_down_limit(current, self._up_events, self._down_events, down, now_s)
            limit = min(limit, current)
            if self.spec.min_replicas < limit:
                minimum, reason = limit, "ScaleDownLimit"
            else:
                minimum, reason = self.spec.min_replicas, "TooFewReplicas"
            if desired < minimum:
                return minimum, reason
        return desired, "DesiredWithinRange"

    def _store_scale_event(self, now_s: float, previous: int, new: int) -> None:
        """horizontal.go ``storeScaleEvent`` (only HPAs with a behavior keep
        events): reuse an event older than the longest policy period."""
        behavior = self.spec.behavior
        if behavior is None:
            return
        if new > previous:
            events, rules, change = self._up_events, behavior.scale_up, new - previous
        else:
            events, rules, change = self._down_events, behavior.scale_down, previous - new
        cutoff = now_s - _longest_period(rules)
        old_index = -1
        for i, e in enumerate(events):
            if e.time_s < cutoff:
                e.outdated = True  # markScaleEventsOutdated
            if e.outdated:
                old_index = i
        event = _ScaleEvent(change, now_s)
        if old_index >= 0:
            events[old_index] = event
        else:
            events.append(event)


def _wrap(what: str, reason: str, fn: Callable[[], Any]) -> Any:
    """Prefix a calculator failure as computeStatusForResourceMetricGeneric does."""
    try:
        return fn()
    except MetricUnavailableError as exc:
        raise MetricUnavailableError(f"{what}: {exc}", reason=reason) from exc
