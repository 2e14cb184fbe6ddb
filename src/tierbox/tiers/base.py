"""The one contract every tier implements.

Everything else (the Sandbox facade, CLI, gc, benchmarks) is written once
against :class:`Tier` and :class:`Instance`.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, BinaryIO

from tierbox.errors import NotSupportedError, SandboxFileError, SpecError, UsageError
from tierbox.host import netgw
from tierbox.host.rootfs import RootDir
from tierbox.network import Egress, NetworkPolicy, pin
from tierbox.spec import (
    DEFAULT_READ_MAX_BYTES,
    ExecResult,
    FileEntry,
    ProcessInfo,
    SandboxSpec,
    Stats,
    Termination,
    check_run_args,
    parse_user,
    sandbox_path,
)
from tierbox.tiers.commands import Command, ExecRequest, OutputCallback


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


class SnapshotKind(enum.StrEnum):
    """What ``snapshot()`` gives on a tier."""

    NONE = "none"  # no snapshots
    RESTORE = "restore"  # Sandbox.restore/clone make new sandboxes from it
    REVERT = "revert"  # named snapshots; the sandbox reverts to one in place


@dataclass(frozen=True)
class Capabilities:
    """What a tier can do, declared once so that callers (bench, pools,
    server) never probe instances or branch on tier names."""

    snapshot: SnapshotKind = SnapshotKind.NONE
    #: the workload runs inside the caller's process (wasm): no host process
    #: to meter, memory is held only while it runs
    in_process: bool = False
    #: the smallest ``memory_mib`` the tier can start with
    min_memory_mib: int = 4
    #: commands can run on a pseudo-terminal (interactive shells)
    tty: bool = False
    #: a running command's stdin can be fed bit by bit (send_stdin)
    stdin_stream: bool = True
    #: host directories appear in the sandbox itself (bind mount, preopen);
    #: without it (VMs) the facade copies them in and, when writable, back
    shares_host_files: bool = True
    #: the network policies the tier can give (tierbox.network)
    networks: frozenset[NetworkPolicy] = frozenset({NetworkPolicy.NONE})
    #: sandbox ports can be published on the host (``ports=``)
    publish_ports: bool = False


#: Reads a sandbox's usage now (its memory, CPU, pids).
StatsSource = Callable[[], Stats]
_meter: ContextVar[Callable[[StatsSource | None], None] | None] = ContextVar(
    "tierbox_meter", default=None
)


@contextlib.contextmanager
def metered(receiver: Callable[[StatsSource | None], None]) -> Iterator[None]:
    """Within this block, one-shot runs (``Tier.run``) hand ``receiver`` a
    reader of their sandbox's usage once it exists, and None once it is gone:
    a one-shot sandbox is the tier's own, so this is how the run history
    samples it."""
    token = _meter.set(receiver)
    try:
        yield
    finally:
        _meter.reset(token)


def meter(source: StatsSource | None) -> None:
    """Tiers call this from a one-shot run: ``source`` when its sandbox
    exists, None when it is given back (see :func:`metered`)."""
    receiver = _meter.get()
    if receiver is not None:
        receiver(source)


def _tiers_where(test: Callable[[Capabilities], bool], *, but: str = "") -> list[str]:
    from tierbox.tiers import get_tier, tier_names

    return [n for n in tier_names() if n != but and test(get_tier(n).capabilities)]


def _tiers_that(kind: SnapshotKind) -> str:
    from tierbox.tiers import get_tier, tier_names

    names = [n for n in tier_names() if get_tier(n).capabilities.snapshot is kind]
    return ", ".join(names) or "none"


class Instance(abc.ABC):
    """A live sandbox on one tier. ``close`` is idempotent."""

    id: str
    tier_name: str
    spec: SandboxSpec
    capabilities: Capabilities = Capabilities()
    #: ``close`` stops the workload and queues the rest, its directory's
    #: removal included, on the teardown thread (tiers/teardown.py)
    tears_down_in_background: bool = False

    def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        cwd: str | None = None,
        user: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """Run ``argv`` (program first) inside the sandbox and wait for it.
        ``on_stdout``/``on_stderr`` get the output as it is written; the
        result still holds it (capped). Arguments are checked here, once,
        for every tier."""
        req = self._request(argv, stdin, env, timeout_s, cwd, user, on_stdout, on_stderr)
        return self._start(req).wait_here()

    def start(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        cwd: str | None = None,
        user: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        keep_stdin_open: bool = False,
        tty: bool = False,
        unbounded: bool = False,
    ) -> Command:
        """Start ``argv`` and return it running: a driver (the reactor, an
        event loop) moves it on; see :mod:`tierbox.runloop`. ``tty``: on a
        pseudo-terminal (tiers that cannot raise NotSupportedError naming
        those that can)."""
        req = self._request(
            argv, stdin, env, timeout_s, cwd, user, on_stdout, on_stderr, keep_stdin_open
        )
        if unbounded:
            req = dataclasses.replace(req, unbounded=True)
        if keep_stdin_open and not self.capabilities.stdin_stream:
            raise NotSupportedError(
                f"the {self.tier_name} tier takes a command's stdin at start: pass stdin=...; "
                "tiers that stream it: "
                + ", ".join(_tiers_where(lambda c: c.stdin_stream, but=self.tier_name))
            )
        if tty:
            if not self.capabilities.tty:
                from tierbox.tiers import get_tier, tier_names

                can = [n for n in tier_names() if get_tier(n).capabilities.tty] or ["none yet"]
                raise NotSupportedError(
                    f"the {self.tier_name} tier cannot run a command on a terminal; "
                    f"tiers that can: {', '.join(can)}"
                )
            req = dataclasses.replace(req, tty=True, keep_stdin_open=True)
        return self._start(req)

    def _request(
        self,
        argv: Sequence[str],
        stdin: bytes | str | None,
        env: Mapping[str, str] | None,
        timeout_s: float | None,
        cwd: str | None,
        user: str | None,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        keep_stdin_open: bool = False,
    ) -> ExecRequest:
        args, data = check_run_args(argv, stdin, env, timeout_s)
        if cwd is not None:
            cwd = sandbox_path(cwd, cwd=self.workdir, param="cwd")
        if user is not None:
            if not isinstance(user, str):
                raise UsageError(f"user={user!r} must be a str 'uid[:gid]', like '1000'")
            parse_user(user)
        for name, cb in (("on_stdout", on_stdout), ("on_stderr", on_stderr)):
            if cb is not None and not callable(cb):
                raise UsageError(f"{name} must be a callable taking bytes")
        if keep_stdin_open and data is not None:
            raise UsageError("give stdin up front or keep it open for send_stdin, not both")
        return ExecRequest(
            argv=args,
            stdin=data,
            env=env,
            timeout_s=timeout_s,
            cwd=cwd,
            user=user,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            keep_stdin_open=keep_stdin_open,
        )

    @abc.abstractmethod
    def _start(self, req: ExecRequest) -> Command:
        """The tier's command, with checked arguments (not yet waited for)."""

    @property
    def image(self) -> str | None:
        """The image this sandbox really runs (a tier that resolves a variant,
        as wasm does for python, says which)."""
        return self.spec.image

    def processes(self) -> list[ProcessInfo]:
        """What runs in the sandbox now, with pids as the sandbox sees them."""
        from tierbox.tiers import get_tier, tier_names

        can = [n for n in tier_names() if type(get_tier(n)).__name__ != "_MissingTier"]
        raise NotSupportedError(
            f"the {self.tier_name} tier cannot list its processes; tiers that can: "
            + ", ".join(n for n in can if n != self.tier_name)
        )

    def host_pids(self) -> list[int]:
        """The host processes this sandbox costs (to meter PSS): its cgroup's,
        its VMM's. Empty for in-process tiers."""
        return []

    def alive(self) -> bool:
        """Whether the sandbox can still take calls: open, and its init or VMM
        still running. Cheap (no round trip into the sandbox), so a pool can
        ask it before handing a member out. Tiers with nothing that can die
        between calls keep this default."""
        return True

    def hold_resident(self) -> Callable[[], None]:
        """Keep what a running workload holds in memory (an in-process tier's
        live instance) so it can be metered; returns the release. Sandboxes
        with host processes hold theirs already: nothing to do."""
        return lambda: None

    def revert(self, name: str) -> None:
        """Go back to the named snapshot in place (tiers whose snapshot kind
        is REVERT)."""
        raise NotSupportedError(
            f"the {self.tier_name} tier cannot revert a sandbox in place; "
            f"tiers that can: {_tiers_that(SnapshotKind.REVERT)}"
        )

    # ---- files ---------------------------------------------------------------
    # Public methods check and normalise the path once for every tier (see
    # spec.sandbox_path), then call the tier's ``_``-prefixed implementation
    # with an absolute, normalised sandbox path. Every implementation must
    # resolve and open in one step that cannot leave the sandbox (SECURITY.md),
    # act as the workload's user, and bound what it reads.

    #: Where relative sandbox paths start (the workload's working directory).
    workdir: str = "/"

    def put_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write ``data`` (str is encoded as UTF-8) to ``path`` inside the
        sandbox; missing parent directories are made, owned by the workload's user."""
        norm = sandbox_path(path, cwd=self.workdir)
        if isinstance(data, str):
            data = data.encode()
        elif not isinstance(data, bytes | bytearray | memoryview):
            raise UsageError(f"data must be bytes or str, not {type(data).__name__}")
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
            raise UsageError(f"mode={mode!r} is not a file mode: give an int like 0o644")
        self._put_file(norm, bytes(data), mode)

    def get_file(self, path: str, *, max_bytes: int = DEFAULT_READ_MAX_BYTES) -> bytes:
        """The contents of the regular file at ``path``. Raises FileTooLargeError
        beyond ``max_bytes`` and NotRegularFileError for FIFOs, devices, sockets
        and directories (never blocks on them)."""
        return self._get_file(sandbox_path(path, cwd=self.workdir), _check_max(max_bytes))

    def copy_out(self, path: str, out: BinaryIO, *, max_bytes: int | None = None) -> int:
        """Stream the regular file at ``path`` into ``out``; returns the byte
        count. ``max_bytes`` None means no cap (the caller streams to disk)."""
        cap = None if max_bytes is None else _check_max(max_bytes)
        return self._copy_out(sandbox_path(path, cwd=self.workdir), out, cap)

    def entries(self, path: str) -> list[FileEntry]:
        """Entries of the directory at ``path`` (symlinks reported, not followed)."""
        return sorted(self._entries(sandbox_path(path, cwd=self.workdir)), key=lambda e: e.name)

    def list_dir(self, path: str) -> list[str]:
        """Names in the directory at ``path``."""
        return [e.name for e in self.entries(path)]

    @abc.abstractmethod
    def _put_file(self, path: str, data: bytes, mode: int) -> None:
        """Write a file at a normalised sandbox path, as the workload's user."""

    @abc.abstractmethod
    def _get_file(self, path: str, max_bytes: int) -> bytes:
        """Read a regular file at a normalised sandbox path, at most ``max_bytes``."""

    def _copy_out(self, path: str, out: BinaryIO, max_bytes: int | None) -> int:
        """Tiers that can stream override this; the default reads into memory."""
        data = self._get_file(path, DEFAULT_READ_MAX_BYTES if max_bytes is None else max_bytes)
        out.write(data)
        return len(data)

    def _entries(self, path: str) -> list[FileEntry]:
        raise NotSupportedError(f"the {self.tier_name} tier cannot list directories")

    @abc.abstractmethod
    def stats(self) -> Stats:
        """Current resource use."""

    def sample(self) -> Stats:
        """The workload's usage now, cheap enough to read every 100 ms from
        another thread while a command runs (the run history samples it).
        Tiers whose ``stats()`` costs more, or waits for a running command,
        override it."""
        return self.stats()

    def snapshot(self) -> SnapshotRef:
        raise NotSupportedError(
            f"the {self.tier_name} tier cannot snapshot a sandbox; tiers that can: "
            f"{_tiers_that(SnapshotKind.RESTORE)} (restore into new sandboxes), "
            f"{_tiers_that(SnapshotKind.REVERT)} (revert in place)"
        )

    def state(self) -> dict[str, Any]:
        """What ``Tier.attach`` needs to reconnect from another process."""
        return {}

    @abc.abstractmethod
    def close(self) -> Termination | None:
        """Stop the sandbox and release everything it holds. Idempotent."""


