"""Dockerfiles, parsed by BuildKit's own parser (PyPI ``dockerfile``) into stages.

The parser gives instructions with their lines; this module adds what both the
builder and the linter need on top: stages (``FROM ... AS name``), the ARGs
before the first FROM, ``${VAR}`` expansion in FROM lines, the
``# hadolint ignore=`` pragmas (honoured for tierbox's rules too), and errors
that name the line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile  # type: ignore[import-not-found]

from tierbox.errors import DockerfileError

#: Instructions BuildKit knows; anything else is a syntax error here, as it is for buildah.
KNOWN = frozenset(c.upper() for c in dockerfile.all_cmds())
MAX_DOCKERFILE_BYTES = 4 << 20

_PRAGMA_RE = re.compile(r"#\s*hadolint\s+(global\s+)?ignore\s*=\s*([A-Za-z0-9_, ]+)")


@dataclass(frozen=True)
class Instruction:
    """One instruction as BuildKit's parser sees it."""

    cmd: str  # upper case: RUN, COPY, ...
    line: int  # first line, 1-based
    end_line: int
    original: str
    value: tuple[str, ...]
    flags: tuple[str, ...] = ()
    json: bool = False
    sub_cmd: str | None = None  # ONBUILD's instruction
    heredocs: tuple[str, ...] = ()  # heredoc bodies

    def flag(self, name: str) -> str | None:
        """The value of ``--name=value`` (None when absent)."""
        for f in self.flags:
            key, sep, val = f.partition("=")
            if key == f"--{name}":
                return val if sep else ""
        return None

    @property
    def shell_text(self) -> str:
        """A RUN's command as one shell string (JSON form joined by spaces), heredocs appended."""
        text = " ".join(self.value)
        return "\n".join([text, *self.heredocs]) if self.heredocs else text


@dataclass
class Stage:
    """One ``FROM`` and the instructions up to the next."""

    index: int
    from_: Instruction
    base: str  # the image as written (ARGs not yet expanded)
    name: str | None  # ``AS name``, lower-cased as BuildKit does
    instructions: list[Instruction] = field(default_factory=list)

    @property
    def line(self) -> int:
        return self.from_.line

    def label(self) -> str:
        return self.name or str(self.index)


@dataclass
class Dockerfile:
    """A parsed Dockerfile: its stages, the ARGs before the first FROM and the ignore pragmas."""

    path: str
    lines: list[str]
    meta_args: list[Instruction]
    stages: list[Stage]
    #: rule ids ignored for the instruction starting at a line (``# hadolint ignore=``)
    ignored: dict[int, frozenset[str]]
    #: rule ids ignored everywhere (``# hadolint global ignore=``)
    ignored_globally: frozenset[str]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, ref: str) -> Stage | None:
        """The stage ``ref`` names (a name or an index), or None."""
        key = ref.lower()
        for st in self.stages:
            if st.name == key:
                return st
        if key.isdigit() and int(key) < len(self.stages):
            return self.stages[int(key)]
        return None

    def is_ignored(self, rule: str, line: int) -> bool:
        return rule in self.ignored_globally or rule in self.ignored.get(line, frozenset())

    def meta_arg_defaults(self, build_args: dict[str, str]) -> dict[str, str]:
        """Values of the ARGs declared before the first FROM: ``--build-arg`` wins over defaults."""
        values: dict[str, str] = {}
        for inst in self.meta_args:
            for word in inst.value:
                key, sep, default = word.partition("=")
                if key in build_args:
                    values[key] = build_args[key]
                elif sep:
                    values[key] = expand(default, values)
        return values

    def needed_stages(self, target: str | None) -> list[Stage]:
        """The stages a build of ``target`` (default: the last) runs, in order."""
        top = self.stage(target) if target else self.final
        if top is None:
            names = ", ".join(s.label() for s in self.stages)
            raise DockerfileError(
                f"--target {target!r} names no stage (stages: {names})", path=self.path
            )
        wanted: set[int] = set()
        todo = [top]
        while todo:
            st = todo.pop()
            if st.index in wanted:
                continue
            wanted.add(st.index)
            refs = [st.base] + [
                v for i in st.instructions if (v := i.flag("from")) is not None and i.cmd == "COPY"
            ]
            for ref in refs:
                dep = self.stage(ref)
                if dep is not None and dep.index < st.index:
                    todo.append(dep)
        return [s for s in self.stages if s.index in wanted]


def parse_file(path: Path) -> Dockerfile:
    """Parse the Dockerfile at ``path``; DockerfileError names the line of a syntax error."""
    try:
        size = path.stat().st_size
        if size > MAX_DOCKERFILE_BYTES:
            raise DockerfileError(f"{size:,} bytes is too large for a Dockerfile", path=str(path))
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        raise DockerfileError("no such file", path=str(path)) from None
    except IsADirectoryError:
        raise DockerfileError("is a directory, not a Dockerfile", path=str(path)) from None
    except OSError as exc:
        raise DockerfileError(f"cannot read it: {exc.strerror}", path=str(path)) from exc
    return parse_text(text, str(path))


