"""The Sandbox facade: one API over every tier.

with Sandbox.create("busybox", tier="container", memory_mib=256) as sb:
    r = sb.run(["sh", "-c", "echo hi"])
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import dataclasses
import inspect
import os
import posixpath
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, overload

from tierbox import history, transfer
from tierbox.errors import (
    SandboxClosedError,
    SandboxDeadError,
    SandboxError,
    TierboxError,
    UsageError,
)
from tierbox.handles import CommandHandle
from tierbox.network import Egress, PortMap, check_network
from tierbox.spec import (
    DEFAULT_READ_MAX_BYTES,
    ExecResult,
    FileEntry,
    Limits,
    Mount,
    NetworkPolicy,
    ProcessInfo,
    SandboxSpec,
    Stats,
    check_timeout_s,
    parse_user,
    sandbox_path,
)
from tierbox.tiers import Instance, SnapshotRef, _state, get_tier, teardown
from tierbox.tiers.base import metered

DEFAULT_TIER = "container"


def make_spec(
    image: str | None,
    *,
    memory_mib: int | None = Limits.memory_mib,
    cpus: float | None = Limits.cpus,
    pids: int | None = Limits.pids,
    timeout_s: float | None = Limits.timeout_s,
    disk_mib: int | None = Limits.disk_mib,
    output_bytes: int = Limits.output_bytes,
    network: str | NetworkPolicy | Egress = NetworkPolicy.NONE,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    workdir: str = "/",
    mounts: Sequence[Mount] = (),
    ports: Sequence[PortMap | str | int] = (),
) -> SandboxSpec:
    """A SandboxSpec from keyword options (defaults live in Limits); every
    bad value is a UsageError naming the option."""
    if image is not None and not isinstance(image, str):
        raise UsageError(f"image must be a str like 'busybox', not {type(image).__name__}")
    limits = Limits(
        memory_mib=memory_mib,
        cpus=cpus,
        pids=pids,
        timeout_s=timeout_s,
        disk_mib=disk_mib,
        output_bytes=output_bytes,
    )
    policy = check_network(network)
    published = _port_maps(ports)
    if env is not None and (
        not isinstance(env, Mapping)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        raise UsageError("env must map str names to str values, like {'DEBUG': '1'}")
    if user is not None and not isinstance(user, str):
        raise UsageError(f"user={user!r} must be a str 'uid[:gid]', like '1000:1000'")
    parse_user(user)
    sandbox_path(workdir, param="workdir")
    if isinstance(mounts, Mount) or not all(isinstance(m, Mount) for m in mounts):
        raise UsageError("mounts must be a list of Mount(host=..., path=...)")
    checked = tuple(m.checked() for m in mounts)
    paths = [m.path for m in checked]
    if len(set(paths)) != len(paths):
        raise UsageError(f"two mounts at one sandbox path: {sorted(paths)}")
    return SandboxSpec(
        image=image,
        limits=limits,
        network=policy,
        env=dict(env or {}),
        user=user,
        workdir=workdir,
        mounts=checked,
        ports=published,
    )


def _port_maps(ports: object) -> tuple[PortMap, ...]:
    """``ports=`` as PortMap, Docker's ``"8080:80"`` or a bare sandbox port."""
    if isinstance(ports, str | int | PortMap) or not isinstance(ports, Sequence):
        raise UsageError("ports must be a list, like ports=['8080:80'] or [PortMap(80, 8080)]")
    out: list[PortMap] = []
    for p in ports:
        if isinstance(p, PortMap):
            out.append(p)
        elif isinstance(p, str):
            out.append(PortMap.parse(p))
        elif isinstance(p, int) and not isinstance(p, bool):
            out.append(PortMap(p))
        else:
            raise UsageError(f"bad port {p!r}: write '8080:80' or PortMap(port=80, host_port=8080)")
    taken = [(p.host_ip, p.host_port) for p in out if p.host_port]
    if len(set(taken)) != len(taken):
        raise UsageError(f"two mappings publish one host port: {sorted(taken)}")
    return tuple(out)


_OPTIONS = [p for p in inspect.signature(make_spec).parameters if p != "image"]


