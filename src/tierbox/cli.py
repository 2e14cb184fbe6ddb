"""The ``tierbox`` command line."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.table import Table

from tierbox import gc as gc_mod
from tierbox.cli_bench import bench
from tierbox.cli_build import register as register_build_commands
from tierbox.cli_common import (
    PASSTHROUGH,
    EnvOpt,
    JsonOpt,
    emit_result,
    err,
    fail,
    out,
    parse_env,
    workload_argv,
)
from tierbox.cli_pool import autoscale_app, fn_app, pool_app
from tierbox.cli_vm import vm_app
from tierbox.errors import TierboxError, UsageError
from tierbox.sandbox import DEFAULT_TIER, Sandbox, SandboxRecord
from tierbox.sandbox import run as run_once
from tierbox.spec import parse_duration_s, parse_memory_mib
from tierbox.tiers import get_tier, tier_names

app = typer.Typer(
    help="Run one workload on any rung of the isolation ladder: process, container, "
    "gvisor, microvm, vm, wasm.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
sandbox_app = typer.Typer(
    help="Long-lived sandboxes: create, exec, cp, ls, stats, rm.", no_args_is_help=True
)
image_app = typer.Typer(
    help="The image store: ls, inspect, rm, import, bootstrap.", no_args_is_help=True
)
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(image_app, name="image")
app.add_typer(vm_app, name="vm")
app.add_typer(pool_app, name="pool")
app.add_typer(fn_app, name="fn")
app.add_typer(autoscale_app, name="autoscale")
register_build_commands(app, image_app)
app.command(
    help="Measure every available tier side by side: start, exec, memory, density, isolation."
)(bench)


TierOpt = Annotated[str, typer.Option("--tier", "-t", help=f"One of: {', '.join(tier_names())}.")]
MemoryOpt = Annotated[str, typer.Option("--memory", "-m", help="Memory limit, e.g. 256m or 1g.")]
CpusOpt = Annotated[float | None, typer.Option("--cpus", help="CPU limit in cores, e.g. 0.5.")]
PidsOpt = Annotated[int, typer.Option("--pids", help="Maximum number of processes.")]
TimeoutOpt = Annotated[
    str, typer.Option("--timeout", help="Wall-clock limit, e.g. 10s, 500ms, 2m.")
]
NetOpt = Annotated[str, typer.Option("--network", help="none (loopback only) or host.")]
InteractiveOpt = Annotated[
    bool, typer.Option("--interactive", "-i", help="Pass this process's stdin to the workload.")
]


def _spec_options(
    memory: str, cpus: float | None, pids: int, timeout: str, env: list[str] | None, network: str
) -> dict[str, Any]:
    if network not in ("none", "host"):
        raise UsageError(f"bad --network {network!r}: use none or host")
    return {
        "memory_mib": parse_memory_mib(memory),
        "cpus": cpus,
        "pids": pids,
        "timeout_s": parse_duration_s(timeout),
        "env": parse_env(env),
        "network": network,
    }


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@app.command(context_settings=PASSTHROUGH)
def run(
    image: Annotated[
        str, typer.Argument(help="Image (busybox, debian:bookworm, python:3.11) or a .wasm file.")
    ],
    command: Annotated[
        list[str] | None, typer.Argument(help="Command and arguments, after --.")
    ] = None,
    tier: TierOpt = DEFAULT_TIER,
    memory: MemoryOpt = "256m",
    cpus: CpusOpt = None,
    pids: PidsOpt = 128,
    timeout: TimeoutOpt = "60s",
    env: EnvOpt = None,
    network: NetOpt = "none",
    interactive: InteractiveOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run COMMAND once in a fresh sandbox; the exit status mirrors the workload's."""
    try:
        opts = _spec_options(memory, cpus, pids, timeout, env, network)
        stdin = sys.stdin.buffer.read() if interactive else None
        r = run_once(image, workload_argv(command), tier=tier, stdin=stdin, **opts)
    except TierboxError as exc:
        fail(exc)
    emit_result(r, as_json)


@app.command()
def tiers(as_json: JsonOpt = False) -> None:
    """What runs on this host, and why not where it does not."""
    rows = []
    for name in tier_names():
        tier = get_tier(name)
        a = tier.available()
        rows.append({"tier": name, **a.to_dict(), "isolation": tier.isolation})
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("tier", "available", "engine", "why", "isolation")
    for r in rows:
        table.add_row(
            r["tier"],
            "yes" if r["available"] else "[red]no[/]",
            r["version"] or r["engine"],
            r["reason"],
            r["isolation"],
        )
    out.print(table)


