"""The ``tierbox`` command line, with Docker's habits: ``tierbox run -it
-m 256m --cpus 0.5 --pids-limit 64 -e K=V -v HOST:PATH -w DIR -u USER --name N
IMAGE -- CMD``, ``tierbox sandbox shell|exec|cp|logs|inspect``."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from tierbox import gc as gc_mod
from tierbox import transfer
from tierbox.cli_bench import bench
from tierbox.cli_build import register as register_build_commands
from tierbox.cli_common import (
    PASSTHROUGH,
    AllowOpt,
    DnsOpt,
    EnvFileOpt,
    EnvOpt,
    JsonOpt,
    NetOpt,
    PublishOpt,
    emit_result,
    err,
    fail,
    fmt_bytes,
    fmt_mib,
    network_options,
    out,
    parse_env,
    parse_volume,
    resolve_tier,
    workload_argv,
    write_err,
    write_out,
)
from tierbox.cli_kube import register as register_kube_commands
from tierbox.cli_logs import SandboxLogs
from tierbox.cli_pool import autoscale_app, fn_app, pool_app
from tierbox.cli_serve import register as register_serve_commands
from tierbox.cli_term import attach
from tierbox.cli_vm import vm_app
from tierbox.errors import NotSupportedError, SandboxNotFoundError, TierboxError, UsageError
from tierbox.sandbox import DEFAULT_TIER, Sandbox, SandboxRecord
from tierbox.sandbox import run as run_once
from tierbox.spec import ExecResult, parse_duration_s, parse_memory_mib
from tierbox.tiers import _state, get_tier, tier_names

app = typer.Typer(
    help="Run one workload on any rung of the isolation ladder: process, container, "
    "gvisor, microvm, vm, wasm.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
sandbox_app = typer.Typer(
    help="Long-lived sandboxes: create, exec, shell, cp, logs, inspect, ls, stats, rm.",
    no_args_is_help=True,
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
register_kube_commands(app)
register_serve_commands(app)
app.command(
    help="Measure every available tier side by side: start, exec, memory, density, isolation."
)(bench)


def _version() -> str:
    try:
        return package_version("tierbox")
    except PackageNotFoundError:
        return "unknown"


def _show_version(value: bool) -> None:
    if value:
        print(f"tierbox {_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            is_eager=True,
            callback=_show_version,
            help="Print tierbox's version and exit.",
        ),
    ] = False,
) -> None:
    """Run one workload on any rung of the isolation ladder: process, container,
    gvisor, microvm, vm, wasm."""


# ---- options ---------------------------------------------------------------------------

TierOpt = Annotated[
    str,
    typer.Option(
        "--tier",
        "-T",
        metavar="TIER",
        help=f"One of: {', '.join(tier_names())} (any case).",
    ),
]
MemoryOpt = Annotated[
    str, typer.Option("--memory", "-m", metavar="SIZE", help="Memory limit, e.g. 256m or 1g.")
]
CpusOpt = Annotated[
    float | None, typer.Option("--cpus", metavar="N", help="CPU limit in cores, e.g. 0.5.")
]
PidsOpt = Annotated[
    int,
    typer.Option("--pids-limit", "--pids", metavar="N", help="Maximum number of processes."),
]
TimeoutOpt = Annotated[
    str,
    typer.Option("--timeout", metavar="DURATION", help="Wall-clock limit, e.g. 10s, 500ms, 2m."),
]
InteractiveOpt = Annotated[
    bool, typer.Option("--interactive", "-i", help="Pass this terminal's input to the workload.")
]
TtyOpt = Annotated[
    bool,
    typer.Option(
        "--tty", "-t", help="Run on a pseudo-terminal (with -i: interactive, Ctrl-C included)."
    ),
]
VolumeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--volume",
        "-v",
        metavar="HOST:PATH[:ro]",
        help="Show a host directory or file at PATH (read-write unless :ro); repeatable.",
    ),
]
WorkdirOpt = Annotated[
    str | None,
    typer.Option("--workdir", "-w", metavar="DIR", help="Working directory inside the sandbox."),
]
UserOpt = Annotated[
    str | None,
    typer.Option("--user", "-u", metavar="UID[:GID]", help="Numeric user (and group) to run as."),
]
NameOpt = Annotated[
    str | None,
    typer.Option("--name", metavar="NAME", help="A name for the sandbox, usable as its id."),
]
IdArg = Annotated[str, typer.Argument(metavar="ID", help="Sandbox id or name.")]
CommandArg = Annotated[
    list[str] | None,
    typer.Argument(metavar="[COMMAND]...", help="Command and arguments, after --."),
]


def _spec_options(
    memory: str,
    cpus: float | None,
    pids: int,
    timeout: str,
    env: list[str] | None,
    env_files: list[Path] | None,
    network: tuple[str, list[str] | None, bool, list[str] | None],
    volumes: list[str] | None = None,
    user: str | None = None,
) -> dict[str, Any]:
    """make_spec's options from the command line's; ``network`` is
    (--network, --allow, --dns, --publish)."""
    opts: dict[str, Any] = {
        "memory_mib": parse_memory_mib(memory),
        "cpus": cpus,
        "pids": pids,
        "timeout_s": parse_duration_s(timeout),
        "env": parse_env(env, env_files),
        **network_options(*network),
        "user": user,
    }
    if volumes:
        opts["mounts"] = [parse_volume(v) for v in volumes]
    return opts


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _stdin_is_terminal() -> bool:
    return sys.stdin is not None and os.isatty(sys.stdin.fileno())


def _image_command(image: str, tier: str) -> list[str]:
    """The image's own command, for runs that give none."""
    from tierbox.images.store import default_store

    cfg = default_store().resolve(image).config
    argv = [*cfg.entrypoint, *cfg.cmd]
    if not argv:
        raise UsageError(f"give a command after --: image {image} has no default command")
    return argv