def _spec_from(image: str | None, options: Mapping[str, Any]) -> SandboxSpec:
    """make_spec, with unknown options named instead of a TypeError."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise UsageError(
            f"unknown option {', '.join(unknown)}: the options are {', '.join(_OPTIONS)}"
        )
    return make_spec(image, **options)


def _copy_mounts_in(inst: Instance, spec: SandboxSpec) -> None:
    """Mounts on a tier without a shared filesystem (microVM, VM): a copy,
    made by root in the guest so the mount point can be anywhere, writable by
    the workload, then read-only for a read-only mount."""
    for m in spec.mounts:
        target = m.path if Path(m.host).is_dir() else posixpath.dirname(m.path)
        made = inst.exec(["sh", "-c", 'mkdir -p "$1" && chmod 1777 "$1"', "sh", target], user="0")
        if not made.ok:
            raise SandboxError(
                f"cannot make the mount point {target} in sandbox {inst.id}: "
                f"{made.stderr_text.strip() or made.termination.describe()}"
            )
        transfer.upload(inst, Path(m.host), m.path)
        if m.read_only:
            inst.exec(["chmod", "-R", "a-w", m.path], user="0")


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


#: Sandboxes this process created and must close at exit (not ``keep`` ones).
_owned: set[Sandbox] = set()
_owned_lock = threading.Lock()


@atexit.register
def _close_owned() -> None:
    """A program that forgets to close its sandboxes leaves nothing running:
    they are closed when it exits (and ``tierbox gc`` reaps them if it was
    killed before it could)."""
    with _owned_lock:
        left = list(_owned)
    for sb in left:
        # at exit nobody is left to hear of a failure; ``tierbox gc`` reaps
        # whatever a failed close leaves, so one failure must not stop the rest
        with contextlib.suppress(Exception):
            sb.close()


def wait_closed(timeout_s: float | None = None) -> bool:
    """Until what the sandboxes this process closed left to the background
    (runtime delete, unmounts, cgroups, directories) is done; False if
    ``timeout_s`` passed first. A program need not call it: it is waited for
    before the program exits."""
    return teardown.wait(timeout_s)


@dataclass(frozen=True)
class SandboxRecord:
    """A live sandbox as ``Sandbox.list()`` reports it."""

    id: str
    name: str | None
    tier: str
    image: str | None
    created_unix: float
    state: str  # "running": listed sandboxes are live
    owner_pid: int | None
    keep: bool
    expires_unix: float | None
    memory_mib: int | None

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> SandboxRecord:
        return cls(
            id=s["id"],
            name=s.get("name"),
            tier=s["tier"],
            image=s.get("image") or s.get("spec", {}).get("image"),
            created_unix=float(s.get("created", 0.0)),
            state="running",
            owner_pid=s.get("owner_pid"),
            keep=bool(s.get("keep")),
            expires_unix=s.get("expires_unix"),
            memory_mib=s.get("spec", {}).get("limits", {}).get("memory_mib"),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Sandbox:
    """A live sandbox on some tier. Use it in ``with`` and it is always
    cleaned up; one that is never closed is closed when the program exits,
    unless it was created with ``keep=True``."""

    def __init__(
        self,
        instance: Instance,
        spec: SandboxSpec,
        *,
        keep: bool = False,
        expires_unix: float | None = None,
        name: str | None = None,
    ) -> None:
        self._inst = instance
        self.spec = spec
        self.keep = keep
        self.expires_unix = expires_unix
        self.name = name
        self.files = Files(self)
        self._closed_here = False

    def __repr__(self) -> str:
        image = self._inst.image or "-"
        asked = f" (asked for {self.spec.image})" if self.spec.image not in (None, image) else ""
        named = f" name={self.name}" if self.name else ""
        return f"<Sandbox {self.id}{named} tier={self.tier} image={image}{asked}>"

    # ---- construction ------------------------------------------------------
    @classmethod
    def create(
        cls,
        image: str | None = None,
        *,
        tier: str = DEFAULT_TIER,
        spec: SandboxSpec | None = None,
        keep: bool = False,
        ttl_s: float | None = None,
        name: str | None = None,
        **options: Any,
    ) -> Sandbox:
        """Start a sandbox. ``options`` are make_spec's: memory_mib, cpus, pids,
        timeout_s, disk_mib, network, env, user, workdir. ``keep`` lets it
        outlive this process (the CLI's ``sandbox create``) until closed or,
        with ``ttl_s``, until ``tierbox gc`` finds it expired. ``name``: a
        name unique among live sandboxes, usable wherever an id is."""
        if ttl_s is not None:
            if not keep:
                raise UsageError("ttl_s only applies to kept sandboxes: pass keep=True too")
            check_timeout_s(ttl_s, "ttl_s")
        spec = spec or _spec_from(image, options)
        expires = time.time() + ttl_s if ttl_s is not None else None
        spec = get_tier(tier).prepare(spec)  # names in an allow-list pinned once, here
        inst = get_tier(tier).create(spec)
        try:
            if name is not None:
                _state.claim_name(name, inst.id)
            if spec.mounts and not inst.capabilities.shares_host_files:
                _copy_mounts_in(inst, spec)
        except BaseException:
            inst.close()
            raise
        return cls._adopt([inst], spec, keep=keep, expires_unix=expires, name=name)[0]

    @classmethod
    def connect(cls, sandbox_id: str) -> Sandbox:
        """Reattach to a sandbox created by another process, by id or name."""
        sandbox_id = _state.resolve(sandbox_id)
        state = _state.read_state(sandbox_id)
        tier = get_tier(state["tier"])
        inst = tier.attach(sandbox_id, {**state["tier_state"], "spec": state["spec"]})
        # not owned here: another process (or nobody, when kept) closes it
        return cls(
            inst,
            SandboxSpec.from_dict(state["spec"]),
            keep=bool(state.get("keep")),
            expires_unix=state.get("expires_unix"),
            name=state.get("name"),
        )

    @staticmethod
    def list() -> list[SandboxRecord]:
        """The live sandboxes on this host (from their state records)."""
        return [
            SandboxRecord.from_state(s) for s in _state.list_states() if _state.is_live(s["id"])
        ]

    @classmethod
    def restore(cls, snap: SnapshotRef, *, keep: bool = False) -> Sandbox:
        """A new sandbox from a snapshot (``keep`` as in :meth:`create`)."""
        spec = SandboxSpec.from_dict(snap.meta.get("spec", {}))
        return cls._adopt([get_tier(snap.tier).restore(snap)], spec, keep=keep)[0]

    @classmethod
    def clone(
        cls, snap: SnapshotRef, count: int = 1, *, keep: bool = False
    ) -> builtins.list[Sandbox]:
        """``count`` independent sandboxes from one snapshot (fast where the
        tier shares memory copy-on-write, as microvm does)."""
        spec = SandboxSpec.from_dict(snap.meta.get("spec", {}))
        return cls._adopt(get_tier(snap.tier).clone(snap, count), spec, keep=keep)

    @classmethod
    def _adopt(
        cls,
        instances: Sequence[Instance],
        spec: SandboxSpec,
        *,
        keep: bool = False,
        expires_unix: float | None = None,
        name: str | None = None,
    ) -> builtins.list[Sandbox]:
        """Wrap new instances, record their state and, unless kept, own them
        (closed at exit); if recording fails (or Ctrl-C lands), close them
        all rather than leak them."""
        out = [
            cls(inst, spec, keep=keep, expires_unix=expires_unix, name=name) for inst in instances
        ]
        if not keep:
            with _owned_lock:
                _owned.update(out)
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
                "keep": self.keep,
                "expires_unix": self.expires_unix,
                "name": self.name,
                "image": self._inst.image,
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
    @overload
    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        cwd: str | None = None,
        user: str | None = None,
        on_stdout: Callable[[bytes], object] | None = None,
        on_stderr: Callable[[bytes], object] | None = None,
        background: Literal[False] = False,
    ) -> ExecResult: ...

    @overload
    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        cwd: str | None = None,
        user: str | None = None,
        on_stdout: Callable[[bytes], object] | None = None,
        on_stderr: Callable[[bytes], object] | None = None,
        background: Literal[True],
    ) -> CommandHandle: ...

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        cwd: str | None = None,
        user: str | None = None,
        on_stdout: Callable[[bytes], object] | None = None,
        on_stderr: Callable[[bytes], object] | None = None,
        background: bool = False,
    ) -> ExecResult | CommandHandle:
        """Run ``argv`` (program first) and wait for it; the result holds the
        capped output and how it ended. ``on_stdout``/``on_stderr`` get the
        output as it is written. ``cwd``/``user`` apply to this command.

        ``background=True`` returns a :class:`~tierbox.handles.CommandHandle`
        at once (``wait``, ``kill``, ``send_stdin``); it has no time limit
        unless ``timeout_s`` is given, and its stdin stays open for
        ``send_stdin`` unless ``stdin`` is given."""
        if background:
            handle = CommandHandle.start(
                self._inst.start,
                list(argv) if not isinstance(argv, str | bytes) else argv,  # type: ignore[arg-type]
                _state.sandbox_dir(self.id) / "logs",
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                stdin=stdin,
                env=env,
                timeout_s=timeout_s,
                cwd=cwd,
                user=user,
                keep_stdin_open=stdin is None and self._inst.capabilities.stdin_stream,
                unbounded=True,
            )
            history.record_background(handle, **self._history(argv, "background"))
            return handle
        with history.recording(**self._history(argv, "exec")) as rec:
            result = self._inst.exec(
                argv,
                stdin=stdin,
                env=env,
                timeout_s=timeout_s,
                cwd=cwd,
                user=user,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
            )
            if rec is not None:
                rec.finish(result)
        return result

    def _history(self, argv: Sequence[str], kind: str) -> dict[str, Any]:
        """What the run history records of a command here (tierbox doctor)."""
        return {
            "kind": kind,
            "tier": self.tier,
            "image": self._inst.image,
            "argv": list(argv) if not isinstance(argv, str | bytes) else [str(argv)],
            "limits": self.spec.limits,
            "sandbox_id": self.id,
            "sandbox_name": self.name,
            "source": self._inst.sample,
        }

    exec = run

    def processes(self) -> builtins.list[ProcessInfo]:
        """What runs in the sandbox now (pids as the sandbox sees them)."""
        return self._inst.processes()

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
        """Go back to the named snapshot in place (tiers whose snapshots revert)."""
        self._inst.revert(name)

    def sync(self, path: str | None = None) -> int:
        """Copy writable mounts (the one at ``path``, or all) back to the host,
        on tiers without a shared filesystem (microVM, VM); elsewhere the host
        directory is the sandbox's already. Returns the bytes copied."""
        if self._inst.capabilities.shares_host_files:
            return 0
        total = 0
        for m in self.spec.mounts:
            if not m.read_only and (path is None or m.path == path):
                total += transfer.copy_back(self._inst, m.path, Path(m.host))
        return total

    def close(self) -> None:
        """Stop the sandbox and free everything. Idempotent. Writable mounts
        of a tier without a shared filesystem are copied back first.

        Returns once the workload is stopped and the sandbox is no longer
        listed; the runtime's delete, unmounts, cgroup and directory finish
        on a background thread that the program waits for before it exits
        (``tierbox.wait_closed()`` waits for it now)."""
        failed: TierboxError | None = None
        if not self._closed_here and self.spec.mounts:
            try:
                self.sync()
            except SandboxDeadError:
                pass  # a dead sandbox has nothing left to give back
            except TierboxError as exc:
                failed = exc  # raised once the sandbox is gone: its writes did not reach the host
        self._closed_here = True
        with _owned_lock:
            _owned.discard(self)
        background = self._inst.tears_down_in_background
        if background:
            # unlisted and taken over by this process before the tier queues
            # its teardown, which ends by removing the directory itself
            _state.retire(self.id)
        with contextlib.suppress(SandboxClosedError):
            self._inst.close()
        if not background:
            _state.remove_dir(self.id)
        if self.name is not None:
            _state.release_name(self.name, self.id)
        if failed is not None:
            raise failed

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
    stdin: bytes | str | None = None,
    spec: SandboxSpec | None = None,
    on_stdout: Callable[[bytes], object] | None = None,
    on_stderr: Callable[[bytes], object] | None = None,
    **options: Any,
) -> ExecResult:
    """One-shot: run ``argv`` in a fresh sandbox that is gone afterwards;
    output streams to ``on_stdout``/``on_stderr`` as it comes."""
    spec = spec or _spec_from(image, options)
    what = {"tier": tier, "image": spec.image, "limits": spec.limits}
    argv_list = list(argv) if not isinstance(argv, str | bytes) else [str(argv)]
    with history.recording(kind="one_shot", argv=argv_list, **what) as rec:
        with metered(rec.set_source) if rec is not None else contextlib.nullcontext():
            result = get_tier(tier).run(
                spec, argv, stdin=stdin, on_stdout=on_stdout, on_stderr=on_stderr
            )
        if rec is not None:
            rec.finish(result)
    return result
