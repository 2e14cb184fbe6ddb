"""What a pool is asked to be (:class:`PoolSpec`) and how the autoscaler
sees it (:func:`hpa_for`): plain data, saved as JSON so that a pool outlives
the process that hosts it."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tierbox.autoscale import (
    HPASpec,
    MetricSpec,
    MetricTarget,
    SourceType,
    TargetType,
    default_behavior,
    parse_behavior,
)
from tierbox.errors import UsageError
from tierbox.pools.budget import DisruptionBudget
from tierbox.sandbox import DEFAULT_TIER, make_spec
from tierbox.spec import SandboxSpec

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")

#: The metric keys the autoscaler sees (spec.metrics[].name in HPA terms).
UTILIZATION_KEY = "sandbox"
RATE_KEY = "claims_per_second"


class PoolMetric(enum.StrEnum):
    """What a pool scales on, against the pool's ``target``."""

    #: claimed / members, in percent (a Resource metric with a Utilization target)
    UTILIZATION = "utilization"
    #: claims per second per member (an External metric with an AverageValue target)
    CLAIMS_PER_SECOND = "claims_per_second"


def check_name(name: object, what: str = "pool") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise UsageError(
            f"{what} name {name!r}: use 1-63 lowercase letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class PoolSpec:
    """A warm pool: sandboxes of ``sandbox`` on ``tier``, between ``min_ready``
    ready members (plus those claimed) and ``max_size`` members in all."""

    name: str
    tier: str = DEFAULT_TIER
    sandbox: SandboxSpec = field(default_factory=SandboxSpec)
    min_ready: int = 1
    max_size: int = 10
    metric: PoolMetric = PoolMetric.UTILIZATION
    #: percent for utilization, claims per second per member for the rate
    target: float = 70.0
    #: a Kubernetes ``behavior`` object (scaleUp/scaleDown); None: the defaults
    behavior: Mapping[str, Any] | None = None
    budget: DisruptionBudget = field(default_factory=DisruptionBudget)
    #: run in each member before it is ready (None: nothing); on TCG it makes
    #: the first exec of a restored microVM as fast as the later ones
    warmup: tuple[str, ...] | None = ("true",)
    claim_timeout_s: float = 30.0
    #: how often the autoscaler runs (Kubernetes: 15 s)
    sync_period_s: float = 1.0
    #: the window claims per second are averaged over
    rate_window_s: float = 10.0
    #: members started at the same time
    parallel_starts: int = 2

    def __post_init__(self) -> None:
        check_name(self.name)
        for name, value, least in (
            ("min_ready", self.min_ready, 0),
            ("max_size", self.max_size, 1),
            ("parallel_starts", self.parallel_starts, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UsageError(f"{name}={value!r} must be a whole number, at least {least}")
        if self.min_ready > self.max_size:
            raise UsageError(
                f"min_ready={self.min_ready} is more than max_size={self.max_size}: "
                "raise max_size or lower min_ready"
            )
        for name, v in (
            ("target", self.target),
            ("claim_timeout_s", self.claim_timeout_s),
            ("sync_period_s", self.sync_period_s),
            ("rate_window_s", self.rate_window_s),
        ):
            if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                raise UsageError(f"{name}={v!r} must be a positive number")
        if self.metric is PoolMetric.UTILIZATION and not 1 <= self.target <= 100:
            raise UsageError(
                f"target={self.target}: a utilization target is a percentage from 1 to 100"
            )
        if self.warmup is not None and (
            not self.warmup or not all(isinstance(a, str) for a in self.warmup)
        ):
            raise UsageError("warmup must be a command (a list of strings) or None")
        if self.behavior is not None:
            parse_behavior(self.behavior, "behavior")  # refuse a bad one now

    @classmethod
    def build(
        cls,
        name: str,
        image: str | None,
        *,
        tier: str = DEFAULT_TIER,
        min_ready: int = 1,
        max_size: int = 10,
        metric: str | PoolMetric = PoolMetric.UTILIZATION,
        target: float | None = None,
        behavior: Mapping[str, Any] | None = None,
        min_available: int | str | None = None,
        max_unavailable: int | str | None = None,
        warmup: Sequence[str] | None = ("true",),
        claim_timeout_s: float = 30.0,
        sync_period_s: float = 1.0,
        rate_window_s: float = 10.0,
        parallel_starts: int = 2,
        **options: Any,
    ) -> PoolSpec:
        """A spec from keyword options; ``options`` are make_spec's
        (memory_mib, cpus, pids, timeout_s, disk_mib, env, user, workdir)."""
        try:
            kind = PoolMetric(metric)
        except ValueError:
            names = ", ".join(m.value for m in PoolMetric)
            raise UsageError(f"metric={metric!r}: use one of {names}") from None
        if target is None:
            target = 70.0 if kind is PoolMetric.UTILIZATION else 1.0
        return cls(
            name=name,
            tier=tier,
            sandbox=make_spec(image, **options),
            min_ready=min_ready,
            max_size=max_size,
            metric=kind,
            target=float(target),
            behavior=dict(behavior) if behavior is not None else None,
            budget=DisruptionBudget.of(min_available, max_unavailable),
            warmup=tuple(warmup) if warmup is not None else None,
            claim_timeout_s=claim_timeout_s,
            sync_period_s=sync_period_s,
            rate_window_s=rate_window_s,
            parallel_starts=parallel_starts,
        )

    @property
    def image(self) -> str | None:
        return self.sandbox.image

    def with_changes(self, **changes: Any) -> PoolSpec:
        """A copy with some fields changed, checked again."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tier": self.tier,
            "sandbox": self.sandbox.to_dict(),
            "min_ready": self.min_ready,
            "max_size": self.max_size,
            "metric": self.metric.value,
            "target": self.target,
            "behavior": self.behavior,
            "budget": self.budget.to_dict(),
            "warmup": list(self.warmup) if self.warmup is not None else None,
            "claim_timeout_s": self.claim_timeout_s,
            "sync_period_s": self.sync_period_s,
            "rate_window_s": self.rate_window_s,
            "parallel_starts": self.parallel_starts,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PoolSpec:
        warmup = data.get("warmup", ["true"])
        return cls(
            name=data["name"],
            tier=data.get("tier", DEFAULT_TIER),
            sandbox=SandboxSpec.from_dict(dict(data.get("sandbox") or {})),
            min_ready=int(data.get("min_ready", 1)),
            max_size=int(data.get("max_size", 10)),
            metric=PoolMetric(data.get("metric", "utilization")),
            target=float(data.get("target", 70.0)),
            behavior=data.get("behavior"),
            budget=DisruptionBudget.from_dict(data.get("budget")),
            warmup=tuple(warmup) if warmup is not None else None,
            claim_timeout_s=float(data.get("claim_timeout_s", 30.0)),
            sync_period_s=float(data.get("sync_period_s", 1.0)),
            rate_window_s=float(data.get("rate_window_s", 10.0)),
            parallel_starts=int(data.get("parallel_starts", 2)),
        )


def hpa_for(spec: PoolSpec) -> HPASpec:
    """The HorizontalPodAutoscaler a pool runs: members are its pods, the
    pool's size its replicas, ``min_ready``/``max_size`` its bounds."""
    if spec.metric is PoolMetric.UTILIZATION:
        metric = MetricSpec(
            SourceType.RESOURCE,
            UTILIZATION_KEY,
            MetricTarget(TargetType.UTILIZATION, average_utilization=round(spec.target)),
        )
    else:
        metric = MetricSpec(
            SourceType.EXTERNAL,
            RATE_KEY,
            MetricTarget(
                TargetType.AVERAGE_VALUE, average_value_milli=max(1, round(spec.target * 1000))
            ),
        )
    behavior = (
        parse_behavior(spec.behavior, "behavior")
        if spec.behavior is not None
        else default_behavior()
    )
    return HPASpec(
        max_replicas=spec.max_size,
        metrics=(metric,),
        min_replicas=spec.min_ready,
        behavior=behavior,
        name=spec.name,
    )
