"""The tierbox command line, run as a user would run it."""

from __future__ import annotations

import json

import pytest

from tests.conftest import cli, require_image, require_tier


@pytest.fixture(autouse=True)
def _busybox() -> None:
    require_tier("container")
    require_image("busybox")


def test_run_prints_output_and_mirrors_exit_code() -> None:
    p = cli("run", "--tier", "container", "busybox", "--", "sh", "-c", "echo hi; id -u; exit 5")
    lines = p.stdout.decode().split()
    assert lines[0] == "hi"
    assert lines[1] != "0"
    assert p.returncode == 5


def test_run_default_tier_is_container() -> None:
    p = cli("run", "busybox", "--", "cat", "/proc/1/cgroup")
    assert p.returncode == 0


def test_run_json() -> None:
    p = cli("run", "--json", "busybox", "--", "echo", "hi")
    data = json.loads(p.stdout)
    assert data["stdout"] == "hi\n"
    assert data["termination"]["kind"] == "exited"
    assert data["exit_code"] == 0


def test_oom_exits_137_with_an_explanation() -> None:
    p = cli(
        "run",
        "--memory",
        "32m",
        "busybox",
        "--",
        "sh",
        "-c",
        "a=xxxxxxxx; while :; do a=$a$a; done",
    )
    assert p.returncode == 137
    assert b"out of memory" in p.stderr
    assert b"limit_mib=32" in p.stderr


def test_timeout_exits_124_as_timeout_does() -> None:
    p = cli("run", "--timeout", "1s", "busybox", "--", "sleep", "20")
    assert p.returncode == 124
    assert b"timed out" in p.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "no-such-image-xyz", "--", "true"], b"no-such-image-xyz"),
        (["run", "--memory", "12q", "busybox", "--", "true"], b"bad memory size"),
        (["run", "--timeout", "soon", "busybox", "--", "true"], b"bad duration"),
        (["run", "--tier", "nope", "busybox", "--", "true"], b"unknown tier"),
        (["run", "-T", "nope", "busybox", "--", "true"], b"unknown tier"),
        (["run", "-e", "=x", "busybox", "--", "true"], b"bad --env"),
        (["run", "-v", "/tmp", "busybox", "--", "true"], b"bad --volume"),
        (["run", "-v", "/no/such/dir:/data", "busybox", "--", "true"], b"no such file"),
        (["run", "-u", "nobody", "busybox", "--", "true"], b"numeric uid"),
        (["sandbox", "exec", "nosuchsandbox", "--", "true"], b"no sandbox"),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(args: list[str], needle: bytes) -> None:
    p = cli(*args)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr
    assert b"Traceback" not in p.stderr


def test_interactive_passes_stdin() -> None:
    p = cli("run", "-i", "busybox", "--", "tr", "a-z", "A-Z", input=b"shout")
    assert p.stdout == b"SHOUT"
    assert cli("run", "busybox", "--", "cat", input=b"ignored").stdout == b""


def test_missing_command_exits_127() -> None:
    p = cli("run", "busybox", "--", "no-such-program")
    assert p.returncode == 127
    assert b"not found" in p.stderr


def test_sandbox_lifecycle() -> None:
    sid = cli("sandbox", "create", "busybox").stdout.decode().strip()
    try:
        assert cli("sandbox", "exec", sid, "--", "sh", "-c", "echo v1 > /tmp/app").returncode == 0
        assert cli("sandbox", "exec", sid, "--", "cat", "/tmp/app").stdout == b"v1\n"
        p = cli("sandbox", "cp", "-", f"{sid}:/tmp/from-host", input=b"copied")
        assert p.returncode == 0, p.stderr
        assert cli("sandbox", "cp", f"{sid}:/tmp/from-host", "-").stdout == b"copied"
        listing = json.loads(cli("sandbox", "ls", "--json").stdout)
        assert sid in [s["id"] for s in listing]
        stats = json.loads(cli("sandbox", "stats", sid, "--json").stdout)
        assert stats["memory_bytes"] > 0
    finally:
        assert cli("sandbox", "rm", sid).returncode == 0
    assert sid not in [s["id"] for s in json.loads(cli("sandbox", "ls", "--json").stdout)]


def test_tiers_json_lists_every_tier_with_a_reason() -> None:
    rows = json.loads(cli("tiers", "--json").stdout)
    names = [r["tier"] for r in rows]
    assert names[:3] == ["process", "container", "gvisor"]
    for r in rows:
        assert r["reason"]
