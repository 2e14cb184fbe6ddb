"""The HorizontalPodAutoscaler algorithm, with time as an input: table-driven
cases from the Kubernetes documentation's worked examples (algorithm
details, the HPA walkthrough, configurable scaling behavior) and the
controller's rules, then ``tierbox autoscale simulate`` on HPA files.

Expected values are worked out by hand from the documentation and from
k8s.io/kubernetes pkg/controller/podautoscaler (cited per case)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TIERBOX
from tierbox.autoscale import (
    HorizontalAutoscaler,
    Observation,
    PodPhase,
    PodSample,
    parse_hpa,
)
from tierbox.autoscale import simulate as sim
from tierbox.autoscale.quantity import milli_value
from tierbox.errors import HPASpecError, UsageError

DATA = Path(__file__).parent / "data" / "autoscale"


def hpa(
    metrics: list[dict[str, Any]],
    *,
    min_replicas: int = 1,
    max_replicas: int = 10,
    behavior: dict[str, Any] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "app"},
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "metrics": metrics,
    }
    if behavior is not None:
        spec["behavior"] = behavior
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "app"},
        "spec": spec,
    }


def cpu(util: int) -> dict[str, Any]:
    return {
        "type": "Resource",
        "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": util}},
    }


def pods_metric(name: str, average: str) -> dict[str, Any]:
    return {
        "type": "Pods",
        "pods": {
            "metric": {"name": name},
            "target": {"type": "AverageValue", "averageValue": average},
        },
    }


def external(name: str, target: dict[str, Any]) -> dict[str, Any]:
    return {"type": "External", "external": {"metric": {"name": name}, "target": target}}


def cpu_pods(
    usages: Sequence[int | None], request: int = 100, **flags: Any
) -> tuple[PodSample, ...]:
    return tuple(
        PodSample(f"p{i}", request_milli={"cpu": request}, usage_milli={"cpu": u}, **flags)
        for i, u in enumerate(usages)
    )


def cpu_pod(name: str, usage: int | None, **flags: Any) -> PodSample:
    return PodSample(name, request_milli={"cpu": 100}, usage_milli={"cpu": usage}, **flags)


def rps_pods(n: int, each: int) -> tuple[PodSample, ...]:
    return tuple(PodSample(f"p{i}", usage_milli={"rps": each}) for i in range(n))


@dataclass
class Loop:
    """One controller loop: time, the target's replicas, what it sees, and
    the expected outcome."""

    time_s: float
    current: int
    pods: tuple[PodSample, ...] = ()
    values: dict[str, int | None] = field(default_factory=dict)
    want: int = 0
    reason: str = ""


NO_DOWN_WINDOW = {"scaleDown": {"stabilizationWindowSeconds": 0}}

CASES: dict[str, tuple[dict[str, Any], list[Loop]]] = {
    # Algorithm details: "if the current metric value is 200m, and the desired
    # value is 100m, the number of replicas will be doubled"
    "doubles at twice the target": (
        hpa([pods_metric("rps", "100m")]),
        [Loop(0, 3, rps_pods(3, 200), want=6, reason="DesiredWithinRange")],
    ),
    # "if the current value is instead 50m, you'll halve the number of replicas"
    "halves at half the target": (
        hpa([pods_metric("rps", "100m")], behavior=NO_DOWN_WINDOW),
        [Loop(0, 4, rps_pods(4, 50), want=2, reason="DesiredWithinRange")],
    ),
    # "the control plane skips any scaling action if the ratio is sufficiently
    # close to 1.0 (within a globally-configurable tolerance, 0.1 by default)"
    "within the 0.1 tolerance": (
        hpa([pods_metric("rps", "100m")]),
        [Loop(0, 4, rps_pods(4, 110), want=4, reason="DesiredWithinRange")],
    ),
    "just outside the tolerance": (
        hpa([pods_metric("rps", "100m")]),
        [Loop(0, 4, rps_pods(4, 111), want=5, reason="DesiredWithinRange")],
    ),
    # The HPA walkthrough (php-apache, target 50 % of a 200m request): one pod
    # at 305 % wants 7; without a behavior one loop may at most double or add
    # up to 4 (horizontal.go calculateScaleUpLimit), so 4, then 7; when the
    # load stops, the 5-minute downscale window holds 7 until 300 s after the
    # last high recommendation, then minReplicas 1 wins.
    "walkthrough: scale-up limit, then the downscale window": (
        hpa([cpu(50)]),
        [
            Loop(0, 1, cpu_pods([610], request=200), want=4, reason="ScaleUpLimit"),
            Loop(15, 4, cpu_pods([152] * 4, request=200), want=7, reason="DesiredWithinRange"),
            Loop(30, 7, cpu_pods([0] * 7, request=200), want=7, reason="ScaleDownStabilized"),
            Loop(314, 7, cpu_pods([0] * 7, request=200), want=7, reason="ScaleDownStabilized"),
            Loop(316, 7, cpu_pods([0] * 7, request=200), want=1, reason="TooFewReplicas"),
        ],
    ),
    # Missing metrics: "if the result would be a scale down, assume those pods
    # were consuming 100% of the desired value" -- 20 % on two pods would ask
    # for 1, but with the third counted at its full request the ratio is 0.92,
    # inside the tolerance: no change.
    "missing metrics dampen a scale-down": (
        hpa([cpu(50)], behavior=NO_DOWN_WINDOW),
        [Loop(0, 3, cpu_pods([20, 20, None]), want=3, reason="DesiredWithinRange")],
    ),
    # "... and in the case of a scale up, assume those pods were consuming 0%":
    # 100 % on two pods, 0 on the third: 66 % -> ceil(1.32 x 3) = 4, not 6.
    "missing metrics dampen a scale-up": (
        hpa([cpu(50)]),
        [Loop(0, 3, cpu_pods([100, 100, None]), want=4, reason="DesiredWithinRange")],
    ),
    # Not-yet-ready pods (CPU): set aside, then counted at 0 % on a scale-up.
    "an unready pod counts as 0 on a CPU scale-up": (
        hpa([cpu(50)]),
        [
            Loop(
                0,
                3,
                (
                    *cpu_pods([100, 100]),
                    PodSample(
                        "p2", ready=False, request_milli={"cpu": 100}, usage_milli={"cpu": 100}
                    ),
                ),
                want=4,
                reason="DesiredWithinRange",
            )
        ],
    ),
    "a pod initializing its CPU is set aside": (
        hpa([cpu(50)]),
        [
            Loop(
                0,
                3,
                (
                    *cpu_pods([100, 100]),
                    PodSample(
                        "p2",
                        cpu_initializing=True,
                        request_milli={"cpu": 100},
                        usage_milli={"cpu": 100},
                    ),
                ),
                want=4,
                reason="DesiredWithinRange",
            )
        ],
    ),
    # On a scale-down unready pods are simply left out: ceil(0.2 x 2 ready) = 1.
    "unready pods are left out of a scale-down": (
        hpa([cpu(50)], behavior=NO_DOWN_WINDOW),
        [
            Loop(
                0,
                3,
                (
                    *cpu_pods([10, 10]),
                    PodSample(
                        "p2", ready=False, request_milli={"cpu": 100}, usage_milli={"cpu": 100}
                    ),
                ),
                want=1,
                reason="DesiredWithinRange",
            )
        ],
    ),
    # "All Pods with a deletion timestamp set ... are ignored, and all failed
    # Pods are discarded": two pods at 100 % of a 50 % target -> 4.
    "deleting and failed pods are ignored": (
        hpa([cpu(50)]),
        [
            Loop(
                0,
                4,
                (
                    *cpu_pods([100, 100]),
                    PodSample(
                        "p2", deleting=True, request_milli={"cpu": 100}, usage_milli={"cpu": 0}
                    ),
                    PodSample("p3", phase=PodPhase.FAILED, request_milli={"cpu": 100}),
                ),
                want=4,
                reason="DesiredWithinRange",
            )
        ],
    ),
    # Configurable scaling behavior, "Scaling Policies": Pods 4 and Percent 10
    # per 60 s on scale-down. 80 replicas, load for 10: 8 go at once (10 %),
    # nothing more within the minute, then 8 of 72 (64), 7 of 64 (57)...
    "scale-down policies: the docs' 80 -> 72 -> 64 example": (
        hpa(
            [pods_metric("rps", "100")],
            max_replicas=100,
            behavior={
                "scaleDown": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [
                        {"type": "Pods", "value": 4, "periodSeconds": 60},
                        {"type": "Percent", "value": 10, "periodSeconds": 60},
                    ],
                }
            },
        ),
        [
            Loop(0, 80, rps_pods(80, 12500), want=72, reason="ScaleDownLimit"),
            Loop(30, 72, rps_pods(72, 13889), want=72, reason="ScaleDownLimit"),
            Loop(60, 72, rps_pods(72, 13889), want=64, reason="ScaleDownLimit"),
            Loop(120, 64, rps_pods(64, 15625), want=57, reason="ScaleDownLimit"),
        ],
    ),
    # Below 40 replicas the Pods policy (4) removes more than 10 %: 30 -> 26.
    "scale-down policies: the Pods policy wins below 40": (
        hpa(
            [pods_metric("rps", "100")],
            max_replicas=100,
            behavior={
                "scaleDown": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [
                        {"type": "Pods", "value": 4, "periodSeconds": 60},
                        {"type": "Percent", "value": 10, "periodSeconds": 60},
                    ],
                }
            },
        ),
        [Loop(0, 30, rps_pods(30, 33334), want=26, reason="ScaleDownLimit")],
    ),
    # selectPolicy Min picks the smaller change: 80 -> 76 (Pods 4) not 72.
    "selectPolicy Min takes the smallest change": (
        hpa(
            [pods_metric("rps", "100")],
            max_replicas=100,
            behavior={
                "scaleDown": {
                    "stabilizationWindowSeconds": 0,
                    "selectPolicy": "Min",
                    "policies": [
                        {"type": "Pods", "value": 4, "periodSeconds": 60},
                        {"type": "Percent", "value": 10, "periodSeconds": 60},
                    ],
                }
            },
        ),
        [Loop(0, 80, rps_pods(80, 12500), want=76, reason="ScaleDownLimit")],
    ),
    # Default behavior on scale-up: per 15 s the larger of +4 pods and +100 %:
    # 1 -> 5, held within the period, then 10, then the metric's 20.
    "scale-up limited by the default policies": (
        hpa([pods_metric("rps", "100m")], max_replicas=100, behavior={}),
        [
            Loop(0, 1, rps_pods(1, 2000), want=5, reason="ScaleUpLimit"),
            Loop(5, 5, rps_pods(5, 400), want=5, reason="ScaleUpLimit"),
            Loop(15, 5, rps_pods(5, 400), want=10, reason="ScaleUpLimit"),
            Loop(30, 10, rps_pods(10, 200), want=20, reason="DesiredWithinRange"),
        ],
    ),
    # "Example: limit scale down rate": 10 % per minute.
    "limit scale-down rate to 10 % a minute": (
        hpa(
            [pods_metric("rps", "100")],
            max_replicas=100,
            behavior={
                "scaleDown": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Percent", "value": 10, "periodSeconds": 60}],
                }
            },
        ),
        [
            Loop(0, 100, rps_pods(100, 10), want=90, reason="ScaleDownLimit"),
            Loop(60, 90, rps_pods(90, 10), want=81, reason="ScaleDownLimit"),
            Loop(120, 81, rps_pods(81, 10), want=72, reason="ScaleDownLimit"),
        ],
    ),
    # "Example: disable scale down": selectPolicy Disabled.
    "scale-down disabled": (
        hpa(
            [pods_metric("rps", "100")],
            behavior={"scaleDown": {"stabilizationWindowSeconds": 0, "selectPolicy": "Disabled"}},
        ),
        [Loop(0, 5, rps_pods(5, 10), want=5, reason="ScaleDownLimit")],
    ),
    # "Example: change downscale stabilization window" to 60 s: the highest
    # recommendation of the last minute holds the size, then it drops.
    "scale-down held by the stabilization window": (
        hpa(
            [pods_metric("rps", "100m")],
            behavior={"scaleDown": {"stabilizationWindowSeconds": 60}},
        ),
        [
            Loop(0, 10, rps_pods(10, 100), want=10, reason="DesiredWithinRange"),
            Loop(15, 10, rps_pods(10, 20), want=10, reason="ScaleDownStabilized"),
            Loop(45, 10, rps_pods(10, 20), want=10, reason="ScaleDownStabilized"),
            Loop(60, 10, rps_pods(10, 20), want=2, reason="DesiredWithinRange"),
        ],
    ),
    # Flapping: a metric swinging between 6 and 2 replicas' worth every loop.
    # The default 300 s scale-down window keeps 6 (it scales up at once).
    "flapping suppressed by the default window": (
        hpa([external("queue", {"type": "AverageValue", "averageValue": "1"})], behavior={}),
        [
            Loop(0, 4, values={"queue": 6000}, want=6, reason="DesiredWithinRange"),
            Loop(15, 6, values={"queue": 2000}, want=6, reason="ScaleDownStabilized"),
            Loop(30, 6, values={"queue": 6000}, want=6, reason="DesiredWithinRange"),
            Loop(45, 6, values={"queue": 2000}, want=6, reason="ScaleDownStabilized"),
        ],
    ),
    # The same metric without a scale-down window flaps.
    "flapping without a window": (
        hpa(
            [external("queue", {"type": "AverageValue", "averageValue": "1"})],
            behavior=NO_DOWN_WINDOW,
        ),
        [
            Loop(0, 4, values={"queue": 6000}, want=6, reason="DesiredWithinRange"),
            Loop(15, 6, values={"queue": 2000}, want=2, reason="DesiredWithinRange"),
            Loop(30, 2, values={"queue": 6000}, want=6, reason="DesiredWithinRange"),
            Loop(45, 6, values={"queue": 2000}, want=2, reason="DesiredWithinRange"),
        ],
    ),
    # A scale-up window (behavior.scaleUp.stabilizationWindowSeconds) holds a
    # scale-up to the lowest recent recommendation.
    "scale-up held by a scale-up window": (
        hpa(
            [external("queue", {"type": "AverageValue", "averageValue": "1"})],
            behavior={"scaleUp": {"stabilizationWindowSeconds": 60}},
        ),
        [
            Loop(0, 2, values={"queue": 2000}, want=2, reason="DesiredWithinRange"),
            Loop(15, 2, values={"queue": 6000}, want=2, reason="ScaleUpStabilized"),
            Loop(61, 2, values={"queue": 6000}, want=6, reason="DesiredWithinRange"),
        ],
    ),
    # min/max limits.
    "max limit": (
        hpa([pods_metric("rps", "100m")], max_replicas=10, behavior={}),
        [Loop(0, 8, rps_pods(8, 1000), want=10, reason="TooManyReplicas")],
    ),
    "min limit": (
        hpa([pods_metric("rps", "100m")], min_replicas=2, behavior=NO_DOWN_WINDOW),
        [Loop(0, 4, rps_pods(4, 1), want=2, reason="TooFewReplicas")],
    ),
    "above max is brought down at once": (
        hpa([pods_metric("rps", "100")], max_replicas=3),
        [Loop(0, 5, rps_pods(5, 100), want=3, reason="TooManyReplicas")],
    ),
    "below min is brought up at once": (
        hpa([pods_metric("rps", "100")], min_replicas=3),
        [Loop(0, 1, rps_pods(1, 100), want=3, reason="TooFewReplicas")],
    ),
    "a target at zero replicas is not scaled": (
        hpa([pods_metric("rps", "100")]),
        [Loop(0, 0, (), want=0, reason="ScalingDisabled")],
    ),
    # Several metrics: the largest proposal wins (computeReplicasForMetrics).
    "several metrics: the largest proposal": (
        hpa([cpu(50), pods_metric("rps", "100m")], behavior={}),
        [
            Loop(
                0,
                2,
                tuple(
                    PodSample(
                        f"p{i}",
                        request_milli={"cpu": 100},
                        usage_milli={"cpu": 75, "rps": 250},
                    )
                    for i in range(2)
                ),
                want=5,
                reason="DesiredWithinRange",
            )
        ],
    ),
    # One metric failing: scale up on the others, but never down.
    "a failed metric does not stop a scale-up": (
        hpa([cpu(50), pods_metric("rps", "100m")], behavior={}),
        [
            Loop(
                0,
                2,
                tuple(PodSample(f"p{i}", usage_milli={"rps": 250}) for i in range(2)),
                want=5,
                reason="DesiredWithinRange",
            )
        ],
    ),
    "a failed metric stops a scale-down": (
        hpa([cpu(50), pods_metric("rps", "100m")], behavior=NO_DOWN_WINDOW),
        [
            Loop(
                0,
                4,
                tuple(PodSample(f"p{i}", usage_milli={"rps": 10}) for i in range(4)),
                want=4,
                reason="FailedGetResourceMetric",
            )
        ],
    ),
    "no metrics at all": (
        hpa([cpu(50)]),
        [Loop(0, 2, cpu_pods([None, None]), want=2, reason="FailedGetResourceMetric")],
    ),
    # Object metric with a Value target: ratio x ready pods (getUsageRatioReplicaCount).
    "object metric value target": (
        hpa(
            [
                {
                    "type": "Object",
                    "object": {
                        "metric": {"name": "requests-per-second"},
                        "describedObject": {"kind": "Ingress", "name": "main-route"},
                        "target": {"type": "Value", "value": "10k"},
                    },
                }
            ]
        ),
        [
            Loop(
                0,
                2,
                values={"requests-per-second": 20_000_000},
                want=4,
                reason="DesiredWithinRange",
            )
        ],
    ),
    # External metric, AverageValue, minReplicas 0: to zero and back (HPAScaleToZero).
    "external metric scales to zero and back": (
        hpa(
            [external("queue", {"type": "AverageValue", "averageValue": "5"})],
            min_replicas=0,
            behavior=NO_DOWN_WINDOW,
        ),
        [
            Loop(0, 3, values={"queue": 0}, want=0, reason="DesiredWithinRange"),
            Loop(15, 0, values={"queue": 12_000}, want=3, reason="DesiredWithinRange"),
        ],
    ),
    # HPAConfigurableTolerance: behavior.scaleUp.tolerance.
    "per-direction tolerance": (
        hpa([pods_metric("rps", "100m")], behavior={"scaleUp": {"tolerance": "0.5"}}),
        [Loop(0, 4, rps_pods(4, 140), want=4, reason="DesiredWithinRange")],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hpa_cases(name: str) -> None:
    obj, loops = CASES[name]
    scaler = HorizontalAutoscaler(parse_hpa(obj))
    for loop in loops:
        pods = loop.pods or tuple(PodSample(f"p{i}") for i in range(loop.current))
        d = scaler.reconcile(
            loop.time_s, Observation(loop.current, pods=pods, values_milli=loop.values)
        )
        assert (d.desired_replicas, d.reason) == (loop.want, loop.reason), (
            f"{name} at t={loop.time_s}: {d.to_dict()}"
        )


def test_conditions_read_like_kubectl_describe() -> None:
    scaler = HorizontalAutoscaler(parse_hpa(hpa([cpu(50)])))
    d = scaler.reconcile(0, Observation(1, cpu_pods([610], request=200)))
    conds = {c.type: c for c in d.conditions}
    assert conds["AbleToScale"].reason == "SucceededRescale"
    assert conds["ScalingActive"].reason == "ValidMetricFound"
    assert "cpu resource utilization (percentage of request)" in conds["ScalingActive"].message
    assert conds["ScalingLimited"].status and conds["ScalingLimited"].reason == "ScaleUpLimit"
    assert d.utilization_percent == 305
    assert d.rescale_reason == "cpu resource utilization (percentage of request) above target"


def test_history_survives_a_restart() -> None:
    """The recommendations and scale events saved by one controller hold the
    next one's windows, as they would in a process that never stopped."""
    obj = hpa(
        [pods_metric("rps", "100m")], behavior={"scaleDown": {"stabilizationWindowSeconds": 60}}
    )
    first = HorizontalAutoscaler(parse_hpa(obj))
    first.reconcile(0, Observation(10, rps_pods(10, 100)))
    saved = json.loads(json.dumps(first.state()))
    second = HorizontalAutoscaler(parse_hpa(obj))
    second.load_state(saved)
    d = second.reconcile(30, Observation(10, rps_pods(10, 20)))
    assert (d.desired_replicas, d.reason) == (10, "ScaleDownStabilized")
    fresh = HorizontalAutoscaler(parse_hpa(obj))
    fresh.reconcile(0, Observation(10, rps_pods(10, 20)))  # only its own first loop
    assert fresh.reconcile(61, Observation(10, rps_pods(10, 20))).desired_replicas == 2


