"""CLI commands ``tierbox kube export|advise|apply`` and ``tierbox doctor``.
:func:`register` adds them to the main app."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from tierbox.cli_common import JsonOpt, err, fail, resolve_tier
from tierbox.errors import ManifestError, TierboxError, UsageError
from tierbox.spec import parse_memory_mib

kube_app = typer.Typer(
    help="Kubernetes: export a workload as manifests, advise on manifests, apply them.",
    no_args_is_help=True,
)


def _say(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def _handlers(pairs: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        tier, sep, handler = pair.partition("=")
        if not sep or not handler:
            raise UsageError(f"bad --handler {pair!r}: use TIER=HANDLER, like gvisor=runsc")
        out[resolve_tier(tier)] = handler
    return out


@kube_app.command("export", context_settings={"allow_interspersed_args": False})
def kube_export(
    command: Annotated[
        list[str] | None, typer.Argument(help="The container's command, after --.")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="The workload's name.")] = None,
    image: Annotated[str | None, typer.Option("--image", help="Its container image.")] = None,
    tier: Annotated[str | None, typer.Option("--tier", "-t", help="The tier it runs on.")] = None,
    replicas: Annotated[int | None, typer.Option("--replicas", min=1)] = None,
    max_replicas: Annotated[
        int | None, typer.Option("--max-replicas", min=1, help="HPA maximum (default 3x).")
    ] = None,
    memory: Annotated[str | None, typer.Option("--memory", "-m", help="e.g. 256m.")] = None,
    cpus: Annotated[float | None, typer.Option("--cpus", help="CPU request, e.g. 0.5.")] = None,
    disk: Annotated[str | None, typer.Option("--disk", help="ephemeral-storage, e.g. 1g.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="The port it serves.")] = None,
    no_port: Annotated[bool, typer.Option("--no-port", help="It serves no port.")] = False,
    target_cpu: Annotated[
        int | None, typer.Option("--target-cpu", help="HPA CPU utilization target, percent.")
    ] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", "-n")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", metavar="KEY=VALUE")] = None,
    snapshot: Annotated[
        list[str] | None,
        typer.Option("--snapshot", help="vm tier: a VirtualMachineSnapshot of this name."),
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="A workload file (YAML).")
    ] = None,
    sandbox: Annotated[
        str | None, typer.Option("--sandbox", help="Export a live sandbox's spec.")
    ] = None,
    pool: Annotated[str | None, typer.Option("--pool", help="Export a warm pool.")] = None,
    handler: Annotated[
        list[str] | None,
        typer.Option("--handler", metavar="TIER=HANDLER", help="RuntimeClass handler names."),
    ] = None,
    bench: Annotated[
        Path | None,
        typer.Option("--bench", help="tierbox bench results.json (or its directory)."),
    ] = None,
    runtime_classes: Annotated[
        bool, typer.Option("--runtime-classes", help="Only a RuntimeClass for every tier.")
    ] = False,
    no_history: Annotated[
        bool, typer.Option("--no-history", help="Size from the limits, not the run history.")
    ] = False,
) -> None:
    """Print the workload as one multi-document YAML: RuntimeClass, Deployment,
    Service, HPA, PDB (or a KubeVirt VirtualMachine for the vm tier)."""
    from tierbox.kube import export as ex
    from tierbox.kube import workloads

    try:
        handlers = _handlers(handler)
        overheads = ex.load_overheads(ex.bench_results_path(bench))
        if runtime_classes:
            _say(ex.to_yaml(ex.runtime_classes(handlers, overheads)))
            return
        sources = [s for s in (file, sandbox, pool) if s is not None]
        if len(sources) > 1:
            raise UsageError("give one of --file, --sandbox and --pool")
        if file is not None:
            w, file_handlers = workloads.from_file(file)
            handlers = {**file_handlers, **handlers}
        elif sandbox is not None:
            w = workloads.from_sandbox(sandbox, image=image)
        elif pool is not None:
            w = workloads.from_pool(pool, image=image)
        else:
            if not name or not image:
                raise UsageError(
                    "give --name and --image (or --file, --sandbox or --pool); "
                    "e.g. tierbox kube export --name web --image web:1.0 --tier gvisor"
                )
            w = ex.Workload(name=name, image=image)
        env_map: dict[str, str] = {}
        for pair in env or []:
            k, sep, v = pair.partition("=")
            if not sep:
                raise UsageError(f"bad --env {pair!r}: use KEY=VALUE")
            env_map[k] = v
        w = ex.with_changes(
            w,
            name=name if (file or sandbox or pool) else None,
            tier=resolve_tier(tier) if tier else None,
            replicas=replicas,
            max_replicas=max_replicas,
            memory_mib=parse_memory_mib(memory) if memory else None,
            cpus=cpus,
            disk_mib=parse_memory_mib(disk) if disk else None,
            port=port,
            target_cpu=target_cpu,
            namespace=namespace,
            command=tuple(command) if command else None,
            env={**w.env, **env_map} if env_map else None,
            snapshots=tuple(snapshot) if snapshot else None,
        )
        if no_port:
            w = dataclasses.replace(w, port=None)
        docs = ex.documents(w, handlers=handlers, overheads=overheads, use_history=not no_history)
    except TierboxError as exc:
        fail(exc)
    _say(ex.to_yaml(docs))


@kube_app.command("advise")
def kube_advise(
    file: Annotated[str, typer.Argument(help="Manifests (YAML or JSON); - for stdin.")],
    fmt: Annotated[str, typer.Option("--format", help="text, json or sarif.")] = "text",
    fail_on: Annotated[
        str,
        typer.Option(
            "--fail-on", help="Exit 1 at this level or above: error, warning, note, none."
        ),
    ] = "none",
) -> None:
    """Check Deployments, StatefulSets, HPAs and PDBs: resources, autoscaling,
    disruption budgets, probes, images, security."""
    from tierbox.kube import advise as adv

    try:
        if fmt not in ("text", "json", "sarif"):
            raise UsageError(f"--format {fmt!r}: use text, json or sarif")
        levels = {"error": 3, "warning": 2, "note": 1, "none": 99}
        if fail_on not in levels:
            raise UsageError(f"--fail-on {fail_on!r}: use error, warning, note or none")
        try:
            text = sys.stdin.read() if file == "-" else Path(file).read_text()
        except OSError as exc:
            raise ManifestError(f"{file}: {exc.strerror}") from exc
        findings = adv.advise(adv.load(text, file), file)
    except TierboxError as exc:
        fail(exc)
    if fmt == "json":
        _say(adv.render_json(findings))
    elif fmt == "sarif":
        _say(adv.render_sarif(findings, _version()))
    else:
        _say(adv.render_text(findings))
    worst = max((levels[f.level] for f in findings), default=0)
    if worst >= levels[fail_on]:
        raise typer.Exit(1)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tierbox")
    except PackageNotFoundError:
        return ""


@kube_app.command("apply")
def kube_apply(
    file: Annotated[
        str | None, typer.Argument(help="Manifests (YAML or JSON); - for stdin.")
    ] = None,
    from_pool: Annotated[
        str | None, typer.Option("--from-pool", help="Export this warm pool and apply it.")
    ] = None,
    dry_run: Annotated[
        str | None, typer.Option("--dry-run", help="server (validated, not stored) or client.")
    ] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", "-n")] = None,
    kubeconfig: Annotated[str | None, typer.Option("--kubeconfig")] = None,
    context: Annotated[str | None, typer.Option("--context")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Server-side apply (field manager tierbox) with the official client and
    your kubeconfig."""
    from tierbox.kube import apply as ap
    from tierbox.kube import export as ex
    from tierbox.kube import workloads

    try:
        if (file is None) == (from_pool is None):
            raise UsageError("give a FILE or --from-pool POOL")
        if from_pool is not None:
            w = workloads.from_pool(from_pool)
            overheads = ex.load_overheads(ex.bench_results_path(None))
            objects = [d.obj for d in ex.documents(w, overheads=overheads)]
        else:
            assert file is not None
            try:
                text = sys.stdin.read() if file == "-" else Path(file).read_text()
            except OSError as exc:
                raise ManifestError(f"{file}: {exc.strerror}") from exc
            try:
                objects = [d for d in yaml.safe_load_all(text) if d]
            except yaml.YAMLError as exc:
                raise ManifestError(f"{file}: not YAML: {exc}") from exc
            objects = _unrolled(objects, file)
        api = None if dry_run == "client" else ap.client(kubeconfig, context)
        done = ap.apply(objects, api_client=api, namespace=namespace, dry_run=dry_run)
    except TierboxError as exc:
        fail(exc)
    if as_json:
        _say(json.dumps([a.to_dict() for a in done], indent=1))
        return
    for a in done:
        where = f" -n {a.namespace}" if a.namespace else ""
        _say(f"{a.kind.lower()}/{a.name}{where} {a.result}")


