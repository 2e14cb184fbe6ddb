"""The image store: one OCI image layout, content-addressed, with a cache of unpacked rootfs trees.

Layout of ``root`` (default ``$TIERBOX_HOME/images``)::

    oci/                  OCI image layout (index.json, blobs/sha256/...), written by umoci/skopeo
    rootfs/<hex>/rootfs   unpacked rootfs of manifest sha256:<hex>, built once, then read-only
    tmp/                  staging for imports, debootstrap and builds (same filesystem)
    lock                  flock: shared for reads of the layout, exclusive for changes

Every JSON blob is hashed when first read and layers are hashed and scanned
(:mod:`tierbox.images.safety`) before anything is unpacked, so a corrupted or
hostile blob is refused rather than run. Imports rewrite every layer
canonically first (:mod:`tierbox.images.importer`), bounded in size and entries.
:meth:`ImageStore.rootfs` is on the sandbox start path: when the rootfs is cached it
costs a few ``stat`` calls.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierbox import paths
from tierbox.errors import ImageError, ImageNotFoundError, UsageError
from tierbox.host.runner import require, run
from tierbox.images import bootstrap as boot
from tierbox.images import builtin
from tierbox.images.importer import stage_archive
from tierbox.images.refs import canonical_ref, parse_ref
from tierbox.images.safety import TarScanner
from tierbox.images.tarstream import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_UNPACKED_BYTES,
    ImportLimits,
    scan_layer,
)

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MAX_UNPACKED_BYTES",
    "ImageConfig",
    "ImageRecord",
    "ImageStore",
    "Progress",
    "canonical_ref",
    "default_store",
    "parse_ref",
]

Progress = Callable[[str], None]

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
MANIFEST_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    }
)
HEAVY_TIMEOUT_S = 900.0  # packing or unpacking a large rootfs
_HASH_CHUNK_BYTES = 1 << 20
_MAX_JSON_BLOB_BYTES = 16 << 20

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an OCI image config a sandbox needs."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = ""
    annotations: dict[str, str] = field(default_factory=dict)  # config labels + manifest notes

    def to_dict(self) -> dict[str, Any]:
        return {
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
            "env": dict(self.env),
            "workdir": self.workdir,
            "user": self.user,
            "annotations": dict(self.annotations),
        }

    @classmethod
    def from_oci(cls, config_blob: dict[str, Any], manifest: dict[str, Any]) -> ImageConfig:
        """Build from an image config blob plus the manifest's annotations (which win)."""
        conf = config_blob.get("config") or {}
        env = {}
        for item in conf.get("Env") or []:
            key, _, value = str(item).partition("=")
            env[key] = value
        notes = {str(k): str(v) for k, v in (conf.get("Labels") or {}).items()}
        notes.update({str(k): str(v) for k, v in (manifest.get("annotations") or {}).items()})
        return cls(
            entrypoint=[str(a) for a in conf.get("Entrypoint") or []],
            cmd=[str(a) for a in conf.get("Cmd") or []],
            env=env,
            workdir=str(conf.get("WorkingDir") or "/"),
            user=str(conf.get("User") or ""),
            annotations=notes,
        )


@dataclass(frozen=True)
class ImageRecord:
    """One tagged image in the store."""

    name: str
    tag: str
    manifest_digest: str
    config: ImageConfig
    size_bytes: int
    created: str

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "name": self.name,
            "tag": self.tag,
            "manifest_digest": self.manifest_digest,
            "size_bytes": self.size_bytes,
            "created": self.created,
            "config": self.config.to_dict(),
        }


_Entry = ImageRecord | ImageError  # an index entry, or why it cannot be used
_IndexKey = tuple[int, int, int, int]