def _check_max(max_bytes: object) -> int:
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
        raise UsageError(f"max_bytes={max_bytes!r} must be a whole number of bytes, 0 or more")
    return max_bytes


class DirectoryFiles:
    """The files API of a sandbox whose files live in one host directory
    (process, wasm), through :class:`~tierbox.host.rootfs.RootDir` so that no
    path can leave it. ``files_mount`` is where that directory appears inside
    the sandbox; paths outside it are refused."""

    id: str
    tier_name: str
    #: the sandbox path at which the host directory appears
    files_mount: str = "/"

    def _files_root(self) -> RootDir:
        """The pinned root (opened once by the tier)."""
        raise NotImplementedError

    def _inner(self, path: str) -> str:
        mount = self.files_mount
        if mount == "/":
            return path
        if path == mount or path.startswith(mount + "/"):
            return path[len(mount) :] or "/"
        raise SandboxFileError(
            f"{path} is outside {mount}: the {self.tier_name} tier's files API reaches only "
            f"its private {mount} (sandbox {self.id})",
            path=path,
        )

    def _put_file(self, path: str, data: bytes, mode: int) -> None:
        self._files_root().write_file(self._inner(path), data, mode)

    def _get_file(self, path: str, max_bytes: int) -> bytes:
        return self._files_root().read_file(self._inner(path), max_bytes)

    def _copy_out(self, path: str, out: BinaryIO, max_bytes: int | None) -> int:
        return self._files_root().copy_out(self._inner(path), out, max_bytes)

    def _entries(self, path: str) -> list[FileEntry]:
        return self._files_root().entries(self._inner(path))


