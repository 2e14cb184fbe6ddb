"""A pool's disruption budget, as a Kubernetes PodDisruptionBudget.

``min_available`` or ``max_unavailable`` (a count, or a percentage such as
``"50%"``) bounds how many members may be healthy-after-a-voluntary-removal.
It follows pkg/controller/disruption (``getExpectedScale`` and
``disruptionsAllowed = currentHealthy - desiredHealthy``): percentages are
of the expected count, rounded up (``intstr.GetScaledValueFromIntOrPercent``
with roundUp), and ``max_unavailable`` leaves ``expected - max_unavailable``
healthy. For a pool the expected count is its size (what the autoscaler
wants it to hold), and healthy members are the ready and the claimed ones.

A drain, a shrink or a rolling replacement removes one ready member only
while :meth:`DisruptionBudget.allows` says so; otherwise it waits and
:meth:`DisruptionBudget.why_not` says why. Pure: no clock, no sandboxes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from tierbox.errors import UsageError

_PERCENT = re.compile(r"^(\d{1,3})%$")


@dataclass(frozen=True)
class Amount:
    """An int-or-percent, as ``intstr.IntOrString`` in a PodDisruptionBudget."""

    value: int
    percent: bool = False

    @classmethod
    def parse(cls, value: object, name: str) -> Amount:
        if isinstance(value, bool):
            raise UsageError(f"{name}={value!r}: give a count like 2 or a percentage like '50%'")
        if isinstance(value, int):
            if value < 0:
                raise UsageError(f"{name}={value} must be 0 or more")
            return cls(value)
        if isinstance(value, str):
            text = value.strip()
            if text.isdigit():
                return cls(int(text))
            m = _PERCENT.match(text)
            if m and int(m.group(1)) <= 100:
                return cls(int(m.group(1)), percent=True)
        raise UsageError(f"{name}={value!r}: give a count like 2 or a percentage like '50%'")

    def scaled(self, expected: int) -> int:
        """The count for ``expected`` members (percentages rounded up)."""
        if not self.percent:
            return self.value
        return math.ceil(self.value * expected / 100)

    def __str__(self) -> str:
        return f"{self.value}%" if self.percent else str(self.value)

    def to_json(self) -> int | str:
        return str(self) if self.percent else self.value


@dataclass(frozen=True)
class DisruptionBudget:
    """At most one of ``min_available`` and ``max_unavailable`` (as a PDB)."""

    min_available: Amount | None = None
    max_unavailable: Amount | None = None

    def __post_init__(self) -> None:
        if self.min_available is not None and self.max_unavailable is not None:
            raise UsageError(
                "give min_available or max_unavailable, not both (as a PodDisruptionBudget)"
            )

    @classmethod
    def of(
        cls, min_available: int | str | None = None, max_unavailable: int | str | None = None
    ) -> DisruptionBudget:
        return cls(
            min_available=None
            if min_available is None
            else Amount.parse(min_available, "min_available"),
            max_unavailable=None
            if max_unavailable is None
            else Amount.parse(max_unavailable, "max_unavailable"),
        )

    @property
    def empty(self) -> bool:
        return self.min_available is None and self.max_unavailable is None

    def desired_healthy(self, expected: int) -> int:
        """How many members must stay ready or claimed with ``expected`` in the pool."""
        if self.min_available is not None:
            return self.min_available.scaled(expected)
        if self.max_unavailable is not None:
            return max(0, expected - self.max_unavailable.scaled(expected))
        return 0

    def allowed(self, healthy: int, expected: int) -> int:
        """How many members may be removed now (the PDB's disruptionsAllowed)."""
        return max(0, healthy - self.desired_healthy(expected))

    def allows(self, healthy: int, expected: int) -> bool:
        """May one more ready member go?"""
        return self.allowed(healthy, expected) > 0

    def why_not(self, healthy: int, expected: int) -> str:
        """Why removing one more member would break the budget."""
        need = self.desired_healthy(expected)
        return (
            f"removing a member would leave {healthy - 1} ready+claimed, below the "
            f"{self.describe(expected)} (needs {need})"
        )

    def describe(self, expected: int | None = None) -> str:
        if self.min_available is not None:
            what = f"min_available={self.min_available}"
        elif self.max_unavailable is not None:
            what = f"max_unavailable={self.max_unavailable}"
        else:
            return "no disruption budget"
        if expected is not None and (
            (self.min_available is not None and self.min_available.percent)
            or self.max_unavailable is not None
        ):
            what += f" of {expected}"
        return f"disruption budget {what}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_available": None if self.min_available is None else self.min_available.to_json(),
            "max_unavailable": None
            if self.max_unavailable is None
            else self.max_unavailable.to_json(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DisruptionBudget:
        data = data or {}
        return cls.of(data.get("min_available"), data.get("max_unavailable"))
