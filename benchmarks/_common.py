"""Helpers shared by the benchmarks: timing, interleaving, the runtime namespace."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from tierbox.host import mntns


def enter_runtime_namespace() -> None:
    """Re-exec this benchmark inside tierbox's runtime mount namespace on a
    hybrid-cgroup host, so raw ``crun`` runs as it would natively and raw and
    tierbox are timed under identical conditions."""
    if mntns.hybrid_cgroups() and not mntns.inside_runtime_ns():
        mntns.ensure_runtime_ns()
        nsenter = "/usr/bin/nsenter"
        script = os.path.abspath(sys.argv[0])
        os.execv(
            nsenter,
            [
                nsenter,
                f"--mount={mntns.ns_file()}",
                f"--wd={os.getcwd()}",
                "--",
                sys.executable,
                script,
                *sys.argv[1:],
            ],
        )


def count_args(doc: str | None, *args: tuple[str, type, float, str]) -> list[float]:
    """Positional numbers from the command line (``script.py [N] ...``), each
    ``(name, type, default, help)``, with ``--help`` from the script's docstring."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, kind, default, text in args:

        def positive(value: str, kind: type = kind, name: str = name) -> float:
            try:
                number = kind(value)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{name} must be a number, not {value!r}"
                ) from None
            if number <= 0:
                raise argparse.ArgumentTypeError(f"{name} must be positive, not {value}")
            return number  # type: ignore[no-any-return]

        parser.add_argument(
            name, nargs="?", type=positive, default=default, help=f"{text} (default: {default})"
        )
    ns = parser.parse_args()
    return [getattr(ns, name) for name, *_ in args]


def runs_arg(doc: str | None, default: int, text: str = "measured runs per side") -> int:
    """``script.py [N]``: how many runs, with ``--help`` from the docstring."""
    return int(count_args(doc, ("N", int, default, text))[0])


def interleaved(
    fns: dict[str, Callable[[], object]],
    n: int,
    warmup: int = 3,
    settle: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Time each fn n times, alternating between them so that machine noise
    hits all of them alike. Returns seconds per call. ``settle``, untimed
    after each call, waits for work a call left running in the background
    (a teardown), so that it is not timed as part of the next call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            if settle is not None:
                settle()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
            if settle is not None:
                settle()
    return out


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(len(xs) * 0.95) - 1)]


@dataclass
class Promise:
    name: str
    measured: float
    target: float
    unit: str
    higher_is_better: bool = False

    @property
    def ok(self) -> bool:
        return (
            self.measured >= self.target if self.higher_is_better else self.measured <= self.target
        )

    def line(self) -> str:
        rel = ">=" if self.higher_is_better else "<="
        verdict = "PASS" if self.ok else "FAIL"
        target = f"target {rel} {self.target}{self.unit}"
        return f"{verdict}  {self.name}: {self.measured:.2f}{self.unit} ({target})"


def report(promises: list[Promise]) -> int:
    print()
    for pr in promises:
        print(pr.line())
    return 0 if all(p.ok for p in promises) else 1
