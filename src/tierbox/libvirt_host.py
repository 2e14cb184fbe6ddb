"""The libvirt daemon and one connection to it (``qemu:///system``).

Everything the ``vm`` tier asks of libvirt goes through this module:

- :func:`connect` opens (and caches per process) the connection. Where no
  libvirtd runs, it starts ``virtlogd -d`` and libvirtd itself (this host
  has no systemd to socket-activate them), waits for the socket and says so
  on stderr (a ``logging`` warning). libvirtd runs under ``catatonit``, a
  child subreaper, where that is installed (see :func:`_start_under_reaper`),
  else as ``libvirtd -d``. ``TIERBOX_LIBVIRT_AUTOSTART=0`` turns starting
  off; then an unreachable daemon is a clear :class:`LibvirtUnreachableError`.
- :func:`call` runs one binding call and translates ``libvirt.libvirtError``
  into tierbox errors at the boundary (``raise ... from exc``): a lost
  connection becomes :class:`LibvirtUnreachableError`, anything else
  :class:`LibvirtError` carrying libvirt's error code (both live in
  :mod:`tierbox.errors`). Daemons are started through the one runner
  (:mod:`tierbox.host.runner`).

The binding (PyPI ``libvirt-python``, built against Debian's libvirt-dev) is
imported lazily and typed as ``Any``: it ships no type information, and a
missing binding must only make the ``vm`` tier unavailable, never break the
other tiers.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import importlib
import logging
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tierbox.errors import (
    CommandError,
    LibvirtError,
    LibvirtUnreachableError,
    SandboxError,
    TierUnavailableError,
)
from tierbox.host.runner import exit_error, run, spawn, which

log = logging.getLogger("tierbox.libvirt")

URI_ENV = "TIERBOX_LIBVIRT_URI"
AUTOSTART_ENV = "TIERBOX_LIBVIRT_AUTOSTART"
DEFAULT_URI = "qemu:///system"
#: Where the system daemons put their pid files and libvirtd its socket.
RUN = Path("/run")
LIBVIRTD_SOCKET = RUN / "libvirt" / "libvirt-sock"
LIBVIRTD_LOG = Path("/var/log/libvirt/libvirtd.log")
VIRTLOGD_SOCKET = RUN / "libvirt" / "virtlogd-sock"
#: How long a freshly started libvirtd may take to answer (it probes QEMU's
#: capabilities on its first start: a few seconds).
START_TIMEOUT_S = 30.0


def uri() -> str:
    return os.environ.get(URI_ENV, DEFAULT_URI)


def autostart_enabled() -> bool:
    return os.environ.get(AUTOSTART_ENV, "1") not in ("0", "no", "false")


# ---------------------------------------------------------------- the binding


_binding: Any = None
_binding_lock = threading.Lock()


def _quiet_error_handler(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; tierbox reports them itself."""


def binding() -> Any:
    """The ``libvirt`` module, or TierUnavailableError saying how to get it."""
    global _binding
    with _binding_lock:
        if _binding is None:
            try:
                mod = importlib.import_module("libvirt")
            except ImportError as exc:
                raise TierUnavailableError(
                    "the libvirt Python binding is missing: run `make setup` "
                    "(pip install libvirt-python, which builds against libvirt-dev)"
                ) from exc
            mod.registerErrorHandler(_quiet_error_handler, None)
            _binding = mod
        return _binding


def qemu_binding() -> Any:
    """The ``libvirt_qemu`` module (monitor pass-through)."""
    binding()
    return importlib.import_module("libvirt_qemu")


def binding_version() -> str:
    """libvirt's version ("9.0.0"); empty when the binding or library is missing."""
    try:
        lv = binding()
    except TierUnavailableError:
        return ""
    try:
        v = int(lv.getVersion())
    except lv.libvirtError:
        return ""
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


def is_libvirt_error(exc: BaseException) -> bool:
    """True if ``exc`` is the binding's own ``libvirtError`` (not yet translated)."""
    return _binding is not None and isinstance(exc, _binding.libvirtError)


# ---------------------------------------------------------------- the daemons


