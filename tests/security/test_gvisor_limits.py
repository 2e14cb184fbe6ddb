"""gVisor's limits mean what they mean on the other tiers, against a real runsc.

runsc enforces no memory limit on the workload alone (the Sentry's cgroupfs
memory limit is a stub) and its host threads are not the workload's
processes. tierbox sizes the host cgroup as the workload's limit plus the
engine's measured footprint, and limits the workload's processes inside the
Sentry (RLIMIT_NPROC): these tests hold it to the promises.
"""

from __future__ import annotations

import pytest

from tests.conftest import require_image, require_tier
from tierbox import Sandbox, TerminationKind, make_spec
from tierbox.errors import SandboxDeadError
from tierbox.tiers import get_tier

MEM_MIB = 64
#: usable memory within 10 % of memory_mib: 0.9 x 64 = 57.6, 1.1 x 64 = 70.4
FITS_MIB, TOO_BIG_MIB = 57, 71
MIB = 1 << 20


@pytest.fixture(autouse=True)
def _gvisor() -> None:
    require_tier("gvisor")
    require_image("busybox")


def alloc(mib: int) -> list[str]:
    """Hold ``mib`` MiB at once: dd's block buffer, filled from /dev/zero."""
    return ["sh", "-c", f"dd if=/dev/zero of=/dev/null bs={mib}M count=1 && echo held"]


def one_shot(argv: list[str], **limits: object):  # type: ignore[no-untyped-def]
    opts = {"memory_mib": MEM_MIB, "pids": 64, "timeout_s": 60.0} | limits
    return get_tier("gvisor").run(make_spec("busybox", **opts), argv)  # type: ignore[arg-type]


def long_lived(**limits: object) -> Sandbox:
    opts = {"memory_mib": MEM_MIB, "pids": 64, "timeout_s": 60} | limits
    return Sandbox.create("busybox", tier="gvisor", **opts)  # type: ignore[arg-type]


def assert_oom(r) -> None:  # type: ignore[no-untyped-def]
    t = r.termination
    assert t.kind is TerminationKind.OOM_KILLED, (t, r.stderr[-500:])
    ev = t.evidence
    assert ev["limit_mib"] == MEM_MIB
    assert ev["oom_kill"] >= 1
    # the workload's peak, near its own limit; the engine's share apart
    assert MEM_MIB * 0.9 <= ev["peak_mib"] <= MEM_MIB * 1.1, ev
    assert 0 < ev["engine_overhead_mib"] < ev["cgroup_limit_mib"] - MEM_MIB + 1, ev
    assert ev["cgroup_limit_mib"] < MEM_MIB + 40, ev
    assert r.exit_code == 137


# ---- memory ------------------------------------------------------------------


def test_one_shot_100_mib_is_oom_killed() -> None:
    assert_oom(one_shot(["sh", "-c", "head -c 100m /dev/zero | tail"]))


def test_one_shot_string_doubling_is_oom_killed() -> None:
    assert_oom(one_shot(["sh", "-c", "a=xxxxxxxx; while :; do a=$a$a; done"]))


def test_one_shot_usable_memory_is_within_10_percent() -> None:
    r = one_shot(alloc(55))
    assert r.ok and r.stdout == b"held\n", (r.termination, r.stderr)
    r = one_shot(alloc(FITS_MIB))
    assert r.ok, (r.termination, r.stderr)
    assert one_shot(alloc(TOO_BIG_MIB)).termination.kind is TerminationKind.OOM_KILLED


def test_long_lived_usable_memory_is_within_10_percent() -> None:
    with long_lived() as sb:
        for mib in (55, FITS_MIB):
            r = sb.run(alloc(mib))
            assert r.ok and r.stdout == b"held\n", (mib, r.termination, r.stderr)
        st = sb.stats()
        assert st.memory_limit_bytes == MEM_MIB * MIB
        # the workload's peak is its own, the engine's memory is reported apart
        assert st.memory_peak_bytes is not None
        # (the engine's share is its footprint measured once, so the workload's
        # peak may read a few MiB under what it held when the Sentry shrank since)
        assert (FITS_MIB - 4) * MIB <= st.memory_peak_bytes <= MEM_MIB * 1.1 * MIB, st
        assert st.engine_memory_bytes is not None and 4 * MIB < st.engine_memory_bytes < 64 * MIB
        # the Sentry gives freed pages back to the host lazily: memory_bytes may lag
        assert st.memory_bytes is not None and st.memory_bytes <= st.memory_peak_bytes, st
    with long_lived() as sb:
        r = sb.run(alloc(TOO_BIG_MIB))
        assert r.termination.kind is TerminationKind.OOM_KILLED, r.termination


def test_long_lived_100_mib_is_oom_killed_and_the_sandbox_reports_dead() -> None:
    with long_lived() as sb:
        assert sb.run(["true"]).ok
        r = sb.run(["sh", "-c", "head -c 100m /dev/zero | tail"])
        assert_oom(r)
        # the host OOM killer stops gVisor's whole Sentry: the next call says so
        with pytest.raises(SandboxDeadError):
            sb.run(["true"])


# ---- pids --------------------------------------------------------------------


def sleeps(n: int) -> list[str]:
    return ["sh", "-c", f"i=0; while [ $i -lt {n} ]; do sleep 300 & i=$((i+1)); done; echo spawned"]


def test_thirty_sleeps_fit_in_pids_64_and_stats_count_the_workload() -> None:
    with long_lived() as sb:
        idle = sb.stats().pids
        assert idle is not None and idle <= 2, idle  # catatonit; no Sentry threads
        r = sb.run(sleeps(30))
        assert r.ok and r.stdout == b"spawned\n", (r.termination, r.stderr)
        assert sb.stats().pids in (31, 32), sb.stats()  # init + 30 sleeps
        assert sb.run(["echo", "alive"]).stdout == b"alive\n"
        sb.run(["killall", "sleep"])


def test_one_shot_thirty_sleeps_fit_in_pids_64() -> None:
    r = one_shot(
        ["sh", "-c", "i=0; while [ $i -lt 30 ]; do sleep 1 & i=$((i+1)); done; wait; echo ok"]
    )
    assert r.ok and r.stdout == b"ok\n", (r.termination, r.stderr)


def test_eighty_sleeps_are_refused_past_64_and_the_sandbox_answers() -> None:
    with long_lived(memory_mib=256) as sb:
        r = sb.run(sleeps(80))
        # forks past the limit fail inside the Sentry (EAGAIN), as on Linux
        assert b"can't fork" in r.stderr, (r.termination, r.stderr)
        assert "engine_pids_max_hits" not in r.termination.evidence, r.termination
        st = sb.stats()
        assert st.pids is not None and 56 <= st.pids <= 64, st
        assert sb.run(["echo", "alive"]).stdout == b"alive\n"
        assert sb.run(["killall", "sleep"]).ok
        assert sb.run(["sh", "-c", "echo recovered"]).stdout == b"recovered\n"


def test_engine_footprint_is_measured_once_and_cached() -> None:
    from tierbox.paths import home

    fp = get_tier("gvisor").footprint()
    assert fp.runsc_version.startswith("runsc")
    assert "shmem" in fp.method
    assert 2 < fp.long_lived_idle_mib < 48 and 2 < fp.one_shot_idle_mib < 48, fp
    assert 0 <= fp.mib_per_workload_mib < 0.1, fp
    assert fp.startup_peak_mib >= fp.long_lived_idle_mib, fp
    cached = list((home() / "cache" / "gvisor").glob("footprint-*.json"))
    assert any(fp.runsc_version in p.read_text() for p in cached)
