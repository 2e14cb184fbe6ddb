"""Every use of wasmtime-py's private API, in one place.

wasmtime-py wraps most of wasmtime's C API, but not what the wasm tier needs
to stop one run, within one epoch tick, without touching the others. What is
used, and why:

``wasmtime._ffi.dll``
    The ``libwasmtime`` wasmtime-py loaded. Three C functions without a Python
    wrapper are called through it:

    ``wasmtime_store_epoch_deadline_callback``
        A per-Store callback run when its epoch deadline passes, which decides
        once per tick whether that run goes on (wall-clock timeout, output cap,
        interpreter shutdown). The public ``Store.set_epoch_deadline`` can only
        trap at one fixed tick.
    ``wasmtime_error_new``
        The callback's "stop" answer: an error that ends the run as a trap.
    ``wasmtime_context_set_epoch_deadline``
        Sets a Store's deadline to "now" from inside a host call (``proc_exit``,
        an interrupted sleep), so the guest stops at its next function entry.
        Raising from a host call instead would go through wasmtime-py's
        process-global "last exception" slot, which another thread's call can
        pick up.

``Caller._context()``
    The ``wasmtime_context_t*`` of the Store a host call runs in: the argument
    of ``wasmtime_context_set_epoch_deadline``. Caller has no public accessor.

``Store.ptr()``
    The ``wasmtime_store_t*`` the deadline callback is set on. Public in name
    (``Managed.ptr``) but a raw pointer meant for wasmtime-py's own calls.

``wasmtime._ffi.wasmtime_instance_export_get``, ``wasmtime._ffi.wasmtime_extern_t``,
``wasmtime._extern.wrap_extern``, ``Instance._instance``, ``Store._context()``
    One export by name. The public ``Instance.exports(store)`` wraps every
    export of the instance (~28 us for a small module with tierbox's counters,
    more than a tenth of a whole small run); a run needs two or three of them.

``wasmtime._ffi.wasmtime_func_call``, ``wasmtime._func.enter_wasm``,
``WasmtimeError._from_ptr``, ``Func._func``
    A call of ``_start``, which every linked module has as () -> ():
    ``Func.__call__`` first builds the function's type and parameter arrays
    (~5 us); the call goes through wasmtime-py's own ``enter_wasm``, so traps,
    ``proc_exit`` and exceptions raised in host calls come out as they do
    from ``Func.__call__``.

``wasmtime._ffi.wasmtime_global_get``, ``wasmtime._ffi.wasmtime_val_t``,
``wasmtime._ffi.WASMTIME_I64``, ``Global._global``
    An integer global's value: ``Global.value`` goes through the general
    ``Val`` conversion (~6 us); tierbox reads its i64 counter after every run.

:func:`problems` checks each of these against the installed wasmtime (names,
C symbols, and the C signatures wasmtime-py itself declares for them);
``tests/test_wasmtime_private.py`` fails on any change, naming it. Without
the three C functions the tier still runs (:func:`load` returns None):
timeouts fall back to plain epoch deadlines and the output cap is applied
after the run. Without the names the faster lookups and calls use
(``CApi.fast`` False) only those fall back to wasmtime-py's public calls.
"""

from __future__ import annotations

import ctypes
import inspect
from typing import Any

import wasmtime

#: The C functions called through ``wasmtime._ffi.dll``.
SYMBOLS = (
    "wasmtime_store_epoch_deadline_callback",
    "wasmtime_error_new",
    "wasmtime_context_set_epoch_deadline",
)

#: ``wasmtime_error_t* (*)(wasmtime_context_t*, void* data, uint64_t* delta,
#: wasmtime_update_deadline_kind_t* kind)``: NULL means go on.
DeadlineCallback = ctypes.CFUNCTYPE(
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ctypes.c_uint8),
)
_Finalizer = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _dll() -> ctypes.CDLL:
    from wasmtime import _ffi

    dll = _ffi.dll
    if not isinstance(dll, ctypes.CDLL):
        raise AttributeError(f"wasmtime._ffi.dll is a {type(dll).__name__}, not a ctypes.CDLL")
    return dll


