"""``tierbox kube advise``: what to fix in Deployments, StatefulSets, HPAs
and PDBs before they meet production (resources, autoscaling, disruption
budgets, probes, images, security). Each finding names its rule, the
object, the field path, why it matters and a fix as a strategic merge patch
(``kubectl patch KIND NAME --patch-file fix.yaml``); formats: text, JSON,
SARIF 2.1.0 (with the line of the field in the file)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from tierbox.build.sarif import SarifResult, SarifRule, sarif_log
from tierbox.errors import ManifestError

WORKLOAD_KINDS = ("Deployment", "StatefulSet")


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    level: str  # error | warning | note
    short: str


RULES = {
    r.id: r
    for r in (
        Rule("TBK001", "no-requests", "warning", "a container has no CPU or memory request"),
        Rule("TBK002", "no-memory-limit", "warning", "a container has no memory limit"),
        Rule(
            "TBK003",
            "memory-limit-without-request",
            "note",
            "a memory limit without a memory request (the request silently becomes the limit)",
        ),
        Rule("TBK004", "cpu-limit-throttles", "warning", "a CPU limit throttles the container"),
        Rule("TBK005", "no-hpa", "note", "a Deployment with several replicas and no HPA"),
        Rule("TBK006", "hpa-min-above-max", "error", "an HPA's minReplicas is above maxReplicas"),
        Rule(
            "TBK007",
            "hpa-target-without-request",
            "error",
            "an HPA scales on a resource its target's containers do not request",
        ),
        Rule("TBK008", "pdb-blocks-drain", "error", "a PDB that lets no pod be evicted"),
        Rule("TBK009", "no-pdb", "warning", "a multi-replica workload with no PDB"),
        Rule(
            "TBK010",
            "no-ephemeral-storage-limit",
            "note",
            "a container with no ephemeral-storage limit",
        ),
        Rule("TBK011", "no-liveness-probe", "warning", "a container with no liveness probe"),
        Rule("TBK012", "no-readiness-probe", "warning", "a container with no readiness probe"),
        Rule("TBK013", "image-latest", "warning", "an image tagged latest, or not tagged"),
        Rule("TBK014", "runs-as-root", "warning", "a container that may run as root"),
        Rule("TBK015", "no-seccomp", "warning", "a container without a seccomp profile"),
    )
}


@dataclass
class Finding:
    rule: str
    obj: str  # Kind/name
    path: str  # field path, as kubectl explain writes it
    why: str
    fix: dict[str, Any]  # strategic merge patch of the object
    doc: int = 0  # index of the document in the file
    line: int = 0  # 1-based line of the field (0: unknown)
    file: str = ""

    @property
    def level(self) -> str:
        return RULES[self.rule].level

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "name": RULES[self.rule].name,
            "level": self.level,
            "object": self.obj,
            "path": self.path,
            "why": self.why,
            "fix": self.fix,
            "file": self.file,
            "line": self.line,
        }


@dataclass
class _Doc:
    index: int
    obj: dict[str, Any]
    node: yaml.Node | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind", ""))

    @property
    def name(self) -> str:
        return str((self.obj.get("metadata") or {}).get("name", "?"))

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"


def load(text: str, where: str = "-") -> list[_Doc]:
    """The objects of a YAML/JSON stream (Lists unrolled), with their nodes
    for line numbers."""
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        datas = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ManifestError(f"{where}: not YAML: {exc}") from exc
    docs: list[_Doc] = []
    for node, data in zip(nodes, datas, strict=False):
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: document {len(docs) + 1} is not a Kubernetes object")
        if data.get("kind", "").endswith("List") and isinstance(data.get("items"), list):
            items_node = _child(node, "items")
            for i, item in enumerate(data["items"]):
                docs.append(_Doc(len(docs), item, _child(items_node, i)))
        else:
            docs.append(_Doc(len(docs), data, node))
    return docs


def _child(node: yaml.Node | None, key: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode) and isinstance(key, str):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key and isinstance(v, yaml.Node):
                return v
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
        found = node.value[key]
        return found if isinstance(found, yaml.Node) else None
    return None


def _line(node: yaml.Node | None, path: list[str | int]) -> int:
    """The line of the deepest part of ``path`` that exists."""
    best = node.start_mark.line + 1 if node is not None else 0
    for part in path:
        node = _child(node, part)
        if node is None:
            break
        best = node.start_mark.line + 1
    return best


def _dotted(path: list[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _template_patch(container: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"spec": {"template": {"spec": {"containers": [{"name": container, **body}]}}}}


def _pod_patch(body: dict[str, Any]) -> dict[str, Any]:
    return {"spec": {"template": {"spec": body}}}


# ---- the rules -------------------------------------------------------------------------------


Emit = Callable[[str, list[str | int], str, dict[str, Any]], None]


def _containers(d: _Doc) -> Iterator[tuple[int, dict[str, Any], list[str | int]]]:
    spec = ((d.obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    for i, c in enumerate(spec.get("containers") or []):
        yield i, c, ["spec", "template", "spec", "containers", i]


def _pod_spec(d: _Doc) -> dict[str, Any]:
    out: dict[str, Any] = ((d.obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    return out


def _workload_rules(d: _Doc, emit: Emit) -> None:
    pod = _pod_spec(d)
    pod_sc = pod.get("securityContext") or {}
    for _i, c, at in _containers(d):
        name = c.get("name", "?")
        res = c.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        mem_value = lim.get("memory") or req.get("memory") or "256Mi"
        if "cpu" not in req or "memory" not in req:
            missing = [r for r in ("cpu", "memory") if r not in req]
            emit(
                "TBK001",
                [*at, "resources", "requests"],
                f"container {name} requests no {' or '.join(missing)}: the scheduler places it "
                "as if it needed nothing, and under pressure it is evicted first (BestEffort)",
                _template_patch(
                    name,
                    {
                        "resources": {
                            "requests": {"cpu": req.get("cpu", "100m"), "memory": mem_value}
                        }
                    },
                ),
            )
        if "memory" not in lim:
            emit(
                "TBK002",
                [*at, "resources", "limits"],
                f"container {name} has no memory limit: a leak grows until the node runs out "
                "and the kernel kills whatever it picks",
                _template_patch(name, {"resources": {"limits": {"memory": mem_value}}}),
            )
        elif "memory" not in req:
            emit(
                "TBK003",
                [*at, "resources", "limits", "memory"],
                f"container {name} limits memory to {lim['memory']} without a request: "
                "Kubernetes sets the request to the limit, reserving all of it; say so explicitly "
                "(or request less to overcommit knowingly)",
                _template_patch(name, {"resources": {"requests": {"memory": lim["memory"]}}}),
            )
        if "cpu" in lim:
            emit(
                "TBK004",
                [*at, "resources", "limits", "cpu"],
                f"container {name} has a CPU limit of {lim['cpu']}: the CFS quota throttles it "
                "in every 100 ms period it uses up, even on an idle node (latency spikes); a "
                "request alone reserves CPU without the throttling",
                _template_patch(
                    name,
                    {
                        "resources": {
                            "limits": {"cpu": None},
                            "requests": {"cpu": req.get("cpu", lim["cpu"])},
                        }
                    },
                ),
            )
        if "ephemeral-storage" not in lim:
            emit(
                "TBK010",
                [*at, "resources", "limits"],
                f"container {name} has no ephemeral-storage limit: logs and files written to "
                "its writable layer or emptyDirs can fill the node's disk and get every pod "
                "on it evicted",
                _template_patch(name, {"resources": {"limits": {"ephemeral-storage": "1Gi"}}}),
            )
        probe = {"tcpSocket": {"port": (c.get("ports") or [{}])[0].get("containerPort", 8080)}}
        if "livenessProbe" not in c:
            emit(
                "TBK011",
                at,
                f"container {name} has no liveness probe: a process that hangs without exiting "
                "is never restarted",
                _template_patch(name, {"livenessProbe": {**probe, "periodSeconds": 10}}),
            )
        if "readinessProbe" not in c:
            emit(
                "TBK012",
                at,
                f"container {name} has no readiness probe: it gets traffic before it can "
                "serve it, and during rollouts",
                _template_patch(name, {"readinessProbe": {**probe, "periodSeconds": 5}}),
            )
        image = str(c.get("image", ""))
        if _latest(image):
            emit(
                "TBK013",
                [*at, "image"],
                f"image {image!r} is "
                + ("tagged latest" if image.endswith(":latest") else "not tagged")
                + ": which version runs depends on when each node pulled it, and rollbacks "
                "cannot go back",
                _template_patch(name, {"image": image.rsplit(":", 1)[0] + ":1.0.0"}),
            )
        sc = c.get("securityContext") or {}
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if uid == 0 or (non_root is not True and not (isinstance(uid, int) and uid > 0)):
            emit(
                "TBK014",
                [*at, "securityContext"],
                f"container {name} may run as root (no runAsNonRoot and no non-zero runAsUser): "
                "a process that breaks out of the app is root in the container",
                _template_patch(
                    name,
                    {
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": 65534,
                            "allowPrivilegeEscalation": False,
                        }
                    },
                ),
            )
        profile = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if profile not in ("RuntimeDefault", "Localhost"):
            emit(
                "TBK015",
                [*at, "securityContext"],
                f"container {name} runs "
                + (
                    "with seccomp Unconfined"
                    if profile == "Unconfined"
                    else "without a seccomp profile"
                )
                + ": every system call reaches the node's kernel",
                _pod_patch({"securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}}),
            )


def _latest(image: str) -> bool:
    if "@sha256:" in image:
        return False
    last = image.rsplit("/", 1)[-1]
    return ":" not in last or last.endswith(":latest")


def _replicas(d: _Doc) -> int:
    value = (d.obj.get("spec") or {}).get("replicas", 1)
    return value if isinstance(value, int) else 1


def _targets(hpa: _Doc, d: _Doc) -> bool:
    ref = (hpa.obj.get("spec") or {}).get("scaleTargetRef") or {}
    ns = (d.obj.get("metadata") or {}).get("namespace")
    hns = (hpa.obj.get("metadata") or {}).get("namespace")
    return ref.get("kind") == d.kind and ref.get("name") == d.name and ns == hns


def _selects(pdb: _Doc, d: _Doc) -> bool:
    sel = ((pdb.obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    labels = (((d.obj.get("spec") or {}).get("template") or {}).get("metadata") or {}).get(
        "labels"
    ) or {}
    ns = (d.obj.get("metadata") or {}).get("namespace")
    pns = (pdb.obj.get("metadata") or {}).get("namespace")
    return bool(sel) and ns == pns and all(labels.get(k) == v for k, v in sel.items())


def _int_or_percent(value: Any, total: int) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.endswith("%") and value[:-1].isdigit():
        return -(-int(value[:-1]) * total // 100)
    return None


def advise(docs: list[_Doc], where: str = "-") -> list[Finding]:
    """Every finding of the objects in ``docs``."""
    workloads = [d for d in docs if d.kind in WORKLOAD_KINDS]
    hpas = [d for d in docs if d.kind == "HorizontalPodAutoscaler"]
    pdbs = [d for d in docs if d.kind == "PodDisruptionBudget"]
    out: list[Finding] = []

    def emitter(d: _Doc) -> Emit:
        def emit(rule: str, path: list[str | int], why: str, fix: dict[str, Any]) -> None:
            out.append(
                Finding(rule, d.ref, _dotted(path), why, fix, d.index, _line(d.node, path), where)
            )

        return emit

    for d in workloads:
        emit = emitter(d)
        _workload_rules(d, emit)
        mine = [h for h in hpas if _targets(h, d)]
        replicas = _replicas(d)
        floor = max(
            [replicas] + [int((h.obj.get("spec") or {}).get("minReplicas", 1)) for h in mine]
        )
        if d.kind == "Deployment" and replicas > 1 and not mine:
            emit(
                "TBK005",
                ["spec", "replicas"],
                f"{d.ref} runs a fixed {replicas} replicas: nothing adds pods under load or "
                "removes them when idle",
                {
                    "apiVersion": "autoscaling/v2",
                    "kind": "HorizontalPodAutoscaler",
                    "metadata": {"name": d.name},
                    "spec": {
                        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": d.kind, "name": d.name},
                        "minReplicas": replicas,
                        "maxReplicas": replicas * 3,
                        "metrics": [
                            {
                                "type": "Resource",
                                "resource": {
                                    "name": "cpu",
                                    "target": {"type": "Utilization", "averageUtilization": 70},
                                },
                            }
                        ],
                    },
                },
            )
        if floor > 1 and not any(_selects(p, d) for p in pdbs):
            labels = (((d.obj.get("spec") or {}).get("template") or {}).get("metadata") or {}).get(
                "labels"
            ) or {}
            emit(
                "TBK009",
                ["metadata", "name"],
                f"{d.ref} runs {floor} replicas but no PodDisruptionBudget selects them: a node "
                "drain may evict all of them at once",
                {
                    "apiVersion": "policy/v1",
                    "kind": "PodDisruptionBudget",
                    "metadata": {"name": d.name},
                    "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
                },
            )
        for p in pdbs:
            if not _selects(p, d):
                continue
            spec = p.obj.get("spec") or {}
            pemit = emitter(p)
            min_av = _int_or_percent(spec.get("minAvailable"), floor)
            max_un = _int_or_percent(spec.get("maxUnavailable"), floor)
            if (min_av is not None and min_av >= floor) or max_un == 0:
                field_name = "minAvailable" if min_av is not None else "maxUnavailable"
                pemit(
                    "TBK008",
                    ["spec", field_name],
                    f"{p.ref}: {field_name} {spec.get(field_name)} with {floor} replicas of "
                    f"{d.ref} allows no eviction: every node drain blocks on it",
                    {"spec": {"minAvailable": None, "maxUnavailable": 1}},
                )
        for h in mine:
            _hpa_request_rule(h, d, emitter(h))
    for h in hpas:
        spec = h.obj.get("spec") or {}
        lo, hi = spec.get("minReplicas", 1), spec.get("maxReplicas")
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            emitter(h)(
                "TBK006",
                ["spec", "minReplicas"],
                f"{h.ref}: minReplicas {lo} > maxReplicas {hi}: the API server refuses it",
                {"spec": {"maxReplicas": lo}},
            )
    return sorted(out, key=lambda f: (f.doc, f.line, f.rule))


def _hpa_request_rule(h: _Doc, d: _Doc, emit: Emit) -> None:
    for i, m in enumerate((h.obj.get("spec") or {}).get("metrics") or []):
        typ = m.get("type")
        src = m.get("resource") if typ == "Resource" else m.get("containerResource")
        if typ not in ("Resource", "ContainerResource") or not isinstance(src, dict):
            continue
        resource = src.get("name")
        if (src.get("target") or {}).get("type") != "Utilization":
            continue
        lacking = [
            c.get("name", "?")
            for _, c, _ in _containers(d)
            if resource not in (((c.get("resources") or {}).get("requests")) or {})
            and (typ == "Resource" or c.get("name") == src.get("container"))
        ]
        if lacking:
            emit(
                "TBK007",
                ["spec", "metrics", i],
                f"{h.ref} scales {d.ref} on {resource} utilization, but container(s) "
                f"{', '.join(lacking)} request no {resource}: utilization is a share of the "
                "request, so the HPA cannot compute it (FailedGetResourceMetric)",
                _template_patch(
                    lacking[0],
                    {
                        "resources": {
                            "requests": {resource: "100m" if resource == "cpu" else "256Mi"}
                        }
                    },
                ),
            )


# ---- output ----------------------------------------------------------------------------------


def render_text(findings: list[Finding]) -> str:
    if not findings:
        return "no findings"
    lines = []
    for f in findings:
        lines.append(f"{f.file}:{f.line} {f.rule} {f.level} {f.obj} {f.path}")
        lines.append(f"  why: {f.why}")
        lines.append("  fix:")
        patch = yaml.safe_dump(f.fix, sort_keys=False).rstrip()
        lines += [f"    {line}" for line in patch.splitlines()]
    lines.append(f"{len(findings)} finding(s)")
    return "\n".join(lines)


def render_json(findings: list[Finding]) -> str:
    return json.dumps([f.to_dict() for f in findings], indent=1)


def render_sarif(findings: list[Finding], version: str) -> str:
    rules = [
        SarifRule(r.id, r.name, r.short, level=r.level)
        for r in sorted(RULES.values(), key=lambda r: r.id)
    ]
    results = [
        SarifResult(
            f.rule,
            f.level,
            f"{f.obj} {f.path}: {f.why}",
            f.file,
            f.line,
            properties={"object": f.obj, "path": f.path, "fix": f.fix},
        )
        for f in findings
    ]
    return json.dumps(sarif_log("tierbox kube advise", version, rules, results), indent=1)
