"""The one contract every tier implements.

Everything else (the Sandbox facade, CLI, gc, benchmarks) is written once
against :class:`Tier` and :class:`Instance`.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierbox.errors import NotSupportedError, SandboxError
from tierbox.spec import ExecResult, SandboxSpec, Stats, Termination


@dataclass(frozen=True)
class Availability:
    """Whether a tier can run on this host, and if not, why (and what to do)."""

    available: bool
    reason: str
    engine: str = ""
    version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "reason": self.reason,
            "engine": self.engine,
            "version": self.version,
        }


@dataclass(frozen=True)
class SnapshotRef:
    """A saved sandbox state that ``Tier.restore`` can bring back."""

    tier: str
    path: str
    meta: dict[str, Any]


class Instance(abc.ABC):
    """A live sandbox on one tier. ``close`` is idempotent."""

    id: str
    tier_name: str

    @abc.abstractmethod
    def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> ExecResult:
        """Run ``argv`` inside the sandbox and wait for it."""

    @abc.abstractmethod
    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` inside the sandbox."""

    @abc.abstractmethod
    def get_file(self, path: str) -> bytes:
        """Read ``path`` from inside the sandbox."""

    def list_dir(self, path: str) -> list[str]:
        """Names in a directory inside the sandbox."""
        raise NotSupportedError(f"{self.tier_name} tier cannot list directories")

    @abc.abstractmethod
    def stats(self) -> Stats:
        """Current resource use."""

    def snapshot(self) -> SnapshotRef:
        raise NotSupportedError(f"the {self.tier_name} tier cannot snapshot a sandbox")

    def state(self) -> dict[str, Any]:
        """What ``Tier.attach`` needs to reconnect from another process."""
        return {}

    @abc.abstractmethod
    def close(self) -> Termination | None:
        """Stop the sandbox and release everything it holds. Idempotent."""


class DirectoryFiles:
    """put_file / get_file / list_dir for a sandbox whose files live in a host
    directory (process, wasm). ``_path`` maps a sandbox path to a host path."""

    id: str

    def _path(self, path: str) -> Path:
        raise NotImplementedError

    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        target = self._path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            target.chmod(mode)
        except OSError as exc:
            raise SandboxError(f"cannot write {path} in sandbox {self.id}: {exc.strerror}") from exc

    def get_file(self, path: str) -> bytes:
        try:
            return self._path(path).read_bytes()
        except OSError as exc:
            raise SandboxError(f"cannot read {path} in sandbox {self.id}: {exc.strerror}") from exc

    def list_dir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self._path(path)))
        except OSError as exc:
            raise SandboxError(f"cannot list {path} in sandbox {self.id}: {exc.strerror}") from exc


class Tier(abc.ABC):
    """One rung of the ladder: knows whether it can run here and creates instances."""

    name: str
    #: One line on what this tier isolates, shown by ``tierbox tiers`` and bench.
    isolation: str

    @abc.abstractmethod
    def available(self) -> Availability:
        """Can this tier run here? Cheap and cached where possible."""

    @abc.abstractmethod
    def create(self, spec: SandboxSpec) -> Instance:
        """Start a long-lived sandbox."""

    def run(
        self,
        spec: SandboxSpec,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """One-shot: create, run ``argv`` once, close. Tiers override for speed."""
        inst = self.create(spec)
        try:
            return inst.exec(argv, stdin=stdin, timeout_s=spec.limits.timeout_s)
        finally:
            inst.close()

    def attach(self, sandbox_id: str, state: dict[str, Any]) -> Instance:
        """Reconnect to a sandbox created by another process (from its state file)."""
        raise NotSupportedError(f"the {self.name} tier cannot reattach to sandbox {sandbox_id}")

    def restore(self, snap: SnapshotRef) -> Instance:
        raise NotSupportedError(f"the {self.name} tier cannot restore snapshots")

    def clone(self, snap: SnapshotRef, count: int = 1) -> Sequence[Instance]:
        """``count`` independent sandboxes from one snapshot. Tiers with
        copy-on-write restores override this; the default restores in turn."""
        out: list[Instance] = []
        try:
            for _ in range(count):
                out.append(self.restore(snap))
        except BaseException:
            for inst in out:
                inst.close()
            raise
        return out

    def reap(self, live: set[str]) -> list[str]:
        """Remove this tier's leftovers of sandboxes whose id is not in ``live``
        (crashed runs); return a line per thing removed."""
        return []