class CApi:
    """The C calls, typed the way tierbox calls them."""

    def __init__(self) -> None:
        dll = _dll()
        self._set_callback = ctypes.CFUNCTYPE(
            None, ctypes.c_void_p, DeadlineCallback, ctypes.c_void_p, _Finalizer
        )((SYMBOLS[0], dll))
        self._error_new = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)((SYMBOLS[1], dll))
        self._set_deadline = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)(
            (SYMBOLS[2], dll)
        )
        self._no_finalizer = _Finalizer()  # a NULL function pointer
        #: the faster lookups and calls (export by name, _start, an i64
        #: global): without them the public calls run, stops stay precise
        self.fast = _export_names() == []
        if self.fast:
            from wasmtime import _extern, _ffi, _func

            self._export_get = _ffi.wasmtime_instance_export_get
            self._extern_t = _ffi.wasmtime_extern_t
            self._wrap = _extern.wrap_extern
            self._global_get = _ffi.wasmtime_global_get
            self._func_call = _ffi.wasmtime_func_call
            self._enter_wasm = _func.enter_wasm
            self._val_t = _ffi.wasmtime_val_t
            self._i64 = _ffi.WASMTIME_I64.value

    def set_deadline_callback(self, store: wasmtime.Store, callback: Any, data: int) -> None:
        """Call ``callback`` (a :data:`DeadlineCallback`) with ``data`` each
        time ``store``'s epoch deadline passes."""
        self._set_callback(store.ptr(), callback, data, self._no_finalizer)

    def stop_error(self, message: bytes) -> int | None:
        """A new ``wasmtime_error_t*``: the deadline callback's "stop"."""
        result: int | None = self._error_new(message)
        return result

    def export(self, store: wasmtime.Store, instance: wasmtime.Instance, name: bytes) -> Any:
        """``instance``'s export ``name`` (a Func, Memory, Global, ...), or None."""
        item = self._extern_t()
        found = self._export_get(
            store._context(), ctypes.byref(instance._instance), name, len(name), ctypes.byref(item)
        )
        return self._wrap(item) if found else None

    def call_nullary(self, store: wasmtime.Store, func: wasmtime.Func) -> None:
        """``func(store)`` for a function () -> (), raising what ``Func.__call__`` would."""
        with self._enter_wasm(store) as trap:
            error = self._func_call(
                store._context(), ctypes.byref(func._func), None, 0, None, 0, trap
            )
            if error:
                raise wasmtime.WasmtimeError._from_ptr(error)

    def global_i64(self, store: wasmtime.Store, g: wasmtime.Global) -> int | None:
        """The value of an i64 global (None: it is of another type)."""
        raw = self._val_t()
        self._global_get(store._context(), ctypes.byref(g._global), ctypes.byref(raw))
        kind: Any = raw.kind  # ctypes gives an int for a c_uint8 field
        return int(raw.of.i64) if kind == self._i64 else None

    def stop_at_next_check(self, caller: wasmtime.Caller) -> None:
        """From inside a host call: the guest traps at its next function entry
        (where compiled code re-reads its deadline) or epoch tick."""
        self._set_deadline(caller._context(), 0)


def load() -> CApi | None:
    """The C calls, or None when the installed wasmtime-py lacks one."""
    try:
        return CApi()
    except (ImportError, AttributeError, OSError):
        return None


