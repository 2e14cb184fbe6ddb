"""A short history of each run: its limits, how it ended, and the memory,
CPU and processes sampled while it ran, so ``tierbox doctor`` can explain an
ending after the sandbox is gone.

The facade records every command (``Sandbox.run``, background commands,
one-shot ``run()``). One sampler thread per process reads each running
command's usage every :data:`INTERVAL_S` (``Instance.sample()``, or for a
one-shot run what its tier hands over through :func:`tierbox.tiers.base.metered`).
Sizes are bounded both ways:

- per run, at most :data:`MAX_POINTS` samples: when full, every other one is
  dropped and the spacing doubles, so a long run stays covered end to end at
  a coarser grain, plus the last :data:`TAIL_POINTS` samples at full
  resolution (the moments before an OOM kill are the ones that matter);
- per user, the newest :data:`MAX_RUNS` runs in ``$TIERBOX_HOME/history/uid-N``
  (0700, one JSON file per run); older ones are deleted.

Records are written by a background thread off the command's path, and
flushed at exit. ``TIERBOX_HISTORY=off`` turns recording off.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierbox import paths
from tierbox.errors import HistoryNotFoundError
from tierbox.spec import ExecResult, Limits, Stats

FORMAT = "tierbox-run/1"
#: how often a running command is sampled
INTERVAL_S = 0.1
#: samples kept per run at the coarsest spacing that covers it
MAX_POINTS = 600
#: the newest samples, kept at full resolution
TAIL_POINTS = 100
#: runs kept per user
MAX_RUNS = 200
#: bytes of stderr kept per run (its end), for a crash's last words
STDERR_TAIL_BYTES = 2048
HISTORY_ENV = "TIERBOX_HISTORY"

StatsSource = Callable[[], Stats]


def enabled() -> bool:
    return os.environ.get(HISTORY_ENV, "on").lower() not in ("0", "off", "no", "false")


def history_dir() -> Path:
    """This user's run records."""
    return paths.home() / "history" / f"uid-{os.getuid()}"


# ---- the samples of one run -------------------------------------------------------


@dataclass
class Series:
    """Samples of one run, bounded (see the module docstring). Each point is
    (seconds since start, memory bytes, engine memory bytes, CPU seconds,
    pids, CPU throttled seconds); unknown values are None."""

    max_points: int = MAX_POINTS
    points: list[tuple[Any, ...]] = field(default_factory=list)
    tail: collections.deque[tuple[Any, ...]] = field(
        default_factory=lambda: collections.deque(maxlen=TAIL_POINTS)
    )
    stride: int = 1
    taken: int = 0

    def add(self, t_s: float, st: Stats) -> None:
        point = (
            round(t_s, 3),
            st.memory_bytes,
            st.engine_memory_bytes,
            None if st.cpu_s is None else round(st.cpu_s, 4),
            st.pids,
            None if st.cpu_throttled_s is None else round(st.cpu_throttled_s, 4),
        )
        self.tail.append(point)
        if self.taken % self.stride == 0:
            self.points.append(point)
            if len(self.points) > self.max_points:
                del self.points[1::2]
                self.stride *= 2
        self.taken += 1

    def merged(self) -> list[tuple[Any, ...]]:
        """Every kept point once, in time order."""
        seen: dict[float, tuple[Any, ...]] = {p[0]: p for p in self.points}
        seen.update((p[0], p) for p in self.tail)
        return [seen[t] for t in sorted(seen)]

    def to_dict(self) -> dict[str, Any]:
        pts = self.merged()
        cols = ("t_s", "memory_bytes", "engine_memory_bytes", "cpu_s", "pids", "cpu_throttled_s")
        out: dict[str, Any] = {"interval_s": INTERVAL_S, "taken": self.taken}
        for i, name in enumerate(cols):
            out[name] = [p[i] for p in pts]
        return out


class Watch:
    """One command being sampled until :meth:`stop`."""

    def __init__(self, source: StatsSource | None) -> None:
        self.source = source
        self.series = Series()
        self.started = time.monotonic()
        self.errors = 0
        self.last_error: str | None = None
        self.lock = threading.Lock()
        #: called after each sample (background commands: has it finished?)
        self.after: Callable[[], None] | None = None

    def set_source(self, source: StatsSource | None) -> None:
        self.source = source

    def take(self) -> None:
        source = self.source
        if source is None:
            return
        try:
            st = source()
        except Exception as exc:  # a sandbox that died or closed: its record says why
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.errors >= 3:
                self.source = None
            return
        with self.lock:
            self.series.add(time.monotonic() - self.started, st)