def parse_text(text: str, path: str = "Dockerfile") -> Dockerfile:
    """Parse Dockerfile text (``path`` names it in errors)."""
    lines = text.splitlines()
    try:
        commands = dockerfile.parse_string(text)
    except dockerfile.GoParseError as exc:
        raise DockerfileError(str(exc), path=path, line=_failing_line(lines)) from exc
    meta: list[Instruction] = []
    stages: list[Stage] = []
    for c in commands:
        inst = Instruction(
            cmd=c.cmd.upper(),
            line=c.start_line,
            end_line=c.end_line,
            original=c.original,
            value=tuple(c.value),
            flags=tuple(c.flags),
            json=c.json,
            sub_cmd=c.sub_cmd.upper() if c.sub_cmd else None,
            heredocs=tuple(h.content for h in c.heredocs),
        )
        _check(inst, path)
        if inst.cmd == "FROM":
            stages.append(_stage(inst, len(stages), stages, path))
        elif not stages:
            if inst.cmd != "ARG":
                raise DockerfileError(
                    f"{inst.cmd} before the first FROM: only ARG may come before FROM",
                    path=path,
                    line=inst.line,
                )
            meta.append(inst)
        else:
            stages[-1].instructions.append(inst)
    if not stages:
        raise DockerfileError("no FROM instruction: a Dockerfile starts from an image", path=path)
    ignored, ignored_globally = _pragmas(
        lines, [i for s in stages for i in [s.from_, *s.instructions]] + meta
    )
    return Dockerfile(path, lines, meta, stages, ignored, ignored_globally)


def _check(inst: Instruction, path: str) -> None:
    """What BuildKit's instruction layer would refuse, with the line."""
    if inst.cmd not in KNOWN:
        raise DockerfileError(f"unknown instruction {inst.cmd}", path=path, line=inst.line)
    if inst.cmd == "ONBUILD" and inst.sub_cmd in ("FROM", "ONBUILD", "MAINTAINER"):
        raise DockerfileError(f"ONBUILD {inst.sub_cmd} is not allowed", path=path, line=inst.line)
    if inst.cmd in ("COPY", "ADD") and len(inst.value) < 2:
        raise DockerfileError(
            f"{inst.cmd} needs a source and a destination", path=path, line=inst.line
        )
    if not inst.value and inst.cmd != "FROM":  # FROM's own message comes with its stage
        raise DockerfileError(f"{inst.cmd} needs an argument", path=path, line=inst.line)


def _stage(inst: Instruction, index: int, earlier: list[Stage], path: str) -> Stage:
    words = list(inst.value)
    if len(words) == 1:
        return Stage(index, inst, words[0], None)
    if len(words) == 3 and words[1].lower() == "as":
        name = words[2].lower()
        if not re.fullmatch(r"[a-z][a-z0-9._-]*", name):
            raise DockerfileError(
                f"invalid stage name {words[2]!r}: use letters, digits, '.', '_' and '-'",
                path=path,
                line=inst.line,
            )
        if any(s.name == name for s in earlier):
            raise DockerfileError(f"duplicate stage name {name!r}", path=path, line=inst.line)
        return Stage(index, inst, words[0], name)
    raise DockerfileError(
        "FROM takes an image and optionally AS NAME, like `FROM debian:bookworm AS build`",
        path=path,
        line=inst.line,
    )


def _failing_line(lines: list[str]) -> int:
    """The first line whose prefix of the file no longer parses (the parser's errors carry
    no line); 0 when every prefix parses."""
    for n in range(1, len(lines) + 1):
        try:
            dockerfile.parse_string("\n".join(lines[:n]) + "\n")
        except dockerfile.GoParseError:
            # an unterminated heredoc fails from its opening line on
            return n
    return 0


def _pragmas(
    lines: list[str], instructions: list[Instruction]
) -> tuple[dict[int, frozenset[str]], frozenset[str]]:
    """``# hadolint ignore=A,B`` on the comment lines right above an instruction, and
    ``# hadolint global ignore=...`` anywhere (hadolint's own syntax)."""
    globally: set[str] = set()
    for text in lines:
        m = _PRAGMA_RE.match(text.strip())
        if m and m.group(1):
            globally |= _ids(m.group(2))
    ignored: dict[int, frozenset[str]] = {}
    for inst in instructions:
        ids: set[str] = set()
        n = inst.line - 2  # 0-based index of the line above
        while n >= 0 and lines[n].strip().startswith("#"):
            m = _PRAGMA_RE.match(lines[n].strip())
            if m and not m.group(1):
                ids |= _ids(m.group(2))
            n -= 1
        if ids:
            ignored[inst.line] = frozenset(ids)
    return ignored, frozenset(globally)


def _ids(text: str) -> set[str]:
    return {w.strip().upper() for w in text.split(",") if w.strip()}


_VAR_RE = re.compile(
    r"\\\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)"
)


def expand(word: str, values: dict[str, str]) -> str:
    """Expand ``$VAR``, ``${VAR}``, ``${VAR:-default}`` and ``${VAR:+alt}`` as BuildKit
    does in FROM lines. Written here because the parser binding does not expose
    BuildKit's shell lexer; only these forms are valid in a FROM line."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "\\$":
            return "$"
        name = m.group(1) or m.group(4)
        value = values.get(name, "")
        if m.group(2) == ":-":
            return value or m.group(3)
        if m.group(2) == ":+":
            return m.group(3) if value else ""
        return value

    return _VAR_RE.sub(sub, word)
