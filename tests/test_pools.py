"""Warm pools on real engines: claims, refills, dead members, max_size,
a burst that scales up and back down, disruption budgets for drain, shrink
and rolling replacement, each tier's way of keeping members ready, and a
pool that survives the death of the process hosting it.

Windows and sync periods are short here so the autoscaler's real-time
behaviour fits in seconds; its rules are tested with time as an input in
test_autoscale.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, TIERBOX, require_image, require_tier, wait_until
from tierbox import Sandbox
from tierbox.errors import (
    DisruptionBudgetError,
    ImageNotFoundError,
    PoolExhaustedError,
    SandboxNotFoundError,
    TierUnavailableError,
    UnknownTierError,
)
from tierbox.pools import Pool
from tierbox.tiers import _state

FAST = {"sync_period_s": 0.2, "memory_mib": 64}
SHORT_WINDOW = {"scaleDown": {"stabilizationWindowSeconds": 3}}


@pytest.fixture
def pools() -> Iterator[list[Pool]]:
    """Pools a test makes, closed afterwards whatever happens."""
    made: list[Pool] = []
    yield made
    for p in made:
        p.close()


def _pool(made: list[Pool], *args: Any, **kwargs: Any) -> Pool:
    p = Pool(*args, **kwargs)
    made.append(p)
    return p


def _ready(p: Pool, n: int, timeout_s: float = 30.0) -> None:
    wait_until(lambda: p.status()["ready"] >= n, timeout_s=timeout_s, what=f"{n} ready members")


@pytest.fixture(autouse=True)
def _container() -> None:
    require_tier("container")
    require_image("busybox")


def test_claim_close_refill(pools: list[Pool]) -> None:
    p = _pool(pools, "busybox", "container", min_ready=2, max_size=4, name="t-refill", **FAST)
    _ready(p, 2)
    sb = p.claim()
    assert sb.warm
    assert sb.run(["echo", "hi"]).stdout == b"hi\n"
    # the pool keeps min_ready ready beside the claimed member
    wait_until(lambda: p.status()["ready"] == 2, what="a refill while one is claimed")
    assert p.status()["claimed"] == 1
    gone = sb.id
    sb.close()
    with pytest.raises(SandboxNotFoundError):
        Sandbox.connect(gone)  # destroyed, not returned
    seen = set()
    for _ in range(4):
        with p.claim() as other:
            seen.add(other.id)
    assert gone not in seen
    wait_until(lambda: p.status()["ready"] >= 2, what="refilled after closes")


def test_bad_image_and_tier_fail_at_creation(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFoundError, match="nosuchimage"):
        Pool("nosuchimage", "container", name="t-noimage")
    with pytest.raises(UnknownTierError):
        Pool("busybox", "mainframe", name="t-notier")
    # a tier that cannot run here: QEMU is not on PATH for this process
    (tmp_path / "bin").mkdir()
    code = (
        "from tierbox.pools import Pool\n"
        "from tierbox.errors import TierUnavailableError\n"
        "try:\n"
        "    Pool('busybox', 'microvm', name='t-unavailable')\n"
        "except TierUnavailableError as exc:\n"
        "    print('refused:', exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PATH": str(tmp_path / "bin")},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert "refused: pool t-unavailable: the microvm tier cannot run here" in proc.stdout, (
        proc.stdout + proc.stderr
    )
    assert "qemu-system-x86_64 is not installed" in proc.stdout
    assert issubclass(TierUnavailableError, Exception)


def test_dead_ready_member_is_replaced_never_handed_out(pools: list[Pool]) -> None:
    p = _pool(pools, "busybox", "container", min_ready=2, max_size=3, name="t-dead", **FAST)
    _ready(p, 2)
    victim = next(m for m in p._members.values() if m.sb is not None)
    assert victim.sb is not None
    for pid in victim.sb.instance.host_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not victim.sb.instance.alive(), what="the kill to land")  # type: ignore[union-attr]
    handed = []
    for _ in range(3):
        with p.claim() as sb:
            handed.append(sb.id)
            assert sb.run(["true"]).ok
    assert victim.key not in handed
    wait_until(
        lambda: any(e["reason"] == "MemberDied" for e in p.status()["events"]),
        what="the death noticed",
    )
    _ready(p, 2)


def test_claims_beyond_max_size_wait_then_fail(pools: list[Pool]) -> None:
    p = _pool(pools, "busybox", "container", min_ready=1, max_size=1, name="t-max", **FAST)
    first = p.claim()
    t0 = time.monotonic()
    with pytest.raises(PoolExhaustedError, match="max_size=1"):
        p.claim(timeout_s=0.5)
    assert time.monotonic() - t0 >= 0.5
    # a waiting claim is served as soon as a member frees up
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(p.claim(timeout_s=30)))
    waiter.start()
    time.sleep(0.3)
    first.close()
    waiter.join(30)
    assert got and got[0].run(["true"]).ok
    assert not got[0].warm  # it waited for a new member
    got[0].close()


@pytest.mark.slow
def test_burst_of_50_claims_scales_up_and_back_down(pools: list[Pool]) -> None:
    p = _pool(
        pools,
        "busybox",
        "container",
        min_ready=2,
        max_size=8,
        name="t-burst",
        behavior=SHORT_WINDOW,
        **FAST,
    )
    _ready(p, 2)
    served: list[str] = []
    errors: list[BaseException] = []
    most = [0]
    reasons: set[str] = set()

    def one() -> None:
        try:
            with p.claim(timeout_s=120) as sb:
                assert sb.run(["true"]).ok
                time.sleep(0.2)
                served.append(sb.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(50)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        st = p.status()
        most[0] = max(most[0], st["desired"])
        time.sleep(0.05)
    assert not errors, errors[:3]
    assert len(set(served)) == 50  # every claim served, no member twice
    assert most[0] > 2
    # held by the stabilization window, then back to min_ready
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = p.status()
        if st["decision"]:
            reasons.add(st["decision"]["reason"])
        if st["desired"] == 2 and st["ready"] == 2 and st["evicting"] == 0:
            break
        time.sleep(0.1)
    assert p.status()["desired"] == 2 and p.status()["ready"] == 2, p.status()
    assert "ScaleDownStabilized" in reasons, reasons
    events = [e["reason"] for e in p.status()["events"]]
    assert "SuccessfulRescale" in events


class _Healthy:
    """Samples ready+claimed of a pool in the background."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.low = 10**6
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            st = self.pool.status()
            self.low = min(self.low, st["ready"] + st["claimed"])
            time.sleep(0.005)

    def stop(self) -> int:
        self._stop.set()
        self._t.join(5)
        return self.low


