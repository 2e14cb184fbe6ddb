"""tierbox kube export|advise|apply.

Exported manifests are validated strictly (unknown fields refused) with
kubernetes-validate against Kubernetes 1.28 and every newer version it ships,
and KubeVirt objects against KubeVirt's own CRD schemas (vendored under
tests/data/kube/kubevirt, see its README). Apply runs the official client
against kmock, an in-process fake API server: no real API server can run on
these machines, so server-side validation, defaulting, field ownership and
admission are NOT exercised here; what is tested is the client path
(discovery, server-side apply requests, field manager, dry run, errors).
"""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kmock
import kubernetes_validate
import pytest
import yaml
from kmock._internal import enums
from kubernetes import client as k8s_client
from kubernetes_validate import utils as kv_utils

from tierbox.errors import KubeApplyError, ManifestError
from tierbox.kube import advise as adv
from tierbox.kube import apply as ap
from tierbox.kube import export as ex
from tierbox.kube import workloads

DATA = Path(__file__).parent / "data" / "kube"
KUBEVIRT = DATA / "kubevirt"
SARIF_SCHEMA = Path(__file__).parent / "data" / "build" / "sarif-schema-2.1.0.json"
TIERBOX = [sys.executable, "-m", "tierbox.cli"]


def k8s_versions() -> list[str]:
    """1.28 and every newer version kubernetes-validate ships schemas for."""
    found = sorted(
        {v for v in kv_utils.all_versions() if tuple(map(int, v.split(".")[:2])) >= (1, 28)},
        key=lambda v: tuple(map(int, v.split("."))),
    )
    assert found and found[0].startswith("1.28"), found
    return found


