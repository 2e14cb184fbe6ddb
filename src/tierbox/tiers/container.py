"""The ``container`` tier: crun (runc as fallback) driving the shared OCI
runtime machinery (``tiers/oci_runtime.py``), with crun's compiled seccomp
filter cached across starts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
from functools import cache
from pathlib import Path

from tierbox.errors import HostError, TierUnavailableError
from tierbox.host import mntns
from tierbox.host.cgroups import SandboxCgroup, cgroup_version
from tierbox.host.runner import which
from tierbox.paths import home
from tierbox.spec import SandboxSpec
from tierbox.tiers import oci
from tierbox.tiers.base import Availability
from tierbox.tiers.oci_runtime import INIT_BINARY, OciTier, runtime_version

BPF_ANNOTATION = "run.oci.seccomp_bpf_data"


@cache
def _read_cached_b64(path: Path) -> str:
    """base64 of a cache file, read once per process ("" when absent)."""
    try:
        return base64.b64encode(path.read_bytes()).decode()
    except OSError:
        _read_cached_b64.cache_clear()  # absent now; look again next time
        return ""


class ContainerTier(OciTier):
    name = "container"
    isolation = (
        "namespaces (pid, net, ipc, uts, mount, cgroup), no capabilities, seccomp, "
        "non-root, read-only root; shares the host kernel"
    )

    @cache  # noqa: B019 - one tier object per process
    def _engine(self) -> tuple[str, str]:
        """(runtime name, path): crun, else runc."""
        for name in ("crun", "runc"):
            path = which(name)
            if path:
                return name, path
        raise TierUnavailableError("no OCI runtime: apt-get install crun (or runc)")

    @property
    def runtime(self) -> str:  # type: ignore[override]
        return self._engine()[0]

    def runtime_argv(self, managed: bool = True) -> list[str]:
        name, path = self._engine()
        root = str(self.state_root())
        if name == "crun":
            argv = [*mntns.runtime_prefix(), path, "--root", root]
            return argv if managed else [*argv, "--cgroup-manager=disabled"]
        return [path, "--root", root]

    # ---- precompiled seccomp ----------------------------------------------
    # crun compiles the ~370-rule default seccomp profile with libseccomp on
    # every start: ~16 ms of a ~24 ms start here. crun accepts the compiled
    # filter in the annotation run.oci.seccomp_bpf_data and writes the filter
    # it compiled to its state dir as seccomp.bpf; tierbox keeps that file,
    # keyed by the profile, crun's version and the architecture, and hands it
    # back to every later start. The JSON profile stays in config.json too.
    @cache  # noqa: B019 - one tier object per process
    def _bpf_cache(self) -> Path:
        _name, path = self._engine()
        key = json.dumps(
            [oci.seccomp_profile(), runtime_version(path), platform.machine()], sort_keys=True
        )
        return home() / "cache" / "seccomp" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.bpf"

    def annotations(self) -> dict[str, str]:
        if self.runtime != "crun" or not self.seccomp:
            return {}
        data = _read_cached_b64(self._bpf_cache())
        return {BPF_ANNOTATION: data} if data else {}

    def after_start(self, cid: str) -> None:
        cache = self._bpf_cache()
        compiled = self.state_root() / cid / "seccomp.bpf"
        if self.runtime == "crun" and self.seccomp and not cache.exists() and compiled.exists():
            data = compiled.read_bytes()
            if data and len(data) % 8 == 0:  # whole BPF instructions
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, cache)

    def prime(self, spec: SandboxSpec) -> None:
        if self.runtime == "crun" and self.seccomp and not self._bpf_cache().exists():
            self.create(spec).close()

    def cgroups_path(self, cg: SandboxCgroup, *, one_shot: bool) -> str | None:
        if not one_shot:
            return cg.relpath
        # runc has no "manage no cgroups" mode: a one-shot gets a child of ours,
        # and on cgroup v1 an OOM kill of a non-init process then goes uncounted.
        return None if self.runtime == "crun" else cg.child_relpath

    def available(self) -> Availability:
        try:
            name, path = self._engine()
            cgroup_version()
        except (TierUnavailableError, HostError) as exc:
            return Availability(False, str(exc))
        if not Path(INIT_BINARY).exists():
            return Availability(
                False, "catatonit is missing: apt-get install catatonit", engine=name
            )
        why = f"{name} (OCI runtime)"
        if name == "crun" and mntns.hybrid_cgroups():
            why += " in a private mount namespace hiding the hybrid cgroup2 mount"
        return Availability(True, why, engine=name, version=runtime_version(path))
