"""The WASI functions tierbox implements itself; the rest of WASI is wasmtime's.

``poll_oneoff`` and ``clock_time_get`` run in Python so that sleeps can be
interrupted by the timeout and shutdown, on the host's clocks; ``proc_exit``
because wasmtime refuses statuses >= 126. All three run only on the guest's
own thread, and never raise into wasmtime-py (whose "last exception" slot is
process-global).
"""

from __future__ import annotations

import struct
import time
from typing import Any

import wasmtime

from tierbox.wasm import control

WASI_MODULE = "wasi_snapshot_preview1"

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
        run = control.current_run()
        if run is not None:
            run.exit_code = code & 0xFFFFFFFF
            run.stop_reason = "exit"
        control.stop_guest(caller)
    except (KeyboardInterrupt, SystemExit) as exc:
        control.interrupt(exc, caller)
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
        control.interrupt(exc, caller)
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
            run = control.current_run()
            if run is not None and run.deadline is not None:
                target = min(target, int(run.deadline * 1e9) + 1)
            while (delay := (target - time.monotonic_ns()) / 1e9) > 0:
                if run is None:
                    time.sleep(delay)
                elif run.wake.wait(delay) or control.shutting_down():
                    break
            if run is not None and run.should_stop():
                # Woken by the timeout or a stop: trap at the very next epoch check
                # rather than up to a tick later, when the guest may be done.
                control.stop_guest(caller)
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
        control.interrupt(exc, caller)
        return ERRNO_INTR
    except BaseException:  # an exception here would leak into other threads' wasm calls
        return ERRNO_FAULT


def define(linker: wasmtime.Linker) -> None:
    """Link WASI preview 1 into ``linker``: wasmtime's, with the three above in its place."""
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
