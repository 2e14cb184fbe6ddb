"""Run control: stopping one Wasm run, within one epoch tick, without the others.

A single daemon thread ticks the engine's epoch every :data:`TICK_S` while at
least one run is live. Each Store registers an epoch deadline callback that,
once per tick, decides whether its run goes on (wall-clock timeout, output cap,
interpreter shutdown) or stops with a trap. So a stop reaches exactly one
Store, within one tick, without touching the others. The callback needs C
functions wasmtime-py does not wrap (:mod:`tierbox.wasm.wasmtime_private`); if
a future wasmtime-py drops them, runs fall back to plain epoch deadlines
(timeouts still work; the output cap is then applied after the run).

Signals raised inside callbacks (:class:`SignalGuard`) and interpreter exit
with live runs (:func:`_shutdown`) are handled here too.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import itertools
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import wasmtime

from tierbox.errors import SandboxError
from tierbox.spec import Stats
from tierbox.tiers.base import meter
from tierbox.wasm import scratch, wasmtime_private
from tierbox.wasm.engine import engine

#: How often the epoch advances while runs are live; the granularity of timeouts
#: and of the output-cap check.
TICK_S = 0.01
#: The ticker keeps ticking this long after the last run ends, then parks.
IDLE_S = 1.0
#: How long interpreter shutdown waits for live runs to stop.
SHUTDOWN_GRACE_S = 5.0

_C = wasmtime_private.load()
#: ``signal``'s C core: the same calls as ``signal.getsignal``/``signal.signal``
#: without their enum round trip (~2.5 us a call, and a run makes eight)
_csignal: Any = importlib.import_module("_signal")


def fast_api() -> wasmtime_private.CApi | None:
    """tierbox's faster export lookups and calls through wasmtime's C API,
    or None without them (the public wasmtime-py calls then run)."""
    return _C if _C is not None and _C.fast else None


def precise_stops() -> bool:
    """Whether each run is stopped by its own epoch callback (timeouts and the
    output cap within a tick); else plain epoch deadlines are used."""
    return _C is not None


_shutting_down = False


_wake_lock = threading.Lock()


def _new_wake_lock() -> None:
    """A forked child's lock: the parent's may have been held at the fork."""
    global _wake_lock
    _wake_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_wake_lock)


class RunControl:
    """What the epoch callback needs to decide whether one run goes on."""

    __slots__ = (
        "_wake",
        "cap",
        "deadline",
        "exit_code",
        "interrupt",
        "key",
        "memory",
        "memory_bytes",
        "offsets",
        "outputs",
        "sinks",
        "stop_reason",
        "store",
    )

    def __init__(self, *, timeout_s: float | None, outputs: tuple[str, ...], cap: int) -> None:
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.outputs = outputs
        self.cap = cap
        self.stop_reason: str | None = None  # "timeout", "output", "shutdown" or "exit"
        self.exit_code: int | None = None  # from proc_exit
        # KeyboardInterrupt (Ctrl-C, or the CLI's SIGTERM) caught in a callback on this
        # run's thread: the run stops and run_wasi raises it once the Store is gone.
        self.interrupt: BaseException | None = None
        self._wake: threading.Event | None = None
        self.key = 0
        #: per output file: a callback for what the guest wrote since the last tick
        self.sinks: tuple[Callable[[bytes], object] | None, ...] = ()
        self.offsets = [0] * len(outputs)
        #: the guest's linear memory and its Store, once instantiated: read at
        #: each tick on the run's own thread, so the run history can sample
        #: ``memory_bytes`` from another
        self.memory: wasmtime.Memory | None = None
        self.store: wasmtime.Store | None = None
        self.memory_bytes = 0

    @property
    def wake(self) -> threading.Event:
        """Set to interrupt a guest sleeping in poll_oneoff; made on first
        use (most runs never sleep nor are stopped, and an Event costs ~2 us)."""
        wake = self._wake
        if wake is None:
            with _wake_lock:
                if self._wake is None:
                    self._wake = threading.Event()
                wake = self._wake
        return wake

    def measure(self) -> None:
        """Note the linear memory's size (called on the run's thread)."""
        if self.memory is not None and self.store is not None:
            self.memory_bytes = self.memory.data_len(self.store)

    def sample(self) -> Stats:
        """The run's linear memory as of the last tick."""
        return Stats(memory_bytes=self.memory_bytes, pids=1)

    def cancel(self) -> None:
        """Stop the run as a SIGKILL would (a background command killed)."""
        if self.stop_reason is None:
            self.stop_reason = "killed"
        self.wake.set()

    def stream(self) -> None:
        """Hand what the guest wrote since the last call to the callbacks
        (at each epoch tick, ~10 ms, and once at the end). At most the cap."""
        for i, sink in enumerate(self.sinks):
            if sink is None or self.offsets[i] >= self.cap:
                continue
            try:
                with open(self.outputs[i], "rb") as f:
                    f.seek(self.offsets[i])
                    chunk = f.read(self.cap - self.offsets[i])
            except OSError:
                continue
            if chunk:
                self.offsets[i] += len(chunk)
                sink(chunk)

    def interrupted(self, exc: BaseException) -> None:
        self.interrupt = exc
        self.stop_reason = "interrupted"
        self.wake.set()

    def should_stop(self) -> bool:
        if self.stop_reason is not None:
            return True
        if self.sinks:
            try:
                self.stream()
            except BaseException as exc:  # a callback raised: the run stops, the caller sees it
                self.interrupted(exc)
                return True
        reason = None
        if _shutting_down:
            reason = "shutdown"
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            reason = "timeout"
        else:
            for path in self.outputs:
                try:
                    if os.stat(path).st_size > self.cap:
                        reason = "output"
                        break
                except OSError:
                    continue
        if reason is None:
            return False
        self.stop_reason = reason
        self.wake.set()
        return True


