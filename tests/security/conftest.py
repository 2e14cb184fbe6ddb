"""Shared pieces of the attack suite: every test here plays a hostile workload
against real engines and checks the host saw nothing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ATTACKS = Path(__file__).resolve().parents[2] / "src" / "tierbox" / "bench" / "attacks"


def compile_static(source: Path, out: Path) -> bytes:
    """Build ``source`` as a static binary (runs in any image) and return it."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler: apt-get install gcc libc6-dev (make setup does)")
    subprocess.run([cc, "-static", "-O2", "-o", str(out), str(source)], check=True)
    return out.read_bytes()


@pytest.fixture(scope="session")
def swaprace(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The renameat2 swap loop of bench/attacks/swaprace.c, built static."""
    return compile_static(ATTACKS / "swaprace.c", tmp_path_factory.mktemp("swaprace") / "swaprace")
