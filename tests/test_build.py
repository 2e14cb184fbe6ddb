"""``tierbox image build`` with the real buildah, skopeo and umoci; built images run on
the real tiers. No mocks.

Base images come from the default store (busybox is built in; debian:bookworm
and python:3.11 are bootstrapped once, ~1 minute each, and kept). Every image
a test builds is named ``tbtest-*`` and removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TIERBOX, cli, require_tier
from tierbox import Sandbox
from tierbox.build.buildah import Buildah, choose_runtime
from tierbox.build.builder import BuildOptions, BuildResult, build_image
from tierbox.errors import BuildError, DockerfileError, ImageNotFoundError
from tierbox.host.mntns import hybrid_cgroups
from tierbox.host.runner import which
from tierbox.images.store import ImageStore, default_store

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "build"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="buildah's RUN steps need root here"),
    pytest.mark.skipif(which("buildah") is None, reason="buildah missing: run `make setup`"),
]


@pytest.fixture(scope="module")
def store() -> ImageStore:
    st = default_store()
    st.ensure_busybox()
    return st


@pytest.fixture(scope="module")
def debian(store: ImageStore) -> str:
    try:
        store.resolve("debian:bookworm")
    except ImageNotFoundError:
        store.bootstrap("debian:bookworm")  # ~45 s, once per store
    return "debian:bookworm"


@pytest.fixture(scope="module")
def python311(store: ImageStore) -> str:
    try:
        store.resolve("python:3.11")
    except ImageNotFoundError:
        store.bootstrap("python:3.11")  # ~60 s, once per store
    return "python:3.11"


@pytest.fixture(scope="module")
def built(store: ImageStore) -> Iterator[list[str]]:
    """Refs the tests built; removed at the end."""
    refs: list[str] = []
    yield refs
    for ref in set(refs):
        with contextlib.suppress(ImageNotFoundError):  # a failed build stored nothing
            store.remove(ref)


def make_context(path: Path, dockerfile: str, files: dict[str, str] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "Dockerfile").write_text(dockerfile)
    for name, text in (files or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def build(ctx: Path, tag: str, built: list[str], **kwargs: object) -> tuple[BuildResult, list[str]]:
    lines: list[str] = []
    built.append(tag)
    result = build_image(BuildOptions(ctx, tag, **kwargs), progress=lines.append)  # type: ignore[arg-type]
    return result, lines


def no_leftovers() -> None:
    """No buildah working container, no runtime container of a RUN step."""
    bh = Buildah()
    assert bh.containers() == []
    tmp = str(bh.tmp.resolve())
    for name in ("runc", "crun"):
        exe = which(name)
        if exe is None:
            continue
        listed = subprocess.run([exe, "list", "--format", "json"], capture_output=True, text=True)
        entries = json.loads(listed.stdout or "null") or []
        assert [e["id"] for e in entries if str(e.get("bundle", "")).startswith(tmp)] == []


MULTISTAGE_BUSYBOX = """\
FROM busybox AS build
RUN mkdir -p /out && echo "built in stage one" > /out/msg && id -u > /out/builder-uid
FROM busybox
COPY --from=build /out /srv/app
ENV GREETING="hello from a built image"
WORKDIR /srv/app
USER 1000:1000
CMD ["cat", "/srv/app/msg"]
"""


def test_busybox_multistage_runs_on_container_gvisor_and_microvm(
    tmp_path: Path, store: ImageStore, built: list[str]
) -> None:
    ctx = make_context(tmp_path / "ctx", MULTISTAGE_BUSYBOX)
    result, lines = build(ctx, "tbtest-busybox:1", built)
    assert result.record.ref == "tbtest-busybox:1"
    runtime = choose_runtime()
    assert any(f"RUN steps use {runtime.name}" in line for line in lines)
    assert any("[2/2] STEP 2/6: COPY --from=build" in line for line in lines)  # progress per step
    cfg = store.resolve("tbtest-busybox:1").config
    assert (cfg.cmd, cfg.workdir, cfg.user) == (["cat", "/srv/app/msg"], "/srv/app", "1000:1000")
    assert cfg.env["GREETING"] == "hello from a built image"
    script = "cat /srv/app/msg /srv/app/builder-uid; echo $GREETING; pwd"
    want = b"built in stage one\n0\nhello from a built image\n/srv/app\n"
    for tier in ("container", "gvisor", "microvm"):
        require_tier(tier)
        with Sandbox.create("tbtest-busybox:1", tier=tier, memory_mib=128) as sb:
            r = sb.run(["sh", "-c", script])
        assert (r.exit_code, r.stdout) == (0, want), (tier, r.stderr)
    no_leftovers()


def test_debian_multistage_runs_on_container_and_microvm(
    tmp_path: Path, debian: str, built: list[str]
) -> None:
    dockerfile = """\
