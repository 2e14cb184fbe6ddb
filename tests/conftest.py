"""Shared fixtures: real engines only. A tier that cannot run here is skipped
with its reason printed (and on the project's CI machines that is a failure to
investigate, not a pass)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tierbox import wait_closed
from tierbox.host import mntns
from tierbox.paths import MARKER, sandboxes_dir
from tierbox.tiers import get_tier

ROOT = Path(__file__).resolve().parent.parent
TIERBOX = [sys.executable, "-m", "tierbox.cli"]
#: Set (as .ci/run does) on machines where every tier must run: a skip there
#: is a failure to investigate, so it fails the run with its reason.
NO_SKIP_ENV = "TIERBOX_TEST_NO_SKIP"


def wait_until(
    predicate: Callable[[], object], *, timeout_s: float = 10.0, what: str = "the condition"
) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout_s``.
    Synchronisation by condition, never by a bare sleep."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and os.environ.get(NO_SKIP_ENV) and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, and {NO_SKIP_ENV} forbids skips here: {reason}"
    return None


def require_tier(name: str) -> None:
    a = get_tier(name).available()
    if not a.available:
        pytest.skip(f"tier {name} unavailable here: {a.reason}")


def require_image(ref: str) -> None:
    from tierbox.errors import ImageNotFoundError
    from tierbox.images.store import default_store

    try:
        default_store().resolve(ref)
    except ImageNotFoundError as exc:
        pytest.skip(f"image {ref} missing: {exc} (run `make setup`)")


def leftovers() -> dict[str, list[str]]:
    """Everything tierbox-named on the host: must be empty between tests
    (once this process's background teardowns are done)."""
    assert wait_closed(timeout_s=60), "background teardowns still running after 60 s"
    cg = []
    for ctrl in ("memory", "pids", "cpu", "freezer"):
        d = Path("/sys/fs/cgroup") / ctrl / MARKER
        if d.is_dir():
            cg += [f"{ctrl}/{p.name}" for p in d.iterdir() if p.is_dir()]
    base = sandboxes_dir()
    mounts = [str(p) for p in mntns.mounts_under(base) if p != base]
    dirs = [p.name for p in base.iterdir() if not p.name.startswith(".")] if base.is_dir() else []
    procs = subprocess.run(
        ["pgrep", "-f", f"{MARKER}-[0-9a-f]{{12}}"], capture_output=True, text=True
    ).stdout.split()
    procs = [p for p in procs if int(p) != os.getpid()]
    return {"cgroups": cg, "mounts": mounts, "dirs": dirs, "processes": procs}


def assert_clean(before: dict[str, list[str]] | None = None) -> None:
    now = leftovers()
    if before is not None:
        now = {k: sorted(set(v) - set(before[k])) for k, v in now.items()}
    assert now == {"cgroups": [], "mounts": [], "dirs": [], "processes": []}, now


def assert_gone(ids: set[str]) -> None:
    """Nothing of these sandboxes is left (robust to other runs on the host)."""
    left = {k: [x for x in v if any(i in x for i in ids)] for k, v in leftovers().items()}
    procs = subprocess.run(["pgrep", "-af", "tierbox"], capture_output=True, text=True).stdout
    left["processes"] = [line for line in procs.splitlines() if any(i in line for i in ids)]
    assert left == {"cgroups": [], "mounts": [], "dirs": [], "processes": []}, left


def cli(
    *args: str, input: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*TIERBOX, *args], input=input, capture_output=True, timeout=timeout)


@pytest.fixture(scope="session", autouse=True)
def _leave_no_mounts() -> object:
    """At the end of the run, reap leftovers and drop the runtime namespace
    tierbox set up, so the suite leaves no tierbox cgroup or mount behind."""
    yield
    from tierbox import gc
    from tierbox.tiers import _pool

    _pool.close_all_pools()
    wait_closed(timeout_s=120)
    # what tests that crash a tierbox process on purpose left behind; printed
    # so that a real leak shows in the log
    for line in gc.collect():  # also drops the runtime namespace when nothing is live
        if "/mntns" not in line and not line.startswith("mount /run/tierbox"):
            print(f"\nsession teardown: gc removed {line}")
