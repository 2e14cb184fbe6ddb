"""Every benchmark script starts: its imports resolve and ``--help`` prints
its usage and promises (``make bench`` runs them for real; this catches a
script broken by a change elsewhere before anyone waits for one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_benchmark_script_answers_help(script: Path) -> None:
    p = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage:"), p.stdout
    assert "promise" in p.stdout.lower() or "target" in p.stdout.lower(), p.stdout


def test_a_bad_run_count_is_named() -> None:
    script = SCRIPTS[0].parent / "bench_wasm.py"
    p = subprocess.run([sys.executable, str(script), "zero"], capture_output=True, text=True)
    assert p.returncode == 2
    assert "N must be a number, not 'zero'" in p.stderr
