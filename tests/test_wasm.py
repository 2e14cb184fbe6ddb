"""The wasm tier on real wasmtime: C guests compiled to WASI at test time,
the built-in CPython and MicroPython images, limits, escapes and bad input."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import assert_clean, leftovers, require_image
from tierbox import Sandbox, make_spec, wait_closed
from tierbox.errors import (
    InvalidModuleError,
    NotSupportedError,
    SandboxClosedError,
    SandboxError,
    SpecError,
    TierboxError,
    UnsupportedImageError,
    UsageError,
)
from tierbox.runloop import drive
from tierbox.spec import ExecResult, Limits, NetworkPolicy, SandboxSpec, TerminationKind
from tierbox.tiers import _state, get_tier
from tierbox.tiers.wasm import WasmInstance, WasmTier
from tierbox.wasm import engine, growtrack, modules, toolchain

GUESTS = Path(__file__).resolve().parent / "wasm_guests"
CFLAGS = ["-O0"]
EXTRA_FLAGS: dict[str, list[str]] = {
    "bigmem": ["-Wl,--initial-memory=83886080"],  # 80 MiB of linear memory at start
    "reactor": ["-mexec-model=reactor"],
    "recurse": ["-O1"],  # keep frames in Wasm locals; the indirect call keeps the recursion
}

Guests = Callable[[str], Path]


@pytest.fixture(scope="session")
def guest() -> Guests:
    """Compile tests/wasm_guests/NAME.c to NAME.wasm (program name NAME) once
    per source, flags and clang version (cached in /tmp)."""
    why = toolchain.missing()
    if why is not None:
        pytest.skip(why)
    cache = Path(tempfile.gettempdir()) / "tierbox-test-wasm-guests"
    built: dict[str, Path] = {}
    lock = threading.Lock()

    def build(name: str) -> Path:
        with lock:
            if name not in built:
                src = (GUESTS / f"{name}.c").read_bytes()
                built[name] = toolchain.build(src, name, cache, CFLAGS + EXTRA_FLAGS.get(name, []))
            return built[name]

    return build


def spec(image: str | Path | None, **limits: object) -> SandboxSpec:
    opts: dict[str, object] = {"memory_mib": 64, "timeout_s": 20.0} | limits
    return SandboxSpec(image=str(image) if image else None, limits=Limits(**opts))  # type: ignore[arg-type]


def run(image: str | Path, argv: list[str], **kw: object) -> ExecResult:
    stdin = kw.pop("stdin", None)
    return WasmTier().run(spec(image, **kw), argv, stdin=stdin)  # type: ignore[arg-type]


# ------------------------------------------------------------- basic contract


def test_tier_is_registered_and_available() -> None:
    tier = get_tier("wasm")
    assert isinstance(tier, WasmTier)
    avail = tier.available()
    assert avail.available, avail.reason
    assert avail.engine == "wasmtime"
    assert avail.version == engine.wasmtime_version()


def test_hello_args_exit_code_stdout_stderr(guest: Guests) -> None:
    r = run(guest("hello"), ["hello", "7", "two words"])
    assert r.termination.kind is TerminationKind.EXITED
    assert r.exit_code == 7
    assert r.stdout == b"argc=3\nargv[0]=hello\nargv[1]=7\nargv[2]=two words\n"
    assert r.stderr == b"to-stderr\n"
    assert not r.stdout_truncated and not r.stderr_truncated


@pytest.mark.parametrize(("code", "status"), [(0, 0), (1, 1), (125, 125), (200, 200), (300, 44)])
def test_every_exit_status_is_mirrored(guest: Guests, code: int, status: int) -> None:
    r = run(guest("hello"), ["hello", str(code)])
    assert r.termination.kind is TerminationKind.EXITED, r.termination
    assert r.exit_code == status
    assert r.stderr == b"to-stderr\n"  # exit() flushed stdio first
    if code > 255:
        assert r.termination.evidence == {"wasi_status": code}


def test_stdin_and_env_reach_the_guest(guest: Guests) -> None:
    s = SandboxSpec(image=str(guest("hello")), env={"GREETING": "from-spec"})
    r = WasmTier().run(s, [], stdin=b"piped data")
    assert b"GREETING=from-spec\n" in r.stdout
    assert b"stdin=piped data\n" in r.stdout
    assert r.ok


def test_host_environment_is_not_inherited(guest: Guests, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GREETING", "host-secret")
    r = run(guest("hello"), [])
    assert b"host-secret" not in r.stdout


def test_long_lived_sandbox_files_env_and_stats(guest: Guests) -> None:
    before = leftovers()
    tier = WasmTier()
    inst = tier.create(spec(guest("fileops")))
    try:
        inst.put_file("/in/data.txt", b"payload\n")
        r = inst.exec(["fileops", "read", "/in/data.txt"])
        assert r.stdout == b"opened /in/data.txt: payload\n", r
        assert inst.exec(["fileops", "write", "/out.txt", "made inside"]).ok
        assert inst.get_file("/out.txt") == b"made inside\n"
        assert inst.list_dir("/") == ["in", "out.txt", "tmp"]  # every sandbox has a /tmp
        assert sorted(inst.exec(["fileops", "ls", "/"]).stdout.split()) == [
            b"in",
            b"out.txt",
            b"tmp",
        ]
        st = inst.stats()
        assert st.memory_peak_bytes is not None and st.memory_peak_bytes > 0
        assert st.memory_bytes == 0  # nothing runs: an idle sandbox holds no Wasm memory
        assert st.pids == 0 and st.oom_kills == 0
        assert st.cpu_s is not None and st.cpu_s > 0
        with pytest.raises(SandboxError):
            inst.get_file("/missing")
    finally:
        assert inst.close() is None
    assert inst.close() is None  # idempotent
    with pytest.raises(SandboxClosedError):
        inst.exec(["fileops", "ls", "/"])
    assert_clean(before)


def test_a_sandbox_directory_is_reused_only_as_it_was_made(guest: Guests) -> None:
    """A closed sandbox's directory its workload left as made serves the
    next create (tiers/_state.DirSlots); one that was written to is deleted:
    nothing of one sandbox, files or usage, reaches the next."""
    tier = WasmTier()
    wasm_mod = sys.modules[WasmTier.__module__]
    first = tier.create(spec(guest("fileops")))
    assert first.exec(["fileops", "ls", "/"]).ok  # leaves a usage record, nothing else
    first.close()
    assert wait_closed(timeout_s=30)
    kept = list(wasm_mod._SLOTS._ready)
    assert kept, "a directory left as made was not kept for the next create"
    second = tier.create(spec(guest("fileops")))
    try:
        assert second.root.parent.name == second.id
        assert second.list_dir("/") == ["tmp"] and second.list_dir("/tmp") == []
        st = second.stats()
        assert st.cpu_s == 0 and st.memory_peak_bytes == 0, st  # not the first one's usage
        assert second.exec(["fileops", "write", "/tmp/secret", "mine"]).ok
    finally:
        second.close()
    assert wait_closed(timeout_s=30)
    third = tier.create(spec(guest("fileops")))
    try:
        assert third.list_dir("/tmp") == []
        assert not (second.root.parent).exists()  # written to: deleted, not kept
    finally:
        third.close()


def test_a_directory_another_instance_still_runs_in_is_not_handed_on(guest: Guests) -> None:
    """Two Instance objects of one sandbox (as two processes attached to it
    have): one closing while the other runs a command must not hand the
    directory to a new sandbox, where that command would go on writing."""
    tier = WasmTier()
    first = tier.create(spec(guest("sleeper")))
    other = tier.attach(first.id, first.state())
    cmd = other.start(["sleeper", "2"])
    pump = cmd.pump()
    pump.interests()  # the command starts, on a thread of its own
    deadline = time.monotonic() + 10
    while not other.processes():
        assert time.monotonic() < deadline, "the command did not start"
        time.sleep(0.005)
    inode = first.root.parent.stat().st_ino
    first.close()
    assert wait_closed(timeout_s=30)
    wasm_mod = sys.modules[WasmTier.__module__]
    kept = [os.stat(slot).st_ino for slot in wasm_mod._SLOTS._ready]
    assert inode not in kept, "a directory with a command still running in it was kept for reuse"
    drive(pump)
    assert cmd.result().ok
    other.close()
    assert wait_closed(timeout_s=30)


def test_commands_on_threads_of_their_own_leave_no_descriptors(guest: Guests) -> None:
    """Background commands each run on a thread of their own; the output
    descriptors a run keeps per thread go with the thread."""
    inst = WasmTier().create(spec(guest("fileops")))
    try:
        for _ in range(5):  # the tier's own threads and files, made once
            cmd = inst.start(["fileops", "ls", "/"])
            drive(cmd.pump())
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(60):
            cmd = inst.start(["fileops", "ls", "/"])
            drive(cmd.pump())
            assert cmd.result().ok
        deadline = time.monotonic() + 10
        while len(os.listdir("/proc/self/fd")) > before + 4 and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.05)
        assert len(os.listdir("/proc/self/fd")) <= before + 4, (before, os.listdir("/proc/self/fd"))
    finally:
        inst.close()


SLOT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from tierbox import wait_closed
    from tierbox.spec import Limits, SandboxSpec
    from tierbox.tiers.wasm import WasmTier, _SLOTS
    inst = WasmTier().create(SandboxSpec(image=sys.argv[1], limits=Limits(timeout_s=10)))
    inst.close()
    wait_closed()
    print(" ".join(str(p) for p in _SLOTS._ready), flush=True)
    time.sleep(120)
    """
)


