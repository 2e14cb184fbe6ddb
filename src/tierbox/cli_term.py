"""A command on a pseudo-terminal, attached to this one (``docker run -it``,
``docker exec -it``, ``virsh console``).

The command runs in the background (its pump on this process's reactor);
this thread forwards what is typed to it and the terminal's size. The local
terminal is put in raw mode while attached, so Ctrl-C, Ctrl-Z and arrow keys
travel to the sandbox's terminal, whose line discipline acts on them (Ctrl-C
interrupts the sandbox's foreground job, not tierbox). Output is written to
stdout as it comes. Works with any tier whose capabilities say ``tty``,
through ``Instance.start(..., tty=True)`` and the command's ``send_stdin``,
``resize`` and ``kill``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import tty as termtty
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from tierbox.cli_common import write_err, write_out
from tierbox.errors import NotSupportedError, WaitTimeoutError
from tierbox.handles import CommandHandle
from tierbox.host.pty import get_size
from tierbox.spec import ExecResult
from tierbox.tiers import get_tier, tier_names
from tierbox.tiers.base import Instance

#: Ctrl-] ends a console session (as in virsh console and telnet).
ESCAPE = b"\x1d"
#: How often the attach loop looks for the command's end when idle.
POLL_S = 0.05
#: How long a hung-up command may take to end before it is killed.
HANGUP_WAIT_S = 5.0


def require_tty(inst: Instance) -> None:
    """NotSupportedError naming the tiers that can, before anything starts."""
    if not inst.capabilities.tty:
        can = [n for n in tier_names() if get_tier(n).capabilities.tty]
        raise NotSupportedError(
            f"the {inst.tier_name} tier cannot run a command on a terminal yet; "
            f"tiers that can: {', '.join(can) or 'none'}"
        )


def terminal_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """The command's variables, with this terminal's TERM unless given."""
    out = {"TERM": os.environ.get("TERM") or "xterm"}
    out.update(env or {})
    return out


def local_size() -> tuple[int, int] | None:
    for fd in (0, 1, 2):
        size = get_size(fd)
        if size is not None:
            return size
    return None


def attach(
    inst: Instance,
    argv: list[str],
    *,
    interactive: bool,
    tty: bool = True,
    escape: bytes | None = None,
    **start: Any,
) -> ExecResult:
    """Run ``argv`` on a pty in ``inst`` and attach it to this terminal until
    it ends (or ``escape`` is typed: the command is then hung up). With
    ``interactive``, stdin is forwarded (in raw mode when it is a terminal).
    ``tty`` False: no pty, stdin forwarded as typed (``docker run -i``).
    ``start``: Instance.start's options (env, cwd, user, timeout_s)."""
    if tty:
        require_tty(inst)
        start["env"] = terminal_env(start.get("env"))
        streams: dict[str, Any] = {"on_stdout": write_out, "on_stderr": write_out, "tty": True}
    else:
        streams = {"on_stdout": write_out, "on_stderr": write_err}
        streams["keep_stdin_open"] = interactive
    handle = CommandHandle.start(inst.start, argv, None, **streams, **start)
    in_fd = sys.stdin.fileno() if interactive and sys.stdin is not None else -1
    saved = None
    if tty and in_fd >= 0 and os.isatty(in_fd):
        saved = termios.tcgetattr(in_fd)
        termtty.setraw(in_fd)
    resized = [True]

    def on_winch(signum: int, frame: FrameType | None) -> None:
        resized[0] = True

    old_winch = signal.signal(signal.SIGWINCH, on_winch)
    try:
        if _forward(handle, in_fd, resized, escape):
            try:  # hung up: a shell ends at once, anything else is killed
                return handle.wait(HANGUP_WAIT_S)
            except WaitTimeoutError:
                handle.kill()
        return handle.wait()
    except BaseException:
        handle.kill()
        with contextlib.suppress(Exception):
            handle.wait(10)
        raise
    finally:
        signal.signal(signal.SIGWINCH, old_winch)
        if saved is not None:
            termios.tcsetattr(in_fd, termios.TCSADRAIN, saved)


def _forward(handle: CommandHandle, in_fd: int, resized: list[bool], escape: bytes | None) -> bool:
    """Until the command ends: keystrokes in, size changes through. True if
    it was left with the escape key (and hung up)."""
    while not handle.done:
        if resized[0]:
            resized[0] = False
            size = local_size()
            if size is not None:
                _quietly(handle.resize, *size)
        watch = [in_fd] if in_fd >= 0 else []
        try:
            ready, _, _ = select.select(watch, [], [], POLL_S)
        except InterruptedError:
            continue
        if not ready:
            continue
        data = os.read(in_fd, 4096)
        if not data:  # end of our input: end of the command's, as a terminal says it
            _quietly(handle.close_stdin)
            in_fd = -1
            continue
        if escape is not None and escape in data:
            data = data[: data.index(escape)]
            if data:
                _quietly(handle.send_stdin, data)
            handle.kill(signal.SIGHUP)
            return True
        _quietly(handle.send_stdin, data)
    return False


def _quietly(fn: Callable[..., object], *args: Any) -> None:
    """Input for a command that has just ended goes nowhere."""
    with contextlib.suppress(BrokenPipeError, NotSupportedError, OSError):
        fn(*args)
