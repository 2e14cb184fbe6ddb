"""Benchmarks of the wasm tier, each checked against the promise it was built for.

Promises (SPECIFICATION.md, wasm tier):
- one-shot ``WasmTier.run`` of a precompiled WASI hello: p50 <= 1.5x the same module
  on raw wasmtime-py (``InstancePre`` + a fresh ``Store`` per run, same engine, output
  captured through files the same way), in this process;
- CPython-in-Wasm ``print(2+2)``, warm (module compiled and cached): p50 <= 60 ms;
- MicroPython ``print(2+2)``: p50 <= 2 ms;
- RSS per live idle sandbox, over 1,000 of them: <= 64 KiB.

Raw and tierbox runs alternate in one loop so noise on this shared machine hits
both alike. Needs clang-14 + wasi-libc (to build hello) and the python:wasi and
micropython:wasi images (``make setup``).
Usage: python benchmarks/bench_wasm.py [N]   (exit status 1 when a promise fails)
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path

import wasmtime

import tierbox

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Promise, interleaved, p50, p95, report, runs_arg
from tierbox import make_spec
from tierbox.errors import TierboxError
from tierbox.spec import Limits, SandboxSpec
from tierbox.tiers import get_tier
from tierbox.tiers.wasm import WasmTier
from tierbox.wasm import engine, modules, scratch, toolchain

ROOT = Path(__file__).resolve().parent.parent
HELLO_C = ROOT / "tests" / "wasm_guests" / "hello.c"


def build_hello() -> Path:
    """tests/wasm_guests/hello.c as hello.wasm: its program name is ``hello``."""
    why = toolchain.missing()
    if why is not None:
        raise SystemExit(why)
    cache = Path(tempfile.gettempdir()) / "tierbox-bench-wasm"
    return toolchain.build(HELLO_C.read_bytes(), "hello", cache, ["-O2"])


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def show(title: str, t: dict[str, list[float]]) -> None:
    print(f"{title}:")
    for name, xs in t.items():
        print(f"  {name:<34} p50 {p50(xs) * 1000:8.3f} ms   p95 {p95(xs) * 1000:8.3f} ms")


def bench_hello(n: int) -> list[Promise]:
    wasm = build_hello()
    tier = WasmTier()
    spec = SandboxSpec(image=str(wasm), limits=Limits(timeout_s=10.0))
    assert tier.run(spec, ["hello", "0"]).stdout.startswith(b"argc=2")

    # Raw wasmtime-py: the same compiled module and engine, InstancePre, output to files
    # on the same kind of filesystem as tierbox's scratch files (tmpfs when there is one).
    eng = engine.engine()
    module = modules.load_module(wasm).module
    linker = wasmtime.Linker(eng)
    linker.define_wasi()
    pre = linker.instantiate_pre(module)
    scratch_dir = Path(tempfile.mkdtemp(prefix="tierbox-bench-raw-", dir=scratch.parents()[0]))
    out, err, root = scratch_dir / "out", scratch_dir / "err", scratch_dir / "root"
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
    inst = tier.create(spec)

    def create_exec_close() -> None:
        i = tier.create(spec)
        i.exec(["hello", "0"])
        i.close()

    t = interleaved(
        {
            "raw wasmtime-py InstancePre": raw,
            "tierbox WasmTier.run": lambda: tier.run(spec, ["hello", "0"]),
            "exec in a live sandbox": lambda: inst.exec(["hello", "0"]),
            "create + exec + close": create_exec_close,
        },
        n,
        warmup=20,
    )
    inst.close()
    shutil.rmtree(scratch_dir, ignore_errors=True)
    show("WASI hello (precompiled)", t)
    ratio = p50(t["tierbox WasmTier.run"]) / p50(t["raw wasmtime-py InstancePre"])
    promises = [Promise("wasm one-shot hello / raw wasmtime-py InstancePre", ratio, 1.5, "x")]
    promises += bench_vs_container(tier, spec, max(n // 10, 20))
    return promises


def bench_vs_container(tier: WasmTier, spec: SandboxSpec, n: int) -> list[Promise]:
    """The wasm one-shot against the container tier's one-shot of the same
    trivial job (busybox /bin/true), interleaved in one run. The container is
    timed until its background teardown is done (as in bench_lifecycle.py):
    its whole cost, and none of it left to slow the next wasm run."""
    container = get_tier("container")
    if not container.available().available:
        print(f"container tier unavailable: {container.available().reason}")
        return []
    cspec = make_spec("busybox", memory_mib=128, pids=64, timeout_s=30)
    t = interleaved(
        {
            "wasm one-shot hello": lambda: tier.run(spec, ["hello", "0"]),
            "container one-shot true": lambda: (
                container.run(cspec, ["/bin/true"]),
                tierbox.wait_closed(),
            ),
        },
        n,
    )
    show("wasm vs container one-shot", t)
    speedup = p50(t["container one-shot true"]) / p50(t["wasm one-shot hello"])
    return [
        Promise("container one-shot / wasm one-shot", speedup, 20.0, "x", higher_is_better=True)
    ]


def bench_image(title: str, ref: str, program: str, n: int, target_ms: float) -> Promise:
    tier = WasmTier()
    spec = SandboxSpec(image=ref, limits=Limits(timeout_s=30.0))
    argv = [program, "-c", "print(2+2)"]
    name = f"{title} print(2+2) warm p50"
    try:
        first = tier.run(spec, argv)
    except TierboxError as exc:
        print(f"{ref}: {exc}")
        return Promise(name, float("inf"), target_ms, " ms")
    assert first.stdout == b"4\n", first
    # The same module on raw wasmtime-py alongside: when the machine is busy both
    # slow down alike, which tells load from tierbox overhead (the promise is absolute).
    from tierbox.wasm.images import resolve_workload

    workload = resolve_workload(ref)
    module = workload.module().module
    linker = wasmtime.Linker(engine.engine())
    linker.define_wasi()
    if workload.trap_imports:
        linker.define_unknown_imports_as_traps(module)
    pre = linker.instantiate_pre(module)
    scratch_dir = Path(tempfile.mkdtemp(prefix="tierbox-bench-raw-", dir=scratch.parents()[0]))

    def raw() -> None:
        store = wasmtime.Store(engine.engine())
        store.set_fuel(engine.UNLIMITED_FUEL)
        store.set_epoch_deadline(1 << 40)
        wasi = wasmtime.WasiConfig()
        wasi.argv = argv
        wasi.env = list(workload.env.items())
        wasi.preopen_dir(str(scratch_dir), "/")
        wasi.stdout_file = str(scratch_dir / "out")
        store.set_wasi(wasi)
        start = pre.instantiate(store).exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        with contextlib.suppress(wasmtime.ExitTrap):
            start(store)
        store.close()

    t = interleaved(
        {ref: lambda: tier.run(spec, argv), f"(raw wasmtime-py {ref})": raw},
        n,
        warmup=3,
    )
    shutil.rmtree(scratch_dir, ignore_errors=True)
    show(title, t)
    return Promise(name, p50(t[ref]) * 1000, target_ms, " ms")


def bench_idle_rss(count: int) -> Promise:
    wasm = build_hello()
    tier = WasmTier()
    spec = SandboxSpec(image=str(wasm))
    warm = [tier.create(spec) for _ in range(20)]  # imports, module, allocator pools
    warm[0].exec(["hello", "0"])
    gc.collect()
    before = rss_bytes()
    live = [tier.create(spec) for _ in range(count)]
    gc.collect()
    after = rss_bytes()
    per = (after - before) / count
    assert all(i.exec(["hello", "0"]).ok for i in live[:: max(count // 10, 1)])
    for inst in live + warm:
        inst.close()
    print(f"RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB with {count} idle sandboxes")
    return Promise(f"RSS per idle wasm sandbox ({count} live)", per / 1024, 64, " KiB")


def main() -> int:
    n = runs_arg(__doc__, 300)
    print(f"wasm tier benchmarks: wasmtime {engine.wasmtime_version()}, {os.cpu_count()} CPUs")
    promises = bench_hello(n)
    promises.append(
        bench_image("CPython 3.12 in Wasm", "python:wasi", "python3", max(n // 10, 10), 60.0)
    )
    promises.append(bench_image("MicroPython in Wasm", "micropython:wasi", "micropython", n, 2.0))
    promises.append(bench_idle_rss(1000))
    return report(promises)


if __name__ == "__main__":
    sys.exit(main())
