"""``tierbox pool``, ``tierbox fn`` and ``tierbox autoscale``: warm pools,
serverless functions on them, and HPA replays.

Pools and functions live in a pool host process that the first command
starts (``python -m tierbox.pools``); every command here talks to it.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tierbox.cli_common import JsonOpt, emit_result, err, fail, out, plain, workload_argv
from tierbox.errors import HPASpecError, TierboxError, UsageError
from tierbox.pools.manager import FunctionSpec
from tierbox.pools.server import PoolClient
from tierbox.pools.spec import PoolSpec
from tierbox.sandbox import DEFAULT_TIER
from tierbox.spec import (
    ExecResult,
    Termination,
    TerminationKind,
    parse_duration_s,
    parse_memory_mib,
)

pool_app = typer.Typer(
    help="Warm pools of ready sandboxes, autoscaled like a Kubernetes HPA: "
    "create, ls, scale, drain, update, rm, watch.",
    no_args_is_help=True,
)
fn_app = typer.Typer(
    help="Serverless functions on pooled sandboxes: deploy, invoke, ls, rm.",
    no_args_is_help=True,
)
autoscale_app = typer.Typer(
    help="The Kubernetes HorizontalPodAutoscaler algorithm: simulate an HPA against a load curve.",
    no_args_is_help=True,
)

TierOpt = Annotated[str, typer.Option("--tier", "-t", help="The tier members run on.")]
MemoryOpt = Annotated[str, typer.Option("--memory", "-m", help="Memory per member, e.g. 128m.")]
CpusOpt = Annotated[float | None, typer.Option("--cpus", help="CPU limit per member.")]
PidsOpt = Annotated[int, typer.Option("--pids", help="Processes per member.")]
TimeoutOpt = Annotated[str, typer.Option("--timeout", help="Wall-clock limit per command.")]
MinReadyOpt = Annotated[
    int, typer.Option("--min-ready", help="Ready members kept beside the claimed.")
]
MaxSizeOpt = Annotated[int, typer.Option("--max-size", help="Members in all, claimed included.")]


def _behavior(path: Path | None) -> dict[str, Any] | None:
    """A Kubernetes ``behavior`` object from a YAML or JSON file."""
    if path is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise HPASpecError(f"{path}: {exc}") from exc
    if isinstance(data, dict) and "behavior" in data:
        data = data["behavior"]
    if not isinstance(data, dict):
        raise HPASpecError(f"{path}: expected a behavior object (scaleUp, scaleDown)")
    return data


def _amount(text: str | None) -> int | str | None:
    if text is None:
        return None
    return int(text) if text.isdigit() else text


# ---- pool -------------------------------------------------------------------------------
@pool_app.command("create")
def pool_create(
    name: Annotated[str, typer.Argument(help="The pool's name.")],
    image: Annotated[str, typer.Option("--image", help="Image of every member.")],
    tier: TierOpt = DEFAULT_TIER,
    min_ready: MinReadyOpt = 1,
    max_size: MaxSizeOpt = 10,
    metric: Annotated[
        str, typer.Option("--metric", help="utilization (claimed/members) or claims_per_second.")
    ] = "utilization",
    target: Annotated[
        float | None,
        typer.Option("--target", help="Percent for utilization (70), claims/s per member (1)."),
    ] = None,
    behavior: Annotated[
        Path | None,
        typer.Option("--behavior", help="A Kubernetes HPA behavior (YAML/JSON file)."),
    ] = None,
    min_available: Annotated[
        str | None, typer.Option("--min-available", help="Disruption budget: a count or N%.")
    ] = None,
    max_unavailable: Annotated[
        str | None, typer.Option("--max-unavailable", help="Disruption budget: a count or N%.")
    ] = None,
    memory: MemoryOpt = "128m",
    cpus: CpusOpt = None,
    pids: PidsOpt = 128,
    timeout: TimeoutOpt = "60s",
    no_warmup: Annotated[
        bool, typer.Option("--no-warmup", help="Do not run `true` in each member first.")
    ] = False,
    sync_period: Annotated[
        str, typer.Option("--sync-period", help="How often the autoscaler runs.")
    ] = "1s",
    as_json: JsonOpt = False,
) -> None:
    """Create a pool; members start at once (a microVM pool boots its template first)."""
    try:
        spec = PoolSpec.build(
            name,
            image,
            tier=tier,
            min_ready=min_ready,
            max_size=max_size,
            metric=metric,
            target=target,
            behavior=_behavior(behavior),
            min_available=_amount(min_available),
            max_unavailable=_amount(max_unavailable),
            warmup=None if no_warmup else ("true",),
            sync_period_s=parse_duration_s(sync_period),
            memory_mib=parse_memory_mib(memory),
            cpus=cpus,
            pids=pids,
            timeout_s=parse_duration_s(timeout),
        )
        st = PoolClient().create(spec)
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(st))
    else:
        print(name)


@pool_app.command("ls")
def pool_ls(as_json: JsonOpt = False) -> None:
    """List pools: ready, claimed, desired, the autoscaler's last reason."""
    try:
        rows = PoolClient().call("ls")
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("name", "tier", "image", "ready", "claimed", "desired", "min/max", "reason")
    for r in rows:
        if "error" in r:
            table.add_row(r["name"], "", "", "", "", "", "", Text(plain(r["error"]), style="red"))
            continue
        d = r.get("decision") or {}
        state = "draining" if r["draining"] else "scaled to zero" if r["scaled_to_zero"] else ""
        table.add_row(
            r["name"],
            r["tier"],
            str(r["image"]),
            str(r["ready"]),
            str(r["claimed"]),
            str(r["desired"]),
            f"{r['min_ready']}/{r['max_size']}",
            state or d.get("reason", ""),
        )
    out.print(table)