def _run_attached(
    sb: Sandbox,
    argv: list[str],
    *,
    tty: bool,
    interactive: bool,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    user: str | None = None,
    timeout_s: float | None = None,
    unbounded: bool = False,
) -> ExecResult:
    """A command whose output streams to this terminal as it comes: on a
    pty with ``tty``, else with live stdin where this terminal types it, else
    with the whole of stdin (``interactive``) given at start."""
    start: dict[str, Any] = {"env": env, "cwd": cwd, "user": user, "timeout_s": timeout_s}
    if unbounded:
        start["unbounded"] = True
    if tty:
        return attach(sb.instance, argv, interactive=interactive, **start)
    live = interactive and _stdin_is_terminal() and sb.instance.capabilities.stdin_stream
    if live:
        return attach(sb.instance, argv, interactive=True, tty=False, **start)
    stdin = sys.stdin.buffer.read() if interactive else None
    return sb.run(
        argv,
        stdin=stdin,
        env=env,
        cwd=cwd,
        user=user,
        timeout_s=timeout_s,
        on_stdout=write_out,
        on_stderr=write_err,
    )


# ---- run -------------------------------------------------------------------------------


@app.command(context_settings=PASSTHROUGH)
def run(
    image: Annotated[
        str,
        typer.Argument(
            metavar="IMAGE",
            help="Image (busybox, debian:bookworm, python:3.11) or a .wasm file.",
        ),
    ],
    command: CommandArg = None,
    tier: TierOpt = DEFAULT_TIER,
    memory: MemoryOpt = "256m",
    cpus: CpusOpt = None,
    pids: PidsOpt = 128,
    timeout: TimeoutOpt = "60s",
    env: EnvOpt = None,
    env_file: EnvFileOpt = None,
    volume: VolumeOpt = None,
    workdir: WorkdirOpt = None,
    user: UserOpt = None,
    name: NameOpt = None,
    network: NetOpt = "none",
    allow: AllowOpt = None,
    dns: DnsOpt = False,
    publish: PublishOpt = None,
    interactive: InteractiveOpt = False,
    tty: TtyOpt = False,
    remove: Annotated[
        bool, typer.Option("--rm", hidden=True, help="Accepted: a run's sandbox is always removed.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run COMMAND once in a fresh sandbox; the exit status mirrors the workload's.

    Output streams as it comes; the sandbox is gone afterwards."""
    try:
        tier = resolve_tier(tier)
        opts = _spec_options(
            memory, cpus, pids, timeout, env, env_file, (network, allow, dns, publish), volume, user
        )
        argv = workload_argv(command)
        live_stdin = interactive and _stdin_is_terminal() and not as_json
        if tty or name or workdir or live_stdin:
            if tty and as_json:
                raise UsageError("--json and --tty do not mix: a terminal has one stream")
            with Sandbox.create(image, tier=tier, name=name, **opts) as sb:
                r = _run_attached(
                    sb,
                    argv or _image_command(image, tier),
                    tty=tty,
                    interactive=interactive,
                    cwd=workdir,
                    timeout_s=opts["timeout_s"],
                )
        else:
            stdin = sys.stdin.buffer.read() if interactive else None
            stream: dict[str, Any] = {}
            if not as_json:
                stream = {"on_stdout": write_out, "on_stderr": write_err}
            r = run_once(image, argv, tier=tier, stdin=stdin, **stream, **opts)
    except TierboxError as exc:
        fail(exc)
    emit_result(r, as_json, streamed=not as_json)


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
            "yes" if r["available"] else Text("no", style="red"),
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


# ---- sandbox ----------------------------------------------------------------------------
@sandbox_app.command("create")
def sandbox_create(
    image: Annotated[str, typer.Argument(metavar="IMAGE", help="Image to start from.")],
    tier: TierOpt = DEFAULT_TIER,
    memory: MemoryOpt = "256m",
    cpus: CpusOpt = None,
    pids: PidsOpt = 128,
    timeout: TimeoutOpt = "60s",
    env: EnvOpt = None,
    env_file: EnvFileOpt = None,
    volume: VolumeOpt = None,
    workdir: WorkdirOpt = None,
    user: UserOpt = None,
    name: NameOpt = None,
    network: NetOpt = "none",
    allow: AllowOpt = None,
    dns: DnsOpt = False,
    publish: PublishOpt = None,
    ttl: Annotated[
        str | None,
        typer.Option(
            "--ttl",
            metavar="DURATION",
            help="Remove it after this long (e.g. 30m, 1h) at the next gc.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a sandbox that lives until `tierbox sandbox rm` (or its --ttl); prints its id."""
    try:
        tier = resolve_tier(tier)
        opts = _spec_options(
            memory, cpus, pids, timeout, env, env_file, (network, allow, dns, publish), volume, user
        )
        if workdir is not None:
            opts["workdir"] = workdir
        ttl_s = parse_duration_s(ttl) if ttl else None
        sb = Sandbox.create(image, tier=tier, keep=True, ttl_s=ttl_s, name=name, **opts)
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps({"id": sb.id, "name": sb.name, "tier": sb.tier}))
    else:
        print(sb.id)


@sandbox_app.command("exec", context_settings=PASSTHROUGH)
def sandbox_exec(
    sandbox_id: IdArg,
    command: Annotated[
        list[str], typer.Argument(metavar="COMMAND...", help="Command and arguments, after --.")
    ],
    timeout: Annotated[
        str | None,
        typer.Option("--timeout", metavar="DURATION", help="Wall-clock limit for this command."),
    ] = None,
    env: EnvOpt = None,
    env_file: EnvFileOpt = None,
    workdir: WorkdirOpt = None,
    user: UserOpt = None,
    interactive: InteractiveOpt = False,
    tty: TtyOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a command in a running sandbox (-it: interactively, on a terminal)."""
    try:
        if tty and as_json:
            raise UsageError("--json and --tty do not mix: a terminal has one stream")
        sb = Sandbox.connect(sandbox_id)
        argv = workload_argv(command)
        timeout_s = parse_duration_s(timeout) if timeout else None
        vars_ = parse_env(env, env_file)
        if as_json:
            stdin = sys.stdin.buffer.read() if interactive else None
            r = sb.run(argv, stdin=stdin, env=vars_, timeout_s=timeout_s, cwd=workdir, user=user)
        else:
            r = _run_attached(
                sb,
                argv,
                tty=tty,
                interactive=interactive,
                env=vars_,
                cwd=workdir,
                user=user,
                timeout_s=timeout_s,
                unbounded=tty and interactive and timeout_s is None,
            )
    except TierboxError as exc:
        fail(exc)
    emit_result(r, as_json, streamed=not as_json)


@sandbox_app.command("shell")
def sandbox_shell(
    sandbox_id: IdArg,
    shell: Annotated[
        str, typer.Option("--shell", metavar="PROGRAM", help="The shell to start.")
    ] = "sh",
    env: EnvOpt = None,
    workdir: WorkdirOpt = None,
    user: UserOpt = None,
) -> None:
    """An interactive shell on a terminal in a running sandbox.

    Leave it with exit or Ctrl-D; window size changes and Ctrl-C pass through
    to the sandbox's terminal."""
    try:
        sb = Sandbox.connect(sandbox_id)
        r = attach(
            sb.instance,
            [shell],
            interactive=True,
            env=parse_env(env),
            cwd=workdir,
            user=user,
            unbounded=True,
        )
    except TierboxError as exc:
        fail(exc)
    emit_result(r, False, streamed=True)


@sandbox_app.command("cp")
def sandbox_cp(
    src: Annotated[
        str, typer.Argument(metavar="SRC", help="ID:PATH or a host path (- for stdin).")
    ],
    dst: Annotated[
        str, typer.Argument(metavar="DEST", help="ID:PATH or a host path (- for stdout).")
    ],
    max_size: Annotated[
        str,
        typer.Option(
            "--max-size",
            metavar="SIZE",
            help="Most bytes to copy out of the sandbox, e.g. 64m, 2g, or 'none'.",
        ),
    ] = "1g",
) -> None:
    """Copy files and directories between a sandbox and the host, as docker cp does.

    A file lands at DEST, or in DEST under its own name when DEST is a
    directory; a directory becomes DEST, or goes into it under its own name
    (SRC/. copies its contents). Modes are kept; what comes in belongs to
    the sandbox's user. Out of a sandbox, symlinks and special files are not
    copied, and nothing on the host is written through a symlink.
    `ID:PATH -` streams one file to stdout, `- ID:PATH` stdin to one file.
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
                transfer.cp_out(sb.instance, path, dst, max_bytes=cap)
        elif ":" in dst and ":" not in src:
            sid, _, path = dst.partition(":")
            sb = Sandbox.connect(sid)
            if src == "-":
                sb.files.write(path, sys.stdin.buffer.read())
            else:
                transfer.cp_in(sb.instance, src, path)
        else:
            raise UsageError(
                "give exactly one side as ID:PATH, e.g. `tierbox sandbox cp app.py ID:/tmp/app.py`"
            )
    except OSError as exc:
        fail(UsageError(f"{exc.filename}: {exc.strerror}"))
    except TierboxError as exc:
        fail(exc)


@sandbox_app.command("logs")
def sandbox_logs(
    sandbox_id: IdArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep showing new output until Ctrl-C.")
    ] = False,
) -> None:
    """Output of a sandbox's background commands, and its guest console.

    Background commands' stdout and stderr, in the order they started; for
    microVMs and VMs, then the guest's serial console."""
    try:
        # the files, not the sandbox: its owner may hold a microVM's agent line
        sid = _state.resolve(sandbox_id)
        if not re.fullmatch(r"[0-9a-f]{12}", sid):
            raise SandboxNotFoundError(
                f"no sandbox {sandbox_id!r}: `tierbox sandbox ls` lists them"
            )
        logs = SandboxLogs.of(_state.sandbox_dir(sid), _state.read_state(sid))
    except TierboxError as exc:
        fail(exc)
    if not follow:
        logs.pump()
        return
    try:
        logs.follow(lambda: _state.is_live(sid))
    except KeyboardInterrupt:
        return


@sandbox_app.command("inspect")
def sandbox_inspect(sandbox_id: IdArg, as_json: JsonOpt = False) -> None:
    """A sandbox's record, spec, limits, processes and resource use."""
    try:
        sb = Sandbox.connect(sandbox_id)
        state = _state.read_state(sb.id)
        info = _inspect(sb, state)
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(info, indent=1))
        return
    _print_inspect(info)


def _inspect(sb: Sandbox, state: dict[str, Any]) -> dict[str, Any]:
    record = SandboxRecord.from_state(state)
    info: dict[str, Any] = {**record.to_dict(), "capabilities": None}
    caps = sb.instance.capabilities
    info["capabilities"] = {
        "snapshot": caps.snapshot.value,
        "tty": caps.tty,
        "stdin_stream": caps.stdin_stream,
    }
    spec = sb.spec.to_dict()
    info["limits"] = spec.get("limits", {})
    info["spec"] = spec
    try:
        info["processes"] = [p.to_dict() for p in sb.processes()]
    except NotSupportedError as exc:
        info["processes"] = None
        info["processes_note"] = str(exc)
    info["stats"] = sb.stats().to_dict()
    info["tier_state"] = state.get("tier_state", {})
    return info


def _print_network(line: Callable[[str, object], None], spec: dict[str, Any]) -> None:
    """The policy, each allow-list entry with the addresses pinned at create,
    and the published ports."""
    net = spec.get("network", "none")
    if not isinstance(net, dict):
        line("network", net)
    else:
        egress = net["egress"]
        line("network", "egress" + (" (dns allowed)" if egress.get("dns") else ""))
        for rule in egress.get("rules", []):
            lo, hi = rule["ports"]
            ports = str(lo) if lo == hi else f"{lo}-{hi}"
            line("  allow", f"{rule['allow']} -> {', '.join(rule['addresses'])} port {ports}")
    for p in spec.get("ports") or []:
        line("publish", f"{p['host_ip']}:{p['host_port'] or '(any)'} -> {p['port']}")


def _print_inspect(info: dict[str, Any]) -> None:
    def line(key: str, value: object) -> None:
        out.print(f"{key:16} {value}", highlight=False, markup=False)

    line("id", info["id"])
    line("name", info["name"] or "-")
    line("tier", info["tier"])
    line("image", info["image"] or "-")
    line("state", info["state"])
    line("created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["created_unix"])))
    line("kept until", _kept_until(SandboxRecord(**{k: info[k] for k in _RECORD_KEYS})))
    limits = info["limits"]
    line("memory limit", fmt_mib(limits.get("memory_mib")))
    line("cpus", limits.get("cpus") if limits.get("cpus") is not None else "-")
    line("pids limit", limits.get("pids") if limits.get("pids") is not None else "-")
    line("timeout", f"{limits['timeout_s']} s" if limits.get("timeout_s") is not None else "-")
    line("disk", fmt_mib(limits.get("disk_mib")))
    spec = info["spec"]
    _print_network(line, spec)
    line("user", spec.get("user") or "(the tier's default)")
    line("workdir", spec.get("workdir", "/"))
    for key in sorted(spec.get("env") or {}):
        line("env", f"{key}={spec['env'][key]}")
    for m in spec.get("mounts") or []:
        line("mount", f"{m['host']} -> {m['path']} ({'ro' if m['read_only'] else 'rw'})")
    caps = info["capabilities"]
    line("snapshots", caps["snapshot"])
    line("terminal", "yes" if caps["tty"] else "no")
    st = info["stats"]
    line("memory", fmt_bytes(st.get("memory_bytes")))
    line("memory peak", fmt_bytes(st.get("memory_peak_bytes")))
    if st.get("engine_memory_bytes") is not None:
        line("engine memory", fmt_bytes(st["engine_memory_bytes"]))
    line("cpu time", f"{st['cpu_s']:.2f} s" if st.get("cpu_s") is not None else "-")
    line("oom kills", st.get("oom_kills") if st.get("oom_kills") is not None else "-")
    procs = info["processes"]
    if procs is None:
        line("processes", info.get("processes_note", "-"))
        return
    table = Table("pid", "ppid", "user", "state", "command")
    for p in procs:
        table.add_row(str(p["pid"]), str(p["ppid"]), p["user"], p["state"], " ".join(p["argv"]))
    out.print(table)


_RECORD_KEYS = [
    "id",
    "name",
    "tier",
    "image",
    "created_unix",
    "state",
    "owner_pid",
    "keep",
    "expires_unix",
    "memory_mib",
]


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
            fmt_mib(r.memory_mib),
            _kept_until(r),
        )
    out.print(table)


def _kept_until(record: SandboxRecord) -> str:
    if not record.keep:
        return f"its creator exits (pid {record.owner_pid})"
    if record.expires_unix is None:
        return "removed"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.expires_unix))


