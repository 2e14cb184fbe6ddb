"""``tierbox serve``, ``tierbox keys`` and ``tierbox tenants``: the HTTP daemon
and the tenants and API keys it knows (kept in its state directory)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tierbox.cli_common import JsonOpt, fail, out
from tierbox.errors import TierboxError
from tierbox.spec import parse_duration_s, parse_memory_mib

StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        metavar="DIR",
        help="The daemon's state (database, socket); default $TIERBOX_SERVER_DIR "
        "or $TIERBOX_HOME/server.",
    ),
]

keys_app = typer.Typer(
    help="API keys of the daemon's tenants: create, ls, revoke.", no_args_is_help=True
)
tenants_app = typer.Typer(help="Tenants and their quotas: set, ls.", no_args_is_help=True)


def _state_dir(given: Path | None) -> Path:
    from tierbox.server.db import default_dir

    return given or default_dir()


def _db(given: Path | None):  # type: ignore[no-untyped-def]
    from tierbox.server.db import Database, db_path

    return Database(db_path(_state_dir(given)))


def serve(
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen",
            metavar="HOST:PORT",
            help="Also listen on TCP (needs at least one API key), e.g. 127.0.0.1:7700.",
        ),
    ] = None,
    socket_path: Annotated[
        Path | None,
        typer.Option(
            "--socket", metavar="PATH", help="Unix socket (default STATE_DIR/tierbox.sock)."
        ),
    ] = None,
    state_dir: StateDirOpt = None,
    grace: Annotated[
        str,
        typer.Option("--grace", help="On SIGTERM, how long running commands may go on, e.g. 30s."),
    ] = "30s",
    bench_dir: Annotated[
        Path | None,
        typer.Option(
            "--bench-dir",
            metavar="DIR",
            help="Where `tierbox bench --out` reports are, for the dashboard "
            "(default $TIERBOX_HOME/bench).",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning.")] = "info",
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request.")] = False,
) -> None:
    """Serve sandboxes over HTTP: the REST API (/v1), metrics and the dashboard (/)."""
    from tierbox import paths
    from tierbox.server.daemon import ServeOptions
    from tierbox.server.daemon import serve as run_daemon

    try:
        opts = ServeOptions(
            state_dir=_state_dir(state_dir),
            socket_path=socket_path,
            listen=listen,
            grace_s=parse_duration_s(grace),
            bench_dir=bench_dir or paths.home() / "bench",
            log_level=log_level,
            access_log=access_log,
        )
        status = run_daemon(opts)
    except TierboxError as exc:
        fail(exc)
    raise typer.Exit(status)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[
        str, typer.Option("--tenant", help="The tenant the key acts for (made if new).")
    ],
    state_dir: StateDirOpt = None,
) -> None:
    """Make an API key and print it, alone on one line (it is shown only this once)."""
    try:
        _, key = _db(state_dir).create_key(tenant)
    except TierboxError as exc:
        fail(exc)
    print(key, flush=True)


@keys_app.command("ls")
def keys_ls(state_dir: StateDirOpt = None, as_json: JsonOpt = False) -> None:
    """List keys by id (never the keys themselves)."""
    rows = _db(state_dir).keys()
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("key id", "tenant", "created", "revoked")
    for r in rows:
        table.add_row(
            r["key_id"],
            r["tenant"],
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_unix"])),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r["revoked_unix"]))
            if r["revoked_unix"]
            else "",
        )
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="As `tierbox keys ls` shows it.")],
    state_dir: StateDirOpt = None,
) -> None:
    """Revoke a key: requests with it get 401 from now on."""
    from tierbox.errors import UsageError

    if not _db(state_dir).revoke_key(key_id):
        fail(UsageError(f"no active key {key_id!r}: `tierbox keys ls` lists them"))
    print(key_id)


@tenants_app.command("set")
def tenants_set(
    name: Annotated[str, typer.Argument(metavar="TENANT")],
    max_sandboxes: Annotated[
        int | None, typer.Option("--max-sandboxes", min=0, help="Sandboxes at once.")
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option("--max-memory", help="Total memory limit of its sandboxes, e.g. 4g."),
    ] = None,
    tiers: Annotated[
        str | None, typer.Option("--tiers", help="Comma-separated tiers it may use (default: all).")
    ] = None,
    state_dir: StateDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Set a tenant's quotas (made if new); an option not given means no limit."""
    try:
        tenant = _db(state_dir).set_quotas(
            name,
            max_sandboxes=max_sandboxes,
            max_memory_mib=parse_memory_mib(max_memory) if max_memory else None,
            allowed_tiers=[t.strip() for t in tiers.split(",") if t.strip()] if tiers else None,
        )
    except TierboxError as exc:
        fail(exc)
    print(json.dumps(tenant.to_dict()) if as_json else tenant.name)


@tenants_app.command("ls")
def tenants_ls(state_dir: StateDirOpt = None, as_json: JsonOpt = False) -> None:
    """Tenants and their quotas."""
    rows = [t.to_dict() for t in _db(state_dir).tenants()]
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("tenant", "sandboxes", "memory", "tiers")
    for r in rows:
        table.add_row(
            r["name"],
            str(r["max_sandboxes"]) if r["max_sandboxes"] is not None else "any",
            f"{r['max_memory_mib']} MiB" if r["max_memory_mib"] is not None else "any",
            ",".join(r["allowed_tiers"]) if r["allowed_tiers"] is not None else "all",
        )
    out.print(table)


def register(app: typer.Typer) -> None:
    """Add serve, keys and tenants to the ``tierbox`` app."""
    app.command(help="Serve sandboxes over HTTP: REST API, metrics and dashboard.")(serve)
    app.add_typer(keys_app, name="keys")
    app.add_typer(tenants_app, name="tenants")