@pool_app.command("scale")
def pool_scale(
    name: str,
    min_ready: Annotated[int | None, typer.Option("--min-ready")] = None,
    max_size: Annotated[int | None, typer.Option("--max-size")] = None,
) -> None:
    """Change a pool's bounds (also resumes a drained or scaled-to-zero pool)."""
    try:
        PoolClient().call("scale", name=name, min_ready=min_ready, max_size=max_size)
    except TierboxError as exc:
        fail(exc)
    print(name)


@pool_app.command("drain")
def pool_drain(
    name: str,
    timeout: Annotated[
        str, typer.Option("--timeout", help="Give up after this long (e.g. 60s).")
    ] = "120s",
) -> None:
    """Evict every member within the disruption budget (as kubectl drain);
    waits, saying why, while the budget holds it."""
    try:
        PoolClient().call(
            "drain",
            name=name,
            timeout_s=parse_duration_s(timeout),
            progress=lambda line: err.print(f"waiting: {line}", highlight=False),
        )
    except TierboxError as exc:
        fail(exc)
    print(name)


@pool_app.command("update")
def pool_update(
    name: str,
    image: Annotated[str | None, typer.Option("--image", help="The new image.")] = None,
) -> None:
    """Roll every member onto a new image, within the disruption budget."""
    try:
        PoolClient().call("update", name=name, image=image)
    except TierboxError as exc:
        fail(exc)
    print(name)


@pool_app.command("rm")
def pool_rm(names: Annotated[list[str], typer.Argument(metavar="NAME...")]) -> None:
    """Remove pools: ready members are destroyed, claimed ones finish first."""
    client = PoolClient()
    for name in names:
        try:
            client.call("rm", name=name)
        except TierboxError as exc:
            fail(exc)
        print(name)