def test_directories_kept_by_a_killed_process_are_reaped_by_gc(guest: Guests) -> None:
    p = subprocess.Popen(
        [sys.executable, "-c", SLOT_SCRIPT, str(guest("hello"))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        slots = [Path(x) for x in p.stdout.readline().split()]
        assert slots and all(s.is_dir() for s in slots), p.stderr.read() if p.stderr else ""
        from tierbox import gc

        assert not any(str(s) in line for line in gc.collect() for s in slots)  # owner alive
        assert all(s.is_dir() for s in slots)
        p.kill()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    removed = gc.collect()
    assert not any(s.exists() for s in slots), removed


def test_exec_env_overrides_spec_env(guest: Guests) -> None:
    s = SandboxSpec(image=str(guest("hello")), env={"GREETING": "spec"})
    inst = WasmTier().create(s)
    try:
        assert b"GREETING=exec\n" in inst.exec(["hello"], env={"GREETING": "exec"}).stdout
        assert b"GREETING=spec\n" in inst.exec(["hello"]).stdout
    finally:
        inst.close()


def test_sandbox_without_image_runs_modules_put_into_it(guest: Guests) -> None:
    inst = WasmTier().create(SandboxSpec(image=None))
    try:
        inst.put_file("/bin/hello.wasm", guest("hello").read_bytes())
        r = inst.exec(["/bin/hello.wasm", "3"])
        assert r.exit_code == 3
        assert r.stdout.startswith(b"argc=2\nargv[0]=/bin/hello.wasm\nargv[1]=3\n")
        r = inst.exec(["bin/hello.wasm", "4"])  # relative: from the working directory, /
        assert r.exit_code == 4 and b"argv[0]=bin/hello.wasm\n" in r.stdout
        # Replaced in place: the new module runs, not a remembered one.
        inst.put_file("/bin/hello.wasm", guest("crash").read_bytes())
        assert inst.exec(["/bin/hello.wasm"]).termination.kind is TerminationKind.SIGNALED
    finally:
        inst.close()


def test_argv0_names_the_program(guest: Guests) -> None:
    """argv[0] is the program on every tier: the image's module by its names,
    or a .wasm file inside the sandbox; the guest sees argv as given."""
    hello = guest("hello")
    for name in ("hello", "hello.wasm"):
        r = run(hello, [name, "5"])
        assert r.exit_code == 5 and r.stdout.startswith(f"argc=2\nargv[0]={name}\n".encode()), r
    r = run(hello, [])  # one-shot, empty argv: the module's own command
    assert r.exit_code == 0 and r.stdout.startswith(b"argc=1\nargv[0]=hello\n"), r


@pytest.mark.parametrize("program", ["5", "sh", "crash", "/usr/bin/env", "/x.wasm"])
def test_a_program_the_sandbox_cannot_run_is_127(guest: Guests, program: str) -> None:
    """Like every tier: status 127 and one line on stderr, one-shot and long-lived;
    a program the image does not have, a host path, a module that is not there."""
    r = run(guest("hello"), [program, "x"])
    assert r.exit_code == 127, r
    assert r.stderr == f"tierbox: {program}: command not found\n".encode(), r.stderr
    assert r.stdout == b""
    inst = WasmTier().create(spec(guest("hello")))
    try:
        r = inst.exec([program])
        assert r.exit_code == 127 and r.termination.kind is TerminationKind.EXITED, r
        assert r.stderr.count(b"\n") == 1 and b"not found" in r.stderr
    finally:
        inst.close()


def test_a_file_that_is_not_a_module_is_126(guest: Guests) -> None:
    inst = WasmTier().create(SandboxSpec(image=None))
    try:
        inst.put_file("/app/notes.wasm", b"just text\n")
        inst.put_file("/app/lib.wasm", guest("reactor").read_bytes())
        inst.put_file("/app/dir.wasm/x", b"")
        cases = {
            "/app/notes.wasm": b"not a WebAssembly module",
            "/app/lib.wasm": b"no _start",
            "/app/dir.wasm": b"Is a directory",
            "/app/notes.wasm/x": b"Not a directory",
        }
        for path, why in cases.items():
            r = inst.exec([path])
            assert r.exit_code == 126, (path, r)
            assert r.stderr.startswith(f"tierbox: {path}: ".encode()), r.stderr
            assert why in r.stderr and r.stderr.count(b"\n") == 1, r.stderr
    finally:
        inst.close()


def test_modules_are_read_inside_the_sandbox_only(guest: Guests, tmp_path: Path) -> None:
    """A symlink to a host module resolves inside the sandbox's root, never on the host."""
    host_module = tmp_path / "host.wasm"
    shutil.copyfile(guest("hello"), host_module)
    inst = WasmTier().create(SandboxSpec(image=None))
    try:
        assert isinstance(inst, WasmInstance)
        (inst.root / "up.wasm").symlink_to(host_module)
        (inst.root / "dots.wasm").symlink_to("../../../../../../.." + str(host_module))
        for link in ("/up.wasm", "/dots.wasm", "../../../../.." + str(host_module)):
            r = inst.exec([link])
            assert r.exit_code == 127, (link, r)
            assert b"argc=" not in r.stdout
    finally:
        inst.close()


def test_facade_create_attach_snapshot_restore(guest: Guests) -> None:
    before = leftovers()
    with Sandbox.create(str(guest("fileops")), tier="wasm", memory_mib=64) as sb:
        assert sb.run(["fileops", "write", "/state.txt", "v1"]).ok
        again = Sandbox.connect(sb.id)  # what another process would do
        assert again.run(["fileops", "read", "/state.txt"]).stdout == b"opened /state.txt: v1\n"
        usage = Sandbox.connect(sb.id).stats()  # both execs, as another process sees them
        assert usage.memory_peak_bytes is not None and usage.memory_peak_bytes > 0
        assert usage.cpu_s is not None and usage.cpu_s > 0
        snap = sb.snapshot()
        assert snap.tier == "wasm"
        assert sb.run(["fileops", "write", "/state.txt", "v2"]).ok
        with Sandbox.restore(snap) as restored:
            assert restored.id != sb.id
            assert restored.get_file("/state.txt") == b"v1\n"
            assert restored.run(["fileops", "read", "/state.txt"]).ok
        assert sb.get_file("/state.txt") == b"v2\n"
        shutil.rmtree(snap.path)
    assert_clean(before)


# ------------------------------------------------------------ isolation


def test_host_files_are_invisible_and_escapes_fail(guest: Guests) -> None:
    assert Path("/etc/passwd").exists()
    inst = WasmTier().create(spec(guest("fileops")))
    try:
        for path in ("/etc/passwd", "../etc/passwd", "/../../../../etc/passwd", "../../../.."):
            r = inst.exec(["fileops", "open", path])
            assert r.exit_code == 1, (path, r)
            assert b"failed" in r.stdout and b"root:" not in r.stdout, (path, r.stdout)
        r = inst.exec(["fileops", "ls", ".."])
        assert b"etc" not in r.stdout
        # A symlink may be created, but following it stays inside the sandbox.
        inst.exec(["fileops", "symlink", "/etc/passwd", "/link"])
        inst.exec(["fileops", "symlink", "../../../../../etc/passwd", "/link2"])
        for link in ("/link", "/link2"):
            r = inst.exec(["fileops", "open", link])
            assert b"root:" not in r.stdout, (link, r)
        # Host-side file access is confined the same way.
        with pytest.raises(SandboxError):
            inst.get_file("/link")
        with pytest.raises(SandboxError):
            inst.get_file("../../../../etc/passwd")
        inst.put_file("../../escape.txt", b"x")
        assert inst.get_file("/escape.txt") == b"x"
        assert isinstance(inst, WasmInstance)
        assert (inst.root / "escape.txt").is_file()
    finally:
        inst.close()


def test_network_is_refused() -> None:
    s = SandboxSpec(image="/nonexistent.wasm", network=NetworkPolicy.HOST)
    with pytest.raises(NotSupportedError, match=r"cannot give network=host.*container"):
        WasmTier().create(s)


# --------------------------------------------------------------- limits


def test_memory_bomb_is_oom_killed_at_the_limit(guest: Guests) -> None:
    r = run(guest("membomb"), [], memory_mib=64)
    t = r.termination
    assert b"malloc failed after" in r.stderr, r  # growth really was refused
    mib = int(r.stderr.split(b"after ")[1].split()[0])
    assert 50 <= mib < 64
    assert t.kind is TerminationKind.OOM_KILLED, t
    assert t.evidence["limit_mib"] == 64
    assert t.evidence["memory_grow_refused"] >= 1  # counted by the module, not inferred
    assert 64 < t.evidence["memory_grow_requested_mib"] < 66  # one more 1 MiB block
    assert "memory_grow_inferred" not in t.evidence
    assert 60 <= t.evidence["peak_mib"] <= 64
    assert t.evidence["trap"] == "unreachable"  # abort() after malloc returned NULL
    assert r.exit_code == 137


def test_refused_growth_is_evidence_when_the_guest_copes_and_exits_0(guest: Guests) -> None:
    """malloc(200 MiB) under a 64 MiB limit: memory.grow returns -1, the guest
    handles NULL and exits 0. The run is ``exited``, and says what was refused."""
    r = run(guest("growrefused"), ["growrefused", "200"], memory_mib=64)
    t = r.termination
    assert r.stdout == b"refused 200 MiB\n"
    assert t.kind is TerminationKind.EXITED and t.exit_code == 0, t
    ev = t.evidence
    assert ev["memory_grow_refused"] >= 1
    assert 200 <= ev["memory_grow_requested_mib"] < 201  # 200 MiB on top of what it had
    assert 200 <= ev["memory_grow_last_requested_mib"] < 201
    assert ev["limit_mib"] == 64
    assert ev["peak_mib"] < 64
    assert "memory_grow_refused" in t.describe()
    # Growth within the limit leaves no such evidence.
    ok = run(guest("growrefused"), ["growrefused", "10"], memory_mib=64)
    assert ok.stdout == b"granted 10 MiB\n" and ok.termination.evidence == {}


def test_refused_growth_is_evidence_for_other_endings_too(guest: Guests) -> None:
    """A long-lived sandbox: refused growth is counted per run, and a later run
    that grows within the limit is clean again."""
    with Sandbox.create(str(guest("growrefused")), tier="wasm", memory_mib=32) as sb:
        first = sb.run(["growrefused", "100"])
        second = sb.run(["growrefused", "1"])
    assert first.termination.evidence["memory_grow_refused"] >= 1
    assert second.termination.evidence == {}


def _wat_module(body: str, memory: str = "(memory 1)", extra: str = "") -> bytes:
    import wasmtime

    return wasmtime.wat2wasm(
        f"""(module {memory} {extra}
          (func (export "_start") {body}))"""
    )


@pytest.mark.parametrize(("memory", "const"), [("(memory 1)", "i32"), ("(memory i64 1)", "i64")])
def test_growtrack_rewrite_counts_refusals(memory: str, const: str) -> None:
    """A module with no global section (one is added), 32- and 64-bit memories:
    the rewritten grow returns what memory.grow returns, and counts refusals."""
    import wasmtime

    body = (
        f"(if (i32.eqz ({const}.eq (memory.grow ({const}.const 100)) ({const}.const -1)))"
        " (then unreachable))"  # refused: -1
        f"(if ({const}.ne (memory.grow ({const}.const 1)) ({const}.const 1))"
        " (then unreachable))"  # granted: the old size, 1 page
    )
    data = _wat_module(body, memory)
    rw = growtrack.rewrite(data)
    assert rw.tracked and rw.sites == 2, rw
    store = wasmtime.Store(engine.engine())
    store.set_limits(memory_size=2 * 65536)  # 2 pages: +100 is refused, +1 granted
    store.set_fuel(1 << 30)  # the shared engine meters fuel and epochs
    store.set_epoch_deadline(1 << 30)
    inst = wasmtime.Instance(store, wasmtime.Module(engine.engine(), rw.data), [])
    exports = inst.exports(store)
    start = exports["_start"]
    assert isinstance(start, wasmtime.Func)
    start(store)
    values = []
    for name in growtrack.EXPORTS:
        g = exports[name]
        assert isinstance(g, wasmtime.Global)
        values.append(g.value(store))
    assert values == [1, 101, 101]  # one refusal, asking for 1 + 100 pages


def test_growtrack_leaves_what_it_cannot_read_alone() -> None:
    assert growtrack.rewrite(b"not wasm").tracked is False
    # already exporting one of the names
    data = _wat_module(
        "(drop (memory.grow (i32.const 1)))",
        extra=f'(global (export "{growtrack.COUNT}") i32 (i32.const 0))',
    )
    rw = growtrack.rewrite(data)
    assert rw.tracked is False and rw.data is data
    # a module without memory.grow needs no counting
    rw = growtrack.rewrite(_wat_module("nop"))
    assert rw.tracked and rw.sites == 0 and rw.data == _wat_module("nop")


def test_initial_memory_above_the_limit_is_a_clear_error(guest: Guests) -> None:
    with pytest.raises(SpecError, match=r"needs at least 80\.0 MiB .*memory_mib=64"):
        WasmTier().create(spec(guest("bigmem"), memory_mib=64))
    with pytest.raises(SpecError, match="memory_mib=64"):
        run(guest("bigmem"), [], memory_mib=64)
    assert run(guest("bigmem"), [], memory_mib=96).stdout == b"started\n"


def test_infinite_loop_times_out(guest: Guests) -> None:
    r = run(guest("spin"), [], timeout_s=0.3)
    assert r.termination.kind is TerminationKind.TIMED_OUT
    assert r.termination.evidence == {"timeout_s": 0.3}
    assert r.duration_s >= 0.3
    assert r.exit_code == 124  # timeout(1)'s status, as on every tier


def test_exec_timeout_overrides_spec(guest: Guests) -> None:
    inst = WasmTier().create(spec(guest("spin"), timeout_s=600.0))
    try:
        r = inst.exec(["spin"], timeout_s=0.2)
        assert r.termination.kind is TerminationKind.TIMED_OUT
        assert r.termination.evidence["timeout_s"] == 0.2
    finally:
        inst.close()


def test_sleeping_guest_times_out(guest: Guests) -> None:
    r = run(guest("sleeper"), ["sleeper", "1000"], timeout_s=0.3)
    assert r.stdout == b"sleeping 1000\n"
    assert r.termination.kind is TerminationKind.TIMED_OUT


def test_sleep_completes_within_the_timeout(guest: Guests) -> None:
    r = run(guest("sleeper"), ["sleeper", "1"], timeout_s=20.0)
    assert r.stdout == b"sleeping 1\nwoke\n"
    assert r.ok
    assert r.duration_s >= 1.0


def test_explicit_fuel_budget_is_cpu_limit(guest: Guests) -> None:
    r = WasmTier(fuel=5_000_000).run(spec(guest("spin")), [])
    t = r.termination
    assert t.kind is TerminationKind.CPU_LIMIT, t
    assert t.evidence["fuel_limit"] == 5_000_000
    assert t.evidence["fuel_used"] >= 5_000_000
    assert r.exit_code == 128 + signal.SIGXCPU


def test_fuel_budget_from_env(guest: Guests, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERBOX_WASM_FUEL", "2_000_000")
    r = WasmTier().run(spec(guest("spin")), [])
    assert r.termination.kind is TerminationKind.CPU_LIMIT
    assert r.termination.evidence["fuel_limit"] == 2_000_000
    monkeypatch.setenv("TIERBOX_WASM_FUEL", "lots")
    with pytest.raises(SpecError, match="TIERBOX_WASM_FUEL"):
        WasmTier().run(spec(guest("spin")), [])


def test_fuel_budget_derived_from_cpus_times_timeout(guest: Guests) -> None:
    tier = WasmTier(fuel_per_cpu_s=10_000_000)
    r = tier.run(spec(guest("spin"), cpus=0.5, timeout_s=20.0), [])
    assert r.termination.kind is TerminationKind.CPU_LIMIT
    assert r.termination.evidence["fuel_limit"] == 100_000_000
    # Without cpus there is no budget: the wall clock stops it instead.
    r = tier.run(spec(guest("spin"), timeout_s=0.2), [])
    assert r.termination.kind is TerminationKind.TIMED_OUT


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_flood_is_capped_and_stopped(guest: Guests, stream: str) -> None:
    r = run(guest("flood"), ["flood", stream], output_bytes=4096, timeout_s=30.0)
    t = r.termination
    assert t.kind is TerminationKind.OUTPUT_LIMIT, t
    assert t.evidence == {"output_bytes": 4096}
    data, truncated = (
        (r.stdout, r.stdout_truncated) if stream == "stdout" else (r.stderr, r.stderr_truncated)
    )
    assert len(data) == 4096 and truncated
    assert data.startswith(b"flood line 0 ")
    assert r.duration_s < 30.0  # stopped by the cap, not by the timeout


@pytest.mark.parametrize(
    ("mode", "trap"), [("native", "stack_overflow"), ("frames", "memory_out_of_bounds")]
)
def test_deep_recursion_traps(guest: Guests, mode: str, trap: str) -> None:
    r = run(guest("recurse"), ["recurse", mode])
    t = r.termination
    assert r.stdout == b"recursing\n"
    assert t.kind is TerminationKind.SIGNALED, t
    assert t.evidence["trap"] == trap
    assert t.signal == signal.SIGSEGV


@pytest.mark.parametrize(
    ("mode", "trap", "sig"),
    [
        ("unreachable", "unreachable", signal.SIGABRT),
        ("divzero", "integer_division_by_zero", signal.SIGFPE),
    ],
)
def test_traps_are_signaled_with_the_trap_code(
    guest: Guests, mode: str, trap: str, sig: int
) -> None:
    r = run(guest("crash"), ["crash", mode])
    assert r.stdout == b"about to crash\n"
    t = r.termination
    assert t.kind is TerminationKind.SIGNALED, t
    assert t.evidence["trap"] == trap
    assert t.signal == sig
    assert r.exit_code == 128 + sig


# ------------------------------------------------------------ bad input


def test_not_wasm_file_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.wasm"
    bogus.write_text("just some text\n")
    with pytest.raises(InvalidModuleError, match="not a WebAssembly module"):
        run(bogus, [])
    garbage = tmp_path / "garbage.wasm"
    garbage.write_bytes(b"\0asm\x01\0\0\0" + os.urandom(64))
    with pytest.raises(InvalidModuleError, match="not a valid WebAssembly module"):
        run(garbage, [])
    assert issubclass(InvalidModuleError, UsageError)  # the CLI exits with 2


def test_missing_module_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        run(tmp_path / "absent.wasm", [])


def test_non_wasi_imports_are_refused(guest: Guests) -> None:
    with pytest.raises(InvalidModuleError, match=r"env\.host_secret.*WASI preview 1"):
        WasmTier().create(spec(guest("hostimport")))


def test_module_without_start_is_refused(guest: Guests) -> None:
    with pytest.raises(InvalidModuleError, match=r"reactor.*no _start"):
        run(guest("reactor"), [])


def test_component_is_refused(tmp_path: Path) -> None:
    component = tmp_path / "c.wasm"
    component.write_bytes(b"\0asm\x0d\x00\x01\x00")
    with pytest.raises(InvalidModuleError, match="component"):
        run(component, [])


def test_argv_and_env_with_nul_are_refused(guest: Guests) -> None:
    with pytest.raises(UsageError, match="NUL"):
        run(guest("hello"), ["hello", "a\0b"])
    with pytest.raises(SpecError, match="environment"):
        WasmTier().run(SandboxSpec(image=str(guest("hello")), env={"A": "x\0y"}), ["hello"])


# ------------------------------------------------------------ the module cache


def test_compiled_modules_are_cached_on_disk(guest: Guests) -> None:
    path = guest("hello")
    digest = modules.file_digest(path)
    cwasm = modules.cache_dir() / f"{digest}-{engine.engine_fingerprint()}.cwasm"
    run(path, [])
    assert cwasm.is_file()
    assert oct(cwasm.parent.stat().st_mode & 0o777) == "0o700"
    # A fresh process loads the .cwasm instead of compiling.
    code = (
        "import sys, wasmtime\n"
        "from pathlib import Path\n"
        "from tierbox.wasm import modules\n"
        "calls = []\n"
        "orig = wasmtime.Module.__init__\n"
        "def spy(self, *a, **k):\n"
        "    calls.append(1); orig(self, *a, **k)\n"
        "wasmtime.Module.__init__ = spy\n"
        f"m = modules.load_module(Path({str(path)!r}))\n"
        "print(len(calls))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", out


def test_damaged_cache_entry_is_recompiled(guest: Guests, tmp_path: Path) -> None:
    src = guest("hello")
    copy = tmp_path / "hello-copy.wasm"
    copy.write_bytes(src.read_bytes() + b"")  # same digest as src
    digest = modules.file_digest(src)
    cwasm = modules.cache_dir() / f"{digest}-{engine.engine_fingerprint()}.cwasm"
    run(src, [])
    code = (
        "from tierbox.tiers.wasm import WasmTier\n"
        "from tierbox.spec import SandboxSpec\n"
        f"print(WasmTier().run(SandboxSpec(image={str(copy)!r}), ['hello-copy', '5']).exit_code)\n"
    )
    # Damage it as a new file: this process has the old one mmapped, and truncating
    # a mapped file in place would crash it (SIGBUS), as with any mmapped code.
    damaged = cwasm.with_suffix(".damaged")
    damaged.write_bytes(b"not a compiled module")
    os.replace(damaged, cwasm)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "5", out
    assert cwasm.read_bytes()[:4] != b"not "


# --------------------------------------------------------------- threads


def test_many_sandboxes_on_worker_threads(guest: Guests) -> None:
    tier = WasmTier()
    hello = guest("hello")
    errors: list[BaseException] = []
    results: dict[tuple[int, int], ExecResult] = {}

    def worker(n: int) -> None:
        try:
            inst = tier.create(spec(hello))
            try:
                for i in range(5):
                    results[(n, i)] = inst.exec(["hello", str(n), f"t{n}-{i}"])
            finally:
                inst.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 80
    for (n, i), r in results.items():
        assert r.exit_code == n
        assert f"argv[2]=t{n}-{i}\n".encode() in r.stdout


def test_wasm_runs_without_holding_the_gil(guest: Guests) -> None:
    """While a guest spins on a worker thread, Python code keeps running here."""
    box: list[ExecResult] = []
    t = threading.Thread(target=lambda: box.append(run(guest("spin"), [], timeout_s=0.5)))
    t.start()
    spins = 0
    while t.is_alive():
        spins += 1
    t.join()
    assert box[0].termination.kind is TerminationKind.TIMED_OUT
    assert spins > 10_000  # with the GIL held by the guest this would be ~0


def test_mixed_outcomes_on_threads_do_not_cross(guest: Guests) -> None:
    tier = WasmTier()
    jobs: list[tuple[Path, list[str], dict[str, object], TerminationKind]] = [
        (guest("hello"), ["hello", "3"], {}, TerminationKind.EXITED),
        (guest("spin"), [], {"timeout_s": 0.3}, TerminationKind.TIMED_OUT),
        (guest("flood"), [], {"output_bytes": 2048}, TerminationKind.OUTPUT_LIMIT),
        (guest("crash"), [], {}, TerminationKind.SIGNALED),
        (guest("sleeper"), ["sleeper", "100"], {"timeout_s": 0.3}, TerminationKind.TIMED_OUT),
    ] * 3
    got: dict[int, TerminationKind] = {}

    def work(i: int) -> None:
        path, argv, lim, _ = jobs[i]
        got[i] = tier.run(spec(path, **lim), argv).termination.kind

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {i: job[3] for i, job in enumerate(jobs)}


EXIT_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time, wasmtime
    from tierbox.spec import Limits, SandboxSpec
    from tierbox.tiers.wasm import WasmTier
    from tierbox.wasm import control, engine

    spin, sleeper, flood = sys.argv[1:4]
    tier = WasmTier()
    unlimited = Limits(timeout_s=None)
    idle = tier.create(SandboxSpec(image=spin))  # never closed
    store = wasmtime.Store(engine.engine())  # a bare Store alive at exit
    for image, argv in ((spin, []), (sleeper, ["sleeper", "1000"]), (flood, [])):
        lim = unlimited if image != flood else Limits(timeout_s=None, output_bytes=64 << 20)
        job = (SandboxSpec(image=image, limits=lim), argv)
        threading.Thread(target=tier.run, args=job, daemon=True).start()
    deadline = time.monotonic() + 20
    while control.live_runs() < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    print("exiting with", control.live_runs(), "live runs", flush=True)
    time.sleep(0.05)
    """
)


def test_interpreter_exit_with_live_stores_is_clean(guest: Guests) -> None:
    argv = [str(guest("spin")), str(guest("sleeper")), str(guest("flood"))]
    p = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, *argv], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p
    assert p.stdout == "exiting with 3 live runs\n", p
    assert "panic" not in p.stderr.lower(), p.stderr
    assert p.stderr == "", p.stderr


@pytest.mark.parametrize(("name", "argv"), [("spin", []), ("sleeper", ["sleeper", "1000"])])
def test_ctrl_c_stops_a_run_on_the_main_thread(guest: Guests, name: str, argv: list[str]) -> None:
    code = textwrap.dedent(
        f"""
        from tierbox.spec import Limits, SandboxSpec
        from tierbox.tiers.wasm import WasmTier
        print("running", flush=True)
        spec = SandboxSpec(image={str(guest(name))!r}, limits=Limits(timeout_s=None))
        WasmTier().run(spec, {argv!r})
        print("not reached")
        """
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == "running\n"
        threading.Event().wait(0.3)  # inside the guest by now
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)  # not hung: the guest has no timeout
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "KeyboardInterrupt" in err, err
    assert "panic" not in err.lower() and "not reached" not in out


# ---------------------------------------------------- built-in images


def test_cpython_in_wasm() -> None:
    require_image("python:wasi")
    r = get_tier("wasm").run(make_spec("python"), ["python3", "-c", "print(2+2)"])
    assert r.stdout == b"4\n", r
    assert r.ok
    code = "import sys, os; print(sys.platform, sys.version_info[:2], os.listdir('/'))"
    for program in ("python", "python3.12", "python.wasm", "/python.wasm"):
        r = get_tier("wasm").run(make_spec("python:wasi"), [program, "-c", code])
        assert r.stdout == b"wasi (3, 12) ['tmp']\n", (program, r)
    r = get_tier("wasm").run(make_spec("python"), ["-c", "print(1)"])  # argv[0] is the program
    assert r.exit_code == 127 and r.stderr == b"tierbox: -c: command not found\n", r


def test_cpython_sees_no_host_and_no_network() -> None:
    require_image("python:wasi")
    code = textwrap.dedent(
        """
        import os, socket
        for p in ("/etc/passwd", "/proc/self/status", "/../../etc/hostname"):
            try:
                open(p).read(); print("READ", p)
            except OSError as e:
                print("no", p, e.errno)
        try:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("127.0.0.1", 22))
            print("CONNECTED")
        except Exception as e:  # WASI preview 1 has no socket creation at all
            print("no network", type(e).__name__)
        """
    )
    r = get_tier("wasm").run(make_spec("python"), ["python3", "-c", code])
    assert r.ok, r
    assert b"READ" not in r.stdout and b"CONNECTED" not in r.stdout, r.stdout
    assert r.stdout.count(b"no ") == 4


def test_cpython_stdin_and_files_in_a_sandbox() -> None:
    require_image("python:wasi")
    with Sandbox.create("python", tier="wasm") as sb:
        sb.put_file("/data/in.txt", b"41")
        script = (
            "n = int(open('/data/in.txt').read()); open('/data/out.txt', 'w').write(str(n + 1))"
        )
        assert sb.run(["python3", "-c", script]).ok
        assert sb.get_file("/data/out.txt") == b"42"
        r = sb.run(["python", "-c", "import sys; print(sys.stdin.read().upper())"], stdin=b"shout")
        assert r.stdout == b"SHOUT\n"
        sb.put_file("/app/main.py", "import sys; print('main', sys.argv[1:])")
        assert sb.run(["python", "/app/main.py", "a"]).stdout == b"main ['a']\n"


def test_cpython_memory_error_is_oom_killed() -> None:
    require_image("python:wasi")
    code = "blocks = []\nwhile True: blocks.append(bytearray(1 << 20))"
    r = get_tier("wasm").run(make_spec("python", memory_mib=64), ["python3", "-c", code])
    assert b"MemoryError" in r.stderr, r
    assert r.termination.kind is TerminationKind.OOM_KILLED
    assert r.termination.evidence["limit_mib"] == 64
    assert r.termination.evidence["memory_grow_refused"] >= 1


def test_cpython_timeout() -> None:
    require_image("python:wasi")
    r = get_tier("wasm").run(
        make_spec("python", timeout_s=1.0), ["python3", "-c", "while True: pass"]
    )
    assert r.termination.kind is TerminationKind.TIMED_OUT


def test_micropython() -> None:
    require_image("micropython:wasi")
    r = get_tier("wasm").run(make_spec("micropython"), ["micropython", "-c", "print(2+2)"])
    assert r.stdout == b"4\n", r
    r = get_tier("wasm").run(
        make_spec("micropython:wasi"),
        ["micropython", "-c", "import sys; print(sys.implementation.name)"],
    )
    assert r.stdout == b"micropython\n"
    r = get_tier("wasm").run(make_spec("micropython"), ["python3", "-c", "print(1)"])
    assert r.exit_code == 127, r  # python3 is CPython's name, not MicroPython's


@pytest.mark.parametrize("ref", ["python", "python:3.11", "python:3.12", "python:latest"])
def test_python_names_resolve_to_the_wasi_build_and_say_so(
    ref: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An image name means the same image on every tier: on this one, the
    WASI build of it, chosen explicitly (log, record, repr)."""
    require_image("python:wasi")
    with caplog.at_level("INFO", logger="tierbox.wasm"):
        r = get_tier("wasm").run(make_spec(ref), ["python3", "-c", "print(2+2)"])
    assert r.stdout == b"4\n", r
    assert f"{ref} on the wasm tier is python:wasi" in caplog.text
    with Sandbox.create(ref, tier="wasm") as sb:
        inst = sb.instance
        assert isinstance(inst, WasmInstance)
        assert f"image=python:wasi requested={ref}" in repr(inst)
        listed = next(s for s in Sandbox.list() if s.id == sb.id)
        assert listed.image == "python:wasi"  # what it runs, not what was asked
        mine = _state.read_state(sb.id)["tier_state"]["workload"]
        assert mine["image"] == "python:wasi" and mine["requested"] == ref
        assert "CPython 3.12" in mine["note"]
        assert sb.run(["python3", "-c", "print(3)"]).stdout == b"3\n"
        again = Sandbox.connect(sb.id)  # another process: the same resolution, not redone
        assert f"requested={ref}" in repr(again.instance)


def test_wasm_images_are_not_renamed(caplog: pytest.LogCaptureFixture) -> None:
    require_image("micropython:wasi")
    with caplog.at_level("INFO", logger="tierbox.wasm"):
        inst = WasmTier().create(make_spec("micropython:wasi"))
    try:
        assert "wasm tier is" not in caplog.text
        assert "requested=" not in repr(inst)
    finally:
        inst.close()


def test_linux_images_are_refused_naming_the_images_that_work() -> None:
    require_image("busybox")
    with pytest.raises(UnsupportedImageError, match="not a Wasm image") as info:
        WasmTier().create(make_spec("busybox"))
    assert "python:wasi" in str(info.value) and "micropython:wasi" in str(info.value)
    with pytest.raises(UnsupportedImageError):
        run("busybox", ["sh", "-c", "echo hi"])
    with pytest.raises(UsageError, match="python:wasi"):  # in the store or not
        run("debian:bookworm", ["sh"])
    with pytest.raises(UsageError, match="python:wasi"):
        run("python:2.7", ["python"])  # no WASI build of Python 2


# -------------------------------------------------------- importing images


def test_import_wasm_makes_a_runnable_image(
    guest: Guests, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("umoci") is None:
        pytest.skip("umoci missing: run `make setup`")
    from tierbox.images.store import default_store
    from tierbox.tiers.wasm import import_wasm
    from tierbox.wasm.images import SHA_ANNOTATION, VARIANT_ANNOTATION

    monkeypatch.setenv("TIERBOX_HOME", str(tmp_path / "home"))
    rec = import_wasm(guest("hello"), "hello-wasm")
    assert rec.ref == "hello-wasm:latest"
    assert rec.config.entrypoint[0].endswith(".wasm")
    assert rec.config.annotations[VARIANT_ANNOTATION] == "compat"
    assert rec.config.annotations[SHA_ANNOTATION] == modules.file_digest(guest("hello"))
    assert default_store().resolve("hello-wasm").ref == "hello-wasm:latest"
    r = WasmTier().run(spec("hello-wasm"), ["hello", "9", "x"])
    assert r.exit_code == 9
    assert r.stdout.startswith(b"argc=3\nargv[0]=hello\nargv[1]=9\n")
    with pytest.raises(InvalidModuleError):
        import_wasm(guest("hostimport"), "bad-wasm")


def test_image_files_are_copied_into_each_sandbox_but_not_the_module(
    guest: Guests, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("umoci") is None:
        pytest.skip("umoci missing: run `make setup`")
    from tierbox.images.store import ImageConfig, default_store
    from tierbox.wasm.images import VARIANT_ANNOTATION

    monkeypatch.setenv("TIERBOX_HOME", str(tmp_path / "home"))
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "data").mkdir()
    shutil.copyfile(guest("fileops"), rootfs / "bin" / "fileops.wasm")
    (rootfs / "data" / "motd.txt").write_text("from the image\n")
    config = ImageConfig(
        entrypoint=["/bin/fileops.wasm"],
        cmd=["read", "/data/motd.txt"],
        annotations={VARIANT_ANNOTATION: "compat"},
    )
    default_store().add_directory("files-wasm:1", rootfs, config)
    r = WasmTier().run(spec("files-wasm:1"), [])  # the image's cmd
    assert r.stdout == b"opened /data/motd.txt: from the image\n", r
    inst = WasmTier().create(spec("files-wasm:1"))
    try:
        assert inst.list_dir("/") == ["bin", "data", "tmp"]
        assert inst.list_dir("/bin") == []  # the module runs from the store, not from /
        assert inst.exec(["fileops", "write", "/data/motd.txt", "changed"]).ok
        assert inst.get_file("/data/motd.txt") == b"changed\n"
    finally:
        inst.close()
    again = WasmTier().run(spec("files-wasm:1"), [])
    assert again.stdout == b"opened /data/motd.txt: from the image\n"  # each sandbox: a copy


def test_builtin_images_record_their_program_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("umoci") is None:
        pytest.skip("umoci missing: run `make setup`")
    from tierbox.wasm import images

    builtin = images.BUILTINS["micropython:wasi"]
    try:
        builtin.module_file()
    except TierboxError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv("TIERBOX_HOME", str(tmp_path / "home"))
    rec = images.install_builtin(builtin)
    assert rec.config.annotations[images.PROGRAMS_ANNOTATION] == "micropython"
    w = images.workload_for_image("micropython")
    assert {"micropython", "micropython.wasm", "/micropython.wasm"} <= w.programs
    assert w.image_ref == "micropython:wasi" and w.requested == "micropython"
    r = WasmTier().run(spec("micropython"), ["micropython.wasm", "-c", "print(6*7)"])
    assert r.stdout == b"42\n", r
