"""What the daemon does, apart from HTTP: its sandboxes, their commands,
tenants' quotas, and finding everything again after a restart.

Every sandbox the daemon makes is a kept one (``keep=True``): ``tierbox gc``
leaves it alone and it outlives the daemon, which finds it again with
``Sandbox.connect`` when it restarts. Commands run on the event loop
(:class:`~tierbox.AsyncSandbox`); blocking work (engine start-up, files,
snapshots) runs on a thread.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tierbox import paths
from tierbox.aio import AsyncCommandHandle, AsyncSandbox
from tierbox.errors import (
    ExecNotFoundError,
    InvalidRequestError,
    NotSupportedError,
    PermissionDeniedError,
    QuotaExceededError,
    SandboxClosedError,
    SandboxDeadError,
    SandboxNotFoundError,
    ShuttingDownError,
    SnapshotNotFoundError,
    TierboxError,
    UsageError,
)
from tierbox.network import Egress, PortMap
from tierbox.sandbox import Sandbox, make_spec
from tierbox.server import codes
from tierbox.server.db import (
    LIVE_STATES,
    Caller,
    Database,
    ExecRow,
    SandboxRow,
)
from tierbox.server.metrics import Metrics
from tierbox.spec import ExecResult, Mount, SandboxSpec, Termination, TerminationKind
from tierbox.tiers import get_tier
from tierbox.tiers.base import SnapshotKind, SnapshotRef
from tierbox.tiers.commands import Command

log = logging.getLogger("tierbox.server")
T = TypeVar("T")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
#: output a command keeps for streams that join late (the head goes to the database)
REPLAY_BYTES = 4 << 20
#: finished commands kept in memory per sandbox (older ones answer from the database)
KEEP_FINISHED = 64
#: how often live sandboxes are sampled (memory, liveness, time to live)
SAMPLE_EVERY_S = 2.0
#: a directory upload or download through the API is at most this big
TAR_MAX_BYTES = 1 << 30
#: environment variable naming a fault to inject (tests of kill -9 at a known point)
FAULT_ENV = "TIERBOX_SERVER_FAULT"


def fault(point: str) -> None:
    """Stop for a while at ``point`` when ``$TIERBOX_SERVER_FAULT`` is
    ``point:SECONDS``, so a test can kill the daemon exactly there."""
    spec = os.environ.get(FAULT_ENV, "")
    name, _, seconds = spec.partition(":")
    if name == point:
        log.warning("fault point %s: pausing %s s", point, seconds)
        time.sleep(float(seconds or "30"))


@dataclass
class CreateRequest:
    """A sandbox as the API asks for it (already shape-checked)."""

    image: str | None
    tier: str
    name: str | None = None
    ttl_s: float | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExecArgs:
    argv: list[str]
    stdin: bytes | None = None
    env: dict[str, str] | None = None
    timeout_s: float | None = None
    cwd: str | None = None
    user: str | None = None
    background: bool = False


class ExecSession:
    """One command as the daemon runs it: its output so far (for streams
    that join late), who waits for it, and how it ended."""

    def __init__(self, row: ExecRow, tier: str) -> None:
        self.row = row
        self.tier = tier
        self.chunks: list[tuple[str, bytes]] = []
        self.base = 0  # index of chunks[0] among every chunk ever emitted
        self.kept_bytes = 0
        self.heads = {"stdout": bytearray(), "stderr": bytearray()}
        self.handle: AsyncCommandHandle | _PoolHandle | None = None
        self.result: ExecResult | None = None
        self.message: str | None = None
        self.cancel_reason: str | None = None
        self.cancel_code = codes.code_of(ShuttingDownError)
        #: the error class a client raises for this command (a code), if it did not end by itself
        self.error_code: str | None = None
        self.audit_seq = 0
        self.done = asyncio.Event()
        self._changed = asyncio.Event()

    @property
    def id(self) -> str:
        return self.row.id

    def emit(self, stream: str, chunk: bytes) -> None:
        """Output, on the event loop's thread."""
        head = self.heads[stream]
        if len(head) < 65536:
            head += chunk[: 65536 - len(head)]
        self.chunks.append((stream, chunk))
        self.kept_bytes += len(chunk)
        while self.kept_bytes > REPLAY_BYTES and len(self.chunks) > 1:
            _, old = self.chunks.pop(0)
            self.kept_bytes -= len(old)
            self.base += 1
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def finish(self, status: str) -> None:
        self.row.status = status
        self.row.ended_unix = time.time()
        if self.result is not None:
            self.row.exit_code = self.result.exit_code
            self.row.termination = self.result.termination.to_dict()
        self.done.set()
        self._wake()

    async def events(self, start: int = 0) -> AsyncIterator[tuple[str, Any]]:
        """``(stream, bytes)`` for each chunk from the ``start``-th on, a
        ``("gap", n)`` where chunks were no longer kept, then ``("exit", None)``."""
        i = start
        while True:
            changed = self._changed
            if i < self.base:
                yield "gap", self.base - i
                i = self.base
            while i - self.base < len(self.chunks):
                yield self.chunks[i - self.base]
                i += 1
            if self.done.is_set():
                yield "exit", None
                return
            await changed.wait()

    def to_dict(self) -> dict[str, Any]:
        return exec_dict(self.row, self.result, self.message, self.error_code)


