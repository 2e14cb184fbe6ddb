"""OSV-format advisories from a directory the user points to (``--db``).

An OSV export is a tree of ``*.json`` records, or ``.zip`` files of them
(osv.dev's ``<ecosystem>/all.zip``). Each record's ``affected`` entries name
a package in an ecosystem and the versions affected, as ranges of events or an
explicit list; ranges are evaluated in the ecosystem's own version order
(:mod:`tierbox.build.versions`). A record's severity comes from its CVSS
vector (scored by the ``cvss`` library), else from the level the database
states, else it is ``unknown``. The feed's date is the newest ``modified``
among its records.
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cvss  # type: ignore[import-untyped]
from packaging.utils import canonicalize_name

from tierbox.build.versions import ecosystem_order, fixed_in, in_range
from tierbox.errors import AdvisoryDBError

LEVELS = ("critical", "high", "medium", "low", "unknown")
MAX_RECORD_BYTES = 16 << 20
MAX_RECORDS = 2_000_000
_WORDS = {
    "critical": "critical",
    "high": "high",
    "important": "high",
    "moderate": "medium",
    "medium": "medium",
    "low": "low",
    "negligible": "low",
    "unimportant": "low",
}


def level_of_score(score: float) -> str:
    """CVSS base score to a level (CVSS v3 qualitative scale; 0.0 is none, kept as low)."""
    if score >= 9.0:
        return "critical"
    if score >= 7.0:
        return "high"
    if score >= 4.0:
        return "medium"
    return "low"


def severity_of(record: dict[str, Any], affected: dict[str, Any] | None = None) -> tuple[str, str]:
    """(level, what it came from) for an OSV record."""
    best: tuple[float, str] | None = None
    for sev in record.get("severity") or []:
        kind, vector = str(sev.get("type", "")), str(sev.get("score", ""))
        try:
            if kind == "CVSS_V4":
                score = float(cvss.CVSS4(vector).base_score)
            elif kind == "CVSS_V3":
                score = float(cvss.CVSS3(vector).scores()[0])
            elif kind == "CVSS_V2":
                score = float(cvss.CVSS2(vector).scores()[0])
            else:
                continue
        except (cvss.CVSSError, ValueError, TypeError, IndexError):
            continue
        if best is None or score > best[0]:
            best = (score, f"{kind} {score:.1f}")
    if best is not None:
        return level_of_score(best[0]), best[1]
    for where in (
        (affected or {}).get("ecosystem_specific") or {},
        (affected or {}).get("database_specific") or {},
        record.get("database_specific") or {},
    ):
        word = str(where.get("severity") or where.get("urgency") or "").lower()
        if word in _WORDS:
            return _WORDS[word], f"database severity {word}"
    return "unknown", "no severity in the record"


def normalise_name(ecosystem: str, name: str) -> str:
    base = ecosystem.split(":", 1)[0]
    if base == "PyPI":
        return str(canonicalize_name(name))
    if base in ("Debian", "Ubuntu", "Alpine"):
        return name.lower()
    return name


@dataclass(frozen=True)
class Match:
    """An advisory that affects one installed version."""

    advisory_id: str
    aliases: tuple[str, ...]
    summary: str
    fixed: str | None
    severity: str
    severity_source: str
    modified: str


@dataclass
class OSVDatabase:
    """Advisories indexed by (ecosystem, package name)."""

    path: Path
    records: int = 0
    skipped: int = 0
    newest_modified: str = ""
    ecosystems: dict[str, int] = field(default_factory=dict)
    _index: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = field(
        default_factory=dict
    )

    @classmethod
    def load(cls, path: Path) -> OSVDatabase:
        """Read every record under ``path`` (a directory, a .zip or one .json file)."""
        if not path.exists():
            raise AdvisoryDBError(f"--db {path}: no such file or directory")
        db = cls(path)
        for _where, data in _records(path):
            try:
                record = json.loads(data)
                if not isinstance(record, dict) or "id" not in record:
                    raise ValueError("not an OSV record (no id)")
                db._add(record)
            except (ValueError, TypeError, AttributeError):
                db.skipped += 1
                continue
            if db.records > MAX_RECORDS:
                raise AdvisoryDBError(f"--db {path}: more than {MAX_RECORDS:,} records")
        if db.records == 0:
            raise AdvisoryDBError(
                f"--db {path}: no OSV records found ({db.skipped} files were not OSV JSON); "
                "point it at an OSV export (a directory of <ID>.json files or all.zip)"
            )
        return db

    def _add(self, record: dict[str, Any]) -> None:
        self.records += 1
        modified = str(record.get("modified") or "")
        self.newest_modified = max(self.newest_modified, modified)
        for aff in record.get("affected") or []:
            pkg = aff.get("package") or {}
            eco, name = str(pkg.get("ecosystem") or ""), str(pkg.get("name") or "")
            if not eco or not name:
                continue
            base = eco.split(":", 1)[0]
            self.ecosystems[base] = self.ecosystems.get(base, 0) + 1
            self._index.setdefault((base, normalise_name(base, name)), []).append((record, aff))

    def matches(
        self, ecosystem: str, name: str, version: str, release: str = ""
    ) -> tuple[list[Match], list[str]]:
        """Advisories affecting ``name`` at ``version`` in ``ecosystem`` (``release``
        narrows ``Debian:12``-style ecosystems), and notes on ranges that could not be
        evaluated."""
        out: list[Match] = []
        notes: list[str] = []
        for record, aff in self._index.get((ecosystem, normalise_name(ecosystem, name)), []):
            eco = str((aff.get("package") or {}).get("ecosystem"))
            if ":" in eco and release and eco.split(":", 1)[1] != release:
                continue
            hit, fixed, note = _affects(aff, eco, version)
            if note:
                notes.append(f"{record['id']} ({name}): {note}")
            if not hit:
                continue
            level, why = severity_of(record, aff)
            out.append(
                Match(
                    advisory_id=str(record["id"]),
                    aliases=tuple(str(a) for a in record.get("aliases") or []),
                    summary=str(record.get("summary") or record.get("details") or "")[:200],
                    fixed=fixed,
                    severity=level,
                    severity_source=why,
                    modified=str(record.get("modified") or ""),
                )
            )
        return out, notes

    def cve_severity(self, cve: str) -> tuple[str, str] | None:
        """The severity OSV records give a CVE id (their own id or an alias), if any."""
        best: tuple[str, str] | None = None
        for entries in self._index.values():
            for record, aff in entries:
                if record.get("id") != cve and cve not in (record.get("aliases") or []):
                    continue
                level, why = severity_of(record, aff)
                if level != "unknown" and (
                    best is None or LEVELS.index(level) < LEVELS.index(best[0])
                ):
                    best = (level, f"{record['id']}: {why}")
        return best


def _affects(aff: dict[str, Any], ecosystem: str, version: str) -> tuple[bool, str | None, str]:
    """(affected, fixed version, note) for one ``affected`` entry."""
    if version in [str(v) for v in aff.get("versions") or []]:
        fixed = None
        for rng in aff.get("ranges") or []:
            parse = ecosystem_order(ecosystem, str(rng.get("type", "")))
            if parse is not None:
                with contextlib.suppress(ValueError):  # an unparsable bound: no fixed version
                    fixed = fixed_in(version, rng.get("events") or [], parse)
        return True, fixed, ""
    for rng in aff.get("ranges") or []:
        kind = str(rng.get("type", ""))
        parse = ecosystem_order(ecosystem, kind)
        if parse is None:
            if kind != "GIT":
                return False, None, f"no version order known for {ecosystem} {kind} ranges"
            continue
        events = rng.get("events") or []
        try:
            if in_range(version, events, parse):
                return True, fixed_in(version, events, parse), ""
        except ValueError as exc:
            return False, None, f"range not evaluated: {exc}"
    return False, None, ""


def _records(path: Path) -> Iterator[tuple[str, bytes]]:
    """(where, bytes) of every ``*.json`` under ``path``, inside .zip files too."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.suffix == ".json":
            if f.stat().st_size <= MAX_RECORD_BYTES:
                yield str(f), f.read_bytes()
        elif f.suffix == ".zip":
            try:
                with zipfile.ZipFile(f) as zf:
                    for info in zf.infolist():
                        if info.filename.endswith(".json") and info.file_size <= MAX_RECORD_BYTES:
                            yield f"{f}:{info.filename}", zf.read(info)
            except zipfile.BadZipFile as exc:
                raise AdvisoryDBError(f"--db: {f} is not a zip file: {exc}") from exc
