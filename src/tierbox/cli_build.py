"""CLI commands for images from Dockerfiles: ``tierbox image build|sbom|scan`` and
``tierbox lint``. :func:`register` adds them to the main app."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from tierbox.cli_common import JsonOpt, err, fail
from tierbox.errors import BuildError, GateError, TierboxError, UsageError

BUILD_FAIL_ON = "critical, high, medium, low or unknown (every finding)"


def _say(line: str) -> None:
    err.print(line, highlight=False, markup=False, soft_wrap=True)


def _exit_build_failure(exc: BuildError) -> NoReturn:
    """A failed step or gate, then exit 1 (docker build's status). The failing step's
    output has just streamed past, so only the summary is repeated."""
    err.print("[bold red]tierbox:[/] ", end="", markup=True)
    err.print(exc.summary, highlight=False, markup=False)
    raise typer.Exit(1)


def _parse_build_args(pairs: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not key:
            raise UsageError(f"bad --build-arg {pair!r}: use KEY=VALUE")
        out[key] = value if sep else ""
    return out


def image_build(
    context: Annotated[Path, typer.Argument(help="The build context (a directory).")] = Path("."),
    tag: Annotated[
        str, typer.Option("--tag", "-t", help="NAME[:TAG] to store the image under.")
    ] = "",
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="The Dockerfile (default: CONTEXT/Dockerfile)."),
    ] = None,
    build_arg: Annotated[
        list[str] | None, typer.Option("--build-arg", help="KEY=VALUE for an ARG, repeatable.")
    ] = None,
    target: Annotated[str | None, typer.Option("--target", help="Build up to this stage.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Run every step again.")] = False,
    network: Annotated[
        bool, typer.Option("--network", help="Give RUN steps the host's network (default: none).")
    ] = False,
    lint: Annotated[
        bool, typer.Option("--lint", help="Lint the Dockerfile first (a gate).")
    ] = False,
    scan: Annotated[
        bool, typer.Option("--scan", help="Scan the image before it is stored (a gate).")
    ] = False,
    fail_on: Annotated[
        str, typer.Option("--fail-on", help=f"Gate level: {BUILD_FAIL_ON}.")
    ] = "high",
    db: Annotated[
        Path | None, typer.Option("--db", help="OSV advisories for the scan gate (a directory).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build an image from a Dockerfile with buildah, offline, into tierbox's store."""
    from tierbox.build.builder import BuildOptions, build_image
    from tierbox.build.gates import GateResults, lint_gate, scan_gate

    results = GateResults()
    try:
        if not tag:
            raise UsageError("give the image a name with -t NAME[:TAG]")
        before = lint_gate(fail_on, results, _say) if lint else None
        gate = scan_gate(fail_on, tag, results, _say, db_path=db) if scan else None
        if db is not None and not scan:
            raise UsageError("--db is for the scan gate: add --scan")
        options = BuildOptions(
            context=context,
            tag=tag,
            dockerfile=file,
            build_args=_parse_build_args(build_arg),
            target=target,
            no_cache=no_cache,
            network=network,
        )
        result = build_image(options, progress=_say, before_build=before, archive_gate=gate)
    except KeyboardInterrupt:
        _say("tierbox: build interrupted: nothing was stored and no buildah container is left")
        raise typer.Exit(130) from None
    except BuildError as exc:
        if isinstance(exc, GateError):
            _print_gate_reports(results)
        _exit_build_failure(exc)
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(result.record.ref)


def _print_gate_reports(results: object) -> None:
    lint_report = getattr(results, "lint", None)
    scan_report = getattr(results, "scan", None)
    if lint_report is not None and lint_report.findings:
        _say(lint_report.text())
    if scan_report is not None and scan_report.findings:
        _say(scan_report.table())


def image_sbom(
    image: Annotated[str, typer.Argument(help="An image in the store.")],
    fmt: Annotated[
        str, typer.Option("--format", help="cyclonedx-json (CycloneDX 1.6) or spdx-json.")
    ] = "cyclonedx-json",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write it here instead of stdout.")
    ] = None,
) -> None:
    """List every package in an image (syft): Debian, Python, npm and more, with purls."""
    from tierbox.build.sbom import image_sbom as make_sbom

    try:
        data, inv = make_sbom(image, fmt)
    except TierboxError as exc:
        fail(exc)
    _say(inv.plainly())
    if output is not None:
        output.write_bytes(data)
        _say(f"wrote {output}")
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


def image_scan(
    image: Annotated[str, typer.Argument(help="An image in the store.")],
    db: Annotated[
        Path | None,
        typer.Option(
            "--db", help="OSV advisories: a directory of OSV JSON records or all.zip files."
        ),
    ] = None,
    fail_on: Annotated[
        str | None,
        typer.Option("--fail-on", help=f"Exit 1 when a finding is at or above: {BUILD_FAIL_ON}."),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, json or sarif.")] = "table",
    refresh: Annotated[
        bool, typer.Option("--refresh", help="Fetch the Debian security index even if cached.")
    ] = False,
) -> None:
    """Known vulnerabilities of an image's packages: Debian's security suite and OSV advisories."""
    from tierbox.build.scan import FORMATS, check_fail_on, scan_image

    try:
        if fmt not in FORMATS:
            raise UsageError(f"bad --format {fmt!r}: use {', '.join(FORMATS)}")
        if fail_on is not None:
            check_fail_on(fail_on)
        report = scan_image(image, db_path=db, refresh=refresh, progress=_say)
    except TierboxError as exc:
        fail(exc)
    if fmt == "json":
        print(json.dumps(report.to_dict(), indent=1))
    elif fmt == "sarif":
        print(json.dumps(report.sarif(), indent=1))
    else:
        print(report.table())
    if fail_on is not None and report.failing(fail_on):
        raise typer.Exit(1)


def lint_command(
    dockerfiles: Annotated[
        list[Path],
        typer.Argument(metavar="DOCKERFILE...", help="Dockerfiles (or directories holding one)."),
    ],
    fmt: Annotated[
        str, typer.Option("--format", help="text, json or sarif (SARIF 2.1.0).")
    ] = "text",
    fail_on: Annotated[
        str,
        typer.Option(
            "--fail-on",
            help="Exit 1 at this severity or above: error, warning, info, style or none.",
        ),
    ] = "error",
) -> None:
    """Lint Dockerfiles: hadolint and tierbox's production-image rules, one report."""
    from tierbox.build.lint import check_fail_on, lint

    try:
        if fmt not in ("text", "json", "sarif"):
            raise UsageError(f"bad --format {fmt!r}: use text, json or sarif")
        check_fail_on(fail_on)
        report = lint(dockerfiles)
    except TierboxError as exc:
        fail(exc)
    if fmt == "json":
        print(json.dumps(report.to_dict(), indent=1))
    elif fmt == "sarif":
        print(json.dumps(report.sarif(), indent=1))
    else:
        print(report.text())
    if report.failing(fail_on):
        raise typer.Exit(1)


def register(app: typer.Typer, image_app: typer.Typer) -> None:
    """Add ``image build``, ``image sbom``, ``image scan`` and ``lint``."""
    image_app.command("build")(image_build)
    image_app.command("sbom")(image_sbom)
    image_app.command("scan")(image_scan)
    app.command("lint")(lint_command)
