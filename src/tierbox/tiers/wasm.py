"""The ``wasm`` tier: WASI preview 1 modules in-process on wasmtime.

``SandboxSpec.image`` is either a path to a ``.wasm`` file (``./hello.wasm``)
or an image name. A Wasm image (its entrypoint is a ``.wasm`` file) is run as
is; a name with a WASI variant resolves to it, explicitly (a log line, and the
sandbox's record and repr say so): ``python``, ``python:3.11``, ``python:3.12``
are ``python:wasi``, ``micropython`` is ``micropython:wasi``. Images without
one (busybox, debian) are refused with an error naming the images that work.

``argv[0]`` is the program, as on every tier: the image's module by one of its
program names (``python``, ``python3``, ``python3.12`` for python:wasi; the
module's file name with or without ``.wasm``; its entrypoint path), or a
``.wasm`` file inside the sandbox directory (read once through the sandbox's
pinned root). Anything else ends with status 127 (126 for a file that is not
a runnable module) and one line on stderr. The guest sees ``argv`` as given.
An empty ``argv`` in a one-shot run is the image's own command.

Each sandbox is a directory (``$TIERBOX_RUN/sandboxes/<id>/root``) preopened
read-write as the guest's ``/``; every ``exec`` is a fresh wasmtime Store
instantiated from a shared, precompiled ``InstancePre``, so an idle sandbox
holds no Wasm memory at all and survives its creating process (``attach``).

Isolation: the guest can touch only its linear memory and, through WASI, its
own directory. No network (WASI preview 1 sockets are not granted), no host
processes, no clock beyond reading time. Limits: ``memory_mib`` caps linear
memory (growth beyond it is refused), ``timeout_s`` via epoch interruption,
a CPU budget via fuel, ``output_bytes`` per stream. ``pids``, ``disk_mib`` and
``user`` have no meaning here and are ignored.

CPU budget: ``WasmTier(fuel=N)`` or ``TIERBOX_WASM_FUEL=N`` sets N fuel units
(about one per Wasm instruction) per exec; otherwise, when both ``cpus`` and
``timeout_s`` are set, the budget is ``cpus * timeout_s`` CPU-seconds at
:data:`FUEL_PER_CPU_S`; otherwise there is none. Running out is ``cpu_limit``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import itertools
import json
import os
import secrets
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tierbox import paths
from tierbox.errors import (
    InvalidModuleError,
    NotSupportedError,
    SandboxClosedError,
    SandboxError,
    SpecError,
    TierboxError,
)
from tierbox.host import rootfs
from tierbox.host.rootfs import RootDir
from tierbox.spec import (
    MIB,
    ExecResult,
    ProcessInfo,
    SandboxSpec,
    Stats,
    Termination,
    TerminationKind,
    sandbox_path,
)
from tierbox.tiers import _state, teardown
from tierbox.tiers.base import (
    Availability,
    Capabilities,
    DirectoryFiles,
    Instance,
    SnapshotKind,
    SnapshotRef,
    Tier,
)
from tierbox.tiers.commands import Command, ExecRequest, InlineCommand, OutputCallback
from tierbox.tiers.outcome import not_runnable
from tierbox.wasm import control, modules, scratch, wasmtime_private
from tierbox.wasm import engine as eng
from tierbox.wasm.control import RunControl
from tierbox.wasm.images import Workload, import_wasm, resolve_workload
from tierbox.wasm.modules import WasmModule
from tierbox.wasm.runner import WasiRun, fuel_budget, run_wasi

#: Fuel per CPU-second used to turn ``cpus * timeout_s`` into a fuel budget:
#: wasmtime's fuel is roughly one unit per Wasm instruction; this is a round
#: figure measured on x86-64 (CPython-in-Wasm ~4-5e9/s, tight C loops ~1e9/s).
FUEL_PER_CPU_S = 2_000_000_000
FUEL_ENV = "TIERBOX_WASM_FUEL"
USAGE_PREFIX = "wasm-usage."
#: sandbox directories made ahead and reused (tiers/_state.py)
_SLOTS = _state.DirSlots()
#: The largest module ``exec`` reads from inside a sandbox (it is compiled in memory).
MAX_SANDBOX_MODULE_BYTES = 256 * MIB
#: Modules from inside one sandbox remembered (by path and inode) between execs.
SANDBOX_MODULES_KEPT = 8
_serials = itertools.count(1)


__all__ = ["FUEL_PER_CPU_S", "WasmInstance", "WasmTier", "import_wasm", "main"]


def _preopens(spec: SandboxSpec) -> list[tuple[str, str, bool]]:
    """The spec's mounts as WASI preopened directories (host, guest, mutable)."""
    return [(m.host, m.path, not m.read_only) for m in spec.mounts]


