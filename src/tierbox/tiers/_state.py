"""Per-sandbox runtime directories and state files.

Each live sandbox owns ``sandboxes_dir()/<id>/`` with a ``state.json`` that
lets another tierbox process (the CLI, the daemon, ``tierbox gc``) find it.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from tierbox.errors import SandboxNotFoundError, UsageError
from tierbox.host.pinned import start_time
from tierbox.paths import sandboxes_dir

_mark: tuple[int, str] = (0, "")


def own_mark() -> str:
    """``"<pid> <start time>"`` of this process, as owner files hold it
    (kept per pid: a process's start time never changes, and reading it from
    /proc costs ~20 us on every create and close)."""
    global _mark
    pid = os.getpid()
    if _mark[0] != pid:
        _mark = (pid, f"{pid} {start_time(pid)}")
    return _mark[1]


def _read_owner(d: Path | str) -> str:
    """``d/owner``, read with bare os calls: a text-mode open costs ~20 us
    here, and this is on every wasm create and close."""
    fd = os.open(f"{d}/owner", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 256).decode(errors="replace")
    finally:
        os.close(fd)


def new_id() -> str:
    return secrets.token_hex(6)


_base: tuple[str | None, str] = ("", "")


def _sandboxes_path() -> str:
    """``sandboxes_dir()`` as a str, kept while $TIERBOX_RUN stays the same
    (the wasm tier's create asks for it every time; pathlib costs ~5 us)."""
    global _base
    key = os.environ.get("TIERBOX_RUN")
    if _base[0] != key or not _base[1]:
        _base = (key, str(sandboxes_dir()))
    return _base[1]


def sandbox_dir(sandbox_id: str) -> Path:
    return sandboxes_dir() / sandbox_id


def make_dir(sandbox_id: str) -> Path:
    """Create the sandbox's directory already claimed by this process: made
    under a hidden name (which ``tierbox gc`` skips), given its owner file,
    then renamed into place, so gc never sees it unowned."""
    final = sandbox_dir(sandbox_id)
    if final.exists():  # a named sandbox's leftover directory: claim it as it is
        claim(sandbox_id)
        return final
    tmp = final.with_name(f".new-{sandbox_id}")
    tmp.mkdir(parents=True)
    (tmp / "owner").write_text(own_mark())
    os.rename(tmp, final)
    return final


SLOT_PREFIX = ".slot-"


class Record(NamedTuple):
    """A small file of tierbox's own in a sandbox directory, open for
    writing by process ``pid``."""

    fd: int
    name: str
    pid: int

    def close(self) -> None:
        os.close(self.fd)


_slot_names = itertools.count(1)


class DirSlots:
    """Sandbox directories made ahead: owned by this process, holding
    ``root/`` with an empty ``tmp/`` (and perhaps this process's blanked
    usage record, open), under a hidden name (``.slot-<pid>-<n>``) that
    ``tierbox gc`` removes once this process is gone.

    Why: on a disk-backed ``/run`` making a sandbox directory costs ~0.5 ms
    and removing one 0.5-0.9 ms, more than a whole small Wasm run; so a
    closed sandbox's directory that its workload left exactly as made comes
    back here (renamed, ~0.05 ms) instead of being deleted and made anew.
    Any other directory is deleted as before."""

    KEEP = 4

    def __init__(self) -> None:
        self._ready: list[str] = []
        #: per kept slot: an open record file in it, handed to the next sandbox
        #: with the directory (creating and deleting a file costs ~40 us here)
        self._records: dict[str, Record] = {}
        self._lock = threading.Lock()
        self._closed = False
        atexit.register(self.close_all)
        os.register_at_fork(after_in_child=self._forget)

    # (paths are handled as str here: each pathlib operation costs a few
    # microseconds, and a wasm create and close make a dozen of them)

    def take(self) -> tuple[str, Path, Record | None]:
        """A new sandbox id, its directory's ``root/``, and the record file
        the slot kept (None: none yet)."""
        sandbox_id = new_id()
        while True:
            with self._lock:
                slot = self._ready.pop() if self._ready else None
                record = self._records.pop(slot, None) if slot is not None else None
            if slot is None:
                break
            final = f"{_sandboxes_path()}/{sandbox_id}"
            try:
                os.rename(slot, final)
                return sandbox_id, Path(final, "root"), record
            except OSError:
                if record is not None:
                    record.close()
                shutil.rmtree(slot, ignore_errors=True)
        root = make_dir(sandbox_id) / "root"
        try:
            root.mkdir()
            (root / "tmp").mkdir(mode=0o1777)
        except BaseException:
            remove_dir(sandbox_id)
            raise
        return sandbox_id, root, None

    def give_back(
        self, d: Path, *, extra: Sequence[str] = (), record: Record | None = None
    ) -> bool:
        """Keep a closed sandbox's directory for a later ``take`` if it is as
        made (``extra``: files of this process's own that may be dropped;
        ``record``: one to keep, open, for the next sandbox, its content
        already cleared); False: not kept, the caller deletes the directory
        and closes ``record``. ~0.1 ms."""
        path = os.fspath(d)
        kept = [record.name] if record is not None else []
        if not self._closed and self._as_made(path, [*extra, *kept]):
            for name in extra:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{path}/{name}")
            with self._lock:
                keep = not self._closed and len(self._ready) < self.KEEP
                if keep:
                    # unique: the pid and a count (no random bytes to draw)
                    slot = f"{os.path.dirname(path)}/{SLOT_PREFIX}{os.getpid()}-{next(_slot_names)}"
                    try:
                        os.rename(path, slot)
                    except OSError:
                        keep = False
                    else:
                        self._ready.append(slot)
                        if record is not None:
                            self._records[slot] = record
            return keep
        return False

    @staticmethod
    def _as_made(d: str, extra: Sequence[str]) -> bool:
        """Only ``owner`` (this process's), ``root/tmp/`` empty, and ``extra``."""
        try:
            if set(os.listdir(d)) - {"owner", "root", *extra}:  # tierbox's own directory
                return False
            # root/ is the workload's: read at most two entries, follow no link
            with os.scandir(f"{d}/root") as it:
                entries = [e for _, e in zip(range(2), it, strict=False)]
            if len(entries) != 1 or entries[0].name != "tmp":
                return False
            if not entries[0].is_dir(follow_symlinks=False):
                return False
            with os.scandir(f"{d}/root/tmp") as it:
                if next(it, None) is not None:
                    return False
            return _read_owner(d) == own_mark()
        except OSError:
            return False

    def close_all(self) -> None:
        """Delete the kept directories (at exit; gc does it after a crash)."""
        with self._lock:
            self._closed = True
            ready, self._ready = self._ready, []
            records, self._records = self._records, {}
        for record in records.values():
            record.close()
        for slot in ready:
            shutil.rmtree(slot, ignore_errors=True)

    def _forget(self) -> None:
        """A forked child owns none of its parent's directories."""
        for record in self._records.values():
            with contextlib.suppress(OSError):
                record.close()
        self._lock = threading.Lock()
        self._ready = []
        self._records = {}


def owner_alive(d: Path) -> bool:
    """The process named by ``d/owner`` still runs (same start time)."""
    try:
        pid_s, _, start = _read_owner(d).partition(" ")
        pid = int(pid_s)
    except (OSError, ValueError):
        return False
    return start_time(pid) == start and start != ""


def claim(sandbox_id: str) -> None:
    """Mark the sandbox as owned by this process. ``tierbox gc`` treats a
    sandbox whose owner died (and that is not kept) as a leftover."""
    (sandbox_dir(sandbox_id) / "owner").write_text(own_mark())


def retire(sandbox_id: str) -> None:
    """A closed sandbox is no longer listed or attachable (its state record
    goes) while its teardown may still run in the background; this process
    takes it over first, so ``tierbox gc`` leaves that teardown alone while
    the process lives and reaps what is left if it dies."""
    d = sandbox_dir(sandbox_id)
    pid = os.getpid()
    mine = own_mark()
    try:
        if _read_owner(d) != mine:
            tmp = d / f"owner.{pid}"
            tmp.write_text(mine)
            os.replace(tmp, d / "owner")
        (d / "state.json").unlink(missing_ok=True)
    except FileNotFoundError:
        pass  # no directory (a sandbox the tier already removed)


def is_live(sandbox_id: str) -> bool:
    """Kept (``tierbox sandbox create``, ``keep=True``) and not past its time
    to live, or its owner process still runs."""
    d = sandbox_dir(sandbox_id)
    try:
        state = json.loads((d / "state.json").read_text())
        if state.get("keep"):
            expires = state.get("expires_unix")
            return expires is None or time.time() < float(expires)
    except (OSError, ValueError, TypeError):
        pass
    return owner_alive(d)


class LiveIds(set[str]):
    """Ids of live sandboxes, as read once, but ``in`` asks again for an id
    not among them: a sandbox made after the listing (its directory is made,
    owned, before anything else of it) is never taken for a leftover."""

    def __contains__(self, sandbox_id: object) -> bool:
        if super().__contains__(sandbox_id):
            return True
        return isinstance(sandbox_id, str) and is_live(sandbox_id)


def live_ids() -> LiveIds:
    base = sandboxes_dir()
    if not base.is_dir():
        return LiveIds()
    return LiveIds(d.name for d in base.iterdir() if not d.name.startswith(".") and is_live(d.name))


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def names_dir() -> Path:
    return sandboxes_dir().parent / "names"


def claim_name(name: str, sandbox_id: str) -> None:
    """Give ``sandbox_id`` the name ``name``: refused while a live sandbox
    holds it (a name left by a dead one is taken over)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(
            f"name={name!r} is not a sandbox name: use letters, digits, '.', '_' or '-' "
            "(at most 63, starting with a letter or digit)"
        )
    d = names_dir()
    d.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = name_holder(name)
            if holder is not None and is_live(holder):
                raise UsageError(
                    f"the name {name!r} belongs to live sandbox {holder}: choose another, "
                    f"or `tierbox sandbox rm {name}` first"
                ) from None
            (d / name).unlink(missing_ok=True)  # its sandbox is gone: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(sandbox_id)
        return
    raise UsageError(f"the name {name!r} is being claimed by another process: try again")


def name_holder(name: str) -> str | None:
    try:
        return (names_dir() / name).read_text().strip() or None
    except OSError:
        return None


def release_name(name: str, sandbox_id: str) -> None:
    if name_holder(name) == sandbox_id:
        (names_dir() / name).unlink(missing_ok=True)


def resolve(id_or_name: str) -> str:
    """A sandbox id from an id or a name."""
    if (sandbox_dir(id_or_name) / "state.json").exists():
        return id_or_name
    holder = name_holder(id_or_name) if NAME_RE.fullmatch(id_or_name) else None
    return holder or id_or_name


def write_state(sandbox_id: str, state: dict[str, Any]) -> None:
    d = sandbox_dir(sandbox_id)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, d / "state.json")


def read_state(sandbox_id: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((sandbox_dir(sandbox_id) / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise SandboxNotFoundError(
            f"no sandbox {sandbox_id!r}: `tierbox sandbox ls` lists the live ones"
        ) from exc
    return data


def list_states() -> list[dict[str, Any]]:
    out = []
    base = sandboxes_dir()
    if base.is_dir():
        for d in sorted(base.iterdir()):
            try:
                out.append(json.loads((d / "state.json").read_text()))
            except (OSError, ValueError):
                continue
    return out


def remove_dir(sandbox_id: str) -> None:
    shutil.rmtree(sandbox_dir(sandbox_id), ignore_errors=True)
