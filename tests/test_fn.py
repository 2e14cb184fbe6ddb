"""Serverless functions on pooled sandboxes, through the CLI and the pool
host it starts: warm and cold invocations, scale to zero after an idle
period, data on stdin, exit statuses, and functions that survive a restart
of their host."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TIERBOX, require_image, require_tier, wait_until
from tierbox.pools.manager import FunctionSpec, PoolManager, function_pool_spec


@pytest.fixture(autouse=True)
def _container() -> None:
    require_tier("container")
    require_image("busybox")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Its own pools directory (and pool host); removed with all it holds."""
    e = {**os.environ, "TIERBOX_POOLS": str(tmp_path / "pools")}
    yield e
    listing = _cli(e, "fn", "ls", "--json")
    for row in json.loads(listing.stdout or "[]"):
        _cli(e, "fn", "rm", row["name"])
    with_pid = tmp_path / "pools" / "run" / "manager.pid"
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(with_pid.read_text().split()[0]), signal.SIGKILL)


def _cli(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TIERBOX, *args], env=env, input=stdin, capture_output=True, text=True, timeout=180
    )


def _deploy(env: dict[str, str], name: str, *cmd: str, idle: str = "5m") -> None:
    r = _cli(env, "fn", "deploy", name, "--image", "busybox", "--tier", "container",
             "--memory", "64m", "--idle", idle, "--", *cmd)  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_invoke_warm_then_cold_after_scale_to_zero(env: dict[str, str], tmp_path: Path) -> None:
    _deploy(env, "wc", "wc", "-c", idle="2s")
    r = _cli(env, "fn", "invoke", "wc", "--data", "hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "5"
    assert "warm start" in r.stderr
    payload = tmp_path / "payload"
    payload.write_bytes(b"x" * 1000)
    r = _cli(env, "fn", "invoke", "wc", "--data", f"@{payload}", "--json")
    inv = json.loads(r.stdout)
    assert inv["result"]["stdout"].strip() == "1000" and inv["start"] == "warm"
    # idle past --idle: the pool goes to zero, the next call starts cold
    wait_until(
        lambda: json.loads(_cli(env, "fn", "ls", "--json").stdout)[0]["scaled_to_zero"],
        timeout_s=20,
        what="scale to zero",
    )
    pool = json.loads(_cli(env, "pool", "ls", "--json").stdout)[0]
    wait_until(
        lambda: json.loads(_cli(env, "pool", "ls", "--json").stdout)[0]["ready"] == 0,
        what="no ready member left",
    )
    assert pool["name"] == "fn-wc"
    r = _cli(env, "fn", "invoke", "wc", "--data", "abc")
    assert r.returncode == 0 and r.stdout.strip() == "3"
    assert "cold start" in r.stderr, r.stderr
    # the call woke the pool: the next one finds a ready member again
    wait_until(
        lambda: json.loads(_cli(env, "pool", "ls", "--json").stdout)[0]["ready"] >= 1,
        what="the pool refilled",
    )
    r = _cli(env, "fn", "invoke", "wc", "--data", "abcd")
    assert "warm start" in r.stderr and r.stdout.strip() == "4"


def test_exit_status_and_stdin(env: dict[str, str]) -> None:
    _deploy(env, "fail", "sh", "-c", "read x; echo got $x; exit 3")
    r = _cli(env, "fn", "invoke", "fail", "--data", "@-", stdin="ping\n")
    assert r.returncode == 3
    assert r.stdout == "got ping\n"


def test_function_errors(env: dict[str, str]) -> None:
    r = _cli(env, "fn", "invoke", "nothere")
    assert r.returncode == 2 and "no function 'nothere'" in r.stderr
    r = _cli(env, "fn", "deploy", "nocmd", "--image", "busybox")
    assert r.returncode == 2
    _deploy(env, "own", "true")
    r = _cli(env, "pool", "rm", "fn-own")
    assert r.returncode == 2 and "belongs to function own" in r.stderr


def test_functions_survive_a_restart_of_their_host(env: dict[str, str]) -> None:
    _deploy(env, "echo", "cat")
    pid_file = Path(env["TIERBOX_POOLS"]) / "run" / "manager.pid"
    pid = int(pid_file.read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), what="the host gone")
    r = _cli(env, "fn", "invoke", "echo", "--data", "still here")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "still here"
    assert int(pid_file.read_text().split()[0]) != pid
    rows = json.loads(_cli(env, "fn", "ls", "--json").stdout)
    assert [(row["name"], row["argv"]) for row in rows] == [("echo", ["cat"])]


def test_manager_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manager a daemon would host, used directly."""
    monkeypatch.setenv("TIERBOX_POOLS", str(tmp_path / "pools"))
    m = PoolManager()
    try:
        fn = FunctionSpec(name="upper", argv=("tr", "a-z", "A-Z"), idle_s=60)
        m.deploy(fn, function_pool_spec("upper", "busybox", tier="container", memory_mib=64))
        wait_until(lambda: m.status("fn-upper")["ready"] >= 1, what="a ready member")
        inv = m.invoke("upper", b"shout")
        assert inv.warm and inv.result.stdout == b"SHOUT"
        assert inv.claim_s < 0.5
        m.remove_function("upper")
        assert m.empty()
    finally:
        m.close()


@pytest.mark.slow
def test_microvm_function(env: dict[str, str]) -> None:
    require_tier("microvm")
    r = _cli(env, "fn", "deploy", "vmcat", "--image", "busybox", "--tier", "microvm",
             "--memory", "128m", "--", "cat")  # fmt: skip
    assert r.returncode == 0, r.stderr
    wait_until(
        lambda: json.loads(_cli(env, "fn", "ls", "--json").stdout)[0]["ready"] >= 1,
        timeout_s=60,
        what="a ready microVM",
    )
    t0 = time.monotonic()
    r = _cli(env, "fn", "invoke", "vmcat", "--data", "in a guest", "--json")
    assert r.returncode == 0, r.stderr
    inv = json.loads(r.stdout)
    assert inv["result"]["stdout"] == "in a guest" and inv["start"] == "warm"
    assert time.monotonic() - t0 < 30
