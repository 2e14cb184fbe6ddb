"""The process-wide wasmtime Engine, its epoch ticker and the compiled-module cache.

One :class:`wasmtime.Engine` serves every Wasm sandbox of the process. It is
configured with

* **fuel** (``consume_fuel``): the CPU budget of a run, see :mod:`tierbox.wasm.runner`;
* **epoch interruption**: a single daemon thread ticks the engine's epoch every
  :data:`TICK_S` while at least one run is live. Each Store registers an epoch
  deadline callback that, once per tick, decides whether its run goes on (wall
  clock timeout, output cap, interpreter shutdown) or stops with a trap. So a
  stop reaches exactly one Store, within one tick, without touching the others.

Allocation strategy: wasmtime's pooling allocator would make instantiation a
little cheaper, but wasmtime-py's public ``Config`` does not expose it (only the
raw C bindings do), so tierbox uses the default on-demand allocator. With
copy-on-write memory images from mmapped ``.cwasm`` files (``memory_init_cow``,
the default) an instantiation is already tens of microseconds for small modules.

Modules are rewritten so that refused ``memory.grow`` is counted
(:mod:`tierbox.wasm.growtrack`), then compiled once per (module sha256,
wasmtime version, engine settings, rewrite version) and kept as ``.cwasm``
files under ``$TIERBOX_HOME/wasm-cache``; they are loaded with
``Module.deserialize_file`` (mmap, no copy) and linked once into an
``InstancePre`` so that each run is only ``Store`` + ``instantiate``.

Three C API functions are called directly through ``wasmtime._ffi.dll`` because
wasmtime-py has no Python wrapper for them: the epoch deadline callback,
``wasmtime_error_new`` (the callback's "stop" answer) and setting a Store's
epoch deadline from inside a host call (so ``proc_exit`` and an interrupted
sleep stop the guest at once, without raising through wasmtime-py's
process-global "last exception" slot, which other threads' calls can pick up).
If a future wasmtime-py drops those symbols tierbox falls back to plain epoch
deadlines (timeouts still work; the output cap is then applied after the run).

WASI is wasmtime's, except three functions tierbox implements in Python:
``poll_oneoff`` and ``clock_time_get`` (so that sleeps can be interrupted by the
timeout and shutdown, on the host's clocks), ``proc_exit`` (wasmtime refuses
statuses >= 126) — all three run only on the guest's own thread.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import shutil
import signal
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime

from tierbox import paths
from tierbox.errors import SandboxError, SpecError
from tierbox.wasm import growtrack

WASI_MODULE = "wasi_snapshot_preview1"
WASM_PAGE = 65536
#: How often the epoch advances while runs are live; the granularity of timeouts
#: and of the output-cap check.
TICK_S = 0.01
#: Fuel given to a run with no CPU budget (wasmtime needs some number).
UNLIMITED_FUEL = 1 << 62
#: The ticker keeps ticking this long after the last run ends, then parks.
IDLE_S = 1.0
#: How long interpreter shutdown waits for live runs to stop.
SHUTDOWN_GRACE_S = 5.0
CACHE_FORMAT = 1

#: Engine settings; part of the cache key of every compiled module.
ENGINE_SETTINGS: dict[str, Any] = {
    "consume_fuel": True,
    "epoch_interruption": True,
    "wasm_exceptions": True,  # MicroPython's WASI build uses exception handling (exnref)
    "cranelift_opt_level": "speed",
}


class InvalidModuleError(SpecError):
    """The file is not a runnable WASI command module (bad bytes, wrong imports, no _start)."""


def wasmtime_version() -> str:
    try:
        return importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored copies
        return str(getattr(wasmtime, "__version__", "unknown"))


# --------------------------------------------------------------------------- engine

_engine: wasmtime.Engine | None = None
_engine_lock = threading.Lock()


def engine() -> wasmtime.Engine:
    """The one Engine of this process (created on first use)."""
    global _engine
    eng = _engine
    if eng is None:
        with _engine_lock:
            if _engine is None:
                cfg = wasmtime.Config()
                for key, value in ENGINE_SETTINGS.items():
                    setattr(cfg, key, value)
                _engine = wasmtime.Engine(cfg)
                atexit.register(_shutdown)
            eng = _engine
    return eng


def engine_fingerprint() -> str:
    """Identifies compiled code this process can load: wasmtime version, settings, CPU."""
    blob = json.dumps(
        {
            "format": CACHE_FORMAT,
            "wasmtime": wasmtime_version(),
            "settings": ENGINE_SETTINGS,
            "machine": platform.machine(),
            "growtrack": growtrack.VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------- C API helpers

_DeadlineCallback = ctypes.CFUNCTYPE(
    ctypes.c_void_p,  # wasmtime_error_t* (NULL: go on)
    ctypes.c_void_p,  # wasmtime_context_t*
    ctypes.c_void_p,  # data
    ctypes.POINTER(ctypes.c_uint64),  # epoch_deadline_delta (out)
    ctypes.POINTER(ctypes.c_uint8),  # update_kind (out): 0 continue, 1 yield
)
_Finalizer = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _CApi:
    def __init__(self) -> None:
        from wasmtime import _ffi

        dll = _ffi.dll
        self.set_deadline_callback = ctypes.CFUNCTYPE(
            None, ctypes.c_void_p, _DeadlineCallback, ctypes.c_void_p, _Finalizer
        )(("wasmtime_store_epoch_deadline_callback", dll))
        self.error_new = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(
            ("wasmtime_error_new", dll)
        )
        self.set_epoch_deadline = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)(
            ("wasmtime_context_set_epoch_deadline", dll)
        )
        self.no_finalizer = _Finalizer()  # a NULL function pointer


def _load_c_api() -> _CApi | None:
    try:
        return _CApi()
    except (ImportError, AttributeError, OSError):  # pragma: no cover - other wasmtime-py
        return None


_C = _load_c_api()


# ------------------------------------------------------------------ run control

_shutting_down = False


class RunControl:
    """What the epoch callback needs to decide whether one run goes on."""

    __slots__ = (
        "cap",
        "deadline",
        "exit_code",
        "interrupt",
        "key",
        "outputs",
        "stop_reason",
        "wake",
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
        self.wake = threading.Event()  # interrupts a guest sleeping in poll_oneoff
        self.key = 0

    def interrupted(self, exc: BaseException) -> None:
        self.interrupt = exc
        self.stop_reason = "interrupted"
        self.wake.set()

    def should_stop(self) -> bool:
        if self.stop_reason is not None:
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


def _on_epoch_py(_ctx: int | None, data: int | None, delta: Any, kind: Any) -> int | None:
    """Called by wasmtime on the run's own thread once its epoch deadline passes."""
    try:
        run = _runs.get(data or 0)
        if run is None or run.should_stop():
            return _stop_error()
        delta[0] = 1
        kind[0] = 0
        return None
    except (KeyboardInterrupt, SystemExit) as exc:  # a signal handler ran in here
        _interrupt(exc)
        return _stop_error()
    except BaseException:  # never let an exception escape into Rust
        return _stop_error()