class _Sampler:
    """One thread per process samples every running command; it parks when
    there is nothing to sample."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watches: set[Watch] = set()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, w: Watch) -> None:
        with self._cond:
            self._watches.add(w)
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._loop, name="tierbox-sampler", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def remove(self, w: Watch) -> None:
        with self._cond:
            self._watches.discard(w)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._watches:
                    self._cond.wait()
            # the first sample one interval after a watch came: a run shorter
            # than that costs no reading at all (its end is in its evidence)
            due = time.monotonic() + INTERVAL_S
            while True:
                time.sleep(max(0.0, due - time.monotonic()))
                with self._cond:
                    current = list(self._watches)
                if not current:
                    break
                for w in current:
                    w.take()
                    if w.after is not None:
                        with contextlib.suppress(Exception):
                            w.after()
                due += INTERVAL_S
                due = max(due, time.monotonic())  # fell behind (a slow reading): from now


_sampler = _Sampler()


# ---- writing records -----------------------------------------------------------------


class _Writer:
    """Writes records on a thread of its own, off the command's path."""

    def __init__(self) -> None:
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pid = 0
        self._written = 0

    def put(self, record: dict[str, Any]) -> None:
        with self._lock:
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._loop, name="tierbox-history", daemon=True
                )
                self._thread.start()
        self._queue.put(record)

    def _loop(self) -> None:
        while True:
            record = self._queue.get()
            try:
                write_record(record)
                self._written += 1
                if self._written % 20 == 1:
                    prune()
            except OSError:
                pass  # a full or read-only disk must not break runs: the record is lost
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until every queued record is on disk (at most ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)


_writer = _Writer()
atexit.register(_writer.flush)


def flush(timeout_s: float = 10.0) -> None:
    """Make the records of finished runs readable (they are written in the background)."""
    _writer.flush(timeout_s)


def write_record(record: dict[str, Any]) -> Path:
    # bare os calls on bytes encoded first: this runs after every command,
    # on a thread that competes with the caller's for the GIL (~0.16 ms with
    # a text-mode file and pathlib, about half that now)
    d = str(history_dir())
    data = json.dumps(record, separators=(",", ":")).encode()
    name = f"{record['started_ns']:020d}-{record['run_id']}.json"
    tmp = f"{d}/.{name}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        os.makedirs(d, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(tmp, f"{d}/{name}")
    return Path(d, name)


def prune(keep: int = MAX_RUNS) -> int:
    """Delete all but the newest ``keep`` records; returns how many went.
    Names sort by start time, so one listing of names is enough (no stat,
    no pathlib: ~4 ms for 220 records with glob and Path objects)."""
    d = str(history_dir())
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".json") and n[:1] != ".")
    except FileNotFoundError:
        return 0
    gone = 0
    for name in names[: max(0, len(names) - keep)]:
        with contextlib.suppress(OSError):
            os.unlink(f"{d}/{name}")
            gone += 1
    return gone


# ---- recording a run -----------------------------------------------------------------


def _run_id() -> str:
    return f"r{secrets.token_hex(5)}"


class Recording:
    """One command from start to end; :meth:`finish` queues its record."""

    def __init__(
        self,
        *,
        kind: str,
        tier: str,
        image: str | None,
        argv: Sequence[str],
        limits: Limits,
        sandbox_id: str | None = None,
        sandbox_name: str | None = None,
        source: StatsSource | None = None,
    ) -> None:
        self.run_id = _run_id()
        self.meta: dict[str, Any] = {
            "format": FORMAT,
            "run_id": self.run_id,
            "kind": kind,
            "tier": tier,
            "image": image,
            "argv": list(argv),
            "limits": limits.to_dict(),
            "sandbox_id": sandbox_id,
            "sandbox_name": sandbox_name,
            "uid": os.getuid(),
            "pid": os.getpid(),
            "started_unix": time.time(),
            "started_ns": time.time_ns(),
        }
        self.watch = Watch(source)
        self._done = False
        _sampler.add(self.watch)

    def set_source(self, source: StatsSource | None) -> None:
        """The one-shot receiver of :func:`tierbox.tiers.base.metered`."""
        self.watch.set_source(source)

    def finish(
        self, result: ExecResult | None, error: BaseException | None = None
    ) -> dict[str, Any] | None:
        """Stop sampling and queue the record (once)."""
        _sampler.remove(self.watch)
        if self._done:
            return None
        self._done = True
        w = self.watch
        with w.lock:
            series = w.series.to_dict()
        record = dict(self.meta)
        record["duration_s"] = round(time.monotonic() - w.started, 4)
        record["samples"] = series
        if w.last_error:
            record["sampling_error"] = w.last_error
        if result is not None:
            record["termination"] = result.termination.to_dict()
            record["exit_code"] = result.exit_code
            record["duration_s"] = round(result.duration_s, 4)
            record["stderr_tail"] = result.stderr[-STDERR_TAIL_BYTES:].decode(errors="replace")
            record["stdout_truncated"] = result.stdout_truncated
            record["stderr_truncated"] = result.stderr_truncated
        if error is not None:
            record["error"] = f"{type(error).__name__}: {error}"
        _writer.put(record)
        return record


