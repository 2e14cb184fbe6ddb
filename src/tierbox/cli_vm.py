"""``tierbox vm ...``: full VMs on libvirt, with virsh-parity snapshots.

    tierbox vm create web --image debian:bookworm --memory 512m
    tierbox vm exec web -- sh -c 'echo v1 > /srv/app'
    tierbox vm snapshot create web before-update --description "Snapshot before update"
    tierbox vm snapshot revert web before-update
    tierbox vm snapshot list web
    tierbox vm snapshot delete web before-update
    tierbox vm rm web

The lead wires it in with ``app.add_typer(vm_app, name="vm")``. Each VM is a
libvirt domain of the same name (``virsh list``, ``virsh snapshot-list web``
show what these commands do).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from tierbox.cli_common import (
    PASSTHROUGH,
    AllowOpt,
    DnsOpt,
    EnvOpt,
    JsonOpt,
    NetOpt,
    PublishOpt,
    emit_result,
    err,
    fail,
    fmt_mib,
    network_options,
    out,
    parse_env,
    workload_argv,
    write_err,
    write_out,
)
from tierbox.errors import TierboxError, UsageError
from tierbox.sandbox import make_spec
from tierbox.spec import parse_duration_s, parse_memory_mib

vm_app = typer.Typer(
    help="Full VMs on libvirt (q35, own kernel): create, exec, ls, start, stop, rm, "
    "snapshots with virsh parity.",
    no_args_is_help=True,
)
snapshot_app = typer.Typer(
    help="libvirt snapshots of a VM (memory and disk): create, list, revert, delete.",
    no_args_is_help=True,
)
vm_app.add_typer(snapshot_app, name="snapshot")


NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The VM's name.")]
SnapArg = Annotated[str, typer.Argument(metavar="SNAPSHOT", help="The snapshot's name.")]


class _Notices(logging.Handler):
    """tierbox's warnings (e.g. "started libvirtd") as one stderr line each."""

    def emit(self, record: logging.LogRecord) -> None:
        err.print(record.getMessage(), highlight=False, markup=False)


def _setup_logging() -> None:
    logger = logging.getLogger("tierbox")
    if not any(isinstance(h, _Notices) for h in logger.handlers):
        logger.addHandler(_Notices(logging.WARNING))
        logger.propagate = False


def _tier() -> Any:
    from tierbox.tiers.vm import VMTier

    _setup_logging()
    return VMTier()


def _open(name: str) -> Any:
    return _tier().open(name)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(ts)) if ts else "-"


# ---- VMs ------------------------------------------------------------------------------