_on_epoch = _DeadlineCallback(_on_epoch_py)


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
                previous = signal.getsignal(sig)
                if callable(previous):
                    self.saved[sig] = previous
                    signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame: Any) -> None:
        self.pending.append((signum, frame))
        run = self.run or getattr(_tls, "run", None)
        if run is not None:
            run.stop_reason = "interrupted"
            run.wake.set()

    def __exit__(self, *exc_info: object) -> None:
        for sig, previous in self.saved.items():
            signal.signal(sig, previous)
        for signum, frame in self.pending:
            self.saved[signum](signum, frame)  # KeyboardInterrupt, for SIGINT's default


def _interrupt(exc: BaseException, caller: Any = None) -> None:
    """A signal handler raised inside a callback: stop the run, re-raise it afterwards."""
    run: RunControl | None = getattr(_tls, "run", None)
    if run is not None:
        run.interrupted(exc)
    if caller is not None and _C is not None:
        with contextlib.suppress(Exception):
            _C.set_epoch_deadline(caller._context(), 0)


def _stop_error() -> int | None:
    assert _C is not None
    result: int | None = _C.error_new(b"tierbox: run stopped")
    return result


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
    if _C is not None:
        store.set_epoch_deadline(1)
        _C.set_deadline_callback(store.ptr(), _on_epoch, run.key, _C.no_finalizer)
    elif run.deadline is None:  # pragma: no cover - fallback without the C callback
        store.set_epoch_deadline(1 << 62)
    else:  # pragma: no cover
        ticks = math.ceil(max(run.deadline - time.monotonic(), 0.0) / TICK_S) + 1
        store.set_epoch_deadline(ticks)


