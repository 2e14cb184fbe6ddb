"""The same contract suite on every tier that runs shell workloads, with real engines."""

from __future__ import annotations

import contextlib
import secrets
import time

import pytest

from tests.conftest import assert_gone, require_image, require_tier, wait_until
from tierbox import Sandbox, TerminationKind, make_spec
from tierbox.errors import SandboxClosedError
from tierbox.tiers import get_tier

SHELL_TIERS = ["process", "container", "gvisor", "microvm", "vm"]
IMAGE = {
    "process": None,
    "container": "busybox",
    "gvisor": "busybox",
    "microvm": "busybox",
    "vm": "busybox",
}
#: memory limit per tier: a (micro)VM's limit is its guest RAM, and its kernel keeps ~49 MiB
MEM = {"microvm": 128, "vm": 128}
GUESTS = ("microvm", "vm")


def mem(tier: str) -> int:
    return MEM.get(tier, 64)


@pytest.fixture(params=SHELL_TIERS)
def tier(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    require_tier(name)
    if IMAGE[name]:
        require_image(IMAGE[name])
    return name


def spec(tier: str, **kw: object) -> object:
    opts = {"memory_mib": mem(tier), "pids": 64, "timeout_s": 20.0} | kw
    return make_spec(IMAGE[tier], **opts)  # type: ignore[arg-type]


def test_one_shot_exit_code_and_output(tier: str) -> None:
    r = get_tier(tier).run(spec(tier), ["sh", "-c", "echo out; echo err >&2; exit 7"])  # type: ignore[arg-type]
    assert r.stdout == b"out\n"
    assert r.stderr == b"err\n"
    assert r.termination.kind is TerminationKind.EXITED
    assert r.exit_code == 7


def test_stdin_reaches_the_workload(tier: str) -> None:
    r = get_tier(tier).run(spec(tier), ["cat"], stdin=b"piped data")  # type: ignore[arg-type]
    assert r.stdout == b"piped data"


def test_long_lived_sandbox_exec_files_stats(tier: str) -> None:
    with Sandbox.create(IMAGE[tier], tier=tier, memory_mib=mem(tier), pids=64, timeout_s=20) as sb:
        assert sb.run(["sh", "-c", "echo one"]).stdout == b"one\n"
        r = sb.run(["sh", "-c", "echo $GREETING"], env={"GREETING": "hello"})
        assert r.stdout == b"hello\n"
        # unique names: the process tier shares the host's /tmp
        tag = secrets.token_hex(4)
        sb.put_file(f"/tmp/in-{tag}.txt", b"payload\n")
        assert sb.run(["cat", f"/tmp/in-{tag}.txt"]).stdout == b"payload\n"
        sb.run(["sh", "-c", f"echo made-inside > /tmp/out-{tag}.txt"])
        assert sb.get_file(f"/tmp/out-{tag}.txt") == b"made-inside\n"
        assert f"in-{tag}.txt" in sb.list_dir("/tmp")
        if tier == "process":
            sb.run(["rm", "-f", f"/tmp/in-{tag}.txt", f"/tmp/out-{tag}.txt"])
        st = sb.stats()
        assert st.memory_bytes is not None and st.memory_bytes > 0
        assert st.memory_peak_bytes is not None and st.memory_peak_bytes >= st.memory_bytes
        sid = sb.id
    sb.close()  # idempotent
    with pytest.raises(SandboxClosedError):
        sb.run(["true"])
    assert sid not in [s["id"] for s in Sandbox.list()]
    time.sleep(0.3)  # background directory removal
    assert_gone({sid})


def test_memory_bomb_is_oom_killed(tier: str) -> None:
    # Doubles a shell string until the cgroup's 64 MiB limit stops it.
    bomb = ["sh", "-c", "a=xxxxxxxx; while :; do a=$a$a; done"]
    r = get_tier(tier).run(spec(tier), bomb)  # type: ignore[arg-type]
    t = r.termination
    assert t.kind is TerminationKind.OOM_KILLED, t
    assert t.evidence["limit_mib"] == mem(tier)
    assert t.evidence["oom_kill"] >= 1
    if tier not in GUESTS:  # in a guest the kernel's own share is outside the workload's peak
        assert t.evidence["peak_mib"] >= mem(tier)
    assert r.exit_code == 137


def test_oom_of_a_child_is_caught_even_when_pid1_exits_zero(tier: str) -> None:
    script = "(a=xxxxxxxx; while :; do a=$a$a; done); echo survived; exit 0"
    r = get_tier(tier).run(spec(tier), ["sh", "-c", script])  # type: ignore[arg-type]
    if tier != "gvisor":  # the host OOM killer takes gVisor's whole Sentry, not one process
        assert b"survived" in r.stdout
    assert r.termination.kind is TerminationKind.OOM_KILLED, r.termination


def test_fork_bomb_is_stopped_by_the_pids_limit(tier: str) -> None:
    bomb = ["sh", "-c", "b() { b | b & }; b; sleep 3; echo alive"]
    r = get_tier(tier).run(spec(tier, pids=32, timeout_s=10), bomb)  # type: ignore[arg-type]
    refused = r.termination.evidence.get("pids_max_hits", 0) > 0
    if tier == "gvisor" and not refused:
        # gVisor enforces the limit inside its Sentry (RLIMIT_NPROC), which
        # the host cgroup's counter cannot see: the refusals reach the shell
        refused = b"can't fork" in r.stderr
    assert refused, r.termination
    # the host is fine: we can still start processes
    assert get_tier(tier).run(spec(tier), ["true"]).ok  # type: ignore[arg-type]


def test_infinite_loop_times_out(tier: str) -> None:
    start = time.monotonic()
    r = get_tier(tier).run(spec(tier, timeout_s=1.5), ["sh", "-c", "while :; do :; done"])  # type: ignore[arg-type]
    elapsed = time.monotonic() - start
    assert r.termination.kind is TerminationKind.TIMED_OUT
    assert r.termination.evidence["timeout_s"] == 1.5
    assert elapsed >= 1.5


def test_exec_timeout_keeps_the_sandbox_usable(tier: str) -> None:
    with Sandbox.create(IMAGE[tier], tier=tier, memory_mib=mem(tier), pids=64) as sb:
        r = sb.run(["sh", "-c", "sleep 30"], timeout_s=1)
        assert r.termination.kind is TerminationKind.TIMED_OUT
        assert sb.run(["echo", "still here"]).stdout == b"still here\n"


def test_output_flood_is_capped(tier: str) -> None:
    s = make_spec(IMAGE[tier], memory_mib=mem(tier), pids=64, timeout_s=30, output_bytes=64 * 1024)
    r = get_tier(tier).run(s, ["sh", "-c", "while :; do echo flooooooooooooooooooooooood; done"])
    assert r.termination.kind is TerminationKind.OUTPUT_LIMIT
    assert len(r.stdout) == 64 * 1024
    assert r.stdout_truncated


def test_missing_command_exits_127_with_a_clear_line(tier: str) -> None:
    """One behaviour everywhere, one-shot and long-lived: status 127 (126 for
    a file that is not executable) and one line on stderr naming the program."""
    r = get_tier(tier).run(spec(tier), ["no-such-program-xyz"])  # type: ignore[arg-type]
    assert r.exit_code == 127, r
    assert r.termination.kind is TerminationKind.EXITED
    assert b"no-such-program-xyz" in r.stderr and b"not found" in r.stderr, r.stderr
    with Sandbox.create(IMAGE[tier], tier=tier, memory_mib=mem(tier), pids=64) as sb:
        r = sb.run(["no-such-program-xyz", "arg"])
        assert r.exit_code == 127 and b"not found" in r.stderr, r
        sb.files.write("/tmp/not-executable", "echo hi", mode=0o644)
        r = sb.run(["/tmp/not-executable"])
        assert r.exit_code == 126, r
        assert sb.run(["true"]).ok  # the sandbox is fine


def test_files_make_parents_owned_by_the_workload_and_round_trip(tier: str) -> None:
    with Sandbox.create(IMAGE[tier], tier=tier, memory_mib=mem(tier), pids=64) as sb:
        sb.files.write("/tmp/deep/er/note.txt", "héllo\n")  # str: UTF-8
        sb.files.write("/tmp/deep/er/blob.bin", bytes(range(256)) * 64, mode=0o600)
        assert sb.files.read("/tmp/deep/er/note.txt") == "héllo\n".encode()
        assert sb.files.read_text("/tmp/deep/er/note.txt") == "héllo\n"
        assert sb.files.read("/tmp/deep/er/blob.bin") == bytes(range(256)) * 64
        me = sb.run(["id", "-u"]).stdout.strip()
        owners = sb.run(["stat", "-c", "%u", "/tmp/deep", "/tmp/deep/er", "/tmp/deep/er/note.txt"])
        assert owners.stdout.split() == [me, me, me], owners
        # the workload can write below the directories the files API made
        assert sb.run(["sh", "-c", "echo inside > /tmp/deep/er/made-inside"]).ok
        kinds = {e.name: e.kind.value for e in sb.files.entries("/tmp/deep/er")}
        assert kinds == {"note.txt": "file", "blob.bin": "file", "made-inside": "file"}, kinds
        assert sorted(sb.files.list("/tmp/deep")) == ["er"]


def test_pids_counts_the_workload_only(tier: str) -> None:
    with Sandbox.create(IMAGE[tier], tier=tier, memory_mib=mem(tier), pids=64) as sb:
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


@pytest.mark.parametrize("tier", [t for t in SHELL_TIERS if t != "process"])
def test_a_dead_sandbox_raises_on_every_call(tier: str) -> None:
    """Its host processes killed from outside (what a crash, an OOM of the
    whole engine or a workload killing its init leaves): every call says it
    is dead and what to do; close still works."""
    import os
    import signal

    from tierbox.errors import SandboxDeadError

    require_tier(tier)
    require_image(IMAGE[tier])
    sb = Sandbox.create(IMAGE[tier], tier=tier, memory_mib=mem(tier), pids=64)
    try:
        pids = sb.instance.host_pids()
        assert pids, "the tier names no host process"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: _dead(sb), timeout_s=20, what=f"{tier} sandbox to report its death")
        for call in (
            lambda: sb.run(["true"]),
            lambda: sb.files.read("/etc/hostname"),
            lambda: sb.files.write("/tmp/x", "x"),
        ):
            with pytest.raises(SandboxDeadError, match="create a new one"):
                call()
    finally:
        sb.close()
    assert sb.id not in [s["id"] for s in Sandbox.list()]


def _dead(sb: Sandbox) -> bool:
    from tierbox.errors import SandboxDeadError

    try:
        sb.run(["true"])
    except SandboxDeadError:
        return True
    return False


def test_repr_names_id_tier_and_image(tier: str) -> None:
    with Sandbox.create(IMAGE[tier], tier=tier, memory_mib=mem(tier), pids=64) as sb:
        text = repr(sb)
        assert sb.id in text and tier in text and str(IMAGE[tier] or "-") in text
