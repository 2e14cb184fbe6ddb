"""The private wasmtime-py API the wasm tier relies on, checked against the
installed wasmtime: every name still there, in the same shape, and doing what
tierbox uses it for. A wasmtime upgrade that changes one fails here, by name."""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any

import pytest
import wasmtime

from tierbox.wasm import control, engine, wasmtime_private


def test_every_private_name_is_there_in_the_same_shape() -> None:
    changed = wasmtime_private.problems()
    assert changed == [], (
        f"wasmtime {engine.wasmtime_version()} changed the private API tierbox uses "
        "(see src/tierbox/wasm/wasmtime_private.py):\n  " + "\n  ".join(changed)
    )
    assert wasmtime_private.load() is not None
    assert control.precise_stops()


def _store() -> wasmtime.Store:
    store = wasmtime.Store(engine.engine())  # fuel and epoch interruption are on
    store.set_fuel(1 << 40)
    return store


def _ticking(stop: threading.Event) -> threading.Thread:
    def tick() -> None:
        while not stop.wait(0.001):
            engine.engine().increment_epoch()

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    return t


SPIN = '(module (func (export "_start") (loop br 0)))'


def test_the_deadline_callback_decides_each_tick_and_can_stop_the_run() -> None:
    api = wasmtime_private.load()
    assert api is not None
    calls: list[int] = []

    def on_deadline(_ctx: Any, data: Any, delta: Any, kind: Any) -> int | None:
        calls.append(data)
        if len(calls) < 3:
            delta[0] = 1  # one more tick
            kind[0] = 0  # continue
            return None
        return api.stop_error(b"stopped by the test")

    callback = wasmtime_private.DeadlineCallback(on_deadline)
    store = _store()
    store.set_epoch_deadline(1)
    api.set_deadline_callback(store, callback, 42)
    start = wasmtime.Instance(store, wasmtime.Module(engine.engine(), SPIN), []).exports(store)
    func = start["_start"]
    assert isinstance(func, wasmtime.Func)
    stop = threading.Event()
    _ticking(stop)
    try:
        with pytest.raises(wasmtime.WasmtimeError, match="stopped by the test"):
            func(store)
    finally:
        stop.set()
        store.close()
    assert calls == [42, 42, 42]


def test_a_host_call_can_stop_its_guest_at_the_next_check() -> None:
    api = wasmtime_private.load()
    assert api is not None
    # Compiled code re-reads its deadline at function entry: the loop calls one.
    wat = """(module (import "t" "stop" (func $stop)) (func $f)
      (func (export "_start") (call $stop) (loop (call $f) br 0)))"""
    store = _store()
    store.set_epoch_deadline(1 << 40)  # no tick would ever reach it
    linker = wasmtime.Linker(engine.engine())
    linker.define_func(
        "t", "stop", wasmtime.FuncType([], []), api.stop_at_next_check, access_caller=True
    )
    instance = linker.instantiate(store, wasmtime.Module(engine.engine(), wat))
    func = instance.exports(store)["_start"]
    assert isinstance(func, wasmtime.Func)
    began = time.monotonic()
    try:
        with pytest.raises(wasmtime.Trap) as info:
            func(store)
    finally:
        store.close()
    assert info.value.trap_code is wasmtime.TrapCode.INTERRUPT
    assert time.monotonic() - began < 5.0


def test_the_c_signatures_match_what_libwasmtime_exports() -> None:
    """The symbols resolve in the very library wasmtime-py loaded."""
    from wasmtime import _ffi

    for name in wasmtime_private.SYMBOLS:
        assert isinstance(getattr(_ffi.dll, name), ctypes._CFuncPtr), name