def problems() -> list[str]:
    """What of the private API above the installed wasmtime no longer has,
    one line per change (empty: all there, in the shape tierbox assumes)."""
    found: list[str] = []
    try:
        dll = _dll()
    except (ImportError, AttributeError) as exc:
        return [f"wasmtime._ffi.dll (the loaded libwasmtime) is gone: {exc}"]
    for name in SYMBOLS:
        if not hasattr(dll, name):
            found.append(f"libwasmtime no longer exports {name}")
    found += _declared_signatures()
    context = getattr(wasmtime.Caller, "_context", None)
    if not callable(context):
        found.append("wasmtime.Caller._context() is gone (the host call's wasmtime_context_t*)")
    elif list(inspect.signature(context).parameters) != ["self"]:
        sig = inspect.signature(context)
        found.append(f"wasmtime.Caller._context changed its signature: {sig}")
    ptr = getattr(wasmtime.Store, "ptr", None)
    if not callable(ptr):
        found.append("wasmtime.Store.ptr() is gone (the Store's wasmtime_store_t*)")
    if not callable(getattr(wasmtime.Store, "_context", None)):
        found.append("wasmtime.Store._context() is gone (the Store's wasmtime_context_t*)")
    found += _export_names()
    return found


def _export_names() -> list[str]:
    """What :meth:`CApi.export` uses of wasmtime-py's internals."""
    found: list[str] = []
    try:
        from wasmtime import _extern, _ffi, _func
    except ImportError as exc:
        return [f"wasmtime._ffi, _extern or _func is gone: {exc}"]
    for name in (
        "wasmtime_func_call",
        "wasmtime_instance_export_get",
        "wasmtime_extern_t",
        "wasmtime_global_get",
        "wasmtime_val_t",
        "WASMTIME_I64",
    ):
        if not hasattr(_ffi, name):
            found.append(f"wasmtime._ffi.{name} is gone (an export by name, a global's value)")
    if not callable(getattr(_extern, "wrap_extern", None)):
        found.append("wasmtime._extern.wrap_extern is gone (a C extern as a Python object)")
    if not callable(getattr(_func, "enter_wasm", None)):
        found.append("wasmtime._func.enter_wasm is gone (how a call's trap becomes an exception)")
    if not callable(getattr(wasmtime.WasmtimeError, "_from_ptr", None)):
        found.append("wasmtime.WasmtimeError._from_ptr is gone (a C error as an exception)")
    for cls, attr in (
        (wasmtime.Instance, "_instance"),
        (wasmtime.Global, "_global"),
        (wasmtime.Func, "_func"),
    ):
        if attr not in getattr(cls, "__annotations__", {}):
            found.append(f"wasmtime.{cls.__name__} no longer declares {attr} (its C handle)")
    return found


def _declared_signatures() -> list[str]:
    """Compare the C signatures wasmtime-py declares in its own bindings with
    the ones :class:`CApi` uses (pointer types aside: both are pointers)."""
    try:
        from wasmtime import _bindings
    except ImportError as exc:
        return [f"wasmtime._bindings is gone, C signatures cannot be compared: {exc}"]
    found: list[str] = []

    def argtypes(name: str) -> list[Any] | None:
        fn = getattr(_bindings, f"_{name}", None)
        types = getattr(fn, "argtypes", None)
        if types is None:
            found.append(f"wasmtime._bindings no longer declares {name}")
            return None
        return list(types)

    cb = argtypes(SYMBOLS[0])
    if cb is not None:
        callback = cb[1] if len(cb) == 4 else None
        inner = list(getattr(callback, "_argtypes_", None) or [])
        if (
            len(inner) != 4
            or inner[2] is not ctypes.POINTER(ctypes.c_uint64)
            or getattr(inner[3], "_type_", None) is not ctypes.c_uint8
        ):
            found.append(
                f"{SYMBOLS[0]} changed: (store, callback(context, data, uint64_t*, uint8_t*), "
                f"data, finalizer) expected, wasmtime-py declares {cb} with callback {inner}"
            )
    err = argtypes(SYMBOLS[1])
    if err is not None and err not in ([ctypes.c_char_p], [ctypes.POINTER(ctypes.c_char)]):
        found.append(f"{SYMBOLS[1]} changed: (const char*) expected, wasmtime-py declares {err}")
    dl = argtypes(SYMBOLS[2])
    if dl is not None and (len(dl) != 2 or dl[1] is not ctypes.c_uint64):
        found.append(
            f"{SYMBOLS[2]} changed: (context, uint64_t) expected, wasmtime-py declares {dl}"
        )
    return found
