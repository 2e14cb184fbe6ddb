"""Faults that must not leak: many cycles, a killed tierbox, an output flood."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.conftest import (
    TIERBOX,
    assert_clean,
    assert_gone,
    cli,
    leftovers,
    require_image,
    require_tier,
    wait_until,
)
from tierbox import Sandbox
from tierbox.paths import sandboxes_dir


@pytest.mark.parametrize(("tier", "cycles"), [("process", 200), ("container", 200), ("gvisor", 40)])
def test_create_exec_close_cycles_leave_nothing(tier: str, cycles: int) -> None:
    require_tier(tier)
    image = None if tier == "process" else "busybox"
    if image:
        require_image(image)
    ids = set()
    for _ in range(cycles):
        with Sandbox.create(image, tier=tier, memory_mib=32, pids=16) as sb:
            assert sb.run(["true"]).ok
            ids.add(sb.id)
    wait_until(lambda: _passes(assert_gone, ids), what="background directory removal")


@pytest.mark.parametrize("tier", ["container", "gvisor", "process"])
def test_kill_9_then_gc_removes_every_leftover(tier: str) -> None:
    require_tier(tier)
    require_image("busybox")
    before = leftovers()
    proc = subprocess.Popen([*TIERBOX, "run", "--tier", tier, "busybox", "--", "sleep", "60"])

    def running() -> bool:
        now = leftovers()
        return bool(set(now["cgroups"]) - set(before["cgroups"])) and (
            tier == "process" or bool(set(now["processes"]) - set(before["processes"]))
        )

    wait_until(running, timeout_s=30, what=f"the {tier} workload to start")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = leftovers()
    assert set(left["cgroups"]) - set(before["cgroups"]), "the crash should leave a cgroup behind"
    p = cli("gc", "--json")
    assert p.returncode == 0, p.stderr
    assert "removed" in json_loads(p.stdout)
    assert_clean(before)
    assert cli("run", "--tier", tier, "busybox", "--", "true").returncode == 0


def json_loads(data: bytes) -> dict[str, object]:
    import json

    out: dict[str, object] = json.loads(data)
    return out


def test_gc_keeps_live_sandboxes() -> None:
    require_tier("container")
    require_image("busybox")
    with Sandbox.create("busybox", tier="container") as sb:
        assert cli("gc").returncode == 0
        assert sb.run(["echo", "alive"]).stdout == b"alive\n"
        assert (sandboxes_dir() / sb.id).exists()


def test_one_gigabyte_of_output_is_capped_and_tierbox_memory_stays_bounded() -> None:
    require_tier("container")
    require_image("busybox")
    # VmHWM, not ru_maxrss: Linux carries a parent's peak into a forked
    # child's ru_maxrss across exec, so that would measure pytest itself
    code = (
        "import re\n"
        "from tierbox import run\n"
        "flood = ['sh', '-c', 'head -c 1000000000 /dev/zero']\n"
        "r = run('busybox', flood, tier='container', timeout_s=120)\n"
        "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
        "print(r.termination.kind.value, len(r.stdout), hwm)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=True
    )
    kind, captured, rss_kib = out.stdout.split()
    assert kind == "output_limit"
    assert int(captured) == 1 << 20
    assert int(rss_kib) < 200 * 1024, f"tierbox used {rss_kib} KiB for a 1 GB flood"


def test_ctrl_c_cleans_up() -> None:
    require_tier("container")
    require_image("busybox")
    before = leftovers()
    proc = subprocess.Popen(
        [*TIERBOX, "run", "busybox", "--", "sleep", "60"], stderr=subprocess.PIPE
    )
    wait_until(
        lambda: bool(set(leftovers()["processes"]) - set(before["processes"])),
        timeout_s=30,
        what="the container to start",
    )
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    wait_until(lambda: _passes(assert_clean, before), what="every leftover to go")


def _passes(check: Callable[..., None], *args: object) -> bool:
    """Whether an assert-style check holds now (for wait_until)."""
    try:
        check(*args)
    except AssertionError:
        return False
    return True


def test_kill_9_in_the_middle_of_background_teardown_then_gc() -> None:
    """close() leaves the runtime's delete, unmounts, cgroups and directories
    to a background thread; a tierbox killed while that thread works leaves
    what `tierbox gc` then removes, and nothing else."""
    require_tier("container")
    require_tier("gvisor")
    require_image("busybox")
    code = (
        "import sys, time\n"
        "from tierbox import Sandbox\n"
        "from tierbox.tiers import teardown\n"
        "tiers = ('gvisor', 'container', 'container')\n"
        "boxes = [Sandbox.create('busybox', tier=t) for t in tiers]\n"
        "for sb in boxes:\n"
        "    assert sb.run(['true']).ok\n"
        "for sb in boxes:\n"
        "    sb.close()\n"
        "print(' '.join(sb.id for sb in boxes), teardown.pending(), flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line, proc.stderr.read() if proc.stderr else ""
        ids, pending = set(line[:-1]), int(line[-1])
        # runsc's delete alone takes over a second: the kill lands mid-teardown
        assert pending >= 2, f"teardown already over ({pending} left): nothing to interrupt"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = cli("gc")
    assert left.returncode == 0, left.stderr
    wait_until(lambda: _passes(assert_gone, ids), timeout_s=30, what="gc to reap the teardown")