def test_drain_waits_on_the_budget_and_says_why(pools: list[Pool]) -> None:
    p = _pool(
        pools,
        "busybox",
        "container",
        min_ready=3,
        max_size=3,
        name="t-drain",
        min_available=2,
        **FAST,
    )
    _ready(p, 3)
    claimed = p.claim()
    wait_until(lambda: p.status()["ready"] == 2, what="ready beside the claim")
    healthy = _Healthy(p)
    said: list[str] = []
    with pytest.raises(DisruptionBudgetError) as exc:
        p.drain(timeout_s=2, progress=said.append)
    assert healthy.stop() >= 2
    assert "min_available=2" in str(exc.value)
    assert any("below the disruption budget min_available=2" in s for s in said), said
    st = p.status()
    assert st["ready"] + st["claimed"] == 2 and st["draining"]
    # draining: claims are served by the members still ready, none start
    with p.claim() as sb:
        assert sb.run(["true"]).ok
    claimed.close()
    p.scale(min_ready=1)  # resumes
    _ready(p, 1)


def test_drain_without_a_budget_empties_the_pool(pools: list[Pool]) -> None:
    p = _pool(pools, "busybox", "container", min_ready=2, max_size=3, name="t-drain2", **FAST)
    _ready(p, 2)
    p.drain(timeout_s=30)
    assert p.status()["ready"] == 0
    with pytest.raises(PoolExhaustedError, match="draining"):
        p.claim(timeout_s=1)


def test_shrink_stops_at_the_budget(pools: list[Pool]) -> None:
    p = _pool(
        pools,
        "busybox",
        "container",
        min_ready=4,
        max_size=5,
        name="t-shrink",
        min_available=3,
        behavior={"scaleDown": {"stabilizationWindowSeconds": 0}},
        **FAST,
    )
    _ready(p, 4)
    healthy = _Healthy(p)
    p.scale(min_ready=1)
    wait_until(lambda: "shrink held" in p.status()["blocked"], what="the shrink held")
    time.sleep(0.5)
    assert healthy.stop() >= 3
    st = p.status()
    assert st["ready"] == 3 and "min_available=3" in st["blocked"]


