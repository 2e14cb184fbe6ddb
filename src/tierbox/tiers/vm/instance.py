"""One VM as a sandbox: :class:`VMInstance` (a libvirt domain with the guest
agent on a virtio-serial port).

Calls and commands share the agent line side by side (:mod:`tierbox.vmm.line`);
it is handed back when the last of them ends (QEMU serves one client at a
time, and other processes, such as the CLI, attach to the same VM), and a
line that went away because QEMU restarted (a libvirt revert) is reopened
once. Snapshots and revert are in
:mod:`tierbox.tiers.vm.snapshots`.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
    TierboxError,
    UsageError,
)
from tierbox.spec import (
    MIB,
    ExecResult,
    FileEntry,
    ProcessInfo,
    SandboxSpec,
    Stats,
    Termination,
    TerminationKind,
)
from tierbox.tiers.base import Instance
from tierbox.tiers.commands import Command, ExecRequest
from tierbox.tiers.guest_command import GuestCommand
from tierbox.tiers.outcome import classify_agent
from tierbox.tiers.vm import network as vm_net
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
from tierbox.vmm.agent import (
    AgentClient,
    ExecOutcome,
    GuestConfig,
    GuestExec,
    file_error,
    refused_outcome,
    start_in_guest,
)
from tierbox.vmm.guest import file_tail, guest_stats

if TYPE_CHECKING:
    from tierbox.tiers.vm.tier import VMTier

T = TypeVar("T")


class VMInstance(SnapshotOps, Instance):
    """One tierbox VM (a libvirt domain). Thread-safe: calls and commands
    share one agent line."""

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
        #: users of the agent line (calls, running commands) and who connects it
        self._users = 0
        self._users_lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._closed = False
        self._generation = -1
        self._hung: str | None = None  # why the VM was stopped as untrustworthy

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
        """The last ``n_bytes`` of the guest's serial console, as virtlogd
        logs it (capped and rotated by virtlogd); works on a dead VM too."""
        if not isinstance(n_bytes, int) or isinstance(n_bytes, bool) or n_bytes < 0:
            raise UsageError(f"n_bytes={n_bytes!r} must be a whole number of bytes, 0 or more")
        return file_tail(self.meta.console, n_bytes)

    # ---- the agent line --------------------------------------------------------------------
    def _alive(self) -> bool:
        return self.qemu_pid() is not None

    def _check_usable(self) -> None:
        if self._closed:
            raise SandboxClosedError(f"VM {self.name} is closed")
        if self._hung is not None:
            raise self._hung_error()

    def _hung_error(self) -> SandboxDeadError:
        return SandboxDeadError(
            f"VM {self.name} is dead ({self._hung}; it was stopped): close it and create a "
            f"new one (`tierbox vm start {self.name}` boots this one again from its disk)"
        )

    def _stop_hung(self, exc: Exception, what: str) -> SandboxDeadError:
        """An agent that stopped answering or broke the protocol is not asked
        again (a guest root may be answering in its place): the VM is
        destroyed (its disk stays) and every later call raises SandboxDeadError."""
        self.agent.close(f"the VM stopped answering ({what})")
        self._hung = f"its agent failed {what}: {exc}"
        with contextlib.suppress(TierboxError):
            dom = self.domain()
            if dom.isActive():
                lvh.call(f"stopping VM {self.name}", dom.destroy)
        return self._hung_error()

    @translated("connecting to a VM's agent")
    def connect_agent(self, *, deadline: float, sync: bool = True) -> None:
        """(Re)open the agent line, identify the agent, set its clock, reseed its
        RNG. Commands still on the old line end (a revert, a restart)."""
        self.agent.close("the VM's agent line was reopened")
        self.agent.connect(deadline=deadline, alive=self._alive)
        self.agent_info = self.agent.hello(deadline=deadline)
        if sync:
            self.agent.sync(deadline=deadline)

    def _use_line(self) -> None:
        """Count one user of the agent line (a call, a running command),
        connecting it if it is not. Every user ends with :meth:`_line_done`."""
        with self._users_lock:
            self._users += 1
        try:
            if not self.agent.connected:
                with self._connect_lock:
                    if not self.agent.connected:
                        self.connect_agent(deadline=time.monotonic() + CALL_TIMEOUT_S, sync=False)
        except (AgentGoneError, AgentTimeoutError, AgentError) as exc:
            self._line_done()
            self.agent.close()
            raise self._gone_or_hung(
                exc,
                "connecting to the agent; is another process holding its line with a long command?",
            ) from exc
        except BaseException:
            self._line_done()
            raise

    def _line_done(self) -> None:
        """One user of the line is done; the last hands the line back (QEMU
        serves one client at a time, and reconnecting costs under a
        millisecond, so other processes, such as the CLI, never wait on an
        idle holder). Quick and never blocking: it may run on the line's
        own reader."""
        with self._users_lock:
            self._users -= 1
            if self._users == 0:
                self.agent.close()

    def _release_agent(self) -> None:
        """Hand the line back unless calls or commands are on it."""
        with self._users_lock:
            if self._users == 0:
                self.agent.close()

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
        """An agent call beside whatever else runs on the line, reconnecting
        once when the line went away (QEMU restarted) if ``retry``.
        ``refused`` turns the agent's own errors into the caller's (file
        errors); a dead VM raises SandboxDeadError."""
        self._check_usable()
        for attempt in (0, 1):
            self._use_line()
            try:
                return fn()
            except AgentGoneError as exc:
                if attempt or not retry or not self._alive():
                    raise self._gone_or_hung(exc, what) from exc
            except AgentTimeoutError as exc:
                raise self._stop_hung(exc, what) from exc
            except AgentError as exc:
                if refused is not None:
                    raise refused(exc) from exc
                raise SandboxError(f"{what} failed in VM {self.name}: {exc}") from exc
            finally:
                self._line_done()
        raise AssertionError("unreachable")

    # ---- the contract --------------------------------------------------------------------
    def _start(self, req: ExecRequest) -> Command:
        """Start a command through the guest agent and return it running. It
        holds the agent line (not the instance) until it ends: other
        commands, files and stats go on beside it."""
        self._check_usable()
        timeout = req.timeout_s if req.timeout_s is not None else self.spec.limits.timeout_s
        started = time.monotonic()
        for attempt in (0, 1):
            self._use_line()
            host_deadline = time.monotonic() + timeout * 1.25 + EXEC_GRACE_S if timeout else None
            try:
                gexec = start_in_guest(
                    self.agent,
                    self.guest,
                    self.spec,
                    req.argv,
                    env=req.env,
                    stdin=req.stdin,
                    timeout_s=timeout,
                    host_deadline=host_deadline,
                    cwd=req.cwd,
                    user=req.user,
                    on_stdout=req.on_stdout,
                    on_stderr=req.on_stderr,
                    keep_stdin_open=req.keep_stdin_open,
                    tty=req.tty,
                    on_end=self._line_done,
                )
            except AgentGoneError as exc:
                self._line_done()
                if attempt == 0 and self._alive():
                    continue  # the line was stale (QEMU restarted): once more
                raise self._gone_or_hung(exc, f"running {req.argv[0]!r}") from exc
            except AgentTimeoutError as exc:
                self._line_done()
                raise self._stop_hung(exc, f"running {req.argv[0]!r}") from exc
            except AgentError as exc:
                self._line_done()
                raise SandboxError(f"VM {self.name} cannot run commands: {exc}") from exc
            except BaseException:
                self._line_done()
                raise
            return GuestCommand(gexec, self._finisher(req.argv[0], timeout, started, gexec))
        raise AssertionError("unreachable")

    def _finisher(
        self, program: str, timeout: float | None, started: float, gexec: GuestExec
    ) -> Callable[[Callable[[], ExecOutcome]], ExecResult]:
        def finish(outcome: Callable[[], ExecOutcome]) -> ExecResult:
            try:
                out = outcome()
            except AgentTimeoutError as exc:
                self._stop_hung(exc, f"running {program!r}")
                term = Termination(
                    TerminationKind.TIMED_OUT,
                    signal=int(signal.SIGKILL),
                    evidence={"timeout_s": timeout, "guest": f"{exc}; the VM was stopped"},
                )
                return ExecResult(b"", b"", term, time.monotonic() - started)
            except AgentGoneError as exc:
                # this side ended the line (close, revert, power off): the
                # command's end is that, not a dead VM
                why = "the VM was closed" if self._closed else gexec.line.closed_by_host
                if why is None:
                    raise self._gone_or_hung(exc, f"running {program!r}") from exc
                term = Termination(
                    TerminationKind.SIGNALED,
                    signal=int(signal.SIGKILL),
                    evidence={"vmm": f"{why} while the command ran"},
                )
                return ExecResult(b"", b"", term, time.monotonic() - started)
            except AgentError as exc:
                out = refused_outcome(exc, program, f"VM {self.name}")
            return classify_agent(
                out,
                timeout_s=timeout,
                output_bytes=self.spec.limits.output_bytes,
                memory_mib=self.spec.limits.memory_mib or DEFAULT_MEMORY_MIB,
            )

        return finish

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
        st = guest_stats(self.qemu_pid(), guest)
        net = vm_net.counters(self.id, self.spec)
        if net is not None:
            st = dataclasses.replace(st, net_tx_bytes=net[0], net_rx_bytes=net[1])
        return st

    def processes(self) -> list[ProcessInfo]:
        """What runs in the guest (pids as the guest numbers them; the agent,
        PID 1, and kernel threads left out), read from its /proc by the agent."""
        return self._call(
            "listing processes",
            lambda: self.agent.processes(deadline=time.monotonic() + CALL_TIMEOUT_S),
        )

    def sample(self) -> Stats:
        """What the VM's QEMU costs the host now (PSS, CPU): no agent call,
        cheap enough to read every 100 ms."""
        return guest_stats(self.qemu_pid(), {})

    # ---- power ------------------------------------------------------------------------------
    @translated("starting a VM")
    def power_on(self) -> None:
        """Boot a stopped VM again (cold boot from its disk)."""
        with self._lock:
            self._check_usable()
            dom = self.domain()
            if dom.isActive():
                return
            if "<label>+0:+0</label>" in str(dom.XMLDesc(0)):
                log.warning(
                    "tierbox: VM %s was made by an older tierbox: its QEMU runs as root with "
                    "its files under $TIERBOX_HOME; recreate it to run QEMU unprivileged",
                    self.name,
                )
            sockets_dir().mkdir(parents=True, exist_ok=True)
            Path(self.meta.socket).unlink(missing_ok=True)
            lvh.call(f"starting VM {self.name}", dom.create)
            deadline = time.monotonic() + BOOT_TIMEOUT_S.get(self.meta.accel, 90.0)
            try:
                self.connect_agent(deadline=deadline)
                vm_net.configure_guest(self.agent, self.spec, deadline=deadline)
            except (AgentGoneError, AgentTimeoutError, AgentError) as exc:
                self.agent.close()
                raise self._boot_failure(exc) from exc
            self._release_agent()

    @translated("stopping a VM")
    def power_off(self, *, timeout_s: float = 30.0) -> None:
        """Power the VM off (its disk and snapshots stay): the agent syncs the
        guest's file systems and powers off; after ``timeout_s`` libvirt pulls
        the plug. The agent gets the whole budget: a guest under TCG on a
        loaded host can take seconds to answer, and pulling the plug early
        loses what it had not written."""
        with self._lock:
            dom = self.domain()
            if not dom.isActive():
                return
            deadline = time.monotonic() + timeout_s
            # a guest that cannot be asked to power off is destroyed below
            with contextlib.suppress(AgentError, AgentGoneError, AgentTimeoutError):
                self.agent.close("the VM was powered off")
                self.agent.connect(deadline=deadline, alive=self._alive)
                self.agent.poweroff(deadline=deadline)
            self.agent.close()
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
            self.agent.close("the VM was closed")
            self.tier.remove_domain(self.domain_name, self.meta)
            self._closed = True
            return Termination(TerminationKind.SIGNALED, signal=int(signal.SIGKILL))
