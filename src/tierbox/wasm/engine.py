"""The process-wide wasmtime Engine: its settings, version and fingerprint.

One :class:`wasmtime.Engine` serves every Wasm sandbox of the process. It is
configured with

* **fuel** (``consume_fuel``): the CPU budget of a run, see :mod:`tierbox.wasm.runner`;
* **epoch interruption**: runs are stopped per Store within one tick, see
  :mod:`tierbox.wasm.control`.

Allocation strategy: wasmtime's pooling allocator would make instantiation a
little cheaper, but wasmtime-py's public ``Config`` does not expose it (only the
raw C bindings do), so tierbox uses the default on-demand allocator. With
copy-on-write memory images from mmapped ``.cwasm`` files (``memory_init_cow``,
the default) an instantiation is already tens of microseconds for small modules.

The rest of the machinery, in layers: :mod:`~tierbox.wasm.scratch` (per-thread
scratch files), :mod:`~tierbox.wasm.control` (run control: the epoch ticker and
callback, signals, shutdown), :mod:`~tierbox.wasm.wasi` (the WASI functions
tierbox implements itself), :mod:`~tierbox.wasm.modules` (the compiled-module
cache and linking), :mod:`~tierbox.wasm.runner` (one run). Every use of
wasmtime-py's private API is in :mod:`~tierbox.wasm.wasmtime_private`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import threading
from typing import Any

import wasmtime

from tierbox.wasm import growtrack

#: Fuel given to a run with no CPU budget (wasmtime needs some number).
UNLIMITED_FUEL = 1 << 62
CACHE_FORMAT = 1

#: Engine settings; part of the cache key of every compiled module.
ENGINE_SETTINGS: dict[str, Any] = {
    "consume_fuel": True,
    "epoch_interruption": True,
    "wasm_exceptions": True,  # MicroPython's WASI build uses exception handling (exnref)
    "cranelift_opt_level": "speed",
}


def wasmtime_version() -> str:
    try:
        return importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored copies
        return str(getattr(wasmtime, "__version__", "unknown"))


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