def test_rolling_replacement_on_image_change_keeps_the_budget(pools: list[Pool]) -> None:
    require_image("debian:bookworm")
    p = _pool(
        pools,
        "busybox",
        "container",
        min_ready=3,
        max_size=3,
        name="t-roll",
        max_unavailable=1,
        **FAST,
    )
    _ready(p, 3)
    old = p.claim()  # an old member in use: it finishes with its user
    healthy = _Healthy(p)
    p.update(image="debian:bookworm")
    wait_until(
        lambda: (
            all(m.generation == 2 for m in p._members.values() if m.state.value != "claimed")
            and p.status()["ready"] == 2
        ),
        timeout_s=60,
        what="ready members replaced",
    )
    assert healthy.stop() >= 2  # max_unavailable=1 of 3
    assert old.run(["cat", "/etc/debian_version"]).exit_code != 0  # still busybox
    old.close()
    with p.claim() as sb:
        assert sb.run(["cat", "/etc/debian_version"]).ok
    wait_until(p.rolled_out, what="no old member left")


def test_wasm_pool_creates_on_claim(pools: list[Pool]) -> None:
    require_tier("wasm")
    p = _pool(
        pools,
        "micropython:wasi",
        "wasm",
        min_ready=2,
        max_size=3,
        name="t-wasm",
        warmup=["micropython", "-c", "pass"],
        **FAST,
    )
    assert p.mode.value == "on-demand"
    time.sleep(5 * FAST["sync_period_s"])  # several rounds in which it could have made some
    # nothing held ahead: no member, and no sandbox on the host marked as one
    # (other sandboxes may come and go on a shared host, so only this pool's count)
    st = p.status()
    assert st["starting"] == 0 and st["claimed"] == 0, st
    assert not [s for s in _state.list_states() if s.get("pool") == "t-wasm"]
    with p.claim() as sb:
        assert sb.warm
        assert sb.run(["micropython", "-c", "print(6*7)"]).stdout == b"42\n"
    assert p.status()["ready"] >= 2


@pytest.mark.slow
def test_microvm_clones_are_ready_and_share_nothing(pools: list[Pool]) -> None:
    require_tier("microvm")
    p = _pool(
        pools, "busybox", "microvm", min_ready=2, max_size=3, name="t-microvm", memory_mib=128
    )
    assert p.mode.value == "template"
    template = Path(p.template.path) if p.template else None
    assert template is not None and template.is_dir()
    _ready(p, 2, timeout_s=60)
    a = p.claim()
    b = p.claim()
    try:
        assert a.warm and b.warm
        cmd = ["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1; date +%s"]
        ra, rb = a.run(cmd), b.run(cmd)
        rand_a, clock_a = ra.stdout.decode().rsplit("\n", 2)[:2]
        rand_b, clock_b = rb.stdout.decode().rsplit("\n", 2)[:2]
        assert rand_a != rand_b  # reseeded: no RNG state shared
        assert abs(int(clock_a) - time.time()) < 3 and abs(int(clock_b) - time.time()) < 3
        a.files.write("/tmp/mine", "a")
        assert b.run(["cat", "/tmp/mine"]).exit_code != 0  # nothing writable shared
        assert a.instance.host_pids() != b.instance.host_pids()
    finally:
        a.close()
        b.close()
    p.close()
    assert not template.exists()  # the template goes with the pool


@pytest.mark.slow
def test_vm_pool(pools: list[Pool]) -> None:
    require_tier("vm")
    p = _pool(pools, "busybox", "vm", min_ready=1, max_size=2, name="t-vm", memory_mib=256)
    assert p.mode.value == "create"
    _ready(p, 1, timeout_s=120)
    with p.claim() as sb:
        assert sb.warm and sb.run(["echo", "vm"]).stdout == b"vm\n"


# ---- the pool host: restarts and gc ------------------------------------------------------