_STAT_LABELS = {
    "memory_bytes": "memory",
    "memory_peak_bytes": "memory peak",
    "cpu_s": "cpu time",
    "pids": "processes",
    "oom_kills": "oom kills",
    "memory_limit_bytes": "memory limit",
    "engine_memory_bytes": "engine memory",
}


@sandbox_app.command("stats")
def sandbox_stats(sandbox_id: IdArg, as_json: JsonOpt = False) -> None:
    """Current memory, peak memory, CPU time and processes of a sandbox."""
    try:
        st = Sandbox.connect(sandbox_id).stats()
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(st.to_dict()))
        return
    for k, v in st.to_dict().items():
        if k.endswith("_bytes"):
            shown = fmt_bytes(v)
        elif k == "cpu_s":
            shown = "-" if v is None else f"{v:.2f} s"
        else:
            shown = "-" if v is None else str(v)
        out.print(f"{_STAT_LABELS.get(k, k):14} {shown}", highlight=False)


@sandbox_app.command("rm")
def sandbox_rm(
    ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Sandbox ids or names.")],
) -> None:
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
        table.add_row(r.ref, r.manifest_digest[:19], fmt_bytes(r.size_bytes), r.created)
    out.print(table)


@image_app.command("inspect")
def image_inspect(ref: Annotated[str, typer.Argument(metavar="IMAGE")]) -> None:
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
        from tierbox.cli_remote import remote_main

        if not remote_main(sys.argv[1:]):  # --remote URL / $TIERBOX_URL: sent to a daemon
            app()
    except KeyboardInterrupt:
        err.print("tierbox: interrupted; sandbox cleaned up", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