ARG BASE=debian:bookworm
FROM ${BASE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN dpkg-query -W -f='${Package}\\n' | sort > /packages.txt && wc -l < /packages.txt > /count
FROM debian:bookworm-slim
RUN useradd --create-home --uid 10001 app
COPY --from=build /count /home/app/count
USER 10001
WORKDIR /home/app
CMD ["bash", "-c", "echo $(cat count) packages"]
"""
    ctx = make_context(tmp_path / "ctx", dockerfile)
    result, _ = build(ctx, "tbtest-debian:1", built)
    assert any(
        "debian:bookworm-slim" in n and "tierbox's debian:bookworm" in n for n in result.notes
    )
    assert result.record.config.user == "10001"
    for tier in ("container", "microvm"):
        require_tier(tier)
        with Sandbox.create("tbtest-debian:1", tier=tier, memory_mib=256) as sb:
            r = sb.run(["bash", "-c", "echo $(cat /home/app/count) packages; id app -u"])
        assert r.exit_code == 0, (tier, r.stderr)
        count, uid = r.stdout.decode().split("\n")[:2]
        assert int(count.split()[0]) > 50 and uid == "10001", (tier, r.stdout)
    no_leftovers()


@pytest.mark.slow
def test_built_image_runs_on_vm(tmp_path: Path, built: list[str]) -> None:
    require_tier("vm")
    ctx = make_context(tmp_path / "ctx", MULTISTAGE_BUSYBOX)
    build(ctx, "tbtest-busybox:vm", built)
    with Sandbox.create("tbtest-busybox:vm", tier="vm", memory_mib=256) as sb:
        r = sb.run(["cat", "/srv/app/msg"])
    assert (r.exit_code, r.stdout) == (0, b"built in stage one\n"), r.stderr


def test_python_slim_resolves_to_the_bootstrapped_python(
    tmp_path: Path, python311: str, built: list[str]
) -> None:
    dockerfile = (
        'FROM python:3.11-slim\nCMD ["python3", "-c", "import sys; print(sys.version_info[:2])"]\n'
    )
    ctx = make_context(tmp_path / "ctx", dockerfile)
    result, lines = build(ctx, "tbtest-py:1", built)
    note = "FROM python:3.11-slim (Dockerfile:1) resolves to tierbox's python:3.11"
    assert any(
        line.startswith(note.replace("Dockerfile", str(ctx / "Dockerfile"))) for line in lines
    )
    assert [b.record.ref for b in result.bases] == ["python:3.11"]
    r = cli("run", "--tier", "container", "tbtest-py:1")
    assert (r.returncode, r.stdout) == (0, b"(3, 11)\n"), r.stderr


def test_layer_cache_across_builds_and_no_cache(tmp_path: Path, built: list[str]) -> None:
    token = uuid.uuid4().hex  # the cache outlives test runs: make this run's steps new
    dockerfile = f"FROM busybox\nRUN sleep 1 && echo {token} > /stamp\nCOPY app.txt /app.txt\n"
    ctx = make_context(tmp_path / "ctx", dockerfile, {"app.txt": f"v1 {token}\n"})
    first, _ = build(ctx, "tbtest-cache:1", built)
    again, lines = build(ctx, "tbtest-cache:1", built)
    assert again.cached_steps == again.steps - 1  # every step but FROM
    assert again.unchanged and again.record.manifest_digest == first.record.manifest_digest
    assert any("Using cache" in line for line in lines)
    assert again.duration_s < first.duration_s
    (ctx / "app.txt").write_text(f"v2 {token}\n")  # COPY rebuilds, RUN stays cached
    changed, _ = build(ctx, "tbtest-cache:1", built)
    assert changed.cached_steps == 1 and not changed.unchanged
    fresh, _ = build(ctx, "tbtest-cache:1", built, no_cache=True)
    assert fresh.cached_steps == 0
    with Sandbox.create("tbtest-cache:1", tier="container") as sb:
        r = sb.run(["cat", "/stamp", "/app.txt"])
    assert r.stdout == f"{token}\nv2 {token}\n".encode()


def test_dockerignore_build_args_and_target(tmp_path: Path, built: list[str]) -> None:
    dockerfile = """\
FROM busybox AS base
ARG FLAVOUR=plain
RUN echo "$FLAVOUR" > /flavour
COPY . /ctx/
FROM base AS final
RUN echo final > /final
"""
    ctx = make_context(
        tmp_path / "ctx",
        dockerfile,
        {
            ".dockerignore": "secret.txt\nlogs/\n",
            "keep.txt": "k\n",
            "secret.txt": "s\n",
            "logs/a": "x",
        },
    )
    _, lines = build(ctx, "tbtest-target:1", built, build_args={"FLAVOUR": "spicy"}, target="base")
    assert not any("RUN echo final" in line for line in lines)
    with Sandbox.create("tbtest-target:1", tier="container") as sb:
        r = sb.run(["sh", "-c", "cat /flavour; ls /ctx; test -e /final || echo no-final"])
    assert r.stdout == b"spicy\nDockerfile\nkeep.txt\nno-final\n", r.stderr


def test_run_steps_have_no_network_unless_asked(tmp_path: Path, built: list[str]) -> None:
    for mode in ("none", "host"):
        token = uuid.uuid4().hex  # steps of their own: the cache does not key on the network
        ctx = make_context(
            tmp_path / mode, f"FROM busybox\nRUN echo {token} && ls /sys/class/net > /nets\n"
        )
        build(ctx, f"tbtest-net:{mode}", built, network=mode == "host")
    with Sandbox.create("tbtest-net:none", tier="container") as sb:
        assert sb.run(["cat", "/nets"]).stdout == b"lo\n"
    host_links = sorted(os.listdir("/sys/class/net"))
    with Sandbox.create("tbtest-net:host", tier="container") as sb:
        assert sb.run(["cat", "/nets"]).stdout.decode().split() == host_links


def test_copy_from_an_image_in_the_store(tmp_path: Path, built: list[str]) -> None:
    ctx = make_context(
        tmp_path / "ctx",
        "FROM scratch\nCOPY --from=busybox:latest /bin/busybox /bin/busybox\n"
        'ENTRYPOINT ["/bin/busybox"]\n',
    )
    result, _ = build(ctx, "tbtest-copyfrom:1", built)
    assert [b.record.ref for b in result.bases] == ["busybox:latest"]
    with Sandbox.create("tbtest-copyfrom:1", tier="container") as sb:
        r = sb.run(["/bin/busybox", "echo", "copied from an image"])
    assert r.stdout == b"copied from an image\n", r.stderr


def test_wasm_final_stage_runs_on_wasm(tmp_path: Path, built: list[str]) -> None:
    import wasmtime

    require_tier("wasm")
    module = wasmtime.wat2wasm(
        """(module
          (import "wasi_snapshot_preview1" "fd_write"
            (func $w (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 8) "hello from a built wasm image\\n")
          (func (export "_start")
            (i32.store (i32.const 0) (i32.const 8))
            (i32.store (i32.const 4) (i32.const 30))
            (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 40)))))"""
    )
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "hello.wasm").write_bytes(module)
    (ctx / "Dockerfile").write_text(
        "FROM busybox AS check\nCOPY hello.wasm /hello.wasm\nRUN test -s /hello.wasm\n"
        'FROM scratch\nCOPY --from=check /hello.wasm /hello.wasm\nENTRYPOINT ["/hello.wasm"]\n'
    )
    build(ctx, "tbtest-wasm:1", built)
    r = cli("run", "--tier", "wasm", "tbtest-wasm:1", "--", "hello")
    assert (r.returncode, r.stdout) == (0, b"hello from a built wasm image\n"), r.stderr


# ------------------------------------------------------------------ bad input


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    ctx = make_context(tmp_path / "ctx", "FROM busybox\nRUN true\nFORM busybox\n")
    with pytest.raises(DockerfileError, match=r"Dockerfile:3: unknown instruction FORM"):
        build_image(BuildOptions(ctx, "tbtest-bad:1"))
    (ctx / "Dockerfile").write_text("FROM busybox\nRUN true\nRUN <<EOF\necho never closed\n")
    r = cli("image", "build", "-t", "tbtest-bad:1", str(ctx))
    assert r.returncode == 2
    assert b"Dockerfile:3: unterminated heredoc" in r.stderr


def test_from_an_image_not_in_the_store_says_how_to_get_it(tmp_path: Path) -> None:
    ctx = make_context(tmp_path / "ctx", "FROM busybox\nRUN true\nFROM alpine:3.20\n")
    with pytest.raises(ImageNotFoundError) as info:
        build_image(BuildOptions(ctx, "tbtest-bad:1"))
    text = str(info.value)
    assert "Dockerfile:3: FROM alpine:3.20" in text and "tierbox image import" in text
    r = cli("image", "build", "-t", "tbtest-bad:1", str(ctx))
    assert r.returncode == 2 and b"tierbox image import" in r.stderr


def test_failing_run_shows_its_output_and_stores_nothing(tmp_path: Path, store: ImageStore) -> None:
    dockerfile = (
        "FROM busybox\nRUN echo before\nRUN echo about to fail; echo on stderr >&2; exit 3\n"
    )
    ctx = make_context(tmp_path / "ctx", dockerfile)
    with pytest.raises(BuildError) as info:
        build_image(BuildOptions(ctx, "tbtest-fail:1"))
    text = str(info.value)
    assert "nothing was stored" in text
    assert "STEP 3/3: RUN echo about to fail" in text and "about to fail" in info.value.output
    assert (
        "on stderr" in info.value.output and "before" not in info.value.output.split("STEP 3/3")[1]
    )
    with pytest.raises(ImageNotFoundError):
        store.resolve("tbtest-fail:1")
    no_leftovers()
    r = cli("image", "build", "-t", "tbtest-fail:1", str(ctx))
    assert r.returncode == 1 and b"about to fail" in r.stderr


def test_context_symlinks_are_never_followed_out(tmp_path: Path, built: list[str]) -> None:
    outside = tmp_path / "outside-secret.txt"
    outside.write_text("host secret\n")
    ctx = make_context(
        tmp_path / "ctx",
        "FROM busybox\nCOPY . /ctx/\n",
        {"ok.txt": "fine\n"},
    )
    (ctx / "abs-link").symlink_to(outside)
    (ctx / "rel-link").symlink_to("../outside-secret.txt")
    (ctx / "dir-link").symlink_to(tmp_path)
    result, _ = build(ctx, "tbtest-links:1", built)
    said = [n for n in result.notes if "points outside the context" in n]
    assert len(said) == 3
    with Sandbox.create("tbtest-links:1", tier="container") as sb:
        r = sb.run(
            ["sh", "-c", "ls -l /ctx | tail -n +2; cat /ctx/abs-link /ctx/rel-link 2>&1; true"]
        )
    listing = r.stdout.decode()
    assert "abs-link -> " in listing and "rel-link -> ../outside-secret.txt" in listing
    assert "host secret" not in listing  # links copied as links, their targets never read
    # naming a link as a COPY source resolves inside the context: it is not there
    (ctx / "Dockerfile").write_text("FROM busybox\nCOPY abs-link /x\n")
    with pytest.raises(BuildError) as info:
        build_image(BuildOptions(ctx, "tbtest-links:2"))
    assert "host secret" not in str(info.value)
    (ctx / "Dockerfile").write_text("FROM busybox\nCOPY dir-link/outside-secret.txt /x\n")
    with pytest.raises(BuildError):
        build_image(BuildOptions(ctx, "tbtest-links:2"))
    no_leftovers()


def test_ctrl_c_leaves_no_half_image_and_no_container(tmp_path: Path, store: ImageStore) -> None:
    ctx = make_context(tmp_path / "ctx", "FROM busybox\nRUN echo started && sleep 60\n")
    with contextlib.suppress(ImageNotFoundError):  # an earlier run that was not interrupted
        store.remove("tbtest-interrupted:1")
    proc = subprocess.Popen(
        [*TIERBOX, "image", "build", "-t", "tbtest-interrupted:1", str(ctx)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    seen = b""
    deadline = time.monotonic() + 60
    assert proc.stderr is not None
    while b"started" not in seen and time.monotonic() < deadline:
        seen += os.read(proc.stderr.fileno(), 4096)
    assert b"started" in seen, seen
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130, rest
    assert b"nothing was stored" in rest
    with pytest.raises(ImageNotFoundError):
        store.resolve("tbtest-interrupted:1")
    no_leftovers()
    assert not [p for p in Buildah().tmp.iterdir() if p.name.startswith("build-")]


def test_runtime_choice_is_said() -> None:
    runtime = choose_runtime()
    if hybrid_cgroups():
        assert runtime.name == "runc" and "hybrid" in runtime.why
    else:
        assert runtime.name in ("crun", "runc")


# ------------------------------------------------------------------ gates


def test_lint_gate_stops_before_building(tmp_path: Path, store: ImageStore) -> None:
    ctx = make_context(tmp_path / "ctx", "FROM busybox\nENV API_TOKEN=abc123\nRUN touch /x\n")
    r = cli("image", "build", "--lint", "--fail-on", "high", "-t", "tbtest-gate:1", str(ctx))
    assert r.returncode == 1
    assert b"lint gate stopped the build" in r.stderr and b"TB005" in r.stderr
    assert b"STEP" not in r.stderr  # nothing built
    with pytest.raises(ImageNotFoundError):
        store.resolve("tbtest-gate:1")


def test_scan_gate_stops_before_storing(
    tmp_path: Path, debian: str, store: ImageStore, built: list[str]
) -> None:
    ctx = make_context(tmp_path / "ctx", "FROM debian:bookworm\nRUN echo ok > /ok\n")
    db = tmp_path / "osv"
    db.mkdir()
    (db / "TIERBOX-TEST-0001.json").write_text(
        json.dumps(
            {
                "id": "TIERBOX-TEST-0001",
                "modified": "2026-01-02T00:00:00Z",
                "summary": "a test advisory for every base-files before 99",
                "aliases": ["CVE-0000-0001"],
                "severity": [
                    {"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N"}
                ],
                "affected": [
                    {
                        "package": {"ecosystem": "Debian:12", "name": "base-files"},
                        "ranges": [
                            {"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "99"}]}
                        ],
                    }
                ],
            }
        )
    )
    r = cli(
        "image", "build", "--scan", "--db", str(db), "--fail-on", "high",
        "-t", "tbtest-gate:2", str(ctx), timeout=600,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert b"scan gate stopped the build: TIERBOX-TEST-0001" in r.stderr
    assert b"base-files" in r.stderr and b"severity high" in r.stderr
    with pytest.raises(ImageNotFoundError):
        store.resolve("tbtest-gate:2")
    no_leftovers()
    # critical only: the same finding passes and the image is stored
    built.append("tbtest-gate:2")
    r = cli(
        "image", "build", "--scan", "--db", str(db), "--fail-on", "critical",
        "-t", "tbtest-gate:2", str(ctx), timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert store.resolve("tbtest-gate:2").ref == "tbtest-gate:2"


# ------------------------------------------------------------------ the example


@pytest.mark.slow
def test_dependency_conflict_example(python311: str, tmp_path: Path) -> None:
    """Two apps needing two incompatible versions of one library, built with tierbox
    and run side by side on container and microVM."""
    example = ROOT / "examples" / "dependency-conflict"
    env = {**os.environ, "PYTHON": sys.executable, "TIERS": "container microvm"}
    try:
        r = subprocess.run(
            ["bash", str(example / "run.sh")],
            capture_output=True,
            env={**env, "WORK": str(tmp_path / "work")},
            timeout=900,
            cwd=tmp_path,
        )
    finally:
        for app in ("legacy-app", "modern-app"):
            with contextlib.suppress(ImageNotFoundError):
                default_store().remove(f"depconflict/{app}:1")
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "cannot be installed side by side" in out
    for tier in ("container", "microvm"):
        assert f"[{tier}] legacy-app: packaging 21.3" in out
        assert f"[{tier}] modern-app: packaging 24" in out
