"""Kubernetes quantities (``500m``, ``10k``, ``1Gi``, ``2.5``) as milli-units.

Follows ``k8s.io/apimachinery/pkg/api/resource`` (quantity.go): a signed
decimal number, then a binary-SI suffix (Ki..Ei), a decimal-SI suffix
(n, u, m, "", k, M, G, T, P, E) or a decimal exponent (``e3``).
``MilliValue()`` rounds up to a whole milli-unit, and so does this.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from tierbox.errors import HPASpecError

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 10**3),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
}
_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")


def parse_quantity(value: object, where: str) -> Fraction:
    """The exact value of a quantity (a string as kubectl takes it, or a number)."""
    if isinstance(value, bool):
        raise HPASpecError(f"{where}: {value!r} is not a quantity (like 500m, 10, 1k)")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise HPASpecError(f"{where}: {value!r} is not a quantity (like 500m, 10, 1k)")
        return Fraction(str(value))
    if not isinstance(value, str):
        raise HPASpecError(f"{where}: {value!r} is not a quantity (like 500m, 10, 1k)")
    m = _QUANTITY.match(value.strip())
    if m is None:
        raise HPASpecError(f"{where}: {value!r} is not a quantity (like 500m, 10, 1k, 1Gi)")
    number = Fraction(m.group(1))
    suffix = m.group(2) or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix[:1] in ("e", "E"):
        return number * Fraction(10) ** int(suffix[1:])
    return number * _DECIMAL[suffix]


def milli_value(value: object, where: str) -> int:
    """A quantity in milli-units, rounded up as ``Quantity.MilliValue()`` does."""
    return math.ceil(parse_quantity(value, where) * 1000)
