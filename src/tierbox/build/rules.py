"""tierbox's own Dockerfile rules: the production-image advice hadolint does not check.

Each rule has an id, a severity, a one-line why and a fix. Rules read the
instructions BuildKit's parser gives (:mod:`tierbox.build.parse`); shell text in
RUN is split into simple commands with :mod:`shlex`, never matched as a whole
with regexes.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tierbox.build.parse import Dockerfile, Instruction, Stage, expand


@dataclass(frozen=True)
class Rule:
    """One tierbox lint rule."""

    id: str
    name: str
    severity: str  # error | warning | info | style
    why: str
    fix: str
    #: hadolint rules this one covers on the same line (the merged report keeps one)
    supersedes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hit:
    """A rule firing at a line, with the message for this case."""

    rule: Rule
    line: int
    message: str
    severity: str = ""  # empty: the rule's own

    @property
    def level(self) -> str:
        return self.severity or self.rule.severity


RUNS_AS_ROOT = Rule(
    "TB001",
    "runs-as-root",
    "warning",
    "a process that breaks out of the application runs as root inside the container",
    "add a user in the final stage (RUN useradd --create-home app) and switch to it (USER app)",
    supersedes=("DL3002",),
)
BUILD_TOOLS = Rule(
    "TB002",
    "build-tools-in-final-stage",
    "warning",
    "compilers, -dev packages and pip caches in the final image add size and attack "
    "surface that a multi-stage build would leave behind",
    "install and build in a builder stage (FROM ... AS build), then COPY --from=build only "
    "the results; use pip install --no-cache-dir",
    supersedes=("DL3042",),
)
CACHE_BUSTING = Rule(
    "TB003",
    "source-before-dependencies",
    "warning",
    "copying the whole source before installing dependencies re-runs the install on "
    "every source change (the layer cache is lost)",
    "COPY the dependency manifest alone (requirements.txt, package*.json, go.mod/go.sum), "
    "install, then COPY . .",
)
LARGE_BASE = Rule(
    "TB004",
    "large-base-image",
    "info",
    "a full base image carries compilers and tools the application does not need at run "
    "time: larger downloads, more packages to patch",
    "use the slim variant (for example python:3.11-slim) for the final stage",
)
SECRETS = Rule(
    "TB005",
    "secret-in-env-or-arg",
    "error",
    "ENV values are stored in the image config and ARG values in its history: anyone "
    "who can pull the image can read them",
    "pass secrets at run time (environment, mounted files) or with RUN --mount=type=secret",
    supersedes=("DL3064",),
)
NO_HEALTHCHECK = Rule(
    "TB006",
    "no-healthcheck",
    "info",
    "without a HEALTHCHECK an orchestrator cannot tell a hung service from a healthy one",
    "add HEALTHCHECK --interval=30s CMD <a request to the service> (or HEALTHCHECK NONE "
    "to say there is none on purpose)",
)

RULES: tuple[Rule, ...] = (
    RUNS_AS_ROOT,
    BUILD_TOOLS,
    CACHE_BUSTING,
    LARGE_BASE,
    SECRETS,
    NO_HEALTHCHECK,
)

# ---------------------------------------------------------------- shell words

_SEPARATORS = frozenset({"&&", "||", ";", "|", "&", "(", ")", ";;", "|&"})
#: Programs that run the command after them, with their options that take a value.
_WRAPPERS: dict[str, frozenset[str]] = {
    "sudo": frozenset({"-u", "-g", "-C", "-D", "-h", "-p", "-r", "-t", "-U", "-T"}),
    "env": frozenset({"-u", "-C", "-S"}),
    "nice": frozenset({"-n"}),
    "time": frozenset({"-f", "-o"}),
    "exec": frozenset({"-a"}),
    "command": frozenset(),
    "nohup": frozenset(),
}
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def simple_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell string (``a && b; c | d`` -> a, b, c, d), with
    leading ``VAR=value`` assignments and wrappers like ``sudo`` removed."""
    lexer = shlex.shlex(text.replace("\\\n", " "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: shlex gives up; words are still words
        tokens = text.split()
    out: list[list[str]] = []
    current: list[str] = []
    for tok in tokens:
        if tok in _SEPARATORS:
            if current:
                out.append(current)
            current = []
        else:
            current.append(tok)
    if current:
        out.append(current)
    return [c for c in (_strip(c) for c in out) if c]


def _strip(words: list[str]) -> list[str]:
    while words and (_ASSIGNMENT.match(words[0]) or words[0] in _WRAPPERS):
        takes_value = _WRAPPERS.get(words[0], frozenset())
        words = words[1:]
        while len(words) > 1 and words[0].startswith("-"):  # sudo -u app, env -i
            words = words[2:] if words[0] in takes_value else words[1:]
    return words


def _run_commands(inst: Instruction) -> list[list[str]]:
    if inst.cmd != "RUN":
        return []
    if inst.json:
        words = list(inst.value)
        if len(words) >= 3 and words[1] == "-c":
            return simple_commands(words[2])
        return [words]
    return simple_commands(inst.shell_text)


def _pip_args(words: list[str]) -> list[str] | None:
    """The arguments after ``pip install`` (``pip3``, ``python -m pip``), or None."""
    prog = words[0].rsplit("/", 1)[-1]
    rest = words[1:]
    if re.fullmatch(r"python[0-9.]*", prog) and rest[:2] == ["-m", "pip"]:
        rest = rest[2:]
    elif not re.fullmatch(r"pip[0-9.]*", prog):
        return None
    return rest[1:] if rest[:1] == ["install"] else None


_PKG_MANAGERS = {
    "apt-get": "install",
    "apt": "install",
    "apk": "add",
    "yum": "install",
    "dnf": "install",
    "microdnf": "install",
    "zypper": "install",
}
_REMOVERS = frozenset({"remove", "purge", "autoremove", "del", "erase"})
_BUILD_TOOLS = frozenset(
    {
        "gcc", "g++", "cc", "clang", "make", "cmake", "build-essential", "build-base",
        "gfortran", "autoconf", "automake", "libtool", "pkg-config", "pkgconf", "cargo",
        "rustc", "golang", "golang-go", "linux-headers", "musl-dev", "libc6-dev",
        "python3-dev", "python3-pip", "ninja-build", "meson",
    }
)  # fmt: skip


def _installed_packages(cmd: list[str]) -> list[str]:
    prog = cmd[0].rsplit("/", 1)[-1]
    verb = _PKG_MANAGERS.get(prog)
    if verb is None or verb not in cmd[1:]:
        return []
    args = cmd[cmd.index(verb, 1) + 1 :]
    return [a.split("=", 1)[0] for a in args if not a.startswith("-")]


def _removed_packages(cmd: list[str]) -> set[str]:
    prog = cmd[0].rsplit("/", 1)[-1]
    if prog not in _PKG_MANAGERS or not _REMOVERS & set(cmd[1:]):
        return set()
    return {a for a in cmd[1:] if not a.startswith("-") and a not in _REMOVERS}


def _is_build_tool(pkg: str) -> bool:
    base = pkg.split(":", 1)[0]
    return base in _BUILD_TOOLS or base.endswith(("-dev", "-devel")) or base.startswith("gcc-")


# ---------------------------------------------------------------- rules


def _stage_chain(df: Dockerfile, stage: Stage) -> list[Stage]:
    """``stage`` and the earlier stages it is built FROM, nearest first."""
    chain = [stage]
    while True:
        parent = df.stage(chain[-1].base)
        if parent is None or parent.index >= chain[-1].index or parent in chain:
            return chain
        chain.append(parent)


def _final_instructions(df: Dockerfile) -> list[Instruction]:
    """Instructions that shape the final image, its stage chain's included, in order."""
    chain = _stage_chain(df, df.final)
    return [i for st in reversed(chain) for i in st.instructions]


def check_runs_as_root(df: Dockerfile) -> Iterator[Hit]:
    users = [i for i in _final_instructions(df) if i.cmd == "USER"]
    if not users:
        yield Hit(
            RUNS_AS_ROOT,
            df.final.line,
            "the final stage sets no USER: the container runs as root",
        )
        return
    last = users[-1]
    name = last.value[0].split(":", 1)[0] if last.value else ""
    if name in ("root", "0"):
        yield Hit(
            RUNS_AS_ROOT,
            last.line,
            f"the final stage's last USER is {last.value[0]}: the container runs as root",
        )


def check_build_tools(df: Dockerfile) -> Iterator[Hit]:
    final = df.final
    no_pip_cache = any(
        i.cmd == "ENV"
        and _env_pairs(i).get("PIP_NO_CACHE_DIR", "").lower() not in ("", "0", "false", "no", "off")
        for i in _final_instructions(df)
    )
    for inst in final.instructions:
        cmds = _run_commands(inst)
        removed: set[str] = set()
        for cmd in cmds:
            removed |= _removed_packages(cmd)
        tools: list[str] = []
        pip_cache = False
        for cmd in cmds:
            tools += [p for p in _installed_packages(cmd) if _is_build_tool(p) and p not in removed]
            pip = _pip_args(cmd)
            if pip is not None and "--no-cache-dir" not in pip and not no_pip_cache:
                pip_cache = True
        what = []
        if tools:
            what.append("build tools " + ", ".join(dict.fromkeys(tools)))
        if pip_cache:
            what.append("pip's download cache (pip install without --no-cache-dir)")
        if what:
            yield Hit(
                BUILD_TOOLS,
                inst.line,
                f"the final stage keeps {' and '.join(what)}",
            )


def _pip_from_manifest(cmd: list[str]) -> bool:
    """``pip install -r requirements.txt`` or a project install (``.``, ``-e .``)."""
    args = _pip_args(cmd)
    if args is None:
        return False
    return any(
        a in ("-r", "--requirement", ".", "-e") or a.startswith("--requirement=") for a in args
    )


def _npm_install_all(cmd: list[str]) -> bool:
    """``npm install`` of package.json (no package names given)."""
    return cmd[:2] in (["npm", "install"], ["npm", "i"]) and all(a.startswith("-") for a in cmd[2:])


_DEP_INSTALLS: tuple[tuple[str, Callable[[list[str]], bool]], ...] = (
    ("pip install -r", _pip_from_manifest),
    ("npm ci", lambda c: c[:2] == ["npm", "ci"]),
    ("npm install", _npm_install_all),
    ("yarn install", lambda c: c[0] == "yarn" and (len(c) == 1 or c[1] == "install")),
    ("pnpm install", lambda c: c[:2] == ["pnpm", "install"]),
    ("go mod download", lambda c: c[:3] == ["go", "mod", "download"]),
    ("poetry install", lambda c: c[:2] == ["poetry", "install"]),
    ("pipenv install", lambda c: c[:2] == ["pipenv", "install"]),
    ("bundle install", lambda c: c[:2] == ["bundle", "install"]),
    ("composer install", lambda c: c[:2] == ["composer", "install"]),
    ("cargo fetch", lambda c: c[:2] == ["cargo", "fetch"]),
)  # fmt: skip


def _copies_everything(inst: Instruction) -> bool:
    if inst.cmd not in ("COPY", "ADD") or inst.flag("from") is not None:
        return False
    return any(src in (".", "./", "*", "./*", ".\\") for src in inst.value[:-1])


def check_cache_busting(df: Dockerfile) -> Iterator[Hit]:
    for st in df.stages:
        copied: Instruction | None = None
        for inst in st.instructions:
            if copied is None and _copies_everything(inst):
                copied = inst
                continue
            if copied is None:
                continue
            for cmd in _run_commands(inst):
                label = next((lbl for lbl, test in _DEP_INSTALLS if cmd and test(cmd)), None)
                if label is not None:
                    yield Hit(
                        CACHE_BUSTING,
                        copied.line,
                        f"{copied.original.split(chr(10))[0]} (line {copied.line}) comes before "
                        f"{label} (line {inst.line}): every source change re-runs the install",
                    )
                    copied = None  # one finding per COPY
                    break


#: Official images with a slim flavour of the same distribution.
_SLIM_FLAVOURS = frozenset({"python", "node", "ruby", "perl", "debian", "openjdk", "rust", "php"})


def check_large_base(df: Dockerfile) -> Iterator[Hit]:
    st = df.final
    if df.stage(st.base) is not None:
        return
    image = expand(st.base, df.meta_arg_defaults({}))
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    short = name.removeprefix("docker.io/").removeprefix("library/")
    if short not in _SLIM_FLAVOURS or "@" in image:
        return
    tag = tag or "latest"
    if any(flavour in tag for flavour in ("slim", "alpine", "distroless")):
        return
    slim = f"{short}:{'slim' if tag == 'latest' else tag + '-slim'}"
    yield Hit(LARGE_BASE, st.line, f"the final stage starts FROM {image}; {slim} exists")


_SECRET_KEY = re.compile(
    r"(pass(word|wd|phrase)?|secret|token|api[_-]?key|private[_-]?key|access[_-]?key|"
    r"credentials?|auth[_-]?key|client[_-]?secret)",
    re.IGNORECASE,
)
_NOT_SECRET_SUFFIX = re.compile(r"(_FILE|_PATH|_DIR|_URL|_HOST|_USER(NAME)?)$", re.IGNORECASE)
_SECRET_VALUE = re.compile(
    r"(AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|xox[abprs]-[A-Za-z0-9-]{10,}|"
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----|sk-[A-Za-z0-9]{20,})"
)


def _env_pairs(inst: Instruction) -> dict[str, str]:
    words = list(inst.value)
    return {words[i]: words[i + 1].strip("\"'") for i in range(0, len(words) - 1, 2)}


def _arg_pairs(inst: Instruction) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for word in inst.value:
        key, sep, default = word.partition("=")
        out[key] = default.strip("\"'") if sep else None
    return out


def check_secrets(df: Dockerfile) -> Iterator[Hit]:
    instructions = df.meta_args + [i for st in df.stages for i in st.instructions]
    for inst in sorted(instructions, key=lambda i: i.line):
        pairs: dict[str, str | None]
        if inst.cmd == "ENV":
            pairs = dict(_env_pairs(inst))
        elif inst.cmd == "ARG":
            pairs = _arg_pairs(inst)
        else:
            continue
        for key, value in pairs.items():
            if value and _SECRET_VALUE.search(value):
                yield Hit(
                    SECRETS, inst.line, f"{inst.cmd} {key} holds what looks like a credential"
                )
                continue
            if not _SECRET_KEY.search(key) or _NOT_SECRET_SUFFIX.search(key):
                continue
            if inst.cmd == "ENV" and value:
                yield Hit(SECRETS, inst.line, f"ENV {key} puts a secret into the image config")
            elif inst.cmd == "ARG":
                yield Hit(
                    SECRETS,
                    inst.line,
                    f"ARG {key} passes a secret through the build: its value is kept in "
                    "the image history of every RUN after it"
                    + (" and it has a default in the Dockerfile" if value else ""),
                    severity="error" if value else "warning",
                )


_SERVERS = frozenset(
    {
        "gunicorn", "uvicorn", "hypercorn", "daphne", "waitress-serve", "nginx", "httpd",
        "apache2ctl", "caddy", "php-fpm", "redis-server", "postgres", "mysqld", "mongod",
        "flask", "serve", "http-server", "traefik", "envoy", "haproxy", "memcached",
    }
)  # fmt: skip


def _is_service(words: list[str]) -> bool:
    if not words:
        return False
    prog = words[0].rsplit("/", 1)[-1]
    if prog in _SERVERS:
        return True
    if re.fullmatch(r"python[0-9.]*", prog) and (
        words[1:3]
        in (["-m", "http.server"], ["-m", "uvicorn"], ["-m", "gunicorn"], ["-m", "flask"])
        or "runserver" in words
    ):
        return True
    if prog in ("npm", "yarn", "pnpm") and "start" in words[1:3]:
        return True
    return prog in ("java",) and "-jar" in words


def _start_words(inst: Instruction) -> list[str]:
    """The program and arguments a CMD or ENTRYPOINT starts (shell form: its last command)."""
    if inst.json:
        return list(inst.value)
    cmds = simple_commands(" ".join(inst.value))
    return cmds[-1] if cmds else []


def check_healthcheck(df: Dockerfile) -> Iterator[Hit]:
    insts = _final_instructions(df)
    if any(i.cmd == "HEALTHCHECK" for i in insts):
        return
    expose = next((i for i in insts if i.cmd == "EXPOSE"), None)
    starts = [i for i in insts if i.cmd in ("CMD", "ENTRYPOINT")]
    service = None
    for inst in reversed(starts):
        if _is_service(_start_words(inst)):
            service = inst
            break
    if service is not None:
        yield Hit(
            NO_HEALTHCHECK,
            service.line,
            f"the image runs a service ({service.original.strip()}) with no HEALTHCHECK",
        )
    elif expose is not None:
        yield Hit(
            NO_HEALTHCHECK,
            expose.line,
            f"the image exposes {' '.join(expose.value)} (a long-running service) "
            "with no HEALTHCHECK",
        )


CHECKS: tuple[Callable[[Dockerfile], Iterator[Hit]], ...] = (
    check_runs_as_root,
    check_build_tools,
    check_cache_busting,
    check_large_base,
    check_secrets,
    check_healthcheck,
)


def run_rules(df: Dockerfile) -> list[Hit]:
    """Every tierbox rule over ``df``, minus those a ``# hadolint ignore=`` pragma names."""
    hits = [h for check in CHECKS for h in check(df)]
    return [h for h in hits if not df.is_ignored(h.rule.id, h.line)]
