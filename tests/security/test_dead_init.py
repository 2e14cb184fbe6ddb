"""A workload kills its own init; its PID is then reused by a host process.

tierbox pins the init with a pidfd and its start time: after the init dies
every call raises SandboxDeadError - in this process and in another one that
reattaches from the state file - and nothing is read from or written to the
root of whatever process holds the PID now.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TIERBOX, require_image, require_tier
from tierbox import Sandbox
from tierbox.errors import SandboxDeadError

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


def _wait_dead(sb: Sandbox) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            sb.stats()
            sb.files.read("/etc/hostname")
        except SandboxDeadError:
            return
        time.sleep(0.05)
    raise AssertionError("the sandbox never reported its death")


def _take_pid(pid: int) -> int | None:
    """Start a host ``sleep`` with exactly ``pid`` (ns_last_pid), or None.
    Other processes on a busy host take PIDs too: try a few hundred times.
    The dead init may linger as a zombie until the host's init reaps it."""
    deadline = time.monotonic() + 15
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(500):
        with contextlib.suppress(OSError):
            NS_LAST_PID.write_text(str(pid - 1))
        got = os.posix_spawn("/bin/sleep", ["sleep", "60"], dict(os.environ))
        if got == pid:
            return got
        os.kill(got, 9)
        os.waitpid(got, 0)
    return None


@pytest.mark.parametrize("tier", ["container", "gvisor"])
def test_killed_init_makes_every_call_raise(tier: str) -> None:
    require_tier(tier)
    require_image("busybox")
    with Sandbox.create("busybox", tier=tier, memory_mib=128, pids=32) as sb:
        pid = sb.instance.init_pid  # type: ignore[attr-defined]
        sb.run(["kill", "-TERM", "1"])
        _wait_dead(sb)
        for call in (
            lambda: sb.run(["echo", "hi"]),
            lambda: sb.files.read("/etc/hostname"),
            lambda: sb.files.write("/tmp/x", "x"),
            lambda: sb.files.list("/"),
        ):
            with pytest.raises(SandboxDeadError, match=r"dead.*create a new one"):
                call()
        # a host process takes the dead init's PID: still nothing reaches it
        squatter = _take_pid(pid)
        if squatter is None:
            pytest.skip(f"could not make a host process reuse pid {pid}")
        try:
            with pytest.raises(SandboxDeadError):
                sb.files.read("/etc/hostname")
            # another tierbox process reattaches from the state file
            p = subprocess.run(
                [*TIERBOX, "sandbox", "exec", sb.id, "--", "cat", "/etc/hostname"],
                capture_output=True,
            )
            assert p.returncode != 0
            assert b"dead" in p.stderr, p.stderr
            p = subprocess.run(
                [*TIERBOX, "sandbox", "cp", f"{sb.id}:/etc/hostname", "-"], capture_output=True
            )
            assert p.returncode != 0 and p.stdout == b"", p
            assert b"dead" in p.stderr, p.stderr
        finally:
            os.kill(squatter, 9)
            os.waitpid(squatter, 0)
    # close still works on a dead sandbox, and the CLI can remove it too
    assert sb.id not in [s.id for s in Sandbox.list()]


def test_dead_sandbox_can_be_removed_from_the_cli() -> None:
    require_tier("container")
    require_image("busybox")
    p = subprocess.run(
        [*TIERBOX, "sandbox", "create", "--tier", "container", "busybox"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    sid = p.stdout.strip().split()[-1]
    try:
        subprocess.run([*TIERBOX, "sandbox", "exec", sid, "--", "kill", "-TERM", "1"])
        time.sleep(0.5)
        p = subprocess.run([*TIERBOX, "sandbox", "exec", sid, "--", "true"], capture_output=True)
        assert p.returncode != 0 and b"dead" in p.stderr
    finally:
        p = subprocess.run([*TIERBOX, "sandbox", "rm", sid], capture_output=True)
    assert p.returncode == 0, p.stderr
    assert (
        sid
        not in subprocess.run(
            [sys.executable, "-m", "tierbox.cli", "sandbox", "ls", "--json"],
            capture_output=True,
            text=True,
        ).stdout
    )
    assert os.path.exists("/proc/self")  # the host is fine
