"""Version order per ecosystem, and OSV affected ranges evaluated in it.

Each ecosystem's own rules, from its maintained implementation: dpkg order
through python-debian (epochs, ``~`` sorting before anything), PEP 440 through
``packaging`` (pre-releases, post-releases, local versions), SemVer 2.0
through ``semver`` for npm and OSV ``SEMVER`` ranges (pre-releases before the
release, build metadata ignored). A version an ecosystem cannot parse is never
guessed at: the range is reported as not evaluable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import semver
from debian.debian_support import Version as DebianVersion
from packaging.version import InvalidVersion
from packaging.version import Version as Pep440Version

Key = Any  # a comparable version object
Parser = Callable[[str], Key]


def _debian(text: str) -> Key:
    try:
        return DebianVersion(text)
    except ValueError as exc:
        raise ValueError(f"not a Debian version: {text!r}") from exc


def _pep440(text: str) -> Key:
    try:
        return Pep440Version(text)
    except InvalidVersion as exc:
        raise ValueError(f"not a PEP 440 version: {text!r}") from exc


@functools.total_ordering
class _SemVer:
    """SemVer 2.0 precedence (build metadata ignored, as the spec says; ``semver``
    itself compares it)."""

    def __init__(self, text: str) -> None:
        self.v = semver.Version.parse(text.strip().removeprefix("v"))

    def _key(self) -> semver.Version:
        return self.v.replace(build=None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SemVer) and self._key().compare(other._key()) == 0

    def __lt__(self, other: _SemVer) -> bool:
        return self._key().compare(other._key()) < 0

    def __hash__(self) -> int:
        return hash(str(self._key()))


def _semver(text: str) -> Key:
    try:
        return _SemVer(text)
    except ValueError as exc:
        raise ValueError(f"not a SemVer version: {text!r}") from exc


def ecosystem_order(ecosystem: str, range_type: str = "ECOSYSTEM") -> Parser | None:
    """The version parser for an OSV ecosystem (``Debian:12`` is Debian), or for a
    ``SEMVER`` range whatever the ecosystem; None when tierbox knows no order."""
    if range_type == "SEMVER":
        return _semver
    if range_type != "ECOSYSTEM":
        return None  # GIT ranges name commits, not versions
    base = ecosystem.split(":", 1)[0]
    return {"Debian": _debian, "PyPI": _pep440, "npm": _semver}.get(base)


def compare(ecosystem: str, a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` sorts before, with or after ``b`` in ``ecosystem``."""
    parse = ecosystem_order(ecosystem)
    if parse is None:
        raise ValueError(f"no version order known for ecosystem {ecosystem!r}")
    ka, kb = parse(a), parse(b)
    return int(ka > kb) - int(ka < kb)


def in_range(version: str, events: Sequence[Mapping[str, str]], parse: Parser) -> bool:
    """Whether ``version`` is affected by one OSV range's events (OSV schema's
    evaluation: walk the events in version order; ``introduced`` opens, ``fixed``
    and ``last_affected`` close, ``limit`` caps). ValueError when a version
    does not parse."""
    v = parse(version)

    def order(event: Mapping[str, str]) -> tuple[int, Key]:
        (kind, value), *_ = event.items()
        if kind == "introduced" and value == "0":
            return (0, None)
        return (1, parse(value))

    keyed = []
    for event in events:
        event = {
            k: str(val)
            for k, val in event.items()
            if k in ("introduced", "fixed", "last_affected", "limit")
        }
        if len(event) == 1:
            keyed.append((order(event), event))
    zero_first = sorted((k for k in keyed if k[0][0] == 0), key=lambda k: k[0][0])
    rest = sorted((k for k in keyed if k[0][0] == 1), key=lambda k: k[0][1])
    affected = False
    for (_, bound), event in [*zero_first, *rest]:
        kind = next(iter(event))
        if kind == "introduced":
            if bound is None or v >= bound:
                affected = True
        elif kind == "fixed":
            if v >= bound:
                affected = False
        elif kind == "last_affected":
            if v > bound:
                affected = False
        elif kind == "limit" and v >= bound:
            return False
    return affected


def fixed_in(version: str, events: Sequence[Mapping[str, str]], parse: Parser) -> str | None:
    """The first ``fixed`` version above ``version`` in a range, if the range names one."""
    v = parse(version)
    fixes = sorted(
        (parse(e["fixed"]), str(e["fixed"]))
        for e in events
        if "fixed" in e and parse(e["fixed"]) > v
    )
    return fixes[0][1] if fixes else None