@vm_app.command("create")
def vm_create(
    name: NameArg,
    image: Annotated[
        str, typer.Option("--image", "-i", help="Image for the root disk, e.g. debian:bookworm.")
    ] = "busybox:latest",
    memory: Annotated[str, typer.Option("--memory", "-m", help="Guest RAM, e.g. 512m.")] = "256m",
    cpus: Annotated[
        float | None, typer.Option("--cpus", help="vCPUs (rounded up) and a CPU quota.")
    ] = None,
    disk: Annotated[
        str | None,
        typer.Option(
            "--disk", help="Root disk and file system size, e.g. 512m (default 2g); ENOSPC past it."
        ),
    ] = None,
    pids: Annotated[int, typer.Option("--pids", help="Process limit per exec.")] = 128,
    timeout: Annotated[
        str, typer.Option("--timeout", help="Default wall-clock limit of each exec.")
    ] = "60s",
    env: EnvOpt = None,
    network: NetOpt = "none",
    allow: AllowOpt = None,
    dns: DnsOpt = False,
    publish: PublishOpt = None,
    cold: Annotated[
        bool, typer.Option("--cold", help="Cold-boot even where a saved template exists.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Define and start a VM (a libvirt domain called NAME); it lives until `vm rm`.
    With `--network egress` it gets a NIC that reaches only the `--allow` list."""
    try:
        spec = make_spec(
            image,
            memory_mib=parse_memory_mib(memory),
            cpus=cpus,
            pids=pids,
            timeout_s=parse_duration_s(timeout),
            disk_mib=parse_memory_mib(disk) if disk else None,
            env=parse_env(env),
            **network_options(network, allow, dns, publish),
        )
        tier = _tier()
        inst = tier.create_vm(spec, name=name, persistent=True, template=False if cold else None)
        tier.register(inst)
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(
            json.dumps(
                {
                    "name": inst.name,
                    "domain": inst.domain_name,
                    "accel": inst.meta.accel,
                    "timings": inst.timings,
                }
            )
        )
    else:
        print(inst.name)


@vm_app.command("exec", context_settings=PASSTHROUGH)
def vm_exec(
    name: NameArg,
    command: Annotated[
        list[str], typer.Argument(metavar="COMMAND...", help="Command and arguments, after --.")
    ],
    timeout: Annotated[
        str | None,
        typer.Option("--timeout", metavar="DURATION", help="Wall-clock limit for this command."),
    ] = None,
    env: EnvOpt = None,
    interactive: Annotated[
        bool, typer.Option("--interactive", "-i", help="Pass this process's stdin to the command.")
    ] = False,
    tty: Annotated[
        bool, typer.Option("--tty", "-t", help="Run on a pseudo-terminal (with -i: interactive).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a command in a VM; the exit status mirrors the command's."""
    try:
        argv = workload_argv(command)
        if not argv:
            raise UsageError("give a command after --, e.g. `tierbox vm exec web -- uname -a`")
        inst = _open(name)
        timeout_s = parse_duration_s(timeout) if timeout else None
        if tty and not as_json:
            from tierbox.cli_term import attach

            r = attach(inst, argv, interactive=interactive, env=parse_env(env), timeout_s=timeout_s)
        else:
            r = inst.exec(
                argv,
                stdin=sys.stdin.buffer.read() if interactive else None,
                env=parse_env(env),
                timeout_s=timeout_s,
                on_stdout=None if as_json else write_out,
                on_stderr=None if as_json else write_err,
            )
    except TierboxError as exc:
        fail(exc)
    emit_result(r, as_json, streamed=not as_json)


@vm_app.command("ls")
def vm_ls(as_json: JsonOpt = False) -> None:
    """List tierbox VMs (running or not)."""
    try:
        rows = [v.to_dict() for v in _tier().list_vms()]
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("state", "image", "memory", "vcpus", "type", "snapshots", "created")
    table.columns.insert(0, Column("name", no_wrap=True))
    for r in rows:
        table.add_row(
            r["name"],
            r["state"],
            str(r["image"]),
            fmt_mib(r["memory_mib"]),
            str(r["vcpus"]),
            "kvm" if r["accel"] == "kvm" else "qemu (TCG)",
            str(r["snapshots"]),
            _when(r["created"]),
        )
    out.print(table)


@vm_app.command("start")
def vm_start(name: NameArg) -> None:
    """Boot a stopped VM again from its disk."""
    try:
        _open(name).power_on()
    except TierboxError as exc:
        fail(exc)
    print(name)


@vm_app.command("stop")
def vm_stop(name: NameArg) -> None:
    """Power a VM off (the guest syncs its disks first); its disk and snapshots stay."""
    try:
        _open(name).power_off()
    except TierboxError as exc:
        fail(exc)
    print(name)


@vm_app.command("rm")
def vm_rm(names: Annotated[list[str], typer.Argument(metavar="NAME...")]) -> None:
    """Remove VMs: the domain, its snapshots and its disks."""
    for name in names:
        try:
            _open(name).close()
        except TierboxError as exc:
            fail(exc)
        print(name)


@vm_app.command("console")
def vm_console(
    name: NameArg,
    log: Annotated[
        bool, typer.Option("--log", help="Show the end of the serial console's log instead.")
    ] = False,
    lines: Annotated[
        int, typer.Option("--lines", "-n", metavar="N", help="How many log lines (--log).")
    ] = 40,
    shell: Annotated[
        str, typer.Option("--shell", metavar="PROGRAM", help="The shell to start.")
    ] = "sh",
) -> None:
    """A shell on a terminal in the VM, as virsh console gives one (Ctrl-] leaves).

    The guest's serial console itself is a log (the guest runs no login on
    it): --log shows its end. Window size changes and Ctrl-C pass through.
    """
    try:
        inst = _open(name)
        if log:
            text = inst.console_tail(200_000)
        else:
            from tierbox.cli_term import ESCAPE, attach, require_tty

            require_tty(inst)
            err.print(f"Connected to VM {name}", highlight=False, markup=False)
            err.print("Escape character is ^] (Ctrl + ])", highlight=False, markup=False)
            attach(inst, [shell], interactive=True, escape=ESCAPE, unbounded=True)
    except TierboxError as exc:
        fail(exc)
    if not log:
        print()  # the prompt the console was left at stays on a line of its own
        return  # as virsh console: leaving the console is not a failure
    for line in text.splitlines()[-lines:]:
        print(line)


# ---- snapshots --------------------------------------------------------------------------


@snapshot_app.command("create")
def snapshot_create(
    name: NameArg,
    snapshot: SnapArg,
    description: Annotated[
        str | None, typer.Option("--description", "-d", help="Free text kept with it.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Snapshot a running VM's memory and disk (a libvirt internal snapshot)."""
    try:
        inst = _open(name)
        info = inst.create_snapshot(snapshot, description)
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps({**info.to_dict(), "timings": inst.timings}))
    else:
        print(f"snapshot {info.name} of {name} created")


@snapshot_app.command("list")
def snapshot_list(name: NameArg, as_json: JsonOpt = False) -> None:
    """Snapshots of a VM: name, creation time, state, parent, description."""
    try:
        infos = _open(name).list_snapshots()
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps([i.to_dict() for i in infos], indent=1))
        return
    table = Table(Column("name", no_wrap=True), "creation time", "state", "parent", "description")
    for i in infos:
        table.add_row(
            i.name + (" (current)" if i.current else ""),
            _when(i.created),
            i.state,
            i.parent or "",
            i.description,
        )
    out.print(table)


@snapshot_app.command("revert")
def snapshot_revert(
    name: NameArg,
    snapshot: SnapArg,
    libvirt_revert: Annotated[
        bool,
        typer.Option(
            "--libvirt", help="Use libvirt's own revert (restarts QEMU; slower) for comparison."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Bring back a snapshot's memory and disk; the VM answers again when this returns."""
    try:
        timings = _open(name).revert_timed(snapshot, method="libvirt" if libvirt_revert else "auto")
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps({"name": name, "snapshot": snapshot, **timings}))
    else:
        print(f"{name} reverted to {snapshot}")


@snapshot_app.command("delete")
def snapshot_delete(
    name: NameArg,
    snapshot: SnapArg,
    children: Annotated[
        bool, typer.Option("--children", help="Also delete its descendants (like virsh).")
    ] = False,
) -> None:
    """Delete a snapshot (one with children only with --children)."""
    try:
        gone = _open(name).delete_snapshot(snapshot, children=children)
    except TierboxError as exc:
        fail(exc)
    for s in gone:
        print(f"snapshot {s} of {name} deleted")


if __name__ == "__main__":
    vm_app(prog_name="tierbox vm")
