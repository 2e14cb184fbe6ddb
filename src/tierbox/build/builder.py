"""``tierbox image build``: a Dockerfile built offline by buildah into tierbox's store.

FROM lines resolve to images in tierbox's store (``python:3.11-slim`` to the
bootstrapped ``python:3.11``, said when it happens), which are handed to
buildah through an OCI layout, never a registry. RUN steps get no network
unless asked. The result leaves buildah as a docker-archive and enters the
store through the same import as any archive (every layer parsed, checked and
rewritten), so a built image is checked like an imported one. Gates (lint
before the build, scan before the import) stop a build before anything is
stored.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tierbox.build.buildah import BUILT_PREFIX, Buildah, Runtime, choose_runtime, parse_image_id
from tierbox.build.parse import Dockerfile, Instruction, Stage, expand, parse_file
from tierbox.errors import BuildError, DockerfileError, ImageNotFoundError, UsageError
from tierbox.images import bootstrap as boot
from tierbox.images.refs import canonical_ref, parse_ref
from tierbox.images.store import ImageRecord, ImageStore, default_store

Progress = Callable[[str], None]
#: A gate gets the built image as a docker-archive before it is stored; it raises
#: GateError to stop the build.
ArchiveGate = Callable[[Path], None]

DOCKERFILE_NAMES = ("Dockerfile", "Containerfile")
#: Tag suffixes that name a slimmer flavour of the same Debian image; tierbox's
#: bootstrapped images are minbase already, so ``python:3.11-slim`` is ``python:3.11``.
_FLAVOUR_SUFFIXES = ("-slim-bookworm", "-slim", "-bookworm")
_TAG_ALIASES = {"debian:12": "debian:bookworm", "debian:stable-slim": "debian:bookworm"}
#: How many context entries the symlink survey looks at before it stops.
_SURVEY_MAX_ENTRIES = 100_000
_BUILT_RECORD = "built.json"


@dataclass(frozen=True)
class BuildOptions:
    """What ``tierbox image build`` was asked."""

    context: Path
    tag: str
    dockerfile: Path | None = None
    build_args: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    network: bool = False


@dataclass(frozen=True)
class BaseImage:
    """A FROM (or ``COPY --from``) image resolved to the store."""

    written: str  # as the Dockerfile names it, ARGs expanded
    record: ImageRecord
    line: int
    note: str  # non-empty when the name was resolved to another image


@dataclass
class BuildResult:
    """A finished build."""

    record: ImageRecord
    runtime: Runtime
    image_id: str
    steps: int
    cached_steps: int
    duration_s: float
    bases: list[BaseImage]
    notes: list[str]
    #: True when buildah's image was already the stored one (every step cached)
    unchanged: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "ref": self.record.ref,
            "manifest_digest": self.record.manifest_digest,
            "buildah_image_id": self.image_id,
            "runtime": self.runtime.name,
            "runtime_why": self.runtime.why,
            "steps": self.steps,
            "cached_steps": self.cached_steps,
            "duration_s": round(self.duration_s, 3),
            "bases": [
                {"from": b.written, "image": b.record.ref, "line": b.line, "note": b.note}
                for b in self.bases
            ],
            "notes": self.notes,
            "unchanged": self.unchanged,
        }


def find_dockerfile(context: Path, dockerfile: Path | None) -> Path:
    if dockerfile is not None:
        return dockerfile
    for name in DOCKERFILE_NAMES:
        if (context / name).is_file():
            return context / name
    raise UsageError(f"no Dockerfile in {context}: give one with -f")


def resolve_image(
    written: str, store: ImageStore, *, path: str, line: int
) -> tuple[ImageRecord, str]:
    """The store image a FROM names, and a note when tierbox chose another name for it."""
    where = f"{path}:{line}"
    try:
        return store.resolve(written), ""
    except ImageNotFoundError as exc:
        missing = exc
    except UsageError as exc:
        raise DockerfileError(str(exc), path=path, line=line) from exc
    key = canonical_ref(written)
    name, tag = parse_ref(key)
    alias = _TAG_ALIASES.get(key)
    for suffix in _FLAVOUR_SUFFIXES:
        if (
            alias is None
            and tag.endswith(suffix)
            and f"{name}:{tag[: -len(suffix)]}" in boot.TARGETS
        ):
            alias = f"{name}:{tag[: -len(suffix)]}"
    if alias is not None:
        target = boot.TARGETS[alias]
        what = (
            f"tierbox's {alias}: Debian {target.suite} minbase"
            + (f" with {', '.join(target.packages)}" if target.packages else "")
            + ", already a slim image"
        )
        try:
            record = store.resolve(alias)
        except ImageNotFoundError as exc:
            raise ImageNotFoundError(
                f"{where}: FROM {written} means {what}, which is not in the store: "
                f"get it with `tierbox image bootstrap {alias}`"
            ) from exc
        return record, f"FROM {written} ({where}) resolves to {what}"
    raise ImageNotFoundError(f"{where}: FROM {written}: {missing}") from missing


def resolve_bases(
    df: Dockerfile, needed: list[Stage], build_args: dict[str, str], store: ImageStore
) -> tuple[dict[int, BaseImage], dict[tuple[int, str], BaseImage]]:
    """Store images for each needed stage's FROM (by stage index) and for each
    ``COPY --from=IMAGE`` that names no stage (by line and name)."""
    args = df.meta_arg_defaults(build_args)
    froms: dict[int, BaseImage] = {}
    copies: dict[tuple[int, str], BaseImage] = {}
    for st in needed:
        written = expand(st.base, args)
        if not written:
            raise DockerfileError(
                "FROM names no image after ARG expansion", path=df.path, line=st.line
            )
        if written.lower() != "scratch" and not _earlier_stage(df, written, st.index):
            record, note = resolve_image(written, store, path=df.path, line=st.line)
            froms[st.index] = BaseImage(written, record, st.line, note)
        for inst in st.instructions:
            src = inst.flag("from") if inst.cmd == "COPY" else None
            if src and not _earlier_stage(df, src, st.index):
                record, note = resolve_image(src, store, path=df.path, line=inst.line)
                copies[(inst.line, src)] = BaseImage(src, record, inst.line, note)
    return froms, copies


def _earlier_stage(df: Dockerfile, ref: str, before: int) -> bool:
    st = df.stage(ref)
    return st is not None and st.index < before


def rewrite(
    df: Dockerfile,
    froms: dict[int, BaseImage],
    copies: dict[tuple[int, str], BaseImage],
    names: dict[str, str],
) -> str:
    """The Dockerfile buildah builds: FROM and ``COPY --from`` images replaced by their
    names in buildah's storage, every other line (and every line number) unchanged."""
    lines = list(df.lines)
    for st in df.stages:
        base = froms.get(st.index)
        if base is not None:
            _replace_instruction(lines, st.from_, _from_line(st, names[base.record.ref]))
        for inst in st.instructions:
            for (line, src), img in copies.items():
                if line == inst.line:
                    _replace_flag(lines, inst, src, names[img.record.ref])
    return "\n".join(lines) + "\n"