def exec_dict(
    row: ExecRow, result: ExecResult | None, message: str | None, error_code: str | None = None
) -> dict[str, Any]:
    """How the API shows a command."""
    t = row.termination or {}
    if error_code is None and t.get("code"):
        error_code, message = str(t["code"]), message or t.get("message")
    out: dict[str, Any] = {
        "id": row.id,
        "sandbox_id": row.sandbox_id,
        "argv": row.argv,
        "background": row.background,
        "pid": row.pid,
        "status": row.status,
        "started_unix": row.started_unix,
        "ended_unix": row.ended_unix,
        "exit_code": row.exit_code,
        "termination": row.termination,
        "message": message,
        "error": {"code": error_code, "message": message} if error_code else None,
        "result": None,
    }
    if result is not None:
        out["result"] = result_dict(result)
    return out


def result_dict(r: ExecResult) -> dict[str, Any]:
    """An ExecResult as JSON: text for people, base64 for the exact bytes."""
    d = r.to_dict()
    d["stdout_b64"] = base64.b64encode(r.stdout).decode()
    d["stderr_b64"] = base64.b64encode(r.stderr).decode()
    return d


def result_from_dict(d: dict[str, Any]) -> ExecResult:
    t = d["termination"]
    return ExecResult(
        stdout=base64.b64decode(d["stdout_b64"]),
        stderr=base64.b64decode(d["stderr_b64"]),
        termination=Termination(
            kind=TerminationKind(t["kind"]),
            exit_code=t.get("exit_code"),
            signal=t.get("signal"),
            evidence=dict(t.get("evidence") or {}),
        ),
        duration_s=float(d.get("duration_s", 0.0)),
        stdout_truncated=bool(d.get("stdout_truncated")),
        stderr_truncated=bool(d.get("stderr_truncated")),
    )


class _PoolHandle:
    """A command whose work is a blocking call, waited for on the daemon's
    thread pool: the handle :class:`~tierbox.aio.AsyncCommandHandle` would be."""

    def __init__(self, command: Command, waiting: Awaitable[ExecResult]) -> None:
        self._command = command
        self._task = asyncio.ensure_future(waiting)

    @property
    def pid(self) -> int | None:
        return self._command.pid

    async def wait(self) -> ExecResult:
        return await asyncio.shield(self._task)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self._command.kill(sig)

    def send_stdin(self, data: bytes | str) -> None:
        self._command.send_stdin(data.encode() if isinstance(data, str) else data)

    def close_stdin(self) -> None:
        self._command.close_stdin()


@dataclass
class Live:
    """A sandbox the daemon holds."""

    row: SandboxRow
    sandbox: Sandbox
    asb: AsyncSandbox
    execs: dict[str, ExecSession] = field(default_factory=dict)
    memory_bytes: int | None = None
    memory_peak_bytes: int | None = None
    closing: bool = False

    def view(self) -> dict[str, Any]:
        d = self.row.to_dict()
        d["memory_bytes"] = self.memory_bytes
        d["memory_peak_bytes"] = self.memory_peak_bytes
        d["running_execs"] = sum(1 for s in self.execs.values() if not s.done.is_set())
        return d


