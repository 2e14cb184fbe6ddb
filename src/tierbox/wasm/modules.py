"""WASI command modules: checked, compiled once, cached, linked once.

Modules are rewritten so that refused ``memory.grow`` is counted
(:mod:`tierbox.wasm.growtrack`), then compiled once per (module sha256,
wasmtime version, engine settings, rewrite version) and kept as ``.cwasm``
files under ``$TIERBOX_HOME/wasm-cache``; they are loaded with
``Module.deserialize_file`` (mmap, no copy) and linked once into an
``InstancePre`` so that each run is only ``Store`` + ``instantiate``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import wasmtime

from tierbox import paths
from tierbox.errors import InvalidModuleError, SandboxError, SpecError
from tierbox.wasm import growtrack, wasi
from tierbox.wasm.engine import engine, engine_fingerprint

WASM_PAGE = 65536
_compile_lock = threading.Lock()


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


def compiled_module(digest: str, read: Callable[[], bytes], source: str) -> wasmtime.Module:
    """The compiled Module whose sha256 is ``digest``; ``read`` gives its bytes
    when it is neither in memory nor in the on-disk cache."""
    module = _compiled.get(digest)
    if module is not None:
        return module
    with _compile_lock:
        lock = _compile_locks.setdefault(digest, threading.Lock())
    with lock:
        module = _compiled.get(digest)
        if module is None:
            module = _load_or_compile(digest, read, source)
            _compiled[digest] = module
    return module


def _load_or_compile(digest: str, read: Callable[[], bytes], source: str) -> wasmtime.Module:
    eng = engine()
    directory = cache_dir()
    cached = directory / f"{digest}-{engine_fingerprint()}.cwasm"
    trusted = _trusted_dir(directory)
    if trusted and cached.is_file():
        try:
            return wasmtime.Module.deserialize_file(eng, str(cached))
        except wasmtime.WasmtimeError:
            cached.unlink(missing_ok=True)  # stale or damaged: compile again
    data = read()
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
            f"{source} is not a valid WebAssembly module: {first_line(exc)}"
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


def first_line(exc: BaseException) -> str:
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
    module = compiled_module(digest, path.read_bytes, src)
    linked = _link(module, digest, src, trap_imports)
    _linked[key] = linked
    return linked


def load_module_bytes(data: bytes, *, source: str) -> WasmModule:
    """Check, compile (cached by sha256 like files) and link a module given
    as bytes: one read from inside a sandbox, where no host path may be
    opened twice. Only WASI is linked."""
    _check_header(data[:8], source)
    digest = hashlib.sha256(data).hexdigest()
    key = (digest, frozenset[str]())
    found = _linked.get(key)
    if found is not None:
        return found
    module = compiled_module(digest, lambda: data, source)
    linked = _link(module, digest, source, frozenset())
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
        if imp.module == wasi.WASI_MODULE:
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
            f"WASI preview 1 ({wasi.WASI_MODULE}) only; build the module for wasm32-wasi without "
            f"host-specific imports{hint}"
        )
    linker = wasmtime.Linker(engine())
    wasi.define(linker)
    if trap_imports:
        linker.define_unknown_imports_as_traps(module)
    try:
        pre = linker.instantiate_pre(module)
    except wasmtime.WasmtimeError as exc:
        raise InvalidModuleError(f"{source} cannot be linked: {first_line(exc)}") from exc
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
