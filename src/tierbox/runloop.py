"""One way to wait for a workload, three ways to drive it.

A running exec is a :class:`Pump`: a small non-blocking state machine that
says which file descriptors it waits on (pipes, a pidfd, an agent socket) and
its deadline, and does its share of I/O when one is ready. It never blocks
and owns no thread. Three drivers move pumps:

- :func:`drive` runs one pump to its end on the calling thread (``sb.run``);
- :func:`adrive` awaits one on an asyncio event loop, which waits on the
  very same descriptors (``AsyncSandbox.run``): no thread pool in disguise;
- :class:`Reactor` moves any number of background pumps on one thread
  (``sb.run(..., background=True)`` in the synchronous API).

So the rules of a run (caps, deadlines, what ends it) are written once, in
the pump, whichever way its caller waits.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import selectors
import threading
import time
from collections.abc import Callable

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


class Pump(abc.ABC):
    """A run in progress, moved forward by a driver."""

    @abc.abstractmethod
    def interests(self) -> dict[int, int]:
        """fd -> READ|WRITE events this pump waits for now (empty when done)."""

    @abc.abstractmethod
    def ready(self, fd: int, events: int) -> None:
        """Do the non-blocking I/O ``fd`` is ready for."""

    @abc.abstractmethod
    def deadline(self) -> float | None:
        """Monotonic time at which :meth:`tick` must run, or None."""

    @abc.abstractmethod
    def tick(self) -> None:
        """Called at (or after) the deadline, and after each batch of I/O."""

    @property
    @abc.abstractmethod
    def done(self) -> bool:
        """True once nothing more will happen; the pump's result is ready."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Stop the workload now (the caller was interrupted); idempotent."""


def drive(pump: Pump) -> None:
    """Run ``pump`` to its end on this thread. If the wait is interrupted
    (Ctrl-C, an exception from a callback), the pump is aborted first."""
    sel = selectors.DefaultSelector()
    registered: dict[int, int] = {}
    try:
        while not pump.done:
            want = pump.interests()
            for fd in [f for f in registered if f not in want]:
                sel.unregister(fd)
                del registered[fd]
            for fd, ev in want.items():
                if fd not in registered:
                    sel.register(fd, ev)
                elif registered[fd] != ev:
                    sel.modify(fd, ev)
                registered[fd] = ev
            if pump.done:
                break
            due = pump.deadline()
            wait = None if due is None else max(0.0, due - time.monotonic())
            if not registered and wait is None:
                pump.tick()  # nothing to wait on: the pump must move by itself
                continue
            for key, events in sel.select(wait):
                pump.ready(key.fd, events)
            pump.tick()
    except BaseException:
        pump.abort()
        raise
    finally:
        sel.close()


async def adrive(pump: Pump, wake: asyncio.Event | None = None) -> None:
    """Await ``pump`` on the running asyncio loop: its descriptors are
    watched by the loop itself (add_reader/add_writer), its deadline by a
    timer. Cancelling the task aborts the workload. Setting ``wake`` makes
    it look at the pump's interests again (after ``send_stdin``)."""
    loop = asyncio.get_running_loop()
    wake = wake or asyncio.Event()
    watched: dict[int, int] = {}

    def on_ready(fd: int, events: int) -> None:
        pump.ready(fd, events)
        wake.set()

    def sync() -> None:
        want = {} if pump.done else pump.interests()
        for fd, ev in list(watched.items()):
            if want.get(fd) != ev:
                if ev & READ:
                    loop.remove_reader(fd)
                if ev & WRITE:
                    loop.remove_writer(fd)
                del watched[fd]
        for fd, ev in want.items():
            if fd not in watched:
                if ev & READ:
                    loop.add_reader(fd, on_ready, fd, READ)
                if ev & WRITE:
                    loop.add_writer(fd, on_ready, fd, WRITE)
                watched[fd] = ev

    try:
        while not pump.done:
            sync()
            due = pump.deadline()
            wake.clear()
            timeout = None if due is None else max(0.0, due - time.monotonic())
            if not watched and timeout is None:
                pump.tick()
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout)
            pump.tick()
    except BaseException:
        pump.abort()
        raise
    finally:
        for fd, ev in watched.items():
            if ev & READ:
                loop.remove_reader(fd)
            if ev & WRITE:
                loop.remove_writer(fd)


class Reactor:
    """One thread that moves every background pump of this process forward.

    Started on first use; idle when nothing runs. ``submit`` returns at once;
    ``on_done`` runs on the reactor thread when the pump ends (it must be
    quick and must not block)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pumps: dict[Pump, Callable[[], None]] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread: threading.Thread | None = None

    def submit(self, pump: Pump, on_done: Callable[[], None]) -> None:
        with self._lock:
            self._pumps[pump] = on_done
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="tierbox-reactor", daemon=True
                )
                self._thread.start()
        self.wake()

    def wake(self) -> None:
        """Make the reactor look at its pumps again (new work, stdin to send)."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _loop(self) -> None:
        while True:
            with self._lock:
                pumps = dict(self._pumps)
            for pump, on_done in pumps.items():
                if pump.done:
                    with self._lock:
                        self._pumps.pop(pump, None)
                    on_done()
            with self._lock:
                pumps = dict(self._pumps)
            # a fresh selector each round: pumps close and reopen descriptors,
            # and a number reused by another file must never be watched stale
            with selectors.DefaultSelector() as sel:
                sel.register(self._wake_r, READ)
                owner: dict[int, Pump] = {}
                for pump in pumps:
                    for fd, ev in pump.interests().items():
                        sel.register(fd, ev)
                        owner[fd] = pump
                dues = [d for p in pumps if (d := p.deadline()) is not None]
                wait = max(0.0, min(dues) - time.monotonic()) if dues else None
                for key, events in sel.select(wait):
                    if key.fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            while os.read(self._wake_r, 4096):
                                pass
                    elif key.fd in owner:
                        owner[key.fd].ready(key.fd, events)
            for pump in pumps:
                pump.tick()


_reactor: Reactor | None = None
_reactor_lock = threading.Lock()


def reactor() -> Reactor:
    """This process's reactor for background runs."""
    global _reactor
    with _reactor_lock:
        if _reactor is None:
            _reactor = Reactor()
        return _reactor
