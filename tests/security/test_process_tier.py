"""The process tier shares the host's filesystem and network by design; what it
does promise is checked here against a hostile workload: its own uid with no
capabilities, a cgroup it cannot leave, limits it cannot raise, a /tmp of its
own, nothing that outlives an exec, and no way to signal tierbox or another
sandbox."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import assert_gone, require_tier
from tierbox import Sandbox, TerminationKind, run
from tierbox.errors import SandboxFileError
from tierbox.host import uids


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    require_tier("process")
    with Sandbox.create(None, tier="process", memory_mib=64, pids=32, timeout_s=20) as box:
        yield box


def sh(sb: Sandbox, script: str) -> str:
    r = sb.run(["sh", "-c", script])
    return (r.stdout + r.stderr).decode()


def test_runs_as_its_own_uid_without_capabilities(sb: Sandbox) -> None:
    uid, gid = sb.instance.uid, sb.instance.gid  # type: ignore[attr-defined]
    assert uid >= uids.UID_BASE
    assert sh(sb, "id -u; id -g; id -G").split() == [str(uid), str(gid), str(gid)]
    status = dict(
        line.split(":\t", 1)
        for line in sh(sb, "cat /proc/self/status").splitlines()
        if ":\t" in line
    )
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status


def test_two_sandboxes_have_different_uids_and_cannot_signal_each_other() -> None:
    require_tier("process")
    with (
        Sandbox.create(None, tier="process") as a,
        Sandbox.create(None, tier="process") as b,
    ):
        assert a.instance.uid != b.instance.uid  # type: ignore[attr-defined]
        out = sh(a, f"sleep 5 & echo $!; kill -0 {os.getpid()} && echo SIGNALLED-TIERBOX")
        assert "SIGNALLED-TIERBOX" not in out
        # b's workload tries to kill a's background process while a's exec runs
        r = b.run(["sh", "-c", "kill -9 -1; echo done"])
        assert r.ok and b"done" in r.stdout


def test_cannot_leave_its_cgroup_or_raise_limits(sb: Sandbox) -> None:
    out = sh(
        sb,
        "echo $$ > /sys/fs/cgroup/memory/cgroup.procs && echo ESCAPED-MEMORY; "
        "echo $$ > /sys/fs/cgroup/pids/cgroup.procs && echo ESCAPED-PIDS; "
        "echo $$ > /sys/fs/cgroup/unified/cgroup.procs && echo ESCAPED-V2; "
        "ulimit -H -n 100000 && echo RAISED; cat /proc/self/cgroup",
    )
    assert "ESCAPED" not in out and "RAISED" not in out, out
    assert f"memory:/tierbox/{sb.id}" in out, out


def _running(pids: list[int]) -> list[int]:
    """Those of ``pids`` that still run (zombies wait for the host's init to
    reap them, which on some hosts takes seconds; they run nothing)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.append(pid)
    return out


def test_nothing_outlives_a_one_shot_run_or_the_sandbox() -> None:
    """Processes an exec leaves running live on until the sandbox closes (as
    in a container); a one-shot run and close() leave nothing."""
    require_tier("process")
    r = run(None, ["sh", "-c", "setsid sleep 3017 >/dev/null 2>&1 &"], tier="process")
    assert r.ok
    sb = Sandbox.create(None, tier="process")
    sb.run(["sh", "-c", "setsid sleep 3019 >/dev/null 2>&1 & nohup sleep 3023 >/dev/null 2>&1 &"])
    cg = sb.instance.cg  # type: ignore[attr-defined]
    assert len(_running(cg.pids())) >= 2  # still running between calls
    sb.close()
    assert _running(cg.pids()) == []
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not any(f"sleep {n}" in ps for n in (3017, 3019, 3023)), ps


def test_memory_limit_holds(sb: Sandbox) -> None:
    r = sb.run(["sh", "-c", "a=xxxxxxxx; while :; do a=$a$a; done"])
    assert r.termination.kind is TerminationKind.OOM_KILLED, r.termination


def test_private_tmp(sb: Sandbox) -> None:
    marker = f"tierbox-host-{secrets.token_hex(4)}"
    host_file = Path("/tmp") / marker
    host_file.write_text("host")
    try:
        assert marker not in sh(sb, "ls -a /tmp")
        assert sh(sb, "pwd; echo $HOME").split() == ["/tmp", "/tmp"]
        sb.run(["sh", "-c", "echo inside > /tmp/made-inside"])
        assert sb.files.read("/tmp/made-inside") == b"inside\n"
        assert sb.files.read("made-inside") == b"inside\n"  # relative: from /tmp
        assert not (Path("/tmp") / "made-inside").exists()
        with pytest.raises(SandboxFileError, match="No such file"):
            sb.files.read(str(host_file))  # its /tmp, not the host's
        with pytest.raises(SandboxFileError, match="outside /tmp"):
            sb.files.write("/etc/tierbox-should-not-exist", "x")
        assert host_file.read_text() == "host"
    finally:
        host_file.unlink()


def test_tmp_is_capped_by_disk_mib() -> None:
    require_tier("process")
    r = run(
        None, ["sh", "-c", "head -c 20m /dev/zero > /tmp/big; echo $?"], tier="process", disk_mib=8
    )
    assert b"No space left" in r.stderr or r.stdout.strip() != b"0", r


def test_close_leaves_nothing() -> None:
    require_tier("process")
    sb = Sandbox.create(None, tier="process")
    sb.files.write("/tmp/x", "x")
    uid = sb.instance.uid  # type: ignore[attr-defined]
    sid = sb.id
    sb.close()
    assert not (uids.uids_dir() / str(uid)).exists()
    assert_gone({sid})
