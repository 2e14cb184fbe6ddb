"""C to WASI (wasm32-wasi) with Debian's clang-14, lld-14 and wasi-libc.

tierbox runs modules and never compiles one itself; the bench's WASI probe,
the test guests and the benchmarks are C built here. clang runs through the
one runner, and each build is cached by its source, flags and clang version.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from tierbox.errors import HostError
from tierbox.host.runner import run, which

CLANG = "clang-14"
WASI_LIBC = Path("/usr/lib/wasm32-wasi/libc.a")
TARGET_FLAGS = ("--target=wasm32-wasi", "--sysroot=/usr")
SETUP_HINT = (
    "run `make setup` (scripts/setup.d/40-wasm.sh installs clang-14 lld-14 wasi-libc "
    "libclang-rt-14-dev-wasm32)"
)
#: How long one compile may take.
COMPILE_TIMEOUT_S = 120.0


def missing() -> str | None:
    """Why C cannot be compiled to WASI here, or None when it can."""
    if which(CLANG) is None:
        return f"{CLANG} is not installed: {SETUP_HINT}"
    if not WASI_LIBC.exists():
        return f"wasi-libc is not installed ({WASI_LIBC} is missing): {SETUP_HINT}"
    return None


@functools.cache
def _clang() -> tuple[str, str]:
    """clang's path and its ``--version`` text (part of every cache key)."""
    why = missing()
    clang = which(CLANG)
    if why is not None or clang is None:
        raise HostError(why or f"{CLANG} is not installed")
    return clang, run([clang, "--version"], timeout_s=30.0).stdout.decode(errors="replace")


def build(source: bytes, name: str, cache: Path, flags: Sequence[str] = ()) -> Path:
    """Compile C ``source`` to ``CACHE/KEY/NAME.wasm`` (so the guest's
    program name is NAME) once per source, flags and clang version.

    Raises HostError without the toolchain and CommandError (with clang's
    stderr) when the source does not compile.
    """
    clang, version = _clang()
    args = [*TARGET_FLAGS, *flags]
    key = hashlib.sha256(source + repr((args, version)).encode()).hexdigest()[:16]
    out = cache / key / f"{name}.wasm"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.with_name(f".{name}.{os.getpid()}.c")  # per process: builds may race
    tmp = src.with_suffix(".wasm")
    src.write_bytes(source)
    try:
        run(
            [clang, *args, "-o", str(tmp), str(src)],
            timeout_s=COMPILE_TIMEOUT_S,
            message=f"compiling {name}.c to WASI",
        )
        os.replace(tmp, out)
    finally:
        src.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return out
