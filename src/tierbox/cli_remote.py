"""``tierbox --remote URL ...`` (or ``$TIERBOX_URL``): the sandbox, image, run
and tiers commands sent to a daemon (``tierbox serve``) through the remote
SDK instead of running in this process. The key comes from
``$TIERBOX_API_KEY`` (never from the command line, which others can read).

Other commands (serve, keys, gc, bench, build...) are local: with
``$TIERBOX_URL`` set they run here as usual; with ``--remote`` they are an
error, so nobody believes they ran on the daemon.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from tierbox.cli_common import (
    PASSTHROUGH,
    AllowOpt,
    DnsOpt,
    EnvOpt,
    JsonOpt,
    NetOpt,
    PublishOpt,
    emit_result,
    fail,
    network_options,
    out,
    parse_env,
    workload_argv,
    write_err,
    write_out,
)
from tierbox.errors import TierboxError, UsageError
from tierbox.spec import parse_duration_s, parse_memory_mib

#: the commands a daemon can run
REMOTE_COMMANDS = ("run", "sandbox", "image", "tiers")

app = typer.Typer(
    help="tierbox commands sent to a daemon (--remote URL or $TIERBOX_URL).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
sandbox_app = typer.Typer(
    help="Sandboxes on the daemon: create, exec, cp, ls, stats, rm.", no_args_is_help=True
)
image_app = typer.Typer(help="The daemon's images: ls, inspect.", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(image_app, name="image")
_url: str | None = None

TierOpt = Annotated[str, typer.Option("--tier", "-t", help="The tier to run on.")]
MemoryOpt = Annotated[str, typer.Option("--memory", "-m", help="Memory limit, e.g. 256m or 1g.")]
CpusOpt = Annotated[float | None, typer.Option("--cpus", help="CPU limit in cores, e.g. 0.5.")]
PidsOpt = Annotated[int, typer.Option("--pids", help="Maximum number of processes.")]
TimeoutOpt = Annotated[str, typer.Option("--timeout", help="Wall-clock limit, e.g. 10s.")]
InteractiveOpt = Annotated[
    bool, typer.Option("--interactive", "-i", help="Pass this process's stdin to the workload.")
]


def remote_main(argv: list[str]) -> bool:
    """Run ``argv`` against a daemon when ``--remote URL`` leads it or
    ``$TIERBOX_URL`` is set and the command is one a daemon runs; False
    when the command is for the local CLI."""
    global _url
    explicit = False
    rest = list(argv)
    if rest[:1] == ["--remote"] and len(rest) >= 2:
        _url, rest, explicit = rest[1], rest[2:], True
    elif rest and rest[0].startswith("--remote="):
        _url, rest, explicit = rest[0].split("=", 1)[1], rest[1:], True
    else:
        _url = os.environ.get("TIERBOX_URL") or None
    if _url is None:
        return False
    command = next((a for a in rest if not a.startswith("-")), None)
    if command not in REMOTE_COMMANDS:
        if not explicit:
            return False
        if command is None:
            rest = ["--help"]
        else:
            try:
                fail(
                    UsageError(
                        f"`tierbox {command}` does not run on a daemon: with --remote use "
                        f"{', '.join(REMOTE_COMMANDS)}"
                    )
                )
            except typer.Exit as exc:
                raise SystemExit(exc.exit_code) from None
    app(args=rest, prog_name="tierbox --remote URL")
    return True


def _client() -> Any:
    from tierbox.client import Client

    return Client(_url)


def _options(
    memory: str,
    cpus: float | None,
    pids: int,
    timeout: str,
    env: list[str] | None,
    network: tuple[str, list[str] | None, bool, list[str] | None],
) -> dict[str, Any]:
    return {
        "memory_mib": parse_memory_mib(memory),
        "cpus": cpus,
        "pids": pids,
        "timeout_s": parse_duration_s(timeout),
        "env": parse_env(env),
        **network_options(*network),
    }


@app.command(context_settings=PASSTHROUGH)
def run(
    image: Annotated[str, typer.Argument(help="Image to run.")],
    command: Annotated[list[str] | None, typer.Argument(help="Command, after --.")] = None,
    tier: TierOpt = "container",
    memory: MemoryOpt = "256m",
    cpus: CpusOpt = None,
    pids: PidsOpt = 128,
    timeout: TimeoutOpt = "60s",
    env: EnvOpt = None,
    network: NetOpt = "none",
    allow: AllowOpt = None,
    dns: DnsOpt = False,
    publish: PublishOpt = None,
    interactive: InteractiveOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run COMMAND once in a fresh sandbox on the daemon; the exit status mirrors the workload's."""
    try:
        opts = _options(memory, cpus, pids, timeout, env, (network, allow, dns, publish))
        stdin = sys.stdin.buffer.read() if interactive else None
        with _client() as client:
            r = client.run(
                image,
                workload_argv(command),
                tier=tier,
                stdin=stdin,
                on_stdout=None if as_json else write_out,
                on_stderr=None if as_json else write_err,
                **opts,
            )
    except TierboxError as exc:
        fail(exc)
    emit_result(r, as_json, streamed=not as_json)