def _unrolled(objects: list[Any], where: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for o in objects:
        if not isinstance(o, dict):
            raise ManifestError(f"{where}: a document that is not an object")
        if str(o.get("kind", "")).endswith("List") and isinstance(o.get("items"), list):
            out += o["items"]
        else:
            out.append(o)
    return out


def doctor(
    target: Annotated[
        str | None,
        typer.Argument(
            metavar="SANDBOX|RUN_ID|FILE",
            help="A sandbox or run id, a pod (kubectl get pod -o json|yaml), docker/podman "
            "inspect output, a cgroup directory, or - for stdin.",
        ),
    ] = None,
    last: Annotated[
        bool, typer.Option("--last", help="The newest run or sandbox command of this user.")
    ] = False,
    events: Annotated[
        str | None, typer.Option("--events", help="kubectl get events -o json, for a pod.")
    ] = None,
    as_json: JsonOpt = False,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain", help="Ask the chat endpoint in TIERBOX_LLM_URL to explain (redacted)."
        ),
    ] = False,
    print_prompt: Annotated[
        bool, typer.Option("--print-prompt", help="Print what --explain would send; send nothing.")
    ] = False,
) -> None:
    """Why a workload ended badly: the cause, the facts, and what to change."""
    from tierbox import doctor as doc
    from tierbox.doctor import explain as ex

    try:
        if last == (target is not None):
            raise UsageError("give a SANDBOX, RUN_ID or FILE, or --last")
        diagnoses, raw = doc.last() if last else doc.diagnose(str(target), events=events)
    except TierboxError as exc:
        fail(exc)
    if print_prompt:
        bodies = [ex.request_body(d, raw) for d in diagnoses]
        _say(json.dumps(bodies[0] if len(bodies) == 1 else bodies, indent=1))
        return
    explanations: list[str | None] = [None] * len(diagnoses)
    if explain:
        url = ex.endpoint()
        if url is None:
            err.print(
                f"tierbox: --explain: {ex.URL_ENV} is not set; doctor's own findings follow",
                highlight=False,
            )
        else:
            for i, d in enumerate(diagnoses):
                try:
                    explanations[i] = ex.explain(ex.request_body(d, raw), url)
                except TierboxError as exc:
                    err.print(f"tierbox: --explain: {exc}", highlight=False, markup=False)
    if as_json:
        items = []
        for d, text in zip(diagnoses, explanations, strict=True):
            item = d.to_dict()
            if text is not None:
                item["explanation"] = text
            items.append(item)
        _say(json.dumps(items[0] if len(items) == 1 else items, indent=1, default=str))
    else:
        blocks = []
        for d, text in zip(diagnoses, explanations, strict=True):
            block = d.render()
            if text is not None:
                block += "\nexplanation:\n" + "\n".join(f"  {line}" for line in text.splitlines())
            blocks.append(block)
        _say("\n\n".join(blocks))


def register(app: typer.Typer) -> None:
    """Add ``tierbox kube ...`` and ``tierbox doctor`` to the main app."""
    app.add_typer(kube_app, name="kube")
    app.command(help="Why a workload ended badly (OOM, leak, spike, throttling, crash loops...).")(
        doctor
    )
