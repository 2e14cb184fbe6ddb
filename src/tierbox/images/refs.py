"""Image references: ``name[:tag]``, normalised so that ``busybox`` is ``busybox:latest``."""

from __future__ import annotations

import re
from functools import lru_cache

from tierbox.errors import UsageError

_COMPONENT = r"[a-z0-9]+(?:[._-]+[a-z0-9]+)*"
_NAME_RE = re.compile(rf"(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DROPPED_PREFIXES = ("docker.io/library/", "docker.io/", "localhost/")


@lru_cache(maxsize=1024)
def parse_ref(ref: str) -> tuple[str, str]:
    """Split ``name[:tag]`` into (name, tag); the tag defaults to ``latest``.

    ``docker.io/library/`` and ``localhost/`` prefixes are dropped, so names
    from ``docker save`` and ``podman save`` match what people type.
    """
    text = ref.strip()
    name, sep, tag = text.rpartition(":")
    if not sep or "/" in tag:
        name, tag = text, "latest"
    for prefix in _DROPPED_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if not _NAME_RE.fullmatch(name) or not _TAG_RE.fullmatch(tag):
        raise UsageError(
            f"bad image reference {ref!r}: use name[:tag] with a lowercase name, "
            "like busybox or debian:bookworm"
        )
    return name, tag


def canonical_ref(ref: str) -> str:
    """``busybox`` -> ``busybox:latest``."""
    name, tag = parse_ref(ref)
    return f"{name}:{tag}"


def same_ref(a: str, b: str) -> bool:
    """Whether two refs name one image: ``busybox`` and ``docker.io/library/busybox:latest``."""
    try:
        return canonical_ref(a) == canonical_ref(b)
    except UsageError:
        return False
