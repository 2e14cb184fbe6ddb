"""What every tierbox CLI module shares: consoles, option types, error exits,
argument parsing (tiers, environment, sizes) and how a workload's result is
printed."""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from tierbox.errors import UnknownTierError, UsageError
from tierbox.network import Egress, PortMap, check_network
from tierbox.spec import ExecResult, Mount, TerminationKind

#: C0 controls but tab and newline, DEL and C1 controls, as visible escapes
_CONTROLS = {
    c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c not in (0x09, 0x0A)
}


def plain(text: object) -> str:
    """Text that may come from a sandbox, safe for a terminal: escape
    sequences, BEL, CR and the other control characters are shown as
    ``\\xNN`` (so a guest cannot clear the screen, plant hyperlinks or
    overwrite a line); newlines and tabs stay."""
    return str(text).translate(_CONTROLS)


class PlainConsole(Console):
    """A rich console that prints every string literally: no markup, no
    highlighting, control characters escaped (:func:`plain`). Errors,
    names, listings and inspect fields can hold a sandbox's text, and
    ``[/bold]`` in it must print as itself, not crash the CLI; tierbox's
    own styling is given as :class:`rich.text.Text`."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("markup", False)
        kwargs.setdefault("highlight", False)
        super().__init__(**kwargs)

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(plain(text), **kwargs)


out = PlainConsole()
err = PlainConsole(stderr=True, soft_wrap=True)  # one error, one line, however long
#: options after the image/name belong to the workload, not to tierbox
PASSTHROUGH = {"allow_interspersed_args": False}

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
EnvOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--env",
        "-e",
        metavar="KEY[=VALUE]",
        help="Set a variable (repeatable); KEY alone takes its value from this shell.",
    ),
]
EnvFileOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--env-file",
        metavar="FILE",
        help="Read KEY=VALUE lines from FILE (repeatable; # comments; -e wins).",
    ),
]


def error_text(exc: BaseException) -> Text:
    """``tierbox: <error>`` with the prefix styled and the error's text
    (which may quote a sandbox) plain."""
    return Text.assemble(("tierbox:", "bold red"), " ", plain(exc))


def fail(exc: BaseException) -> NoReturn:
    """Print a one-line error; exit 2 for usage errors, 125 for anything else
    (as docker run does). A command missing in the sandbox is not an error
    here: it is a result with status 127, mirrored like any other."""
    err.print(error_text(exc))
    if isinstance(exc, UsageError):
        raise typer.Exit(2)
    raise typer.Exit(125)


# ---- arguments -------------------------------------------------------------------------


def resolve_tier(name: str) -> str:
    """A tier name as typed (any case) as the registry spells it; a typo is
    an UnknownTierError that suggests the closest name."""
    from tierbox.tiers import tier_names

    names = tier_names()
    key = name.strip().lower()
    if key in names:
        return key
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UnknownTierError(f"unknown tier {name!r}: {hint}choose one of {', '.join(names)}")


def parse_env(
    pairs: Sequence[str] | None,
    files: Sequence[Path] | None = None,
    *,
    environ: Callable[[str], str | None] = os.environ.get,
) -> dict[str, str]:
    """The workload's variables as ``docker run`` builds them: ``--env-file``
    lines first, then ``-e`` (which wins). ``KEY`` without ``=`` takes its
    value from this process's environment and is left out when unset there."""
    env: dict[str, str] = {}
    for path in files or []:
        env.update(read_env_file(path, environ=environ))
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not key or key != key.strip() or any(c.isspace() for c in key):
            raise UsageError(f"bad --env {pair!r}: use KEY=VALUE or KEY")
        if sep:
            env[key] = value
        elif (found := environ(key)) is not None:
            env[key] = found
    return env