def _from_line(st: Stage, image: str) -> str:
    flags = " ".join(st.from_.flags)
    alias = f" AS {st.name}" if st.name else ""
    return f"FROM {flags + ' ' if flags else ''}{image}{alias}"


def _replace_instruction(lines: list[str], inst: Instruction, text: str) -> None:
    first, last = inst.line - 1, inst.end_line - 1
    lines[first] = text
    for n in range(first + 1, last + 1):
        lines[n] = ""  # keep every later line number


def _replace_flag(lines: list[str], inst: Instruction, src: str, image: str) -> None:
    for n in range(inst.line - 1, inst.end_line):
        for form in (f"--from={src}", f'--from="{src}"'):
            if form in lines[n]:
                lines[n] = lines[n].replace(form, f"--from={image}", 1)
                return


def survey_context(context: Path) -> list[str]:
    """Symlinks in the build context that point outside it. buildah copies them as
    links and resolves COPY sources inside the context, so their targets are never
    read; the build says so rather than staying silent."""
    found: list[str] = []
    root = os.path.realpath(context)
    seen = 0
    for dirpath, dirnames, filenames in os.walk(context):
        for name in dirnames + filenames:
            seen += 1
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                target = os.readlink(full)
                resolved = os.path.realpath(full)
                if resolved != root and not resolved.startswith(root + os.sep):
                    found.append(f"{os.path.relpath(full, context)} -> {target}")
        if seen > _SURVEY_MAX_ENTRIES:
            break
    return found


class _BuiltRecord:
    """buildah image id -> store manifest digest of what a build stored: a rebuild
    whose every step was cached finds its image already stored and skips the import."""

    def __init__(self, root: Path) -> None:
        self.path = root / _BUILT_RECORD

    def load(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def stored(self, image_id: str, ref: str, store: ImageStore) -> ImageRecord | None:
        entry = self.load().get(f"{image_id} {ref}")
        if not entry:
            return None
        try:
            record = store.resolve(ref)
        except ImageNotFoundError:
            return None
        return record if record.manifest_digest == entry.get("manifest_digest") else None

    def remember(self, image_id: str, record: ImageRecord) -> None:
        data = self.load()
        data[f"{image_id} {record.ref}"] = {"manifest_digest": record.manifest_digest}
        if len(data) > 500:  # oldest first: dicts keep insertion order
            data = dict(list(data.items())[-500:])
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)


