"""Named pools and functions hosted by one process, kept on disk.

:class:`PoolManager` is what a long-lived process hosts: the pool manager
the CLI starts (``python -m tierbox.pools``, reached through
:mod:`tierbox.pools.server`), or a daemon later. Everything a pool is asked
to be (its spec, its microVM template, its autoscaler's history) is saved
under :func:`tierbox.pools.store.home`, so a pool survives a restart of the
process that hosts it: the next one loads it, closes the members the dead
one left, and refills it (a template makes that a restore, not a boot).

A function (``tierbox fn deploy``) is a command run on a claimed member of
its own pool (``fn-NAME``), the invocation's data on its stdin; the member
is destroyed afterwards. After ``idle_s`` without an invocation the pool is
scaled to zero (KEDA-style: the HPA works between 1 and N, the activation
from 0 is the claim itself); the next invocation is cold, and says so.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tierbox.errors import (
    FunctionNotFoundError,
    PoolExistsError,
    PoolNotFoundError,
    TierboxError,
    UsageError,
)
from tierbox.pools import store
from tierbox.pools.pool import Pool
from tierbox.pools.spec import PoolSpec, check_name
from tierbox.sandbox import Sandbox
from tierbox.spec import ExecResult, check_timeout_s
from tierbox.tiers import SnapshotRef, _state

#: function pools are named after their function
FUNCTION_POOL_PREFIX = "fn-"
#: autoscaler history is saved at most this often per pool
_SAVE_EVERY_S = 5.0


@dataclass(frozen=True)
class FunctionSpec:
    """A function: ``argv`` run on a member of pool ``fn-NAME``."""

    name: str
    argv: tuple[str, ...]
    #: scale the pool to zero after this long without an invocation
    idle_s: float = 300.0
    #: each invocation's wall-clock limit
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        check_name(self.name, "function")
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise UsageError("a function needs a command: give it after --, like -- cat")
        check_timeout_s(self.idle_s, "idle_s")
        check_timeout_s(self.timeout_s, "timeout_s")

    @property
    def pool_name(self) -> str:
        return FUNCTION_POOL_PREFIX + self.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "argv": list(self.argv),
            "idle_s": self.idle_s,
            "timeout_s": self.timeout_s,
            "pool": self.pool_name,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FunctionSpec:
        return cls(
            name=data["name"],
            argv=tuple(data["argv"]),
            idle_s=float(data.get("idle_s", 300.0)),
            timeout_s=float(data.get("timeout_s", 60.0)),
        )


@dataclass(frozen=True)
class Invocation:
    """One function call: its result, and whether a ready member served it."""

    function: str
    warm: bool
    claim_s: float
    run_s: float
    sandbox_id: str
    result: ExecResult

    def to_dict(self) -> dict[str, Any]:
        return {
            "function": self.function,
            "warm": self.warm,
            "start": "warm" if self.warm else "cold",
            "claim_s": round(self.claim_s, 6),
            "run_s": round(self.run_s, 6),
            "sandbox_id": self.sandbox_id,
            "result": self.result.to_dict(),
        }


class PoolManager:
    """Pools and functions by name, saved on disk, for one hosting process."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pools: dict[str, Pool] = {}
        self._broken: dict[str, str] = {}
        self._functions: dict[str, FunctionSpec] = {}
        self._last_call: dict[str, float] = {}
        self._saved_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._watcher = threading.Thread(
            target=self._watch, name="tierbox-pool-manager", daemon=True
        )
        self._watcher.start()

    # ---- loading ---------------------------------------------------------------------
    def load(self) -> None:
        """Bring back every saved pool and function. A pool that cannot come
        back (its image was removed) stays defined and is listed with why."""
        names = set()
        for record in store.records("pools"):
            with contextlib.suppress(KeyError, ValueError, TypeError, TierboxError):
                names.add(PoolSpec.from_dict(record["spec"]).name)
        self._close_leftover_members(names)
        for record in store.records("pools"):
            try:
                spec = PoolSpec.from_dict(record["spec"])
            except (KeyError, ValueError, TypeError, TierboxError) as exc:
                self._broken[str(record.get("spec", {}).get("name", "?"))] = str(exc)
                continue
            template = record.get("template")
            try:
                pool = Pool(
                    spec=spec,
                    history=record.get("history"),
                    template=SnapshotRef(**template) if template else None,
                    on_change=self._pool_changed,
                )
            except TierboxError as exc:
                self._broken[spec.name] = f"{type(exc).__name__}: {exc}"
                continue
            with self._lock:
                self._pools[spec.name] = pool
        for record in store.records("functions"):
            with contextlib.suppress(KeyError, ValueError, TypeError, TierboxError):
                fn = FunctionSpec.from_dict(record)
                with self._lock:
                    self._functions[fn.name] = fn
                    self._last_call[fn.name] = time.monotonic()

    @staticmethod
    def _close_leftover_members(names: set[str]) -> None:
        """Members a previous host left (it was killed): close them, so the
        pool starts clean. What cannot be reattached is left to ``tierbox gc``."""
        for record in _state.list_states():
            if record.get("pool") not in names or _state.is_live(str(record.get("id"))):
                continue
            with contextlib.suppress(Exception):
                Sandbox.connect(str(record["id"])).close()

    # ---- pools -----------------------------------------------------------------------
    def _pool_changed(self, pool: Pool) -> None:
        """Save a pool's record: at once for spec and template changes, at
        most every few seconds for the autoscaler's history."""
        now = time.monotonic()
        with self._lock:
            if self._pools.get(pool.name) is not pool:
                return
            if now - self._saved_at.get(pool.name, 0.0) < _SAVE_EVERY_S:
                return
            self._saved_at[pool.name] = now
        self._save_pool(pool)

    def _save_pool(self, pool: Pool) -> None:
        template = pool.template
        store.write(
            store.pool_file(pool.name),
            {
                "spec": pool.spec.to_dict(),
                "template": None
                if template is None
                else {"tier": template.tier, "path": template.path, "meta": template.meta},
                "history": pool.history(),
                "saved_unix": time.time(),
            },
        )

    def create_pool(self, spec: PoolSpec) -> dict[str, Any]:
        """Start a pool and save it; errors (missing image, unavailable tier)
        come from its first member or template."""
        with self._lock:
            if spec.name in self._pools or spec.name in self._broken:
                raise PoolExistsError(
                    f"pool {spec.name} exists: `tierbox pool rm {spec.name}` first"
                )
        pool = Pool(spec=spec, on_change=self._pool_changed)
        with self._lock:
            if spec.name in self._pools:
                pool.close()
                raise PoolExistsError(f"pool {spec.name} exists")
            self._pools[spec.name] = pool
        self._save_pool(pool)
        return pool.status()

    def pool(self, name: str) -> Pool:
        with self._lock:
            pool = self._pools.get(name)
            if pool is None:
                if name in self._broken:
                    raise PoolNotFoundError(f"pool {name} could not start: {self._broken[name]}")
                known = ", ".join(sorted(self._pools)) or "none"
                raise PoolNotFoundError(f"no pool {name!r} (pools: {known})")
            return pool

    def statuses(self) -> list[dict[str, Any]]:
        with self._lock:
            pools = dict(self._pools)
            broken = dict(self._broken)
            owners = {fn.pool_name: fn.name for fn in self._functions.values()}
        out = []
        for name, pool in sorted(pools.items()):
            st = pool.status()
            st["function"] = owners.get(name)
            out.append(st)
        for name, why in sorted(broken.items()):
            out.append({"name": name, "error": why, "function": owners.get(name)})
        return out

    def status(self, name: str) -> dict[str, Any]:
        st = self.pool(name).status()
        with self._lock:
            st["function"] = next(
                (f.name for f in self._functions.values() if f.pool_name == name), None
            )
        return st

    def scale(
        self, name: str, *, min_ready: int | None = None, max_size: int | None = None
    ) -> dict[str, Any]:
        pool = self.pool(name)
        pool.scale(min_ready=min_ready, max_size=max_size)
        self._save_pool(pool)
        return pool.status()

    def drain(
        self,
        name: str,
        timeout_s: float | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        pool = self.pool(name)
        pool.drain(timeout_s=timeout_s, progress=progress)
        return pool.status()

    def update(self, name: str, image: str | None = None, **options: Any) -> dict[str, Any]:
        pool = self.pool(name)
        pool.update(image=image, **options)
        self._save_pool(pool)
        return pool.status()

    def remove_pool(self, name: str, *, by_function: bool = False) -> None:
        """Stop a pool (its ready members are destroyed, its template
        removed) and forget it."""
        with self._lock:
            owner = next((f for f in self._functions.values() if f.pool_name == name), None)
            if owner is not None and not by_function:
                raise UsageError(
                    f"pool {name} belongs to function {owner.name}: `tierbox fn rm {owner.name}`"
                )
            pool = self._pools.pop(name, None)
            broken = self._broken.pop(name, None)
        if pool is None and broken is None:
            self.pool(name)  # raises PoolNotFoundError
        if pool is not None:
            pool.close()
        store.remove(store.pool_file(name))

    # ---- functions -------------------------------------------------------------------
    def deploy(self, fn: FunctionSpec, pool_spec: PoolSpec) -> dict[str, Any]:
        """A function and its pool (named ``fn-NAME``); a new deploy of the
        same name replaces the command and rolls the pool onto the new image."""
        if pool_spec.name != fn.pool_name:
            raise UsageError(f"function {fn.name}'s pool is {fn.pool_name}, not {pool_spec.name}")
        with self._lock:
            existing = self._pools.get(fn.pool_name)
        if existing is None:
            self.create_pool(pool_spec)
        else:
            if existing.spec.tier != pool_spec.tier:
                raise UsageError(
                    f"function {fn.name} runs on {existing.spec.tier}: remove it to change tiers"
                )
            existing.scale(min_ready=pool_spec.min_ready, max_size=pool_spec.max_size)
            if existing.spec.sandbox != pool_spec.sandbox:
                existing.update(image=pool_spec.image, **_options(pool_spec))
            self._save_pool(existing)
        with self._lock:
            self._functions[fn.name] = fn
            self._last_call[fn.name] = time.monotonic()
        store.write(store.function_file(fn.name), fn.to_dict())
        return self.function_status(fn.name)

    def function(self, name: str) -> FunctionSpec:
        with self._lock:
            fn = self._functions.get(name)
            if fn is None:
                known = ", ".join(sorted(self._functions)) or "none"
                raise FunctionNotFoundError(f"no function {name!r} (functions: {known})")
            return fn

    def function_status(self, name: str) -> dict[str, Any]:
        fn = self.function(name)
        with self._lock:
            idle = time.monotonic() - self._last_call.get(name, time.monotonic())
        st: dict[str, Any] = {**fn.to_dict(), "idle_for_s": round(idle, 1)}
        try:
            pool = self.pool(fn.pool_name).status()
            st.update(
                image=pool["image"],
                tier=pool["tier"],
                ready=pool["ready"],
                claimed=pool["claimed"],
                scaled_to_zero=pool["scaled_to_zero"],
            )
        except PoolNotFoundError as exc:
            st["error"] = str(exc)
        return st

    def functions(self) -> list[dict[str, Any]]:
        with self._lock:
            names = sorted(self._functions)
        return [self.function_status(n) for n in names]

    def invoke(
        self, name: str, data: bytes | None = None, timeout_s: float | None = None
    ) -> Invocation:
        """Run the function once on a pooled sandbox (destroyed afterwards)."""
        fn = self.function(name)
        pool = self.pool(fn.pool_name)
        with self._lock:
            self._last_call[name] = time.monotonic()
        t0 = time.monotonic()
        sb = pool.claim()
        claimed = time.monotonic()
        try:
            result = sb.run(list(fn.argv), stdin=data, timeout_s=timeout_s or fn.timeout_s)
        finally:
            sb.close()
            with self._lock:
                self._last_call[name] = time.monotonic()
        return Invocation(
            function=name,
            warm=sb.warm,
            claim_s=claimed - t0,
            run_s=time.monotonic() - claimed,
            sandbox_id=sb.id,
            result=result,
        )

    def remove_function(self, name: str) -> None:
        fn = self.function(name)
        with self._lock:
            self._functions.pop(name, None)
            self._last_call.pop(name, None)
        store.remove(store.function_file(name))
        with contextlib.suppress(PoolNotFoundError):
            self.remove_pool(fn.pool_name, by_function=True)

    def _watch(self) -> None:
        """Scale idle functions to zero."""
        while not self._stop.wait(0.25):
            with self._lock:
                fns = list(self._functions.values())
                last = dict(self._last_call)
                pools = dict(self._pools)
            now = time.monotonic()
            for fn in fns:
                pool = pools.get(fn.pool_name)
                idle = now - last.get(fn.name, now)
                if pool is None or pool.suspended or idle < fn.idle_s:
                    continue
                with contextlib.suppress(TierboxError):
                    pool.suspend(f"no invocation of function {fn.name} for {idle:.0f} s")

    # ---- lifetime --------------------------------------------------------------------
    def empty(self) -> bool:
        with self._lock:
            return not self._pools and not self._broken and not self._functions

    def close(self) -> None:
        """Stop hosting: pools are saved and closed, their templates kept for
        the next host."""
        self._stop.set()
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            with contextlib.suppress(Exception):
                self._save_pool(pool)
            pool.close(discard_template=False)


def _options(spec: PoolSpec) -> dict[str, Any]:
    """A pool spec's sandbox options, as Pool.update takes them."""
    d = spec.sandbox.to_dict()
    out: dict[str, Any] = dict(d["limits"])
    out.update(env=d["env"], user=d["user"], workdir=d["workdir"], network=d["network"])
    return out


def function_pool_spec(
    fn_name: str,
    image: str | None,
    *,
    tier: str,
    min_ready: int = 1,
    max_size: int = 4,
    warmup: Sequence[str] | None = ("true",),
    **options: Any,
) -> PoolSpec:
    """The pool a function runs on."""
    return PoolSpec.build(
        FUNCTION_POOL_PREFIX + fn_name,
        image,
        tier=tier,
        min_ready=min_ready,
        max_size=max_size,
        warmup=warmup,
        **options,
    )