@app.command()
def tiers(as_json: JsonOpt = False) -> None:
    """What runs on the daemon's host, and why not where it does not."""
    try:
        with _client() as client:
            rows = client.tiers()
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("tier", "available", "engine", "why")
    for r in rows:
        table.add_row(
            r["name"],
            "yes" if r["available"] else Text("no", style="red"),
            r["version"] or r["engine"],
            r["reason"],
        )
    out.print(table)


@sandbox_app.command("create")
def sandbox_create(
    image: Annotated[str, typer.Argument(help="Image to start from.")],
    tier: TierOpt = "container",
    memory: MemoryOpt = "256m",
    cpus: CpusOpt = None,
    pids: PidsOpt = 128,
    timeout: TimeoutOpt = "60s",
    env: EnvOpt = None,
    network: NetOpt = "none",
    allow: AllowOpt = None,
    dns: DnsOpt = False,
    publish: PublishOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="A name for it.")] = None,
    ttl: Annotated[str | None, typer.Option("--ttl", help="Remove it after this long.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a sandbox on the daemon that lives until `sandbox rm` (or its --ttl); prints its id."""
    try:
        opts = _options(memory, cpus, pids, timeout, env, (network, allow, dns, publish))
        with _client() as client:
            sb = client.sandboxes.create(
                image,
                tier=tier,
                name=name,
                ttl_s=parse_duration_s(ttl) if ttl else None,
                keep=True,
                **opts,
            )
    except TierboxError as exc:
        fail(exc)
    print(json.dumps({"id": sb.id, "tier": sb.tier}) if as_json else sb.id)


@sandbox_app.command("exec", context_settings=PASSTHROUGH)
def sandbox_exec(
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    command: Annotated[list[str], typer.Argument(help="Command, after --.")],
    timeout: Annotated[
        str | None, typer.Option("--timeout", help="Limit for this command.")
    ] = None,
    env: EnvOpt = None,
    interactive: InteractiveOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a command in a sandbox on the daemon, its output shown as it comes."""
    try:
        stdin = sys.stdin.buffer.read() if interactive else None
        with _client() as client:
            sb = client.sandboxes.get(sandbox_id)
            r = sb.run(
                workload_argv(command),
                stdin=stdin,
                env=parse_env(env) or None,
                timeout_s=parse_duration_s(timeout) if timeout else None,
                on_stdout=None if as_json else write_out,
                on_stderr=None if as_json else write_err,
            )
    except TierboxError as exc:
        fail(exc)
    emit_result(r, as_json, streamed=not as_json)


@sandbox_app.command("ls")
def sandbox_ls(as_json: JsonOpt = False) -> None:
    """This tenant's live sandboxes on the daemon."""
    try:
        with _client() as client:
            rows = client.sandboxes.list()
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
        return
    table = Table("id", "name", "tier", "image", "memory", "owner")
    for r in rows:
        mem = f"{r.memory_mib} MiB" if r.memory_mib is not None else "-"
        table.add_row(r.id, r.name or "", r.tier, r.image or "-", mem, r.tenant)
    out.print(table)


@sandbox_app.command("stats")
def sandbox_stats(
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonOpt = False
) -> None:
    """Memory, peak memory, CPU time and processes of a sandbox on the daemon."""
    try:
        with _client() as client:
            st = client.sandboxes.get(sandbox_id).stats()
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(st.to_dict()))
        return
    for k, v in st.to_dict().items():
        out.print(f"{k:18} {v}", highlight=False)


@sandbox_app.command("rm")
def sandbox_rm(ids: Annotated[list[str], typer.Argument(metavar="ID...")]) -> None:
    """Stop and remove sandboxes on the daemon."""
    try:
        with _client() as client:
            for sid in ids:
                client.sandboxes.get(sid).close()
                print(sid)
    except TierboxError as exc:
        fail(exc)


@sandbox_app.command("cp")
def sandbox_cp(
    src: Annotated[str, typer.Argument(help="ID:PATH or a host path.")],
    dst: Annotated[str, typer.Argument(help="ID:PATH or a host path.")],
) -> None:
    """Copy a file or directory into or out of a sandbox on the daemon."""
    try:
        with _client() as client:
            if ":" in src and ":" not in dst:
                sid, _, path = src.partition(":")
                sb = client.sandboxes.get(sid)
                if dst == "-":
                    sys.stdout.buffer.write(sb.files.read(path))
                    sys.stdout.buffer.flush()
                else:
                    sb.files.download(path, Path(dst))
            elif ":" in dst and ":" not in src:
                sid, _, path = dst.partition(":")
                sb = client.sandboxes.get(sid)
                if src == "-":
                    sb.files.write(path, sys.stdin.buffer.read())
                else:
                    sb.files.upload(Path(src), path)
            else:
                raise UsageError("give exactly one side as ID:PATH")
    except TierboxError as exc:
        fail(exc)


@image_app.command("ls")
def image_ls(as_json: JsonOpt = False) -> None:
    """Images in the daemon's store."""
    try:
        with _client() as client:
            rows = client.images()
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("image", "digest")
    for r in rows:
        table.add_row(str(r.get("ref")), str(r.get("manifest_digest", ""))[:19])
    out.print(table)


@image_app.command("inspect")
def image_inspect(ref: str) -> None:
    """An image of the daemon's store, as JSON."""
    try:
        with _client() as client:
            print(json.dumps(client.image(ref), indent=1))
    except TierboxError as exc:
        fail(exc)