def _check_spec(spec: SandboxSpec) -> None:
    for m in spec.mounts:
        if not os.path.isdir(m.host):
            raise NotSupportedError(
                f"mount {m.host}: WASI preopens directories only; mount its directory, "
                "or use a tier that binds files (container, gvisor)"
            )


CAPABILITIES = Capabilities(snapshot=SnapshotKind.RESTORE, in_process=True, stdin_stream=False)


class WasmInstance(DirectoryFiles, Instance):
    """A sandbox directory plus the workload to run in it; no Store lives between execs."""

    tier_name = "wasm"
    capabilities = CAPABILITIES
    tears_down_in_background = True

    def __init__(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        workload: Workload | None,
        root: Path,
        *,
        fuel: int | None,
        fuel_per_cpu_s: int,
    ) -> None:
        self.id = sandbox_id
        self.spec = spec
        self.workload = workload
        self.root = root
        self._fuel = fuel
        self._fuel_per_cpu_s = fuel_per_cpu_s
        self._lock = threading.Lock()
        self._running = 0
        self._closed = False
        self._peak = 0
        self._cpu_s = 0.0
        self._ooms = 0
        self._root_dir: RootDir | None = None
        #: this object's usage record, opened when its first command starts (or kept from
        #: a reused directory's last sandbox, cleared)
        self._usage: _state.Record | None = None
        #: running commands: a number of tierbox's own -> argv (no pids in WASI)
        self._commands: dict[int, list[str]] = {}
        #: runs going on now, whose linear memory sample() reads
        self._live: dict[int, RunControl] = {}
        self._modules: dict[str, tuple[tuple[int, ...], WasmModule]] = {}

    @property
    def image(self) -> str | None:
        """The resolved image (python:wasi for python:3.11, say)."""
        w = self.workload
        return None if w is None else (w.image_ref or w.source)

    def __repr__(self) -> str:
        w = self.workload
        asked = f" requested={w.requested}" if w is not None and w.requested else ""
        return f"<WasmInstance {self.id} image={self.image or '-'}{asked}>"

    # ------------------------------------------------------------------ exec

    def _start(self, req: ExecRequest) -> Command:
        """A run is a blocking call on the caller's thread (the guest computes
        in this process); background and async runs get a thread of their own."""
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed")
        for what, value in (("user", req.user), ("cwd", req.cwd)):
            if value is not None and not (what == "cwd" and value == "/"):
                raise NotSupportedError(
                    f"the wasm tier has no {'users' if what == 'user' else 'working directory'}"
                    f" (WASI preview 1): {what}={value!r} cannot apply; tiers that can: "
                    "process, container, gvisor, microvm, vm"
                )
        if req.keep_stdin_open:
            raise NotSupportedError(
                "the wasm tier takes a command's stdin at start (WASI reads it from a file): "
                "pass stdin=...; tiers that stream stdin: process, container, gvisor"
            )
        runs: list[RunControl] = []

        def kill(_sig: int) -> None:
            for run in runs:
                run.cancel()

        return InlineCommand(lambda: self._run_command(req, runs.append), kill=kill)

    def _run_command(
        self, req: ExecRequest, on_start: Callable[[RunControl], object]
    ) -> ExecResult:
        started = time.monotonic()
        argv, env = req.argv, req.env
        w = self.workload
        if w is not None and argv[0] in w.programs:
            # kept with the workload: a sandbox keeps the image it started with
            module: WasmModule | OSError = w.module()
        else:
            module = self._sandbox_module(argv[0])
        if isinstance(module, OSError):
            return not_runnable(argv[0], module, time.monotonic() - started)
        guest_env = {**(w.env if w is not None else {}), **self.spec.env, **(env or {})}
        timeout = req.timeout(self.spec.limits.timeout_s)
        token = next(_serials)
        with self._lock:
            if self._closed:
                raise SandboxClosedError(f"sandbox {self.id} is closed")
            self._running += 1
            self._commands[token] = list(argv)
            # the record is there while the command runs: a directory holding
            # another process's record is never handed to a new sandbox (its
            # command may still write there), see close()
            self._own_usage()

        def begun(run: RunControl) -> None:
            self._live[token] = run
            on_start(run)

        run: WasiRun | None = None
        try:
            run = run_wasi(
                module,
                argv,
                env=guest_env,
                root=self.root,
                stdin=req.stdin,
                limits=self.spec.limits,
                timeout_s=timeout,
                fuel=fuel_budget(self.spec.limits, self._fuel, self._fuel_per_cpu_s),
                on_stdout=req.on_stdout,
                on_stderr=req.on_stderr,
                on_start=begun,
                preopens=_preopens(self.spec),
            )
        finally:
            with self._lock:
                self._running -= 1
                self._commands.pop(token, None)
                self._live.pop(token, None)
                if run is not None:
                    self._peak = max(self._peak, run.memory_bytes)
                    self._cpu_s += run.cpu_s
                    self._ooms += run.result.termination.kind is TerminationKind.OOM_KILLED
                    self._write_usage()
        assert run is not None
        return run.result

    def _sandbox_module(self, name: str) -> WasmModule | OSError:
        """The module ``argv[0]`` names inside the sandbox, or why it cannot run.

        Opened once, through the sandbox's pinned root (openat2, so no path
        can leave it), then read from that one fd: nothing is checked and then
        opened again. Remembered by inode so a rerun costs one open and fstat.
        """
        if not _names_a_file(name):
            return FileNotFoundError(errno.ENOENT, "command not found")
        path = sandbox_path(name, cwd=self.workdir)
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
        try:
            fd = rootfs.openat2(self._files_root().fd, path, flags)
        except OSError as exc:
            return exc
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                return IsADirectoryError(errno.EISDIR, "Is a directory")
            if not stat.S_ISREG(st.st_mode):
                return PermissionError(errno.EACCES, "not a regular file")
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            kept = self._modules.get(path)
            if kept is not None and kept[0] == key:
                return kept[1]
            data = (
                _read_fd(fd, MAX_SANDBOX_MODULE_BYTES)
                if st.st_size <= MAX_SANDBOX_MODULE_BYTES
                else None
            )
        finally:
            os.close(fd)
        if data is None:
            cap = MAX_SANDBOX_MODULE_BYTES // MIB
            return OSError(errno.EFBIG, f"larger than the {cap} MiB cap on a module")
        try:
            module = modules.load_module_bytes(data, source=path)
        except InvalidModuleError as exc:
            return OSError(errno.ENOEXEC, _reason(str(exc), path))
        with self._lock:
            if len(self._modules) >= SANDBOX_MODULES_KEPT:
                self._modules.pop(next(iter(self._modules)))
            self._modules[path] = (key, module)
        return module

    # Usage is also kept in the sandbox directory (outside the guest's /), one small
    # fixed-size record per Instance object and process, overwritten in place
    # after each exec (no truncation: this is on every exec's path), so that
    # `tierbox sandbox stats` in another process sees what every exec used. A
    # directory kept for reuse keeps this process's record, blanked, for the
    # next sandbox (creating and deleting the file cost ~40 us per sandbox).

    def _own_usage(self) -> None:
        """This process's usage record, opened once (under the lock). A forked
        child opens its own: the inherited one may be handed on by the parent."""
        usage = self._usage
        if usage is not None and usage.pid != os.getpid():
            with contextlib.suppress(OSError):
                usage.close()
            usage = None
        if usage is None:
            self._usage = _open_usage(self.root.parent)

    def _write_usage(self) -> None:
        """Under the lock, which close() takes to give the record up, so a
        write never lands in a record handed to another sandbox. The file is
        opened once and kept: an open and a close per exec cost ~30 us on a
        disk-backed /run."""
        if self._closed or self._usage is None or self._usage.pid != os.getpid():
            return
        with contextlib.suppress(OSError):  # a full disk loses the figure, not the run
            os.pwrite(
                self._usage.fd, _usage_bytes(f"{self._peak} {self._cpu_s:.6f} {self._ooms}"), 0
            )

    def _recorded_usage(self) -> tuple[int, float, int]:
        """Sum of every process's record: peak memory, CPU seconds, OOM kills."""
        peak, cpu, ooms = 0, 0.0, 0
        for path in self.root.parent.glob(f"{USAGE_PREFIX}*"):
            try:
                p, c, o = path.read_bytes().split()
                peak, cpu, ooms = max(peak, int(p)), cpu + float(c), ooms + int(o)
            except (OSError, ValueError):
                continue
        return peak, cpu, ooms

    # ----------------------------------------------------------------- files

    def processes(self) -> list[ProcessInfo]:
        """The commands running now, each an instance in this process; WASI
        has no processes, so their numbers are tierbox's own."""
        with self._lock:
            return [
                ProcessInfo(pid=n, ppid=0, user="-", argv=argv, state="R")
                for n, argv in sorted(self._commands.items())
            ]

    def hold_resident(self) -> Callable[[], None]:
        """A live Store with the workload instantiated: what a running
        sandbox of this tier holds in memory (nothing lives between execs)."""
        if self.workload is None:
            return lambda: None
        import wasmtime

        store = wasmtime.Store(eng.engine())
        store.set_wasi(wasmtime.WasiConfig())
        held = [store, self.workload.module().pre.instantiate(store)]
        return held.clear

    def _files_root(self) -> RootDir:
        """The sandbox directory, pinned at first use (WASI has no users:
        files are the host user's)."""
        with self._lock:
            if self._closed:
                raise SandboxClosedError(f"sandbox {self.id} is closed")
            if self._root_dir is None:
                self._root_dir = RootDir.open(str(self.root), uid=None, gid=None, label=self.id)
            return self._root_dir

    def stats(self) -> Stats:
        """Peak linear memory, CPU time and OOMs of every exec so far (any process);
        ``memory_bytes`` is 0 when idle: no Wasm memory lives between execs."""
        rec_peak, rec_cpu, rec_ooms = self._recorded_usage()
        with self._lock:
            peak = max(self._peak, rec_peak)
            return Stats(
                memory_bytes=peak if self._running else 0,
                memory_peak_bytes=peak,
                cpu_s=max(self._cpu_s, rec_cpu),
                pids=self._running,
                oom_kills=max(self._ooms, rec_ooms),
            )

    def sample(self) -> Stats:
        """The linear memory of the runs going on now (as of their last
        epoch tick, ~10 ms), not the peak of past ones that ``stats()`` gives."""
        with self._lock:
            live = list(self._live.values())
        return Stats(memory_bytes=sum(r.memory_bytes for r in live), pids=len(live))

    def state(self) -> dict[str, Any]:
        """What ``WasmTier.attach`` needs to rebuild this instance in another process."""
        return {
            "spec": self.spec.to_dict(),
            "root": str(self.root),
            "workload": self.workload.to_state() if self.workload else None,
            "fuel": self._fuel,
        }

    def snapshot(self) -> SnapshotRef:
        """Copy the sandbox directory (the only state a Wasm sandbox keeps between execs)."""
        with self._lock:
            if self._closed:
                raise SandboxClosedError(f"sandbox {self.id} is closed")
            if self._running:
                raise SandboxError(f"sandbox {self.id} is running a command: snapshot it when idle")
            dest = snapshots_dir() / f"{self.id}-{secrets.token_hex(4)}"
            dest.mkdir(parents=True)
            shutil.copytree(self.root, dest / "root", symlinks=True)
        meta = {
            "sandbox": self.id,
            "created": time.time(),
            "spec": self.spec.to_dict(),
            "workload": self.workload.to_state() if self.workload else None,
            "fuel": self._fuel,
        }
        (dest / "meta.json").write_text(json.dumps(meta, indent=1))
        return SnapshotRef(tier="wasm", path=str(dest), meta=meta)

    def close(self) -> Termination | None:
        with self._lock:
            if self._closed:
                return None
            self._closed = True
            if self._root_dir is not None:
                self._root_dir.close()
            # commands still running (background ones, other threads) stop
            # at their next epoch tick, as a SIGKILL would stop them
            for run in self._live.values():
                run.cancel()
            usage, self._usage = self._usage, None
            # a command still running holds the directory open: it is not
            # handed to another sandbox (commands count themselves in under
            # this lock, or see the sandbox closed)
            reusable = self._running == 0
        # the directory is kept for the next create if the workload left it
        # as made (a check and a rename, ~0.1 ms: here, since handing it to
        # the teardown thread costs more), else deleted off the caller's
        # path (tiers/teardown.py)
        directory = self.root.parent
        if usage is not None:  # cleared for whoever gets the directory next
            try:
                os.pwrite(usage.fd, _usage_bytes(""), 0)
            except OSError:
                reusable = False
        if reusable and self.root.name == "root" and _SLOTS.give_back(directory, record=usage):
            return None
        if usage is not None:
            usage.close()
        teardown.later(
            f"sandbox {self.id}", functools.partial(shutil.rmtree, directory, ignore_errors=True)
        )
        return None


