"""A microVM's serial console, kept to its last few MiB on the host.

QEMU writes the guest's ttyS0 into a FIFO (``console.pipe``); a small
process of this module copies it into ``console.log`` and rolls that file
over to ``console.log.1`` each time it would pass :data:`ROLL_BYTES`, so
however much a guest root writes to its console the host keeps at most
:data:`CONSOLE_CAP_BYTES` (the newest output: the end of ``console.log``).
QEMU itself never holds the log, so it cannot grow it.

The writer runs in a session of its own and is reparented to init at once,
so a sandbox outlives the tierbox process that made it with its console
still logged. It ends when QEMU closes its end (QEMU exited), or after
:data:`OPEN_TIMEOUT_S` when no QEMU ever opened it. When the writer is gone,
QEMU's writes fail and the console output is dropped; the guest runs on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

#: ``console.log`` is rolled over to ``console.log.1`` at this size ...
ROLL_BYTES = 2 << 20
#: ... so the two files hold at most this much.
CONSOLE_CAP_BYTES = 2 * ROLL_BYTES
#: How long the writer waits for QEMU to open the FIFO.
OPEN_TIMEOUT_S = 120
_READ_BYTES = 64 << 10


def start(fifo: Path, log: Path, *, uid: int | None = None, gid: int | None = None) -> None:
    """Make ``fifo`` (QEMU's end, opened by ``uid``/``gid`` when given) and
    start the writer that keeps ``log`` bounded; returns once the writer is
    detached (it then waits for QEMU to open the FIFO)."""
    with contextlib.suppress(FileNotFoundError):
        fifo.unlink()
    os.mkfifo(fifo, 0o600)
    if uid is not None:
        os.chown(fifo, uid, gid if gid is not None else -1)
    launcher = subprocess.Popen(
        [sys.executable, "-S", __file__, str(fifo), str(log)],  # stdlib only: no imports
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    launcher.wait()  # it forks the writer and exits at once


def copy(fifo: Path, log: Path) -> None:
    """Copy the FIFO into ``log`` until QEMU closes it, rolling the file over."""
    signal.alarm(OPEN_TIMEOUT_S)
    src = os.open(fifo, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # waits for QEMU's open
    signal.alarm(0)
    if not stat.S_ISFIFO(os.fstat(src).st_mode):
        raise SystemExit(f"{fifo} is not a FIFO")  # QEMU's directory is QEMU's to change
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    out = os.open(log, flags, 0o640)
    size = os.fstat(out).st_size
    rolled = log.with_name(log.name + ".1")
    while chunk := os.read(src, _READ_BYTES):
        if size + len(chunk) > ROLL_BYTES:
            os.close(out)
            os.replace(log, rolled)
            out = os.open(log, flags | os.O_TRUNC, 0o640)
            size = 0
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view) :]
        size += len(chunk)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: console_log.py FIFO LOG", file=sys.stderr)
        return 2
    if os.fork() > 0:
        os._exit(0)  # the launcher returns; init adopts the writer
    copy(Path(argv[0]), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
