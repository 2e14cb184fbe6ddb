"""One WASI run: a fresh Store, instantiate from the InstancePre, call ``_start``.

What the guest gets: ``argv``, ``env``, stdin (bytes, or an empty stream), and
one directory preopened read-write as ``/``. Nothing else of the host is
visible: no other preopens, no sockets, no inherited stdio.

stdout and stderr go to files in a per-thread scratch directory, written by
wasmtime itself (no Python, no GIL in the write path). The epoch callback
checks their sizes every tick and stops the run once one exceeds
``limits.output_bytes``; afterwards at most that many bytes are read back, so a
flood costs at most one tick of disk writes and never memory.

How a run ends (:class:`~tierbox.spec.TerminationKind`):

==============================  ===========================================
WASI ``proc_exit(n)`` / return   ``exited`` with code ``n`` (0 on return)
wall clock over ``timeout_s``    ``timed_out`` (epoch callback)
a stream over ``output_bytes``   ``output_limit`` (epoch callback)
fuel exhausted                   ``cpu_limit`` with the budget as evidence
a failure after refused growth   ``oom_killed`` (see :func:`_classify`)
any other trap                   ``signaled``; evidence names the trap code
==============================  ===========================================

Refused ``memory.grow`` is counted by the module itself (rewritten before it
was compiled, see :mod:`tierbox.wasm.growtrack`) and recorded in the evidence
of every termination, whatever its kind: ``memory_grow_refused`` (how many),
``memory_grow_requested_mib`` (the largest size asked for),
``memory_grow_last_requested_mib``, ``limit_mib`` and ``peak_mib``. A guest that
handles the refusal and exits 0 still ends ``exited``, with that evidence.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import wasmtime

from tierbox.errors import SandboxError, SpecError
from tierbox.spec import MIB, ExecResult, Limits, Termination, TerminationKind
from tierbox.wasm import control, growtrack, scratch
from tierbox.wasm.engine import UNLIMITED_FUEL, engine
from tierbox.wasm.modules import WASM_PAGE, WasmModule, first_line

#: Output files up to this size are left for the next run's open (which truncates).
_KEEP_BYTES = MIB
#: What the first read of an output file asks for (most output is smaller).
_FIRST_READ = 64 * 1024

#: Native signal that best matches each trap, so shell status and `describe()`
#: read like a crashed process: unreachable (abort()) -> SIGABRT, bad memory
#: access or stack overflow -> SIGSEGV, arithmetic -> SIGFPE, others -> SIGILL.
_TRAP_SIGNALS: dict[str, int] = {
    "UNREACHABLE": signal.SIGABRT,
    "STACK_OVERFLOW": signal.SIGSEGV,
    "MEMORY_OUT_OF_BOUNDS": signal.SIGSEGV,
    "TABLE_OUT_OF_BOUNDS": signal.SIGSEGV,
    "INDIRECT_CALL_TO_NULL": signal.SIGSEGV,
    "NULL_REFERENCE": signal.SIGSEGV,
    "ARRAY_OUT_OF_BOUNDS": signal.SIGSEGV,
    "HEAP_MISALIGNED": signal.SIGBUS,
    "INTEGER_OVERFLOW": signal.SIGFPE,
    "INTEGER_DIVISION_BY_ZERO": signal.SIGFPE,
    "BAD_CONVERSION_TO_INTEGER": signal.SIGFPE,
}


@dataclass(frozen=True)
class GrowRefusals:
    """What the rewritten module counted: refused ``memory.grow`` calls."""

    count: int
    last_pages: int  # size asked for by the last refused call, current size included
    max_pages: int  # the largest size asked for


@dataclass(frozen=True)
class WasiRun:
    """The result of a run plus what the sandbox accounts for it."""

    result: ExecResult
    memory_bytes: int  # linear memory size at the end (it never shrinks: also the peak)
    cpu_s: float


def check_env(env: Mapping[str, str]) -> None:
    """WASI passes C strings: no NUL bytes, no '=' in names. (argv was checked
    by ``Instance.exec``/``Tier.run`` for every tier.)"""
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise SpecError(f"bad environment variable name or value: {key!r}")


def fuel_budget(limits: Limits, explicit: int | None, fuel_per_cpu_s: int) -> int | None:
    """The CPU budget of a run in fuel units (~ Wasm instructions), or None for no budget.

    An explicit budget (``WasmTier(fuel=...)`` or ``TIERBOX_WASM_FUEL``) wins;
    otherwise ``cpus * timeout_s`` CPU-seconds at ``fuel_per_cpu_s`` when both
    limits are set.
    """
    if explicit is not None:
        return explicit
    if limits.cpus is not None and limits.timeout_s is not None:
        return max(1, int(limits.cpus * limits.timeout_s * fuel_per_cpu_s))
    return None


def run_wasi(
    module: WasmModule,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    root: Path,
    stdin: bytes | None,
    limits: Limits,
    timeout_s: float | None,
    fuel: int | None,
    on_stdout: Callable[[bytes], object] | None = None,
    on_stderr: Callable[[bytes], object] | None = None,
    on_start: Callable[[control.RunControl], object] | None = None,
    preopens: Sequence[tuple[str, str, bool]] = (),
) -> WasiRun:
    """Run ``module``'s ``_start`` once with ``root`` preopened as ``/``;
    ``argv`` is the guest's, program first. ``on_stdout``/``on_stderr`` get
    output as the guest writes it (checked every epoch tick); ``on_start``
    gets the run's control (to cancel it from another thread)."""
    check_env(env)
    limit_bytes = limits.memory_mib * MIB if limits.memory_mib is not None else None
    if limit_bytes is not None and module.min_memory_bytes > limit_bytes:
        raise SpecError(
            f"{module.source} needs at least {module.min_memory_bytes / MIB:.1f} MiB of linear "
            f"memory at start but memory_mib={limits.memory_mib}: raise the memory limit"
        )
    guard = control.SignalGuard()
    with guard:
        return _run_guarded(
            guard,
            module,
            argv,
            env,
            root,
            stdin,
            limits,
            limit_bytes,
            timeout_s,
            fuel,
            (on_stdout, on_stderr),
            on_start,
            preopens,
        )


