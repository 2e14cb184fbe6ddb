"""One VM as a sandbox: :class:`VMInstance` (a libvirt domain with the guest
agent on a virtio-serial port).

Every call goes over the agent line, which is handed back after each call
(QEMU serves one client at a time, and other processes, such as the CLI,
attach to the same VM); a line that went away because QEMU restarted (a
libvirt revert) is reopened once. Snapshots and revert are in
:mod:`tierbox.tiers.vm.snapshots`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from tierbox import libvirt_host as lvh
from tierbox.errors import (
    AgentError,
    AgentGoneError,
    AgentTimeoutError,
    LibvirtError,
    SandboxClosedError,
    SandboxDeadError,
    SandboxError,
)
from tierbox.spec import (
    MIB,
    ExecResult,
    FileEntry,
    SandboxSpec,
    Stats,
    Termination,
    TerminationKind,
)
from tierbox.tiers.base import Instance
from tierbox.tiers.commands import Command, ExecRequest, InlineCommand
from tierbox.tiers.outcome import classify_agent
from tierbox.tiers.vm.shared import (
    BOOT_TIMEOUT_S,
    CALL_TIMEOUT_S,
    CAPABILITIES,
    DEFAULT_MEMORY_MIB,
    EXEC_GRACE_S,
    STATE_NAMES,
    log,
    qemu_pid,
    sockets_dir,
    translated,
)
from tierbox.tiers.vm.snapshots import SnapshotOps
from tierbox.vmm import libvirt_domain as lvd
from tierbox.vmm import qemu
from tierbox.vmm.agent import AgentClient, Cancel, GuestConfig, file_error, run_in_guest
from tierbox.vmm.guest import file_tail, guest_stats

if TYPE_CHECKING:
    from tierbox.tiers.vm.tier import VMTier

T = TypeVar("T")


class VMInstance(SnapshotOps, Instance):
    """One tierbox VM (a libvirt domain). Thread-safe: calls share one agent line."""

    tier_name = "vm"
    capabilities = CAPABILITIES

    def __init__(self, tier: VMTier, domain: str, meta: lvd.VMMeta) -> None:
        self.tier = tier
        self.id = meta.id
        self.domain_name = domain
        self.meta = meta
        self.spec = SandboxSpec.from_dict(meta.spec)
        self.guest = GuestConfig.from_dict(meta.guest)
        self.agent = AgentClient(Path(meta.socket))
        self.agent_info: dict[str, str] = {}
        #: seconds spent in each step of the last create or revert (benchmarks)
        self.timings: dict[str, float] = {}
        self._lock = threading.RLock()
        self._closed = False
        self._generation = -1

    @property
    def name(self) -> str:
        return self.meta.id

    # ---- state for attach / gc -------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"domain": self.domain_name, "meta": self.meta.to_dict()}

    # ---- libvirt -------------------------------------------------------------------------
    def domain(self) -> Any:
        """The libvirt domain object (``virDomain``).

        After libvirtd came back (a new connection), a guest that libvirt left
        paused in the middle of a snapshot, save or revert is resumed.
        """
        try:
            dom = lvh.lookup(self.domain_name)
        except LibvirtError as exc:
            if lvh.is_code(exc, "VIR_ERR_NO_DOMAIN"):
                raise SandboxDeadError(
                    f"VM {self.name} is gone: libvirt has no domain {self.domain_name}; "
                    "close it and create a new one"
                ) from exc
            raise
        if self._generation != lvh.generation:
            self._generation = lvh.generation
            self._resume_if_stranded(dom)
        return dom

    def _resume_if_stranded(self, dom: Any) -> None:
        lv = lvh.binding()
        stranded = {
            lv.VIR_DOMAIN_PAUSED_UNKNOWN,
            lv.VIR_DOMAIN_PAUSED_MIGRATION,
            lv.VIR_DOMAIN_PAUSED_SAVE,
            lv.VIR_DOMAIN_PAUSED_SNAPSHOT,
            lv.VIR_DOMAIN_PAUSED_FROM_SNAPSHOT,
        }
        # best effort: a guest that cannot be resumed here shows as paused, and
        # the call that needs it fails with libvirt's own reason
        with contextlib.suppress(lv.libvirtError):
            state, reason = dom.state()
            if state == lv.VIR_DOMAIN_PAUSED and reason in stranded:
                dom.resume()
                log.warning(
                    "tierbox: VM %s was left paused (reason %s) by an interrupted "
                    "libvirt operation; resumed it",
                    self.name,
                    reason,
                )

    @translated("reading the state of a VM")
    def domain_state(self) -> str:
        st = lvh.call("reading the domain state", self.domain().state)
        return STATE_NAMES.get(int(st[0]), str(st[0]))

    def host_pids(self) -> list[int]:
        pid = self.qemu_pid()
        return [pid] if pid else []

    def qemu_pid(self) -> int | None:
        return qemu_pid(self.domain_name)

    def alive(self) -> bool:
        """Open, and its QEMU still running (libvirt's pid file, no libvirt call)."""
        return not self._closed and self._alive()

    def console_tail(self, n_bytes: int = 4000) -> str:
        return file_tail(self.meta.console, n_bytes)

    # ---- the agent line --------------------------------------------------------------------
    def _alive(self) -> bool:
        return self.qemu_pid() is not None

    def _check_usable(self) -> None:
        if self._closed:
            raise SandboxClosedError(f"VM {self.name} is closed")

    @translated("connecting to a VM's agent")
    def connect_agent(self, *, deadline: float, sync: bool = True) -> None:
        """(Re)open the agent line, identify the agent, set its clock, reseed its RNG."""
        self.agent.close()
        self.agent.connect(deadline=deadline, alive=self._alive)
        self.agent_info = self.agent.hello(deadline=deadline)
        if sync:
            self.agent.sync(deadline=deadline)

    def _ensure_agent(self) -> None:
        if not self.agent.connected:
            try:
                self.connect_agent(deadline=time.monotonic() + CALL_TIMEOUT_S, sync=False)
            except (AgentGoneError, AgentTimeoutError, AgentError) as exc:
                self.agent.close()
                raise self._gone_or_hung(
                    exc,
                    "connecting to the agent; is another process holding its line "
                    "with a long command?",
                ) from exc

    def _gone_or_hung(self, exc: Exception, what: str) -> SandboxError:
        """SandboxDeadError when the VM's QEMU is gone (killed, crashed, the
        guest powered off or panicked), else a VM that did not answer."""
        if not self._alive():
            panic = qemu.console_panic(self.console_tail(16000))
            why = f"the guest kernel panicked: {panic}" if panic else "its QEMU is not running"
            return SandboxDeadError(
                f"VM {self.name} is dead ({why}): close it and create a new one "
                f"(`tierbox vm start {self.name}` boots this one again from its disk)"
            )
        return SandboxError(f"VM {self.name} did not answer ({what}): {exc}")

    def _call(
        self,
        what: str,
        fn: Callable[[], T],
        *,
        refused: Callable[[AgentError], SandboxError] | None = None,
        retry: bool = True,
    ) -> T:
        """An agent call, reconnecting once when the line went away (QEMU
        restarted) if ``retry``. ``refused`` turns the agent's own errors into
        the caller's (file errors); a dead VM raises SandboxDeadError."""
        with self._lock:
            self._check_usable()
            for attempt in (0, 1):
                self._ensure_agent()
                try:
                    result = fn()
                except AgentGoneError as exc:
                    self.agent.close()
                    if attempt or not retry or not self._alive():
                        raise self._gone_or_hung(exc, what) from exc
                    continue
                except AgentTimeoutError as exc:
                    self.agent.close()
                    raise self._gone_or_hung(exc, what) from exc
                except AgentError as exc:
                    self._release_agent()
                    if refused is not None:
                        raise refused(exc) from exc
                    raise SandboxError(f"{what} failed in VM {self.name}: {exc}") from exc
                except BaseException:
                    self._release_agent()
                    raise
                self._release_agent()
                return result
            raise AssertionError("unreachable")

    def _release_agent(self) -> None:
        """Hand the agent line back after each call: QEMU serves one client at
        a time, and reconnecting costs under a millisecond, so other processes
        (the CLI) never wait on an idle holder."""
        self.agent.close()

    # ---- the contract --------------------------------------------------------------------
    def _start(self, req: ExecRequest) -> Command:
        """One command through the guest agent: a blocking call (background
        and async runs give it a thread); ``kill`` asks the agent to end it."""
        cancel = Cancel()

        def work() -> ExecResult:
            try:
                return self._exec_request(req, cancel)
            finally:
                cancel.close()

        return InlineCommand(work, kill=lambda _sig: cancel.set())

    def _exec_request(self, req: ExecRequest, cancel: Cancel) -> ExecResult:
        argv, stdin, env = req.argv, req.stdin, req.env
        timeout = req.timeout(self.spec.limits.timeout_s)
        with self._lock:
            self._check_usable()
            started = time.monotonic()
            for attempt in (0, 1):
                self._ensure_agent()
                host_deadline = (
                    time.monotonic() + timeout * 1.25 + EXEC_GRACE_S if timeout else None
                )
                try:
                    out = run_in_guest(
                        self.agent,
                        self.guest,
                        self.spec,
                        argv,
                        env=env,
                        stdin=stdin,
                        timeout_s=timeout,
                        host_deadline=host_deadline,
                        where=f"VM {self.name}",
                        cwd=req.cwd,
                        user=req.user,
                        on_stdout=req.on_stdout,
                        on_stderr=req.on_stderr,
                        cancel=cancel,
                    )
                except AgentTimeoutError as exc:
                    self.agent.close()
                    term = Termination(
                        TerminationKind.TIMED_OUT,
                        signal=int(signal.SIGKILL),
                        evidence={"timeout_s": timeout, "guest": f"{exc}"},
                    )
                    return ExecResult(b"", b"", term, time.monotonic() - started)
                except AgentGoneError as exc:
                    self.agent.close()
                    if attempt == 0 and self._alive():
                        continue  # the line was stale (QEMU restarted): once more
                    raise self._gone_or_hung(exc, f"running {argv[0]!r}") from exc
                finally:
                    self._release_agent()
                return classify_agent(
                    out,
                    timeout_s=timeout,
                    output_bytes=self.spec.limits.output_bytes,
                    memory_mib=self.spec.limits.memory_mib or DEFAULT_MEMORY_MIB,
                )
            raise AssertionError("unreachable")

    # ---- files (through the agent, as the workload's user: see vmm/agent.py) -------------
    def _refused(self, verb: str, path: str) -> Callable[[AgentError], SandboxError]:
        return lambda exc: file_error(exc, verb, path, f"VM {self.name}")

    def _put_file(self, path: str, data: bytes, mode: int) -> None:
        self._call(
            f"writing {path}",
            lambda: self.agent.put(
                path,
                data,
                mode=mode,
                uid=self.guest.uid,
                gid=self.guest.gid,
                deadline=time.monotonic() + CALL_TIMEOUT_S + len(data) / (20 * MIB),
            ),
            refused=self._refused("write", path),
        )

    def _get_file(self, path: str, max_bytes: int) -> bytes:
        return self._call(
            f"reading {path}",
            lambda: self.agent.get(
                path,
                uid=self.guest.uid,
                gid=self.guest.gid,
                max_bytes=max_bytes,
                idle_timeout_s=CALL_TIMEOUT_S,
            ),
            refused=self._refused("read", path),
        )

    def _copy_out(self, path: str, out: BinaryIO, max_bytes: int | None) -> int:
        # no retry: part of the file may be in ``out`` already
        return self._call(
            f"reading {path}",
            lambda: self.agent.copy_out(
                path,
                out.write,
                uid=self.guest.uid,
                gid=self.guest.gid,
                max_bytes=max_bytes,
                idle_timeout_s=CALL_TIMEOUT_S,
            ),
            refused=self._refused("read", path),
            retry=False,
        )

    def _entries(self, path: str) -> list[FileEntry]:
        return self._call(
            f"listing {path}",
            lambda: self.agent.entries(
                path, uid=self.guest.uid, gid=self.guest.gid, idle_timeout_s=CALL_TIMEOUT_S
            ),
            refused=self._refused("list", path),
        )

    def stats(self) -> Stats:
        """Host cost of the VM (its QEMU's PSS, peak RSS, CPU time) and the
        guest's view (processes, guest OOM kills)."""
        guest = self._call("stats", lambda: self.agent.stats(deadline=time.monotonic() + 10.0))
        return guest_stats(self.qemu_pid(), guest)

    # ---- power ------------------------------------------------------------------------------
    @translated("starting a VM")
    def power_on(self) -> None:
        """Boot a stopped VM again (cold boot from its disk)."""
        with self._lock:
            self._check_usable()
            dom = self.domain()
            if dom.isActive():
                return
            sockets_dir().mkdir(parents=True, exist_ok=True)
            Path(self.meta.socket).unlink(missing_ok=True)
            lvh.call(f"starting VM {self.name}", dom.create)
            deadline = time.monotonic() + BOOT_TIMEOUT_S.get(self.meta.accel, 90.0)
            try:
                self.connect_agent(deadline=deadline)
            except (AgentGoneError, AgentTimeoutError, AgentError) as exc:
                self.agent.close()
                raise self._boot_failure(exc) from exc
            self._release_agent()

    @translated("stopping a VM")
    def power_off(self, *, timeout_s: float = 10.0) -> None:
        """Power the VM off (its disk and snapshots stay): the agent syncs the
        guest's file systems and powers off; after ``timeout_s`` libvirt pulls
        the plug."""
        with self._lock:
            dom = self.domain()
            if not dom.isActive():
                return
            # a guest that cannot be asked to power off is destroyed below
            with contextlib.suppress(AgentError, AgentGoneError, AgentTimeoutError):
                self.agent.close()
                self.agent.connect(deadline=time.monotonic() + 2.0, alive=self._alive)
                self.agent.poweroff(deadline=time.monotonic() + 5.0)
            self.agent.close()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and dom.isActive():
                time.sleep(0.05)
            if dom.isActive():
                try:
                    lvh.call(f"stopping VM {self.name}", dom.destroy)
                except LibvirtError:
                    if dom.isActive():
                        raise
                    # it powered off between the check and the destroy: it is off

    def _boot_failure(self, exc: Exception) -> SandboxError:
        time.sleep(0.2)
        console = self.console_tail(1500).strip()
        lines = "\n  ".join(console.splitlines()[-12:]) if console else "(empty)"
        if self._alive():
            what = (
                f"the guest agent did not answer ({exc}); the guest may still be booting "
                f"or be hung (domain type {'kvm' if self.meta.accel == 'kvm' else 'qemu'})"
            )
        else:
            panic = qemu.console_panic(console)
            what = f"the VM stopped while booting{': ' + panic if panic else ''}"
        return SandboxError(f"VM {self.name} did not start: {what}\n  console:\n  {lines}")

    @translated("removing a VM")
    def close(self) -> Termination | None:
        """Destroy the domain and remove its snapshots, disk and files. Idempotent."""
        with self._lock:
            if self._closed:
                return None
            self.agent.close()
            self.tier.remove_domain(self.domain_name, self.meta)
            self._closed = True
            return Termination(TerminationKind.SIGNALED, signal=int(signal.SIGKILL))