@pytest.mark.parametrize(
    ("text", "milli"),
    [
        ("500m", 500),
        ("1", 1000),
        ("2.5", 2500),
        ("10k", 10_000_000),
        ("1Ki", 1_024_000),
        ("1e3", 1_000_000),
        ("0.0001", 1),
        (3, 3000),
    ],
)
def test_quantities(text: object, milli: int) -> None:
    assert milli_value(text, "q") == milli


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"maxReplicas": None}, "spec.maxReplicas"),
        ({"minReplicas": 5, "maxReplicas": 2}, "spec.maxReplicas"),
        (
            {
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {"name": "cpu", "target": {"type": "Value", "value": 1}},
                    }
                ]
            },
            "target.type",
        ),
        ({"metrics": [{"type": "Bogus"}]}, "metrics[0].type"),
        (
            {
                "behavior": {
                    "scaleDown": {"policies": [{"type": "Pods", "value": 0, "periodSeconds": 15}]}
                }
            },
            "policies[0].value",
        ),
        (
            {"behavior": {"scaleUp": {"stabilizationWindowSeconds": 4000}}},
            "stabilizationWindowSeconds",
        ),
        ({"minReplicas": 0}, "spec.minReplicas"),
        ({"behaviour": {}}, "unknown field 'behaviour'"),
    ],
)
def test_bad_hpa_names_the_field(change: dict[str, Any], field: str) -> None:
    obj = hpa([cpu(50)])
    for k, v in change.items():
        if v is None:
            del obj["spec"][k]
        else:
            obj["spec"][k] = v
    with pytest.raises(HPASpecError) as exc:
        parse_hpa(obj)
    assert field in str(exc.value)
    assert isinstance(exc.value, UsageError)


