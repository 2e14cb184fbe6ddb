"""Driving buildah: a private storage, the OCI runtime its RUN steps use, base images
handed over from tierbox's store, and ``buildah bud`` streamed step by step.

buildah keeps its layer cache in a containers-storage of tierbox's own
(``$TIERBOX_HOME/build/storage``), never the host's ``/var/lib/containers``, so
nothing tierbox builds mixes with podman's images and every leftover in it is
tierbox's. One build runs at a time per storage (an flock); an interrupted
build's working containers are removed under that lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierbox import paths
from tierbox.errors import BuildError, CommandError, HostError
from tierbox.host.mntns import hybrid_cgroups
from tierbox.host.runner import require, run, spawn, which
from tierbox.images.layout import Blob, StagingLayout
from tierbox.images.store import HEAVY_TIMEOUT_S, ImageRecord, ImageStore

Progress = Callable[[str], None]

#: Where base images live in buildah's storage: a name no registry serves.
BASE_PREFIX = "localhost/tierbox-base/"
#: Where built images are tagged in buildah's storage (their layers are the cache).
BUILT_PREFIX = "localhost/tierbox-build/"
RUNTIME_ENV = "TIERBOX_BUILD_RUNTIME"
#: How long buildah gets to clean up after SIGINT before it is killed.
STOP_GRACE_S = 15.0
#: Lines of a failing step's output an error carries.
ERROR_TAIL_LINES = 60
_MAX_LINE_CHARS = 600


@dataclass(frozen=True)
class Runtime:
    """The OCI runtime buildah's RUN steps use, and why that one."""

    name: str
    path: str
    why: str


def build_dir() -> Path:
    return paths.home() / "build"


def choose_runtime() -> Runtime:
    """crun where it works, runc on hybrid-cgroup hosts (crun there fails every RUN step
    with "cgroups in hybrid mode not supported"); ``TIERBOX_BUILD_RUNTIME`` overrides."""
    forced = os.environ.get(RUNTIME_ENV)
    if forced:
        return Runtime(forced, require(forced, forced), f"{RUNTIME_ENV}={forced}")
    if hybrid_cgroups():
        return Runtime(
            "runc",
            require("runc", "runc"),
            "crun refuses this host's hybrid cgroups (v1 controllers beside cgroup2)",
        )
    crun = which("crun")
    if crun is not None:
        return Runtime("crun", crun, "crun is installed and this host's cgroups suit it")
    return Runtime("runc", require("runc", "runc"), "crun is not installed")