def _watch_view(st: dict[str, Any]) -> Group:
    """A pool as ``kubectl describe hpa`` shows an HPA."""
    d = st.get("decision") or {}
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row(
        "Name:", st["name"] + (f"  (function {st['function']})" if st.get("function") else "")
    )
    head.add_row(
        "Tier / image:",
        f"{st['tier']} / {st['image']}  ({st['mode']}, generation {st['generation']})",
    )
    head.add_row(
        "Members:",
        f"{st['ready']} ready, {st['claimed']} claimed, {st['starting']} starting, "
        f"{st['evicting']} evicting; desired {st['desired']} (min_ready {st['min_ready']}, "
        f"max_size {st['max_size']})",
    )
    if st["metric"] == "utilization":
        metric = f"utilization {st['utilization_percent']}% / {st['target']:g}%"
    else:
        metric = f"claims per second {st['claims_per_second']:g} / {st['target']:g} per member"
    head.add_row("Metric:", metric)
    head.add_row("Budget:", st["budget"])
    if d:
        head.add_row(
            "Last decision:",
            f"{d['current_replicas']} -> {d['desired_replicas']}: {d['reason']} ({d['message']})",
        )
    state = "draining" if st["draining"] else "scaled to zero" if st["scaled_to_zero"] else "active"
    head.add_row("State:", state + (f": {st['blocked']}" if st["blocked"] else ""))
    if st.get("last_error"):
        head.add_row("Last error:", Text(st["last_error"], style="red"))
    conds = Table("Type", "Status", "Reason", "Message", title="Conditions", title_justify="left")
    for c in d.get("conditions", []):
        conds.add_row(c["type"], c["status"], c["reason"], c["message"])
    events = Table("Age", "Type", "Reason", "Message", title="Events", title_justify="left")
    now = time.time()
    for e in st.get("events", [])[-8:]:
        events.add_row(f"{now - e['time_unix']:.0f}s", e["type"], e["reason"], e["message"])
    return Group(head, conds, events)