def test_defaults_as_the_api_server_fills_them() -> None:
    spec = parse_hpa(
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "spec": {"maxReplicas": 5},
        }
    )
    assert spec.min_replicas == 1
    assert spec.metrics[0].name == "cpu" and spec.metrics[0].target.average_utilization == 80
    assert spec.behavior is None
    b = parse_hpa(hpa([cpu(50)], behavior={"scaleDown": {"selectPolicy": "Min"}})).behavior
    assert b is not None
    assert [(p.type.value, p.value, p.period_s) for p in b.scale_up.policies] == [
        ("Pods", 4, 15),
        ("Percent", 100, 15),
    ]
    assert b.scale_up.stabilization_window_s == 0
    assert b.scale_down.stabilization_window_s is None  # the controller's 300 s
    assert b.scale_down.select_policy.value == "Min"


# ---- the simulation file and the CLI ------------------------------------------------

#: inference-hpa.yaml, worked out by hand: the burst is limited to +2 pods a
#: minute; not-yet-ready pods count as idle; the fall is held 300 s, then
#: halved per minute, then held at minReplicas.
INFERENCE_EXPECTED = [
    (0, 2, "DesiredWithinRange", 60),
    (60, 4, "ScaleUpLimit", 180),
    (90, 4, "ScaleUpLimit", 180),
    (120, 6, "DesiredWithinRange", 90),
    (180, 6, "DesiredWithinRange", 70),
    (240, 6, "ScaleDownStabilized", 20),
    (300, 6, "ScaleDownStabilized", 20),
    (420, 6, "ScaleDownStabilized", 20),
    (481, 3, "ScaleDownLimit", 20),
    (511, 3, "ScaleDownLimit", 20),
    (545, 2, "ScaleDownStabilized", 20),
    (600, 2, "ScaleDownStabilized", 20),
    (800, 2, "TooFewReplicas", 20),
]