def daemon_pid(name: str) -> int | None:
    """Pid of a running system daemon (``libvirtd``, ``virtlogd``) from its pid file."""
    try:
        pid = int((RUN / f"{name}.pid").read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    # a killed daemon lingers as a zombie until this host's slow PID 1 reaps it
    return pid if comm == name and state != "Z" else None


def _pids_named(name: str) -> list[int]:
    """Pids of processes called ``name`` (a daemon still exiting has no pid file)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == name:
                    out.append(int(entry))
    return out


def _wait_gone(name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _pids_named(name) and time.monotonic() < deadline:
        time.sleep(0.05)


def _socket_answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def fix_kvm_permissions() -> str | None:
    """Give /dev/kvm the group and mode Debian's udev rules give it (kvm, 0660).

    Without udev the node stays root-only; libvirt then finds KVM "enabled
    when probing but not available now" at every domain start, throws its
    QEMU capability cache away and re-probes (about 3 s per start). Returns a
    line saying what was changed, or None.
    """
    dev = Path("/dev/kvm")
    try:
        st = dev.stat()
        gid = grp.getgrnam("kvm").gr_gid
    except (OSError, KeyError):
        return None
    if st.st_gid == gid and st.st_mode & 0o060 == 0o060:
        return None
    try:
        os.chown(dev, -1, gid)
        os.chmod(dev, stat.S_IMODE(st.st_mode) | 0o060)
    except OSError as exc:
        log.warning("tierbox: cannot give /dev/kvm to group kvm: %s", exc)
        return None
    return "/dev/kvm: group kvm, mode 0660 (as Debian's udev rules set it)"


def _start_under_reaper(reaper: str, libvirtd: str) -> None:
    """Run libvirtd in the foreground under ``catatonit``, detached (``setsid -f``).

    libvirtd double-forks each QEMU, so a QEMU that exits is reaped by the
    nearest *child subreaper* above it, else by PID 1. Where PID 1 reaps
    lazily (this host's does, every ~2 s), libvirt waits for the zombie at
    every domain stop: destroy, libvirt's own revert, ``vm rm``. catatonit,
    not being PID 1, makes itself a subreaper and reaps at once, which cuts
    a stop from ~1.6 s to ~0.2 s here.
    """
    setsid = which("setsid")
    argv = [setsid, "-f", reaper, "--", libvirtd] if setsid else [reaper, "--", libvirtd]
    try:
        proc = spawn(
            argv,
            message="cannot start libvirtd",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    except CommandError as exc:
        raise LibvirtUnreachableError(str(exc)) from exc
    if setsid:
        # ``setsid -f`` returns once the daemon is forked off; a non-zero exit
        # means it was not (the daemon's own failures are in its log)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return
        if rc != 0:
            raise LibvirtUnreachableError(
                str(exit_error(proc, message="cannot start libvirtd", log=LIBVIRTD_LOG))
            )


def start_daemons(*, timeout_s: float = START_TIMEOUT_S) -> list[str]:
    """Start virtlogd and libvirtd where they do not run; wait for libvirtd's
    socket. Returns a line per thing done (empty: both were running)."""
    done: list[str] = []
    fixed = fix_kvm_permissions()
    if fixed:
        done.append(fixed)
    for name in ("virtlogd", "libvirtd"):
        if daemon_pid(name) is not None and (
            name != "virtlogd" or _socket_answers(VIRTLOGD_SOCKET)
        ):
            continue
        exe = which(name)
        if exe is None:
            raise LibvirtUnreachableError(
                f"{name} is not installed: run `make setup` (apt-get install libvirt-daemon-system)"
            )
        _wait_gone(name, 15.0)  # one that is still shutting down holds the pid file
        reaper = which("catatonit") if name == "libvirtd" else None
        if reaper is not None:
            _start_under_reaper(reaper, exe)
            done.append(f"started {name} under {Path(reaper).name} (a child subreaper)")
            continue
        for attempt in range(20):
            try:
                run([exe, "-d"], timeout_s=30, message=f"cannot start {name}")
                break
            except CommandError as exc:
                if "pidfile" not in exc.stderr or attempt == 19:
                    raise LibvirtUnreachableError(str(exc)) from exc
                time.sleep(0.5)
        done.append(f"started {name} -d")
    started = time.monotonic()
    while not _socket_answers(LIBVIRTD_SOCKET):
        waited = time.monotonic() - started
        if waited > timeout_s:
            raise LibvirtUnreachableError(
                f"libvirtd did not open {LIBVIRTD_SOCKET} within {timeout_s:.0f} s "
                f"(see {LIBVIRTD_LOG})"
            )
        if waited > 2.0 and not _pids_named("libvirtd"):
            raise LibvirtUnreachableError(
                f"libvirtd exited right after starting (see {LIBVIRTD_LOG})"
            )
        time.sleep(0.05)
    return done


# ---------------------------------------------------------------- the connection


_conn: Any = None
_conn_lock = threading.Lock()
#: Counts the connections opened by this process: a caller that sees it change
#: knows libvirtd may have restarted since its last call.
generation = 0


def _close_at_exit() -> None:
    """Close the cached connection while the binding is whole: left to the
    interpreter's teardown, its finaliser can run after the binding's C
    module is gone and print a traceback."""
    global _conn
    with _conn_lock:
        conn, _conn = _conn, None
    if conn is None:
        return
    # the process is ending: a connection that will not close is dropped anyway
    with contextlib.suppress(binding().libvirtError):
        conn.close()


atexit.register(_close_at_exit)


def _is_local_system(u: str) -> bool:
    return u in ("qemu:///system", "qemu+unix:///system")


def connect() -> Any:
    """The cached connection to libvirt (``virConnect``), reopened when it died."""
    global _conn, generation
    lv = binding()
    with _conn_lock:
        if _conn is not None:
            try:
                if _conn.isAlive():
                    return _conn
            except lv.libvirtError:
                pass
            with contextlib.suppress(lv.libvirtError):
                _conn.close()
            _conn = None
        u = uri()
        generation += 1
        try:
            _conn = lv.open(u)
        except lv.libvirtError as exc:
            first = exc
        else:
            if _is_local_system(u) and autostart_enabled() and not _socket_answers(VIRTLOGD_SOCKET):
                # libvirtd alone cannot start a domain: it logs through virtlogd
                for line in start_daemons():
                    log.warning("tierbox: %s", line)
            return _conn
        if not _is_local_system(u):
            raise LibvirtUnreachableError(f"cannot connect to libvirt at {u}: {first}") from first
        if not autostart_enabled():
            raise LibvirtUnreachableError(
                f"cannot reach libvirtd at {u} ({_short(first)}): start it with "
                f"`virtlogd -d && libvirtd -d`, or unset {AUTOSTART_ENV}=0 to let tierbox do it"
            ) from first
        if daemon_pid("libvirtd") is not None:
            # starting up or shutting down: wait for it to answer or to be gone
            deadline = time.monotonic() + 15.0
            while daemon_pid("libvirtd") is not None and time.monotonic() < deadline:
                if _socket_answers(LIBVIRTD_SOCKET):
                    try:
                        _conn = lv.open(u)
                        return _conn
                    except lv.libvirtError as exc:
                        first = exc
                time.sleep(0.1)
            if daemon_pid("libvirtd") is not None:
                raise LibvirtUnreachableError(
                    f"libvirtd runs but refuses the connection to {u}: {_short(first)}"
                ) from first
        done = start_daemons()
        if done:
            log.warning(
                "tierbox: libvirtd was not running; %s (pid %s)",
                "; ".join(done),
                daemon_pid("libvirtd"),
            )
        try:
            _conn = lv.open(u)
        except lv.libvirtError as exc:
            raise LibvirtUnreachableError(
                f"started libvirtd but cannot connect to {u}: {_short(exc)}"
            ) from exc
        return _conn


def lookup(name: str) -> Any:
    """The domain called ``name``; a connection found dead is reopened once
    (starting libvirtd where allowed). Raises LibvirtError with code
    VIR_ERR_NO_DOMAIN when there is no such domain."""
    lv = binding()
    for attempt in (0, 1):
        conn = connect()
        try:
            return conn.lookupByName(name)
        except lv.libvirtError as exc:
            err = translate(exc, f"looking up domain {name}")
            if attempt == 0 and isinstance(err, LibvirtUnreachableError):
                continue
            raise err from exc
    raise AssertionError("unreachable")


def reachable() -> tuple[bool, str]:
    """(can tierbox use libvirt here, why not) without starting anything."""
    try:
        binding()
    except TierUnavailableError as exc:
        return False, str(exc)
    if _socket_answers(LIBVIRTD_SOCKET):
        return True, f"libvirtd answers on {LIBVIRTD_SOCKET}"
    if not _is_local_system(uri()):
        return True, f"libvirt at {uri()}"
    if not autostart_enabled():
        return False, f"libvirtd is not running and {AUTOSTART_ENV}=0 forbids starting it"
    missing = [n for n in ("virtlogd", "libvirtd") if which(n) is None]
    if missing:
        return False, f"{', '.join(missing)} not installed: run `make setup`"
    return True, "libvirtd is not running; tierbox starts it on first use"


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _connection_lost(exc: Any) -> bool:
    lv = binding()
    code = exc.get_error_code()
    if code in (lv.VIR_ERR_RPC, lv.VIR_ERR_NO_CONNECT, lv.VIR_ERR_INVALID_CONN):
        return True
    text = str(exc)
    return code == lv.VIR_ERR_SYSTEM_ERROR and (
        "End of file" in text
        or "Broken pipe" in text
        or "Connection reset" in text
        or "client socket is closed" in text
        or "Cannot recv data" in text
        or "Cannot write data" in text
    )


def error_code(exc: BaseException) -> int | None:
    """libvirt's error number of a translated or raw libvirt error."""
    if isinstance(exc, LibvirtError):
        return exc.code
    get = getattr(exc, "get_error_code", None)
    return int(get()) if callable(get) else None


def translate(exc: Any, what: str) -> SandboxError | LibvirtUnreachableError:
    """The tierbox error for a ``libvirtError`` raised while doing ``what``."""
    global _conn
    if _connection_lost(exc):
        with _conn_lock:
            _conn = None
        return LibvirtUnreachableError(
            f"lost the connection to libvirtd while {what}: {_short(exc)} "
            "(did libvirtd stop? tierbox restarts it on the next command)"
        )
    return LibvirtError(f"{what}: {_short(exc)}", exc.get_error_code())


def call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with libvirt errors translated (``what`` says what was tried)."""
    lv = binding()
    try:
        return fn(*args)
    except lv.libvirtError as exc:
        raise translate(exc, what) from exc


def is_code(exc: BaseException, *names: str) -> bool:
    """True if ``exc`` carries one of libvirt's ``VIR_ERR_*`` codes named in ``names``."""
    code = error_code(exc)
    lv = binding()
    return code is not None and any(code == getattr(lv, n) for n in names)
