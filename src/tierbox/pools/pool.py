"""Warm pools: ready sandboxes handed out in milliseconds, sized by the
Kubernetes HPA algorithm, shrunk and drained within a disruption budget.

How a pool keeps members ready depends on what its tier declares
(:class:`~tierbox.tiers.base.Capabilities`), never on the tier's name:

- tiers whose snapshots restore into new sandboxes and that run outside
  this process (microVM) keep *clones of a booted template*: the pool boots
  one sandbox, runs the warm-up command, snapshots it, and restores members
  from that snapshot, each already answering (and, by the tier, reseeded:
  fresh RNG and clock), then runs the warm-up again so a claim's first exec
  finds the guest's paths translated;
- in-process tiers (wasm) hold nothing between runs: a claim creates its
  sandbox on the spot (~1 ms) from the engine's cached ``InstancePre``,
  which the warm-up builds once;
- every other tier keeps pre-created sandboxes (container, gVisor; the VM
  tier's create restores its own booted template).

A claimed member belongs to its claimer: ``sb.close()`` destroys it and the
pool starts a replacement; it is never handed out again. A ready member
whose host processes vanished (its init or VMM died) is dropped, never
handed out. The autoscaler (:mod:`tierbox.autoscale`) sees members as pods:
starting ones are Pending, claimed ones use their whole "request", ready
ones nothing; the pool's size is its ``spec.replicas``.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import enum
import itertools
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierbox.autoscale import Decision, HorizontalAutoscaler, Observation, PodPhase, PodSample
from tierbox.errors import (
    DisruptionBudgetError,
    ImageNotFoundError,
    PoolClosedError,
    PoolError,
    PoolExhaustedError,
    SnapshotError,
    TierboxError,
    TierUnavailableError,
    UsageError,
)
from tierbox.pools.spec import RATE_KEY, UTILIZATION_KEY, PoolSpec, hpa_for
from tierbox.sandbox import Sandbox
from tierbox.spec import Limits, SandboxSpec
from tierbox.tiers import SnapshotRef, _state, get_tier
from tierbox.tiers.base import SnapshotKind

#: a member's "request" of the utilization metric, in milli-units
_REQUEST = 1000
#: failed starts back off up to this long
_MAX_BACKOFF_S = 30.0
#: how often a pool checks whether its image changed in the store
_DIGEST_CHECK_S = 5.0
_EVENTS = 50


class Mode(enum.StrEnum):
    """How a pool keeps members ready (from the tier's capabilities)."""

    TEMPLATE = "template"  # clones of a booted snapshot, restored ahead
    CREATE = "create"  # sandboxes created ahead
    ON_DEMAND = "on-demand"  # created at claim: nothing to hold between runs


def mode_for(tier_name: str) -> Mode:
    caps = get_tier(tier_name).capabilities
    if caps.in_process:
        return Mode.ON_DEMAND
    if caps.snapshot is SnapshotKind.RESTORE:
        return Mode.TEMPLATE
    return Mode.CREATE


class State(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    CLAIMED = "claimed"
    EVICTING = "evicting"


@dataclass
class Member:
    key: str
    state: State
    generation: int
    sb: PooledSandbox | None = None
    started_mono: float = 0.0
    ready_mono: float = 0.0


@dataclass(frozen=True)
class Event:
    """What ``kubectl describe`` lists as events."""

    time_unix: float
    type: str  # Normal | Warning
    reason: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "time_unix": self.time_unix,
            "type": self.type,
            "reason": self.reason,
            "message": self.message,
        }


class PooledSandbox(Sandbox):
    """A pool member. Closing a claimed one destroys it; its pool starts a
    replacement. ``warm`` says whether the claim found it ready (False: the
    claim waited for a member to start)."""

    _pool: Pool | None = None
    warm: bool = False
    claim_wait_s: float = 0.0

    def close(self) -> None:
        try:
            super().close()
        finally:
            pool, self._pool = self._pool, None
            if pool is not None:
                pool._member_closed(self)


_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


@atexit.register
def _close_pools() -> None:
    """Pools stop with the process (their members are closed with every
    other sandbox it owns; templates stay for the next process)."""
    for pool in list(_pools):
        with contextlib.suppress(Exception):
            pool.close(discard_template=False)


class Pool:
    """A pool of ready sandboxes::

        pool = Pool("busybox", "microvm", min_ready=2, max_size=8, memory_mib=128)
        with pool.claim() as sb:          # ready in milliseconds
            sb.run(["echo", "hi"])
        pool.close()

    ``limits`` (a :class:`~tierbox.spec.Limits`) or make_spec's options
    (memory_mib, cpus, pids, timeout_s, disk_mib, env, user, workdir) shape
    each member. ``metric`` is ``utilization`` (claimed / members, against
    ``target`` percent, 70 by default) or ``claims_per_second`` (per member,
    against ``target``, 1 by default). ``behavior`` is a Kubernetes HPA
    ``behavior`` object; ``min_available``/``max_unavailable`` a disruption
    budget. Creation fails at once, with the tier's error, when the image is
    missing or the tier cannot run here.
    """

    def __init__(
        self,
        image: str | None = None,
        tier: str = "container",
        limits: Limits | None = None,
        min_ready: int = 1,
        max_size: int = 10,
        *,
        name: str | None = None,
        spec: PoolSpec | None = None,
        history: Mapping[str, Any] | None = None,
        template: SnapshotRef | None = None,
        on_change: Callable[[Pool], None] | None = None,
        **options: Any,
    ) -> None:
        if spec is None:
            if limits is not None:
                for key in ("memory_mib", "cpus", "pids", "timeout_s", "disk_mib"):
                    if key in options:
                        raise UsageError(f"give limits or {key}, not both")
                options.update(
                    memory_mib=limits.memory_mib,
                    cpus=limits.cpus,
                    pids=limits.pids,
                    timeout_s=limits.timeout_s,
                    disk_mib=limits.disk_mib,
                    output_bytes=limits.output_bytes,
                )
            spec = PoolSpec.build(
                name or f"pool-{_state.new_id()[:6]}",
                image,
                tier=tier,
                min_ready=min_ready,
                max_size=max_size,
                **options,
            )
        self.spec = spec
        self._on_change = on_change
        self._lock = threading.RLock()
        self._template_lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self._members: dict[str, Member] = {}
        self._keys = itertools.count(1)
        self._generation = 1
        self._size = spec.min_ready
        self._waiting = 0
        self._on_demand_starting = 0
        self._claims: collections.deque[float] = collections.deque()
        self._claims_total = 0
        self._events: collections.deque[Event] = collections.deque(maxlen=_EVENTS)
        self._draining = False
        self._drain_expected = 0
        self._suspended = False
        self._blocked = ""
        self._last_error = ""
        self._failures = 0
        self._backoff_until = 0.0
        self._template = template
        self._digest: str | None = None
        self._next_digest_check = 0.0
        self._thread: threading.Thread | None = None
        self._hpa = HorizontalAutoscaler(hpa_for(spec))
        if history:
            self._hpa.load_state(history)
        self.mode = self._check_tier()
        self._prepare()
        self._size = self._floor(self.spec.min_ready)
        _pools.add(self)
        self._thread = threading.Thread(
            target=self._run, name=f"tierbox-pool-{spec.name}", daemon=True
        )
        self._thread.start()
        self._wake.set()

    # ---- creation --------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def template(self) -> SnapshotRef | None:
        return self._template

    def _check_tier(self) -> Mode:
        tier = get_tier(self.spec.tier)  # UnknownTierError names the tiers
        avail = tier.available()
        if not avail.available:
            raise TierUnavailableError(
                f"pool {self.name}: the {self.spec.tier} tier cannot run here: {avail.reason}"
            )
        return mode_for(self.spec.tier)

    def _prepare(self) -> None:
        """Prove the image and tier work before the pool exists: build the
        template, or start the first member, or warm the engine."""
        self._digest = _image_digest(self.spec.image)
        if self.mode is Mode.TEMPLATE:
            if self._template is None or not Path(self._template.path).is_dir():
                self._template = self._build_template(self.spec)
            return
        if self.mode is Mode.ON_DEMAND:
            with Sandbox.create(tier=self.spec.tier, spec=self.spec.sandbox) as sb:
                if self.spec.warmup:
                    sb.run(list(self.spec.warmup), timeout_s=60)
            return
        m = self._new_member(State.STARTING)
        self._start_member(m, first=True)  # raises the tier's error (missing image, ...)

    def _build_template(self, spec: PoolSpec) -> SnapshotRef:
        """Boot one sandbox, warm it, snapshot it: what members are cloned from."""
        src = Sandbox.create(tier=spec.tier, spec=spec.sandbox)
        try:
            if spec.warmup:
                src.run(list(spec.warmup), timeout_s=60)
            snap = src.snapshot()
        finally:
            src.close()
        self._event("Normal", "TemplateReady", f"booted template {Path(snap.path).name}")
        return snap

    # ---- members ---------------------------------------------------------------------
    def _new_member(self, state: State) -> Member:
        m = Member(
            f"starting-{next(self._keys)}",
            state,
            self._generation,
            started_mono=time.monotonic(),
        )
        self._members[m.key] = m
        return m

    def _make_sandbox(self, generation: int) -> PooledSandbox:
        if self.mode is Mode.TEMPLATE:
            template = self._template
            assert template is not None
            try:
                sb = PooledSandbox.clone(template, 1)[0]
            except SnapshotError as exc:
                # the template went stale (QEMU upgrade, root disk rebuilt): make a new one
                self._event("Warning", "TemplateStale", str(exc).splitlines()[0][:300])
                sb = PooledSandbox.clone(self._fresh_template(template), 1)[0]
        else:
            sb = PooledSandbox.create(tier=self.spec.tier, spec=self.spec.sandbox)
        assert isinstance(sb, PooledSandbox)
        return sb

    def _fresh_template(self, stale: SnapshotRef) -> SnapshotRef:
        """Replace a stale template once, however many starts found it stale."""
        with self._template_lock:
            if self._template is stale:
                fresh = self._build_template(self.spec)
                with self._lock:
                    self._template = fresh
                    self._changed()
                _discard_snapshot(stale)
            template = self._template
        assert template is not None
        return template

    def _start_member(self, m: Member, *, first: bool = False) -> None:
        """Make a member ready (runs in a worker thread, or in ``__init__``
        for the ``first`` one, where a failure is the caller's error)."""
        sb: PooledSandbox | None = None
        try:
            sb = self._make_sandbox(m.generation)
            if self.spec.warmup and self._waiting == 0:
                # a claim waiting for this member gets it at once instead
                sb.run(list(self.spec.warmup), timeout_s=60)
            _annotate(sb, self.name)
        except BaseException as exc:
            if sb is not None:
                with contextlib.suppress(Exception):
                    sb.close()
            with self._lock:
                self._members.pop(m.key, None)
                self._failures += 1
                self._backoff_until = time.monotonic() + min(
                    _MAX_BACKOFF_S, 0.5 * 2 ** (self._failures - 1)
                )
                self._last_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                self._event("Warning", "FailedCreate", self._last_error)
                self._cond.notify_all()
            if first or not isinstance(exc, Exception):
                raise  # the first member: the pool cannot be made
            return
        with self._lock:
            if self._closed or m.key not in self._members:
                closed = True
                self._members.pop(m.key, None)
                self._cond.notify_all()
            else:
                closed = False
                del self._members[m.key]
                m.key = sb.id
                m.sb = sb
                m.state = State.READY
                m.ready_mono = time.monotonic()
                self._members[m.key] = m
                sb._pool = self
                self._failures = 0
                self._last_error = ""
                self._cond.notify_all()
        if closed:
            sb.close()
        self._wake.set()

    def _member_closed(self, sb: PooledSandbox) -> None:
        """A claimed member was closed by its claimer: gone for good."""
        with self._lock:
            self._members.pop(sb.id, None)
            self._cond.notify_all()
        self._wake.set()

    def _evict(self, m: Member, reason: str, message: str) -> None:
        """Remove a ready member (caller holds the lock); closed off the lock."""
        m.state = State.EVICTING
        self._event("Normal", reason, message)

        def _go() -> None:
            sb = m.sb
            if sb is not None:
                sb._pool = None
                with contextlib.suppress(Exception):
                    sb.close()
            with self._lock:
                self._members.pop(m.key, None)
                self._cond.notify_all()
            self._wake.set()

        threading.Thread(target=_go, name=f"tierbox-pool-evict-{m.key}", daemon=True).start()

    # ---- claims ----------------------------------------------------------------------
    def claim(self, timeout_s: float | None = None) -> PooledSandbox:
        """A ready sandbox, yours alone until you close it. Waits up to
        ``timeout_s`` (the pool's ``claim_timeout_s`` by default) when every
        member is claimed, then raises PoolExhaustedError."""
        timeout = self.spec.claim_timeout_s if timeout_s is None else float(timeout_s)
        t0 = time.monotonic()
        deadline = t0 + timeout
        with self._lock:
            self._check_open()
            self._claims.append(t0)
            self._claims_total += 1
        while True:
            m, waited = self._take(deadline, t0)
            if m is None:  # on-demand tiers: create it now
                try:
                    sb = self._make_sandbox(self._generation)
                    _annotate(sb, self.name)
                except BaseException:
                    with self._lock:
                        self._on_demand_starting -= 1
                        self._cond.notify_all()
                    raise
                with self._lock:
                    self._on_demand_starting -= 1
                    member = Member(sb.id, State.CLAIMED, self._generation, sb=sb)
                    self._members[sb.id] = member
                    sb._pool = self
                break
            held = m.sb
            assert held is not None
            sb = held
            if not sb.instance.alive():
                # it died while ready: never handed out
                with self._lock:
                    self._drop_dead(m)
                continue
            break
        sb.warm = not waited
        sb.claim_wait_s = time.monotonic() - t0
        self._wake.set()
        return sb

    def _take(self, deadline: float, t0: float) -> tuple[Member | None, bool]:
        """Pick a ready member (or reserve an on-demand slot), waiting."""
        waited = False
        with self._cond:
            self._waiting += 1
            try:
                while True:
                    self._check_open()
                    if self.mode is Mode.ON_DEMAND:
                        if (
                            not self._draining
                            and self._claimed() + self._on_demand_starting < self.spec.max_size
                        ):
                            self._on_demand_starting += 1
                            if self._suspended:
                                self._resume_locked("claimed while scaled to zero")
                            return None, waited
                    else:
                        m = self._pick_ready()
                        if m is not None:
                            m.state = State.CLAIMED
                            return m, waited
                    if self._draining:
                        raise PoolExhaustedError(
                            f"pool {self.name} is draining: it has no ready member to hand "
                            "out and starts none (`tierbox pool scale` resumes it)"
                        )
                    if self._suspended:
                        self._resume_locked("claimed while scaled to zero")
                    waited = True
                    self._size = max(self._size, self._floor(self._size))
                    self._wake.set()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise PoolExhaustedError(self._exhausted(time.monotonic() - t0))
                    self._cond.wait(min(remaining, 1.0))
            finally:
                self._waiting -= 1

    def _pick_ready(self) -> Member | None:
        """The oldest ready member of the newest generation (old ones only
        while a rollout has not replaced them)."""
        best: Member | None = None
        for m in self._members.values():
            if m.state is not State.READY:
                continue
            if (
                best is None
                or m.generation > best.generation
                or (m.generation == best.generation and m.ready_mono < best.ready_mono)
            ):
                best = m
        return best

    def _exhausted(self, waited_s: float) -> str:
        counts = self._counts()
        why = (
            f"all {counts['claimed']} members are claimed and the pool is at max_size="
            f"{self.spec.max_size}"
            if counts["claimed"] >= self.spec.max_size
            else f"{counts['starting']} members are starting"
        )
        if self._last_error:
            why += f"; the last start failed: {self._last_error}"
        return (
            f"pool {self.name}: no member came free in {waited_s:.1f} s: {why} "
            "(close claimed sandboxes, raise max_size, or claim with a longer timeout)"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosedError(f"pool {self.name} is closed")

    def _drop_dead(self, m: Member) -> None:
        """A member whose init or VMM is gone: cleaned up, never handed out."""
        self._members.pop(m.key, None)
        self._event("Warning", "MemberDied", f"member {m.key} died while ready; replacing it")
        sb = m.sb
        if sb is not None:
            sb._pool = None
            threading.Thread(target=_quiet_close, args=(sb,), daemon=True).start()
        self._wake.set()

    # ---- size, autoscaling, convergence ------------------------------------------------
    def _claimed(self) -> int:
        return sum(1 for m in self._members.values() if m.state is State.CLAIMED)

    def _counts(self) -> dict[str, int]:
        c = collections.Counter(m.state.value for m in self._members.values())
        return {s.value: c.get(s.value, 0) for s in State}

    def _floor(self, size: int) -> int:
        """The size the pool needs now: what the autoscaler asks, but at least
        ``min_ready`` ready beside the claimed and waiting, at most max_size."""
        if self._suspended:
            want = self._claimed() + self._waiting
        else:
            want = max(size, self._claimed() + self.spec.min_ready + self._waiting)
        return min(self.spec.max_size, want)

    def _run(self) -> None:
        next_sync = time.monotonic()
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_sync:
                    next_sync = time.monotonic() + self.spec.sync_period_s
                    self._sync()
                self._converge()
            except Exception as exc:  # the loop must outlive one bad pass
                self._last_error = f"{type(exc).__name__}: {exc}"[:500]
                self._event("Warning", "ReconcileFailed", self._last_error)
            self._wake.wait(max(0.005, min(next_sync - time.monotonic(), 1.0)))
            self._wake.clear()

    def _sync(self) -> None:
        """One autoscaler loop, the liveness of ready members, the image."""
        now = time.time()
        dead = [m for m in list(self._members.values()) if _died(m)]
        with self._lock:
            for m in dead:
                if m.state is State.READY:
                    self._drop_dead(m)
        self._check_image()
        with self._lock:
            if self._closed or self._draining or self._suspended:
                return
            decision = self._hpa.reconcile(now, self._observe(now))
            if decision.rescale:
                self._event(
                    "Normal",
                    "SuccessfulRescale",
                    f"New size: {decision.desired_replicas}; reason: {decision.rescale_reason}",
                )
            self._size = self._floor(decision.desired_replicas)
            self._changed(history_only=True)

    def _observe(self, now: float) -> Observation:
        """The pool as the HPA sees it: its size, members as pods, its claim rate."""
        cutoff = time.monotonic() - self.spec.rate_window_s
        while self._claims and self._claims[0] < cutoff:
            self._claims.popleft()
        rate_milli = round(len(self._claims) * 1000 / self.spec.rate_window_s)
        pods: list[PodSample] = []
        members = list(self._members.values())
        if self.mode is Mode.ON_DEMAND:
            # nothing is held between claims: the size beyond the claimed is ready capacity
            spare = max(0, self._size - self._claimed())
            members += [Member(f"capacity-{i}", State.READY, 0) for i in range(spare)]
        for m in members:
            pods.append(
                PodSample(
                    name=m.key,
                    phase=PodPhase.PENDING if m.state is State.STARTING else PodPhase.RUNNING,
                    deleting=m.state is State.EVICTING,
                    request_milli={UTILIZATION_KEY: _REQUEST},
                    usage_milli={
                        UTILIZATION_KEY: _REQUEST if m.state is State.CLAIMED else 0,
                    },
                )
            )
        return Observation(
            current_replicas=self._size,
            pods=tuple(pods),
            values_milli={RATE_KEY: rate_milli},
            status_replicas=sum(1 for m in members if m.state is not State.EVICTING),
        )

    def _converge(self) -> None:
        """Start or evict members toward the size, within max_size and the
        budget. During a rollout one extra new member is started (when
        max_size leaves room) before an old ready one goes."""
        starts: list[Member] = []
        with self._lock:
            if self._closed:
                return
            if not self._draining:
                self._size = self._floor(self._size)
            if self.mode is Mode.ON_DEMAND:
                return
            counts = self._counts()
            healthy = counts["ready"] + counts["claimed"]
            if self._draining:
                self._drain_step(healthy)
                return
            total = healthy + counts["starting"]
            old_ready = [
                m
                for m in self._members.values()
                if m.state is State.READY and m.generation < self._generation
            ]
            target = min(self.spec.max_size, self._size + (1 if old_ready else 0))
            self._blocked = ""
            room = min(target - total, self.spec.parallel_starts - counts["starting"])
            if room > 0 and time.monotonic() >= self._backoff_until:
                starts = [self._new_member(State.STARTING) for _ in range(room)]
            elif room > 0 and self._last_error:
                self._blocked = f"waiting to retry a failed start: {self._last_error}"
            budget = self.spec.budget
            # rollout: an old ready member goes once a new one took its place,
            # or at once when max_size leaves no room for one
            for m in sorted(old_ready, key=lambda x: x.generation):
                if not (healthy > self._size or total >= self.spec.max_size):
                    break
                if not budget.allows(healthy, self._size):
                    self._blocked = "rollout held: " + budget.why_not(healthy, self._size)
                    break
                self._evict(m, "Replaced", f"{m.key} replaced by generation {self._generation}")
                healthy -= 1
                total -= 1
            # shrink: ready members beyond the target go, old generations first
            spare = sorted(
                (m for m in self._members.values() if m.state is State.READY),
                key=lambda x: (x.generation, -x.ready_mono),
            )
            while total > target and spare:
                if not budget.allows(healthy, self._size):
                    self._blocked = "shrink held: " + budget.why_not(healthy, self._size)
                    break
                m = spare.pop(0)
                self._evict(m, "ScaledDown", f"{m.key} removed: size {self._size}")
                healthy -= 1
                total -= 1
        for m in starts:
            threading.Thread(
                target=self._start_member, args=(m,), name="tierbox-pool-start", daemon=True
            ).start()

    def _drain_step(self, healthy: int) -> None:
        ready = [m for m in self._members.values() if m.state is State.READY]
        self._blocked = ""
        for m in ready:
            if not self.spec.budget.allows(healthy, self._drain_expected):
                self._blocked = self.spec.budget.why_not(healthy, self._drain_expected)
                return
            self._evict(m, "Drained", f"member {m.key} evicted by a drain")
            healthy -= 1
        claimed = self._claimed()
        if claimed:
            self._blocked = f"waiting for {claimed} claimed members to be closed by their users"

    # ---- operations ------------------------------------------------------------------
    def scale(self, *, min_ready: int | None = None, max_size: int | None = None) -> None:
        """New bounds (the autoscaler's min and max); also ends a drain or a
        scale-to-zero."""
        with self._lock:
            self._check_open()
            spec = self.spec.with_changes(
                min_ready=self.spec.min_ready if min_ready is None else min_ready,
                max_size=self.spec.max_size if max_size is None else max_size,
            )
            self.spec = spec
            self._hpa.with_spec(hpa_for(spec))
            self._draining = False
            self._suspended = False
            self._size = self._floor(max(self._size, spec.min_ready))
            self._size = min(self._size, spec.max_size)
            self._event("Normal", "Scaled", f"min_ready={spec.min_ready} max_size={spec.max_size}")
            self._changed()
        self._wake.set()

    def suspend(self, reason: str = "idle") -> None:
        """Scale to zero: ready members go (within the budget), none start
        until the next claim; the autoscaler pauses (as KEDA does below
        Kubernetes' HPA)."""
        with self._lock:
            self._check_open()
            if self._suspended:
                return
            self._suspended = True
            self._size = self._floor(0)
            self._event("Normal", "ScaledToZero", reason)
        self._wake.set()

    def _resume_locked(self, reason: str) -> None:
        self._suspended = False
        self._size = self._floor(self.spec.min_ready)
        self._event("Normal", "Activated", reason)
        self._wake.set()

    @property
    def suspended(self) -> bool:
        return self._suspended

    def drain(
        self, timeout_s: float | None = None, progress: Callable[[str], None] | None = None
    ) -> None:
        """Evict every member, as ``kubectl drain`` evicts pods: ready members
        go one at a time while the disruption budget allows it, no member
        starts, claims are served by the members still ready, and claimed
        members finish with their users. Waits until the pool is empty; when
        the budget (or a claimed member) holds it past ``timeout_s``, raises
        DisruptionBudgetError (or PoolError) saying why. The pool stays
        drained until :meth:`scale`."""
        with self._lock:
            self._check_open()
            if not self._draining:
                self._draining = True
                self._drain_expected = self._size
                self._event("Normal", "Draining", f"drain started with size {self._size}")
        self._wake.set()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        said = ""
        with self._cond:
            while True:
                if not self._members:
                    self._event("Normal", "Drained", "every member is gone")
                    return
                if self._blocked and self._blocked != said and progress is not None:
                    progress(self._blocked)
                    said = self._blocked
                if deadline is not None and time.monotonic() >= deadline:
                    left = len(self._members)
                    msg = (
                        f"pool {self.name}: drain stopped after {timeout_s:g} s with {left} "
                        f"members left: {self._blocked or 'members still starting'}"
                    )
                    if "budget" in self._blocked:
                        raise DisruptionBudgetError(msg)
                    raise PoolError(msg)
                self._cond.wait(0.2)
                self._wake.set()

    @property
    def draining(self) -> bool:
        return self._draining

    def update(self, image: str | None = None, **options: Any) -> None:
        """Replace every member with ones made from a new image or options,
        rolling: one new member is started before an old ready one goes
        when max_size leaves room, and no old member goes while that would
        break the disruption budget. Claimed old members finish with their
        users."""
        with self._lock:
            self._check_open()
            base = self.spec.sandbox.to_dict()
            if image is not None:
                base["image"] = image
            limits = dict(base["limits"])
            for key in list(options):
                if key in limits:
                    limits[key] = options.pop(key)
            base["limits"] = limits
            base.update(options)
            new_sandbox = SandboxSpec.from_dict(base)
            new_spec = self.spec.with_changes(sandbox=new_sandbox)
        self._roll(new_spec, "spec changed")

    def _roll(self, new_spec: PoolSpec, why: str) -> None:
        old_template = self._template
        template = self._build_template(new_spec) if self.mode is Mode.TEMPLATE else None
        with self._lock:
            self.spec = new_spec
            if template is not None:
                self._template = template
            self._generation += 1
            self._digest = _image_digest(new_spec.image)
            self._event(
                "Normal",
                "RollingUpdate",
                f"generation {self._generation} ({why}): replacing members",
            )
            self._changed()
        if template is not None and old_template is not None:
            _discard_snapshot(old_template)
        self._wake.set()

    def _check_image(self) -> None:
        """A new image under the same name (re-imported, rebuilt) rolls the pool."""
        now = time.monotonic()
        if now < self._next_digest_check or self._draining:
            return
        self._next_digest_check = now + _DIGEST_CHECK_S
        digest = _image_digest(self.spec.image)
        if digest is not None and self._digest is not None and digest != self._digest:
            self._roll(self.spec, f"image {self.spec.image} changed to {digest[:19]}")

    def rolled_out(self) -> bool:
        """No member of an older generation is left, ready or claimed."""
        with self._lock:
            return all(m.generation == self._generation for m in self._members.values())

    # ---- reporting -------------------------------------------------------------------
    def _event(self, etype: str, reason: str, message: str) -> None:
        self._events.append(Event(time.time(), etype, reason, message))

    def _changed(self, history_only: bool = False) -> None:
        if self._on_change is not None:
            with contextlib.suppress(Exception):
                self._on_change(self)

    @property
    def last_decision(self) -> Decision | None:
        return self._hpa.last

    def history(self) -> dict[str, Any]:
        """The autoscaler's history, to be saved and given back after a restart."""
        with self._lock:
            return self._hpa.state()

    def status(self) -> dict[str, Any]:
        """Ready/claimed/desired, the autoscaler's last decision with its
        conditions, recent events: what ``tierbox pool watch`` shows."""
        with self._lock:
            counts = self._counts()
            d = self._hpa.last
            cutoff = time.monotonic() - self.spec.rate_window_s
            rate = sum(1 for t in self._claims if t >= cutoff) / self.spec.rate_window_s
            healthy = counts["ready"] + counts["claimed"]
            ready = counts["ready"]
            if self.mode is Mode.ON_DEMAND:
                ready = max(0, self._size - counts["claimed"])
            return {
                "name": self.name,
                "tier": self.spec.tier,
                "image": self.spec.image,
                "mode": self.mode.value,
                "generation": self._generation,
                "ready": ready,
                "claimed": counts["claimed"],
                "starting": counts["starting"],
                "evicting": counts["evicting"],
                "desired": self._size,
                "min_ready": self.spec.min_ready,
                "max_size": self.spec.max_size,
                "metric": self.spec.metric.value,
                "target": self.spec.target,
                "claims_per_second": round(rate, 3),
                "claims_total": self._claims_total,
                "utilization_percent": (
                    round(100 * counts["claimed"] / (healthy or 1))
                    if self.mode is not Mode.ON_DEMAND
                    else round(100 * counts["claimed"] / (self._size or 1))
                ),
                "budget": self.spec.budget.describe(),
                "draining": self._draining,
                "scaled_to_zero": self._suspended,
                "blocked": self._blocked,
                "last_error": self._last_error,
                "template": self._template.path if self._template is not None else None,
                "decision": d.to_dict() if d is not None else None,
                "events": [e.to_dict() for e in self._events],
            }

    # ---- teardown --------------------------------------------------------------------
    def close(self, *, discard_template: bool = True) -> None:
        """Stop the pool: ready and starting members are destroyed; claimed
        ones stay with their claimers (destroyed when they close them).
        ``discard_template`` False keeps a microVM template for a process
        that will host the pool again."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            self._wake.set()
            self._cond.notify_all()
            ready = [m for m in self._members.values() if m.state is State.READY]
            for m in ready:
                self._members.pop(m.key, None)
        for m in ready:
            if m.sb is not None:
                m.sb._pool = None
                _quiet_close(m.sb)
        deadline = time.monotonic() + 60
        with self._cond:
            # members still starting close themselves when they find the pool closed
            while any(m.state is State.STARTING for m in self._members.values()):
                if time.monotonic() > deadline:
                    break
                self._cond.wait(0.2)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        _pools.discard(self)
        if discard_template and self._template is not None:
            _discard_snapshot(self._template)
            self._template = None

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self._counts()
        return (
            f"<Pool {self.name} tier={self.spec.tier} image={self.spec.image} "
            f"ready={c['ready']} claimed={c['claimed']} size={self._size}>"
        )


def _died(m: Member) -> bool:
    """A ready member whose init or VMM is gone."""
    return m.state is State.READY and m.sb is not None and not m.sb.instance.alive()


def _quiet_close(sb: Sandbox) -> None:
    """Close a sandbox nobody waits on (gc reaps what a failed close leaves)."""
    with contextlib.suppress(Exception):
        sb.close()


def _annotate(sb: Sandbox, pool: str) -> None:
    """Mark the sandbox's record as a member of ``pool`` (``sandbox ls``,
    ``gc`` and a restarted pool host read it)."""
    with contextlib.suppress(OSError, TierboxError):
        record = _state.read_state(sb.id)
        record["pool"] = pool
        _state.write_state(sb.id, record)


def _image_digest(image: str | None) -> str | None:
    """The store's digest for ``image`` (None for images the store does not
    hold under that name, such as a wasm tier's aliases)."""
    if not image:
        return None
    try:
        from tierbox.images.store import default_store

        return str(default_store().resolve(image).manifest_digest)
    except (ImageNotFoundError, TierboxError, OSError, ValueError):
        return None


def _discard_snapshot(snap: SnapshotRef) -> None:
    """Remove a template snapshot nobody will restore again."""
    path = Path(snap.path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