def test_simulate_inference_hpa() -> None:
    results = sim.run(sim.load(DATA / "inference-hpa.yaml"))
    got = [(d.time_s, d.desired_replicas, d.reason, d.utilization_percent) for d in results]
    assert got == INFERENCE_EXPECTED


def test_simulate_cli_json() -> None:
    proc = subprocess.run(
        [*TIERBOX, "autoscale", "simulate", str(DATA / "inference-hpa.yaml"), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [
        (r["time_s"], r["desired_replicas"], r["reason"], r["utilization_percent"]) for r in rows
    ] == INFERENCE_EXPECTED
    assert {c["type"] for c in rows[1]["conditions"]} >= {
        "AbleToScale",
        "ScalingActive",
        "ScalingLimited",
    }


def test_simulate_cli_text_and_two_metrics() -> None:
    proc = subprocess.run(
        [*TIERBOX, "autoscale", "simulate", str(DATA / "two-metrics.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == [
        "t=0s current=2 desired=5 cpu=75%/50% queue=2500m/1000m(avg) reason=DesiredWithinRange",
        "t=15s current=5 desired=5 cpu=20%/50% queue=200m/1000m(avg) reason=ScaleDownStabilized",
    ]


def test_simulate_cli_bad_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "hpa: {apiVersion: autoscaling/v2, kind: HorizontalPodAutoscaler, spec: {maxReplicas: 3,"
        " metrics: [{type: Resource, resource: {name: cpu, target: {type: Utilization}}}]}}\n"
        "steps: [{time_s: 0}]\n"
    )
    proc = subprocess.run(
        [*TIERBOX, "autoscale", "simulate", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "hpa.spec.metrics[0].resource.target.averageUtilization: Required value" in proc.stderr
    bad.write_text(
        "hpa: {spec: {maxReplicas: 3}}\n"
        "steps: [{time_s: 0, pods: [{name: a, usage_milli: {memory: 1}}]}]\n"
    )
    proc = subprocess.run(
        [*TIERBOX, "autoscale", "simulate", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "'memory' is not a metric of this HPA" in proc.stderr