def _run_guarded(
    guard: control.SignalGuard,
    module: WasmModule,
    argv: Sequence[str],
    env: Mapping[str, str],
    root: Path,
    stdin: bytes | None,
    limits: Limits,
    limit_bytes: int | None,
    timeout_s: float | None,
    fuel: int | None,
    sinks: tuple[Callable[[bytes], object] | None, Callable[[bytes], object] | None],
    on_start: Callable[[control.RunControl], object] | None,
    preopens: Sequence[tuple[str, str, bool]],
) -> WasiRun:
    files = scratch.thread_files()
    out_path, err_path, in_path = files.stdout, files.stderr, files.stdin
    cap = limits.output_bytes
    run = control.RunControl(timeout_s=timeout_s, outputs=(out_path, err_path), cap=cap)
    if any(sinks):
        run.sinks = sinks
    if on_start is not None:
        on_start(run)
    guard.run = run
    budget = fuel if fuel is not None else UNLIMITED_FUEL

    store = wasmtime.Store(engine())
    started = time.monotonic()
    cpu_started = time.thread_time()
    exit_code: int | None = None
    trap: wasmtime.Trap | None = None
    error: BaseException | None = None
    memory_bytes = 0
    refusals: GrowRefusals | None = None
    fuel_left = budget
    try:
        store.set_limits(
            memory_size=limit_bytes if limit_bytes is not None else -1,
            table_elements=1 << 20,
            instances=1,
            tables=16,
            memories=1,
        )
        store.set_fuel(budget)
        try:
            wasi = wasmtime.WasiConfig()
            wasi.argv = list(argv)
            if env:
                wasi.env = list(env.items())
            wasi.preopen_dir(str(root), "/")
            for host, guest, mutable in preopens:  # host directories (Mount): WASI preopens
                wasi.preopen_dir(host, guest, mutable)
            wasi.stdout_file = out_path
            wasi.stderr_file = err_path
            if stdin:
                with open(in_path, "wb") as fh:
                    fh.write(stdin)
                wasi.stdin_file = in_path
            store.set_wasi(wasi)
        except (wasmtime.WasmtimeError, OSError) as exc:
            raise SandboxError(
                f"cannot set up WASI for {module.source} (sandbox directory {root}): {exc}"
            ) from exc
        control.begin_run(store, run)
        try:
            try:
                instance = module.pre.instantiate(store)
            except wasmtime.Trap as exc:  # a start function trapped
                trap = exc
            except wasmtime.WasmtimeError as exc:
                raise _instantiate_error(module, limits, exc) from exc
            else:
                api = control.fast_api()
                export = _exports(store, instance)
                start = export("_start")
                assert isinstance(start, wasmtime.Func)
                memory = export("memory")
                if isinstance(memory, wasmtime.Memory):  # sampled at each tick
                    run.memory, run.store = memory, store
                    run.measure()
                try:
                    if api is not None:
                        api.call_nullary(store, start)  # _start is () -> (): checked at link
                    else:
                        start(store)
                    exit_code = 0
                except wasmtime.ExitTrap as exc:
                    exit_code = exc.code
                except wasmtime.Trap as exc:
                    trap = exc
                except Exception as exc:  # WasmtimeError from the epoch callback, or stray
                    error = exc
                if isinstance(memory, wasmtime.Memory):
                    memory_bytes = memory.data_len(store)
                if module.grow_counted:
                    refusals = _grow_refusals(export, store)
            with contextlib.suppress(wasmtime.WasmtimeError):
                fuel_left = store.get_fuel()
        finally:
            control.end_run(run)
    finally:
        store.close()
    if run.interrupt is not None:
        raise run.interrupt
    if run.sinks:
        run.stream()  # what the guest wrote after the last tick
    duration = time.monotonic() - started
    cpu_s = time.thread_time() - cpu_started
    stdout, out_over = _read_capped(files.stdout_fd, out_path, cap)
    stderr, err_over = _read_capped(files.stderr_fd, err_path, cap)
    fuel_used = max(0, budget - fuel_left)
    term = _classify(
        run=run,
        interrupt_signal=guard.pending[0][0] if guard.pending else int(signal.SIGINT),
        exit_code=exit_code,
        trap=trap,
        error=error,
        output_over=out_over or err_over,
        limits=limits,
        limit_bytes=limit_bytes,
        memory_bytes=memory_bytes,
        timeout_s=timeout_s,
        fuel=fuel,
        fuel_used=fuel_used,
        refusals=refusals,
    )
    result = ExecResult(
        stdout=stdout,
        stderr=stderr,
        termination=term,
        duration_s=duration,
        stdout_truncated=out_over,
        stderr_truncated=err_over,
    )
    return WasiRun(result=result, memory_bytes=memory_bytes, cpu_s=cpu_s)


