"""Teardown off the caller's path.

``close()`` returns once a sandbox's workload is stopped and nothing can reach
it any more; what is left (the runtime's ``delete``, the overlay unmount, the
cgroup and the directory) runs here, in order, on one background thread.
``crun delete`` alone takes ~6 ms and ``runsc delete`` over a second, while
``close()`` is promised in 2 ms (SPECIFICATION.md, "Long-lived sandboxes").

Why a thread of this process rather than a detached one: everything a
teardown removes carries this process as its owner (``owner`` files, trash
names), so ``tierbox gc`` leaves it alone while the process lives and reaps
it once the process is gone, also when it was killed in the middle of a
teardown. The thread is a one-worker ``ThreadPoolExecutor``: it lives
between jobs (starting a thread per close costs up to 2 ms on a busy host)
and Python finishes its queue before a program ends, so ``tierbox sandbox
rm`` and every script still leave nothing behind when they exit normally.
:func:`wait` is for callers that must see the host clean at once (tests).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

_THREAD = "tierbox-teardown"
#: teardowns queued at most before ``later`` (so ``close``) waits for one to end
MAX_PENDING = 16
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_THREAD)
_cond = threading.Condition()
#: jobs queued or running
_pending = 0


def _after_fork() -> None:
    """A forked child has no teardown thread (and none of its parent's
    jobs): it starts afresh."""
    global _executor, _cond, _pending
    _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_THREAD)
    _cond = threading.Condition()
    _pending = 0


os.register_at_fork(after_in_child=_after_fork)


def later(what: str, job: Callable[[], object]) -> None:
    """Run ``job`` on the teardown thread, after every job queued before it.
    ``what`` names it in the log when it fails (a failure never reaches the
    caller, who has already been told the sandbox is closed; gc reaps what a
    failed job left)."""
    global _pending
    with _cond:
        # Backpressure: a program closing sandboxes faster than they can be
        # torn down (gVisor's delete takes over a second) waits here rather
        # than pile up cgroups, mounts and namespaces; never on the teardown
        # thread itself, which queues follow-up jobs.
        if not threading.current_thread().name.startswith(_THREAD):
            while _pending >= MAX_PENDING:
                _cond.wait()
        _pending += 1
    try:
        _executor.submit(_run, what, job)
    except RuntimeError:
        # the interpreter is shutting down (an atexit handler closing what a
        # program left open): no new work for the thread, so do it here
        _run(what, job)


def _run(what: str, job: Callable[[], object]) -> None:
    global _pending
    try:
        job()
    except Exception:
        log.exception("background teardown of %s failed; `tierbox gc` reaps what it left", what)
    finally:
        with _cond:
            _pending -= 1
            _cond.notify_all()


def wait(timeout_s: float | None = None) -> bool:
    """Until every teardown queued so far has finished; False on timeout."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with _cond:
        while _pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            _cond.wait(left)
    return True


def pending() -> int:
    """Teardowns queued or running now."""
    with _cond:
        return _pending
