"""Long-lived sandboxes: create -> first exec result, exec, close, and the whole
cycle on each tier, against the raw engine doing the same work.

Promises (SPECIFICATION.md, "Long-lived sandboxes"), ratios of p50s in one run:
- container cycle <= 1.3x raw crun (``run -d`` of a sleeping init, ``exec
  /bin/true``, ``kill``, ``delete -f``); gVisor cycle <= 1.2x raw runsc (same
  verbs); microVM cold cycle <= 1.1x raw QEMU (boot to the agent, the same
  execs over the agent, kill); wasm cycle <= 1.5x raw wasmtime-py (Store +
  instantiate + call per exec);
- ``close()`` returns in <= 2 ms on container, gVisor and wasm.

``close()`` returns once the workload is stopped; the runtime's delete, the
unmounts, the cgroup and the directory finish on tierbox's teardown thread.
A tierbox cycle is timed until that teardown is done too (the raw engines'
close is synchronous), so the cycle ratio compares the whole cost, and
"close -> torn down" shows how long the background part took.

The VM tier (template restore by default) is timed against libvirt's
``createXML`` cold boot of the same domain, with no target.

Each cycle is create, ``--execs`` + 1 execs of ``true``, close. Tierbox and
raw cycles alternate in one loop (which goes first flips every run) so noise
on this shared machine hits both alike.
Usage: python benchmarks/bench_lifecycle.py [--runs N] [--tiers a,b] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Promise, enter_runtime_namespace, p50, report
from bench_core import raw_bundle
from tierbox import make_spec
from tierbox.errors import TierboxError
from tierbox.host.cgroups import CGROUP_ROOT, own_paths
from tierbox.spec import DEFAULT_PATH, Limits, SandboxSpec
from tierbox.tiers import get_tier, oci, teardown
from tierbox.tiers.base import Instance

SPEC = make_spec("busybox", memory_mib=128, pids=64, timeout_s=30)
TIERS = ("container", "gvisor", "wasm", "microvm", "vm")
SLOW = {"microvm", "vm"}
#: cycles per side (full, --quick): a wasm cycle takes milliseconds, a TCG boot seconds
RUNS = {
    "container": (30, 10),
    "gvisor": (15, 5),
    "wasm": (300, 50),
    "microvm": (5, 2),
    "vm": (3, 2),
}
_ids = itertools.count()
#: where raw containers' cgroups go: outside tierbox/, which `tierbox gc` reaps
RAW_CGROUP = "tierbox-bench-raw"


@dataclass
class Cycle:
    """One cycle's phases, seconds."""

    create_first_exec_s: float
    exec_s: list[float]
    close_s: float
    #: from close() called until its background teardown is done (tierbox);
    #: the raw engines' close is synchronous, so for them it equals close_s
    torn_down_s: float
    #: create until torn down: the whole cost, background teardown included
    cycle_s: float


@dataclass
class Side:
    """All cycles of one side (tierbox or raw) of one tier."""

    name: str
    cycles: list[Cycle] = field(default_factory=list)

    def p50(self, what: str) -> float:
        if what == "exec_s":
            return p50([x for c in self.cycles for x in c.exec_s] or [float("nan")])
        return p50([getattr(c, what) for c in self.cycles])


Steps = tuple[Callable[[], object], Callable[[], object], Callable[[], object]]


def timed(steps: Steps, execs: int, settle: Callable[[], object] | None = None) -> Cycle:
    """Run (create, exec, close) as one cycle: create, 1 + ``execs`` execs,
    close, then ``settle`` (waits for what close left to the background)."""
    create, run, close = steps
    t0 = time.perf_counter()
    create()
    try:
        run()
        t1 = time.perf_counter()
        per: list[float] = []
        for _ in range(execs):
            s = time.perf_counter()
            run()
            per.append(time.perf_counter() - s)
    except BaseException:
        with contextlib.suppress(Exception):  # the error that stopped the cycle is the one to see
            close()
        raise
    s = time.perf_counter()
    close()
    t2 = time.perf_counter()
    if settle is not None:
        settle()
    t3 = time.perf_counter()
    return Cycle(t1 - t0, per, t2 - s, t3 - s, t3 - t0)


def tierbox_steps(tier_name: str, spec: SandboxSpec, argv: list[str]) -> Callable[[], Steps]:
    """A fresh (create, exec, close) on tierbox's tier contract."""
    tier = get_tier(tier_name)

    def make() -> Steps:
        box: list[Instance] = []

        def run() -> None:
            r = box[0].exec(argv)
            if not r.ok:
                raise SystemExit(f"{tier_name} exec failed: {r.termination.describe()}")

        return (lambda: box.append(tier.create(spec)), run, lambda: box[0].close())

    return make


