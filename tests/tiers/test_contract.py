"""One contract suite, run on all six tiers with real engines.

The workload has to differ where a tier has no shell (wasm runs a small WASI
"toolbox" module instead of ``sh -c``), so each test asks the tier's adapter
for its commands; everything tierbox promises is asserted the same way on
every tier. Tests of processes (a child OOM, fork bombs, pids, a killed init)
run on the tiers that have processes; the wasm tier has none.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import assert_gone, require_image, require_tier, wait_until
from tierbox import Sandbox, SandboxSpec, TerminationKind, make_spec
from tierbox.errors import SandboxClosedError, SandboxDeadError
from tierbox.spec import ExecResult
from tierbox.tiers import get_tier

ALL_TIERS = ["process", "container", "gvisor", "microvm", "vm", "wasm"]
#: tiers whose workloads are processes (wasm runs in tierbox's own process)
PROCESS_TIERS = [t for t in ALL_TIERS if t != "wasm"]
GUESTS = ("microvm", "vm")
TOOLBOX_IMAGE = "tierbox-contract-toolbox:latest"
_toolbox_lock = threading.Lock()

# The commands each test needs, as a shell script (process, container,
# gvisor, microvm, vm) and as the toolbox's subcommand (wasm).
SHELL = {
    "outerr7": ["sh", "-c", "echo out; echo err >&2; exit 7"],
    "cat": ["cat"],
    "greeting": ["sh", "-c", "echo $GREETING"],
    "write_inside": ["sh", "-c", "echo made-inside > /tmp/out.txt"],
    "read_in": ["cat", "/tmp/in.txt"],
    "membomb": ["sh", "-c", "a=xxxxxxxx; while :; do a=$a$a; done"],
    "spin": ["sh", "-c", "while :; do :; done"],
    "sleep30": ["sh", "-c", "sleep 30"],
    "flood": ["sh", "-c", "while :; do echo flooooooooooooooooooooooood; done"],
    "echo_here": ["echo", "still here"],
}
TOOLBOX = {
    "outerr7": ["toolbox", "outerr", "7"],
    "cat": ["toolbox", "cat"],
    "greeting": ["toolbox", "getenv", "GREETING"],
    "write_inside": ["toolbox", "write", "/tmp/out.txt", "made-inside\n"],
    "read_in": ["toolbox", "readfile", "/tmp/in.txt"],
    "membomb": ["toolbox", "membomb"],
    "spin": ["toolbox", "spin"],
    "sleep30": ["toolbox", "sleep", "30"],
    "flood": ["toolbox", "flood"],
    "echo_here": ["toolbox", "echo", "still", "here"],
}


@dataclass(frozen=True)
class Box:
    """How the suite drives one tier."""

    tier: str
    image: str | None
    memory_mib: int

    def cmd(self, name: str) -> list[str]:
        return list((TOOLBOX if self.tier == "wasm" else SHELL)[name])

    def spec(self, **kw: object) -> SandboxSpec:
        opts = {"memory_mib": self.memory_mib, "pids": 64, "timeout_s": 20.0} | kw
        return make_spec(self.image, **opts)  # type: ignore[arg-type]

    def create(self, **kw: object) -> Sandbox:
        opts = {"memory_mib": self.memory_mib, "pids": 64, "timeout_s": 20.0} | kw
        return Sandbox.create(self.image, tier=self.tier, **opts)

    def run(self, name: str, **kw: object) -> ExecResult:
        stdin = kw.pop("stdin", None)
        return get_tier(self.tier).run(self.spec(**kw), self.cmd(name), stdin=stdin)  # type: ignore[arg-type]


def _toolbox_image() -> str:
    """The toolbox guest compiled to WASI and stored as an image, once."""
    from tierbox.errors import ImageNotFoundError
    from tierbox.images.store import default_store
    from tierbox.wasm import toolchain
    from tierbox.wasm.images import SHA_ANNOTATION, import_wasm
    from tierbox.wasm.modules import file_digest

    with _toolbox_lock:
        why = toolchain.missing()
        if why is not None:
            pytest.skip(why)
        source = Path(__file__).resolve().parents[1] / "wasm_guests" / "toolbox.c"
        cache = Path(tempfile.gettempdir()) / "tierbox-test-wasm-guests"
        module = toolchain.build(source.read_bytes(), "toolbox", cache, ["-O1"])
        with contextlib.suppress(ImageNotFoundError):
            record = default_store().resolve(TOOLBOX_IMAGE)
            if record.config.annotations.get(SHA_ANNOTATION) == file_digest(module):
                return TOOLBOX_IMAGE  # the same module: never re-imported under a running test
        import_wasm(module, TOOLBOX_IMAGE)
        return TOOLBOX_IMAGE


def _box(name: str) -> Box:
    require_tier(name)
    if name == "wasm":
        return Box(name, _toolbox_image(), 64)
    image = None if name == "process" else "busybox"
    if image:
        require_image(image)
    # a (micro)VM's limit is its guest RAM, and its kernel keeps ~49 MiB
    return Box(name, image, 128 if name in GUESTS else 64)


@pytest.fixture(params=ALL_TIERS)
def box(request: pytest.FixtureRequest) -> Box:
    return _box(request.param)


@pytest.fixture(params=PROCESS_TIERS)
def pbox(request: pytest.FixtureRequest) -> Box:
    """Tiers whose workloads are processes."""
    return _box(request.param)


# ---- running ----------------------------------------------------------------
def test_one_shot_exit_code_and_output(box: Box) -> None:
    r = box.run("outerr7")
    assert r.stdout == b"out\n"
    assert r.stderr == b"err\n"
    assert r.termination.kind is TerminationKind.EXITED
    assert r.exit_code == 7


def test_stdin_reaches_the_workload(box: Box) -> None:
    assert box.run("cat", stdin=b"piped data").stdout == b"piped data"
    assert box.run("cat", stdin="text too").stdout == b"text too"


def test_long_lived_sandbox_exec_files_stats(box: Box) -> None:
    with box.create() as sb:
        assert sb.run(box.cmd("outerr7")).stdout == b"out\n"
        r = sb.run(box.cmd("greeting"), env={"GREETING": "hello"})
        assert r.stdout == b"hello\n"
        sb.files.write("/tmp/in.txt", b"payload\n")
        assert sb.run(box.cmd("read_in")).stdout == b"payload\n"
        assert sb.run(box.cmd("write_inside")).ok
        assert sb.files.read("/tmp/out.txt") == b"made-inside\n"
        assert {"in.txt", "out.txt"} <= set(sb.files.list("/tmp"))
        st = sb.stats()
        assert st.memory_peak_bytes is not None and st.memory_peak_bytes > 0
        assert st.memory_bytes is not None
        sid = sb.id
    sb.close()  # idempotent
    with pytest.raises(SandboxClosedError):
        sb.run(box.cmd("outerr7"))
    assert sid not in [s.id for s in Sandbox.list()]
    wait_until(lambda: _gone(sid), timeout_s=10, what="the sandbox's leftovers to go")


def _gone(sid: str) -> bool:
    try:
        assert_gone({sid})
    except AssertionError:
        return False
    return True


def test_memory_bomb_is_oom_killed(box: Box) -> None:
    r = box.run("membomb")
    t = r.termination
    assert t.kind is TerminationKind.OOM_KILLED, t
    assert t.evidence["limit_mib"] == box.memory_mib
    if box.tier not in GUESTS:  # in a guest the kernel's own share is outside the workload's peak
        assert t.evidence["peak_mib"] >= box.memory_mib * 0.9
    assert r.exit_code == 137


def test_infinite_loop_times_out(box: Box) -> None:
    start = time.monotonic()
    r = box.run("spin", timeout_s=1.5)
    assert r.termination.kind is TerminationKind.TIMED_OUT
    assert r.termination.evidence["timeout_s"] == 1.5
    assert r.exit_code == 124
    assert time.monotonic() - start >= 1.5


def test_exec_timeout_keeps_the_sandbox_usable(box: Box) -> None:
    with box.create() as sb:
        r = sb.run(box.cmd("sleep30"), timeout_s=1)
        assert r.termination.kind is TerminationKind.TIMED_OUT
        assert sb.run(box.cmd("echo_here")).stdout == b"still here\n"


def test_output_flood_is_capped(box: Box) -> None:
    r = box.run("flood", timeout_s=30, output_bytes=64 * 1024)
    assert r.termination.kind is TerminationKind.OUTPUT_LIMIT
    assert len(r.stdout) == 64 * 1024
    assert r.stdout_truncated


def test_missing_command_exits_127_with_a_clear_line(box: Box) -> None:
    """One behaviour everywhere, one-shot and long-lived: status 127 (126 for
    a file that is not executable) and one line on stderr naming the program."""
    r = get_tier(box.tier).run(box.spec(), ["no-such-program-xyz"])
    assert r.exit_code == 127, r
    assert r.termination.kind is TerminationKind.EXITED
    assert b"no-such-program-xyz" in r.stderr and b"not found" in r.stderr, r.stderr
    with box.create() as sb:
        r = sb.run(["no-such-program-xyz", "arg"])
        assert r.exit_code == 127 and b"not found" in r.stderr, r
        sb.files.write("/tmp/not-executable", "echo hi", mode=0o644)
        r = sb.run(["/tmp/not-executable"])
        assert r.exit_code == 126, r
        assert sb.run(box.cmd("echo_here")).ok  # the sandbox is fine


# ---- files -----------------------------------------------------------------------
def test_files_make_parents_and_round_trip(box: Box) -> None:
    with box.create() as sb:
        sb.files.write("/tmp/deep/er/note.txt", "héllo\n")  # str: UTF-8
        sb.files.write("/tmp/deep/er/blob.bin", bytes(range(256)) * 64, mode=0o600)
        assert sb.files.read("/tmp/deep/er/note.txt") == "héllo\n".encode()
        assert sb.files.read_text("/tmp/deep/er/note.txt") == "héllo\n"
        assert sb.files.read("/tmp/deep/er/blob.bin") == bytes(range(256)) * 64
        kinds = {e.name: e.kind.value for e in sb.files.entries("/tmp/deep/er")}
        assert kinds == {"note.txt": "file", "blob.bin": "file"}, kinds
        assert sorted(sb.files.list("/tmp/deep")) == ["er"]


def test_files_parents_belong_to_the_workload(pbox: Box) -> None:
    with pbox.create() as sb:
        sb.files.write("/tmp/deep/er/note.txt", "x")
        me = sb.run(["id", "-u"]).stdout.strip()
        owners = sb.run(["stat", "-c", "%u", "/tmp/deep", "/tmp/deep/er", "/tmp/deep/er/note.txt"])
        assert owners.stdout.split() == [me, me, me], owners
        # the workload can write below the directories the files API made
        assert sb.run(["sh", "-c", "echo inside > /tmp/deep/er/made-inside"]).ok


# ---- processes ----------------------------------------------------------------
def test_oom_of_a_child_is_caught_even_when_pid1_exits_zero(pbox: Box) -> None:
    script = "(a=xxxxxxxx; while :; do a=$a$a; done); echo survived; exit 0"
    r = get_tier(pbox.tier).run(pbox.spec(), ["sh", "-c", script])
    if pbox.tier != "gvisor":  # the host OOM killer takes gVisor's whole Sentry, not one process
        assert b"survived" in r.stdout
    assert r.termination.kind is TerminationKind.OOM_KILLED, r.termination


def test_fork_bomb_is_stopped_by_the_pids_limit(pbox: Box) -> None:
    bomb = ["sh", "-c", "b() { b | b & }; b; sleep 3; echo alive"]
    r = get_tier(pbox.tier).run(pbox.spec(pids=32, timeout_s=10), bomb)
    refused = r.termination.evidence.get("pids_max_hits", 0) > 0
    if pbox.tier == "gvisor" and not refused:
        # gVisor enforces the limit inside its Sentry (RLIMIT_NPROC), which
        # the host cgroup's counter cannot see: the refusals reach the shell
        refused = b"can't fork" in r.stderr
    assert refused, r.termination
    # the host is fine: we can still start processes
    assert get_tier(pbox.tier).run(pbox.spec(), ["true"]).ok


def test_pids_counts_the_workload_only(pbox: Box) -> None:
    with pbox.create() as sb:
        sleepers = "i=0; while [ $i -lt 30 ]; do sleep 2 & i=$((i+1)); done; wait; echo ok"
        r = sb.run(["sh", "-c", sleepers], timeout_s=30)
        assert r.ok and r.stdout == b"ok\n", r  # 30 processes fit a limit of 64
        assert "pids_max_hits" not in r.termination.evidence
        r = sb.run(["sh", "-c", sleepers.replace("30", "90")], timeout_s=30)
        assert (
            b"ok" in r.stdout
            or r.termination.evidence.get("pids_max_hits")
            or (b"fork" in r.stderr)
        ), r
        assert sb.run(["echo", "still here"]).stdout == b"still here\n"


@pytest.mark.parametrize("name", [t for t in PROCESS_TIERS if t != "process"])
def test_a_dead_sandbox_raises_on_every_call(name: str) -> None:
    """Its host processes killed from outside (what a crash, an OOM of the
    whole engine or a workload killing its init leaves): every call says it
    is dead and what to do; close still works. (The process tier has no
    process of its own between execs; wasm runs inside tierbox.)"""
    box = _box(name)
    sb = box.create()
    try:
        pids = sb.instance.host_pids()
        assert pids, "the tier names no host process"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: _dead(sb), timeout_s=20, what=f"{name} sandbox to report its death")
        for call in (
            lambda: sb.run(["true"]),
            lambda: sb.files.read("/etc/hostname"),
            lambda: sb.files.write("/tmp/x", "x"),
        ):
            with pytest.raises(SandboxDeadError, match="create a new one"):
                call()
    finally:
        sb.close()
    assert sb.id not in [s.id for s in Sandbox.list()]


def _dead(sb: Sandbox) -> bool:
    try:
        sb.run(["true"])
    except SandboxDeadError:
        return True
    return False


# ---- lifecycle --------------------------------------------------------------------
def test_repr_names_id_tier_and_image(box: Box) -> None:
    with box.create() as sb:
        text = repr(sb)
        assert sb.id in text and box.tier in text and str(box.image or "-") in text


@pytest.fixture
def many(box: Box) -> Iterator[list[Sandbox]]:
    made: list[Sandbox] = []
    yield made
    for sb in made:
        sb.close()


def test_sandboxes_share_nothing_writable(box: Box, many: list[Sandbox]) -> None:
    many.extend([box.create(), box.create()])
    a, b = many
    a.files.write("/tmp/only-in-a", "a")
    assert "only-in-a" not in b.files.list("/tmp")
