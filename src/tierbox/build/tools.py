"""Finding the PyPI-shipped tools (hadolint, syft) that live beside tierbox's Python."""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

from tierbox.errors import HostError
from tierbox.host.runner import run, which


def tool(name: str, pypi: str) -> str:
    """Full path of ``name``: on PATH, or in the virtualenv tierbox runs from (its
    ``bin`` is not on PATH when tierbox is called as ``.venv/bin/tierbox``)."""
    found = which(name)
    if found is not None:
        return found
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise HostError(f"{name} is not installed: run `make setup` (PyPI package {pypi})")


@lru_cache(maxsize=8)
def tool_version(path: str, *args: str) -> str:
    """The first version-looking word a tool prints for ``args`` (empty when none)."""
    proc = run([path, *args], timeout_s=30, check=False)
    for word in (proc.stdout + proc.stderr).decode(errors="replace").split():
        if word[:1].isdigit() and "." in word:
            return word.strip(",")
    return ""
