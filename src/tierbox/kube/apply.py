"""``tierbox kube apply``: objects to a cluster through the official
``kubernetes`` Python client, by server-side apply (field manager
``tierbox``), with the user's kubeconfig.

Server-side apply is a PATCH with ``application/apply-patch+yaml`` through
the dynamic client, which finds each kind's endpoint by discovery, so
KubeVirt's kinds go the same way as Deployments. ``dry_run="server"`` asks
the server to validate and not persist (``dryRun=All``); ``"client"``
contacts no server and returns what would be sent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tierbox.errors import KubeApplyError, ManifestError

FIELD_MANAGER = "tierbox"


@dataclass(frozen=True)
class Applied:
    kind: str
    name: str
    namespace: str | None
    result: str  # "applied", "applied (server dry run)", "would apply (client dry run)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "namespace": self.namespace,
            "result": self.result,
        }


def client(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """An ApiClient from the user's kubeconfig (``$KUBECONFIG`` or
    ``~/.kube/config``), or the in-cluster service account."""
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    try:
        return config.new_client_from_config(config_file=kubeconfig, context=context)  # type: ignore[no-untyped-call]
    except (ConfigException, OSError, TypeError) as exc:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except ConfigException:
            raise KubeApplyError(
                f"no kubeconfig to reach a cluster ({exc}): set KUBECONFIG or --kubeconfig"
            ) from exc
        from kubernetes import client as k8s

        return k8s.ApiClient()


def apply(
    objects: Sequence[dict[str, Any]],
    *,
    api_client: Any = None,
    namespace: str | None = None,
    dry_run: str | None = None,
    force: bool = True,
) -> list[Applied]:
    """Server-side apply every object, in order. ``dry_run``: None, "server"
    or "client"."""
    if dry_run not in (None, "server", "client"):
        raise ManifestError(f"--dry-run {dry_run!r}: use server or client")
    for obj in objects:
        for key in ("apiVersion", "kind"):
            if not obj.get(key):
                raise ManifestError(f"an object without {key}: {json.dumps(obj)[:120]}")
        if not (obj.get("metadata") or {}).get("name"):
            raise ManifestError(f"{obj['kind']} without metadata.name")
    if dry_run == "client":
        return [
            Applied(
                o["kind"],
                o["metadata"]["name"],
                o["metadata"].get("namespace") or namespace,
                "would apply (client dry run)",
            )
            for o in objects
        ]
    from kubernetes import dynamic
    from kubernetes.client.exceptions import ApiException
    from kubernetes.dynamic.exceptions import DynamicApiError, ResourceNotFoundError

    api = api_client if api_client is not None else client()
    try:
        dyn = dynamic.DynamicClient(api)  # type: ignore[no-untyped-call]
    except (ApiException, DynamicApiError, OSError) as exc:
        raise KubeApplyError(f"cannot reach the API server: {exc}") from exc
    except Exception as exc:  # urllib3's MaxRetryError and friends: no server there
        raise KubeApplyError(f"cannot reach the API server: {exc}") from exc
    out: list[Applied] = []
    for obj in objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        try:
            res = dyn.resources.get(api_version=obj["apiVersion"], kind=kind)
        except ResourceNotFoundError as exc:
            raise KubeApplyError(
                f"the cluster does not serve {kind} in {obj['apiVersion']} "
                "(a CRD, such as KubeVirt's, is not installed?)"
            ) from exc
        ns = (
            (obj["metadata"].get("namespace") or namespace or "default") if res.namespaced else None
        )
        body = obj
        if ns is not None and obj["metadata"].get("namespace") != ns:
            body = {**obj, "metadata": {**obj["metadata"], "namespace": ns}}
        kwargs: dict[str, Any] = {"field_manager": FIELD_MANAGER, "force_conflicts": force}
        if dry_run == "server":
            kwargs["dry_run"] = "All"
        try:
            res.server_side_apply(body=body, name=name, namespace=ns, **kwargs)
        except (ApiException, DynamicApiError) as exc:
            status = getattr(exc, "status", None)
            reason = getattr(exc, "summary", None)
            text = reason() if callable(reason) else str(exc)
            raise KubeApplyError(
                f"{kind}/{name}: the API server refused it: {text}", status=status
            ) from exc
        except Exception as exc:
            raise KubeApplyError(f"{kind}/{name}: {type(exc).__name__}: {exc}") from exc
        out.append(
            Applied(
                kind, name, ns, "applied (server dry run)" if dry_run == "server" else "applied"
            )
        )
    return out