def build_image(
    options: BuildOptions,
    *,
    store: ImageStore | None = None,
    progress: Progress | None = None,
    before_build: Callable[[Dockerfile], None] | None = None,
    archive_gate: ArchiveGate | None = None,
    buildah: Buildah | None = None,
) -> BuildResult:
    """Build ``options`` and store the image under ``options.tag``.

    ``before_build`` sees the parsed Dockerfile (the lint gate); ``archive_gate``
    sees the built image before it is stored (the scan gate). Either raises to
    stop the build; nothing is stored then, and no buildah container is left.
    """
    say = progress or (lambda _line: None)
    started = time.monotonic()
    st = store or default_store()
    context = options.context
    if not context.is_dir():
        raise UsageError(f"build context {context} is not a directory")
    key = canonical_ref(options.tag)
    path = find_dockerfile(context, options.dockerfile)
    df = parse_file(path)
    needed = df.needed_stages(options.target)
    froms, copies = resolve_bases(df, needed, options.build_args, st)
    notes = [b.note for b in [*froms.values(), *copies.values()] if b.note]
    for note in notes:
        say(note)
    if before_build is not None:
        before_build(df)
    for link in survey_context(context):
        notes.append(
            f"context symlink {link} points outside the context: copied as a link, never followed"
        )
        say(notes[-1])
    runtime = choose_runtime()
    say(f"RUN steps use {runtime.name}: {runtime.why}")
    say("RUN steps have " + ("the host's network (--network)" if options.network else "no network"))
    bh = buildah or Buildah()
    record_of_builds = _BuiltRecord(bh.root)
    with bh.locked(say):
        names: dict[str, str] = {}
        for base in [*froms.values(), *copies.values()]:
            if base.record.ref not in names:
                names[base.record.ref] = bh.ensure_base(base.record, st, say)
        bh.tmp.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="build-", dir=bh.tmp) as tmp_s:
            tmp = Path(tmp_s)
            rewritten = tmp / "Dockerfile"
            rewritten.write_text(rewrite(df, froms, copies, names))
            iidfile = tmp / "iid"
            args = _bud_args(options, runtime, rewritten, iidfile, key)
            log = bh.bud(args, context=context, progress=say)
            if log.returncode != 0:
                raise BuildError(
                    f"building {key} from {path} failed (buildah exit {log.returncode}); "
                    "nothing was stored",
                    output=log.failure(),
                )
            image_id = parse_image_id(iidfile)
            stored = (
                None if archive_gate is not None else record_of_builds.stored(image_id, key, st)
            )
            if stored is not None:
                say(f"every step was cached: {key} ({stored.manifest_digest[:19]}) is stored")
                return BuildResult(
                    stored, runtime, image_id, len(log.steps), log.cached_steps,
                    time.monotonic() - started, [*froms.values(), *copies.values()], notes,
                    unchanged=True,
                )  # fmt: skip
            archive = tmp / "image.tar"
            say(f"exporting {key} from buildah")
            bh.push_archive(image_id, archive, key)
            if archive_gate is not None:
                archive_gate(archive)
            record = st.import_archive(archive, name=key, progress=say)
            record_of_builds.remember(image_id, record)
    say(f"stored {record.ref} ({record.manifest_digest[:19]})")
    return BuildResult(
        record, runtime, image_id, len(log.steps), log.cached_steps,
        time.monotonic() - started, [*froms.values(), *copies.values()], notes,
    )  # fmt: skip


def _bud_args(
    options: BuildOptions, runtime: Runtime, dockerfile: Path, iidfile: Path, key: str
) -> list[str]:
    name, tag = parse_ref(key)
    args = [
        "--file", str(dockerfile),
        "--tag", f"{BUILT_PREFIX}{name}:{tag}",
        "--iidfile", str(iidfile),
        "--pull=never",
        f"--network={'host' if options.network else 'none'}",
        "--runtime", runtime.path,
        "--layers",
        "--force-rm",
        "--format", "docker",
    ]  # fmt: skip
    if options.no_cache:
        args.append("--no-cache")
    if options.target:
        args += ["--target", options.target]
    for k, v in options.build_args.items():
        args += ["--build-arg", f"{k}={v}"]
    return args
