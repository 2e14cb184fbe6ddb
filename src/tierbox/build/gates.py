"""Gates for ``tierbox image build --lint --scan --fail-on LEVEL``.

The lint gate runs on the Dockerfile before anything is built; the scan gate
runs on the built image's archive before it enters the store. Either raises
:class:`~tierbox.errors.GateError` naming the finding that stopped the build.
One ``--fail-on`` level serves both: scan levels map onto lint severities as
critical and high -> error, medium -> warning, low -> info, unknown -> style.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tierbox.build.debsec import DebianSecurity
from tierbox.build.lint import LintReport, lint_file, rank
from tierbox.build.osv import OSVDatabase
from tierbox.build.parse import Dockerfile
from tierbox.build.sbom import catalog_archive, inventory_from
from tierbox.build.scan import ScanReport, check_fail_on, scan_inventory
from tierbox.errors import GateError

Progress = Callable[[str], None]

LINT_LEVEL = {
    "critical": "error",
    "high": "error",
    "medium": "warning",
    "low": "info",
    "unknown": "style",
}
DEFAULT_FAIL_ON = "high"


@dataclass
class GateResults:
    """What the gates saw, for the caller to print."""

    lint: LintReport | None = None
    scan: ScanReport | None = None


def lint_gate(
    fail_on: str, results: GateResults, progress: Progress
) -> Callable[[Dockerfile], None]:
    level = LINT_LEVEL[check_fail_on(fail_on)]

    def gate(df: Dockerfile) -> None:
        path = Path(df.path)
        report = LintReport(lint_file(path), [str(path)], "")
        results.lint = report
        failing = report.failing(level)
        progress(f"lint gate ({level} and above stops the build): {_count(len(report.findings))}")
        if failing:
            worst = max(failing, key=lambda f: rank(f.severity))  # the first of the most severe
            raise GateError(
                f"lint gate stopped the build before it started: {worst.file}:{worst.line} "
                f"{worst.rule} {worst.severity}: {worst.message} ({len(failing)} finding(s) at "
                f"{level} or above); nothing was built or stored",
                gate="lint",
                finding=f"{worst.rule} at {worst.file}:{worst.line}",
            )

    return gate


def scan_gate(
    fail_on: str,
    tag: str,
    results: GateResults,
    progress: Progress,
    *,
    db_path: Path | None = None,
    debian: DebianSecurity | None = None,
) -> Callable[[Path], None]:
    check_fail_on(fail_on)
    db = (
        OSVDatabase.load(db_path) if db_path is not None else None
    )  # a bad --db fails before the build

    def gate(archive: Path) -> None:
        progress(f"scanning {tag} before it is stored")
        with tempfile.TemporaryDirectory(prefix="gate-", dir=archive.parent) as scratch:
            sbom_dir = catalog_archive(archive, tag, Path(scratch))
            inv = inventory_from(sbom_dir, tag, "(not stored yet)")
            report = scan_inventory(inv, db=db, debian=debian, progress=progress)
        results.scan = report
        failing = report.failing(fail_on)
        progress(f"scan gate ({fail_on} and above stops the build): {_count(len(report.findings))}")
        if failing:
            worst = failing[0]  # findings are sorted most severe first
            raise GateError(
                f"scan gate stopped the build: {worst.one_line()} ({len(failing)} finding(s) at "
                f"{fail_on} or above); {tag} was not stored",
                gate="scan",
                finding=f"{worst.advisory_id} in {worst.package} {worst.installed}",
            )

    return gate


def _count(n: int) -> str:
    return f"{n} finding(s)"
