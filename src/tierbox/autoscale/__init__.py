"""Autoscaling: the Kubernetes HorizontalPodAutoscaler algorithm, pure
(:mod:`~tierbox.autoscale.hpa`), HPA objects read as kubectl takes them
(:mod:`~tierbox.autoscale.k8s`), and replays of an HPA against a load
curve (:mod:`~tierbox.autoscale.simulate`, ``tierbox autoscale simulate``).
Warm pools (:mod:`tierbox.pools`) size themselves with it."""

from tierbox.autoscale.hpa import (
    Behavior,
    Condition,
    ControllerConfig,
    Decision,
    HorizontalAutoscaler,
    HPASpec,
    MetricSpec,
    MetricStatus,
    MetricTarget,
    Observation,
    PodPhase,
    PodSample,
    PolicyType,
    ScalingPolicy,
    ScalingRules,
    SelectPolicy,
    SourceType,
    TargetType,
    Tolerances,
    default_behavior,
)
from tierbox.autoscale.k8s import parse_behavior, parse_hpa
from tierbox.autoscale.quantity import milli_value

__all__ = [
    "Behavior",
    "Condition",
    "ControllerConfig",
    "Decision",
    "HPASpec",
    "HorizontalAutoscaler",
    "MetricSpec",
    "MetricStatus",
    "MetricTarget",
    "Observation",
    "PodPhase",
    "PodSample",
    "PolicyType",
    "ScalingPolicy",
    "ScalingRules",
    "SelectPolicy",
    "SourceType",
    "TargetType",
    "Tolerances",
    "default_behavior",
    "milli_value",
    "parse_behavior",
    "parse_hpa",
]
