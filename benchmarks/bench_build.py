"""Build time of the example Dockerfile (examples/dependency-conflict/legacy-app),
cold and with a warm layer cache, checked against its promise.

Promise (SPECIFICATION.md, images from Dockerfiles):
- a rebuild whose every step is cached is >= 5x faster than a cold build.

Cold: an empty build cache (a fresh buildah storage: the base image is loaded
into it, every step runs, the image is exported and imported into the store).
Warm: the same build again on that storage. Also printed, with no target: a
rebuild after the application source changed (the dependency install stays
cached; the COPY of the code and everything after it runs, and the image is
imported again). Needs python:3.11 in the store (`tierbox image bootstrap
python:3.11`) and PyPI for the example's wheels.
Usage: python benchmarks/bench_build.py [WARM_RUNS]   (exit status 1 when a promise fails)
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Promise, report, runs_arg
from tierbox.build.buildah import Buildah, choose_runtime, version
from tierbox.build.builder import BuildOptions, build_image
from tierbox.errors import ImageNotFoundError
from tierbox.images.store import default_store

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "dependency-conflict"
TAG = "bench-build/legacy-app:1"
COLD_RUNS = 2


def timed_build(context: Path, bh: Buildah) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    result = build_image(BuildOptions(context, TAG), buildah=bh)
    return time.perf_counter() - t0, result.steps, result.cached_steps


def main() -> int:
    warm_runs = runs_arg(__doc__, 5)
    store = default_store()
    try:
        store.resolve("python:3.11")
    except ImageNotFoundError:
        print("python:3.11 is not in the store: run `tierbox image bootstrap python:3.11`")
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp_s:
        tmp = Path(tmp_s)
        subprocess.run(
            ["bash", str(EXAMPLE / "run.sh"), "prepare", str(tmp / "ctx")],
            check=True,
            env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
        )
        context = tmp / "ctx" / "legacy-app"
        print(f"buildah {version()}, RUN steps on {choose_runtime().name}")
        cold: list[float] = []
        bh = Buildah(tmp / "cache-0")
        try:
            for i in range(COLD_RUNS):
                bh = Buildah(tmp / f"cache-{i}")
                seconds, steps, cached = timed_build(context, bh)
                cold.append(seconds)
                print(f"cold  {seconds:6.2f} s  ({steps} steps, {cached} cached)")
            warm: list[float] = []
            for _ in range(warm_runs):
                seconds, steps, cached = timed_build(context, bh)
                warm.append(seconds)
                print(f"warm  {seconds:6.2f} s  ({steps} steps, {cached} cached)")
            app = context / "app.py"
            app.write_text(app.read_text() + "\n# a source change\n")
            seconds, steps, cached = timed_build(context, bh)
            print(f"source change  {seconds:6.2f} s  ({steps} steps, {cached} cached)")
        finally:
            with contextlib.suppress(ImageNotFoundError):
                store.remove(TAG)
            for i in range(COLD_RUNS):
                used = Buildah(tmp / f"cache-{i}")
                used.run("rmi", "--all", "--force", check=False)
                shutil.rmtree(used.runroot, ignore_errors=True)
    cold_p50, warm_p50 = statistics.median(cold), statistics.median(warm)
    print(f"\ncold p50 {cold_p50:.2f} s, warm p50 {warm_p50:.3f} s: {cold_p50 / warm_p50:.1f}x")
    return report([Promise("cached rebuild speed-up", cold_p50 / warm_p50, 5.0, "x", True)])


if __name__ == "__main__":
    sys.exit(main())
