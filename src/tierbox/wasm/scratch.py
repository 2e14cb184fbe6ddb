"""Per-thread scratch files of Wasm runs: stdout, stderr and stdin files, and
the root directory of one-shot runs, on tmpfs where there is one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from tierbox.errors import SandboxError

_tls = threading.local()

_scratch_base: Path | None = None
_scratch_pid = 0
_scratch_lock = threading.Lock()
SCRATCH_PREFIX = "tierbox-wasm-"


def parents() -> list[Path]:
    """Where scratch directories go: tmpfs first (truncating and removing files on a
    journaling filesystem costs more than a whole small Wasm run), then $TMPDIR."""
    shm = Path("/dev/shm")
    tmpfs = [shm] if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else []
    return [*tmpfs, Path(tempfile.gettempdir())]


def thread_dir() -> Path:
    """A private directory for the calling thread: stdout/stderr/stdin files of its runs
    and the root of one-shot runs. Only this thread uses it, so nothing is locked."""
    global _scratch_base, _scratch_pid
    local: Path | None = getattr(_tls, "scratch", None)
    if local is not None and _scratch_pid == os.getpid():
        return local
    with _scratch_lock:
        if _scratch_base is None or _scratch_pid != os.getpid():
            prefix = f"{SCRATCH_PREFIX}{os.getpid()}-"
            for parent in parents():
                try:
                    _scratch_base = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
                    break
                except OSError:
                    continue
            else:
                raise SandboxError("no writable directory for Wasm run scratch files")
            _scratch_pid = os.getpid()
        base = _scratch_base
    local = base / f"t{threading.get_ident()}"
    local.mkdir(mode=0o700, exist_ok=True)
    _tls.scratch = local
    return local


class ThreadFiles:
    """A thread's stdout, stderr and stdin file paths, and read-only
    descriptors of the first two, opened once per thread and kept: each
    run's open truncates the same files (one inode each), so reading output
    back costs a ``pread`` rather than stat, open, read and close (system
    calls cost several microseconds each in a VM). The descriptors are
    closed when the thread's locals go (the thread ended), or on a fork."""

    __slots__ = ("pid", "stderr", "stderr_fd", "stdin", "stdout", "stdout_fd")

    def __init__(self, base: str) -> None:
        self.stdout, self.stderr, self.stdin = f"{base}/stdout", f"{base}/stderr", f"{base}/stdin"
        self.pid = os.getpid()
        self.stdout_fd = self.stderr_fd = -1
        flags = os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC
        try:
            self.stdout_fd = os.open(self.stdout, flags, 0o600)
            self.stderr_fd = os.open(self.stderr, flags, 0o600)
        except BaseException:
            self.close()
            raise

    def close(self, _close: Callable[[int], None] = os.close) -> None:
        for fd in (self.stdout_fd, self.stderr_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    _close(fd)
        self.stdout_fd = self.stderr_fd = -1

    def __del__(self, _getpid: Callable[[], int] = os.getpid) -> None:
        # also runs while the interpreter shuts down, when module globals may
        # be gone: the os functions are bound as defaults, and nothing raises
        try:
            if self.pid == _getpid():  # a forked child's copy: its own close does it
                self.close()
        except Exception:  # a finalizer must not print at exit
            pass


def thread_files() -> ThreadFiles:
    """This thread's :class:`ThreadFiles` in its scratch directory."""
    files: ThreadFiles | None = getattr(_tls, "files", None)
    if files is not None and files.pid == _scratch_pid == os.getpid():
        return files
    if files is not None:  # made before a fork: the child makes its own
        files.close()
        _tls.files = None
    base = str(thread_dir())
    try:
        files = ThreadFiles(base)
    except OSError as exc:
        raise SandboxError(f"cannot open a Wasm run's output files in {base}: {exc}") from exc
    _tls.files = files
    return files


def one_shot_root() -> Path:
    """A directory holding only an empty ``tmp/`` (every tier's sandbox has
    a /tmp) to preopen as ``/`` for a one-shot run on this thread.

    Reused while runs leave it so (creating and removing a directory per run
    costs as much as a small run); see :func:`release_one_shot_root`.
    """
    root: Path | None = getattr(_tls, "root", None)
    if root is None or _scratch_pid != os.getpid():
        root = thread_dir() / "root"
        with contextlib.suppress(FileExistsError):
            root.mkdir(mode=0o755)
        with contextlib.suppress(FileExistsError):
            (root / "tmp").mkdir(mode=0o1777)
        _tls.root = root
    return root


def release_one_shot_root(root: Path) -> None:
    """After a one-shot run: keep the directory if the guest left it as it
    was (only an empty ``tmp/``)."""
    try:
        if os.listdir(root) == ["tmp"] and not os.listdir(root / "tmp"):
            return
    except OSError:
        pass
    _tls.root = None
    shutil.rmtree(root, ignore_errors=True)


def remove_own() -> None:
    """This process's scratch directories (at interpreter exit)."""
    if _scratch_base is not None and _scratch_pid == os.getpid():
        shutil.rmtree(_scratch_base, ignore_errors=True)


def reap() -> list[str]:
    """Remove scratch directories of tierbox processes that no longer exist."""
    removed = []
    entries = [e for parent in parents() for e in parent.glob(f"{SCRATCH_PREFIX}*")]
    for entry in entries:
        pid_text = entry.name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(str(entry))
    return removed
