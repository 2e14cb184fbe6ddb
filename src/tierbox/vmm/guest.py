"""What the microvm and vm tiers share about a guest, seen from the host.

Both run workloads through the same agent (:mod:`tierbox.vmm.agent`) inside
a guest kernel, so the settings of a workload and the numbers of ``stats()``
are made here once:

- :func:`guest_config`: the uid/gid, environment (PATH, HOME, LANG, then the
  image's, then the spec's) and working directory a workload runs with;
- :func:`guest_stats`: the host's cost of the guest (its QEMU's PSS, peak RSS
  and CPU time) with the agent's view (process count, guest OOM kills);
- :func:`file_tail`: the end of a console or QEMU log, for error messages.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

from tierbox.spec import DEFAULT_PATH, SandboxSpec, Stats, parse_user
from tierbox.vmm.agent import GuestConfig

#: PATH inside a guest, the Debian default (the OCI bundle uses the same).
GUEST_PATH = DEFAULT_PATH


def guest_config(
    spec: SandboxSpec,
    *,
    default_user: tuple[int, int],
    root_home: str,
    image_env: Mapping[str, str],
    image_workdir: str | None,
) -> GuestConfig:
    """How the spec's workloads run in the guest.

    ``default_user`` applies when the spec names none (the tiers differ:
    nobody in a microVM, root in a full VM); ``root_home`` is HOME for uid 0
    (other users get /tmp, the one directory sure to be theirs). The image's
    environment overrides the defaults and the spec's overrides the image's;
    the working directory is the spec's, else the image's, else /.
    """
    uid, gid = parse_user(spec.user) or default_user
    env = {"PATH": GUEST_PATH, "HOME": root_home if uid == 0 else "/tmp", "LANG": "C.UTF-8"}
    env.update(image_env)
    env.update(spec.env)
    workdir = (spec.workdir if spec.workdir != "/" else image_workdir) or "/"
    return GuestConfig(uid=uid, gid=gid, env=env, workdir=workdir)


def process_memory_cpu(pid: int) -> tuple[int | None, int | None, float | None]:
    """(PSS bytes, peak RSS bytes, CPU seconds) of one host process; None for
    what cannot be read (the process is gone, or /proc hides it)."""
    pss = hwm = None
    cpu = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return pss, hwm, cpu


def guest_stats(qemu_pid: int | None, agent_stats: Mapping[str, str]) -> Stats:
    """Stats of a guest: what its QEMU costs the host, and what the agent
    counts inside (``procs``, ``oom_kill``; values the guest sent are text
    and only whole numbers are believed)."""
    pss, hwm, cpu_s = process_memory_cpu(qemu_pid) if qemu_pid else (None, None, None)
    procs = agent_stats.get("procs")
    oom = agent_stats.get("oom_kill")
    return Stats(
        memory_bytes=pss,
        memory_peak_bytes=max(hwm or 0, pss or 0) or None,
        cpu_s=cpu_s,
        pids=int(procs) if procs and procs.isdigit() else None,
        oom_kills=int(oom) if oom and oom.lstrip("-").isdigit() else None,
    )


def file_tail(path: str | Path, n_bytes: int) -> str:
    """The last ``n_bytes`` of a log, as text; empty when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
