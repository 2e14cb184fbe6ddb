"""The Sandbox facade: one API over every tier.

with Sandbox.create("busybox", tier="container", memory_mib=256) as sb:
    r = sb.run(["sh", "-c", "echo hi"])
"""

from __future__ import annotations

import builtins
import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

from tierbox import transfer
from tierbox.errors import NotSupportedError, SandboxClosedError
from tierbox.spec import (
    DEFAULT_READ_MAX_BYTES,
    ExecResult,
    FileEntry,
    Limits,
    NetworkPolicy,
    SandboxSpec,
    Stats,
)
from tierbox.tiers import Instance, SnapshotRef, _state, get_tier

DEFAULT_TIER = "container"


def make_spec(
    image: str | None,
    *,
    memory_mib: int | None = 256,
    cpus: float | None = None,
    pids: int | None = 128,
    timeout_s: float | None = 60.0,
    output_bytes: int | None = None,
    network: str | NetworkPolicy = NetworkPolicy.NONE,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    workdir: str = "/",
) -> SandboxSpec:
    limits = Limits(memory_mib=memory_mib, cpus=cpus, pids=pids, timeout_s=timeout_s)
    if output_bytes is not None:
        limits = replace(limits, output_bytes=output_bytes)
    return SandboxSpec(
        image=image,
        limits=limits,
        network=NetworkPolicy(network),
        env=dict(env or {}),
        user=user,
        workdir=workdir,
    )


class Files:
    """``sb.files``: the sandbox's files, E2B style. Paths are sandbox paths;
    relative ones start at the workload's working directory."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write ``data`` (str as UTF-8); parent directories are made, owned by
        the workload's user."""
        self._sb.instance.put_file(path, data, mode)

    def read(self, path: str, *, max_bytes: int = DEFAULT_READ_MAX_BYTES) -> bytes:
        """A regular file's bytes; FileTooLargeError beyond ``max_bytes`` (64
        MiB by default), NotRegularFileError for FIFOs, devices, directories."""
        return self._sb.instance.get_file(path, max_bytes=max_bytes)

    def read_text(
        self, path: str, *, encoding: str = "utf-8", max_bytes: int = DEFAULT_READ_MAX_BYTES
    ) -> str:
        return self.read(path, max_bytes=max_bytes).decode(encoding)

    def list(self, path: str) -> builtins.list[str]:
        """Names in a directory."""
        return self._sb.instance.list_dir(path)

    def entries(self, path: str) -> builtins.list[FileEntry]:
        """Entries of a directory with their kind and size (links not followed)."""
        return self._sb.instance.entries(path)

    def download(self, path: str, local_path: str | os.PathLike[str], **opts: Any) -> int:
        """Copy a file or directory out of the sandbox to ``local_path``,
        streamed to disk; returns the bytes copied. See :mod:`tierbox.transfer`."""
        return transfer.download(self._sb.instance, path, Path(local_path), **opts)

    def upload(self, local_path: str | os.PathLike[str], path: str) -> int:
        """Copy a host file or directory into the sandbox at ``path``."""
        return transfer.upload(self._sb.instance, Path(local_path), path)


