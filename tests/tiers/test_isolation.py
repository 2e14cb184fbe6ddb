"""What a workload inside container and gvisor can and cannot see, probed for real."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from tests.conftest import require_image, require_tier
from tierbox import Sandbox

ISOLATED = ["container", "gvisor"]


@pytest.fixture(scope="module", params=ISOLATED)
def sandbox(request: pytest.FixtureRequest) -> object:
    require_tier(request.param)
    require_image("busybox")
    sb = Sandbox.create("busybox", tier=request.param, memory_mib=128, pids=64)
    yield sb
    sb.close()


def sh(sb: Sandbox, script: str) -> str:
    r = sb.run(["sh", "-c", script])
    return r.stdout.decode()


def test_host_pids_are_not_visible(sandbox: Sandbox) -> None:
    pids = [int(p) for p in sh(sandbox, "ls /proc").split() if p.isdigit()]
    assert pids, "no /proc inside?"
    assert max(pids) < 100, pids  # its own pid namespace
    assert os.getpid() not in pids or max(pids) < 100
    assert "pytest" not in sh(sandbox, "cat /proc/*/cmdline 2>/dev/null")


def test_host_files_are_not_visible(sandbox: Sandbox) -> None:
    canary = Path("/root") / f"tierbox-canary-{secrets.token_hex(4)}"
    canary.write_text("host secret")
    try:
        r = sandbox.run(["cat", str(canary)])
        assert r.exit_code != 0
        assert b"host secret" not in r.stdout
        assert "Debian" not in sh(sandbox, "cat /etc/os-release 2>/dev/null")
    finally:
        canary.unlink()


def test_only_loopback(sandbox: Sandbox) -> None:
    names = sh(sandbox, "ls /sys/class/net 2>/dev/null || ip -o link | cut -d: -f2").split()
    assert names == ["lo"], names
    r = sandbox.run(["sh", "-c", "wget -T 2 -q -O- http://1.1.1.1/ 2>&1; echo rc=$?"])
    assert b"rc=0" not in r.stdout


def test_user_is_not_root(sandbox: Sandbox) -> None:
    assert sh(sandbox, "id -u").strip() not in ("0", "")
    caps = sh(sandbox, "grep CapEff /proc/self/status")
    assert caps.split()[-1].strip("0") == "", caps


def test_rootfs_is_read_only_outside_tmp(sandbox: Sandbox) -> None:
    r = sandbox.run(["sh", "-c", "echo x > /bin/evil"])
    assert r.exit_code != 0
    assert sandbox.run(["sh", "-c", "echo x > /tmp/ok && cat /tmp/ok"]).stdout == b"x\n"


def test_proc_sys_is_not_writable(sandbox: Sandbox) -> None:
    r = sandbox.run(["sh", "-c", "echo 1 > /proc/sys/kernel/sysrq"])
    assert r.exit_code != 0
