"""The workloads the bench runs, and what each one means on each tier.

``hello`` prints ``hello``: the trivial workload of the cold-start claim.
On shell tiers it is ``echo hello`` in the tier's base image; on the wasm
tier it is a 130-byte WASI module (assembled here from WAT by wasmtime, so
no toolchain is needed) that writes ``hello`` with one ``fd_write``, run as
``hello`` (argv[0] names the program on every tier).

``python`` prints ``hello`` from CPython, as ``python3 -c ...`` everywhere:
the host's python3 on the process tier, the ``python:3.11`` image on image
tiers, CPython-for-WASI (``python:wasi``, named as such) on the wasm tier.
Where the image is missing the workload is reported as not run, with the
command that would add it.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from tierbox import paths

WORKLOADS = ("hello", "python")
#: The image of shell-capable tiers (probes need sh and busybox tools).
BASE_IMAGE = "busybox"
PYTHON_IMAGE = "python:3.11"
#: The wasm tier's CPython: named explicitly rather than resolved from PYTHON_IMAGE.
WASM_PYTHON_IMAGE = "python:wasi"

HELLO_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


@dataclass(frozen=True)
class Target:
    """One workload on one tier: the image to create and the argv to run."""

    workload: str
    image: str | None
    argv: tuple[str, ...]
    expect: bytes = b"hello"

    def ok(self, stdout: bytes) -> bool:
        return self.expect in stdout


@dataclass(frozen=True)
class NotRun:
    workload: str
    reason: str


def cache_dir() -> Path:
    d = paths.home() / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def hello_wasm() -> Path:
    """The WASI hello module, assembled once and cached by content."""
    import wasmtime

    digest = hashlib.sha256(HELLO_WAT.encode()).hexdigest()[:16]
    out = cache_dir() / f"wasm-{digest}" / "hello.wasm"  # guest argv[0] is "hello"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(wasmtime.wat2wasm(HELLO_WAT))
        tmp.replace(out)
    return out


def _image_missing(ref: str) -> str | None:
    """Why ``ref`` cannot be used from the image store, or None if it is there."""
    from tierbox.errors import TierboxError
    from tierbox.images.store import default_store

    try:
        default_store().resolve(ref)
    except TierboxError as exc:
        return str(exc)
    return None


def base_image(tier: str, overrides: dict[str, str]) -> str | None:
    if tier in overrides:
        return overrides[tier]
    if tier == "process":
        return None
    if tier == "wasm":
        return str(hello_wasm())
    return BASE_IMAGE


def target(workload: str, tier: str, overrides: dict[str, str]) -> Target | NotRun:
    """What ``workload`` runs on ``tier`` (``overrides``: tier -> image)."""
    if workload == "hello":
        image = base_image(tier, overrides)
        if tier == "wasm" and image is not None and image.endswith(".wasm"):
            return Target("hello", image, ("hello",))
        if tier == "wasm" and image is not None:  # an image override: its own module
            from tierbox.errors import TierboxError
            from tierbox.wasm.images import resolve_workload

            try:
                program = resolve_workload(image).argv0
            except TierboxError as exc:
                return NotRun(workload, f"wasm image {image} cannot be used: {exc}")
            return Target("hello", image, (program, "-c", "print('hello')"))
        return Target("hello", image, ("echo", "hello"))
    if workload == "python":
        code = "print('hello')"
        if tier == "process":
            # the workload's own PATH, not this process's (a virtualenv or a
            # per-user install is not the workload's to run)
            from tierbox.spec import DEFAULT_PATH

            if shutil.which("python3", path=DEFAULT_PATH) is None:
                return NotRun(workload, "no python3 on the host's system PATH")
            return Target(workload, None, ("python3", "-c", code))
        if tier == "wasm":
            from tierbox.errors import TierboxError
            from tierbox.wasm.images import resolve_image

            try:
                resolve_image(WASM_PYTHON_IMAGE)
            except TierboxError as exc:
                return NotRun(workload, f"{WASM_PYTHON_IMAGE} is not installed: {exc}")
            return Target(workload, WASM_PYTHON_IMAGE, ("python3", "-c", code))
        image = overrides.get(f"{tier}:python", PYTHON_IMAGE)
        missing = _image_missing(image)
        if missing is not None:
            return NotRun(
                workload,
                f"image {image} is not in the store (add it with "
                f"`tierbox image bootstrap {PYTHON_IMAGE}`): {missing}",
            )
        return Target(workload, image, ("python3", "-c", code))
    return NotRun(workload, f"unknown workload {workload!r}: choose from {', '.join(WORKLOADS)}")