class Sandbox:
    """A live sandbox on some tier. Use it in ``with`` and it is always cleaned up."""

    def __init__(self, instance: Instance, spec: SandboxSpec, *, persistent: bool = False) -> None:
        self._inst = instance
        self.spec = spec
        self.persistent = persistent
        self.files = Files(self)

    # ---- construction ------------------------------------------------------
    @classmethod
    def create(
        cls,
        image: str | None = None,
        *,
        tier: str = DEFAULT_TIER,
        spec: SandboxSpec | None = None,
        persistent: bool = False,
        **options: Any,
    ) -> Sandbox:
        """Start a sandbox. ``options`` are make_spec's: memory_mib, cpus, pids,
        timeout_s, network, env, user. ``persistent`` keeps it alive after
        this process exits (the CLI's ``sandbox create``)."""
        spec = spec or make_spec(image, **options)
        return cls._adopt([get_tier(tier).create(spec)], spec, persistent=persistent)[0]

    @classmethod
    def connect(cls, sandbox_id: str) -> Sandbox:
        """Reattach to a sandbox created by another process."""
        state = _state.read_state(sandbox_id)
        tier = get_tier(state["tier"])
        inst = tier.attach(sandbox_id, {**state["tier_state"], "spec": state["spec"]})
        return cls(
            inst, SandboxSpec.from_dict(state["spec"]), persistent=bool(state.get("persistent"))
        )

    @staticmethod
    def list() -> list[dict[str, Any]]:
        """State records of live sandboxes on this host."""
        return [s for s in _state.list_states() if _state.is_live(s["id"])]

    @classmethod
    def restore(cls, snap: SnapshotRef) -> Sandbox:
        """A new sandbox from a snapshot."""
        spec = SandboxSpec.from_dict(snap.meta.get("spec", {}))
        return cls._adopt([get_tier(snap.tier).restore(snap)], spec)[0]

    @classmethod
    def clone(cls, snap: SnapshotRef, count: int = 1) -> builtins.list[Sandbox]:
        """``count`` independent sandboxes from one snapshot (fast where the
        tier shares memory copy-on-write, as microvm does)."""
        spec = SandboxSpec.from_dict(snap.meta.get("spec", {}))
        return cls._adopt(get_tier(snap.tier).clone(snap, count), spec)

    @classmethod
    def _adopt(
        cls, instances: Sequence[Instance], spec: SandboxSpec, *, persistent: bool = False
    ) -> builtins.list[Sandbox]:
        """Wrap new instances and record their state; if recording fails (or
        Ctrl-C lands), close them all rather than leak them."""
        out = [cls(inst, spec, persistent=persistent) for inst in instances]
        try:
            for sb in out:
                sb._save()
        except BaseException:
            for sb in out:
                sb.close()
            raise
        return out

    def _save(self) -> None:
        _state.write_state(
            self.id,
            {
                "id": self.id,
                "tier": self.tier,
                "spec": self.spec.to_dict(),
                "created": time.time(),
                "persistent": self.persistent,
                "owner_pid": os.getpid(),
                "tier_state": self._inst.state(),
            },
        )

    # ---- properties --------------------------------------------------------
    @property
    def id(self) -> str:
        return self._inst.id

    @property
    def tier(self) -> str:
        return self._inst.tier_name

    @property
    def instance(self) -> Instance:
        return self._inst

    # ---- work --------------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> ExecResult:
        """Run ``argv`` and wait for it (the result holds capped output and
        how it ended)."""
        return self._inst.exec(argv, stdin=stdin, env=env, timeout_s=timeout_s)

    exec = run

    def put_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        self._inst.put_file(path, data, mode)

    def get_file(self, path: str, *, max_bytes: int = DEFAULT_READ_MAX_BYTES) -> bytes:
        return self._inst.get_file(path, max_bytes=max_bytes)

    def list_dir(self, path: str) -> builtins.list[str]:
        return self._inst.list_dir(path)

    def stats(self) -> Stats:
        return self._inst.stats()

    def snapshot(self) -> SnapshotRef:
        return self._inst.snapshot()

    def revert(self, name: str) -> None:
        revert = getattr(self._inst, "revert", None)
        if revert is None:
            raise NotSupportedError(f"the {self.tier} tier cannot revert to a snapshot")
        revert(name)

    def close(self) -> None:
        """Stop the sandbox and free everything. Idempotent."""
        with contextlib.suppress(SandboxClosedError):
            self._inst.close()
        _state.remove_dir(self.id)

    kill = close

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def run(
    image: str | None,
    argv: Sequence[str],
    *,
    tier: str = DEFAULT_TIER,
    stdin: bytes | None = None,
    spec: SandboxSpec | None = None,
    **options: Any,
) -> ExecResult:
    """One-shot: run ``argv`` in a fresh sandbox that is gone afterwards."""
    spec = spec or make_spec(image, **options)
    return get_tier(tier).run(spec, argv, stdin=stdin)