def _read_capped(fd: int, path: str, cap: int) -> tuple[bytes, bool]:
    """At most ``cap`` bytes of the file open as ``fd``, and whether there was
    more; a large file is emptied afterwards. Most output fits the first read,
    so a run's output costs one system call per stream."""
    first = min(cap + 1, _FIRST_READ)
    data = os.pread(fd, first, 0)
    if len(data) < first:
        return data, False
    size = os.fstat(fd).st_size
    chunks = [data]
    got = len(data)
    while got < min(size, cap + 1):
        chunk = os.pread(fd, min(size, cap + 1) - got, got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    if size > _KEEP_BYTES:  # give a flood's space back now, not at the next run
        with contextlib.suppress(FileNotFoundError):  # removed at interpreter exit
            os.truncate(path, 0)
    out = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return out[:cap], got > cap or size > cap


def _instantiate_error(module: WasmModule, limits: Limits, exc: BaseException) -> Exception:
    text = first_line(exc)
    if "memory" in text and limits.memory_mib is not None:
        return SpecError(
            f"{module.source} cannot start within memory_mib={limits.memory_mib}: {text}"
        )
    return SandboxError(f"{module.source} could not be instantiated: {text}")


def _exports(store: wasmtime.Store, instance: wasmtime.Instance) -> Callable[[str], Any]:
    """Look up ``instance``'s exports one by one (through the C API when
    tierbox's private calls load: wrapping all of them costs more)."""
    api = control.fast_api()
    if api is None:
        return instance.exports(store).get
    return lambda name: api.export(store, instance, name.encode())


def _grow_refusals(export: Callable[[str], Any], store: wasmtime.Store) -> GrowRefusals | None:
    """The counters the rewritten module kept, read before its Store goes
    (the sizes only when something was refused: each read is a host call)."""
    api = control.fast_api()

    def read(name: str) -> int | None:
        g = export(name)
        if not isinstance(g, wasmtime.Global):
            return None
        if api is not None:
            return api.global_i64(store, g)
        value = g.value(store)
        return int(value) if isinstance(value, int) else None

    count = read(growtrack.COUNT)
    if count is None:
        return None
    if count == 0:
        return GrowRefusals(count=0, last_pages=0, max_pages=0)
    values = [read(name) for name in growtrack.EXPORTS]
    if any(v is None for v in values):
        return None
    return GrowRefusals(count=values[0] or 0, last_pages=values[1] or 0, max_pages=values[2] or 0)


def _oom_suspected(
    exit_code: int | None, failed: bool, limit_bytes: int | None, memory_bytes: int
) -> bool:
    """Did a run whose module could not be rewritten to count refused growth
    fail because ``memory.grow`` was refused at the limit?

    Inferred: the run failed (non-zero exit or a trap) while its linear memory
    was within 1/16 of the limit (at least 1 MiB) — as close as an allocator
    gets before a request no longer fits.
    """
    if limit_bytes is None or not failed:
        return False
    headroom = max(MIB, limit_bytes // 16)
    return memory_bytes + headroom >= limit_bytes


def _refusal_evidence(
    refusals: GrowRefusals | None, limits: Limits, memory_bytes: int
) -> dict[str, Any]:
    if refusals is None or refusals.count == 0:
        return {}
    return {
        "memory_grow_refused": refusals.count,
        "memory_grow_requested_mib": round(refusals.max_pages * WASM_PAGE / MIB, 1),
        "memory_grow_last_requested_mib": round(refusals.last_pages * WASM_PAGE / MIB, 1),
        "limit_mib": limits.memory_mib,
        "peak_mib": round(memory_bytes / MIB, 1),
    }


def _classify(
    *,
    refusals: GrowRefusals | None,
    limits: Limits,
    memory_bytes: int,
    **kw: Any,
) -> Termination:
    """How the run ended (:func:`_ending`), plus the refused growth, if any, in
    its evidence whatever the kind. ``refusals`` None: not counted (a module
    the rewriter left alone), so an out-of-memory failure is inferred."""
    term = _ending(
        refused=None if refusals is None else refusals.count > 0,
        limits=limits,
        memory_bytes=memory_bytes,
        **kw,
    )
    extra = _refusal_evidence(refusals, limits, memory_bytes)
    if not extra:
        return term
    return replace(term, evidence={**term.evidence, **extra})


def _ending(
    *,
    refused: bool | None,
    run: control.RunControl,
    interrupt_signal: int,
    exit_code: int | None,
    trap: wasmtime.Trap | None,
    error: BaseException | None,
    output_over: bool,
    limits: Limits,
    limit_bytes: int | None,
    memory_bytes: int,
    timeout_s: float | None,
    fuel: int | None,
    fuel_used: int,
) -> Termination:
    trap_name = _trap_name(trap)
    if run.stop_reason == "output" or output_over:
        return Termination(
            TerminationKind.OUTPUT_LIMIT,
            signal=int(signal.SIGKILL),
            evidence={"output_bytes": limits.output_bytes},
        )
    if run.stop_reason == "exit" and run.exit_code is not None:
        code = run.exit_code
        if code == 0:
            return Termination(TerminationKind.EXITED, exit_code=0)
        exit_code = code  # a failing exit may still be an allocator giving up: see below
        trap = None
        trap_name = None
        error = None
    elif run.stop_reason == "timeout" or trap_name == "INTERRUPT":
        return Termination(
            TerminationKind.TIMED_OUT, signal=int(signal.SIGKILL), evidence={"timeout_s": timeout_s}
        )
    elif run.stop_reason == "killed":
        return Termination(
            TerminationKind.SIGNALED,
            signal=int(signal.SIGKILL),
            evidence={"signal_name": "SIGKILL", "reason": "killed by its caller"},
        )
    elif run.stop_reason == "interrupted":
        return Termination(
            TerminationKind.SIGNALED,
            signal=interrupt_signal,
            evidence={"reason": "the host process was interrupted"},
        )
    elif run.stop_reason == "shutdown":
        return Termination(
            TerminationKind.SIGNALED,
            signal=int(signal.SIGTERM),
            evidence={"reason": "the host Python interpreter exited"},
        )
    elif trap_name == "OUT_OF_FUEL":
        return Termination(
            TerminationKind.CPU_LIMIT,
            signal=int(signal.SIGXCPU),
            evidence={"fuel_limit": fuel, "fuel_used": fuel_used},
        )
    if exit_code == 0 and trap is None and error is None:
        return Termination(TerminationKind.EXITED, exit_code=0)
    failed = exit_code != 0
    # A failure after refused growth is the allocator giving up: out of memory.
    # Counted by the module when it could be rewritten; else inferred.
    if refused is None:
        oom = _oom_suspected(exit_code, failed, limit_bytes, memory_bytes)
    else:
        oom = refused and failed
    if oom:
        ev: dict[str, Any] = {
            "limit_mib": limits.memory_mib,
            "peak_mib": round(memory_bytes / MIB, 1),
        }
        if refused is None:
            ev["memory_grow_inferred"] = True
        if trap_name:
            ev["trap"] = trap_name.lower()
        elif exit_code is not None:
            ev["exit_code"] = exit_code
        return Termination(
            TerminationKind.OOM_KILLED,
            exit_code=exit_code,
            signal=None if exit_code is not None else int(signal.SIGKILL),
            evidence=ev,
        )
    if exit_code is not None:
        if exit_code > 255:  # a process status has 8 bits; keep the full WASI value
            return Termination(
                TerminationKind.EXITED,
                exit_code=exit_code & 0xFF,
                evidence={"wasi_status": exit_code},
            )
        return Termination(TerminationKind.EXITED, exit_code=exit_code)
    if trap is not None:
        name = trap_name or "UNKNOWN"
        sig = int(_TRAP_SIGNALS.get(name, signal.SIGILL))
        return Termination(
            TerminationKind.SIGNALED,
            signal=sig,
            evidence={"trap": name.lower(), "message": first_line(trap)},
        )
    return Termination(
        TerminationKind.SIGNALED,
        signal=int(signal.SIGABRT),
        evidence={"error": first_line(error) if error is not None else "unknown"},
    )


def _trap_name(trap: wasmtime.Trap | None) -> str | None:
    if trap is None:
        return None
    try:
        code = trap.trap_code
    except Exception:  # pragma: no cover - defensive: trap without a code
        return None
    return None if code is None else str(code.name)
