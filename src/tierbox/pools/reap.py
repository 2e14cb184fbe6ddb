"""What ``tierbox gc`` needs to know about pools.

Pool members are ordinary sandboxes owned by the process hosting their
pool: live while it runs, leftovers (reaped with every other sandbox) once
it died. Pool definitions, templates and history are kept: the next host
brings the pools back. What a dead host leaves besides its members is its
pid file and socket, removed here.
"""

from __future__ import annotations

from tierbox.pools import store
from tierbox.pools.server import host_pid


def reap(live: set[str]) -> list[str]:
    """Remove a dead pool host's runtime files; a line per thing removed."""
    removed: list[str] = []
    pid_file = store.pid_file()
    if pid_file.exists() and host_pid() is None:
        for f in (store.socket_path(), pid_file):
            if f.exists():
                f.unlink(missing_ok=True)
                removed.append(f"pool host file {f} (its process is gone)")
    return removed