# ---- raw OCI runtimes ------------------------------------------------------------------
def raw_oci_steps(runtime: list[str], root: Path, bundle: Path, proc_file: Path) -> Steps:
    """``run -d`` of the bundle's sleeping init, ``exec --process``, ``kill``, ``delete -f``."""
    cid = f"rawlc-{os.getpid()}-{next(_ids)}"
    base = [*runtime[:1], "--root", str(root), *runtime[1:]]

    def call(*args: str) -> None:
        subprocess.run(
            [*base, *args], check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )

    def close() -> None:
        call("kill", cid, "KILL")
        call("delete", "--force", cid)

    return (
        lambda: call("run", "--detach", "--bundle", str(bundle), cid),
        lambda: call("exec", "--process", str(proc_file), cid),
        close,
    )


def oci_raw(tier_name: str, work: Path) -> Callable[[], Steps]:
    """Raw crun or runsc on a bundle like tierbox's (bench_core.raw_bundle)."""
    from tierbox.tiers.gvisor import _platform

    if tier_name == "container":
        tier = get_tier("container")
        tier.prime(SPEC)  # type: ignore[attr-defined]  # the compiled seccomp filter
        runtime = [shutil.which("crun") or "crun"]
        bundle = raw_bundle(
            ["/bin/sleep", "3600"],
            seccomp=True,
            annotations=tier.annotations(),  # type: ignore[attr-defined]
        )
    else:
        runsc = shutil.which("runsc") or "runsc"
        runtime = [runsc, f"--platform={_platform(runsc)}", "--network=none"]
        bundle = raw_bundle(["/bin/sleep", "3600"], seccomp=False)
    # out of tierbox's own cgroup tree, where a concurrent `tierbox gc` would
    # take the raw container for a leftover and kill it
    bundle = Path(shutil.move(bundle, work / f"{tier_name}-bundle"))  # removed with work
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["linux"]["cgroupsPath"] = f"{RAW_CGROUP}/{tier_name}-{os.getpid()}"
    oci.write_json(bundle / "config.json", cfg)
    proc_file = work / f"{tier_name}-exec.json"
    oci.write_json(
        proc_file, oci.process_json(["/bin/true"], SPEC, env={"PATH": DEFAULT_PATH}, cwd="/")
    )
    root = work / f"{tier_name}-state"
    root.mkdir()
    return lambda: raw_oci_steps(runtime, root, bundle, proc_file)


# ---- raw wasmtime-py --------------------------------------------------------------------
def wasm_sides(work: Path) -> tuple[Callable[[], Steps], Callable[[], Steps]]:
    """tierbox's wasm tier and raw wasmtime-py (a fresh Store + InstancePre
    instantiate + ``_start`` per exec: a WASI command runs once per instance)
    on the same precompiled hello module."""
    import wasmtime

    from bench_wasm import build_hello
    from tierbox.wasm import engine, modules, scratch

    wasm = build_hello()
    spec = SandboxSpec(image=str(wasm), limits=Limits(timeout_s=10.0))
    eng = engine.engine()
    linker = wasmtime.Linker(eng)
    linker.define_wasi()
    pre = linker.instantiate_pre(modules.load_module(wasm).module)
    # output files on the same kind of file system as tierbox's (tmpfs when there is one)
    tmp = Path(tempfile.mkdtemp(prefix="tierbox-bench-raw-", dir=scratch.parents()[0]))
    root = tmp / "root"
    root.mkdir()

    def call() -> None:
        store = wasmtime.Store(eng)
        store.set_fuel(engine.UNLIMITED_FUEL)
        store.set_epoch_deadline(1 << 40)
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["hello", "0"]
        wasi.preopen_dir(str(root), "/")
        wasi.stdout_file = str(tmp / "out")
        wasi.stderr_file = str(tmp / "err")
        store.set_wasi(wasi)
        start = pre.instantiate(store).exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        start(store)
        store.close()

    def raw() -> Steps:
        return (lambda: None, call, lambda: None)

    return tierbox_steps("wasm", spec, ["hello", "0"]), raw


