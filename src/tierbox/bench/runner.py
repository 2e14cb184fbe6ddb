"""Runs the bench: the same workloads on every tier, phase by phase.

Per tier, in this order (each phase fails on its own; the next one runs):

1. cold start - create a sandbox, run the workload, first result; warm-up
   runs discarded, then N timed runs (create and first exec timed apart). The
   last sandbox of the first workload stays up as the *resident* sandbox.
2. exec latency - the workload again and again in the resident sandbox.
3. isolation probes (:mod:`tierbox.bench.probes`) in the resident sandbox.
4. memory and density - idle instances added one at a time next to the
   resident one; PSS measured at 1, 10, 50 (and more where instances are
   light) until the memory budget, the count cap, the time cap or the host's
   own free memory stops it.
5. warm start - ``snapshot()`` of the resident sandbox, then
   ``Sandbox.restore`` -> first result, N times; "n/a" with the tier's own
   reason where it cannot snapshot.
6. memory bomb in the resident sandbox (last: on some tiers the whole
   sandbox dies with it).

Every sandbox is closed in ``finally``; Ctrl-C (KeyboardInterrupt) propagates
once everything is closed. A tier that raises is reported as failed with its
error and the bench goes on with the next one.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from tierbox import paths
from tierbox.bench import probes as pr
from tierbox.bench.machine import engine_facts, machine_facts, meminfo
from tierbox.bench.memory import (
    heap_in_use_bytes,
    sandbox_pids,
    self_rss_bytes,
    self_vm_bytes,
    total_pss,
)
from tierbox.bench.stats import summarize_ms
from tierbox.bench.workloads import WORKLOADS, NotRun, Target, base_image, target
from tierbox.errors import BenchError, NotSupportedError, ProbeBuildError, UnknownTierError
from tierbox.sandbox import Sandbox
from tierbox.spec import MIB, ExecResult
from tierbox.tiers import get_tier, tier_names
from tierbox.tiers.base import SnapshotKind

GIB = 1 << 30
SCHEMA = "tierbox-bench/1"
#: Guest RAM / memory limit per tier; a full VM's kernel needs more.
DEFAULT_MEMORY_MIB = {"vm": 256}
#: Tiers that create an instance faster than this count as light: more instances.
LIGHT_CREATE_S = 0.02
#: x86-64 user address space (47 bits): bounds in-process Wasm instances.
ADDRESS_SPACE_BYTES = 1 << 47


@dataclass
class BenchConfig:
    """How much to measure. ``BenchConfig.quick()`` fits in about two minutes here."""

    tiers: list[str] | None = None  # None: every tier (unavailable ones are listed as such)
    workloads: tuple[str, ...] = WORKLOADS
    runs: int = 20  # timed cold starts per workload (after warm-up)
    warmup: int = 3  # discarded runs before timing
    exec_runs: int = 50
    warm_runs: int = 10
    instances: tuple[int, ...] = (10, 50)  # memory checkpoints besides 1
    budget_bytes: int = 2 * GIB  # density: idle instances that fit in this much memory
    density_cap: int = 400  # most instances density creates (x10 for light tiers)
    density_time_s: float = 180.0
    phase_time_s: float = 60.0  # soft time cap of each timed loop (at least one sample)
    deadline_s: float | None = None  # whole bench: past it, phases shrink to the minimum
    secondary_runs: int | None = None  # cold starts of workloads after the first (None: runs)
    secondary_exec_runs: int | None = None  # exec runs of workloads after the first
    memory_mib: int | None = None  # None: 128 MiB (256 for vm)
    images: dict[str, str] = field(default_factory=dict)  # tier -> image override
    probes: bool = True
    mode: str = "full"

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        base: dict[str, Any] = {
            "runs": 5,
            "warmup": 1,
            "exec_runs": 20,
            "warm_runs": 5,
            "instances": (10, 50),
            "secondary_runs": 3,
            "secondary_exec_runs": 5,
            "density_cap": 50,
            "density_time_s": 8.0,
            "phase_time_s": 8.0,
            "deadline_s": 140.0,
            "mode": "quick",
        }
        base.update(overrides)
        return cls(**base)

    def memory_for(self, tier: str) -> int:
        return self.memory_mib or DEFAULT_MEMORY_MIB.get(tier, 128)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["workloads"] = list(self.workloads)
        d["instances"] = list(self.instances)
        return d


class Reporter(Protocol):
    """Progress sink (rich in the CLI; silent in tests)."""

    def start(self, tier: str, what: str, total: int | None) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def done(self) -> None: ...
    def note(self, text: str) -> None: ...


class SilentReporter:
    def start(self, tier: str, what: str, total: int | None) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def done(self) -> None:
        pass

    def note(self, text: str) -> None:
        pass


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while the block runs, then raise KeyboardInterrupt.

    Creating or closing a sandbox is not atomic: interrupted halfway, the
    engine has made something the bench holds no handle to (or the handle
    says "closed" while the container still runs). The wait is bounded by the
    tiers' own timeouts. Only the main thread receives signals; elsewhere
    this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        got.append(signum)

    old = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        if got:
            raise KeyboardInterrupt


def _err(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:1500]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class TierRun:
    """One tier's part of the bench; owns every sandbox it opens."""

    def __init__(
        self,
        name: str,
        cfg: BenchConfig,
        canaries: pr.HostCanaries | None,
        report: Reporter,
        started: float,
        canaries_error: str | None = None,
    ) -> None:
        self.name = name
        self.caps = get_tier(name).capabilities
        self.canaries_error = canaries_error
        self.cfg = cfg
        self.canaries = canaries
        self.report = report
        self.bench_started = started
        self.open: list[Sandbox] = []
        self._lock = threading.Lock()
        self.res: dict[str, Any] = {
            "tier": name,
            "in_process": self.caps.in_process,
            "status": "running",
            "error": None,
            "availability": {},
            "isolation_claimed": "",
            "memory_mib": cfg.memory_for(name),
            "images": {},
            "cold_start": {},
            "template_restore": {},
            "exec_latency": {},
            "warm_start": {},
            "memory": {},
            "density": {},
            "isolation": {},
            "terminations": {},
            "errors": [],
            "duration_s": None,
        }
        self.create_p50_s: float | None = None
        self.close_p50_s = 0.0

    # ---- bookkeeping ------------------------------------------------------
    def over_deadline(self) -> bool:
        d = self.cfg.deadline_s
        return d is not None and time.monotonic() - self.bench_started > d

    def phase_time(self) -> float:
        return 0.0 if self.over_deadline() else self.cfg.phase_time_s

    def tally(self, kind: str) -> None:
        t = self.res["terminations"]
        t[kind] = t.get(kind, 0) + 1

    def create(self, image: str | None) -> Sandbox:
        with held_interrupts():  # a sandbox is either registered here or never made
            sb = Sandbox.create(image, tier=self.name, memory_mib=self.cfg.memory_for(self.name))
            with self._lock:
                self.open.append(sb)
        return sb

    def restore(self, snap: Any) -> Sandbox:
        with held_interrupts():
            sb = Sandbox.restore(snap)
            with self._lock:
                self.open.append(sb)
        return sb

    def close(self, sb: Sandbox) -> None:
        with held_interrupts():  # a close cut in half would leave half a sandbox
            try:
                sb.close()
            finally:
                with self._lock:
                    if sb in self.open:
                        self.open.remove(sb)

    def close_many(self, sbs: Sequence[Sandbox]) -> list[str]:
        """Close in parallel (some engines take seconds to tear down); errors returned."""
        errors: list[str] = []

        def one(sb: Sandbox) -> None:
            try:
                self.close(sb)
            except Exception as exc:
                errors.append(_err(exc))

        if len(sbs) <= 1:
            for sb in sbs:
                one(sb)
            return errors
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(one, sbs))
        return errors

    def close_all(self) -> None:
        with self._lock:
            left = list(self.open)
        for err in self.close_many(left):
            self.res["errors"].append({"phase": "cleanup", "error": err})

    def run(self, sb: Sandbox, argv: Sequence[str], timeout_s: float | None = None) -> ExecResult:
        try:
            r = sb.run(list(argv), timeout_s=timeout_s)
        except Exception:
            self.tally("error")
            raise
        self.tally(r.termination.kind.value)
        return r

    @contextlib.contextmanager
    def phase(
        self, slot: dict[str, Any], key: str, label: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """A result dict for one phase; an exception marks it failed (and is logged)."""
        d: dict[str, Any] = {"status": "running"}
        slot[key] = d
        t0 = time.monotonic()
        try:
            yield d
            if d["status"] == "running":
                d["status"] = "ok"
        except Exception as exc:
            d["status"] = "failed"
            d["error"] = _err(exc)
            what = label or key.replace("_", " ")
            self.res["errors"].append({"phase": what, "error": d["error"]})
            self.report.note(f"{self.name}: {what} failed: {d['error'][:200]}")
        finally:
            d["elapsed_s"] = round(time.monotonic() - t0, 3)
            self.report.done()

    # ---- the tier ---------------------------------------------------------
    def bench(self) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            self._bench()
        except Exception as exc:
            self.res["status"] = "failed"
            self.res["error"] = _err(exc)
            self.res["errors"].append({"phase": "tier", "error": self.res["error"]})
        finally:
            self.close_all()
            self.res["duration_s"] = round(time.monotonic() - t0, 3)
        return self.res

    def _bench(self) -> None:
        tier = get_tier(self.name)
        avail = tier.available()
        self.res["availability"] = avail.to_dict()
        self.res["isolation_claimed"] = tier.isolation
        if not avail.available:
            self.res["status"] = "unavailable"
            self.res["error"] = avail.reason
            return
        targets: dict[str, Target | NotRun] = {
            w: target(w, self.name, self.cfg.images) for w in self.cfg.workloads
        }
        self.res["images"] = {
            w: (t.image if isinstance(t, Target) else None) for w, t in targets.items()
        }
        resident: Sandbox | None = None
        resident_target: Target | None = None
        for w, t in targets.items():
            if isinstance(t, NotRun):
                self.res["cold_start"][w] = {"status": "n/a", "reason": t.reason}
                self.res["exec_latency"][w] = {"status": "n/a", "reason": t.reason}
                continue
            keep = self.cold_start(t)
            if keep is None:
                continue
            self.exec_latency(keep, t)
            if resident is None:
                resident, resident_target = keep, t
            else:
                self.close(keep)
        self.isolation(resident, resident_target)
        resident = self.healthy(resident, resident_target)
        self.memory_density(resident, resident_target)
        resident = self.healthy(resident, resident_target)
        self.warm_start(resident, resident_target)
        resident = self.healthy(resident, resident_target)
        self.bomb(resident, resident_target)
        iso = self.res["isolation"]
        if iso.get("probes"):
            iso["summary"] = pr.summarize(iso["probes"])
        ok = [
            v
            for k in ("cold_start", "exec_latency")
            for v in self.res[k].values()
            if v.get("status") == "ok"
        ]
        failed = [e for e in self.res["errors"] if e["phase"] != "cleanup"]
        if not ok:
            self.res["status"] = "failed"
            self.res["error"] = failed[0]["error"] if failed else "no workload could run"
        else:
            self.res["status"] = "partial" if failed else "ok"

    def healthy(self, resident: Sandbox | None, t: Target | None) -> Sandbox | None:
        """The resident sandbox if it still answers; else a fresh one (the death
        is recorded), or None when no new one can be made."""
        if resident is None or t is None:
            return resident
        try:
            r = self.run(resident, t.argv, timeout_s=60)
            if r.ok and t.ok(r.stdout):
                return resident
            why = r.termination.describe()
        except Exception as exc:
            why = _err(exc)
        self.res["errors"].append({"phase": "resident sandbox", "error": f"it died: {why}"})
        self.report.note(f"{self.name}: the resident sandbox died ({why[:160]}); replacing it")
        with contextlib.suppress(Exception):  # best effort: it died already; it is replaced
            self.close(resident)
        try:
            return self.create(t.image)
        except Exception as exc:
            self.res["errors"].append({"phase": "resident sandbox", "error": _err(exc)})
            return None

    # ---- 1. cold start ----------------------------------------------------
    def cold_start(self, t: Target) -> Sandbox | None:
        """Time create -> first result; return the last sandbox (still open)."""
        kept: Sandbox | None = None
        cfg = self.cfg
        with self.phase(self.res["cold_start"], t.workload, f"cold start ({t.workload})") as d:
            warmup = 0 if self.over_deadline() else cfg.warmup
            runs = cfg.runs
            if t.workload != cfg.workloads[0] and cfg.secondary_runs is not None:
                runs = min(runs, cfg.secondary_runs)
            planned = warmup + max(1, runs if not self.over_deadline() else 1)
            d.update(image=t.image, argv=list(t.argv), planned_runs=planned - warmup)
            self.report.start(self.name, f"cold start ({t.workload})", planned)
            totals: list[float] = []
            creates: list[float] = []
            firsts: list[float] = []
            closes: list[float] = []
            kinds: list[str] = []
            failures: list[str] = []
            deadline = time.monotonic() + self.phase_time()
            i = 0
            while i < planned:
                t0 = time.perf_counter()
                sb = self.create(t.image)
                t1 = time.perf_counter()
                try:
                    r = self.run(sb, t.argv, timeout_s=120)
                except Exception as exc:
                    self.close(sb)
                    failures.append(_err(exc))
                    if i == 0 or len(failures) * 2 > planned:
                        raise
                    i += 1
                    continue
                t2 = time.perf_counter()
                good = r.ok and t.ok(r.stdout)
                if not good:
                    failures.append(
                        f"run {i + 1}: {r.termination.describe()}: "
                        f"{(r.stderr or r.stdout).decode(errors='replace').strip()[:300]}"
                    )
                elif i >= warmup:
                    totals.append(t2 - t0)
                    creates.append(t1 - t0)
                    firsts.append(t2 - t1)
                    kinds.append(_start_kind(sb))
                i += 1
                self.report.advance()
                more = i < planned and (time.monotonic() + (t2 - t0) < deadline or len(totals) < 1)
                if not more and good and kept is None:
                    kept = sb  # the resident sandbox for the next phases
                    break
                c0 = time.perf_counter()
                self.close(sb)
                closes.append(time.perf_counter() - c0)
                if not more:
                    break
            d.update(summarize_ms(totals, warmup=min(warmup, i)))
            d["create_ms"] = summarize_ms(creates)
            d["first_exec_ms"] = summarize_ms(firsts)
            d["close_ms"] = summarize_ms(closes)
            d["failures"] = failures
            if len(totals) < d["planned_runs"]:
                d["note"] = (
                    f"{len(totals)} of {d['planned_runs']} planned runs: "
                    + ("bench deadline passed" if self.over_deadline() else "phase time cap")
                    + (f"; {len(failures)} failed" if failures else "")
                )
            if not totals:
                raise BenchError(
                    "no run printed the expected output: " + (failures[0] if failures else "?")
                )
            if t.workload == self.cfg.workloads[0] or self.create_p50_s is None:
                self.create_p50_s = d["create_ms"]["p50_ms"] / 1000.0
                if closes:
                    self.close_p50_s = d["close_ms"]["p50_ms"] / 1000.0
        if kept is not None and self.res["cold_start"][t.workload]["status"] != "ok":
            self.close(kept)
            kept = None
        if TEMPLATE in kinds and self.res["cold_start"][t.workload].get("status") == "ok":
            self._split_template_restores(t, totals, kinds)
        return kept

    def _split_template_restores(self, t: Target, totals: list[float], kinds: list[str]) -> None:
        """Creates that restored a saved template are not boots: they move to
        ``template_restore`` and the cold start is timed again with templates
        off, so "cold start" always means a boot on every tier."""
        d = self.res["cold_start"][t.workload]
        d["kind"] = TEMPLATE
        d["note"] = (d.get("note", "") + "; " if d.get("note") else "") + (
            f"{kinds.count(TEMPLATE)} of {len(kinds)} creates restored a saved template"
        )
        self.res["template_restore"][t.workload] = d
        if self.cfg.mode == "quick" and t.workload != self.cfg.workloads[0]:
            # a guest boot takes seconds under TCG: quick mode boots for the first workload only
            self.res["cold_start"][t.workload] = {
                "status": "n/a",
                "reason": "n/a: quick mode times the cold boot for the first workload only "
                "(its creates restored a template: see template restore)",
            }
            return
        with self.phase(self.res["cold_start"], t.workload, f"cold boot ({t.workload})") as c:
            most = COLD_BOOT_RUNS_QUICK if self.cfg.mode == "quick" else COLD_BOOT_RUNS
            want = 1 if self.over_deadline() else max(1, min(most, len(totals)))
            self.report.start(self.name, f"cold boot ({t.workload})", want)
            booted: list[float] = []
            creates: list[float] = []
            failures: list[str] = []
            saved = os.environ.get(TEMPLATES_ENV)
            os.environ[TEMPLATES_ENV] = "0"  # this process's creates boot (the tier's switch)
            try:
                for _ in range(want):
                    t0 = time.perf_counter()
                    sb = self.create(t.image)
                    t1 = time.perf_counter()
                    try:
                        r = self.run(sb, t.argv, timeout_s=120)
                        t2 = time.perf_counter()
                    finally:
                        self.close(sb)
                    if r.ok and t.ok(r.stdout):
                        booted.append(t2 - t0)
                        creates.append(t1 - t0)
                    else:
                        failures.append(r.termination.describe())
                    self.report.advance()
            finally:
                if saved is None:
                    os.environ.pop(TEMPLATES_ENV, None)
                else:
                    os.environ[TEMPLATES_ENV] = saved
            c.update(summarize_ms(booted))
            c["create_ms"] = summarize_ms(creates)
            c["first_exec_ms"] = summarize_ms([b - a for a, b in zip(creates, booted, strict=True)])
            c.update(kind="cold boot", image=t.image, failures=failures)
            c["note"] = "templates off: create boots the guest -> first result"
            if not booted:
                raise BenchError("no cold boot printed the expected output")

    # ---- 2. exec latency --------------------------------------------------
    def exec_latency(self, sb: Sandbox, t: Target) -> None:
        with self.phase(self.res["exec_latency"], t.workload, f"exec ({t.workload})") as d:
            warm = 2
            runs = self.cfg.exec_runs
            if t.workload != self.cfg.workloads[0] and self.cfg.secondary_exec_runs is not None:
                runs = min(runs, self.cfg.secondary_exec_runs)
            planned = warm + (runs if not self.over_deadline() else 3)
            self.report.start(self.name, f"exec latency ({t.workload})", planned)
            samples: list[float] = []
            deadline = time.monotonic() + max(self.phase_time(), 1.0)
            for i in range(planned):
                t0 = time.perf_counter()
                r = self.run(sb, t.argv, timeout_s=60)
                dt = time.perf_counter() - t0
                if not (r.ok and t.ok(r.stdout)):
                    raise BenchError(f"exec {i + 1}: {r.termination.describe()}")
                if i >= warm:
                    samples.append(dt)
                self.report.advance()
                if i >= warm and time.monotonic() > deadline:
                    d["note"] = f"{len(samples)} of {planned - warm} planned runs: phase time cap"
                    break
            d.update(summarize_ms(samples, warmup=warm))

    # ---- 3. isolation -----------------------------------------------------
    def isolation(self, resident: Sandbox | None, t: Target | None) -> None:
        iso: dict[str, Any] = self.res["isolation"]
        if not self.cfg.probes:
            iso.update(status="skipped", reason="probes disabled", probes={}, summary={})
            return
        c = self.canaries
        if c is None:
            why = f"not measured: {self.canaries_error or 'host canaries missing'}"
            iso.update(status="failed", error=why, probes=pr.not_measured(why))
            return
        self.report.start(self.name, "isolation probes", None)
        try:
            if self.caps.in_process:
                probes = self._wasi_probes(c)
            else:
                probes = self._shell_probes(c, resident, t)
            iso["status"] = "ok"
        except Exception as exc:
            err = _err(exc)
            iso["status"] = "failed"
            iso["error"] = err
            self.res["errors"].append({"phase": "isolation", "error": err})
            probes = {p: pr._probe("error", None, err, None) for p in pr.PROBES}
        finally:
            self.report.done()
        iso["probes"] = probes

    def _probe_sandbox(self, resident: Sandbox | None, t: Target | None) -> tuple[Sandbox, bool]:
        """The resident sandbox if it runs the tier's base image, else a new one."""
        base = base_image(self.name, self.cfg.images)
        if resident is not None and t is not None and t.image == base:
            return resident, False
        return self.create(base), True

    def _shell_probes(
        self, c: pr.HostCanaries, resident: Sandbox | None, t: Target | None
    ) -> dict[str, dict[str, Any]]:
        sb, own = self._probe_sandbox(resident, t)
        try:
            r = self.run(sb, ["sh", "-c", pr.shell_probe_script(c, self.name)], pr.PROBE_TIMEOUT_S)
            kv = pr.parse_kv(r.stdout)
            if kv.get("probe_done") != "1":
                raise BenchError(
                    f"probe script failed: {r.termination.describe()}: "
                    f"{r.stderr.decode(errors='replace').strip()[:400]}"
                )
            probes = pr.judge_shell(kv, c, self.name, pr.run_record(r, "sh -c <probe script>"))
            shared = probes["kernel"]["value"] == "shared"
            quick = self.cfg.mode == "quick"
            probes.update(
                pr.attack_probes(sb, self.name, self.run, kernel_shared=shared, quick=quick)
            )
            return probes
        finally:
            if own:
                self.close(sb)

    def _wasi_probes(self, c: pr.HostCanaries) -> dict[str, dict[str, Any]]:
        try:
            module = pr.wasi_probe()
        except ProbeBuildError as exc:
            return pr.not_measured(f"not measured: {exc}")
        sb = self.create(str(module))
        try:
            argv = ["probe", str(c.secret_path), *pr.host_block_devices()]
            r = self.run(sb, argv, pr.PROBE_TIMEOUT_S)
            kv = pr.parse_kv(r.stdout)
            if kv.get("probe_done") != "1":
                raise BenchError(f"WASI probe failed: {r.termination.describe()}")
            return pr.judge_wasi(kv, c, self.name, pr.run_record(r, "probe.wasm probe"))
        finally:
            self.close(sb)

    # ---- 4+5. memory and density ------------------------------------------
    def memory_density(self, resident: Sandbox | None, t: Target | None) -> None:
        if t is None or (resident is None and not self.caps.in_process):
            why = "skipped: no sandbox could be started"
            self.res["memory"] = {"status": "skipped", "reason": why}
            self.res["density"] = {"status": "skipped", "reason": why}
            return
        if self.over_deadline():
            why = "skipped: the --quick time budget was used up by earlier tiers"
            self.res["memory"] = {"status": "skipped", "reason": why}
            self.res["density"] = {"status": "skipped", "reason": why}
            return
        den: dict[str, Any] = {}
        with self.phase(self.res, "memory") as mem:
            if self.caps.in_process:
                self._fill_in_process(mem, den, t)
            else:
                assert resident is not None
                self._fill_processes(mem, den, resident, t)
        if "status" not in den:
            den = {"status": "failed", "error": self.res["memory"].get("error", "?")}
        self.res["density"] = den

    def _checkpoints(self, light: bool) -> tuple[list[int], int]:
        cap = self.cfg.density_cap * (10 if light else 1)
        points = {1, *self.cfg.instances}
        if light:
            points |= {100, 500}
        return sorted(p for p in points if p <= cap), cap

    def _fill(
        self,
        den: dict[str, Any],
        make: Callable[[], None],
        count: Callable[[], int],
        measure: Callable[[], tuple[int, dict[str, Any]]],
        checkpoints: list[int],
        cap: int,
        start_k: int,
    ) -> list[dict[str, Any]]:
        """Add instances until budget, cap, time or host memory says stop.

        ``measure()`` returns (total bytes of all instances, extra fields).
        Returns the checkpoint records; fills ``den``.
        """
        cfg = self.cfg
        budget = cfg.budget_bytes
        total_mem = meminfo().get("MemTotal", 0)
        floor = max(GIB, total_mem // 10)
        t_start = time.monotonic()
        time_cap = cfg.density_time_s
        records: list[dict[str, Any]] = []
        last: tuple[int, int] | None = None  # (k, total bytes) of the last measurement
        fit: int | None = None
        stop = ""
        bound = ""
        next_measure = 1
        self.report.start(self.name, "memory & density", cap)
        self.report.advance(start_k)

        def take(k: int, settle: bool, record: bool = False) -> int:
            if settle:
                time.sleep(0.3)
            total, extra = measure()
            if (k in checkpoints or record) and k >= 1:
                rec = {"instances": k, "total_bytes": total, "avg_bytes": total / k, **extra}
                records[:] = [r for r in records if r["instances"] != k] + [rec]
            return total

        k = count()
        if k >= 1:
            total = take(k, True)
            last = (k, total)
        while True:
            if k >= cap:
                stop, bound = f"count cap of {cap} instances reached", "cap"
                break
            teardown = (k + 1) * self.close_p50_s / 2  # closed 4 at a time on 2+ cores
            if time.monotonic() - t_start + teardown > time_cap:
                stop, bound = f"time cap of {time_cap:.0f} s reached (incl. teardown)", "time"
                break
            avail = meminfo().get("MemAvailable", 0)
            if avail and avail < floor:
                stop = f"host MemAvailable fell to {avail / GIB:.1f} GiB (floor {floor / GIB:.1f})"
                bound = "host memory"
                break
            try:
                make()
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                stop, bound = f"instance {k + 1} could not be created: {_err(exc)}", "error"
                break
            k = count()
            self.report.advance()
            if k in checkpoints or k >= next_measure:
                total = take(k, k in checkpoints)
                if total > budget:
                    fit = last[0] if last is not None and last[1] <= budget else k - 1
                    stop = (
                        f"memory budget reached: {k} instances measured "
                        f"{total / MIB:.0f} MiB > {budget / MIB:.0f} MiB"
                    )
                    bound = "budget"
                    break
                last = (k, total)
                avg = total / k if k else 0.0
                step = max(1, k // 10)
                if avg > 0 and (k + step) * avg > 0.9 * budget:
                    step = 1
                next_measure = k + step
        if fit is None:
            if last is None or last[0] != k or not records or records[-1]["instances"] != k:
                total = take(k, True, record=True)  # the most instances measured: a checkpoint
                last = (k, total)
            fit = k
        avg_last = last[1] / last[0] if last and last[0] else None
        den.update(
            status="ok",
            budget_bytes=budget,
            fit=fit,
            bound=bound,
            capped=bound != "budget",
            stop_reason=stop,
            avg_bytes_per_instance=avg_last,
            projected_fit=(int(budget // avg_last) if avg_last and bound != "budget" else None),
            elapsed_s=round(time.monotonic() - t_start, 2),
        )
        if avg_last == 0:
            den["note"] = "idle instances hold no measurable memory: memory does not bound them"
        return records

    def _fill_processes(
        self, mem: dict[str, Any], den: dict[str, Any], resident: Sandbox, t: Target
    ) -> None:
        extra: list[Sandbox] = []
        pids0, how = sandbox_pids(resident.instance), "the tier's host processes"
        mem["method"] = (
            "sum of PSS (/proc/PID/smaps_rollup) over the sandbox's processes "
            f"(found via: {how}); bench process excluded"
        )
        try:
            st = resident.stats()
            mem["idle_cgroup_bytes"] = st.memory_bytes
        except Exception as exc:
            mem["idle_cgroup_bytes"] = None
            mem["cgroup_error"] = _err(exc)
        mem["idle_pss_bytes"] = total_pss(pids0)
        mem["idle_pids"] = len(pids0)
        if not pids0:
            mem["note"] = "an idle sandbox of this tier has no resident process"

        def make() -> None:
            extra.append(self.create(t.image))

        def count() -> int:
            return 1 + len(extra)

        def measure() -> tuple[int, dict[str, Any]]:
            all_pids: list[int] = []
            charge = 0
            charged = True
            for sb in [resident, *extra]:
                all_pids.extend(sandbox_pids(sb.instance))
                try:
                    b = sb.stats().memory_bytes
                except Exception:
                    b = None
                if b is None:
                    charged = False
                else:
                    charge += b
            n = 1 + len(extra)
            pss = total_pss(all_pids)
            fields: dict[str, Any] = {"pids": len(all_pids), "avg_pss_bytes": pss / n}
            if charged:
                fields["avg_cgroup_bytes"] = charge / n
            # what an instance costs: its processes' PSS, or the cgroup's charge (which
            # also holds kernel memory: page tables, namespaces, tmpfs) when larger
            return max(pss, charge if charged else 0), fields

        light = self.create_p50_s is not None and self.create_p50_s < LIGHT_CREATE_S
        checkpoints, cap = self._checkpoints(light)
        try:
            mem["checkpoints"] = self._fill(den, make, count, measure, checkpoints, cap, 1)
            den["measure"] = "max(PSS, cgroup charge) per instance"
            last = mem["checkpoints"][-1] if mem["checkpoints"] else {}
            if last and last.get("avg_pss_bytes", 1) == 0 and den.get("bound") != "budget":
                # no resident process: the cgroup's few KiB of page cache would
                # project millions; memory is simply not what bounds these
                den["projected_fit"] = None
                den["note"] = "idle instances hold no process: memory does not bound them"
        finally:
            self.report.start(self.name, f"closing {len(extra)} instances", None)
            for e in self.close_many(extra):
                self.res["errors"].append({"phase": "density cleanup", "error": e})
            self.report.done()

    def _fill_in_process(self, mem: dict[str, Any], den: dict[str, Any], t: Target) -> None:
        """An in-process tier (wasm) runs in the bench process: cost = RSS
        growth per instance, over many. One instance = a sandbox holding what
        a running workload holds (``hold_resident``: for wasm, its module
        instantiated in a live Store; an idle sandbox alone holds none)."""
        sbs: list[Sandbox] = []
        releases: list[Callable[[], None]] = []
        mem["method"] = (
            "growth of the bench process per instance (the tier runs in-process): the larger "
            "of RSS growth and malloc heap growth (mallinfo2), averaged over many; one "
            "instance = a sandbox holding what a running workload holds"
        )

        def make() -> None:
            sb = self.create(t.image)
            sbs.append(sb)
            releases.append(sb.instance.hold_resident())

        def count() -> int:
            return len(sbs)

        gc.collect()
        base_rss = self_rss_bytes()
        base_heap = heap_in_use_bytes()
        base_vm = self_vm_bytes()

        def measure() -> tuple[int, dict[str, Any]]:
            gc.collect()
            rss = max(0, self_rss_bytes() - base_rss)
            heap_now = heap_in_use_bytes()
            heap = max(0, heap_now - base_heap) if heap_now is not None and base_heap else 0
            vm = max(0, self_vm_bytes() - base_vm)
            n = max(1, len(sbs))
            return max(rss, heap), {
                "avg_rss_growth_bytes": rss / n,
                "avg_heap_growth_bytes": heap / n,
                "avg_address_space_bytes": vm / n,
                "held_resident": len(releases),
            }

        checkpoints, cap = self._checkpoints(True)
        try:
            mem["checkpoints"] = self._fill(den, make, count, measure, checkpoints, cap, 0)
            den["measure"] = "max(RSS growth, malloc heap growth)"
            recs = mem["checkpoints"]
            biggest = recs[-1] if recs else None
            if biggest is not None:
                mem["idle_pss_bytes"] = biggest["avg_bytes"]
                mem["idle_note"] = f"averaged over {biggest['instances']} instances"
                vm = biggest.get("avg_address_space_bytes") or 0
                if vm > 0:
                    bound = int(ADDRESS_SPACE_BYTES // vm)
                    mem["address_space_note"] = (
                        f"each live instance reserves {vm / GIB:.2f} GiB of virtual address "
                        f"space (linear memory + guard): at most ~{bound} fit in one process's "
                        "128 TiB"
                    )
                    if den.get("projected_fit") and den["projected_fit"] > bound:
                        den["projected_fit"] = bound
                        den["note"] = "projection bounded by virtual address space, not memory"
            mem["idle_cgroup_bytes"] = None
            mem["instantiate_us"] = self._resident_us(sbs[0] if sbs else None)
        finally:
            for release in releases:
                release()
            releases.clear()
            for e in self.close_many(sbs):
                self.res["errors"].append({"phase": "density cleanup", "error": e})

    @staticmethod
    def _resident_us(sb: Sandbox | None) -> dict[str, Any] | None:
        """How long making a sandbox resident takes (wasm: a fresh Store plus
        an instantiation from the cached InstancePre), released each time."""
        if sb is None:
            return None
        samples: list[float] = []
        for i in range(220):
            t0 = time.perf_counter()
            release = sb.instance.hold_resident()
            dt = time.perf_counter() - t0
            release()
            if i >= 20:
                samples.append(dt)
        return summarize_ms(samples, warmup=20)

    # ---- 6. warm start ----------------------------------------------------
    def warm_start(self, resident: Sandbox | None, t: Target | None) -> None:
        """``Sandbox.restore(snapshot)`` -> first result; where a tier reverts in
        place instead (vm), ``revert(snapshot)`` -> first result."""
        if resident is None or t is None:
            self.res["warm_start"] = {"status": "skipped", "reason": "no resident sandbox"}
            return
        with self.phase(self.res, "warm_start", "warm start") as d:
            self.report.start(self.name, "snapshot", None)
            try:
                t0 = time.perf_counter()
                snap = resident.snapshot()
                d["snapshot_ms"] = (time.perf_counter() - t0) * 1000.0
            except NotSupportedError as exc:
                d.update(status="n/a", reason=f"n/a: {exc}")
                return
            try:
                self._restores(d, resident, snap, t)
            finally:
                _discard_snapshot(snap)

    def _restores(self, d: dict[str, Any], resident: Sandbox, snap: Any, t: Target) -> None:
        short = self.over_deadline()
        warmup = 0 if short else 1
        planned = warmup + (1 if short else self.cfg.warm_runs)
        name = (snap.meta or {}).get("snapshot") or (snap.meta or {}).get("name")
        in_place = False
        d["method"] = "Sandbox.restore(snapshot) -> first result"
        d["label"] = (
            "restore from snapshot" if self.caps.in_process else "clone from a booted snapshot"
        )
        self.report.start(self.name, "warm start (restore)", planned)
        samples: list[float] = []
        deadline = time.monotonic() + max(self.phase_time(), 1.0)
        for i in range(planned):
            t0 = time.perf_counter()
            if in_place:
                resident.revert(str(name))
                r = self.run(resident, t.argv, timeout_s=60)
            else:
                try:
                    sb = self.restore(snap)
                except NotSupportedError as exc:
                    if i > 0 or not name or self.caps.snapshot is not SnapshotKind.REVERT:
                        d.update(status="n/a", reason=f"n/a: {exc}")
                        return
                    in_place = True  # vm: no restore into a new sandbox, but revert works
                    d["method"] = "revert(snapshot) in place -> first result"
                    d["label"] = "revert in place"
                    d["restore_error"] = str(exc)
                    t0 = time.perf_counter()
                    resident.revert(str(name))
                    r = self.run(resident, t.argv, timeout_s=60)
                else:
                    try:
                        r = self.run(sb, t.argv, timeout_s=60)
                    finally:
                        self.close(sb)
            dt = time.perf_counter() - t0
            if not (r.ok and t.ok(r.stdout)):
                raise BenchError(f"after restore: {r.termination.describe()}")
            if i >= warmup:
                samples.append(dt)
            self.report.advance()
            if i >= warmup and time.monotonic() > deadline:
                d["note"] = f"{len(samples)} of {planned - warmup} runs: phase time cap"
                break
        d.update(summarize_ms(samples, warmup=warmup))

    # ---- 7. memory bomb ---------------------------------------------------
    def bomb(self, resident: Sandbox | None, t: Target | None) -> None:
        iso = self.res["isolation"]
        probes = iso.get("probes")
        if probes is None or not self.cfg.probes:
            return
        if probes.get("memory_limit", {}).get("value") == "not measured":
            return
        if iso.get("status") == "failed":
            return  # the probes could not run; their error already stands for every probe
        self.report.start(self.name, "memory bomb", None)
        try:
            if self.caps.in_process:
                probes["memory_limit"] = self._wasm_bomb()
            else:
                probes["memory_limit"] = self._shell_bomb(resident, t)
        except Exception as exc:
            err = _err(exc)
            probes["memory_limit"] = pr.judge_bomb(None, err, None, "")
            self.res["errors"].append({"phase": "memory bomb", "error": err})
        finally:
            self.report.done()

    def _shell_bomb(self, resident: Sandbox | None, t: Target | None) -> dict[str, Any]:
        sb, own = self._probe_sandbox(resident, t)
        try:
            timeout = 15.0 if self.over_deadline() else pr.BOMB_TIMEOUT_S
            r = self.run(sb, ["sh", "-c", pr.BOMB_SCRIPT], timeout)
            survived: bool | None
            try:
                after = self.run(sb, ["echo", "hello"], 30)
                survived = after.ok and b"hello" in after.stdout
            except Exception:
                survived = False
            return pr.judge_bomb(r, None, survived, "sh -c 'tail /dev/zero'")
        finally:
            if own:
                self.close(sb)

    def _wasm_bomb(self) -> dict[str, Any]:
        module = pr.wasi_probe()
        sb = self.create(str(module))
        try:
            r = self.run(sb, ["probe", "membomb"], pr.BOMB_TIMEOUT_S)
            after = self.run(sb, ["probe", "/nonexistent"], 30)
            return pr.judge_bomb(r, None, after.ok, "probe.wasm membomb")
        finally:
            self.close(sb)


#: What a create did, as the tier's timings say (only VMs restore saved templates).
TEMPLATE = "template restore"
#: The vm tier's switch for saved templates (tierbox.vmm.libvirt_template).
TEMPLATES_ENV = "TIERBOX_VM_TEMPLATES"
#: Most timed true cold boots where the regular creates restored a template.
COLD_BOOT_RUNS = 10
COLD_BOOT_RUNS_QUICK = 2


def _start_kind(sb: Sandbox) -> str:
    """ "template restore" when the tier restored a saved, booted template."""
    timings = getattr(getattr(sb, "_inst", None), "timings", None) or {}
    return TEMPLATE if timings.get("from_template") else "cold boot"


def _discard_snapshot(snap: Any) -> None:
    """Remove a snapshot the bench made when it is a snapshot directory of its own
    (wasm: meta.json, microvm: manifest.json) under tierbox's dirs. Anything else
    (a vm's internal snapshot lives in the VM's disk, which ``path`` names) is
    left to the tier, which drops it when the sandbox closes."""
    raw = str(snap.path or "")
    if not raw:
        return
    path = Path(raw)
    if not path.is_dir() or path.is_symlink():
        return
    if not ((path / "meta.json").is_file() or (path / "manifest.json").is_file()):
        return
    real = path.resolve()
    roots = [paths.home().resolve(), paths.run_dir().resolve()]
    if any(r in real.parents for r in roots):
        shutil.rmtree(real, ignore_errors=True)


# ------------------------------------------------------------------- the bench


#: Tiers that boot a guest run last, so that under the quick deadline they,
#: not the cheap tiers after them, are the ones cut short; reports keep the
#: ladder's order.
BOOTING_TIERS = ("gvisor", "microvm", "vm")


def _run_order(name: str) -> int:
    return BOOTING_TIERS.index(name) + 1 if name in BOOTING_TIERS else 0


def select_tiers(requested: Sequence[str] | None) -> list[str]:
    names = tier_names()
    if not requested:
        return names
    unknown = [t for t in requested if t not in names]
    if unknown:
        raise UnknownTierError(
            f"unknown tier {', '.join(map(repr, unknown))}: choose from {', '.join(names)}"
        )
    return [t for t in names if t in requested]


def run_bench(cfg: BenchConfig, report: Reporter | None = None) -> dict[str, Any]:
    """Run the whole bench; returns what results.json holds."""
    from tierbox.bench.claims import evaluate_claims

    rep = report or SilentReporter()
    tiers = select_tiers(cfg.tiers)
    for w in cfg.workloads:
        if w not in WORKLOADS:
            from tierbox.errors import UsageError

            raise UsageError(f"unknown workload {w!r}: choose from {', '.join(WORKLOADS)}")
    started = time.monotonic()
    started_at = now_iso()
    rep.start("bench", "checking tiers and machine", None)
    engines = engine_facts()
    machine = machine_facts(engines)
    rep.done()
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "started_at": started_at,
        "finished_at": None,
        "duration_s": None,
        "mode": cfg.mode,
        "config": cfg.to_dict(),
        "machine": machine,
        "tiers": {},
        "claims": [],
    }
    canaries = pr.HostCanaries() if cfg.probes else None
    canaries_error: str | None = None
    try:
        if canaries is not None:
            try:
                canaries.open()
            except OSError as exc:
                canaries_error = f"could not plant the host canaries: {_err(exc)}"
                results["host_canaries_error"] = canaries_error
                canaries = None
        if canaries is not None:
            results["host_canaries"] = {
                "canary_pid": canaries.canary_pid,
                "secret_path": str(canaries.secret_path),
                "listener_port": canaries.port,
                "host_ip": canaries.host_ip,
                "host_kernel": canaries.host_kernel,
            }
        for name in sorted(tiers, key=_run_order):
            run = TierRun(name, cfg, canaries, rep, started, canaries_error)
            res = run.bench()
            results["tiers"][name] = res
            status = res["status"]
            line = f"{name}: {status} in {res['duration_s']:.1f} s"
            if status in ("failed", "unavailable"):
                line += f": {str(res.get('error') or '')[:200]}"
            elif status == "partial":
                line += f" ({len(res['errors'])} errors, see the report)"
            rep.note(line)
    finally:
        if canaries is not None:
            canaries.close()
    results["tiers"] = {n: results["tiers"][n] for n in tiers if n in results["tiers"]}
    results["finished_at"] = now_iso()
    results["duration_s"] = round(time.monotonic() - started, 2)
    results["claims"] = evaluate_claims(results)
    return results