def read_env_file(
    path: Path, *, environ: Callable[[str], str | None] = os.environ.get
) -> dict[str, str]:
    """An env file as Docker reads it: one ``KEY=VALUE`` per line, the value
    taken literally (no quotes removed, no ``$`` expanded); leading blanks
    dropped; blank lines and ``#`` lines skipped; ``KEY`` alone takes this
    process's value, or is left out."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--env-file {path}: {exc.strerror}") from exc
    try:
        text = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--env-file {path}: not UTF-8 ({exc.reason})") from exc
    env: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not key:
            raise UsageError(f"--env-file {path}:{n}: no variable name before '='")
        if any(c.isspace() for c in key):
            raise UsageError(f"--env-file {path}:{n}: variable {key!r} contains whitespace")
        if sep:
            env[key] = value
        elif (found := environ(key)) is not None:
            env[key] = found
    return env


def parse_volume(text: str) -> Mount:
    """``-v HOST:PATH[:ro|rw]`` as Docker reads it: read-write unless ``:ro``."""
    parts = text.split(":")
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        return Mount(parts[0], parts[1], read_only=parts[2] == "ro")
    if len(parts) == 2 and parts[0] and parts[1]:
        return Mount(parts[0], parts[1], read_only=False)
    raise UsageError(f"bad --volume {text!r}: use HOST:PATH or HOST:PATH:ro")


def workload_argv(argv: list[str] | None) -> list[str]:
    """The workload's argv; click keeps the ``--`` separator when options
    after the image are not interspersed, so drop it here."""
    argv = list(argv or [])
    return argv[1:] if argv[:1] == ["--"] else argv


# ---- printing --------------------------------------------------------------------------


def fmt_bytes(n: int | float | None) -> str:
    """A size for people: MiB below a GiB, GiB above ("-" when unknown)."""
    if n is None:
        return "-"
    if abs(n) >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB"


def fmt_mib(mib: int | float | None) -> str:
    """A size given in MiB, as :func:`fmt_bytes` prints it."""
    return "-" if mib is None else fmt_bytes(mib * (1 << 20))


def write_out(chunk: bytes) -> None:
    """Workload output to our stdout, as it comes (a callback for on_stdout)."""
    _write_all(sys.stdout.fileno(), chunk)


def write_err(chunk: bytes) -> None:
    _write_all(sys.stderr.fileno(), chunk)


def write_console(chunk: bytes) -> None:
    """A guest's serial console to our stdout. On a terminal its control
    characters are shown escaped (:func:`plain`; a guest root writes what
    it likes to its console), its CR LF line ends as LF; piped, it is raw."""
    if os.isatty(sys.stdout.fileno()):
        chunk = plain(chunk.decode(errors="replace").replace("\r\n", "\n")).encode()
    write_out(chunk)


def _write_all(fd: int, chunk: bytes) -> None:
    view = memoryview(chunk)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            continue
        except BrokenPipeError:
            return  # the reader left (| head): the workload goes on
        view = view[n:]


def emit_result(r: ExecResult, as_json: bool, *, streamed: bool = False) -> NoReturn:
    """Print the workload's output (or JSON) and exit with its status;
    ``streamed``: the output was shown as it came, only the ending is left."""
    if as_json:
        print(json.dumps(r.to_dict()))
    else:
        if not streamed:
            sys.stdout.buffer.write(r.stdout)
            sys.stdout.buffer.flush()
            sys.stderr.buffer.write(r.stderr)
            sys.stderr.buffer.flush()
        t = r.termination
        if t.kind is not TerminationKind.EXITED:
            err.print(f"tierbox: {t.describe()}", highlight=False, markup=False)
        elif r.stdout_truncated or r.stderr_truncated:
            err.print("tierbox: output truncated at the output limit", highlight=False)
    raise typer.Exit(r.exit_code)


# ---- help without typer's type noise ------------------------------------------------------

_TYPE_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "Path": "PATH"}


def quiet_help() -> None:
    """Help as Docker and click print it: METAVARs (IMAGE, [COMMAND]..., SIZE)
    instead of typer's Python types (``<bool>``, ``<list[str]>``) and braced
    argument names (``{image}``). typer has no setting for this, so its
    display hooks are replaced; tests/test_cli_docker.py fails if a typer
    upgrade brings the noise back."""
    from typer import core

    arg_cls: Any = getattr(core, "TyperArgument", None)
    opt_cls: Any = getattr(core, "TyperOption", None)
    if arg_cls is None or opt_cls is None or getattr(arg_cls, "_tierbox_quiet", False):
        return

    def arg_name(self: Any) -> str:
        name = self.metavar or self.name.upper()
        return name if self.metavar is not None or self.nargs == 1 else f"{name}..."

    def arg_usage(self: Any) -> str:
        if self.metavar is not None:
            return str(self.metavar)
        name = self.name.upper()
        if not self.required:
            name = f"[{name}]"
        return name if self.nargs == 1 or name.endswith("...") else f"{name}..."

    def arg_type(self: Any, ctx: Any) -> str | None:
        return None  # the name column already says what it is

    original = opt_cls.display_type_rich

    def opt_type(self: Any, ctx: Any) -> str | None:
        if self.metavar is not None:
            return str(self.metavar) or None
        if getattr(self, "is_flag", False) or getattr(self, "is_bool_flag", False):
            return None
        label = str(original(self, ctx) or "").strip("<>").removesuffix("...").rstrip(">")
        if label.startswith("list["):
            label = label[5:-1]
        label = label.split(" ")[0]  # "int range" and its bounds, shown apart
        return _TYPE_NAMES.get(label, label.upper()) or None

    arg_cls.display_name_raw = property(lambda self: self.metavar or self.name.upper())
    for name, fn in (
        ("_rich_display_name", arg_name),
        ("_usage_display_name", arg_usage),
        ("display_type_rich", arg_type),
    ):
        if hasattr(arg_cls, name):
            setattr(arg_cls, name, fn)
    opt_cls.display_type_rich = opt_type
    arg_cls._tierbox_quiet = True


quiet_help()


NetOpt = Annotated[
    str,
    typer.Option(
        "--network",
        metavar="MODE",
        help="none (loopback only), egress (only to --allow) or host (process, container).",
    ),
]
AllowOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--allow",
        metavar="HOST:PORT",
        help="With --network egress: a destination it may reach (HOST:PORT, CIDR:PORT-RANGE, "
        "name.example:443; names are resolved once, now); repeatable.",
    ),
]
DnsOpt = Annotated[
    bool,
    typer.Option("--dns", help="With --network egress: let it ask the host's DNS resolvers too."),
]
PublishOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--publish",
        "-p",
        metavar="[IP:]HOSTPORT:PORT",
        help="Publish a sandbox port on the host's loopback (IP 0.0.0.0 for every interface); "
        "repeatable.",
    ),
]


def network_options(
    network: str, allow: list[str] | None, dns: bool, publish: list[str] | None
) -> dict[str, Any]:
    """make_spec's ``network`` and ``ports`` from --network, --allow, --dns
    and --publish."""
    policy = check_network(network, allow or ())
    if dns:
        if not isinstance(policy, Egress):
            raise UsageError("--dns goes with --network egress")
        policy = Egress(policy.allow, dns=True)
    return {"network": policy, "ports": [PortMap.parse(p) for p in publish or ()]}