# ---- raw QEMU microvm -------------------------------------------------------------------
def microvm_raw() -> Callable[[], Steps]:
    """QEMU alone booting tierbox's guest (kernel, initramfs, root disk, as
    bench_microvm.raw_boot), the agent's line connected, execs of ``true``
    over it, then killed."""
    from tierbox.runloop import drive
    from tierbox.tiers.microvm import MicroVMTier
    from tierbox.vmm import artifacts, qemu
    from tierbox.vmm.agent import AgentClient

    tier = get_tier("microvm")
    assert isinstance(tier, MicroVMTier)
    warm = tier.create(SPEC)  # the root disk is built on first use
    disk = Path(warm.machine.disk or "")  # type: ignore[attr-defined]
    warm.close()
    g = artifacts.ensure_guest()
    accel, _ = tier.accelerator()
    machine = qemu.Machine(memory_mib=128, vcpus=1, accel=accel, disk=str(disk), rw_mib=0)

    def make() -> Steps:
        d = Path(tempfile.mkdtemp(prefix="tierbox-rawlc-", dir="/run"))
        files = qemu.Files(d)
        ram = qemu.ram_file(f"rawlc{os.getpid()}-{next(_ids)}")
        argv = qemu.boot_argv(
            "raw", machine, files, vmlinux=g.kernel.vmlinux, initramfs=g.initramfs.path,
            hz=g.kernel.hz, ram_path=ram,
        )  # fmt: skip
        box: list[qemu.QemuProcess] = []
        agent = AgentClient(files.agent)

        def create() -> None:
            box.append(qemu.QemuProcess.start(argv, files))
            agent.connect(deadline=time.monotonic() + 60, alive=box[0].alive)

        def run() -> None:
            cmd = agent.start(
                ["true"], env={"PATH": DEFAULT_PATH}, workdir="/", uid=0, gid=0, stdin=None,
                keep_stdin_open=False, tty=False, timeout_s=30, output_bytes=1 << 20,
                pids_max=None, host_deadline=time.monotonic() + 60,
            )  # fmt: skip
            drive(cmd)
            if cmd.outcome().fields.get("code", "0") != "0":
                raise SystemExit(f"raw microvm exec: {cmd.outcome().fields}")

        def close() -> None:
            agent.close()
            box[0].kill()
            ram.unlink(missing_ok=True)
            shutil.rmtree(d, ignore_errors=True)

        return create, run, close

    return make


# ---- raw libvirt ----------------------------------------------------------------------
def vm_raw(spec: SandboxSpec) -> Callable[[], Steps]:
    """libvirt alone: ``createXML`` of the domain tierbox would define for a
    cold boot (same XML, kernel, initramfs, a fresh qcow2 overlay on the same
    base disk), the agent's line connected, execs of ``true`` over it,
    ``destroy``. Only the overlay is made off the clock."""
    from tierbox import libvirt_host as lvh
    from tierbox.runloop import drive
    from tierbox.tiers import _state
    from tierbox.tiers.vm import VMTier
    from tierbox.tiers.vm.shared import domains_dir
    from tierbox.vmm import libvirt_domain as lvd
    from tierbox.vmm import libvirt_guest as guestmod
    from tierbox.vmm.agent import AgentClient

    tier = get_tier("vm")
    assert isinstance(tier, VMTier)
    shape = tier.shape(spec)
    conn = lvh.connect()

    def make() -> Steps:
        sid = f"rawlc{os.getpid()}x{next(_ids)}"
        _state.make_dir(sid)  # claimed: a concurrent `tierbox gc` leaves the domain alone
        d = guestmod.jail_dir(domains_dir() / sid)
        meta = lvd.VMMeta(
            id=sid, persistent=False, created=time.time(), dir=str(d),
            socket=str(d / "agent.sock"), console=str(d / "console.log"),
            disk=str(d / "disk.qcow2"), accel=shape.accel, image=shape.base.image,
        )  # fmt: skip
        cfg = lvd.DomainConfig(
            name=f"bench-{sid}", meta=meta, memory_mib=shape.memory_mib, vcpus=shape.vcpus,
            kernel=shape.guest.kernel, initramfs=shape.guest.initramfs,
            cmdline=shape.guest.cmdline(accel=shape.accel, hostname=sid),
        )  # fmt: skip
        guestmod.create_overlay(shape.base.path, Path(meta.disk))
        xml = lvd.domain_xml(cfg)
        agent = AgentClient(Path(meta.socket))
        box: list[object] = []

        def create() -> None:
            box.append(conn.createXML(xml, 0))
            agent.connect(deadline=time.monotonic() + 120, alive=lambda: True)

        def run() -> None:
            cmd = agent.start(
                ["true"], env={"PATH": DEFAULT_PATH}, workdir="/", uid=0, gid=0, stdin=None,
                keep_stdin_open=False, tty=False, timeout_s=60, output_bytes=1 << 20,
                pids_max=None, host_deadline=time.monotonic() + 120,
            )  # fmt: skip
            drive(cmd)
            if cmd.outcome().fields.get("code", "0") != "0":
                raise SystemExit(f"raw vm exec: {cmd.outcome().fields}")

        def close() -> None:
            agent.close()
            box[0].destroy()  # type: ignore[attr-defined]
            shutil.rmtree(d, ignore_errors=True)
            _state.remove_dir(sid)

        return create, run, close

    return make