#: The size of a usage record: each write replaces the last in place.
USAGE_BYTES = 64


def _usage_bytes(text: str) -> bytes:
    return text.encode().ljust(USAGE_BYTES)[:USAGE_BYTES]


def _open_usage(directory: Path) -> _state.Record | None:
    """A new usage record file in a sandbox directory, kept open."""
    name = f"{USAGE_PREFIX}{os.getpid()}-{next(_serials)}"
    try:
        fd = os.open(f"{directory}/{name}", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return None
    return _state.Record(fd, name, os.getpid())


def snapshots_dir() -> Path:
    return paths.home() / "wasm-snapshots"


def _names_a_file(name: str) -> bool:
    """A program name with a ``/`` or a ``.wasm`` suffix is a file in the sandbox
    (there is no PATH to search: bare names are the image's programs only)."""
    return "/" in name or name.endswith(".wasm")


def _read_fd(fd: int, max_bytes: int) -> bytes | None:
    """The whole file, or None when it holds (or grew to) more than ``max_bytes``."""
    chunks: list[bytes] = []
    total = 0
    while chunk := os.read(fd, min(MIB, max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            return None
    return b"".join(chunks)


def _reason(message: str, path: str) -> str:
    """An InvalidModuleError's message without the leading file name, on one line."""
    text = " ".join(message.split())
    for prefix in (path, ":", " ", "is "):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    return text or "not a runnable WebAssembly module"


class WasmTier(Tier):
    name = "wasm"
    capabilities = CAPABILITIES
    isolation = "Wasm linear memory + WASI p1: own directory as /, no network, no processes"

    def __init__(self, fuel: int | None = None, *, fuel_per_cpu_s: int = FUEL_PER_CPU_S) -> None:
        if fuel is not None and fuel < 1:
            raise SpecError(f"fuel={fuel} must be a positive number of fuel units")
        self._fuel_arg = fuel
        self.fuel_per_cpu_s = fuel_per_cpu_s

    @property
    def fuel(self) -> int | None:
        """The explicit per-exec fuel budget: the constructor's, else ``$TIERBOX_WASM_FUEL``."""
        if self._fuel_arg is not None:
            return self._fuel_arg
        text = os.environ.get(FUEL_ENV, "").strip().replace("_", "")
        if not text:
            return None
        if not text.isdigit() or int(text) < 1:
            raise SpecError(f"{FUEL_ENV}={text!r} must be a positive integer (fuel units)")
        return int(text)

    def available(self) -> Availability:
        version = eng.wasmtime_version()
        try:
            eng.engine()
        except Exception as exc:  # a broken wasmtime install
            return Availability(False, f"wasmtime cannot start: {exc}", "wasmtime", version)
        how = ""
        if not control.precise_stops():
            changed = "; ".join(wasmtime_private.problems()) or "its C API could not be loaded"
            how = f" (no epoch callback, output cap checked after runs: {changed})"
        return Availability(
            True,
            f"wasmtime {version} in-process, WASI preview 1{how}",
            engine="wasmtime",
            version=version,
        )

    def _create(self, spec: SandboxSpec) -> WasmInstance:
        _check_spec(spec)
        fuel = self.fuel
        workload = resolve_workload(spec.image) if spec.image else None
        if workload is not None:
            _check_memory(workload, spec)
        # root/ with an empty tmp/ (every sandbox has a /tmp), perhaps a usage record
        sandbox_id, root, record = _SLOTS.take()
        try:
            if workload is not None:
                workload.populate(root)
        except BaseException:
            if record is not None:
                record.close()
            _state.remove_dir(sandbox_id)
            raise
        inst = WasmInstance(
            sandbox_id, spec, workload, root, fuel=fuel, fuel_per_cpu_s=self.fuel_per_cpu_s
        )
        inst._usage = record
        return inst

    def _run(
        self,
        spec: SandboxSpec,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """One-shot without a sandbox directory under $TIERBOX_RUN: a scratch dir as ``/``."""
        _check_spec(spec)
        if not spec.image:
            raise SpecError(
                "the wasm tier needs an image for a one-shot run: a .wasm file or a Wasm image"
            )
        fuel = self.fuel
        workload = resolve_workload(spec.image)
        if argv and argv[0] not in workload.programs:
            if not _names_a_file(argv[0]):
                missing = FileNotFoundError(errno.ENOENT, "command not found")
                return not_runnable(argv[0], missing, 0.0)
            return super()._run(  # a module among the image's files
                spec, argv, stdin=stdin, on_stdout=on_stdout, on_stderr=on_stderr
            )
        module = workload.module()
        guest_argv = list(argv) if argv else [workload.argv0, *workload.cmd]
        root = scratch.one_shot_root()
        try:
            workload.populate(root)
            result = run_wasi(
                module,
                guest_argv,
                env={**workload.env, **spec.env},
                root=root,
                stdin=stdin,
                limits=spec.limits,
                timeout_s=spec.limits.timeout_s,
                fuel=fuel_budget(spec.limits, fuel, self.fuel_per_cpu_s),
                preopens=_preopens(spec),
                on_stdout=on_stdout,
                on_stderr=on_stderr,
            )
        finally:
            scratch.release_one_shot_root(root)
        return result.result

    def attach(self, sandbox_id: str, state: dict[str, Any]) -> WasmInstance:
        spec = SandboxSpec.from_dict(state["spec"])
        root = Path(state.get("root") or _state.sandbox_dir(sandbox_id) / "root")
        if not root.is_dir():
            raise SandboxError(f"sandbox {sandbox_id}: its directory {root} is gone")
        data = state.get("workload")
        workload = Workload.from_state(data) if data else None
        fuel = state.get("fuel")
        return WasmInstance(
            sandbox_id,
            spec,
            workload,
            root,
            fuel=int(fuel) if fuel is not None else self.fuel,
            fuel_per_cpu_s=self.fuel_per_cpu_s,
        )

    def restore(self, snap: SnapshotRef) -> WasmInstance:
        if snap.tier != self.name:
            raise SpecError(f"snapshot {snap.path} belongs to the {snap.tier} tier, not wasm")
        src = Path(snap.path) / "root"
        if not src.is_dir():
            raise SandboxError(f"snapshot {snap.path} is incomplete: no root directory")
        spec = SandboxSpec.from_dict(snap.meta["spec"])
        data = snap.meta.get("workload")
        workload = Workload.from_state(data) if data else None
        sandbox_id = _state.new_id()
        root = _state.sandbox_dir(sandbox_id) / "root"
        try:
            _state.make_dir(sandbox_id)
            shutil.copytree(src, root, symlinks=True)
        except BaseException:
            _state.remove_dir(sandbox_id)
            raise
        fuel = snap.meta.get("fuel")
        return WasmInstance(
            sandbox_id,
            spec,
            workload,
            root,
            fuel=int(fuel) if fuel is not None else self.fuel,
            fuel_per_cpu_s=self.fuel_per_cpu_s,
        )

    def reap(self, live: set[str]) -> list[str]:
        """Scratch directories (stdout/stderr files, one-shot roots) of dead processes.
        Sandbox directories under $TIERBOX_RUN are gc's own job."""
        return scratch.reap()


def _check_memory(workload: Workload, spec: SandboxSpec) -> None:
    limit = spec.limits.memory_mib
    module = workload.module()
    if limit is not None and module.min_memory_bytes > limit * MIB:
        raise SpecError(
            f"{workload.source} needs at least {module.min_memory_bytes / MIB:.1f} MiB "
            f"of linear memory at start but memory_mib={limit}: raise the memory limit"
        )


# ------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tierbox.tiers.wasm setup|import|status`` (setup scripts, debugging)."""
    from tierbox.wasm import images

    parser = argparse.ArgumentParser(prog="python -m tierbox.tiers.wasm")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="install the built-in python:wasi and micropython:wasi images")
    imp = sub.add_parser("import", help="wrap a WASI module as an image")
    imp.add_argument("file")
    imp.add_argument("name")
    sub.add_parser("status", help="show the engine and built-in images")
    args = parser.parse_args(argv)
    try:
        if args.command == "setup":
            for builtin in images.BUILTINS.values():
                images.install_builtin(builtin, progress=lambda m: print(f"wasm: {m}", flush=True))
        elif args.command == "import":
            record = images.import_wasm(args.file, args.name)
            print(f"{record.ref} {record.manifest_digest[:19]}")
        else:
            avail = WasmTier().available()
            print(f"wasm tier: {'available' if avail.available else 'unavailable'}: {avail.reason}")
            for ref in images.BUILTINS:
                try:
                    w = images.workload_for_image(ref)
                    print(f"{ref}: {w.module_path}")
                except TierboxError as exc:
                    print(f"{ref}: missing ({exc})")
    except TierboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