def _strict(schema: Any) -> Any:
    """A CRD's structural schema made strict as kubectl --validate=strict is:
    objects with properties refuse unknown fields unless the schema keeps them."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    return out


KUBEVIRT_SCHEMAS = {
    "VirtualMachine": _strict(json.loads((KUBEVIRT / "virtualmachine.json").read_text())),
    "VirtualMachineSnapshot": _strict(
        json.loads((KUBEVIRT / "virtualmachinesnapshot.json").read_text())
    ),
}
KUBEVIRT_VERSIONS = {
    "VirtualMachine": "kubevirt.io/v1",
    "VirtualMachineSnapshot": "snapshot.kubevirt.io/v1beta1",
}


def validate(obj: dict[str, Any]) -> None:
    """Strict validation of one exported object."""
    kind = obj["kind"]
    if kind in KUBEVIRT_SCHEMAS:
        assert obj["apiVersion"] == KUBEVIRT_VERSIONS[kind]
        jsonschema.validate(obj, KUBEVIRT_SCHEMAS[kind])
        # metadata is ObjectMeta, which the CRD leaves open: check it as Kubernetes does
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
        kubernetes_validate.validate(meta, k8s_versions()[-1], strict=True)
        return
    for version in k8s_versions():
        kubernetes_validate.validate(obj, version, strict=True)


def export(w: ex.Workload, **kw: Any) -> list[dict[str, Any]]:
    text = ex.to_yaml(ex.documents(w, use_history=False, **kw))
    return [d for d in yaml.safe_load_all(text) if d]


def test_strict_validation_refuses_unknown_fields() -> None:
    """The checks below mean something: an unknown field fails both validators."""
    objs = export(ex.Workload("web", "web:1.0", tier="gvisor"))
    dep = copy.deepcopy(next(o for o in objs if o["kind"] == "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["memoryLimit"] = "1Gi"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, "1.28.0", strict=True)
    vm = export(ex.Workload("vm1", "disk:1", tier="vm"))[0]
    vm["spec"]["template"]["spec"]["domain"]["ram"] = "1Gi"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(vm, KUBEVIRT_SCHEMAS["VirtualMachine"])


@pytest.mark.parametrize("tier", ex.TIERS)
def test_export_validates_strictly_for_every_tier(tier: str) -> None:
    w = ex.Workload(
        "web",
        "registry.example/web:1.2",
        tier=tier,
        replicas=3,
        memory_mib=256,
        cpus=0.5,
        command=("serve", "--port", "8080"),
        env={"LOG_LEVEL": "info", "DB_PASSWORD": "hunter2"},
        namespace="prod",
        snapshots=("before-update",),
    )
    objs = export(w)
    kinds = [o["kind"] for o in objs]
    if tier == "vm":
        assert kinds == ["VirtualMachine", "VirtualMachineSnapshot", "Service"]
        vm = objs[0]
        assert vm["spec"]["template"]["spec"]["domain"]["memory"]["guest"] == "256Mi"
        assert objs[1]["spec"]["source"] == {
            "apiGroup": "kubevirt.io",
            "kind": "VirtualMachine",
            "name": "web",
        }
    else:
        assert kinds == [
            "RuntimeClass",
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
        ]
        rc, dep = objs[0], objs[1]
        assert rc["handler"] == ex.DEFAULT_HANDLERS[tier]
        pod = dep["spec"]["template"]["spec"]
        assert pod["runtimeClassName"] == rc["metadata"]["name"] == f"tierbox-{tier}"
        c = pod["containers"][0]
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"] == "256Mi"
        assert c["resources"]["requests"]["cpu"] == "500m" and "cpu" not in c["resources"]["limits"]
        assert {"name": "LOG_LEVEL", "value": "info"} in c["env"]
        # a secret-looking variable comes from a Secret, never as a literal in the manifest
        assert "hunter2" not in json.dumps(objs)
        hpa = objs[3]["spec"]
        assert hpa["minReplicas"] == 3 and hpa["maxReplicas"] == 9 and "behavior" in hpa
        assert objs[4]["spec"]["maxUnavailable"] == 1
    for obj in objs:
        validate(obj)


def test_exports_pass_their_own_advice() -> None:
    """What export writes is what advise calls good: the advisor stays quiet."""
    for tier in ex.RUNTIME_TIERS:
        text = ex.to_yaml(ex.documents(ex.Workload("web", "web:1.0", tier=tier), use_history=False))
        assert adv.advise(adv.load(text)) == [], tier


def test_runtime_class_overhead_from_bench_results(tmp_path: Path) -> None:
    results = {
        "schema": "tierbox-bench/1",
        "finished_at": "2026-12-01T12:00:00Z",
        "machine": {"hostname": "bench-host"},
        "tiers": {
            "gvisor": {"memory": {"idle_pss_bytes": 15.2 * (1 << 20)}},
            "microvm": {"memory": {"idle_pss_bytes": 33 * (1 << 20)}},
            "wasm": {"memory": {"status": "skipped"}},
        },
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    overheads = ex.load_overheads(ex.bench_results_path(tmp_path))
    docs = ex.runtime_classes(overheads=overheads, handlers={"microvm": "kata-fc"})
    by_tier = {d.obj["metadata"]["name"]: d for d in docs}
    gv = by_tier["tierbox-gvisor"]
    assert gv.obj["overhead"] == {"podFixed": {"memory": "16Mi"}}
    assert any("measured" in line and "bench-host" in line for line in gv.comment)
    assert by_tier["tierbox-microvm"].obj["handler"] == "kata-fc"
    assert "overhead" not in by_tier["tierbox-wasm"].obj
    text = ex.to_yaml(docs)
    assert "# overhead.podFixed.memory 16Mi: measured" in text
    for d in docs:
        validate(d.obj)
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ManifestError):
        ex.load_overheads(tmp_path / "bad.json")


def test_the_newest_bench_run_is_found_without_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tierbox bench`` writes each run under ``latest/``: export finds it."""
    monkeypatch.delenv("TIERBOX_BENCH_RESULTS", raising=False)
    monkeypatch.setenv("TIERBOX_BENCH_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert ex.bench_results_path() is None
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "results.json").write_text("{}")
    assert ex.bench_results_path() == tmp_path / "latest" / "results.json"