class Service:
    """The daemon's sandboxes and commands for every tenant."""

    def __init__(self, db: Database, *, bench_dir: Path | None = None) -> None:
        self.db = db
        self.bench_dir = bench_dir
        self.live: dict[str, Live] = {}
        self.draining = False
        self.ready = False
        self.run_id = 0
        self.metrics = Metrics(self._sandbox_counts, db.restarts)
        self._quota_lock = asyncio.Lock()
        self._pending = 0  # creates, restores and deletes under way
        self._tasks: set[asyncio.Task[Any]] = set()
        self._executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="tierbox-serve")
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- plumbing -------------------------------------------------------------------
    async def blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking facade call on the daemon's thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _sandbox_counts(self) -> list[tuple[str, str, int]]:
        counts: dict[tuple[str, str], int] = {}
        for live in list(self.live.values()):
            key = (live.row.tier, "closing" if live.closing else "running")
            counts[key] = counts.get(key, 0) + 1
        return [(t, s, n) for (t, s), n in sorted(counts.items())]

    def _check_open(self) -> None:
        if self.draining:
            raise ShuttingDownError("the daemon is shutting down: it takes no new work")

    # ---- start and stop -------------------------------------------------------------
    async def start(self) -> None:
        """Reconcile with what the host holds, then sample in the background."""
        self._loop = asyncio.get_running_loop()
        await self.blocking(self.reconcile)
        self.ready = True
        self._spawn(self._sampler())

    def reconcile(self) -> dict[str, list[str]]:
        """Find every sandbox the database says runs; mark dead (and reap)
        those whose engine died; close what a crashed daemon left half-made;
        end commands a crashed daemon was running. Returns what it did."""
        self.run_id, crashed = self.db.begin_run()
        report: dict[str, list[str]] = {"found": [], "dead": [], "orphans": [], "killed": []}
        interrupted = self.db.running_execs()
        if interrupted:
            self.db.interrupt_execs("the daemon stopped while it ran (killed or crashed)")
        now = time.time()
        for row in self.db.sandboxes(states=LIVE_STATES):
            if row.state == "creating":
                self.db.set_sandbox_state(
                    row.id, "failed", reason="the daemon stopped while creating it"
                )
                continue
            try:
                sb = Sandbox.connect(row.id)
            except TierboxError as exc:
                self.db.set_sandbox_state(row.id, "dead", reason=f"not found again: {exc}")
                report["dead"].append(row.id)
                continue
            if row.state == "deleting" or (row.expires_unix and row.expires_unix < now):
                with contextlib.suppress(TierboxError):
                    sb.close()
                state = "deleted" if row.state == "deleting" else "expired"
                self.db.set_sandbox_state(row.id, state)
                continue
            if not sb.instance.alive():
                with contextlib.suppress(TierboxError):
                    sb.close()
                self.db.set_sandbox_state(row.id, "dead", reason="its engine died")
                report["dead"].append(row.id)
                continue
            self.live[row.id] = Live(row, sb, AsyncSandbox(sb))
            report["found"].append(row.id)
        report["orphans"] = self._close_orphans(crashed)
        report["killed"] = self._kill_interrupted(interrupted)
        if crashed:
            from tierbox import gc

            # what a create cut short before its sandbox was recorded: not
            # kept, its owner (the dead daemon) gone, so gc reaps it
            with contextlib.suppress(TierboxError):
                for line in gc.collect():
                    log.info("reconcile: gc removed %s", line)
        if any(report.values()):
            log.info("reconcile: %s", {k: len(v) for k, v in report.items()})
        return report

    def _close_orphans(self, crashed: list[dict[str, Any]]) -> list[str]:
        """Kept sandboxes a crashed daemon made but never recorded as running
        (killed between the engine's start and the database's commit): their
        owner is that daemon's pid, made while it ran."""
        closed: list[str] = []
        if not crashed:
            return closed
        known = {r.id for r in self.db.sandboxes(states=None)}
        for rec in Sandbox.list():
            if not rec.keep or rec.id in self.live:
                continue
            mine = any(
                rec.owner_pid == run["pid"]
                and run["started_unix"] - 1 <= rec.created_unix <= run["seen_unix"] + 10
                for run in crashed
            )
            if mine or (rec.id in known and rec.id not in self.live):
                with contextlib.suppress(TierboxError):
                    Sandbox.connect(rec.id).close()
                closed.append(rec.id)
        return closed

    def _kill_interrupted(self, rows: list[ExecRow]) -> list[str]:
        """Processes of commands a crashed daemon was running go too: the
        client waiting for them is gone, and nobody could stop them later."""
        killed: list[str] = []
        for row in rows:
            live = self.live.get(row.sandbox_id)
            if live is None or get_tier(live.row.tier).capabilities.in_process:
                continue
            try:
                procs = live.sandbox.processes()
            except TierboxError:
                continue
            script = row.argv[2] if row.argv[1:2] == ["-c"] and len(row.argv) > 2 else None
            targets = [
                p.pid
                for p in procs
                if (row.pid is None or p.pid == row.pid)
                and p.pid != 1
                # the command itself, or what its shell exec'd (sh -c 'sleep 300')
                and (p.argv == row.argv or (script is not None and " ".join(p.argv) == script))
            ]
            family = set(targets)
            grew = True
            while grew:  # and what they started
                more = {p.pid for p in procs if p.ppid in family} - family
                family |= more
                grew = bool(more)
            if family:
                pids = [str(p) for p in sorted(family)]
                with contextlib.suppress(TierboxError):
                    live.sandbox.run(["kill", "-KILL", *pids], timeout_s=10)
                killed += [f"{row.sandbox_id}:{p}" for p in pids]
        return killed

    async def _sampler(self) -> None:
        """Memory now and at peak for the dashboard; sandboxes whose engine
        died are marked dead and reaped; expired ones are closed."""
        while True:
            await asyncio.sleep(SAMPLE_EVERY_S)
            with contextlib.suppress(Exception):
                await self.blocking(self.db.heartbeat, self.run_id)
            now = time.time()
            for sid, live in list(self.live.items()):
                if live.closing:
                    continue
                if live.row.expires_unix is not None and live.row.expires_unix < now:
                    self._spawn(self._close(live, "expired", "its time to live ran out"))
                    continue
                try:
                    alive, st = await self.blocking(_sample, live.sandbox)
                except Exception:  # a sample is best effort
                    continue
                if not alive and sid in self.live:
                    self._spawn(self._close(live, "dead", "its engine died"))
                    continue
                if st is not None:
                    live.memory_bytes = st.memory_bytes
                    peak = st.memory_peak_bytes or st.memory_bytes
                    if peak is not None:
                        live.memory_peak_bytes = max(peak, live.memory_peak_bytes or 0)

    async def _sample_one(self, live: Live) -> None:
        with contextlib.suppress(Exception):  # a sample is best effort
            _, st = await self.blocking(_sample, live.sandbox)
            if st is not None:
                live.memory_bytes = st.memory_bytes
                peak = st.memory_peak_bytes or st.memory_bytes
                if peak is not None:
                    live.memory_peak_bytes = max(peak, live.memory_peak_bytes or 0)

    async def drain(self, grace_s: float) -> dict[str, int]:
        """Stop taking work; let running commands end for ``grace_s``, then
        kill the rest, which end with status ``cancelled``. Sandboxes stay."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self._running_sessions() or self._pending):
            await asyncio.sleep(0.05)
        cancelled = 0
        for session in self._running_sessions():
            session.cancel_reason = f"the daemon shut down ({grace_s:g} s grace ran out)"
            if session.handle is not None:
                with contextlib.suppress(TierboxError, OSError):
                    session.handle.kill(signal.SIGKILL)
            cancelled += 1
        end = time.monotonic() + 10
        while self._running_sessions() and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for task in list(self._tasks):
            task.cancel()
        self.db.end_run(self.run_id)
        self._executor.shutdown(wait=False, cancel_futures=True)
        return {"cancelled": cancelled}

    def _running_sessions(self) -> list[ExecSession]:
        return [
            s for live in self.live.values() for s in live.execs.values() if not s.done.is_set()
        ]

    # ---- lookups -----------------------------------------------------------------------
    def find(self, caller: Caller, ref: str) -> Live:
        """A live sandbox the caller may see, by id or name; another tenant's
        is as missing as one that never existed (404, never 403)."""
        live = self.live.get(ref)
        if live is None:
            tenant = caller.tenant
            row = self.db.sandbox_by_name(tenant, ref) if NAME_RE.fullmatch(ref) else None
            live = self.live.get(row.id) if row is not None else None
        if live is None or not caller.sees(live.row.tenant) or live.closing:
            raise SandboxNotFoundError(f"no sandbox {ref!r}")
        return live

    def row(self, caller: Caller, ref: str) -> dict[str, Any]:
        """A sandbox's record, live or ended (dead, deleted...)."""
        live = self.live.get(ref)
        if live is not None and caller.sees(live.row.tenant):
            return live.view()
        row = self.db.sandbox(ref)
        if row is None or not caller.sees(row.tenant):
            return self.find(caller, ref).view()
        return row.to_dict()

    def list(self, caller: Caller, *, ended: bool = False) -> builtins.list[dict[str, Any]]:
        if ended:
            tenant = None if caller.operator else caller.tenant
            rows = self.db.sandboxes(tenant=tenant, states=None)
            return [self.live[r.id].view() if r.id in self.live else r.to_dict() for r in rows]
        return [
            live.view()
            for live in sorted(self.live.values(), key=lambda x: x.row.created_unix)
            if caller.sees(live.row.tenant) and not live.closing
        ]

    # ---- quotas ---------------------------------------------------------------------------
    def _check_quota(self, caller: Caller, tier: str, memory_mib: int | None, count: int) -> None:
        tenant = self.db.tenant(caller.tenant)
        if tenant is None:
            return
        if tenant.allowed_tiers is not None and tier not in tenant.allowed_tiers:
            self._refuse(
                "tiers",
                f"tenant {tenant.name} may not use the {tier} tier "
                f"(allowed: {', '.join(tenant.allowed_tiers) or 'none'})",
            )
        mine = self.db.sandboxes(tenant=tenant.name, states=LIVE_STATES)
        if tenant.max_sandboxes is not None and len(mine) + count > tenant.max_sandboxes:
            self._refuse(
                "sandboxes",
                f"tenant {tenant.name} may hold {tenant.max_sandboxes} sandboxes at once "
                f"and holds {len(mine)}",
            )
        if tenant.max_memory_mib is not None:
            if memory_mib is None:
                self._refuse(
                    "memory_mib",
                    f"tenant {tenant.name} has a memory quota: give memory_mib",
                )
            used = sum(r.memory_mib or 0 for r in mine)
            want = (memory_mib or 0) * count
            if used + want > tenant.max_memory_mib:
                self._refuse(
                    "memory_mib",
                    f"tenant {tenant.name} may use {tenant.max_memory_mib} MiB at once; "
                    f"it uses {used} MiB and asks for {want} MiB more",
                )

    def _refuse(self, quota: str, message: str) -> None:
        self.metrics.quota_refusals.labels(quota).inc()
        raise QuotaExceededError(f"quota {quota}: {message}", quota=quota)

    # ---- sandboxes ---------------------------------------------------------------------------
    def _spec(self, caller: Caller, req: CreateRequest) -> SandboxSpec:
        opts = dict(req.options)
        mounts = opts.pop("mounts", None) or []
        if mounts and not caller.operator:
            raise PermissionDeniedError(
                "host mounts are for the host operator (the unix socket without a key)"
            )
        if opts.get("network") == "host" and not caller.operator:
            raise PermissionDeniedError(
                "network=host is for the host operator (the unix socket without a key)"
            )
        if opts.get("ports") and not caller.operator:
            raise PermissionDeniedError(
                "published ports bind on the daemon's host: they are for the host operator "
                "(the unix socket without a key)"
            )
        if isinstance(opts.get("network"), dict):
            opts["network"] = Egress(**opts["network"])
        opts["ports"] = [PortMap(**p) for p in opts.get("ports") or ()]
        opts["mounts"] = [Mount(**m) for m in mounts]
        if req.ttl_s is not None and req.ttl_s <= 0:
            raise InvalidRequestError("ttl_s must be positive", field="ttl_s")
        try:
            get_tier(req.tier)
        except TierboxError as exc:
            raise InvalidRequestError(str(exc), field="tier") from exc
        return make_spec(req.image, **opts)

    async def create(self, caller: Caller, req: CreateRequest) -> dict[str, Any]:
        self._check_open()
        spec = self._spec(caller, req)
        if req.name is not None and not NAME_RE.fullmatch(req.name):
            raise InvalidRequestError(
                f"name {req.name!r}: use letters, digits, '.', '_' or '-' (at most 63)",
                field="name",
            )
        placeholder = f"creating-{secrets.token_hex(8)}"
        now = time.time()
        async with self._quota_lock:
            if req.name is not None and self.db.sandbox_by_name(caller.tenant, req.name):
                raise UsageError(f"the name {req.name!r} is taken by a live sandbox of yours")
            self._check_quota(caller, req.tier, spec.limits.memory_mib, 1)
            row = SandboxRow(
                id=placeholder,
                tenant=caller.tenant,
                name=req.name,
                tier=req.tier,
                image=req.image,
                spec=spec.to_dict(),
                memory_mib=spec.limits.memory_mib,
                state="creating",
                created_unix=now,
                expires_unix=now + req.ttl_s if req.ttl_s is not None else None,
            )
            self.db.insert_sandbox(row)
        self._pending += 1
        started = time.perf_counter()
        try:
            if get_tier(req.tier).capabilities.in_process and not os.environ.get(FAULT_ENV):
                # a directory and a module's instance: quicker than a thread hop
                sb = self._create_blocking(req, spec)
            else:
                sb = await self.blocking(self._create_blocking, req, spec)
        except BaseException as exc:
            self.db.set_sandbox_state(placeholder, "failed", reason=str(exc)[:500])
            self.db.audit(caller, "create", None, {"tier": req.tier, "image": req.image}, "failed")
            raise
        finally:
            self._pending -= 1
        self.metrics.create_s.labels(req.tier).observe(time.perf_counter() - started)
        row.id = sb.id
        row.state = "running"
        row.image = sb.instance.image
        self.db.set_sandbox_state(
            placeholder,
            "running",
            new_id=sb.id,
            image=row.image,
            audit=(caller, "create", sb.id, {"tier": req.tier, "image": req.image}, "ok"),
        )
        self.live[sb.id] = Live(row, sb, AsyncSandbox(sb))
        self._spawn(self._sample_one(self.live[sb.id]))  # memory on the dashboard at once
        return self.live[sb.id].view()

    @staticmethod
    def _create_blocking(req: CreateRequest, spec: SandboxSpec) -> Sandbox:
        fault("before-create")
        sb = Sandbox.create(tier=req.tier, spec=spec, keep=True, ttl_s=req.ttl_s)
        fault("after-create")
        return sb

    async def delete(self, caller: Caller, ref: str) -> dict[str, Any]:
        self._check_open()
        live = self.find(caller, ref)
        await self._close(live, "deleted", None, audit=(caller, "delete", live.row.id, None, "ok"))
        return live.row.to_dict()

    async def _close(
        self,
        live: Live,
        state: str,
        reason: str | None,
        audit: tuple[Caller, str, str | None, dict[str, Any] | None, str] | None = None,
    ) -> None:
        if live.closing:
            return
        live.closing = True
        self.db.set_sandbox_state(live.row.id, "deleting")
        self._pending += 1
        try:
            for session in live.execs.values():
                if not session.done.is_set() and session.handle is not None:
                    session.cancel_reason = f"the sandbox was {state}"
                    session.cancel_code = codes.code_of(SandboxClosedError)
                    with contextlib.suppress(TierboxError, OSError):
                        session.handle.kill(signal.SIGKILL)
            try:
                if get_tier(live.row.tier).capabilities.in_process:
                    live.sandbox.close()  # a directory to remove: no thread hop
                else:
                    await self.blocking(live.sandbox.close)
            except TierboxError as exc:
                reason = f"{reason or state}; close: {exc}"
        finally:
            self._pending -= 1
            live.row.state = state
            live.row.reason = reason
            self.db.set_sandbox_state(live.row.id, state, reason=reason, audit=audit)
            self.live.pop(live.row.id, None)

    async def stats(self, caller: Caller, ref: str) -> dict[str, Any]:
        live = self.find(caller, ref)
        st = await self.blocking(live.sandbox.stats)
        return st.to_dict()

    async def processes(self, caller: Caller, ref: str) -> builtins.list[dict[str, Any]]:
        live = self.find(caller, ref)
        return [p.to_dict() for p in await self.blocking(live.sandbox.processes)]

    # ---- commands ---------------------------------------------------------------------
    async def exec_start(self, caller: Caller, ref: str, args: ExecArgs) -> ExecSession:
        self._check_open()
        live = self.find(caller, ref)
        timeout_s = args.timeout_s
        if not args.background and timeout_s is None:
            timeout_s = live.sandbox.spec.limits.timeout_s
        row = ExecRow(
            id=secrets.token_hex(8),
            sandbox_id=live.row.id,
            tenant=live.row.tenant,
            argv=list(args.argv),
            background=args.background,
            status="running",
            started_unix=time.time(),
        )
        session = ExecSession(row, live.row.tier)
        loop = asyncio.get_running_loop()

        def sink(stream: str) -> Callable[[bytes], None]:
            def put(chunk: bytes) -> None:
                loop.call_soon_threadsafe(session.emit, stream, chunk)

            return put

        stdin = args.stdin
        if stdin is None and not args.background:
            stdin = b""  # a foreground command's stdin is closed, as in sb.run
        started = time.perf_counter()
        handle: AsyncCommandHandle | _PoolHandle
        if live.sandbox.instance.capabilities.in_process:
            # the work is a call in this process (wasm): run it on a warm
            # thread of the daemon's pool rather than a new thread per command
            command = live.sandbox.instance.start(
                args.argv,
                stdin=stdin,
                env=args.env,
                timeout_s=timeout_s,
                cwd=args.cwd,
                user=args.user,
                on_stdout=sink("stdout"),
                on_stderr=sink("stderr"),
                unbounded=args.background,
            )
            handle = _PoolHandle(command, self.blocking(command.wait_here))
        else:
            handle = await live.asb.run(
                args.argv,
                stdin=stdin,
                env=args.env,
                timeout_s=timeout_s,
                cwd=args.cwd,
                user=args.user,
                on_stdout=sink("stdout"),
                on_stderr=sink("stderr"),
                background=True,
            )
        session.handle = handle
        row.pid = handle.pid
        session.audit_seq = self.db.insert_exec(row, caller.key_id)
        if row.pid is not None:
            self.db.set_exec_pid(row.id, row.pid)
        live.execs[row.id] = session
        self._forget_finished(live)
        self._spawn(self._watch(session, handle, started))
        return session

    async def _watch(
        self, session: ExecSession, handle: AsyncCommandHandle | _PoolHandle, started: float
    ) -> None:
        status = "error"
        try:
            result = await handle.wait()
            session.result = result
            status = result.termination.kind.value
        except TierboxError as exc:
            session.message = str(exc)
            session.error_code = codes.code_of(type(exc))
        except asyncio.CancelledError:
            session.message = session.cancel_reason or "the daemon stopped"
            session.error_code = codes.code_of(ShuttingDownError)
            status = "cancelled"
        # let output the callbacks queued reach the session before its end
        await asyncio.sleep(0)
        if session.cancel_reason is not None:
            status = "cancelled"
            session.message = session.cancel_reason
            session.error_code = session.cancel_code
        tier = session.tier
        self.metrics.exec_s.labels(tier).observe(time.perf_counter() - started)
        if status == TerminationKind.OOM_KILLED.value:
            self.metrics.oom_kills.labels(tier).inc()
        elif status == TerminationKind.TIMED_OUT.value:
            self.metrics.timeouts.labels(tier).inc()
        session.finish(status)
        with contextlib.suppress(Exception):
            self.db.finish_exec(
                session.id,
                session.audit_seq,
                status=status,
                exit_code=session.row.exit_code,
                termination=session.row.termination
                if session.error_code is None
                else {
                    **(session.row.termination or {}),
                    "kind": status,
                    "message": session.message,
                    "code": session.error_code,
                },
                stdout_head=bytes(session.heads["stdout"]),
                stderr_head=bytes(session.heads["stderr"]),
            )

    @staticmethod
    def _forget_finished(live: Live) -> None:
        done = [s for s in live.execs.values() if s.done.is_set()]
        for s in done[: max(0, len(done) - KEEP_FINISHED)]:
            live.execs.pop(s.id, None)

    def session(self, caller: Caller, ref: str, exec_id: str) -> ExecSession:
        live = self.find(caller, ref)
        session = live.execs.get(exec_id)
        if session is None:
            raise ExecNotFoundError(f"no command {exec_id!r} running in sandbox {ref!r}")
        return session

    def exec_view(self, caller: Caller, ref: str, exec_id: str) -> dict[str, Any]:
        """A command, running or ended (ended ones also from the database)."""
        with contextlib.suppress(ExecNotFoundError):
            return self.session(caller, ref, exec_id).to_dict()
        row = self.db.exec_row(exec_id)
        sandbox = self.db.sandbox(row.sandbox_id) if row is not None else None
        if row is None or sandbox is None or not caller.sees(sandbox.tenant):
            raise ExecNotFoundError(f"no command {exec_id!r} in sandbox {ref!r}")
        if ref not in (sandbox.id, sandbox.name):
            raise ExecNotFoundError(f"no command {exec_id!r} in sandbox {ref!r}")
        return exec_dict(row, None, None)

    def exec_history(self, caller: Caller, ref: str) -> builtins.list[dict[str, Any]]:
        row = self.row(caller, ref)
        return [exec_dict(r, None, None) for r in self.db.execs(row["id"])]

    async def send_stdin(
        self, caller: Caller, ref: str, exec_id: str, data: bytes, eof: bool
    ) -> None:
        session = self.session(caller, ref, exec_id)
        if session.handle is None or session.done.is_set():
            raise UsageError(f"command {exec_id} has ended: it takes no more input")
        if data:
            session.handle.send_stdin(data)
        if eof:
            session.handle.close_stdin()

    async def kill(self, caller: Caller, ref: str, exec_id: str, sig: int) -> None:
        session = self.session(caller, ref, exec_id)
        if session.handle is not None and not session.done.is_set():
            try:
                session.handle.kill(sig)
            except ProcessLookupError:
                pass
            except OSError as exc:
                raise UsageError(f"cannot send signal {sig}: {exc.strerror}") from exc

    async def run_once(
        self, caller: Caller, req: CreateRequest, args: ExecArgs
    ) -> tuple[dict[str, Any], ExecSession]:
        """One-shot: a fresh sandbox runs one command and is gone (killed with
        the sandbox if the daemon stops)."""
        if not args.argv:
            raise InvalidRequestError(
                "argv is empty: give the program and its arguments", field="argv"
            )
        view = await self.create(caller, req)
        try:
            caller_for = Caller(view["tenant"], caller.key_id, caller.operator)
            session = await self.exec_start(caller_for, view["id"], args)
        except BaseException:
            live = self.live.get(view["id"])
            if live is not None:
                await self._close(live, "deleted", "one-shot run")
            raise
        self._spawn(self._close_after(view["id"], session))
        return view, session

    async def _close_after(self, sandbox_id: str, session: ExecSession) -> None:
        await session.done.wait()
        live = self.live.get(sandbox_id)
        if live is not None:
            await self._close(live, "deleted", "one-shot run ended")

    # ---- files --------------------------------------------------------------------------
    async def write_file(self, caller: Caller, ref: str, path: str, data: bytes, mode: int) -> None:
        self._check_open()
        live = self.find(caller, ref)
        await self.blocking(live.sandbox.files.write, path, data, mode)

    async def read_file(self, caller: Caller, ref: str, path: str, max_bytes: int) -> bytes:
        live = self.find(caller, ref)
        return await self.blocking(live.sandbox.files.read, path, max_bytes=max_bytes)

    async def entries(self, caller: Caller, ref: str, path: str) -> builtins.list[dict[str, Any]]:
        live = self.find(caller, ref)
        return [e.to_dict() for e in await self.blocking(live.sandbox.files.entries, path)]

    async def download_tar(self, caller: Caller, ref: str, path: str, max_bytes: int) -> Path:
        """A tar of the file or directory at ``path``, in a temporary file the
        caller removes; copied out through the facade (bounded, never following
        a symlink), then archived on the host."""
        live = self.find(caller, ref)
        tmp = Path(tempfile.mkdtemp(prefix="tierbox-serve-"))
        try:
            name = os.path.basename(path.rstrip("/")) or "root"
            (tmp / "out").mkdir()
            await self.blocking(
                live.sandbox.files.download, path, tmp / "out" / name, max_bytes=max_bytes
            )
            archive = tmp / "archive.tar"
            await self.blocking(_tar_dir, tmp / "out", archive)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return archive

    async def upload_tar(self, caller: Caller, ref: str, path: str, archive: Path) -> int:
        """Unpack a tar (checked by tarfile's ``data`` filter: no absolute
        paths, no ``..``, no links out, no devices) on the host, then copy it
        in through the facade."""
        self._check_open()
        live = self.find(caller, ref)
        tmp = Path(tempfile.mkdtemp(prefix="tierbox-serve-"))
        try:
            await self.blocking(_untar, archive, tmp / "in")
            return await self.blocking(live.sandbox.files.upload, tmp / "in", path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- snapshots ----------------------------------------------------------------------
    async def snapshot(self, caller: Caller, ref: str) -> dict[str, Any]:
        self._check_open()
        live = self.find(caller, ref)
        kind = get_tier(live.row.tier).capabilities.snapshot
        snap = await self.blocking(live.sandbox.snapshot)
        snap_id = secrets.token_hex(8)
        ref_d = {"tier": snap.tier, "path": snap.path, "meta": snap.meta}
        self.db.insert_snapshot(snap_id, live.row.tenant, live.row.id, snap.tier, kind.value, ref_d)
        self.db.audit(caller, "snapshot", live.row.id, {"snapshot": snap_id}, "ok")
        found = self.db.snapshot(snap_id)
        assert found is not None
        return _snap_view(found)

    def _snap(self, caller: Caller, snap_id: str) -> dict[str, Any]:
        found = self.db.snapshot(snap_id)
        if found is None or not caller.sees(found["tenant"]):
            raise SnapshotNotFoundError(f"no snapshot {snap_id!r}")
        return found

    def snapshot_view(self, caller: Caller, snap_id: str) -> dict[str, Any]:
        return _snap_view(self._snap(caller, snap_id))

    def snapshots(self, caller: Caller) -> builtins.list[dict[str, Any]]:
        return [
            _snap_view(s) for s in self.db.snapshots(None if caller.operator else caller.tenant)
        ]

    async def restore(
        self, caller: Caller, snap_id: str, count: int | None
    ) -> builtins.list[dict[str, Any]]:
        """New sandboxes from a snapshot (one for restore, ``count`` for clone)."""
        self._check_open()
        found = self._snap(caller, snap_id)
        if found["kind"] != SnapshotKind.RESTORE.value:
            raise NotSupportedError(
                f"snapshot {snap_id} is a {found['tier']} snapshot, which reverts its sandbox "
                "in place: POST /v1/sandboxes/{id}/revert"
            )
        ref = SnapshotRef(**found["ref"])
        spec = SandboxSpec.from_dict(ref.meta.get("spec", {}))
        n = count or 1
        owner = Caller(found["tenant"], caller.key_id, caller.operator)
        placeholders: builtins.list[SandboxRow] = []
        async with self._quota_lock:
            self._check_quota(owner, found["tier"], spec.limits.memory_mib, n)
            for _ in range(n):
                row = SandboxRow(
                    id=f"creating-{secrets.token_hex(8)}",
                    tenant=found["tenant"],
                    name=None,
                    tier=found["tier"],
                    image=spec.image,
                    spec=spec.to_dict(),
                    memory_mib=spec.limits.memory_mib,
                    state="creating",
                    created_unix=time.time(),
                    source_snapshot=snap_id,
                )
                self.db.insert_sandbox(row)
                placeholders.append(row)
        self._pending += 1
        started = time.perf_counter()
        try:
            if count is None:
                made = [await self.blocking(Sandbox.restore, ref, keep=True)]
            else:
                made = await self.blocking(Sandbox.clone, ref, n, keep=True)
        except BaseException as exc:
            for row in placeholders:
                self.db.set_sandbox_state(row.id, "failed", reason=str(exc)[:500])
            raise
        finally:
            self._pending -= 1
        self.metrics.create_s.labels(found["tier"]).observe((time.perf_counter() - started) / n)
        out = []
        for row, sb in zip(placeholders, made, strict=True):
            self.db.set_sandbox_state(row.id, "running", new_id=sb.id, image=sb.instance.image)
            row.id, row.state, row.image = sb.id, "running", sb.instance.image
            self.live[sb.id] = Live(row, sb, AsyncSandbox(sb))
            out.append(self.live[sb.id].view())
        action = "restore" if count is None else "clone"
        self.db.audit(caller, action, snap_id, {"sandboxes": [d["id"] for d in out]}, "ok")
        return out

    async def revert(self, caller: Caller, ref: str, snapshot: str) -> None:
        """Revert in place, to a snapshot of this sandbox by id or by its name."""
        self._check_open()
        live = self.find(caller, ref)
        name = snapshot
        found = self.db.snapshot(snapshot)
        if found is not None and caller.sees(found["tenant"]):
            if found["sandbox_id"] != live.row.id:
                raise InvalidRequestError(
                    f"snapshot {snapshot} belongs to another sandbox", field="snapshot"
                )
            name = str(found["ref"]["meta"].get("snapshot", snapshot))
        await self.blocking(live.sandbox.revert, name)
        self.db.audit(caller, "revert", live.row.id, {"snapshot": snapshot}, "ok")

    async def delete_snapshot(self, caller: Caller, snap_id: str) -> None:
        """Forget a snapshot; a snapshot that is files tierbox wrote (restore
        kind) is removed from disk. A VM's internal snapshot stays in its
        disk until the VM goes."""
        self._check_open()
        found = self._snap(caller, snap_id)
        self.db.delete_snapshot(snap_id)
        path = Path(str(found["ref"].get("path", "")))
        if found["kind"] == SnapshotKind.RESTORE.value and _inside(path, paths.home()):
            await self.blocking(shutil.rmtree, path, True)
        self.db.audit(caller, "snapshot-delete", snap_id, None, "ok")


def _snap_view(found: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": found["id"],
        "tenant": found["tenant"],
        "sandbox_id": found["sandbox_id"],
        "tier": found["tier"],
        "kind": found["kind"],
        "created_unix": found["created_unix"],
        "name": found["ref"]["meta"].get("snapshot"),
    }


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve()) and path.resolve() != root.resolve()
    except OSError:
        return False


