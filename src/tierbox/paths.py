"""Where tierbox keeps its state.

``TIERBOX_HOME`` (default ``~/.local/share/tierbox``) holds durable things:
the image store and caches. ``TIERBOX_RUN`` (default ``/run/tierbox``) holds
per-sandbox runtime state that must not survive a reboot.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Prefix of every cgroup, mount dir, container id and temp dir tierbox makes,
#: so that ``tierbox gc`` can find leftovers of a crashed run.
MARKER = "tierbox"


def home() -> Path:
    value = os.environ.get("TIERBOX_HOME")
    return Path(value) if value else Path.home() / ".local" / "share" / "tierbox"


def run_dir() -> Path:
    return Path(os.environ.get("TIERBOX_RUN", "/run/tierbox"))


def sandboxes_dir() -> Path:
    """One directory per live sandbox: state.json, bundle, overlay dirs."""
    return run_dir() / "sandboxes"