def test_sizing_from_the_run_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests and limits follow the measured peak (+25 %) when runs of the
    image on the tier are in the history."""
    from tierbox import history

    monkeypatch.setenv("TIERBOX_HOME", str(tmp_path))
    for peak_mib in (40, 80):
        history.write_record(
            {
                "format": history.FORMAT,
                "run_id": f"r{peak_mib}",
                "started_ns": peak_mib,
                "tier": "container",
                "image": "web:1.0",
                "termination": {"kind": "exited", "exit_code": 0},
                "samples": {
                    "t_s": [0.1, 1.1],
                    "memory_bytes": [10 << 20, peak_mib << 20],
                    "cpu_s": [0.0, 0.5],
                },
            }
        )
    size = ex.sizing(ex.Workload("web", "web:1.0", tier="container"))
    assert size.memory_mib == 100 and size.cpu_milli == 600
    assert "2 run(s)" in size.note
    text = ex.to_yaml(ex.documents(ex.Workload("web", "web:1.0", tier="container")))
    assert "memory: 100Mi" in text and "peak 80.0 MiB" in text
    other = ex.sizing(ex.Workload("web", "web:1.0", tier="gvisor", memory_mib=64))
    assert other.memory_mib == 64 and "no run history" in other.note


def test_workload_file_and_cli(tmp_path: Path) -> None:
    f = tmp_path / "web.yaml"
    f.write_text(
        "name: web\nimage: web:2.0\ntier: microvm\nreplicas: 2\nmemory: 512m\ncpus: 1\n"
        "port: 9000\ncommand: [serve]\nhandlers: {microvm: kata-clh}\n"
    )
    w, handlers = workloads.from_file(f)
    assert (w.tier, w.memory_mib, w.port, handlers) == (
        "microvm",
        512,
        9000,
        {"microvm": "kata-clh"},
    )
    out = subprocess.run(
        [*TIERBOX, "kube", "export", "-f", str(f), "--no-history"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    objs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert objs[0]["handler"] == "kata-clh"
    for obj in objs:
        validate(obj)
    # the issue's example, flags only
    out = subprocess.run(
        [
            *TIERBOX,
            "kube",
            "export",
            "--name",
            "web",
            "--image",
            "web:1.0",
            "--tier",
            "gvisor",
            "--replicas",
            "3",
            "--memory",
            "256m",
            "--cpus",
            "0.5",
            "--target-cpu",
            "70",
            "--no-history",
            "--",
            "python3",
            "-m",
            "http.server",
            "8080",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    objs = [d for d in yaml.safe_load_all(out.stdout) if d]
    dep = next(o for o in objs if o["kind"] == "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["command"][-1] == "8080"
    hpa = next(o for o in objs if o["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 70
    bad = subprocess.run(
        [*TIERBOX, "kube", "export", "--name", "Web_1", "--image", "x"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Kubernetes names" in bad.stderr
    (tmp_path / "typo.yaml").write_text("name: web\nimage: x\nreplica: 3\n")
    with pytest.raises(ManifestError, match="replica"):
        workloads.from_file(tmp_path / "typo.yaml")


def test_export_from_a_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool's saved spec (its store record, as the pool host writes it)."""
    from tierbox.pools import PoolSpec, store

    monkeypatch.setenv("TIERBOX_POOLS", str(tmp_path))
    spec = PoolSpec.build(
        "api",
        "web:3.1",
        tier="gvisor",
        min_ready=2,
        max_size=8,
        target=60,
        memory_mib=128,
        max_unavailable="25%",
        behavior={"scaleDown": {"stabilizationWindowSeconds": 60}},
    )
    store.write(store.pool_file("api"), {"spec": spec.to_dict()})
    w = workloads.from_pool("api")
    assert (w.replicas, w.max_replicas, w.target_cpu, w.max_unavailable) == (2, 8, 60, "25%")
    objs = export(w)
    hpa = next(o for o in objs if o["kind"] == "HorizontalPodAutoscaler")["spec"]
    assert hpa["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 60}}
    assert (
        next(o for o in objs if o["kind"] == "PodDisruptionBudget")["spec"]["maxUnavailable"]
        == "25%"
    )
    for obj in objs:
        validate(obj)
    from tierbox.errors import PoolNotFoundError

    with pytest.raises(PoolNotFoundError):
        workloads.from_pool("nope")


def test_export_from_a_sandbox() -> None:
    from tests.conftest import require_tier
    from tierbox import Sandbox

    require_tier("container")
    with Sandbox.create(
        "busybox", tier="container", memory_mib=96, cpus=0.5, name="kube-exp"
    ) as sb:
        w = workloads.from_sandbox("kube-exp")
        assert (w.name, w.tier, w.memory_mib, w.cpus) == ("kube-exp", "container", 96, 0.5)
        assert w.image.startswith("busybox") and sb.id in w.origin
    for obj in export(w):
        validate(obj)


# ---- advise ---------------------------------------------------------------------------------


BAD = DATA / "advise-bad.yaml"
GOOD = DATA / "advise-good.yaml"


def test_advisor_fires_every_rule_on_a_manifest_that_breaks_it() -> None:
    findings = adv.advise(adv.load(BAD.read_text(), str(BAD)), str(BAD))
    fired = {f.rule for f in findings}
    assert fired == set(adv.RULES), sorted(set(adv.RULES) - fired)
    for f in findings:
        assert f.obj and f.path and f.why and f.fix and f.line > 0, f
    by = {(f.rule, f.obj): f for f in findings}
    cpu = by[("TBK004", "Deployment/api")]
    assert cpu.path == "spec.template.spec.containers[0].resources.limits.cpu"
    assert cpu.fix["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": None
    }
    assert BAD.read_text().splitlines()[cpu.line - 1].strip().startswith("cpu:")
    pdb = by[("TBK008", "PodDisruptionBudget/api")]
    assert pdb.path == "spec.minAvailable"
    assert by[("TBK006", "HorizontalPodAutoscaler/worker")].path == "spec.minReplicas"
    assert by[("TBK007", "HorizontalPodAutoscaler/worker")].path == "spec.metrics[0]"


def test_advisor_is_quiet_on_a_good_manifest() -> None:
    assert adv.advise(adv.load(GOOD.read_text())) == []


def test_advise_formats_and_exit_status(tmp_path: Path) -> None:
    out = subprocess.run(
        [*TIERBOX, "kube", "advise", str(BAD), "--format", "sarif"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    log = json.loads(out.stdout)
    jsonschema.validate(log, json.loads(SARIF_SCHEMA.read_text()))
    results = log["runs"][0]["results"]
    assert {r["ruleId"] for r in results} == set(adv.RULES)
    assert all(r["locations"][0]["physicalLocation"]["region"]["startLine"] > 0 for r in results)
    js = subprocess.run(
        [*TIERBOX, "kube", "advise", str(BAD), "--format", "json", "--fail-on", "error"],
        capture_output=True,
        text=True,
    )
    assert js.returncode == 1
    assert {f["rule"] for f in json.loads(js.stdout)} == set(adv.RULES)
    text = subprocess.run(
        [*TIERBOX, "kube", "advise", str(GOOD), "--fail-on", "note"], capture_output=True, text=True
    )
    assert text.returncode == 0 and "no findings" in text.stdout
    (tmp_path / "x.yaml").write_text("a: [\n")
    broken = subprocess.run(
        [*TIERBOX, "kube", "advise", str(tmp_path / "x.yaml")], capture_output=True, text=True
    )
    assert broken.returncode == 2 and "not YAML" in broken.stderr


# ---- apply --------------------------------------------------------------------------------------


RESOURCES = [
    ("node.k8s.io/v1/runtimeclasses", "RuntimeClass", False),
    ("apps/v1/deployments", "Deployment", True),
    ("v1/services", "Service", True),
    ("autoscaling/v2/horizontalpodautoscalers", "HorizontalPodAutoscaler", True),
    ("policy/v1/poddisruptionbudgets", "PodDisruptionBudget", True),
    ("kubevirt.io/v1/virtualmachines", "VirtualMachine", True),
    ("snapshot.kubevirt.io/v1beta1/virtualmachinesnapshots", "VirtualMachineSnapshot", True),
]


class ApplyingEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """kmock's emulator stores objects a PATCH names only when they exist;
    server-side apply also creates them. Nothing else of apply (field
    ownership, defaulting, validation) is emulated."""

    async def _handle(self, request: Any) -> Any:
        if request.action == enums.action.UPDATE and request.name is not None:
            key = (request.resource, request.namespace, request.name)
            if key not in self._objects or self._objects[key].deleted:
                async with self._lock:
                    self._objects[key] = request.data
        return await super()._handle(request)


@pytest.fixture
def fake_api() -> Iterator[tuple[Any, Any]]:
    """(kmock handler, an ApiClient of the official client pointed at it)."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        async with ApplyingEmulator() as k, kmock.Server(k) as srv:
            for key, kind, namespaced in RESOURCES:
                k.resources[key] = kmock.ResourceInfo(
                    kind=kind, namespaced=namespaced, verbs={"get", "list", "create", "patch"}
                )
            box.update(url=str(srv.url).rstrip("/"), k=k, stop=asyncio.Event())
            ready.set()
            await box["stop"].wait()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    assert ready.wait(20), "kmock did not start"
    cfg = k8s_client.Configuration()
    cfg.host = box["url"]
    api = k8s_client.ApiClient(cfg)
    try:
        yield box["k"], api
    finally:
        api.close()
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join(10)


def test_apply_against_the_fake_api_server(fake_api: tuple[Any, Any], tmp_path: Path) -> None:
    """Server-side apply through the official client: one apply-patch PATCH
    per object, field manager tierbox, force; server-side validation is not
    exercised (kmock does not validate)."""
    k, api = fake_api
    objs = [
        d.obj for d in ex.documents(ex.Workload("web", "web:1.0", tier="gvisor"), use_history=False)
    ]
    objs += [
        d.obj
        for d in ex.documents(
            ex.Workload("vm1", "disk:1", tier="vm", snapshots=("s1",)), use_history=False
        )
    ]
    done = ap.apply(objs, api_client=api, namespace="demo")
    assert [(a.kind, a.namespace, a.result) for a in done][:2] == [
        ("RuntimeClass", None, "applied"),
        ("Deployment", "demo", "applied"),
    ]
    patches = [r for r in k if r.method == enums.method.PATCH]
    assert len(patches) == len(objs)
    for r in patches:
        assert r.headers["Content-Type"] == "application/apply-patch+yaml"
        assert dict(r.params) == {"fieldManager": "tierbox", "force": "true"}
    stored = {key[2]: obj.raw for key, obj in k.objects.items()}
    assert stored["web"]["kind"] in (
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    )
    assert any(o.raw["kind"] == "VirtualMachine" for o in k.objects.values())
    dep = next(o.raw for key, o in k.objects.items() if key[0].plural == "deployments")
    assert dep["metadata"]["namespace"] == "demo"
    assert dep["spec"]["template"]["spec"]["runtimeClassName"] == "tierbox-gvisor"
    # a server dry run is asked for with dryRun=All
    ap.apply(objs[:1], api_client=api, dry_run="server")
    last = [r for r in k if r.method == enums.method.PATCH][-1]
    assert dict(last.params)["dryRun"] == "All"
    # a client dry run sends nothing
    before = len(k)
    assert {a.result for a in ap.apply(objs, dry_run="client")} == {"would apply (client dry run)"}
    assert len(k) == before
    # a kind the server does not serve is named
    with pytest.raises(KubeApplyError, match="does not serve Widget"):
        ap.apply(
            [{"apiVersion": "x.io/v1", "kind": "Widget", "metadata": {"name": "w"}}], api_client=api
        )


def test_apply_cli_uses_the_kubeconfig(fake_api: tuple[Any, Any], tmp_path: Path) -> None:
    k, api = fake_api
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": api.configuration.host}}],
                "users": [{"name": "me", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
                "current-context": "fake",
            }
        )
    )
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        ex.to_yaml(ex.documents(ex.Workload("web", "web:1.0", tier="wasm"), use_history=False))
    )
    out = subprocess.run(
        [
            *TIERBOX,
            "kube",
            "apply",
            str(manifest),
            "--kubeconfig",
            str(kubeconfig),
            "-n",
            "apps",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert [a["kind"] for a in json.loads(out.stdout)] == [
        "RuntimeClass",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    ]
    patch = [r for r in k if r.method == enums.method.PATCH][-1]
    assert patch.headers["Authorization"] == "Bearer t0ken"
    nothing = subprocess.run(
        [*TIERBOX, "kube", "apply", str(manifest), "--kubeconfig", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert nothing.returncode != 0 and "kubeconfig" in nothing.stderr
    with pytest.raises(ManifestError):
        ap.apply([{"kind": "Deployment"}], dry_run="client")