# ---- the run ----------------------------------------------------------------------------
def measure(
    sides: dict[str, Callable[[], Steps]], runs: int, execs: int, warmup: int
) -> dict[str, Side]:
    """Alternate the sides' cycles, flipping which goes first every run."""
    settle = {name: teardown.wait if name == "tierbox" else None for name in sides}
    for _ in range(warmup):
        for name, make in sides.items():
            timed(make(), execs, settle[name])
    out = {name: Side(name) for name in sides}
    names = list(sides)
    for i in range(runs):
        for name in names if i % 2 == 0 else reversed(names):
            out[name].cycles.append(timed(sides[name](), execs, settle[name]))
    return out


PHASES = (
    ("create -> first exec", "create_first_exec_s"),
    ("exec", "exec_s"),
    ("close", "close_s"),
    ("close -> torn down", "torn_down_s"),
    ("cycle", "cycle_s"),
)


def show(tier: str, ours: Side, raw: Side | None) -> None:
    print(f"\n{tier} (n={len(ours.cycles)} cycles)")
    head = f"  {'phase':<22}{'tierbox p50':>14}"
    print(head + (f"{raw.name + ' p50':>26}{'ratio':>9}" if raw else ""))
    for label, key in PHASES:
        a = ours.p50(key)
        line = f"  {label:<22}{a * 1e3:11.2f} ms"
        if raw is not None:
            b = raw.p50(key)
            ratio = f"{a / b:8.2f}x" if b > 1e-6 else "       -"
            line += f"{b * 1e3:23.2f} ms{ratio}"
        print(line)


def main() -> int:
    enter_runtime_namespace()
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    per_tier = ", ".join(f"{t} {n}" for t, (n, _) in RUNS.items())
    ap.add_argument(
        "--runs", type=int, default=None, help=f"cycles per side (default per tier: {per_tier})"
    )
    ap.add_argument("--execs", type=int, default=3, help="execs after the first, per cycle")
    ap.add_argument("--tiers", default=",".join(TIERS), help="comma-separated tiers")
    ap.add_argument("--quick", action="store_true", help="fewer cycles (2 on microvm and vm)")
    args = ap.parse_args()
    tiers = [t for t in args.tiers.split(",") if t]
    work = Path(tempfile.mkdtemp(prefix="tierbox-bench-lifecycle-"))
    promises: list[Promise] = []
    close_limit_s = 0.002
    failed: list[str] = []
    try:
        for name in tiers:
            a = get_tier(name).available()
            if not a.available:
                print(f"\nSKIP  {name}: {a.reason}")
                continue
            runs = args.runs or RUNS[name][1 if args.quick else 0]
            warmup = 1 if name in SLOW else 3
            raw_name = {"container": "raw crun", "gvisor": "raw runsc", "wasm": "raw wasmtime-py"}
            sides: dict[str, Callable[[], Steps]]
            if name in ("container", "gvisor"):
                sides = {"tierbox": tierbox_steps(name, SPEC, ["/bin/true"])}
                sides[raw_name[name]] = oci_raw(name, work)
            elif name == "wasm":
                ours, raw = wasm_sides(work)
                sides = {"tierbox": ours, raw_name[name]: raw}
            elif name == "microvm":
                sides = {"tierbox": tierbox_steps(name, SPEC, ["true"]), "raw QEMU": microvm_raw()}
            else:
                vm_spec = SandboxSpec(image="busybox:latest", limits=Limits(memory_mib=512))
                sides = {"tierbox": tierbox_steps(name, vm_spec, ["true"])}
                sides["raw libvirt"] = vm_raw(vm_spec)
            try:
                t = measure(sides, runs, args.execs, warmup)
            except (TierboxError, subprocess.CalledProcessError) as exc:  # spoils no other tier
                print(f"\nERROR {name}: {exc}")
                failed.append(name)
                continue
            raw_side = next((s for k, s in t.items() if k != "tierbox"), None)
            show(name, t["tierbox"], raw_side)
            target = {"container": 1.3, "gvisor": 1.2, "microvm": 1.1, "wasm": 1.5}.get(name)
            if raw_side is not None and target is not None:
                ratio = t["tierbox"].p50("cycle_s") / raw_side.p50("cycle_s")
                promises.append(Promise(f"{name} cycle / {raw_side.name}", ratio, target, "x"))
            if name in ("container", "gvisor", "wasm"):
                close_ms = t["tierbox"].p50("close_s") * 1e3
                promises.append(
                    Promise(f"{name} close() p50", close_ms, close_limit_s * 1e3, " ms")
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        # the parent crun made for the relative cgroupsPath: at the top of a
        # controller or under this process's own cgroup there
        parents = [*CGROUP_ROOT.glob(f"*/{RAW_CGROUP}")]
        for ctrl, path in own_paths().items():
            d = CGROUP_ROOT / (ctrl.removeprefix("name=") or "unified") / path.lstrip("/")
            parents.append(d / RAW_CGROUP)
        for d in parents:
            with contextlib.suppress(OSError):
                d.rmdir()
    return report(promises) or int(bool(failed))


if __name__ == "__main__":
    sys.exit(main())