class Tier(abc.ABC):
    """One rung of the ladder: knows whether it can run here and creates instances."""

    name: str
    #: One line on what this tier isolates, shown by ``tierbox tiers`` and bench.
    isolation: str
    capabilities: Capabilities = Capabilities()

    @abc.abstractmethod
    def available(self) -> Availability:
        """Can this tier run here? Cheap and cached where possible."""

    def check_spec(self, spec: SandboxSpec) -> None:
        """What every tier refuses the same way, checked once: too little
        memory, a network policy or published ports the tier cannot give,
        published ports without egress (the interface they arrive through)."""
        mem = spec.limits.memory_mib
        least = self.capabilities.min_memory_mib
        if mem is not None and mem < least:
            raise SpecError(
                f"memory_mib={mem} is too small for the {self.name} tier: give at least {least} MiB"
            )
        mode = spec.network_mode
        if mode not in self.capabilities.networks:
            can = _tiers_where(lambda c: mode in c.networks, but=self.name)
            raise NotSupportedError(
                f"the {self.name} tier cannot give network={mode.value}: "
                f"use network=none here, or a tier that can ({', '.join(can) or 'none'})"
            )
        if spec.ports and not self.capabilities.publish_ports:
            can = _tiers_where(lambda c: c.publish_ports, but=self.name)
            raise NotSupportedError(
                f"the {self.name} tier cannot publish ports: drop ports=, "
                f"or use a tier that can ({', '.join(can) or 'none'})"
            )
        if spec.ports and not isinstance(spec.network, Egress):
            raise SpecError(
                f"publishing ports on the {self.name} tier needs network=egress "
                "(an empty allow-list lets nothing out): "
                f"network={mode.value} has no interface to publish on"
            )

    def prepare(self, spec: SandboxSpec) -> SandboxSpec:
        """``spec`` checked, with the allow-list's names resolved and pinned
        and a host port picked for each published port written as 0 (once:
        a pinned spec comes back as it is)."""
        self.check_spec(spec)
        if isinstance(spec.network, Egress) and not spec.network.pinned:
            spec = dataclasses.replace(spec, network=pin(spec.network))
        if any(p.host_port == 0 for p in spec.ports):  # picked once, shown by inspect
            spec = dataclasses.replace(spec, ports=netgw.pick_host_ports(spec.ports))
        return spec

    def create(self, spec: SandboxSpec) -> Instance:
        """Start a long-lived sandbox."""
        return self._create(self.prepare(spec))

    @abc.abstractmethod
    def _create(self, spec: SandboxSpec) -> Instance:
        """The tier's create, with a checked spec."""

    def run(
        self,
        spec: SandboxSpec,
        argv: Sequence[str],
        *,
        stdin: bytes | str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """One-shot: a fresh sandbox runs ``argv`` (empty: the image's own
        command) once and is gone; output streams to the callbacks as it
        comes. Arguments checked here for every tier."""
        spec = self.prepare(spec)
        args, data = check_run_args(argv, stdin, None, None, allow_empty=True)
        return self._run(spec, args, stdin=data, on_stdout=on_stdout, on_stderr=on_stderr)

    def _run(
        self,
        spec: SandboxSpec,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """Create, exec, close. Tiers override for speed."""
        inst = self._create(spec)
        try:
            meter(inst.sample)
            return inst.exec(
                argv,
                stdin=stdin,
                timeout_s=spec.limits.timeout_s,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
            )
        finally:
            meter(None)
            inst.close()

    def attach(self, sandbox_id: str, state: dict[str, Any]) -> Instance:
        """Reconnect to a sandbox created by another process (from its state file)."""
        raise NotSupportedError(f"the {self.name} tier cannot reattach to sandbox {sandbox_id}")

    def restore(self, snap: SnapshotRef) -> Instance:
        raise NotSupportedError(
            f"the {self.name} tier cannot restore snapshots into new sandboxes; "
            f"tiers that can: {_tiers_that(SnapshotKind.RESTORE)}"
        )

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