@app.command()
def gc(
    everything: Annotated[
        bool, typer.Option("--all", help="Also remove live and persistent sandboxes.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove leftovers of crashed runs: containers, VMs, cgroups, mounts, directories."""
    removed = gc_mod.collect(everything=everything)
    if as_json:
        print(json.dumps({"removed": removed}))
        return
    for line in removed:
        out.print(f"removed {line}", highlight=False)
    out.print(f"{len(removed)} leftovers removed", highlight=False)


# ---- sandbox ----------------------------------------------------------------
@sandbox_app.command("create")
def sandbox_create(
    image: Annotated[str, typer.Argument(help="Image to start from.")],
    tier: TierOpt = DEFAULT_TIER,
    memory: MemoryOpt = "256m",
    cpus: CpusOpt = None,
    pids: PidsOpt = 128,
    timeout: TimeoutOpt = "60s",
    env: EnvOpt = None,
    network: NetOpt = "none",
    ttl: Annotated[
        str | None,
        typer.Option("--ttl", help="Remove it after this long (e.g. 30m, 1h) at the next gc."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a sandbox that lives until `tierbox sandbox rm` (or its --ttl); prints its id."""
    try:
        opts = _spec_options(memory, cpus, pids, timeout, env, network)
        ttl_s = parse_duration_s(ttl) if ttl else None
        sb = Sandbox.create(image, tier=tier, keep=True, ttl_s=ttl_s, **opts)
    except TierboxError as exc:
        fail(exc)
    print(json.dumps({"id": sb.id, "tier": sb.tier}) if as_json else sb.id)


@sandbox_app.command("exec", context_settings=PASSTHROUGH)
def sandbox_exec(
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    command: Annotated[list[str], typer.Argument(help="Command and arguments, after --.")],
    timeout: Annotated[
        str | None, typer.Option("--timeout", help="Wall-clock limit for this command.")
    ] = None,
    env: EnvOpt = None,
    interactive: InteractiveOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a command in a running sandbox."""
    try:
        sb = Sandbox.connect(sandbox_id)
        stdin = sys.stdin.buffer.read() if interactive else None
        r = sb.run(
            workload_argv(command),
            stdin=stdin,
            env=parse_env(env),
            timeout_s=parse_duration_s(timeout) if timeout else None,
        )
    except TierboxError as exc:
        fail(exc)
    emit_result(r, as_json)


@sandbox_app.command("cp")
def sandbox_cp(
    src: Annotated[str, typer.Argument(help="ID:PATH or a host path (- for stdin).")],
    dst: Annotated[str, typer.Argument(help="ID:PATH or a host path (- for stdout).")],
    max_size: Annotated[
        str,
        typer.Option(
            "--max-size", help="Most bytes to copy out of the sandbox, e.g. 64m, 2g, or 'none'."
        ),
    ] = "1g",
) -> None:
    """Copy a file or directory into or out of a sandbox (like docker cp).

    Out of a sandbox, regular files and directories are copied (symlinks
    inside the sandbox are not followed); an existing host file is never
    overwritten. `ID:PATH -` streams one file to stdout.
    """
    try:
        cap = None if max_size == "none" else parse_memory_mib(max_size) * 1024 * 1024
        if ":" in src and ":" not in dst:
            sid, _, path = src.partition(":")
            sb = Sandbox.connect(sid)
            if dst == "-":
                sb.instance.copy_out(path, sys.stdout.buffer, max_bytes=cap)
                sys.stdout.buffer.flush()
            else:
                sb.files.download(path, dst, max_bytes=cap)
        elif ":" in dst and ":" not in src:
            sid, _, path = dst.partition(":")
            sb = Sandbox.connect(sid)
            if src == "-":
                sb.files.write(path, sys.stdin.buffer.read())
            else:
                sb.files.upload(src, path)
        else:
            raise UsageError(
                "give exactly one side as ID:PATH, e.g. `tierbox sandbox cp app.py ID:/tmp/app.py`"
            )
    except OSError as exc:
        fail(UsageError(f"{exc.filename}: {exc.strerror}"))
    except TierboxError as exc:
        fail(exc)


@sandbox_app.command("ls")
def sandbox_ls(as_json: JsonOpt = False) -> None:
    """List live sandboxes."""
    rows = Sandbox.list()
    if as_json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
        return
    table = Table("id", "name", "tier", "image", "memory", "kept until")
    for r in rows:
        table.add_row(
            r.id,
            r.name or "",
            r.tier,
            r.image or "-",
            f"{r.memory_mib} MiB" if r.memory_mib is not None else "-",
            _kept_until(r),
        )
    out.print(table)


def _kept_until(record: SandboxRecord) -> str:
    if not record.keep:
        return f"its creator exits (pid {record.owner_pid})"
    if record.expires_unix is None:
        return "removed"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.expires_unix))


@sandbox_app.command("stats")
def sandbox_stats(
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonOpt = False
) -> None:
    """Current memory, peak memory, CPU time and processes of a sandbox."""
    try:
        st = Sandbox.connect(sandbox_id).stats()
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(st.to_dict()))
        return
    for k, v in st.to_dict().items():
        out.print(f"{k:18} {v}", highlight=False)


@sandbox_app.command("rm")
def sandbox_rm(ids: Annotated[list[str], typer.Argument(metavar="ID...")]) -> None:
    """Stop and remove sandboxes."""
    for sid in ids:
        try:
            Sandbox.connect(sid).close()
        except TierboxError as exc:
            fail(exc)
        print(sid)


# ---- image ------------------------------------------------------------------
def _store() -> Any:
    from tierbox.images.store import default_store

    return default_store()


@image_app.command("ls")
def image_ls(as_json: JsonOpt = False) -> None:
    """List images in the store."""
    records = _store().list()
    if as_json:
        print(json.dumps([r.to_dict() for r in records], indent=1))
        return
    table = Table("image", "digest", "size", "created")
    for r in records:
        table.add_row(r.ref, r.manifest_digest[:19], f"{r.size_bytes / 2**20:.1f} MiB", r.created)
    out.print(table)


@image_app.command("inspect")
def image_inspect(ref: str) -> None:
    """Show an image's manifest digest and config as JSON."""
    try:
        print(json.dumps(_store().resolve(ref).to_dict(), indent=1))
    except TierboxError as exc:
        fail(exc)


@image_app.command("rm")
def image_rm(refs: Annotated[list[str], typer.Argument(metavar="IMAGE...")]) -> None:
    """Remove images (and their unpacked caches)."""
    try:
        for ref in refs:
            _store().remove(ref)
            print(ref)
    except TierboxError as exc:
        fail(exc)


@image_app.command("import")
def image_import(
    path: Annotated[
        Path, typer.Argument(help="docker-archive or oci-archive tarball, or a .wasm module.")
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="name[:tag] to store it under.")
    ] = None,
    max_unpacked_size: Annotated[
        str | None,
        typer.Option(
            "--max-unpacked-size",
            metavar="SIZE",
            help="Refuse an archive whose layers unpack to more than this, like 500m (default 8g).",
        ),
    ] = None,
    max_entries: Annotated[
        int | None,
        typer.Option(
            "--max-entries",
            metavar="N",
            help="Refuse an archive with more entries than this (default 1000000).",
        ),
    ] = None,
) -> None:
    """Import an image archive (docker save / podman save / skopeo copy) or wrap a .wasm module."""
    try:
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
        limits: dict[str, int] = {}
        if max_unpacked_size is not None:
            limits["max_unpacked_bytes"] = _size_bytes(max_unpacked_size, "--max-unpacked-size")
        if max_entries is not None:
            limits["max_entries"] = max_entries
        with path.open("rb") as fh:
            is_wasm = path.suffix == ".wasm" or fh.read(4) == b"\0asm"
        if is_wasm:
            from tierbox.tiers.wasm import import_wasm

            if name is None:
                raise UsageError("give --name for a .wasm module, e.g. --name hello")
            rec = import_wasm(path, name)
        else:
            rec = _store().import_archive(
                path,
                name=name,
                progress=lambda line: err.print(line, highlight=False),
                **limits,
            )
    except TierboxError as exc:
        fail(exc)
    print(rec.ref)


def _size_bytes(text: str, option: str) -> int:
    """``8g`` or ``500m`` in bytes, for image import limits."""
    try:
        return parse_memory_mib(text) << 20
    except UsageError:
        hint = "use a size with a unit, like 8g or 500m"
        raise UsageError(f"bad {option} {text!r}: {hint}") from None


@image_app.command("bootstrap")
def image_bootstrap(
    ref: Annotated[str, typer.Argument(help="debian:bookworm or python:3.11")],
) -> None:
    """Build a base image with debootstrap (about a minute; progress shown)."""
    try:
        with err.status(f"bootstrapping {ref}") as status:
            rec = _store().bootstrap(
                ref, progress=lambda line: status.update(f"{ref}: {line[:100]}")
            )
    except TierboxError as exc:
        fail(exc)
    print(rec.ref)


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except KeyboardInterrupt:
        err.print("tierbox: interrupted; sandbox cleaned up", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