@pool_app.command("watch")
def pool_watch(
    name: str,
    interval: Annotated[str, typer.Option("--interval", help="Refresh period.")] = "1s",
    count: Annotated[
        int | None, typer.Option("--count", help="Stop after this many refreshes.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """A live view of ready/claimed/desired and the autoscaler's last
    decision with its conditions (JSON lines with --json)."""
    client = PoolClient(start=False)
    try:
        period = parse_duration_s(interval)
        n = 0
        if as_json:
            while count is None or n < count:
                print(json.dumps(client.call("status", name=name)), flush=True)
                n += 1
                if count is None or n < count:
                    time.sleep(period)
            return
        with Live(
            _watch_view(client.call("status", name=name)), console=out, auto_refresh=False
        ) as live:
            n = 1
            while count is None or n < count:
                time.sleep(period)
                live.update(_watch_view(client.call("status", name=name)), refresh=True)
                n += 1
    except TierboxError as exc:
        fail(exc)
    except KeyboardInterrupt:
        return


# ---- fn ---------------------------------------------------------------------------------
@fn_app.command("deploy")
def fn_deploy(
    name: Annotated[str, typer.Argument(help="The function's name.")],
    command: Annotated[list[str], typer.Argument(help="The command, after --; data on its stdin.")],
    image: Annotated[str, typer.Option("--image", help="Image it runs in.")],
    tier: TierOpt = DEFAULT_TIER,
    idle: Annotated[
        str, typer.Option("--idle", help="Scale to zero after this long without a call.")
    ] = "5m",
    min_ready: MinReadyOpt = 1,
    max_size: MaxSizeOpt = 4,
    memory: MemoryOpt = "128m",
    cpus: CpusOpt = None,
    pids: PidsOpt = 128,
    timeout: TimeoutOpt = "60s",
    as_json: JsonOpt = False,
) -> None:
    """Deploy (or redeploy) a function: COMMAND run on a pooled sandbox per call."""
    try:
        fn = FunctionSpec(
            name=name,
            argv=tuple(workload_argv(command)),
            idle_s=parse_duration_s(idle),
            timeout_s=parse_duration_s(timeout),
        )
        st = PoolClient().deploy(
            fn,
            image,
            tier,
            min_ready=min_ready,
            max_size=max_size,
            memory_mib=parse_memory_mib(memory),
            cpus=cpus,
            pids=pids,
            timeout_s=parse_duration_s(timeout),
        )
    except TierboxError as exc:
        fail(exc)
    print(json.dumps(st) if as_json else name)


def _data(text: str | None) -> bytes | None:
    """``--data TEXT``, ``--data @FILE`` or ``--data @-`` (stdin)."""
    if text is None:
        return None
    if text == "@-":
        return sys.stdin.buffer.read()
    if text.startswith("@"):
        try:
            return Path(text[1:]).read_bytes()
        except OSError as exc:
            raise UsageError(f"--data {text}: {exc.strerror}") from exc
    return text.encode()


@fn_app.command("invoke")
def fn_invoke(
    name: str,
    data: Annotated[
        str | None,
        typer.Option("--data", "-d", help="The call's stdin: TEXT, @FILE or @- for stdin."),
    ] = None,
    timeout: Annotated[
        str | None, typer.Option("--timeout", help="Wall-clock limit for this call.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Call a function; prints its output, says whether the start was warm
    or cold, and exits with its status."""
    try:
        payload = _data(data)
        inv = PoolClient().call(
            "fn_invoke",
            name=name,
            data_b64=base64.b64encode(payload).decode() if payload is not None else None,
            timeout_s=parse_duration_s(timeout) if timeout else None,
        )
    except TierboxError as exc:
        fail(exc)
    r = inv["result"]
    t = r["termination"]
    result = ExecResult(
        stdout=base64.b64decode(r["stdout_b64"]),
        stderr=base64.b64decode(r["stderr_b64"]),
        termination=Termination(
            TerminationKind(t["kind"]),
            exit_code=t.get("exit_code"),
            signal=t.get("signal"),
            evidence=t.get("evidence") or {},
        ),
        duration_s=float(r["duration_s"]),
        stdout_truncated=bool(r["stdout_truncated"]),
        stderr_truncated=bool(r["stderr_truncated"]),
    )
    if as_json:
        for key in ("stdout_b64", "stderr_b64"):
            r.pop(key, None)
        print(json.dumps(inv))
        raise typer.Exit(result.exit_code)
    err.print(
        f"tierbox: {inv['start']} start (claim {inv['claim_s'] * 1000:.0f} ms, "
        f"run {inv['run_s'] * 1000:.0f} ms, sandbox {inv['sandbox_id']})",
        highlight=False,
    )
    emit_result(result, False)


@fn_app.command("ls")
def fn_ls(as_json: JsonOpt = False) -> None:
    """List functions and whether their pool is warm."""
    try:
        rows = PoolClient().call("fn_ls")
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("name", "tier", "image", "command", "ready", "idle for", "state")
    for r in rows:
        table.add_row(
            r["name"],
            str(r.get("tier", "")),
            str(r.get("image", "")),
            " ".join(r["argv"]),
            str(r.get("ready", "")),
            f"{r['idle_for_s']:.0f}s",
            "scaled to zero" if r.get("scaled_to_zero") else r.get("error", "warm"),
        )
    out.print(table)


@fn_app.command("rm")
def fn_rm(names: Annotated[list[str], typer.Argument(metavar="NAME...")]) -> None:
    """Remove functions and their pools."""
    client = PoolClient()
    for name in names:
        try:
            client.call("fn_rm", name=name)
        except TierboxError as exc:
            fail(exc)
        print(name)


# ---- autoscale --------------------------------------------------------------------------
@autoscale_app.command("simulate")
def autoscale_simulate(
    file: Annotated[
        Path, typer.Argument(help="YAML or JSON: {hpa: <HorizontalPodAutoscaler>, steps: [...]}")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Replay an HPA (autoscaling/v2, as kubectl takes it) against a load
    curve: one line per step with the desired replicas and the reason."""
    from tierbox.autoscale import simulate

    try:
        decisions = simulate.run(simulate.load(file))
    except TierboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps([simulate.result_dict(d) for d in decisions], indent=1))
        return
    for d in decisions:
        print(simulate.line(d))
