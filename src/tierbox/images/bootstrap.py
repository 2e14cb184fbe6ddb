"""Build Debian-based images with debootstrap, from the apt mirror this host already uses.

Only a short, known list of images can be bootstrapped, so that the result is
predictable: ``debian:bookworm`` (minbase) and ``python:3.11`` (minbase plus
bookworm's python3, which is 3.11).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tierbox.errors import CommandError
from tierbox.host.runner import require, run

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_TIMEOUT_S = 1800.0
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class BootstrapTarget:
    """One image debootstrap can make."""

    suite: str
    packages: tuple[str, ...]
    cmd: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


TARGETS: dict[str, BootstrapTarget] = {
    "debian:bookworm": BootstrapTarget("bookworm", (), ("bash",), {"PATH": PATH_ENV}),
    "python:3.11": BootstrapTarget(
        "bookworm", ("python3",), ("python3",), {"PATH": PATH_ENV, "LANG": "C.UTF-8"}
    ),
}


def find_mirror(suite: str, apt_dir: Path = Path("/etc/apt")) -> str:
    """The first apt ``deb`` source serving ``suite`` (the host's mirror is known to work).

    Reads one-line ``sources.list`` files and deb822 ``*.sources`` files; falls
    back to a source serving any suite, then to deb.debian.org.
    """
    sources: list[tuple[str, list[str]]] = []
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if path.name.endswith(".sources"):
            sources += _deb822_sources(text)
        elif path.name.endswith(".list"):
            sources += _one_line_sources(text)
    usable = [(u.rstrip("/"), s) for u, s in sources if u.startswith(("http://", "https://"))]
    for uri, suites in usable:
        if suite in suites:
            return uri
    for uri, _ in usable:
        if "security" not in uri:
            return uri
    return DEFAULT_MIRROR


def _one_line_sources(text: str) -> list[tuple[str, list[str]]]:
    found = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # options: [arch=amd64 signed-by=...]
            while words and not words[0].endswith("]"):
                words.pop(0)
            words = words[1:]
        if len(words) >= 2:
            found.append((words[0], [words[1]]))
    return found


def _deb822_sources(text: str) -> list[tuple[str, list[str]]]:
    found = []
    for para in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in para.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            found.append((uri, fields.get("suites", "").split()))
    return found


def debootstrap(
    target: BootstrapTarget,
    rootfs: Path,
    mirror: str,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Run debootstrap into ``rootfs``, streaming its ``I:`` lines to ``progress``.

    The runner captures output until the command ends, so debootstrap's stdout
    is sent to a log file that this thread tails while the runner waits.
    """
    tool = require("debootstrap", "debootstrap")
    argv = [tool, "--variant=minbase"]
    if target.packages:
        argv.append("--include=" + ",".join(target.packages))
    argv += [target.suite, str(rootfs), mirror]
    log = rootfs.parent / "debootstrap.out"
    log.touch()
    # argv goes through "$@" untouched; the shell only adds the redirection.
    wrapped = ["bash", "-c", 'log=$1; shift; exec "$@" >>"$log"', "tierbox-debootstrap", str(log)]
    failure: list[CommandError] = []

    def work() -> None:
        try:
            run([*wrapped, *argv], timeout_s=DEBOOTSTRAP_TIMEOUT_S, message="debootstrap failed")
        except CommandError as exc:
            failure.append(exc)

    worker = threading.Thread(target=work, name="debootstrap", daemon=True)
    worker.start()
    with log.open(errors="replace") as out:
        while True:
            finished = not worker.is_alive()
            for line in out.readlines():
                if progress is not None and line.strip():
                    progress(line.rstrip())
            if finished:
                break
            time.sleep(0.2)
    if failure:
        exc = failure[0]
        log_tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise CommandError(
            argv, exc.returncode, log_tail + "\n" + exc.stderr, message="debootstrap failed"
        ) from exc


def tidy(rootfs: Path) -> None:
    """Drop what an image should not carry: device nodes, .debs, apt lists, this host's name.

    Runtimes populate /dev themselves, and the image scanner refuses device nodes.
    debootstrap copies the host's /etc/hostname and /etc/resolv.conf; runtimes
    provide their own.
    """
    for name, text in (("hostname", "localhost\n"), ("resolv.conf", "")):
        path = rootfs / "etc" / name
        path.unlink(missing_ok=True)  # never write through a symlink to the host
        path.write_text(text)
    for sub in ("dev", "var/cache/apt/archives", "var/lib/apt/lists"):
        directory = rootfs / sub
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            if entry.name in ("partial", "lock"):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def unmount_under(path: Path) -> None:
    """Unmount anything debootstrap left mounted under ``path`` (proc, sys) before deleting it."""
    prefix = str(path.resolve()) + "/"
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    points = [line.split()[1] for line in mounts if len(line.split()) > 1]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        run(["umount", "-l", point], check=False)
    if os.path.ismount(path):
        run(["umount", "-l", str(path)], check=False)
