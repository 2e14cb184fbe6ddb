"""Small static C helpers tierbox builds for itself (``host/helpers/*.c``).

Each is compiled once with the host's C compiler (``gcc -static``, from
Debian's gcc + libc6-dev, installed by set-up) into the cache, keyed by the
source's sha256, so an edited source is rebuilt and a stale binary is never
used. ``path()`` returns None where no compiler exists; callers then fall
back to a slower way of doing the same job.
"""

from __future__ import annotations

import hashlib
import os
from functools import cache
from pathlib import Path

from tierbox.errors import CommandError
from tierbox.host.locks import file_lock
from tierbox.host.runner import run, which
from tierbox.paths import home

SOURCES = Path(__file__).resolve().parent / "helpers"


def cache_dir() -> Path:
    return home() / "cache" / "helpers"


@cache
def path(name: str) -> Path | None:
    """The built helper ``name`` (built now if needed), or None without a compiler."""
    source = SOURCES / f"{name}.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{digest}"
    if target.exists():
        return target
    cc = which("gcc") or which("cc")
    if cc is None:
        return None
    with file_lock(cache_dir() / f".{name}.lock"):
        if not target.exists():
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            try:
                run([cc, "-static", "-O2", "-o", str(tmp), str(source)], timeout_s=120)
            except CommandError:
                tmp.unlink(missing_ok=True)
                return None
            os.replace(tmp, target)
    return target


def main() -> int:
    """Build every helper now (set-up calls this)."""
    for source in sorted(SOURCES.glob("*.c")):
        built = path(source.stem)
        print(f"helper {source.stem}: {built or 'not built: no C compiler (apt-get install gcc)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
