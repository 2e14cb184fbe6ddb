"""Small helpers over /proc: process trees and liveness."""

from __future__ import annotations

import contextlib
import os
import signal

from tierbox.spec import ProcessInfo


def children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids, read from /proc/*/stat."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # field 4 (ppid) follows the ")" closing the command name
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(name))
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal ``pid`` and all its descendants (stopped first, so none can fork)."""
    kids = children_map()
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)
        todo.extend(kids.get(p, []))
    for p in seen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)
            os.kill(p, signal.SIGCONT)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_info(pid: int, *, in_namespace: bool) -> ProcessInfo | None:
    """What /proc says of host process ``pid`` (None if it is gone); with
    ``in_namespace``, pids as its own pid namespace numbers them (NSpid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read(64 * 1024)
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    state, ppid = fields[0], int(fields[1])
    uid, ns_pid, ns_ppid = "", pid, ppid
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == "Uid":
            uid = value.split()[0]
        elif key == "NSpid" and in_namespace:
            ns_pid = int(value.split()[-1])
    if in_namespace and ppid:
        try:
            with open(f"/proc/{ppid}/status") as f:
                for line in f:
                    if line.startswith("NSpid:"):
                        parts = line.split()[1:]
                        # a parent outside the namespace (the runtime) shows as 0
                        ns_ppid = int(parts[-1]) if len(parts) > 1 else 0
        except OSError:
            ns_ppid = 0
    argv = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
    return ProcessInfo(pid=ns_pid, ppid=ns_ppid, user=uid, argv=argv, state=state)
