"""``tierbox sandbox logs ID [-f]``: what a sandbox has printed.

Two sources, both files on the host, so another process can follow them:

- background commands (``sb.run(..., background=True)``) tee their output
  into the sandbox's ``logs/`` directory (``PID-N.cmd``, ``.out``, ``.err``;
  see :mod:`tierbox.handles`);
- a microVM's or VM's serial console, the log file its tier already writes
  (named in the sandbox's state record: ``<dir>/console.log`` for a microVM,
  ``meta.console`` for a VM), shown with its control characters escaped on
  a terminal.

Commands' stdout goes to stdout and their stderr to stderr, in the order the
commands started; the console goes to stdout after them.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierbox.cli_common import write_console, write_err, write_out

#: How often ``-f`` looks for new output.
FOLLOW_POLL_S = 0.2
#: At most this much of each file per read (a flood is shown in slices).
READ_CHUNK = 1 << 20
_STEM = re.compile(r"^(\d+)-(\d+)$")


@dataclass
class _Tail:
    """One file being shown from ``offset`` on."""

    path: Path
    sink: Callable[[bytes], None]
    offset: int = 0

    def pump(self) -> int:
        """Show what was added since the last call; returns the bytes shown."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return 0
        shown = 0
        try:
            size = os.fstat(fd).st_size
            if size < self.offset:  # truncated or replaced: start again
                self.offset = 0
            while self.offset < size:
                chunk = os.pread(fd, min(READ_CHUNK, size - self.offset), self.offset)
                if not chunk:
                    break
                self.sink(chunk)
                self.offset += len(chunk)
                shown += len(chunk)
        finally:
            os.close(fd)
        return shown


@dataclass
class SandboxLogs:
    """The log files of one sandbox, shown once or followed."""

    log_dir: Path
    console: Path | None = None
    tails: dict[Path, _Tail] = field(default_factory=dict)

    @classmethod
    def of(cls, sandbox_dir: Path, state: dict[str, Any]) -> SandboxLogs:
        return cls(sandbox_dir / "logs", console_log(state))

    def commands(self) -> list[str]:
        """Stems of the logged commands, in the order they started."""
        stems = []
        with contextlib.suppress(OSError):
            for p in self.log_dir.iterdir():
                if p.suffix == ".cmd" and (m := _STEM.match(p.stem)):
                    stems.append((int(m.group(1)), int(m.group(2)), p.stem))
        return [s for _pid, _n, s in sorted(stems, key=lambda t: (self._started(t[2]), t[:2]))]

    def _started(self, stem: str) -> float:
        try:
            return (self.log_dir / f"{stem}.cmd").stat().st_mtime
        except OSError:
            return 0.0

    def pump(self) -> int:
        """Show everything new; returns the bytes shown."""
        shown = 0
        for stem in self.commands():
            for suffix, sink in ((".out", write_out), (".err", write_err)):
                path = self.log_dir / f"{stem}{suffix}"
                tail = self.tails.setdefault(path, _Tail(path, sink))
                shown += tail.pump()
        if self.console is not None:
            tail = self.tails.setdefault(self.console, _Tail(self.console, write_console))
            shown += tail.pump()
        return shown

    def follow(self, alive: Callable[[], bool]) -> None:
        """Show what comes until the sandbox is gone (or Ctrl-C)."""
        while True:
            self.pump()
            if not alive():
                self.pump()
                return
            time.sleep(FOLLOW_POLL_S)


def console_log(state: dict[str, Any]) -> Path | None:
    """The serial console log a microVM or VM tier writes, from the sandbox's
    state record; None for tiers without a console."""
    tier_state = state.get("tier_state") or {}
    meta = tier_state.get("meta")
    if isinstance(meta, dict) and isinstance(meta.get("console"), str):
        return Path(meta["console"])
    d = tier_state.get("dir")
    if isinstance(d, str):
        # a microVM's console writer keeps it beside the state (older
        # microVMs: QEMU wrote it in its own vmm/ directory)
        for log in (Path(d) / "console.log", Path(d) / "vmm" / "console.log"):
            if log.is_file():
                return log
    return None