_runs: dict[int, RunControl] = {}
_run_keys = itertools.count(1)
_tls = threading.local()


def current_run() -> RunControl | None:
    """The run on this thread (WASI functions run on the guest's own thread)."""
    run: RunControl | None = getattr(_tls, "run", None)
    return run


def shutting_down() -> bool:
    return _shutting_down


def _on_epoch_py(_ctx: int | None, data: int | None, delta: Any, kind: Any) -> int | None:
    """Called by wasmtime on the run's own thread once its epoch deadline passes."""
    try:
        run = _runs.get(data or 0)
        if run is None or run.should_stop():
            return _stop_error()
        run.measure()
        delta[0] = 1
        kind[0] = 0
        return None
    except (KeyboardInterrupt, SystemExit) as exc:  # a signal handler ran in here
        interrupt(exc)
        return _stop_error()
    except BaseException:  # never let an exception escape into Rust
        return _stop_error()


_on_epoch = wasmtime_private.DeadlineCallback(_on_epoch_py)


class SignalGuard:
    """Keeps Python signal handlers from raising inside wasm callbacks on the main thread.

    CPython runs a signal's Python handler (SIGINT's raises KeyboardInterrupt) on
    the main thread at the next bytecode boundary, which during a run is inside
    a callback from wasmtime: the epoch callback or a WASI function. Raised at
    the very entry of a ctypes callback, before any ``try``, the exception is
    swallowed and the callback's return value is left uninitialised, which
    wasmtime would take for an error pointer. So while the main thread is in
    wasm, the Python-level handlers of :attr:`WATCHED` are replaced by one that
    only records the signal and stops the run; after the Store is gone the
    original handler is called (raising KeyboardInterrupt as usual). Elsewhere
    than on the main thread no handler can run, and the guard does nothing.
    """

    #: Signals whose Python handlers commonly raise: Ctrl-C, the CLI's SIGTERM,
    #: pytest-timeout's SIGALRM, and the usual job-control ones.
    WATCHED = (
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGALRM,
        signal.SIGHUP,
        signal.SIGUSR1,
        signal.SIGUSR2,
    )

    def __init__(self) -> None:
        self.saved: dict[int, Callable[[int, Any], Any]] = {}
        self.pending: list[tuple[int, Any]] = []
        self.run: RunControl | None = None

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.WATCHED:
                previous = _csignal.getsignal(sig)
                if callable(previous):
                    self.saved[sig] = previous
                    _csignal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame: Any) -> None:
        self.pending.append((signum, frame))
        run = self.run or current_run()
        if run is not None:
            run.stop_reason = "interrupted"
            run.wake.set()

    def __exit__(self, *exc_info: object) -> None:
        for sig, previous in self.saved.items():
            _csignal.signal(sig, previous)
        for signum, frame in self.pending:
            self.saved[signum](signum, frame)  # KeyboardInterrupt, for SIGINT's default