class Buildah:
    """buildah on tierbox's private storage."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else build_dir()
        self.storage = self.root / "storage"
        self.runroot = paths.run_dir() / "build" / _short_hash(str(self.storage))
        self.tmp = self.root / "tmp"
        self.tool = require("buildah", "buildah")

    # ------------------------------------------------------------- basics
    @property
    def storage_spec(self) -> str:
        """The containers-storage transport's store spec, for skopeo."""
        return f"overlay@{self.storage}+{self.runroot}"

    def argv(self, *args: str) -> list[str]:
        return [
            self.tool,
            "--root",
            str(self.storage),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "overlay",
            *args,
        ]

    def env(self) -> dict[str, str]:
        """buildah writes large temporary files under TMPDIR: keep them beside the storage."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "TMPDIR": str(self.tmp)}

    def run(self, *args: str, timeout_s: float = 120.0, check: bool = True) -> str:
        proc = run(self.argv(*args), env=self.env(), timeout_s=timeout_s, check=check)
        return proc.stdout.decode(errors="replace")

    @contextlib.contextmanager
    def locked(self, progress: Progress) -> Iterator[None]:
        """One build at a time on this storage; leftovers of an interrupted build are
        removed once the lock is held (every container in this storage is a build's)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                progress("waiting for another tierbox build on this host to finish")
                fcntl.flock(fd, fcntl.LOCK_EX)
            self.remove_leftovers()
            yield
        finally:
            os.close(fd)

    def containers(self) -> list[str]:
        """Working containers in this storage (a finished build leaves none)."""
        if not self.storage.exists():
            return []
        out = self.run("containers", "--all", "--quiet", check=False)
        return [line.strip() for line in out.splitlines() if line.strip()]

    def remove_containers(self) -> list[str]:
        left = self.containers()
        if left:
            self.run("rm", "--all", check=False)
        return left

    def remove_leftovers(self, *, temporary_files: bool = True) -> list[str]:
        """What a killed build left: buildah's working containers, the runtime's
        records of RUN containers (their bundles live in our TMPDIR) and, with
        ``temporary_files``, the files in that TMPDIR. Called with the build lock
        held."""
        removed = [f"buildah container {c[:12]}" for c in self.remove_containers()]
        tmp = str(self.tmp.resolve()) + os.sep if self.tmp.exists() else None
        for name in ("runc", "crun"):
            runtime = which(name)
            if runtime is None or tmp is None:
                continue
            proc = run([runtime, "list", "--format", "json"], check=False, timeout_s=30)
            try:
                entries = json.loads(proc.stdout or b"null") or []
            except ValueError:
                continue
            for entry in entries:
                bundle = str(entry.get("bundle") or "")
                if bundle.startswith(tmp):
                    run([runtime, "delete", "--force", str(entry.get("id"))], check=False)
                    removed.append(f"{name} container {entry.get('id')}")
        if temporary_files and self.tmp.is_dir():
            for stale in self.tmp.iterdir():
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
                removed.append(f"temporary {stale.name}")
        return removed

    def has_image(self, name: str) -> bool:
        if not self.storage.exists():
            return False
        proc = run(
            self.argv("inspect", "--type", "image", "--format", "{{.FromImageID}}", name),
            env=self.env(),
            check=False,
        )
        return proc.returncode == 0

    # ------------------------------------------------------------- bases
    def base_name(self, record: ImageRecord) -> str:
        """buildah's name for a store image: pinned to its manifest digest, so a re-tagged
        store image is loaded again and an unchanged one never is."""
        name = "".join(c if c.isalnum() or c in "._/-" else "-" for c in record.name.lower())
        return f"{BASE_PREFIX}{name}:{record.tag}-{record.manifest_digest[7:19]}"

    def ensure_base(self, record: ImageRecord, store: ImageStore, progress: Progress) -> str:
        """Load a store image into buildah's storage once (no registry: an OCI layout
        copied by skopeo) and return the name a FROM line can use."""
        name = self.base_name(record)
        if self.has_image(name):
            return name
        progress(f"loading {record.ref} ({record.manifest_digest[:19]}) into the build cache")
        skopeo = require("skopeo", "skopeo")
        self.tmp.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="base-", dir=self.tmp) as tmp:
            layout = Path(tmp) / "oci"
            run(
                [skopeo, "--insecure-policy", "copy", "--quiet",
                 f"oci:{store.layout}:{record.ref}", f"oci:{layout}:{record.ref}"],
                env={**os.environ, "TMPDIR": tmp},
                timeout_s=HEAVY_TIMEOUT_S,
                message=f"skopeo could not read {record.ref} from the image store",
            )  # fmt: skip
            _complete_history(layout, record.ref)
            run(
                [skopeo, "--insecure-policy", "copy", "--quiet",
                 f"oci:{layout}:{record.ref}", f"containers-storage:[{self.storage_spec}]{name}"],
                env={**os.environ, "TMPDIR": tmp},
                timeout_s=HEAVY_TIMEOUT_S,
                message=f"skopeo could not load {record.ref} into the build cache",
            )  # fmt: skip
        return name

    # ------------------------------------------------------------- bud
    def bud(
        self,
        args: Sequence[str],
        *,
        context: Path,
        progress: Progress,
    ) -> BudLog:
        """Run ``buildah bud ARGS CONTEXT``, each output line to ``progress``.

        buildah runs in a session of its own, so a terminal's Ctrl-C reaches only
        tierbox, which stops buildah (SIGINT, then SIGKILL after a grace period),
        removes the working containers it left and re-raises.
        """
        log = BudLog()
        proc = spawn(
            self.argv("bud", *args, str(context)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env(),
            start_new_session=True,
            message="cannot start buildah",
        )
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                if len(line) > _MAX_LINE_CHARS:
                    line = line[:_MAX_LINE_CHARS] + " [...]"
                log.add(line)
                progress(line)
            log.returncode = proc.wait()
        except BaseException:
            self._stop(proc)
            self.remove_leftovers(temporary_files=False)  # the caller removes its own
            raise
        return log

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE_S
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # the RUN step's runtime processes share buildah's session: none may outlive it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def push_archive(self, image_id: str, dest: Path, ref: str) -> None:
        """Write the built image as a docker-archive (keeps HEALTHCHECK and the whole
        docker config) for the store's import to check and rewrite."""
        self.run(
            "push", "--quiet", image_id, f"docker-archive:{dest}:{ref}",
            timeout_s=HEAVY_TIMEOUT_S,
        )  # fmt: skip


@dataclass
class BudLog:
    """What ``buildah bud`` printed: every step's header and the tail of the output."""

    returncode: int | None = None

    def __post_init__(self) -> None:
        self.steps: list[str] = []
        self.cached_steps = 0
        self.tail: deque[str] = deque(maxlen=400)
        self.step_output: list[str] = []  # the current step's lines

    def add(self, line: str) -> None:
        self.tail.append(line)
        if " STEP " in f" {line}" and ": " in line and _is_step(line):
            self.steps.append(line)
            self.step_output = [line]
            return
        self.step_output.append(line)
        if line.startswith("--> Using cache"):
            self.cached_steps += 1

    def failure(self) -> str:
        """The failing step and its output (capped)."""
        lines = self.step_output or list(self.tail)
        if len(lines) > ERROR_TAIL_LINES:
            lines = [lines[0], "[...]", *lines[-(ERROR_TAIL_LINES - 2) :]]
        return "\n".join(lines)


def _is_step(line: str) -> bool:
    """buildah's step headers: ``STEP 2/5: RUN ...`` or ``[1/2] STEP 2/5: RUN ...``."""
    head = line.split("] ", 1)[1] if line.startswith("[") and "] " in line else line
    return head.startswith("STEP ") and ":" in head


def _complete_history(layout: Path, ref: str) -> None:
    """Give an image one history entry per layer when its history does not match its
    layers (umoci's and debootstrap's images have none); buildah refuses to commit on
    top of such an image and matches its layer cache by history.

    Written here because no tool edits an image's history in place; the
    layers are untouched, only the config, manifest and index are rewritten.
    """
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / desc["digest"][7:]).read_text())
    config: dict[str, Any] = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
    layers = manifest["layers"]
    history = config.get("history") or []
    if sum(1 for h in history if not h.get("empty_layer")) == len(layers):
        return
    created = config.get("created") or "1970-01-01T00:00:00Z"
    config["history"] = [
        {"created": created, "created_by": f"tierbox image {ref}, layer {i}/{len(layers)}"}
        for i in range(1, len(layers) + 1)
    ]
    diff_ids = config["rootfs"]["diff_ids"]
    staged = StagingLayout(layout)
    staged.write_image(
        ref,
        config,
        [
            (Blob(d["digest"], int(d["size"])), diff)
            for d, diff in zip(layers, diff_ids, strict=True)
        ],
        dict(manifest.get("annotations") or {}),
    )


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_image_id(path: Path) -> str:
    """The image id ``--iidfile`` wrote."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise BuildError(f"buildah wrote no image id ({exc.strerror})") from exc
    return text.removeprefix("sha256:")


def version() -> str:
    """buildah's version, for reports."""
    try:
        out = run([require("buildah", "buildah"), "--version"], timeout_s=30).stdout.decode()
    except (CommandError, HostError):
        return ""
    return out.split()[2] if len(out.split()) > 2 else out.strip()