def _sample(sb: Sandbox) -> tuple[bool, Any]:
    if not sb.instance.alive():
        return False, None
    try:
        return True, sb.stats()
    except SandboxDeadError:
        return False, None


def _tar_dir(src: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tar:
        for child in sorted(src.iterdir()):
            tar.add(child, arcname=child.name)


def _untar(archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            if len(members) > 100_000:
                raise InvalidRequestError(
                    "the archive holds more than 100000 entries", field="body"
                )
            if sum(m.size for m in members) > TAR_MAX_BYTES:
                raise InvalidRequestError(
                    f"the archive unpacks to more than {TAR_MAX_BYTES} bytes", field="body"
                )
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise InvalidRequestError(f"not a usable tar archive: {exc}", field="body") from exc


def list_tiers() -> builtins.list[dict[str, Any]]:
    """Every tier, whether it runs here and what it can do."""
    from tierbox.tiers import tier_names

    out = []
    for name in tier_names():
        tier = get_tier(name)
        caps = tier.capabilities
        out.append(
            {
                "name": name,
                **tier.available().to_dict(),
                "isolation": tier.isolation,
                "capabilities": {
                    "snapshot": caps.snapshot.value,
                    "in_process": caps.in_process,
                    "min_memory_mib": caps.min_memory_mib,
                    "tty": caps.tty,
                    "stdin_stream": caps.stdin_stream,
                    "shares_host_files": caps.shares_host_files,
                },
            }
        )
    return out


def sequence_of_str(value: Sequence[Any]) -> builtins.list[str]:
    return [str(v) for v in value]
