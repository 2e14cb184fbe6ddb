"""The ``wasm`` tier: WASI preview 1 modules in-process on wasmtime.

``SandboxSpec.image`` is either a path to a ``.wasm`` file (``./hello.wasm``)
or a Wasm OCI image (``python``, ``micropython``, or any image whose entrypoint
is a ``.wasm`` file; a tagless ``NAME`` means ``NAME:wasi`` when that exists).
``exec(argv)`` runs the image's module with ``argv`` as its arguments (the
image's cmd when empty); the guest sees ``argv[0]`` = the module's name. A
sandbox without an image runs ``.wasm`` files put into it: ``argv[0]`` is then
the module's path inside the sandbox.

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
import itertools
import json
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tierbox import paths
from tierbox.errors import (
    NotSupportedError,
    SandboxClosedError,
    SandboxError,
    SpecError,
    TierboxError,
)
from tierbox.host.rootfs import RootDir
from tierbox.spec import ExecResult, NetworkPolicy, SandboxSpec, Stats, Termination, TerminationKind
from tierbox.tiers import _state
from tierbox.tiers.base import (
    Availability,
    Capabilities,
    DirectoryFiles,
    Instance,
    SnapshotKind,
    SnapshotRef,
    Tier,
)
from tierbox.wasm import engine as eng
from tierbox.wasm.images import Workload, import_wasm, resolve_workload
from tierbox.wasm.runner import fuel_budget, run_wasi

#: Fuel per CPU-second used to turn ``cpus * timeout_s`` into a fuel budget:
#: wasmtime's fuel is roughly one unit per Wasm instruction; this is a round
#: figure measured on x86-64 (CPython-in-Wasm ~4-5e9/s, tight C loops ~1e9/s).
FUEL_PER_CPU_S = 2_000_000_000
FUEL_ENV = "TIERBOX_WASM_FUEL"
USAGE_PREFIX = "wasm-usage."
_serials = itertools.count(1)


__all__ = ["FUEL_PER_CPU_S", "WasmInstance", "WasmTier", "import_wasm", "main"]


def _check_spec(spec: SandboxSpec) -> None:
    if spec.network is not NetworkPolicy.NONE:
        raise NotSupportedError(
            f"the wasm tier has no network (asked for network={spec.network.value}): "
            "WASI preview 1 guests get no sockets; use network=none or another tier"
        )


CAPABILITIES = Capabilities(snapshot=SnapshotKind.RESTORE, in_process=True)


class WasmInstance(DirectoryFiles, Instance):
    """A sandbox directory plus the workload to run in it; no Store lives between execs."""

    tier_name = "wasm"
    capabilities = CAPABILITIES

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
        self._serial = next(_serials)  # names this object's usage record
        self._root_dir: RootDir | None = None

    # ------------------------------------------------------------------ exec

    def _exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> ExecResult:
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed")
        if self.workload is None:
            if not argv:
                raise SandboxError(
                    f"sandbox {self.id} has no image: give the path of a .wasm file inside it"
                )
            module_path = _state.safe_join(self.root, argv[0])
            if not module_path.is_file():
                raise SandboxError(f"{argv[0]}: no such file in sandbox {self.id}")
            module = eng.load_module(module_path, source=argv[0])
            guest_argv = [_argv0(argv[0]), *argv[1:]]
            guest_env = {**self.spec.env, **(env or {})}
        else:
            module = self.workload.module()
            args = list(argv) if argv else list(self.workload.cmd)
            guest_argv = [self.workload.argv0, *args]
            guest_env = {**self.workload.env, **self.spec.env, **(env or {})}
        timeout = timeout_s if timeout_s is not None else self.spec.limits.timeout_s
        with self._lock:
            self._running += 1
        try:
            run = run_wasi(
                module,
                guest_argv,
                env=guest_env,
                root=self.root,
                stdin=stdin,
                limits=self.spec.limits,
                timeout_s=timeout,
                fuel=fuel_budget(self.spec.limits, self._fuel, self._fuel_per_cpu_s),
            )
        finally:
            with self._lock:
                self._running -= 1
        oom = run.result.termination.kind is TerminationKind.OOM_KILLED
        with self._lock:
            self._peak = max(self._peak, run.memory_bytes)
            self._cpu_s += run.cpu_s
            self._ooms += oom
        self._record_usage()
        return run.result

    # Usage is also kept in the sandbox directory (outside the guest's /), one small
    # fixed-size record per Instance object overwritten in place (no lock, no truncation:
    # this is on every exec's path), so that `tierbox sandbox stats` in another
    # process sees what every exec used.

    def _record_usage(self) -> None:
        with self._lock:
            record = f"{self._peak} {self._cpu_s:.6f} {self._ooms}".encode().ljust(64)
        try:
            fd = os.open(
                self.root.parent / f"{USAGE_PREFIX}{os.getpid()}-{self._serial}",
                os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                0o644,
            )
        except OSError:
            return  # closed meanwhile
        try:
            os.pwrite(fd, record, 0)
        finally:
            os.close(fd)

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
        shutil.rmtree(self.root.parent, ignore_errors=True)
        return None


def snapshots_dir() -> Path:
    return paths.home() / "wasm-snapshots"


def _argv0(path: str) -> str:
    base = os.path.basename(path)
    return base[: -len(".wasm")] if base.endswith(".wasm") else base


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
        how = "" if eng._C is not None else " (no epoch callback: output cap checked after runs)"
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
        sandbox_id = _state.new_id()
        root = _state.sandbox_dir(sandbox_id) / "root"
        try:
            root.mkdir(parents=True)
            _state.claim(sandbox_id)
            if workload is not None:
                workload.populate(root)
        except BaseException:
            _state.remove_dir(sandbox_id)
            raise
        return WasmInstance(
            sandbox_id, spec, workload, root, fuel=fuel, fuel_per_cpu_s=self.fuel_per_cpu_s
        )

    def _run(
        self,
        spec: SandboxSpec,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """One-shot without a sandbox directory under $TIERBOX_RUN: a scratch dir as ``/``."""
        _check_spec(spec)
        if not spec.image:
            raise SpecError(
                "the wasm tier needs an image for a one-shot run: a .wasm file or a Wasm image"
            )
        fuel = self.fuel
        workload = resolve_workload(spec.image)
        module = workload.module()
        args = list(argv) if argv else list(workload.cmd)
        root = eng.one_shot_root()
        try:
            workload.populate(root)
            result = run_wasi(
                module,
                [workload.argv0, *args],
                env={**workload.env, **spec.env},
                root=root,
                stdin=stdin,
                limits=spec.limits,
                timeout_s=spec.limits.timeout_s,
                fuel=fuel_budget(spec.limits, fuel, self.fuel_per_cpu_s),
            )
        finally:
            eng.release_one_shot_root(root)
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
            root.parent.mkdir(parents=True)
            _state.claim(sandbox_id)
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
        return eng.reap_scratch()


def _check_memory(workload: Workload, spec: SandboxSpec) -> None:
    limit = spec.limits.memory_mib
    module = workload.module()
    if limit is not None and module.min_memory_bytes > limit * 1024 * 1024:
        raise SpecError(
            f"{workload.source} needs at least {module.min_memory_bytes / (1 << 20):.1f} MiB "
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
