"""The README's Python snippets, run as a new user would run them, on the
tiers they claim; afterwards nothing of tierbox is left running."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, require_image, require_tier

README = (ROOT / "README.md").read_text()
ENGINES = re.compile(r"qemu-system|runsc|crun|tierbox-[0-9a-f]{12}")
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def _block(containing: str) -> str:
    found = [b for b in BLOCKS if containing in b]
    assert found, f"README has no python block with {containing!r}"
    return found[0]


def _nothing_left(before: set[str]) -> None:
    assert _running() - before == set(), subprocess.run(
        ["ps", "-eo", "pid,stat,args"], capture_output=True, text=True
    ).stdout
    domains = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--name"], capture_output=True, text=True
    ).stdout.split()
    assert not any(re.fullmatch(r"tierbox-[0-9a-f]{12}", d) for d in domains), domains


def _running() -> set[str]:
    """Engine processes that run (zombies wait for the host's init to reap
    them, which takes seconds on some hosts; they run nothing)."""
    procs = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    out = set()
    for line in procs.splitlines()[1:]:
        pid, stat, args = ([*line.split(None, 2), "", ""])[:3]
        if not stat.startswith("Z") and re.search(
            r"qemu-system|runsc|crun|tierbox-[0-9a-f]{12}", args
        ):
            out.add(pid)
    return out


@pytest.fixture(scope="module")
def python_image() -> None:
    from tierbox.errors import ImageNotFoundError
    from tierbox.images.store import default_store

    try:
        default_store().resolve("python:3.11")
    except ImageNotFoundError:
        subprocess.run(
            [sys.executable, "-m", "tierbox.cli", "image", "bootstrap", "python:3.11"], check=True
        )


@pytest.mark.slow
@pytest.mark.parametrize("tier", ["container", "gvisor", "microvm", "wasm"])
def test_agent_example_runs_as_written(tier: str, python_image: None, tmp_path: Path) -> None:
    require_tier(tier)
    code = _block("json.dump(")
    code = code.replace('tier="container"', f'tier="{tier}"')
    before = _running()
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert p.returncode == 0, p.stderr
    assert "live: step 0\nlive: step 1\nlive: step 2\n" in p.stdout
    assert '0 {"answer": 42}' in p.stdout
    _nothing_left(before)


def test_quick_start_and_microvm_snippets_leave_nothing_behind(tmp_path: Path) -> None:
    for tier in ("container", "gvisor", "microvm"):
        require_tier(tier)
    require_image("busybox")
    before = _running()
    for needle in ('tier="gvisor", memory_mib=128, pids=64', 'tier="microvm", memory_mib=128'):
        p = subprocess.run(
            [sys.executable, "-c", _block(needle)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert p.returncode == 0, (needle, p.stderr)
    _nothing_left(before)