@contextmanager
def _flock(path: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold an flock on ``path`` (created if missing); released when the fd closes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _quiet(_message: str) -> None:
    """Progress sink used when the caller passes none."""


class ImageStore:
    """Tagged OCI images on disk, plus unpacked rootfs trees cached by manifest digest."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else paths.home() / "images"
        self.layout = self.root / "oci"
        self._index_path = self.layout / "index.json"
        self._rootfs_root = self.root / "rootfs"
        self._tmp_root = self.root / "tmp"
        self._lock_path = self.root / "lock"
        self._tls = threading.local()
        # (stat key of index.json, entries by "name:tag"); swapped as one object.
        self._snapshot: tuple[_IndexKey | None, dict[str, _Entry]] = (None, {})
        self._json_blobs: dict[str, dict[str, Any]] = {}  # verified once; blobs are immutable

    # ----------------------------------------------------------------- reading

    def resolve(self, ref: str) -> ImageRecord:
        """The image ``ref`` names (``busybox`` is ``busybox:latest``; digest prefixes work)."""
        entries = self._entries()
        if ref.startswith("sha256:"):
            return self._by_digest(ref, entries)
        key = canonical_ref(ref)
        found = entries.get(key)
        if isinstance(found, ImageRecord):
            return found
        if found is not None:
            raise ImageError(str(found))
        raise ImageNotFoundError(self._not_found_message(key, entries))

    def list(self) -> list[ImageRecord]:
        """Every usable image, sorted by ref."""
        entries = self._entries()
        return [e for _, e in sorted(entries.items()) if isinstance(e, ImageRecord)]

    def rootfs(self, ref: str) -> Path:
        """The unpacked, read-only-by-convention rootfs of ``ref``; unpacked on first use."""
        record = self.resolve(ref)
        path = self._rootfs_root / record.manifest_digest[7:] / "rootfs"
        if path.is_dir():
            return path
        return self._unpack(record.ref)

    def verify(self, ref: str) -> None:
        """Re-hash every blob of ``ref`` (manifest, config, layers); ImageError on a mismatch."""
        record = self.resolve(ref)
        with self._lock(exclusive=False):
            self._verify_blobs(record)

    # ---------------------------------------------------------------- changing

    def remove(self, ref: str) -> None:
        """Untag ``ref``, then drop blobs and the rootfs cache nothing else uses."""
        umoci = require("umoci", "umoci")
        with self._lock(exclusive=True):
            record = self.resolve(ref)
            run([umoci, "rm", "--image", f"{self.layout}:{record.ref}"])
            self._collect_garbage(record)

    def import_archive(
        self,
        path: Path,
        name: str | None = None,
        progress: Progress | None = None,
        *,
        max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> ImageRecord:
        """Import a docker-archive or oci-archive tarball (kind detected from its content).

        The archive and every layer are parsed once, checked and bounded (at most
        ``max_unpacked_bytes`` unpacked and ``max_entries`` entries over all
        layers), and written back canonically into a staging layout; only that
        copy reaches the store, so umoci unpacks exactly what was checked.
        ``name`` sets the ref (and picks that image from a multi-image archive).
        """
        say = progress or _quiet
        limits = ImportLimits(max_unpacked_bytes=max_unpacked_bytes, max_entries=max_entries)
        source = Path(path)
        if not source.is_file():
            raise UsageError(f"{source}: no such file")
        wanted = canonical_ref(name) if name is not None else None
        skopeo = require("skopeo", "skopeo")
        self._tmp_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="import-", dir=self._tmp_root) as tmp:
            staged, key = stage_archive(
                source,
                Path(tmp),
                wanted=name,
                limits=limits,
                name_for=lambda embedded: wanted or self._name_for_archive(embedded, source, say),
                say=say,
            )
            with self._lock(exclusive=True):
                self._ensure_layout()
                previous = self._entries().get(key)
                say(f"storing {key}")
                self._skopeo_copy(skopeo, f"oci:{staged}:{key}", self.layout, key, tmp)
                if isinstance(previous, ImageRecord):
                    self._collect_garbage(previous)
                return self.resolve(key)

    def add_directory(self, ref: str, rootfs_dir: Path, config: ImageConfig) -> ImageRecord:
        """Build a single-layer image from a host directory and tag it ``ref``.

        The directory becomes ``/``; files keep their owners, modes and xattrs.
        """
        source = Path(rootfs_dir)
        if not source.is_dir():
            raise UsageError(f"{source} is not a directory")

        def fill(rootfs: Path) -> None:
            run(
                ["cp", "-a", "--reflink=auto", f"{source}/.", f"{rootfs}/"],
                timeout_s=HEAVY_TIMEOUT_S,
            )

        return self._build(canonical_ref(ref), config, fill)

    def ensure_busybox(self) -> ImageRecord:
        """The built-in ``busybox:latest``, built from the host's busybox-static if missing."""
        found = self._entries().get(builtin.BUSYBOX_REF)
        if isinstance(found, ImageRecord):
            return found
        self.root.mkdir(parents=True, exist_ok=True)
        # One builder at a time; the others wait here and then find the image.
        with _flock(self.root / "busybox.lock", exclusive=True):
            found = self._entries().get(builtin.BUSYBOX_REF)
            if isinstance(found, ImageRecord):
                return found
            config = ImageConfig(
                cmd=list(builtin.BUSYBOX_CMD),
                env=dict(builtin.BUSYBOX_ENV),
                annotations={"org.tierbox.source": "builtin busybox-static"},
            )
            return self._build(builtin.BUSYBOX_REF, config, builtin.make_busybox_rootfs)

    def bootstrap(
        self, ref: str, progress: Progress | None = None, *, force: bool = False
    ) -> ImageRecord:
        """Build ``debian:bookworm`` or ``python:3.11`` with debootstrap from the host's mirror.

        An image already in the store is returned as is unless ``force``.
        """
        say = progress or _quiet
        key = canonical_ref(ref)
        target = boot.TARGETS.get(key)
        if target is None:
            raise UsageError(
                f"cannot bootstrap {ref!r}: tierbox can bootstrap {', '.join(boot.TARGETS)}; "
                "import other images with `tierbox image import FILE.tar`"
            )
        found = self._entries().get(key)
        if isinstance(found, ImageRecord) and not force:
            say(f"{key} is already in the store ({found.manifest_digest[:19]})")
            return found
        mirror = boot.find_mirror(target.suite)
        say(f"debootstrap --variant=minbase {target.suite} from {mirror}")

        def fill(rootfs: Path) -> None:
            boot.debootstrap(target, rootfs, mirror, say)
            boot.tidy(rootfs)
            say(f"packing {key}")

        config = ImageConfig(
            cmd=list(target.cmd),
            env=dict(target.env),
            annotations={"org.tierbox.source": f"debootstrap {target.suite} {mirror}"},
        )
        return self._build(key, config, fill)

    def check_layers(self, record: ImageRecord) -> None:
        """Hash every blob and check every layer's entries; raise before anything unpacks.

        No size limits here: an image was bounded when it was imported or built.
        """
        with self._lock(exclusive=False):
            self._verify_blobs(record)
            manifest = self._manifest(record)
            scanner = TarScanner()
            layers = manifest["layers"]
            for i, layer in enumerate(layers, 1):
                digest = layer["digest"]
                where = f"image {record.ref} layer {i}/{len(layers)} ({digest[:19]})"
                with self._blob_path(digest).open("rb") as fh:
                    scan_layer(fh, where, scanner)

    # ---------------------------------------------------------------- internals

    def _build(self, key: str, config: ImageConfig, fill: Callable[[Path], None]) -> ImageRecord:
        """Make a one-layer image: unpack an empty image, ``fill`` its rootfs, umoci repack.

        The store lock is held only around the umoci steps, not while ``fill``
        runs (debootstrap takes a while). A temporary tag keeps the blobs from gc.
        """
        umoci = require("umoci", "umoci")
        rootless = [] if os.geteuid() == 0 else ["--rootless"]
        self._tmp_root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="build-", dir=self._tmp_root))
        bundle = work / "bundle"
        image = f"{self.layout}:tierbox-tmp-{uuid.uuid4().hex[:16]}"
        tagged = False
        try:
            with self._lock(exclusive=True):
                self._ensure_layout()
                run([umoci, "new", "--image", image])
                run([umoci, "unpack", *rootless, "--image", image, str(bundle)])
            fill(bundle / "rootfs")
            with self._lock(exclusive=True):
                previous = self._entries().get(key)
                run(
                    [umoci, "repack", "--no-history", "--image", image, str(bundle)],
                    timeout_s=HEAVY_TIMEOUT_S,
                )
                run([umoci, "config", "--image", image, "--tag", key, *_config_args(config)])
                run([umoci, "rm", "--image", image])
                tagged = True
                if isinstance(previous, ImageRecord):
                    self._collect_garbage(previous)
                return self.resolve(key)
        finally:
            boot.unmount_under(work)  # debootstrap may leave /proc mounted on failure
            shutil.rmtree(work, ignore_errors=True)
            if not tagged and (self.layout / "oci-layout").is_file():
                with self._lock(exclusive=True):
                    run([umoci, "rm", "--image", image], check=False)
                    run([umoci, "gc", "--layout", str(self.layout)], check=False)

    @contextmanager
    def _lock(self, *, exclusive: bool) -> Iterator[None]:
        """The store lock, re-entrant within a thread (flock is per open file, not per thread)."""
        held = getattr(self._tls, "held", None)
        if held is not None:
            if exclusive and held != "ex":
                raise ImageError("image store lock upgrade from shared to exclusive: a tierbox bug")
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with _flock(self._lock_path, exclusive=exclusive):
            self._tls.held = "ex" if exclusive else "sh"
            try:
                yield
            finally:
                self._tls.held = None

    def _entries(self) -> dict[str, _Entry]:
        """Index entries, re-read only when index.json changed (one stat on the fast path)."""
        try:
            st = os.stat(self._index_path)
        except FileNotFoundError:
            return {}
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached_key, cached = self._snapshot
        if key == cached_key:
            return cached
        with self._lock(exclusive=False):
            st = os.stat(self._index_path)
            key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            entries = self._read_index()
        self._snapshot = (key, entries)
        return entries

    def _read_index(self) -> dict[str, _Entry]:
        try:
            index = json.loads(self._index_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ImageError(f"{self._index_path} is unreadable: {exc}") from exc
        entries: dict[str, _Entry] = {}
        for desc in index.get("manifests") or []:
            ref_name = (desc.get("annotations") or {}).get(REF_NAME_ANNOTATION)
            if not isinstance(ref_name, str) or desc.get("mediaType") not in MANIFEST_MEDIA_TYPES:
                continue
            try:
                name, tag = parse_ref(ref_name)
            except UsageError:
                continue
            if f"{name}:{tag}" != ref_name or ref_name.startswith("tierbox-tmp-"):
                continue  # not written by tierbox, or a build in progress
            try:
                entries[ref_name] = self._record(name, tag, desc)
            except ImageError as exc:
                entries[ref_name] = exc
        return entries

    def _record(self, name: str, tag: str, desc: dict[str, Any]) -> ImageRecord:
        ref = f"{name}:{tag}"
        manifest = self._json_blob(str(desc.get("digest")), desc.get("size"), ref)
        try:
            config_desc = manifest["config"]
            config_blob = self._json_blob(config_desc["digest"], config_desc.get("size"), ref)
            size = int(config_desc.get("size", 0)) + sum(
                int(layer.get("size", 0)) for layer in manifest["layers"]
            )
            return ImageRecord(
                name=name,
                tag=tag,
                manifest_digest=str(desc["digest"]),
                config=ImageConfig.from_oci(config_blob, manifest),
                size_bytes=size,
                created=str(config_blob.get("created") or ""),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ImageError(f"image {ref}: malformed manifest or config ({exc!r})") from exc

    def _json_blob(self, digest: str, size: Any, ref: str) -> dict[str, Any]:
        """A JSON blob, hashed on first read (blobs are immutable, so once is enough)."""
        cached = self._json_blobs.get(digest)
        if cached is not None:
            return cached
        path = self._blob_path(digest, ref)
        if path.stat().st_size > _MAX_JSON_BLOB_BYTES:
            raise ImageError(f"image {ref}: blob {digest} is too large for a manifest or config")
        data = path.read_bytes()
        _check_bytes(data, digest, size, ref)
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise ImageError(f"image {ref}: blob {digest} is not JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ImageError(f"image {ref}: blob {digest} is not a JSON object")
        self._json_blobs[digest] = parsed
        return parsed

    def _manifest(self, record: ImageRecord) -> dict[str, Any]:
        return self._json_blob(record.manifest_digest, None, record.ref)

    def _blob_path(self, digest: str, ref: str = "") -> Path:
        """Path of a blob; the digest is validated so that it cannot name another path."""
        if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
            raise ImageError(f"image {ref}: unsupported or malformed digest {digest!r}")
        path = self.layout / "blobs" / "sha256" / digest[7:]
        if not path.is_file():
            raise ImageError(
                f"image {ref}: blob {digest} is missing from {self.layout}; "
                f"remove the image and import or build it again"
            )
        return path

    def _verify_blobs(self, record: ImageRecord) -> None:
        manifest_path = self._blob_path(record.manifest_digest, record.ref)
        _check_bytes(manifest_path.read_bytes(), record.manifest_digest, None, record.ref)
        manifest = self._manifest(record)
        for desc in [manifest["config"], *manifest["layers"]]:
            digest = desc["digest"]
            path = self._blob_path(digest, record.ref)
            hasher = hashlib.sha256()
            with path.open("rb") as fh:
                while chunk := fh.read(_HASH_CHUNK_BYTES):
                    hasher.update(chunk)
            _check_hash(hasher, path.stat().st_size, digest, desc.get("size"), record.ref)

    def _unpack(self, ref: str) -> Path:
        """Build the rootfs cache for ``ref`` once, atomically, under a per-digest lock."""
        umoci = require("umoci", "umoci")
        self._rootfs_root.mkdir(parents=True, exist_ok=True)
        # Shared store lock first (no retag or gc while umoci reads the layout), then
        # the per-digest lock, so concurrent callers wait for one unpack.
        with self._lock(exclusive=False):
            record = self.resolve(ref)
            hex_digest = record.manifest_digest[7:]
            final = self._rootfs_root / hex_digest
            with _flock(self._rootfs_root / f".{hex_digest}.lock", exclusive=True):
                if (final / "rootfs").is_dir():
                    return final / "rootfs"
                for stale in self._rootfs_root.glob(f".tmp-{hex_digest}-*"):
                    shutil.rmtree(stale, ignore_errors=True)  # a crashed unpack
                self.check_layers(record)
                tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{hex_digest}-", dir=self._rootfs_root))
                try:
                    tmp.chmod(0o755)
                    argv = [umoci, "raw", "unpack", "--image", f"{self.layout}:{record.ref}"]
                    if os.geteuid() != 0:
                        argv.append("--rootless")
                    run([*argv, str(tmp / "rootfs")], timeout_s=HEAVY_TIMEOUT_S)
                    os.rename(tmp, final)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
        return final / "rootfs"

    def _collect_garbage(self, dropped: ImageRecord) -> None:
        """After ``dropped`` lost its tag: remove its rootfs cache if unused, then umoci gc."""
        in_use = any(
            isinstance(e, ImageRecord) and e.manifest_digest == dropped.manifest_digest
            for e in self._entries().values()
        )
        if not in_use:
            hex_digest = dropped.manifest_digest[7:]
            cached = self._rootfs_root / hex_digest
            if cached.exists():
                trash = self._rootfs_root / f".trash-{hex_digest}-{uuid.uuid4().hex[:8]}"
                os.rename(cached, trash)  # vanish atomically, then delete at leisure
                shutil.rmtree(trash, ignore_errors=True)
            (self._rootfs_root / f".{hex_digest}.lock").unlink(missing_ok=True)
        run([require("umoci", "umoci"), "gc", "--layout", str(self.layout)])

    def _ensure_layout(self) -> None:
        if (self.layout / "oci-layout").is_file():
            return
        if self.layout.exists():
            raise ImageError(f"{self.layout} exists but is not an OCI layout; move it away")
        self.root.mkdir(parents=True, exist_ok=True)
        run([require("umoci", "umoci"), "init", "--layout", str(self.layout)])

    def _skopeo_copy(self, skopeo: str, source: str, layout: Path, key: str, tmp: str) -> None:
        # Local files carry no signatures; trust comes from the scan, not from policy.json.
        run(
            [skopeo, "--insecure-policy", "copy", "--quiet", source, f"oci:{layout}:{key}"],
            env={**os.environ, "TMPDIR": tmp},
            timeout_s=HEAVY_TIMEOUT_S,
            message=f"skopeo could not copy {source}",
        )

    @staticmethod
    def _name_for_archive(embedded: str | None, source: Path, say: Progress) -> str:
        if embedded:
            try:
                return canonical_ref(embedded)
            except UsageError:
                pass
        stem = re.sub(r"[^a-z0-9._-]+", "-", source.name.lower().split(".")[0]).strip("-._")
        key = f"{stem or 'imported'}:latest"
        say(f"the archive names no usable image; storing it as {key} (pass a name to choose)")
        return key

    def _by_digest(self, digest: str, entries: dict[str, _Entry]) -> ImageRecord:
        matches = [
            e
            for e in entries.values()
            if isinstance(e, ImageRecord) and e.manifest_digest.startswith(digest)
        ]
        if len({m.manifest_digest for m in matches}) == 1:
            return matches[0]
        if matches:
            raise UsageError(f"digest prefix {digest!r} is ambiguous: give more digits")
        raise ImageNotFoundError(self._not_found_message(digest, entries))

    def _not_found_message(self, key: str, entries: dict[str, _Entry]) -> str:
        present = sorted(k for k, e in entries.items() if isinstance(e, ImageRecord))
        have = f"images present: {', '.join(present)}" if present else "the store is empty"
        if key in boot.TARGETS:
            how = f"get it with `tierbox image bootstrap {key}`"
        elif key == builtin.BUSYBOX_REF:
            how = "build it with `python -m tierbox.images` (part of `make setup`)"
        else:
            how = (
                "import it with `tierbox image import FILE.tar` (docker save, podman save or "
                f"oci-archive), or bootstrap one of {', '.join(boot.TARGETS)} "
                "(e.g. `tierbox image bootstrap debian:bookworm`)"
            )
        return f"image {key} is not in the store at {self.root} ({have}); {how}"


def _config_args(config: ImageConfig) -> list[str]:
    """umoci config flags for ``config``; annotations go to both config labels and manifest."""
    args: list[str] = []
    for word in config.entrypoint:
        args += ["--config.entrypoint", word]
    for word in config.cmd:
        args += ["--config.cmd", word]
    for key, value in config.env.items():
        args += ["--config.env", f"{key}={value}"]
    if config.workdir:
        args += ["--config.workingdir", config.workdir]
    if config.user:
        args += ["--config.user", config.user]
    for key, value in config.annotations.items():
        args += ["--config.label", f"{key}={value}", "--manifest.annotation", f"{key}={value}"]
    return args


def _check_bytes(data: bytes, digest: str, size: Any, ref: str) -> None:
    _check_hash(hashlib.sha256(data), len(data), digest, size, ref)


def _check_hash(hasher: Any, actual_size: int, digest: str, size: Any, ref: str) -> None:
    actual = "sha256:" + hasher.hexdigest()
    if actual != digest or (size is not None and int(size) != actual_size):
        raise ImageError(
            f"image {ref}: blob {digest} is corrupt (content hashes to {actual[:19]}..., "
            f"{actual_size} bytes); remove the image and import or build it again"
        )


_STORES: dict[Path, ImageStore] = {}
_STORES_LOCK = threading.Lock()


def default_store() -> ImageStore:
    """The store under ``$TIERBOX_HOME/images``, one instance per root so caches are shared."""
    root = paths.home() / "images"
    with _STORES_LOCK:
        store = _STORES.get(root)
        if store is None:
            store = _STORES[root] = ImageStore(root)
        return store