def interrupt(exc: BaseException, caller: wasmtime.Caller | None = None) -> None:
    """A signal handler raised inside a callback: stop the run, re-raise it afterwards."""
    run = current_run()
    if run is not None:
        run.interrupted(exc)
    if caller is not None:
        with contextlib.suppress(Exception):
            stop_guest(caller)


def stop_guest(caller: wasmtime.Caller) -> None:
    """From inside a host call: the guest stops at its next function entry
    rather than up to a tick later (nothing happens without the C API)."""
    if _C is not None:
        _C.stop_at_next_check(caller)


def _stop_error() -> int | None:
    assert _C is not None
    return _C.stop_error(b"tierbox: run stopped")


class _Ticker:
    """Advances the engine epoch every TICK_S while runs are live, and for IDLE_S after
    the last one ends (so back-to-back runs do not each wake a parked thread); then parks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._active = 0
        self._last_end = 0.0
        self._parked = True
        self._thread: threading.Thread | None = None
        self._pid = 0

    def acquire(self) -> None:
        with self._lock:
            self._active += 1
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._parked = True
                self._wake = threading.Event()
                self._thread = threading.Thread(
                    target=self._loop, name="tierbox-wasm-epoch", daemon=True
                )
                self._thread.start()
            wake = self._parked
            self._parked = False
        if wake:
            self._wake.set()

    def release(self) -> None:
        with self._lock:
            self._active -= 1
            self._last_end = time.monotonic()

    def _loop(self) -> None:
        eng = engine()
        while True:
            self._wake.wait()
            while True:
                time.sleep(TICK_S)
                eng.increment_epoch()
                with self._lock:
                    if self._active <= 0 and time.monotonic() - self._last_end > IDLE_S:
                        self._parked = True
                        self._wake.clear()
                        break


_ticker = _Ticker()


def begin_run(store: wasmtime.Store, run: RunControl) -> None:
    """Register ``run`` and arm ``store`` so that the ticker can stop it."""
    if _shutting_down:
        raise SandboxError("the Python interpreter is shutting down: no new Wasm runs")
    run.key = next(_run_keys)
    _runs[run.key] = run
    _tls.run = run
    _ticker.acquire()
    meter(run.sample)  # a one-shot run's memory, for the run history
    if _C is not None:
        store.set_epoch_deadline(1)
        _C.set_deadline_callback(store, _on_epoch, run.key)
    elif run.deadline is None:  # pragma: no cover - fallback without the C callback
        store.set_epoch_deadline(1 << 62)
    else:  # pragma: no cover
        ticks = math.ceil(max(run.deadline - time.monotonic(), 0.0) / TICK_S) + 1
        store.set_epoch_deadline(ticks)


def end_run(run: RunControl) -> None:
    meter(None)
    run.memory = run.store = None
    _runs.pop(run.key, None)
    _tls.run = None
    _ticker.release()


def live_runs() -> int:
    return len(_runs)


def _shutdown() -> None:
    """atexit: stop every live run before the interpreter finalizes.

    A daemon thread still inside wasm when finalization starts would, at its next
    call back into Python (epoch callback, poll_oneoff), be torn down by CPython
    with a forced unwind through Rust frames: a Rust panic and an abort. So stop
    them all now, while Python still runs callbacks normally.
    """
    global _shutting_down
    _shutting_down = True
    for run in list(_runs.values()):
        run.wake.set()
    give_up = time.monotonic() + SHUTDOWN_GRACE_S
    while _runs and time.monotonic() < give_up:
        engine().increment_epoch()
        time.sleep(TICK_S / 2)
    scratch.remove_own()


atexit.register(_shutdown)
