"""What every tierbox CLI module shares: consoles, option types, error exits,
argument parsing and how a workload's result is printed."""

from __future__ import annotations

import json
import sys
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from tierbox.errors import UsageError
from tierbox.spec import ExecResult, TerminationKind

out = Console()
err = Console(stderr=True, soft_wrap=True)  # one error, one line, however long
#: options after the image/name belong to the workload, not to tierbox
PASSTHROUGH = {"allow_interspersed_args": False}

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
EnvOpt = Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE, repeatable.")]


def fail(exc: BaseException) -> NoReturn:
    """Print a one-line error; exit 2 for usage errors, 125 for anything else
    (as docker run does). A command missing in the sandbox is not an error
    here: it is a result with status 127, mirrored like any other."""
    err.print(f"[bold red]tierbox:[/] {exc}", highlight=False, markup=True)
    if isinstance(exc, UsageError):
        raise typer.Exit(2)
    raise typer.Exit(125)


def parse_env(pairs: list[str] | None) -> dict[str, str]:
    env = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"bad --env {pair!r}: use KEY=VALUE")
        env[key] = value
    return env


def workload_argv(argv: list[str] | None) -> list[str]:
    """The workload's argv; click keeps the ``--`` separator when options
    after the image are not interspersed, so drop it here."""
    argv = list(argv or [])
    return argv[1:] if argv[:1] == ["--"] else argv


def emit_result(r: ExecResult, as_json: bool) -> NoReturn:
    """Print the workload's output (or JSON) and exit with its status."""
    if as_json:
        print(json.dumps(r.to_dict()))
    else:
        sys.stdout.buffer.write(r.stdout)
        sys.stdout.buffer.flush()
        sys.stderr.buffer.write(r.stderr)
        sys.stderr.buffer.flush()
        t = r.termination
        if t.kind is not TerminationKind.EXITED:
            err.print(f"tierbox: {t.describe()}", highlight=False, markup=False)
        elif r.stdout_truncated or r.stderr_truncated:
            err.print("tierbox: output truncated at the output limit", highlight=False)
    raise typer.Exit(r.exit_code)
