"""One microVM as a sandbox: :class:`MicroVMInstance`, a QEMU ``-M microvm``
process with the guest agent behind a virtio-serial port.

Commands, files, stats and process listings share one agent line side by
side (:mod:`tierbox.vmm.line`): a background command blocks nothing. A guest
that stops answering is stopped (a timeout), and a guest that died (panic,
killed QEMU, host OOM killer) makes every later call raise SandboxDeadError
with the evidence of how it ended. Snapshots are in :mod:`tierbox.tiers.microvm.snapshots`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from tierbox.errors import (
    AgentError,
    AgentGoneError,
    AgentProtocolError,
    AgentTimeoutError,
    HostError,
    SandboxClosedError,
    SandboxDeadError,
    SandboxError,
    UsageError,
)
from tierbox.host.cgroups import SandboxCgroup
from tierbox.network import Egress, NetworkPolicy
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
from tierbox.tiers import _state
from tierbox.tiers.base import Capabilities, Instance, SnapshotKind
from tierbox.tiers.commands import Command, ExecRequest, Finished
from tierbox.tiers.guest_command import GuestCommand
from tierbox.tiers.microvm import network as guest_net
from tierbox.tiers.microvm.snapshots import SnapshotOps
from tierbox.tiers.outcome import classify_agent, signame
from tierbox.vmm import qemu
from tierbox.vmm.agent import (
    AgentClient,
    ExecOutcome,
    GuestConfig,
    file_error,
    refused_outcome,
    start_in_guest,
)
from tierbox.vmm.guest import guest_stats
from tierbox.vmm.jail import VmmUser
from tierbox.vmm.qmp import QMPClient

if TYPE_CHECKING:
    from tierbox.host.netgw import Gateway
    from tierbox.tiers.microvm.tier import MicroVMTier

T = TypeVar("T")
_DOING = {"read": "reading", "write": "writing", "list": "listing"}

#: Host-side deadline for agent calls that are not execs (files, stats).
CALL_TIMEOUT_S = 30.0

CAPABILITIES = Capabilities(
    snapshot=SnapshotKind.RESTORE,
    min_memory_mib=qemu.MIN_MEMORY_MIB,
    shares_host_files=False,
    tty=True,
    networks=frozenset({NetworkPolicy.NONE, NetworkPolicy.EGRESS}),
    publish_ports=True,
)


def vm_state_file(d: Path) -> Path:
    """The microVM's own record in its sandbox directory (QEMU pid, machine,
    guest settings): what attach, snapshots and reap read."""
    return d / "vm.json"


class MicroVMInstance(SnapshotOps, Instance):
    """One running microVM. Thread-safe: calls share one agent line."""

    tier_name = "microvm"
    capabilities = CAPABILITIES

    def __init__(
        self,
        tier: MicroVMTier,
        sandbox_id: str,
        spec: SandboxSpec,
        machine: qemu.Machine,
        guest: GuestConfig,
        proc: qemu.QemuProcess,
        cgroup: SandboxCgroup | None,
        ram_path: Path | None,
        disk_info: dict[str, Any] | None,
        *,
        gateway: Gateway | None = None,
        vmm_user: VmmUser | None = None,
    ) -> None:
        self.tier = tier
        self.id = sandbox_id
        self.spec = spec
        self.machine = machine
        self.guest = guest
        self.proc = proc
        self.files = proc.files
        self.cgroup = cgroup
        #: the shared RAM file of a cold-booted guest; None for a restored one
        #: (whose RAM is a private mapping of its snapshot's file)
        self.ram_path = ram_path
        self.disk_info = disk_info
        #: the egress network's router (None: no NIC)
        self.gateway = gateway
        #: who QEMU runs as (None: unjailed, a benchmark knob); its uid is
        #: freed on close
        self.vmm_user = vmm_user
        self.agent = AgentClient(self.files.agent)
        self.agent_info: dict[str, str] = {}
        self._qmp: QMPClient | None = None
        self._lock = threading.RLock()
        self._close_lock = threading.Lock()
        self._closed = False
        self._dead: Termination | None = None
        self._snap_seq = 0

    # ---- state for attach / gc ----------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "dir": str(self.files.dir),
            "pid": self.proc.pid,
            "machine": self.machine.to_dict(),
            "guest": self.guest.to_dict(),
            "cgroup": self.cgroup.relpath if self.cgroup is not None else None,
            "ram_path": str(self.ram_path) if self.ram_path is not None else None,
            "vmm_uid": self.vmm_user.uid if self.vmm_user is not None else None,
            "disk": self.disk_info,
            "net": (
                {
                    **self.gateway.state(),
                    "guest_address": self.gateway.guest_address,
                    "gateway_address": self.gateway.gateway_address,
                }
                if self.gateway is not None
                else None
            ),
        }

    def _save_state(self) -> None:
        d = self.files.dir
        tmp = d / "vm.json.tmp"
        tmp.write_text(json.dumps({**self.state(), "spec": self.spec.to_dict()}, indent=1))
        os.replace(tmp, vm_state_file(d))
        if not (d / "state.json").exists():
            _state.write_state(
                self.id,
                {
                    "id": self.id,
                    "tier": "microvm",
                    "spec": self.spec.to_dict(),
                    "created": time.time(),
                    "persistent": False,
                    "owner_pid": os.getpid(),
                    "tier_state": self.state(),
                },
            )

    # ---- liveness ---------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed")
        if self._dead is None and not self.proc.alive():
            self._dead = self._death_termination()
        if self._dead is not None:
            raise self._dead_error()

    def _dead_error(self, what: str = "") -> SandboxDeadError:
        """What every call on a dead VM raises (``close`` still works)."""
        assert self._dead is not None
        during = f" ({what})" if what else ""
        return SandboxDeadError(
            f"microVM {self.id} is dead{during}: {self._dead.describe()}; nothing in it is "
            "reachable any more: close it and create a new one"
        )

    def _death_termination(self) -> Termination:
        """Why the VM is gone, from QEMU's exit, the console and the cgroup."""
        rc = self.proc.wait(2.0)
        console = self.proc.console_tail(16000)
        panic = qemu.console_panic(console)
        ev: dict[str, Any] = {}
        if panic is not None:
            ev["guest_kernel_panic"] = panic
            kind = TerminationKind.SIGNALED
        elif self.cgroup is not None and _safe_oom_kills(self.cgroup) > 0:
            ev["vmm"] = "QEMU was killed by the host OOM killer"
            ev["oom_kill"] = _safe_oom_kills(self.cgroup)
            kind = TerminationKind.OOM_KILLED
        else:
            kind = TerminationKind.SIGNALED
        if rc is None:
            ev["vmm"] = ev.get("vmm", "QEMU stopped answering")
        elif rc < 0:
            ev.setdefault("vmm", f"QEMU was killed by signal {-rc} ({signame(-rc)})")
        elif rc == 0 and panic is None:
            ev["vmm"] = "the guest shut down (QEMU exited with code 0)"
        elif rc > 0:
            ev.setdefault("vmm", f"QEMU exited with code {rc}")
        tail = self.proc.log_tail(400).strip()
        if rc and tail:
            ev["qemu_log"] = tail.splitlines()[-1]
        return Termination(kind, signal=int(signal.SIGKILL), evidence=ev)

    def _stop_vm(self, term: Termination) -> Termination:
        """Kill a VM that cannot be trusted any more; later calls report ``term``."""
        self._dead = term
        self.proc.kill()
        return term

    # ---- agent connection ------------------------------------------------------------
    def _connect(self, *, deadline: float, hello: bool) -> None:
        try:
            self.agent.connect(deadline=deadline, alive=self.proc.alive)
            if hello:
                self.agent_info = self.agent.hello(deadline=deadline)
            self.agent.sync(deadline=deadline)
        except (AgentGoneError, AgentTimeoutError, AgentError) as exc:
            raise self._boot_failure(exc, deadline) from exc

    def _boot_failure(self, exc: Exception, deadline: float) -> SandboxError:
        if isinstance(exc, AgentGoneError):
            self.proc.wait(2.0)  # the socket closes a moment before QEMU is reaped
        alive = self.proc.alive()
        console = self.proc.console_tail(1500).strip()
        if alive:
            what = (
                f"the guest agent did not answer ({exc}); the guest may still be booting "
                f"or be hung (accelerator {self.machine.accel})"
            )
        else:
            term = self._death_termination()
            what = f"the microVM died while starting: {term.describe()}"
        lines = "\n  ".join(console.splitlines()[-12:]) if console else "(empty)"
        return SandboxError(f"microVM {self.id} did not start: {what}\n  console:\n  {lines}")

    def _configure_network(self, *, deadline: float) -> None:
        """Give the guest's NIC its address and route (a boot, a restore)."""
        if self.gateway is None or not isinstance(self.spec.network, Egress):
            return
        try:
            guest_net.configure_guest(
                self.agent, self.gateway, self.spec.network, deadline=deadline
            )
        except (AgentGoneError, AgentTimeoutError, AgentError) as exc:
            raise self._boot_failure(exc, deadline) from exc

    def _qmp_client(self) -> QMPClient:
        if self._qmp is None:
            client = QMPClient(self.files.qmp, timeout_s=30.0)
            client.connect(alive=self.proc.alive)
            self._qmp = client
        return self._qmp

    # ---- the contract ---------------------------------------------------------------
    def _start(self, req: ExecRequest) -> Command:
        """Start a command through the guest agent and return it running; it
        holds no lock, so other commands, files and stats go on meanwhile."""
        self._check_usable()
        timeout = req.timeout_s if req.timeout_s is not None else self.spec.limits.timeout_s
        started = time.monotonic()
        host_deadline = (
            started + timeout + self.tier.exec_grace_s + 0.25 * timeout if timeout else None
        )
        try:
            if not self.agent.connected:  # dropped after a request that would not end
                with self._lock:
                    if not self.agent.connected:
                        self.agent.connect(deadline=self._call_deadline(), alive=self.proc.alive)
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
            )
        except (AgentGoneError, AgentTimeoutError) as exc:
            return Finished(self._lost(exc, timeout, started))
        except AgentError as exc:  # HELLO refused: no usable agent
            raise SandboxError(f"microVM {self.id} cannot run commands: {exc}") from exc

        def finish(outcome: Callable[[], ExecOutcome]) -> ExecResult:
            try:
                out = outcome()
            except (AgentGoneError, AgentTimeoutError) as exc:
                return self._lost(exc, timeout, started, gexec.line.closed_by_host)
            except AgentError as exc:
                out = refused_outcome(exc, req.argv[0], f"microVM {self.id}")
            return self._classify(out, timeout)

        return GuestCommand(gexec, finish)

    def _lost(
        self, exc: Exception, timeout: float | None, started: float, closed_by: str | None = None
    ) -> ExecResult:
        """A command the guest never reported on: the agent stopped answering
        (the VM is stopped), or the line closed (the VM died or was closed,
        or this side reopened the line: ``closed_by`` says why)."""
        if isinstance(exc, AgentTimeoutError):
            term = self._stop_vm(
                Termination(
                    TerminationKind.TIMED_OUT,
                    signal=int(signal.SIGKILL),
                    evidence={"timeout_s": timeout, "guest": f"{exc}; the microVM was stopped"},
                )
            )
            return ExecResult(b"", b"", term, time.monotonic() - started)
        if self._closed or (closed_by is not None and self.proc.alive()):
            why = "the sandbox was closed" if self._closed else closed_by
            term = Termination(
                TerminationKind.SIGNALED,
                signal=int(signal.SIGKILL),
                evidence={"vmm": f"{why} while the command ran"},
            )
            return ExecResult(b"", b"", term, time.monotonic() - started)
        term = self._dead or self._death_termination()
        if self._dead is None:
            self._dead = term
        return ExecResult(b"", b"", self._dead, time.monotonic() - started)

    def _classify(self, out: ExecOutcome, timeout: float | None) -> ExecResult:
        return classify_agent(
            out,
            timeout_s=timeout,
            output_bytes=self.spec.limits.output_bytes,
            memory_mib=self.machine.memory_mib,
        )

    def _call_deadline(self) -> float:
        return time.monotonic() + CALL_TIMEOUT_S

    def _agent_call_failed(self, exc: Exception, what: str) -> SandboxError:
        if isinstance(exc, AgentProtocolError):  # a guest root may be speaking for it
            self._stop_vm(
                Termination(TerminationKind.SIGNALED, signal=int(signal.SIGKILL), evidence={})
            )
            return self._dead_error(f"{exc}, during {what}; it was stopped")
        if isinstance(exc, AgentTimeoutError):
            self._stop_vm(
                Termination(
                    TerminationKind.TIMED_OUT,
                    signal=int(signal.SIGKILL),
                    evidence={"guest": f"agent did not answer {what} in {CALL_TIMEOUT_S:.0f} s"},
                )
            )
            return self._dead_error(f"it stopped answering {what} and was stopped")
        if isinstance(exc, AgentGoneError):
            if self._closed:
                return SandboxClosedError(f"sandbox {self.id} was closed during {what}")
            self._dead = self._death_termination()
            return self._dead_error(f"it died during {what}")
        return SandboxError(f"{what} failed in microVM {self.id}: {exc}")

    # ---- files (through the agent, as the workload's user: see vmm/agent.py) -------------
    def _files_call(self, verb: str, path: str, fn: Callable[[], T]) -> T:
        """One file request; the guest's refusals become the files API's errors
        (NotRegularFileError, FileTooLargeError), a VM that died or hangs
        SandboxDeadError."""
        self._check_usable()
        try:
            self._ensure_line()
            return fn()
        except AgentError as exc:
            raise file_error(exc, verb, path, f"microVM {self.id}") from exc
        except (AgentGoneError, AgentTimeoutError) as exc:
            raise self._agent_call_failed(exc, f"{_DOING[verb]} {path}") from exc

    def _ensure_line(self) -> None:
        """Reconnect a line this side dropped (a request that would not end)."""
        if not self.agent.connected:
            with self._lock:
                if not self.agent.connected and self.proc.alive():
                    self.agent.connect(deadline=self._call_deadline(), alive=self.proc.alive)

    def _put_file(self, path: str, data: bytes, mode: int) -> None:
        self._files_call(
            "write",
            path,
            lambda: self.agent.put(
                path,
                data,
                mode=mode,
                uid=self.guest.uid,
                gid=self.guest.gid,
                deadline=self._call_deadline() + len(data) / (20 * MIB),
            ),
        )

    def _get_file(self, path: str, max_bytes: int) -> bytes:
        return self._files_call(
            "read",
            path,
            lambda: self.agent.get(
                path,
                uid=self.guest.uid,
                gid=self.guest.gid,
                max_bytes=max_bytes,
                idle_timeout_s=CALL_TIMEOUT_S,
            ),
        )

    def _copy_out(self, path: str, out: BinaryIO, max_bytes: int | None) -> int:
        return self._files_call(
            "read",
            path,
            lambda: self.agent.copy_out(
                path,
                out.write,
                uid=self.guest.uid,
                gid=self.guest.gid,
                max_bytes=max_bytes,
                idle_timeout_s=CALL_TIMEOUT_S,
            ),
        )

    def _entries(self, path: str) -> list[FileEntry]:
        return self._files_call(
            "list",
            path,
            lambda: self.agent.entries(
                path, uid=self.guest.uid, gid=self.guest.gid, idle_timeout_s=CALL_TIMEOUT_S
            ),
        )

    def host_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc.alive() else []

    def alive(self) -> bool:
        """Open, not found dead, and its QEMU still running."""
        return not self._closed and self._dead is None and self.proc.alive()

    def stats(self) -> Stats:
        """Host cost of the VM (QEMU's PSS, peak RSS, CPU) and the guest's view
        (process count, guest OOM kills)."""
        guest = self._agent_call(
            "stats", lambda: self.agent.stats(deadline=time.monotonic() + 10.0)
        )
        st = guest_stats(self.proc.pid, guest)
        if self.gateway is not None:
            tx, rx = self.gateway.counters()
            st = dataclasses.replace(st, net_tx_bytes=tx, net_rx_bytes=rx)
        return st

    def sample(self) -> Stats:
        """What the VM costs the host now, from QEMU's cgroup (memory the guest
        has touched, CPU, throttling): no agent call, cheap enough to read
        every 100 ms."""
        if self.cgroup is not None:
            return self.cgroup.stats()
        return guest_stats(self.proc.pid, {})

    def guest_stats(self) -> dict[str, str]:
        """The agent's raw view: meminfo fields, oom_kill, uptime."""
        return self._agent_call("stats", lambda: self.agent.stats(deadline=self._call_deadline()))

    def processes(self) -> list[ProcessInfo]:
        """What runs in the guest (pids as the guest numbers them; the agent,
        PID 1, and kernel threads left out), read from its /proc by the agent."""
        return self._agent_call(
            "listing processes", lambda: self.agent.processes(deadline=self._call_deadline())
        )

    def console_tail(self, n_bytes: int = 4000) -> str:
        """The last ``n_bytes`` of the guest's serial console (kernel messages,
        the agent's start-up lines), read from QEMU's console log; works on a
        dead VM too."""
        if not isinstance(n_bytes, int) or isinstance(n_bytes, bool) or n_bytes < 0:
            raise UsageError(f"n_bytes={n_bytes!r} must be a whole number of bytes, 0 or more")
        return self.proc.console_tail(n_bytes)

    def _agent_call(self, what: str, fn: Callable[[], T]) -> T:
        self._check_usable()
        try:
            self._ensure_line()
            return fn()
        except (AgentError, AgentGoneError, AgentTimeoutError) as exc:
            raise self._agent_call_failed(exc, what) from exc

    # ---- teardown ----------------------------------------------------------------------
    def close(self) -> Termination | None:
        """Kill the VM and remove everything it held. Returns how the VM ended
        if it died before (panic, killed QEMU), None for an ordinary close.
        Safe from another thread while an exec runs: that exec ends at once."""
        with self._close_lock:
            if self._closed:
                return None
            self._closed = True
            term = self._dead
            if term is None and not self.proc.alive():
                term = self._death_termination()
        if self.proc.alive():  # a dead QEMU's pid may belong to another process by now
            self.proc.kill()  # an exec in flight sees the line close and returns
        with self._lock:
            self.agent.close()
            if self._qmp is not None:
                self._qmp.close()
            self.tier.release(
                self.id, self.files.dir, self.cgroup, self.ram_path, self.gateway, self.vmm_user
            )
        return term


def _safe_oom_kills(cg: SandboxCgroup) -> int:
    try:
        return cg.oom_kills()
    except (OSError, HostError):
        return 0
