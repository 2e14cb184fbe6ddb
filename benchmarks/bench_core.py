"""Start-up cost of the process, container and gvisor tiers against their raw engines.

Promises (SPECIFICATION.md):
- container one-shot /bin/true via the Python API: p50 <= 1.3x raw ``crun run``
  of an equivalent bundle, and >= 10x faster than ``podman run --rm`` where
  podman is installed;
- exec into a running container: p50 <= 1.3x raw ``crun exec``;
- gvisor one-shot: p50 <= 1.2x raw ``runsc run``;
- process one-shot: p50 <= 1.2x a raw subprocess spawn.

Raw and tierbox runs alternate in one loop, in the same process, so noise on
this shared machine hits both alike. Usage: python benchmarks/bench_core.py [N]
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Promise, enter_runtime_namespace, interleaved, p50, p95, report, runs_arg
from tierbox import make_spec
from tierbox.images.store import default_store
from tierbox.spec import DEFAULT_PATH
from tierbox.tiers import get_tier, oci
from tierbox.tiers.gvisor import _platform

SPEC = make_spec("busybox", memory_mib=128, pids=64, timeout_s=30)
_ids = itertools.count()
# root here lacks CAP_SYS_RESOURCE; podman's default rlimits exceed the hard caps
PODMAN_ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def raw_bundle(
    argv: list[str], *, seccomp: bool, annotations: dict[str, str] | None = None
) -> Path:
    """A bundle equivalent to tierbox's: same hardening, limits and
    annotations (the precompiled seccomp filter), with the runtime managing
    its own cgroup the ordinary way."""
    d = Path(tempfile.mkdtemp(prefix="tierbox-bench-"))
    rootfs = default_store().rootfs("busybox")
    proc = oci.process_json(argv, SPEC, env={"PATH": DEFAULT_PATH, "HOME": "/tmp"}, cwd="/")
    cfg = oci.bundle_config(
        rootfs=rootfs,
        process=proc,
        spec=SPEC,
        cgroups_path=f"tierbox/{d.name}",
        hostname="raw",
        seccomp=seccomp,
        annotations=annotations,
    )
    cfg["linux"]["resources"]["memory"] = {"limit": 128 << 20, "swap": 128 << 20}
    cfg["linux"]["resources"]["pids"] = {"limit": 64}
    oci.write_json(d / "config.json", cfg)
    return d


def main() -> int:
    enter_runtime_namespace()
    n = runs_arg(__doc__, 60)
    promises: list[Promise] = []
    root = Path(tempfile.mkdtemp(prefix="tierbox-bench-state-"))

    # ---- process ---------------------------------------------------------
    process = get_tier("process")
    pspec = make_spec(None, memory_mib=128, pids=64, timeout_s=30)
    t = interleaved(
        {
            "raw subprocess": lambda: subprocess.run(["/bin/true"], capture_output=True),
            "tierbox process": lambda: process.run(pspec, ["/bin/true"]),
            "raw, output not captured": lambda: subprocess.run(["/bin/true"], check=True),
        },
        n,
    )
    show("process one-shot", t)
    promises.append(
        Promise(
            "process one-shot / raw subprocess",
            ratio(t, "tierbox process", "raw subprocess"),
            1.2,
            "x",
        )
    )

    # ---- container -------------------------------------------------------
    container = get_tier("container")
    crun = shutil.which("crun") or "crun"
    container.run(SPEC, ["/bin/true"])  # primes the compiled-seccomp cache
    bundle = raw_bundle(["/bin/true"], seccomp=True, annotations=container.annotations())  # type: ignore[attr-defined]
    naive = raw_bundle(["/bin/true"], seccomp=True)

    def raw_crun(b: Path) -> None:
        subprocess.run(
            [crun, "--root", str(root), "run", "--bundle", str(b), f"raw-{next(_ids)}"],
            check=True,
        )

    fns = {
        "raw crun run": lambda: raw_crun(bundle),
        "tierbox container": lambda: container.run(SPEC, ["/bin/true"]),
        "raw crun, JSON seccomp": lambda: raw_crun(naive),
    }
    podman = shutil.which("podman")
    if podman and _podman_has_busybox(podman):
        fns["podman run --rm"] = lambda: subprocess.run(
            [podman, "run", "--rm", "--network=none", *PODMAN_ULIMITS, "busybox", "/bin/true"],
            check=True,
        )
    t = interleaved(fns, n)
    show("container one-shot", t)
    promises.append(
        Promise(
            "container one-shot / raw crun run",
            ratio(t, "tierbox container", "raw crun run"),
            1.3,
            "x",
        )
    )
    if "podman run --rm" in t:
        promises.append(
            Promise(
                "podman run --rm / container one-shot",
                ratio(t, "podman run --rm", "tierbox container"),
                10.0,
                "x",
                higher_is_better=True,
            )
        )
    else:
        print("podman is not installed: the 10x-faster-than-podman comparison was not run")

    # ---- exec into a running container ------------------------------------
    from tierbox import Sandbox

    with Sandbox.create("busybox", tier="container", memory_mib=128, pids=64) as sb:
        cid = f"tierbox-{sb.id}"
        proc_file = root / "exec.json"
        oci.write_json(
            proc_file,
            oci.process_json(["/bin/true"], SPEC, env={"PATH": DEFAULT_PATH}, cwd="/"),
        )
        state_root = str(container.state_root())  # type: ignore[attr-defined]
        t = interleaved(
            {
                "raw crun exec": lambda: subprocess.run(
                    [
                        crun,
                        "--root",
                        state_root,
                        "--cgroup-manager=disabled",
                        "exec",
                        "--process",
                        str(proc_file),
                        cid,
                    ],
                    check=True,
                ),
                "tierbox exec": lambda: sb.run(["/bin/true"]),
            },
            n,
        )
    show("exec into a running container", t)
    promises.append(
        Promise(
            "container exec / raw crun exec", ratio(t, "tierbox exec", "raw crun exec"), 1.3, "x"
        )
    )

    # ---- gvisor ------------------------------------------------------------
    gvisor = get_tier("gvisor")
    if gvisor.available().available:
        runsc = shutil.which("runsc") or "runsc"
        gbundle = raw_bundle(["/bin/true"], seccomp=False)

        def raw_runsc() -> None:
            subprocess.run(
                [
                    runsc,
                    "--root",
                    str(root),
                    f"--platform={_platform(runsc)}",
                    "--network=none",
                    "run",
                    "--bundle",
                    str(gbundle),
                    f"rawg-{next(_ids)}",
                ],
                check=True,
            )

        t = interleaved(
            {"raw runsc run": raw_runsc, "tierbox gvisor": lambda: gvisor.run(SPEC, ["/bin/true"])},
            max(n // 3, 10),
        )
        show("gvisor one-shot", t)
        promises.append(
            Promise(
                "gvisor one-shot / raw runsc run",
                ratio(t, "tierbox gvisor", "raw runsc run"),
                1.2,
                "x",
            )
        )
        shutil.rmtree(gbundle, ignore_errors=True)

    shutil.rmtree(bundle, ignore_errors=True)
    shutil.rmtree(naive, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    return report(promises)


def _podman_has_busybox(podman: str) -> bool:
    return (
        subprocess.run([podman, "image", "exists", "busybox"], capture_output=True).returncode == 0
    )


def ratio(t: dict[str, list[float]], ours: str, raw: str) -> float:
    return p50(t[ours]) / p50(t[raw])


def show(title: str, t: dict[str, list[float]]) -> None:
    print(f"\n{title} (n={len(next(iter(t.values())))})")
    for name, xs in t.items():
        print(f"  {name:24} p50 {p50(xs) * 1e3:8.2f} ms   p95 {p95(xs) * 1e3:8.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