@pytest.fixture
def host(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment with its own pools directory (and so its own pool
    host); the host and anything it left are gone afterwards."""
    env = {**os.environ, "TIERBOX_POOLS": str(tmp_path / "pools")}
    yield env
    subprocess.run([*TIERBOX, "pool", "ls", "--json"], env=env, capture_output=True, timeout=120)
    names = _cli(env, "pool", "ls", "--json")
    for row in json.loads(names.stdout or "[]"):
        if row.get("function"):
            _cli(env, "fn", "rm", row["function"])
        else:
            _cli(env, "pool", "rm", row["name"])
    pid_file = tmp_path / "pools" / "run" / "manager.pid"
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)


def _cli(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TIERBOX, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _host_pid(env: dict[str, str]) -> int:
    return int((Path(env["TIERBOX_POOLS"]) / "run" / "manager.pid").read_text().split()[0])


def _members(pool: str) -> set[str]:
    return {s["id"] for s in _state.list_states() if s.get("pool") == pool}


def test_pool_survives_a_restart_of_its_host(host: dict[str, str]) -> None:
    r = _cli(host, "pool", "create", "t-restart", "--image", "busybox", "--min-ready", "2",
             "--max-size", "4", "--memory", "64m")  # fmt: skip
    assert r.returncode == 0, r.stderr
    wait_until(
        lambda: json.loads(_cli(host, "pool", "ls", "--json").stdout)[0]["ready"] == 2,
        timeout_s=30,
        what="the pool ready",
    )
    old = _members("t-restart")
    assert len(old) == 2
    # gc sees a live host's members as live, a dead host's as leftovers
    assert old <= _state.live_ids()
    os.kill(_host_pid(host), signal.SIGKILL)
    wait_until(lambda: not (old & _state.live_ids()), what="the host gone")
    # the next command brings the host back with the pool, refilled
    rows = json.loads(_cli(host, "pool", "ls", "--json").stdout)
    assert [r["name"] for r in rows] == ["t-restart"]
    assert rows[0]["min_ready"] == 2 and rows[0]["max_size"] == 4
    wait_until(lambda: len(_members("t-restart")) == 2, timeout_s=30, what="a refill")
    assert not (_members("t-restart") & old)
    r = _cli(host, "pool", "rm", "t-restart")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: not _members("t-restart"), what="members removed")


def test_restarted_host_closes_what_the_dead_one_left(
    host: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    r = _cli(host, "pool", "create", "t-left", "--image", "busybox", "--min-ready", "1",
             "--memory", "64m")  # fmt: skip
    assert r.returncode == 0, r.stderr
    wait_until(lambda: len(_members("t-left")) == 1, what="a member")
    old = _members("t-left")
    os.kill(_host_pid(host), signal.SIGKILL)
    wait_until(lambda: not _state.is_live(next(iter(old))), what="the host gone")
    # gc's part: the dead host's pid file and socket go
    from tierbox.pools.reap import reap

    monkeypatch.setenv("TIERBOX_POOLS", host["TIERBOX_POOLS"])
    removed = reap(_state.live_ids())
    assert any("manager.pid" in line for line in removed), removed
    assert not (Path(host["TIERBOX_POOLS"]) / "run" / "manager.sock").exists()
    rows = json.loads(_cli(host, "pool", "ls", "--json").stdout)
    assert rows[0]["name"] == "t-left"
    assert not (_members("t-left") & old)  # closed by the new host, not left for gc


def test_pool_cli_errors(host: dict[str, str]) -> None:
    r = _cli(host, "pool", "create", "t-err", "--image", "nosuchimage")
    assert r.returncode == 2 and "nosuchimage" in r.stderr
    r = _cli(host, "pool", "scale", "t-none", "--min-ready", "1")
    assert r.returncode == 2 and "no pool 't-none'" in r.stderr
    r = _cli(host, "pool", "create", "BAD NAME", "--image", "busybox")
    assert r.returncode == 2 and "pool name" in r.stderr
    r = _cli(host, "pool", "create", "t-err2", "--image", "busybox", "--min-ready", "5",
             "--max-size", "2")  # fmt: skip
    assert r.returncode == 2 and "min_ready=5 is more than max_size=2" in r.stderr


def test_pool_watch_shows_the_decision(host: dict[str, str]) -> None:
    r = _cli(host, "pool", "create", "t-watch", "--image", "busybox", "--min-ready", "1",
             "--memory", "64m", "--min-available", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = _cli(host, "pool", "watch", "t-watch", "--count", "2", "--interval", "1s")
    assert r.returncode == 0, r.stderr
    for text in ("Members:", "Last decision:", "Conditions", "ScalingActive", "ValidMetricFound",
                 "disruption budget min_available=1"):  # fmt: skip
        assert text in r.stdout, r.stdout
    st = json.loads(_cli(host, "pool", "watch", "t-watch", "--count", "1", "--json").stdout)
    assert st["decision"]["reason"] and st["ready"] >= 0
