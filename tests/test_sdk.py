"""The agent-grade SDK on every tier that can: names, typed listings,
streaming callbacks, background commands, per-command cwd and user."""

from __future__ import annotations

import signal
import time

import pytest

from tests.conftest import require_image, require_tier, wait_until
from tierbox import Sandbox
from tierbox.errors import NotSupportedError, UsageError, WaitTimeoutError

HOST_TIERS = {"process": None, "container": "busybox", "gvisor": "busybox"}


@pytest.fixture(params=list(HOST_TIERS))
def sb(request: pytest.FixtureRequest) -> object:
    tier = request.param
    require_tier(tier)
    if HOST_TIERS[tier]:
        require_image(HOST_TIERS[tier])
    with Sandbox.create(HOST_TIERS[tier], tier=tier, memory_mib=128, pids=64) as box:
        yield box


def test_names_are_unique_among_live_sandboxes_and_connectable() -> None:
    require_tier("container")
    with Sandbox.create("busybox", tier="container", name="sdk-web") as a:
        assert Sandbox.connect("sdk-web").id == a.id
        assert "name=sdk-web" in repr(a)
        with pytest.raises(UsageError, match="belongs to live sandbox"):
            Sandbox.create("busybox", tier="container", name="sdk-web")
        listed = {r.id: r for r in Sandbox.list()}
        rec = listed[a.id]
        assert (rec.name, rec.tier, rec.image, rec.state) == (
            "sdk-web",
            "container",
            "busybox",
            "running",
        )
        assert rec.created_unix <= time.time()
    # closed: the name is free again
    with Sandbox.create("busybox", tier="container", name="sdk-web") as b:
        assert Sandbox.connect("sdk-web").id == b.id
    for bad in ("", "-x", "a b", "x" * 64):
        with pytest.raises(UsageError, match="not a sandbox name"):
            Sandbox.create("busybox", tier="container", name=bad)


def test_output_streams_as_it_is_written(sb: Sandbox) -> None:
    seen: list[tuple[float, str, bytes]] = []
    t0 = time.monotonic()
    r = sb.run(
        ["sh", "-c", "echo one; sleep 0.5; echo two >&2; sleep 0.5; echo three"],
        on_stdout=lambda b: seen.append((time.monotonic() - t0, "out", b)),
        on_stderr=lambda b: seen.append((time.monotonic() - t0, "err", b)),
    )
    assert r.stdout_text == "one\nthree\n" and r.stderr_text == "two\n"
    assert [(kind, data) for _, kind, data in seen] == [
        ("out", b"one\n"),
        ("err", b"two\n"),
        ("out", b"three\n"),
    ]
    # each chunk arrived while the command still ran, not at its end
    assert seen[0][0] < 0.4 and 0.4 < seen[1][0] < 0.9, seen


def test_background_commands(sb: Sandbox) -> None:
    cat = sb.run(["cat"], background=True)
    cat.send_stdin("hello ")
    cat.send_stdin(b"world")
    cat.close_stdin()
    assert cat.wait(timeout_s=10).stdout == b"hello world"
    sleeper = sb.run(["sleep", "100"], background=True)
    with pytest.raises(WaitTimeoutError):
        sleeper.wait(timeout_s=0.2)
    wait_until(lambda: any(p.argv[:1] == ["sleep"] for p in sb.processes()), what="sleep listed")
    assert sleeper.pid is not None
    assert sb.run(["echo", "meanwhile"]).stdout == b"meanwhile\n"  # it does not block others
    sleeper.kill(signal.SIGTERM)
    r = sleeper.wait(timeout_s=10)
    assert r.termination.signal == signal.SIGTERM, r.termination
    assert sleeper.done


def test_leftover_processes_live_until_close_as_in_a_container(sb: Sandbox) -> None:
    sb.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 &"])
    assert any(p.argv == ["sleep", "300"] for p in sb.processes())


def test_cwd_and_user_per_command(sb: Sandbox) -> None:
    r = sb.run(["sh", "-c", "pwd; id -u"], cwd="/", user="4321")
    assert r.stdout_text.split() == ["/", "4321"]
    with pytest.raises(UsageError):
        sb.run(["true"], user="nobody")


def test_the_wasm_tier_says_which_tiers_have_users() -> None:
    require_tier("wasm")
    with Sandbox.create("micropython:wasi", tier="wasm") as sb:
        with pytest.raises(NotSupportedError, match="tiers that can: process"):
            sb.run(["micropython", "-c", "print(1)"], user="1000")
        got: list[bytes] = []
        r = sb.run(["micropython", "-c", "print('streamed')"], on_stdout=got.append)
        assert r.ok and b"".join(got) == b"streamed\n"
        h = sb.run(["micropython", "-c", "print(2)"], background=True)
        assert h.wait(timeout_s=10).stdout == b"2\n"