def end_run(run: RunControl) -> None:
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
    eng = _engine
    give_up = time.monotonic() + SHUTDOWN_GRACE_S
    while _runs and eng is not None and time.monotonic() < give_up:
        eng.increment_epoch()
        time.sleep(TICK_S / 2)
    _remove_scratch()


# -------------------------------------------------------------- scratch files

_scratch_base: Path | None = None
_scratch_pid = 0
_scratch_lock = threading.Lock()
SCRATCH_PREFIX = "tierbox-wasm-"


def _scratch_parents() -> list[Path]:
    """Where scratch directories go: tmpfs first (truncating and removing files on a
    journaling filesystem costs more than a whole small Wasm run), then $TMPDIR."""
    shm = Path("/dev/shm")
    parents = [shm] if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else []
    return [*parents, Path(tempfile.gettempdir())]


def scratch_dir() -> Path:
    """A private directory for the calling thread: stdout/stderr/stdin files of its runs
    and the root of one-shot runs. Only this thread uses it, so nothing is locked."""
    global _scratch_base, _scratch_pid
    local: Path | None = getattr(_tls, "scratch", None)
    if local is not None and _scratch_pid == os.getpid():
        return local
    with _scratch_lock:
        if _scratch_base is None or _scratch_pid != os.getpid():
            prefix = f"{SCRATCH_PREFIX}{os.getpid()}-"
            for parent in _scratch_parents():
                try:
                    _scratch_base = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
                    break
                except OSError:
                    continue
            else:
                raise SandboxError("no writable directory for Wasm run scratch files")
            _scratch_pid = os.getpid()
        base = _scratch_base
    local = base / f"t{threading.get_ident()}"
    local.mkdir(mode=0o700, exist_ok=True)
    _tls.scratch = local
    return local


def scratch_files(scratch: Path) -> tuple[str, str, str]:
    """Paths of the stdout, stderr and stdin files in a thread's scratch directory."""
    files: tuple[str, str, str] | None = getattr(_tls, "files", None)
    if files is None or not files[0].startswith(str(scratch)):
        base = str(scratch)
        files = (f"{base}/stdout", f"{base}/stderr", f"{base}/stdin")
        _tls.files = files
    return files


def one_shot_root() -> Path:
    """An empty directory to preopen as ``/`` for a one-shot run on this thread.

    Reused while runs leave it empty (creating and removing a directory per run
    costs as much as a small run); see :func:`release_one_shot_root`.
    """
    root: Path | None = getattr(_tls, "root", None)
    if root is None or _scratch_pid != os.getpid():
        root = scratch_dir() / "root"
        with contextlib.suppress(FileExistsError):
            root.mkdir(mode=0o755)
        _tls.root = root
    return root


def release_one_shot_root(root: Path) -> None:
    """After a one-shot run: keep the directory if the guest left it empty."""
    try:
        with os.scandir(root) as it:
            if next(it, None) is None:
                return
    except OSError:
        pass
    _tls.root = None
    shutil.rmtree(root, ignore_errors=True)


def _remove_scratch() -> None:
    if _scratch_base is not None and _scratch_pid == os.getpid():
        shutil.rmtree(_scratch_base, ignore_errors=True)


def reap_scratch() -> list[str]:
    """Remove scratch directories of tierbox processes that no longer exist."""
    removed = []
    entries = [e for parent in _scratch_parents() for e in parent.glob(f"{SCRATCH_PREFIX}*")]
    for entry in entries:
        pid_text = entry.name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(str(entry))
    return removed


# ------------------------------------------------------------ compiled modules


def cache_dir() -> Path:
    return paths.home() / "wasm-cache"


