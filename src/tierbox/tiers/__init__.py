"""The tier registry: name -> implementation, imported lazily so a missing
engine library on one tier never breaks the others."""

from __future__ import annotations

import importlib
from functools import cache

from tierbox.errors import UnknownTierError
from tierbox.tiers.base import Availability, Instance, SnapshotRef, Tier

#: Ladder order: least to most isolated, wasm last (a different kind of rung).
_REGISTRY: dict[str, str] = {
    "process": "tierbox.tiers.process:ProcessTier",
    "container": "tierbox.tiers.container:ContainerTier",
    "gvisor": "tierbox.tiers.gvisor:GVisorTier",
    "microvm": "tierbox.tiers.microvm:MicroVMTier",
    "vm": "tierbox.tiers.vm:VMTier",
    "wasm": "tierbox.tiers.wasm:WasmTier",
}


def tier_names() -> list[str]:
    return list(_REGISTRY)


@cache
def get_tier(name: str) -> Tier:
    """The tier object for ``name``; raises UnknownTierError for a bad name."""
    target = _REGISTRY.get(name)
    if target is None:
        raise UnknownTierError(f"unknown tier {name!r}: choose one of {', '.join(_REGISTRY)}")
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return _MissingTier(name, "not implemented in this version of tierbox")
        return _MissingTier(name, f"cannot import {exc.name}: run `make setup`")
    tier: Tier = getattr(module, cls_name)()
    return tier


class _MissingTier(Tier):
    """Stands in for a tier whose module is absent, so listings still show it."""

    isolation = "n/a"

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self._reason = reason

    def available(self) -> Availability:
        return Availability(False, self._reason)

    def _create(self, spec: object) -> Instance:
        from tierbox.errors import TierUnavailableError

        raise TierUnavailableError(f"tier {self.name} is unavailable: {self._reason}")


__all__ = ["Availability", "Instance", "SnapshotRef", "Tier", "get_tier", "tier_names"]