@contextlib.contextmanager
def recording(**what: Any) -> Iterator[Recording | None]:
    """Record one command; the body sets ``rec.result``-style outcome via
    :meth:`Recording.finish` (called here with the result it was given)."""
    if not enabled():
        yield None
        return
    rec = Recording(**what)
    try:
        yield rec
    except BaseException as exc:
        rec.finish(None, exc)
        raise
    finally:
        rec.finish(None)  # a no-op when the body finished it with a result


def record_background(
    handle: Any,
    *,
    kind: str,
    tier: str,
    image: str | None,
    argv: Sequence[str],
    limits: Limits,
    sandbox_id: str | None,
    sandbox_name: str | None,
    source: StatsSource,
) -> None:
    """Sample a background command (a :class:`~tierbox.handles.CommandHandle`)
    until it is done, then record how it ended."""
    if not enabled():
        return
    rec = Recording(
        kind=kind,
        tier=tier,
        image=image,
        argv=argv,
        limits=limits,
        sandbox_id=sandbox_id,
        sandbox_name=sandbox_name,
        source=source,
    )

    def check() -> None:
        if not handle.done:
            return
        try:
            result = handle.wait(0)
        except Exception as exc:
            rec.finish(None, exc)
        else:
            rec.finish(result)

    rec.watch.after = check


# ---- reading records -----------------------------------------------------------------


def _files() -> list[Path]:
    d = history_dir()
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("*.json") if not p.name.startswith("."))


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def records(limit: int | None = None) -> list[dict[str, Any]]:
    """This user's run records, newest first."""
    flush()
    out: list[dict[str, Any]] = []
    for path in reversed(_files()):
        data = _load(path)
        if data is not None:
            out.append(data)
            if limit is not None and len(out) >= limit:
                break
    return out


def find(ref: str) -> dict[str, Any]:
    """The record of run ``ref``, or the newest run of the sandbox with that
    id or name; HistoryNotFoundError names what was looked for."""
    flush()
    for path in reversed(_files()):
        if path.stem.endswith(f"-{ref}"):
            data = _load(path)
            if data is not None:
                return data
    for data in records():
        if ref in (data.get("sandbox_id"), data.get("sandbox_name")):
            return data
    raise HistoryNotFoundError(
        f"no run or sandbox {ref!r} in this user's run history ({history_dir()}): "
        "`tierbox doctor --last` takes the newest"
    )


def last() -> dict[str, Any]:
    """The newest run of this user."""
    found = records(limit=1)
    if not found:
        raise HistoryNotFoundError(
            f"no runs recorded for this user yet ({history_dir()}); "
            f"run something first (and {HISTORY_ENV} must not be off)"
        )
    return found[0]


def usage(
    *, image: str | None = None, tier: str | None = None, limit: int = 50
) -> list[dict[str, float | None]]:
    """Peak memory (MiB) and average CPU (cores) of this user's recent runs
    of ``image`` on ``tier`` that ended well: what exported requests and
    limits are sized from."""
    out: list[dict[str, float | None]] = []
    for data in records(limit=MAX_RUNS):
        if image is not None and data.get("image") != image:
            continue
        if tier is not None and data.get("tier") != tier:
            continue
        term = data.get("termination") or {}
        if term.get("kind") != "exited" or term.get("exit_code") != 0:
            continue
        s = data.get("samples") or {}
        mem = [m for m in s.get("memory_bytes", []) if m is not None]
        if not mem:
            continue
        cpu = [
            (t, c)
            for t, c in zip(s.get("t_s", []), s.get("cpu_s", []), strict=False)
            if c is not None and t is not None
        ]
        rate = None
        if len(cpu) >= 2 and cpu[-1][0] > cpu[0][0]:
            rate = (cpu[-1][1] - cpu[0][1]) / (cpu[-1][0] - cpu[0][0])
        out.append({"peak_mib": max(mem) / (1 << 20), "cpu": rate})
        if len(out) >= limit:
            break
    return out