def _trusted_dir(path: Path) -> bool:
    """Compiled code is native code: only load it from a directory only we can write."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


_compiled: dict[str, wasmtime.Module] = {}
_compile_locks: dict[str, threading.Lock] = {}
_digests: dict[tuple[int, int, int, int], str] = {}
_MAGIC = b"\0asm"


def _check_header(head: bytes, source: str) -> None:
    if len(head) < 8 or head[:4] != _MAGIC:
        raise InvalidModuleError(
            f"{source} is not a WebAssembly module: it does not start with the \\0asm magic"
        )
    if head[4:8] != b"\x01\x00\x00\x00":
        if head[6:8] == b"\x01\x00":
            raise InvalidModuleError(
                f"{source} is a WebAssembly component; the wasm tier runs core WASI "
                "preview 1 modules (build for wasm32-wasip1 / wasm32-wasi)"
            )
        raise InvalidModuleError(f"{source}: unsupported WebAssembly binary version {head[4:8]!r}")


def file_digest(path: Path, source: str | None = None) -> str:
    """sha256 of a module file, checked for the Wasm header; memoized by inode and mtime."""
    src = source or str(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SpecError(f"{src}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(f"{src} is not a regular file")
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    found = _digests.get(key)
    if found is not None:
        return found
    with open(path, "rb") as fh:
        _check_header(fh.read(8), src)
        fh.seek(0)
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    _digests[key] = digest
    return digest


def compiled_module(digest: str, path: Path, source: str) -> wasmtime.Module:
    """The compiled Module for the file at ``path`` whose sha256 is ``digest``."""
    module = _compiled.get(digest)
    if module is not None:
        return module
    with _engine_lock:
        lock = _compile_locks.setdefault(digest, threading.Lock())
    with lock:
        module = _compiled.get(digest)
        if module is None:
            module = _load_or_compile(digest, path, source)
            _compiled[digest] = module
    return module


def _load_or_compile(digest: str, path: Path, source: str) -> wasmtime.Module:
    eng = engine()
    directory = cache_dir()
    cached = directory / f"{digest}-{engine_fingerprint()}.cwasm"
    trusted = _trusted_dir(directory)
    if trusted and cached.is_file():
        try:
            return wasmtime.Module.deserialize_file(eng, str(cached))
        except wasmtime.WasmtimeError:
            cached.unlink(missing_ok=True)  # stale or damaged: compile again
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise SandboxError(f"{source} changed while it was being loaded; try again")
    _check_header(data[:8], source)
    rewritten = growtrack.rewrite(data).data
    try:
        try:
            module = wasmtime.Module(eng, rewritten)
        except wasmtime.WasmtimeError:
            if rewritten is data:
                raise
            module = wasmtime.Module(eng, data)  # refused growth then goes uncounted
    except wasmtime.WasmtimeError as exc:
        raise InvalidModuleError(
            f"{source} is not a valid WebAssembly module: {_first_line(exc)}"
        ) from exc
    if not trusted:
        return module
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".cwasm", dir=directory)
        with os.fdopen(fd, "wb") as fh:
            fh.write(module.serialize())
        os.replace(tmp, cached)
        # Reload from the file: mmapped code and copy-on-write memory images.
        return wasmtime.Module.deserialize_file(eng, str(cached))
    except (OSError, wasmtime.WasmtimeError):
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)
        return module


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    # wasmtime puts the cause last ("Caused by: ..."); the first line is context.
    if "Caused by:" in text:
        return lines[-1]
    return lines[0]


# -------------------------------------------------------------- linked modules


@dataclass(frozen=True, eq=False)
class WasmModule:
    """A compiled, validated, linked WASI command module: ready to instantiate."""

    digest: str
    source: str
    module: wasmtime.Module
    pre: wasmtime.InstancePre
    min_memory_bytes: int
    trap_imports: frozenset[str]
    linker: wasmtime.Linker  # kept: no Linker finalizer at a random later moment
    #: The module counts its refused memory.grow (see :mod:`tierbox.wasm.growtrack`).
    grow_counted: bool = False


_linked: dict[tuple[str, frozenset[str]], WasmModule] = {}


def load_module(
    path: Path, *, trap_imports: frozenset[str] = frozenset(), source: str | None = None
) -> WasmModule:
    """Load, check and link the WASI module at ``path``.

    ``trap_imports`` names import namespaces (besides WASI) that are satisfied
    by functions that trap when called; images declare them with the
    ``org.tierbox.wasm.trap-imports`` annotation. Every other non-WASI import is
    refused with :class:`InvalidModuleError`.
    """
    src = source or str(path)
    digest = file_digest(path, src)
    key = (digest, trap_imports)
    found = _linked.get(key)
    if found is not None:
        return found
    module = compiled_module(digest, path, src)
    linked = _link(module, digest, src, trap_imports)
    _linked[key] = linked
    return linked


def _link(
    module: wasmtime.Module, digest: str, source: str, trap_imports: frozenset[str]
) -> WasmModule:
    exports = {exp.name: exp.type for exp in module.exports}
    start = exports.get("_start")
    if start is None:
        if "_initialize" in exports:
            raise InvalidModuleError(
                f"{source} is a WASI reactor (a library exporting _initialize), not a command: "
                "it has no _start to run"
            )
        raise InvalidModuleError(
            f"{source} exports no _start function: it is not a WASI command module "
            "(build it as an executable, e.g. clang --target=wasm32-wasi main.c)"
        )
    if not isinstance(start, wasmtime.FuncType) or start.params or start.results:
        raise InvalidModuleError(f"{source}: its _start export is not a function () -> ()")
    foreign: list[str] = []
    for imp in module.imports:
        if imp.module == WASI_MODULE:
            if not isinstance(imp.type, wasmtime.FuncType):
                foreign.append(f"{imp.module}.{imp.name} (not a function)")
        elif imp.module not in trap_imports:
            foreign.append(f"{imp.module}.{imp.name}")
    if foreign:
        more = f" and {len(foreign) - 8} more" if len(foreign) > 8 else ""
        shown = ", ".join(foreign[:8]) + more
        hint = (
            " (wasi_unstable is the pre-2020 WASI ABI: rebuild with a current toolchain)"
            if any(f.startswith("wasi_unstable.") for f in foreign)
            else ""
        )
        raise InvalidModuleError(
            f"{source} imports what tierbox does not provide: {shown}. The wasm tier links "
            f"WASI preview 1 ({WASI_MODULE}) only; build the module for wasm32-wasi without "
            f"host-specific imports{hint}"
        )
    linker = wasmtime.Linker(engine())
    linker.define_wasi()
    linker.allow_shadowing = True
    i32 = wasmtime.ValType.i32()
    linker.define_func(
        WASI_MODULE,
        "poll_oneoff",
        wasmtime.FuncType([i32, i32, i32, i32], [i32]),
        _poll_oneoff,
        access_caller=True,
    )
    linker.define_func(
        WASI_MODULE, "proc_exit", wasmtime.FuncType([i32], []), _proc_exit, access_caller=True
    )
    linker.define_func(
        WASI_MODULE,
        "clock_time_get",
        wasmtime.FuncType([i32, wasmtime.ValType.i64(), i32], [i32]),
        _clock_time_get,
        access_caller=True,
    )
    if trap_imports:
        linker.define_unknown_imports_as_traps(module)
    try:
        pre = linker.instantiate_pre(module)
    except wasmtime.WasmtimeError as exc:
        raise InvalidModuleError(f"{source} cannot be linked: {_first_line(exc)}") from exc
    min_pages = max(
        (t.limits.min for t in exports.values() if isinstance(t, wasmtime.MemoryType)), default=0
    )
    return WasmModule(
        digest=digest,
        source=source,
        module=module,
        pre=pre,
        min_memory_bytes=min_pages * WASM_PAGE,
        trap_imports=trap_imports,
        linker=linker,
        grow_counted=all(name in exports for name in growtrack.EXPORTS),
    )


# ------------------------------------------------------------- poll_oneoff

# WASI preview 1 errno values and record layouts (witx: typenames.witx).
ERRNO_SUCCESS = 0
ERRNO_FAULT = 21
ERRNO_INTR = 27
ERRNO_INVAL = 28
ERRNO_NOTSUP = 58
_SUBSCRIPTION = 48  # userdata u64 | tag u8 @8 | union @16
_EVENT = struct.Struct("<QHBxxxxxQH6x")  # userdata, error, type, nbytes, flags: 32 bytes
_CLOCK = struct.Struct("<IxxxxQQH")  # id, timeout, precision, flags (at offset 16)
_CLOCKS = {0: time.CLOCK_REALTIME, 1: time.CLOCK_MONOTONIC}
_U64 = struct.Struct("<Q")


def _proc_exit(caller: Any, code: int) -> None:
    """WASI ``proc_exit``: any status, where wasmtime's refuses 126 and above.

    Raising from a host function would go through wasmtime-py's process-global
    "last exception" slot, which another thread's call can pick up. So this
    records the status, sets the Store's epoch deadline to now and returns; the
    guest traps at its next epoch check (libc's ``_Exit`` traps right away with
    ``unreachable``) and the run is reported as exited with ``code``.
    """
    try:
        run: RunControl | None = getattr(_tls, "run", None)
        if run is not None:
            run.exit_code = code & 0xFFFFFFFF
            run.stop_reason = "exit"
        if _C is not None:
            _C.set_epoch_deadline(caller._context(), 0)
    except (KeyboardInterrupt, SystemExit) as exc:
        _interrupt(exc, caller)
    except BaseException:  # never into wasmtime-py's shared exception slot
        pass


def _clock_time_get(caller: Any, clock_id: int, _precision: int, time_ptr: int) -> int:
    """WASI ``clock_time_get`` on the host's clocks.

    wasmtime counts the guest's monotonic clock from the start of the run, which
    :func:`_poll_oneoff` (which sleeps on the host) cannot see; so both use the
    host's CLOCK_MONOTONIC. The CPU-time clocks report the running thread's CPU
    time, which is the guest's.
    """
    try:
        if clock_id == 0:
            now = time.time_ns()
        elif clock_id == 1:
            now = time.monotonic_ns()
        elif clock_id in (2, 3):
            now = time.thread_time_ns()
        else:
            return ERRNO_INVAL
        memory = caller.get("memory")
        if not isinstance(memory, wasmtime.Memory):
            return ERRNO_NOTSUP
        memory.write(caller, _U64.pack(now), time_ptr)
        return ERRNO_SUCCESS
    except (IndexError, ValueError, struct.error):
        return ERRNO_FAULT
    except (KeyboardInterrupt, SystemExit) as exc:
        _interrupt(exc, caller)
        return ERRNO_INTR
    except BaseException:  # an exception here would leak into other threads' wasm calls
        return ERRNO_FAULT


def _poll_oneoff(caller: Any, in_ptr: int, out_ptr: int, nsubs: int, nevents_ptr: int) -> int:
    """WASI ``poll_oneoff``, in Python so that a sleeping guest can be interrupted.

    wasmtime's own implementation blocks the thread inside Rust for the whole
    sleep, where neither the epoch deadline (timeout) nor shutdown can reach it.
    The sandbox has no sockets or pipes: every fd is a regular file, which POSIX
    reports as always ready, so only clock subscriptions ever wait.
    """
    try:
        memory = caller.get("memory")
        if not isinstance(memory, wasmtime.Memory):
            return ERRNO_NOTSUP
        if nsubs == 0:
            return ERRNO_INVAL
        raw = memory.read(caller, in_ptr, in_ptr + _SUBSCRIPTION * nsubs)
        if len(raw) != _SUBSCRIPTION * nsubs:
            return ERRNO_FAULT
        events: list[tuple[int, int, int]] = []  # (userdata, errno, type)
        waits: list[tuple[int, int]] = []  # (monotonic deadline ns, userdata)
        now = time.monotonic_ns()
        for i in range(nsubs):
            base = i * _SUBSCRIPTION
            userdata, tag = struct.unpack_from("<QB", raw, base)
            if tag == 0:
                clock_id, timeout, _precision, flags = _CLOCK.unpack_from(raw, base + 16)
                clock = _CLOCKS.get(clock_id)
                if clock is None:
                    events.append((userdata, ERRNO_INVAL, 0))
                    continue
                remaining = timeout - time.clock_gettime_ns(clock) if flags & 1 else timeout
                waits.append((now + max(0, remaining), userdata))
            elif tag in (1, 2):
                events.append((userdata, ERRNO_SUCCESS, tag))
            else:
                return ERRNO_INVAL
        if not events and waits:
            target = min(t for t, _ in waits)
            run: RunControl | None = getattr(_tls, "run", None)
            if run is not None and run.deadline is not None:
                target = min(target, int(run.deadline * 1e9) + 1)
            while (delay := (target - time.monotonic_ns()) / 1e9) > 0:
                if run is None:
                    time.sleep(delay)
                elif run.wake.wait(delay) or _shutting_down:
                    break
            if run is not None and run.should_stop() and _C is not None:
                # Woken by the timeout or a stop: trap at the very next epoch check
                # rather than up to a tick later, when the guest may be done.
                _C.set_epoch_deadline(caller._context(), 0)
            now = time.monotonic_ns()
            events = [(ud, ERRNO_SUCCESS, 0) for t, ud in waits if t <= now]
        out = b"".join(_EVENT.pack(ud, err, kind, 0, 0) for ud, err, kind in events[:nsubs])
        if out:
            memory.write(caller, out, out_ptr)
        memory.write(caller, struct.pack("<I", min(len(events), nsubs)), nevents_ptr)
        return ERRNO_SUCCESS
    except (IndexError, ValueError, struct.error):
        return ERRNO_FAULT
    except (KeyboardInterrupt, SystemExit) as exc:
        _interrupt(exc, caller)
        return ERRNO_INTR
    except BaseException:  # an exception here would leak into other threads' wasm calls
        return ERRNO_FAULT
