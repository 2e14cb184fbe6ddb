"""Benchmarks of the wasm tier, each checked against the promise it was built for.

    .venv/bin/python benchmarks/bench_wasm.py [--quick] [--strict]

1. tierbox one-shot ``WasmTier.run`` of a precompiled WASI hello vs the same
   module on raw wasmtime-py (``InstancePre`` + fresh ``Store`` per run, same
   engine, same output capture through files) in this process: p50 ratio <= 1.5.
2. CPython-in-Wasm ``print(2+2)``, warm (module compiled and cached): p50 <= 60 ms.
3. MicroPython ``print(2+2)``: p50 <= 2 ms.
4. RSS per live idle sandbox, over 1,000 of them: <= 64 KiB.

Needs clang-14 + wasi-libc (to build hello) and the python:wasi and
micropython:wasi images (``make setup``). Prints one line per promise:
name, measured, target, PASS/FAIL. ``--strict`` exits 1 when any fails.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import wasmtime

from tierbox.errors import TierboxError
from tierbox.spec import Limits, SandboxSpec
from tierbox.tiers.wasm import WasmTier
from tierbox.wasm import engine

ROOT = Path(__file__).resolve().parent.parent
HELLO_C = ROOT / "tests" / "wasm_guests" / "hello.c"


def p50_ms(fn: Callable[[], object], n: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


def build_hello() -> Path:
    clang = shutil.which("clang-14")
    if clang is None:
        raise SystemExit("clang-14 is missing: run `make setup` (scripts/setup.d/40-wasm.sh)")
    src = HELLO_C.read_bytes()
    out = Path(tempfile.gettempdir()) / "tierbox-bench-wasm" / hashlib.sha256(src).hexdigest()[:16]
    wasm = out / "hello.wasm"
    if not wasm.exists():
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [clang, "--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-o", str(wasm), str(HELLO_C)],
            check=True,
        )
    return wasm


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Report:
    def __init__(self) -> None:
        self.failed = False

    def line(self, name: str, measured: str, target: str, ok: bool | None) -> None:
        verdict = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        self.failed |= ok is False
        print(f"{name:<44} {measured:>14}   target {target:<12} {verdict}", flush=True)


def bench_hello(report: Report, n: int) -> None:
    wasm = build_hello()
    tier = WasmTier()
    spec = SandboxSpec(image=str(wasm), limits=Limits(timeout_s=10.0))
    assert tier.run(spec, ["0"]).stdout.startswith(b"argc=2")

    # Raw wasmtime-py: the same compiled module and engine, InstancePre, output to files.
    eng = engine.engine()
    module = engine.load_module(wasm).module
    linker = wasmtime.Linker(eng)
    linker.define_wasi()
    pre = linker.instantiate_pre(module)
    # Same kind of filesystem as tierbox's scratch files (tmpfs when there is one).
    scratch = Path(tempfile.mkdtemp(prefix="tierbox-bench-raw-", dir=engine._scratch_parents()[0]))
    out, err, root = scratch / "out", scratch / "err", scratch / "root"
    root.mkdir()

    def raw() -> bytes:
        store = wasmtime.Store(eng)
        store.set_fuel(engine.UNLIMITED_FUEL)
        store.set_epoch_deadline(1 << 40)
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["hello", "0"]
        wasi.preopen_dir(str(root), "/")
        wasi.stdout_file = str(out)
        wasi.stderr_file = str(err)
        store.set_wasi(wasi)
        instance = pre.instantiate(store)
        start = instance.exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        start(store)
        store.close()
        return out.read_bytes() + err.read_bytes()

    assert raw().startswith(b"argc=2")
    tb = p50_ms(lambda: tier.run(spec, ["0"]), n)
    rw = p50_ms(raw, n)
    inst = tier.create(spec)
    long_lived = p50_ms(lambda: inst.exec(["0"]), n)
    inst.close()

    def create_exec_close() -> None:
        i = tier.create(spec)
        i.exec(["0"])
        i.close()

    full = p50_ms(create_exec_close, max(n // 4, 20))
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"  hello p50: tierbox run {tb:.3f} ms, raw wasmtime-py InstancePre {rw:.3f} ms")
    print(f"  (info) exec in a live sandbox {long_lived:.3f} ms; create+exec+close {full:.3f} ms")
    ratio = tb / rw
    report.line(
        "hello: tierbox run / raw InstancePre (p50)", f"{ratio:.2f}x", "<= 1.5x", ratio <= 1.5
    )


def bench_image(report: Report, name: str, ref: str, n: int, target_ms: float) -> None:
    tier = WasmTier()
    spec = SandboxSpec(image=ref, limits=Limits(timeout_s=30.0))
    try:
        first = tier.run(spec, ["-c", "print(2+2)"])
    except TierboxError as exc:
        print(f"  {ref}: {exc}")
        report.line(f"{name} print(2+2) warm (p50)", "n/a", f"<= {target_ms:g} ms", None)
        return
    assert first.stdout == b"4\n", first
    ms = p50_ms(lambda: tier.run(spec, ["-c", "print(2+2)"]), n, warmup=3)
    report.line(
        f"{name} print(2+2) warm (p50)", f"{ms:.2f} ms", f"<= {target_ms:g} ms", ms <= target_ms
    )


def bench_idle_rss(report: Report, count: int) -> None:
    wasm = build_hello()
    tier = WasmTier()
    spec = SandboxSpec(image=str(wasm))
    warm = [tier.create(spec) for _ in range(20)]  # imports, module, allocator pools
    warm[0].exec(["0"])
    gc.collect()
    before = rss_bytes()
    live = [tier.create(spec) for _ in range(count)]
    gc.collect()
    after = rss_bytes()
    per = (after - before) / count
    assert all(i.exec(["0"]).ok for i in live[:: max(count // 10, 1)])
    for inst in live + warm:
        inst.close()
    print(f"  RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB with {count} idle sandboxes")
    report.line(
        f"RSS per idle sandbox ({count} live)",
        f"{per / 1024:.1f} KiB",
        "<= 64 KiB",
        per <= 64 * 1024,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a promise fails")
    args = parser.parse_args()
    n = 100 if args.quick else 500
    print(f"wasm tier benchmarks (wasmtime {engine.wasmtime_version()}, {os.cpu_count()} CPUs)")
    report = Report()
    bench_hello(report, n)
    bench_image(report, "CPython 3.12 in Wasm", "python", 10 if args.quick else 30, 60.0)
    bench_image(report, "MicroPython in Wasm", "micropython", n // 2, 2.0)
    bench_idle_rss(report, 1000)
    return 1 if (args.strict and report.failed) else 0


if __name__ == "__main__":
    sys.exit(main())
