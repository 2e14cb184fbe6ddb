"""``tierbox lint``: the real hadolint plus tierbox's rules, one report (text, JSON,
SARIF 2.1.0 validated against the OASIS schema)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import cli
from tierbox.build.lint import LintReport, lint, lint_file
from tierbox.build.parse import parse_text
from tierbox.build.rules import RULES, simple_commands
from tierbox.errors import DockerfileError

DATA = Path(__file__).parent / "data" / "build"
GOOD = DATA / "lint" / "good.Dockerfile"


def sarif_validator() -> jsonschema.Draft4Validator:
    schema = json.loads((DATA / "sarif-schema-2.1.0.json").read_text())
    return jsonschema.Draft4Validator(schema)


def findings(tmp_path: Path, text: str, *, hadolint: bool = True) -> list[tuple[str, int]]:
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    return [(f.rule, f.line) for f in lint_file(path, use_hadolint=hadolint)]


def tb(tmp_path: Path, text: str) -> list[tuple[str, int]]:
    return [(r, n) for r, n in findings(tmp_path, text, hadolint=False) if r.startswith("TB")]


def test_the_article_style_dockerfile_is_quiet() -> None:
    report = lint([GOOD])
    assert report.findings == [], report.text()


def test_every_rule_has_an_id_severity_why_and_fix() -> None:
    assert [r.id for r in RULES] == [f"TB00{i}" for i in range(1, 7)]
    for r in RULES:
        assert r.severity in ("error", "warning", "info") and r.why and r.fix and r.name


# ---------------------------------------------------------------- each rule fires


def test_tb001_runs_as_root(tmp_path: Path) -> None:
    assert ("TB001", 1) in tb(tmp_path, 'FROM busybox:1.36\nCMD ["sh"]\n')
    text = "FROM busybox:1.36\nUSER 1000\nRUN id\nUSER root\n"
    assert ("TB001", 4) in tb(tmp_path, text)
    # a USER set in the stage the final one is built from counts
    text = 'FROM busybox:1.36 AS base\nUSER 1000\nFROM base\nCMD ["id"]\n'
    assert [f for f in tb(tmp_path, text) if f[0] == "TB001"] == []
    # hadolint's DL3002 (last USER root) is the same problem: reported once
    assert ("DL3002", 4) not in findings(
        tmp_path, "FROM busybox:1.36\nUSER 1000\nRUN id\nUSER root\n"
    )


def test_tb002_build_tools_in_the_final_stage(tmp_path: Path) -> None:
    install = (
        "RUN apt-get update && apt-get install -y --no-install-recommends gcc libpq-dev "
        "&& rm -rf /var/lib/apt/lists/*\n"
    )
    assert ("TB002", 2) in tb(tmp_path, f"FROM debian:bookworm-slim\n{install}USER 1000\n")
    # the same install in a builder stage that the final stage copies from is the fix
    multi = (
        f"FROM debian:bookworm-slim AS build\n{install}RUN make\n"
        "FROM debian:bookworm-slim\nCOPY --from=build /out /out\nUSER 1000\n"
    )
    assert [f for f in tb(tmp_path, multi) if f[0] == "TB002"] == []
    # installed and purged in one RUN leaves no layer behind
    purged = (
        "FROM debian:bookworm-slim\nRUN apt-get install -y --no-install-recommends gcc "
        "&& make && apt-get purge -y gcc\nUSER 1000\n"
    )
    assert [f for f in tb(tmp_path, purged) if f[0] == "TB002"] == []
    # pip's cache, in place of hadolint's DL3042 on that line
    pip = "FROM python:3.11-slim\nRUN pip install flask==3.0.0\nUSER 1000\n"
    assert ("TB002", 2) in tb(tmp_path, pip)
    assert ("DL3042", 2) not in findings(tmp_path, pip)
    quiet = (
        "FROM python:3.11-slim\nRUN python3 -m pip install --no-cache-dir flask==3.0.0\nUSER 1000\n"
    )
    assert [f for f in tb(tmp_path, quiet) if f[0] == "TB002"] == []


@pytest.mark.parametrize(
    ("install", "manifest"),
    [
        ("pip install --no-cache-dir -r requirements.txt", "requirements.txt"),
        ("npm ci", "package*.json"),
        ("go mod download", "go.mod go.sum"),
    ],
)
def test_tb003_source_copied_before_dependencies(
    tmp_path: Path, install: str, manifest: str
) -> None:
    bad = f"FROM python:3.11-slim\nWORKDIR /app\nCOPY . .\nRUN {install}\nUSER 1000\n"
    assert ("TB003", 3) in tb(tmp_path, bad)
    good = (
        f"FROM python:3.11-slim\nWORKDIR /app\nCOPY {manifest} ./\nRUN {install}\n"
        "COPY . .\nUSER 1000\n"
    )
    assert [f for f in tb(tmp_path, good) if f[0] == "TB003"] == []


def test_tb004_large_base(tmp_path: Path) -> None:
    assert ("TB004", 1) in tb(tmp_path, "FROM python:3.11\nUSER 1000\n")
    assert ("TB004", 2) in tb(tmp_path, "ARG V=20\nFROM node:${V}\nUSER 1000\n")
    # a full image for the builder stage only is what multi-stage builds are for
    multi = "FROM golang:1.22 AS build\nRUN go build\nFROM python:3.11\nUSER 1000\n"
    assert ("TB004", 3) in tb(tmp_path, multi)
    for base in ("python:3.11-slim", "node:20-alpine", "debian:bookworm-slim", "busybox:1.36"):
        assert [f for f in tb(tmp_path, f"FROM {base}\nUSER 1000\n") if f[0] == "TB004"] == []


def test_tb005_secrets_in_env_and_arg(tmp_path: Path) -> None:
    text = (
        "ARG GITHUB_TOKEN\n"
        "FROM busybox:1.36\n"
        "ENV API_KEY=abc123 DB_PASSWORD_FILE=/run/secrets/db\n"
        "ARG DEPLOY_PASSWORD=hunter2\n"
        "ENV HARMLESS=AKIAIOSFODNN7EXAMPLE\n"
        "USER 1000\n"
    )
    found = tb(tmp_path, text)
    assert [n for r, n in found if r == "TB005"] == [1, 3, 4, 5]
    by_line = {f.line: f for f in lint_file(tmp_path / "Dockerfile", use_hadolint=False)}
    assert by_line[1].severity == "warning" and by_line[3].severity == "error"
    assert "DB_PASSWORD_FILE" not in by_line[3].message
    assert ("DL3064", 3) not in findings(tmp_path, text)  # hadolint's version, reported once


def test_tb006_no_healthcheck_on_a_service(tmp_path: Path) -> None:
    served = 'FROM python:3.11-slim\nUSER 1000\nCMD ["gunicorn", "app:app"]\n'
    assert ("TB006", 3) in tb(tmp_path, served)
    exposed = "FROM busybox:1.36\nUSER 1000\nEXPOSE 8080\nCMD httpd -f -p 8080\n"
    assert ("TB006", 4) in tb(tmp_path, exposed)
    none_on_purpose = (
        'FROM python:3.11-slim\nUSER 1000\nHEALTHCHECK NONE\nCMD ["gunicorn", "a:b"]\n'
    )
    assert [f for f in tb(tmp_path, none_on_purpose) if f[0] == "TB006"] == []
    batch = 'FROM python:3.11-slim\nUSER 1000\nCMD ["python3", "job.py"]\n'
    assert [f for f in tb(tmp_path, batch) if f[0] == "TB006"] == []


# ---------------------------------------------------------------- one report


BAD = """\
FROM python:3.11
ENV API_KEY=abc123
WORKDIR /app
COPY . .
RUN apt-get update && apt-get install -y gcc
RUN pip install -r requirements.txt
EXPOSE 8000
CMD ["gunicorn", "app:app"]
"""


def test_hadolint_and_tierbox_findings_merge(tmp_path: Path) -> None:
    found = findings(tmp_path, BAD)
    rules = {r for r, _ in found}
    assert {"TB001", "TB002", "TB003", "TB004", "TB005", "TB006"} <= rules
    assert {"DL3008", "DL3015"} <= rules  # hadolint's own (apt pinning, recommends)
    assert found == sorted(found, key=lambda f: f[1])  # file order


def test_ignore_pragmas_apply_to_both_rule_sets(tmp_path: Path) -> None:
    text = BAD.replace(
        "RUN apt-get update",
        "# hadolint ignore=DL3008,TB002\nRUN apt-get update",
    )
    found = findings(tmp_path, text)
    assert not [f for f in found if f[1] == 6 and f[0] in ("DL3008", "TB002")]
    assert ("DL3015", 6) in found  # not named: still reported
    text = "# hadolint global ignore=TB004,DL3015\n" + BAD
    found = findings(tmp_path, text)
    assert not [f for f in found if f[0] in ("TB004", "DL3015")]


def test_text_json_and_sarif_output(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text(BAD)
    r = cli("lint", "--fail-on", "none", str(path))
    assert r.returncode == 0
    text = r.stdout.decode()
    assert f"{path}:2 TB005 error: ENV API_KEY puts a secret into the image config" in text
    assert "    fix: pass secrets at run time" in text
    r = cli("lint", "--format", "json", "--fail-on", "none", str(path))
    doc = json.loads(r.stdout)
    assert doc["summary"]["error"] >= 1 and doc["tools"]["hadolint"].startswith("2.")
    first = doc["findings"][0]
    assert set(first) >= {"file", "line", "rule", "severity", "message", "source"}
    r = cli("lint", "--format", "sarif", "--fail-on", "none", str(path))
    log = json.loads(r.stdout)
    validator = sarif_validator()
    assert list(validator.iter_errors(log)) == []
    run = log["runs"][0]
    ids = {res["ruleId"] for res in run["results"]}
    assert {"TB005", "DL3008"} <= ids
    rules = run["tool"]["driver"]["rules"]
    for res in run["results"]:
        assert rules[res["ruleIndex"]]["id"] == res["ruleId"]
        assert res["locations"][0]["physicalLocation"]["region"]["startLine"] >= 1
    # the validator is not vacuous: a broken log fails it
    broken = {**log, "runs": [{"results": run["results"]}]}
    assert list(validator.iter_errors(broken))


def test_fail_on_levels(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text(BAD)
    assert cli("lint", str(path)).returncode == 1  # an error-level finding (TB005)
    warn_only = tmp_path / "warn" / "Dockerfile"
    warn_only.parent.mkdir()
    warn_only.write_text("FROM busybox:1.36\nCOPY . /app\n")  # TB001: a warning
    assert cli("lint", str(warn_only)).returncode == 0
    assert cli("lint", "--fail-on", "warning", str(warn_only)).returncode == 1
    assert cli("lint", "--fail-on", "warning", str(GOOD)).returncode == 0
    assert cli("lint", "--fail-on", "info", str(GOOD)).returncode == 0
    r = cli("lint", "--fail-on", "loud", str(GOOD))
    assert r.returncode == 2 and b"--fail-on" in r.stderr


def test_syntax_errors_name_the_line(tmp_path: Path) -> None:
    for text, line, what in [
        ("FROM busybox\nRUN true\nFORM busybox\n", 3, "unknown instruction FORM"),
        ("FROM busybox\nENV\n", 2, "ENV"),
        ("FROM busybox\nCOPY onlyone\n", 2, "COPY needs a source and a destination"),
        ("RUN echo\nFROM busybox\n", 1, "before the first FROM"),
        ("FROM busybox\nRUN <<EOF\necho\n", 2, "unterminated heredoc"),
    ]:
        with pytest.raises(DockerfileError) as info:
            parse_text(text, "Dockerfile")
        assert info.value.line == line and what in str(info.value), (text, str(info.value))
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM busybox\nFORM x\n")
    r = cli("lint", str(bad))
    assert r.returncode == 2 and f"{bad}:2: unknown instruction FORM".encode() in r.stderr


def test_shell_commands_are_split_not_matched() -> None:
    assert simple_commands(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y gcc; make | tee log"
    ) == [
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "gcc"],
        ["make"],
        ["tee", "log"],
    ]
    assert simple_commands("sudo -u app pip install 'x==1' \\\n  y") == [
        ["pip", "install", "x==1", "y"]
    ]
    assert simple_commands('echo "a && b"') == [["echo", "a && b"]]


def test_report_counts(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text(BAD)
    report = lint([tmp_path])  # a directory means its Dockerfile
    assert isinstance(report, LintReport) and report.files == [str(path)]
    counts = report.counts()
    assert sum(counts.values()) == len(report.findings)
    assert report.failing("error") and report.failing("none") == []
