"""``tierbox image scan``: known vulnerabilities of an image's packages, from the
sources that can tell, and nothing claimed beyond them.

(a) Debian packages: the image's dpkg versions against its release's security
suite (:mod:`tierbox.build.debsec`), each pending update with the CVE ids of
its changelog. (b) Any ecosystem: OSV advisories from ``--db``
(:mod:`tierbox.build.osv`), ranges in the ecosystem's own order. (c) Nothing
else: the report lists which packages each source covered and which no source
did. The package list is syft's (:mod:`tierbox.build.sbom`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from debian.debian_support import Version

from tierbox.build.debsec import DebianSecurity
from tierbox.build.osv import LEVELS, OSVDatabase
from tierbox.build.sarif import SarifResult, SarifRule, sarif_log
from tierbox.build.sbom import Inventory, Package, image_inventory
from tierbox.errors import HostError, UsageError
from tierbox.images.store import ImageStore

Progress = Callable[[str], None]
FAIL_ON = ("critical", "high", "medium", "low", "unknown")
FORMATS = ("table", "json", "sarif")
#: syft package types and the OSV ecosystem each belongs to.
ECOSYSTEMS = {
    "deb": "Debian",
    "python": "PyPI",
    "npm": "npm",
    "go-module": "Go",
    "rust-crate": "crates.io",
    "java-archive": "Maven",
    "gem": "RubyGems",
    "php-composer": "Packagist",
    "apk": "Alpine",
}
_SARIF_LEVEL = {
    "critical": "error",
    "high": "error",
    "medium": "warning",
    "low": "note",
    "unknown": "note",
}


@dataclass(frozen=True)
class Finding:
    """One advisory affecting one installed package."""

    advisory_id: str
    package: str
    ecosystem: str
    installed: str
    fixed: str | None
    severity: str  # critical | high | medium | low | unknown
    source: str  # "debian-security" or "osv"
    aliases: tuple[str, ...] = ()
    summary: str = ""
    severity_source: str = ""
    purl: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["aliases"] = list(self.aliases)
        return out

    def one_line(self) -> str:
        fixed = f"fixed in {self.fixed}" if self.fixed else "no fixed version"
        also = (
            f" ({', '.join(self.aliases[:4])}{', ...' if len(self.aliases) > 4 else ''})"
            if self.aliases
            else ""
        )
        return (
            f"{self.advisory_id}{also} in {self.package} {self.installed} ({self.ecosystem}), "
            f"{fixed}, severity {self.severity}"
        )


@dataclass
class SourceStatus:
    """What one source checked, and as of when."""

    name: str
    used: bool
    detail: str
    checked_packages: int = 0
    date: str = ""


@dataclass
class ScanReport:
    image: str
    digest: str
    distro: str
    packages: int
    package_types: dict[str, int]
    findings: list[Finding]
    sources: list[SourceStatus]
    unchecked: dict[str, int] = field(
        default_factory=dict
    )  # package type -> count no source covered
    notes: list[str] = field(default_factory=list)

    def failing(self, fail_on: str) -> list[Finding]:
        """Findings at or above ``fail_on`` (``unknown`` counts every finding)."""
        check_fail_on(fail_on)
        limit = LEVELS.index(fail_on)
        return [f for f in self.findings if LEVELS.index(f.severity) <= limit]

    def counts(self) -> dict[str, int]:
        return {lvl: sum(1 for f in self.findings if f.severity == lvl) for lvl in LEVELS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "digest": self.digest,
            "distro": self.distro,
            "packages": self.packages,
            "package_types": self.package_types,
            "summary": self.counts(),
            "sources": [asdict(s) for s in self.sources],
            "unchecked": self.unchecked,
            "notes": self.notes,
            "findings": [f.to_dict() for f in self.findings],
        }

    def table(self) -> str:
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(self.package_types.items())) or "none"
        lines = [
            f"image {self.image} ({self.digest[:19]}), {self.distro or 'no known distribution'}: "
            f"{self.packages} packages ({kinds})",
            "sources:",
        ]
        for s in self.sources:
            lines.append(f"  {s.name}: {s.detail}")
        if self.unchecked:
            what = ", ".join(f"{n} {t}" for t, n in sorted(self.unchecked.items()))
            lines.append(f"  not checked by any source: {what}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        counts = self.counts()
        for level in LEVELS:
            group = [f for f in self.findings if f.severity == level]
            if not group:
                continue
            head = f"{level.upper()} ({counts[level]})"
            if level == "unknown":
                head += ": the source gives no severity (Debian's security index has none)"
            lines += ["", head]
            rows = [("ADVISORY", "PACKAGE", "INSTALLED", "FIXED", "SOURCE", "ALSO")]
            for f in group:
                also = ", ".join(f.aliases[:3]) + (
                    f" +{len(f.aliases) - 3}" if len(f.aliases) > 3 else ""
                )
                rows.append((f.advisory_id, f.package, f.installed, f.fixed or "-", f.source, also))
            widths = [max(len(r[i]) for r in rows) for i in range(5)]
            for r in rows:
                lines.append(
                    "  " + "  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5]
                )
        total = len(self.findings)
        summary = ", ".join(f"{n} {lvl}" for lvl, n in counts.items() if n) or "none"
        lines += ["", f"{total} finding(s): {summary}"]
        return "\n".join(lines)

    def sarif(self) -> dict[str, Any]:
        rules: dict[str, SarifRule] = {}
        results = []
        for f in self.findings:
            if f.advisory_id not in rules:
                rules[f.advisory_id] = SarifRule(
                    f.advisory_id,
                    f.advisory_id,
                    f.summary or f"{f.advisory_id} ({', '.join(f.aliases) or f.source})",
                    level=_SARIF_LEVEL[f.severity],
                    properties={
                        "severity": f.severity,
                        "aliases": list(f.aliases),
                        "source": f.source,
                    },
                )
            results.append(
                SarifResult(
                    f.advisory_id,
                    _SARIF_LEVEL[f.severity],
                    f.one_line(),
                    f"image:{self.image}",
                    0,
                    {
                        "package": f.package,
                        "installed": f.installed,
                        "fixed": f.fixed or "",
                        "purl": f.purl,
                        "severity": f.severity,
                    },
                )
            )
        return sarif_log(
            "tierbox image scan",
            "",
            list(rules.values()),
            results,
            run_properties={
                "image": self.image,
                "digest": self.digest,
                "sources": [asdict(s) for s in self.sources],
            },
        )


def check_fail_on(level: str) -> str:
    if level not in FAIL_ON:
        raise UsageError(f"bad --fail-on {level!r}: use one of {', '.join(FAIL_ON)}")
    return level


def scan_inventory(
    inv: Inventory,
    *,
    db: OSVDatabase | None = None,
    debian: DebianSecurity | None = None,
    refresh: bool = False,
    progress: Progress | None = None,
) -> ScanReport:
    """Findings for the packages in ``inv`` from every source that applies."""
    findings: list[Finding] = []
    sources: list[SourceStatus] = []
    notes: list[str] = []
    covered: set[int] = set()  # indexes of packages some source checked
    debs = [(i, p) for i, p in enumerate(inv.packages) if p.type == "deb"]

    # (a) Debian's security suite
    if inv.distro_id == "debian" and inv.distro_codename and debs:
        sec = debian or DebianSecurity()
        arch = inv.arch or "amd64"
        try:
            index = sec.index(inv.distro_codename, arch, refresh=refresh, progress=progress)
        except HostError as exc:
            sources.append(
                SourceStatus(f"debian {inv.distro_codename}-security", False, f"not checked: {exc}")
            )
        else:
            notes += index.notes
            pending = 0
            for i, pkg in debs:
                covered.add(i)
                upd = index.updates.get(pkg.name)
                if upd is None or Version(upd.version) <= Version(pkg.version):
                    continue
                pending += 1
                facts = sec.changelog(
                    index, upd.source, upd.version, pkg.version, [d.name for _, d in debs]
                )
                if facts.note:
                    notes.append(facts.note)
                severity, why = "unknown", "Debian's security index carries no severity"
                if facts.urgency:
                    why += f"; changelog urgency {facts.urgency}"
                if db is not None:
                    graded = [g for c in facts.cves if (g := db.cve_severity(c)) is not None]
                    if graded:
                        severity, src = min(graded, key=lambda g: LEVELS.index(g[0]))
                        why = f"from the OSV record {src}"
                findings.append(
                    Finding(
                        advisory_id=f"{index.suite}:{upd.source}={upd.version}",
                        package=pkg.name,
                        ecosystem=f"Debian:{inv.distro_version}"
                        if inv.distro_version
                        else "Debian",
                        installed=pkg.version,
                        fixed=upd.version,
                        severity=severity,
                        source="debian-security",
                        aliases=facts.cves,
                        summary=f"security update of {upd.source} in {index.suite}",
                        severity_source=why,
                        purl=pkg.purl,
                    )
                )
            sources.append(
                SourceStatus(
                    f"debian {index.suite}",
                    True,
                    f"index dated {index.date or 'unknown'} from {index.uri}: {len(debs)} Debian "
                    f"packages compared, {pending} with a security update pending",
                    len(debs),
                    index.date,
                )
            )
    elif debs:
        sources.append(
            SourceStatus(
                "debian security suite",
                False,
                f"not checked: the image's distribution is {inv.distro_id or 'unknown'}, "
                "not a Debian release",
            )
        )
    else:
        sources.append(
            SourceStatus(
                "debian security suite", False, "not used: no Debian packages in the image"
            )
        )

    # (b) OSV advisories from --db
    if db is not None:
        checked = 0
        for i, pkg in enumerate(inv.packages):
            eco = ECOSYSTEMS.get(pkg.type)
            if eco is None or eco not in db.ecosystems:
                continue
            checked += 1
            covered.add(i)
            name, version = _osv_name_version(pkg, eco)
            matches, range_notes = db.matches(
                eco, name, version, inv.distro_version if eco == "Debian" else ""
            )
            notes += range_notes
            for m in matches:
                findings.append(
                    Finding(
                        advisory_id=m.advisory_id,
                        package=pkg.name,
                        ecosystem=eco,
                        installed=pkg.version,
                        fixed=m.fixed,
                        severity=m.severity,
                        source="osv",
                        aliases=m.aliases,
                        summary=m.summary,
                        severity_source=m.severity_source,
                        purl=pkg.purl,
                    )
                )
        ecos = ", ".join(f"{e} {n}" for e, n in sorted(db.ecosystems.items()))
        sources.append(
            SourceStatus(
                f"OSV {db.path}",
                True,
                f"{db.records:,} advisories ({ecos}), feed dated "
                f"{db.newest_modified or 'unknown'} (newest record): {checked} packages checked",
                checked,
                db.newest_modified,
            )
        )
    else:
        sources.append(SourceStatus("OSV", False, "not used: give an OSV export with --db DIR"))

    unchecked: dict[str, int] = {}
    for i, pkg in enumerate(inv.packages):
        if i not in covered:
            unchecked[pkg.type] = unchecked.get(pkg.type, 0) + 1
    order = {lvl: n for n, lvl in enumerate(LEVELS)}
    findings.sort(key=lambda f: (order[f.severity], f.package, f.advisory_id))
    distro = (
        f"{inv.distro_id} {inv.distro_version} ({inv.distro_codename})".strip()
        if inv.distro_id
        else ""
    )
    return ScanReport(
        image=inv.image,
        digest=inv.digest,
        distro=distro,
        packages=len(inv.packages),
        package_types=inv.counts(),
        findings=findings,
        sources=sources,
        unchecked=unchecked,
        notes=list(dict.fromkeys(notes)),
    )


def _osv_name_version(pkg: Package, ecosystem: str) -> tuple[str, str]:
    """Debian advisories name source packages: match those, at the source version."""
    if ecosystem == "Debian":
        return pkg.source_name or pkg.name, pkg.source_version or pkg.version
    return pkg.name, pkg.version


def scan_image(
    ref: str,
    *,
    db_path: Path | None = None,
    refresh: bool = False,
    store: ImageStore | None = None,
    progress: Progress | None = None,
) -> ScanReport:
    """Scan a store image."""
    db = OSVDatabase.load(db_path) if db_path is not None else None
    inv = image_inventory(ref, store)
    return scan_inventory(inv, db=db, refresh=refresh, progress=progress)
