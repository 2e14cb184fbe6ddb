"""The ``microvm`` tier: every sandbox is a QEMU ``-M microvm`` guest with its
own Linux kernel (Debian's cloud kernel), KVM when a test boot proves it
works, TCG (software emulation) otherwise.

Inside the guest, the agent is PID 1 (the initramfs's /init): it loads the
virtio modules, mounts the image's read-only ext4 disk under a tmpfs overlay,
then serves the host over a virtio-serial port (:mod:`tierbox.vmm.agent`). Each exec runs
chroot'ed into the overlay, as the sandbox user, in its own guest cgroup
(pids limit, killed as a group on timeout or output overflow).

Limits: ``memory_mib`` is the guest's RAM (at least
:data:`~tierbox.vmm.qemu.MIN_MEMORY_MIB`); an OOM inside the guest is
reported as ``oom_killed`` with the guest kernel's counter and log line.
``cpus`` becomes the vCPU count (rounded up) and a CPU quota on the QEMU
process's cgroup. ``pids`` is a guest cgroup limit per exec. ``timeout_s`` is
enforced per exec by the agent, and the host gives up on a guest that stops
answering a few seconds later (then stops the VM). ``disk_mib`` caps the
writable layer.

Snapshots pause the guest, save device state by QMP migration (RAM skipped
with ``x-ignore-shared``) and copy the RAM file; restores and clones start a
new QEMU with ``-incoming`` whose RAM maps the snapshot's RAM file
copy-on-write, then reseed the guest's RNG and set its clock.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from tierbox.errors import (
    CommandError,
    HostError,
    NotSupportedError,
    SandboxClosedError,
    SandboxDeadError,
    SandboxError,
    SpecError,
    TierUnavailableError,
)
from tierbox.host.cgroups import SandboxCgroup, cgroup_version
from tierbox.host.runner import run
from tierbox.paths import MARKER, sandboxes_dir
from tierbox.spec import (
    ExecResult,
    FileEntry,
    Limits,
    NetworkPolicy,
    SandboxSpec,
    Stats,
    Termination,
    TerminationKind,
)
from tierbox.tiers import _state
from tierbox.tiers.base import Availability, Capabilities, Instance, SnapshotKind, SnapshotRef, Tier
from tierbox.tiers.oci import DEFAULT_PATH, parse_user
from tierbox.tiers.outcome import classify_agent, signame
from tierbox.vmm import artifacts, qemu
from tierbox.vmm import qmp as qmp_mod
from tierbox.vmm import snapshot as snapfmt
from tierbox.vmm.agent import (
    AgentClient,
    AgentError,
    AgentGoneError,
    AgentTimeoutError,
    ExecOutcome,
    GuestConfig,
    file_error,
    run_in_guest,
)
from tierbox.vmm.qmp import QMPClient, QMPError

T = TypeVar("T")
_DOING = {"read": "reading", "write": "writing", "list": "listing"}

MIB = 1024 * 1024
#: How long a cold boot may take to reach the agent, per accelerator.
BOOT_TIMEOUT_S = {"kvm": 20.0, "tcg": 60.0}
#: How long a restored guest may take to answer.
RESTORE_TIMEOUT_S = 20.0
#: Host-side deadline for agent calls that are not execs (files, stats).
CALL_TIMEOUT_S = 30.0
ACCEL_ENV = "TIERBOX_MICROVM_ACCEL"
#: Half-made snapshots and conversion helpers older than this are leftovers.
STALE_AFTER_S = 600.0


def _vm_state_file(d: Path) -> Path:
    return d / "vm.json"


CAPABILITIES = Capabilities(snapshot=SnapshotKind.RESTORE, min_memory_mib=qemu.MIN_MEMORY_MIB)


class MicroVMInstance(Instance):
    """One running microVM. Thread-safe: calls are serialised on one agent line."""

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
            "disk": self.disk_info,
        }

    def _save_state(self) -> None:
        d = self.files.dir
        tmp = d / "vm.json.tmp"
        tmp.write_text(json.dumps({**self.state(), "spec": self.spec.to_dict()}, indent=1))
        os.replace(tmp, _vm_state_file(d))
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

    def _qmp_client(self) -> QMPClient:
        if self._qmp is None:
            client = QMPClient(self.files.qmp, timeout_s=30.0)
            client.connect(alive=self.proc.alive)
            self._qmp = client
        return self._qmp

    # ---- the contract ---------------------------------------------------------------
    def _exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> ExecResult:
        if not argv:
            raise SpecError("no command given: pass the program and its arguments")
        timeout = timeout_s if timeout_s is not None else self.spec.limits.timeout_s
        with self._lock:
            self._check_usable()
            started = time.monotonic()
            host_deadline = (
                started + timeout + self.tier.exec_grace_s + 0.25 * timeout if timeout else None
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
                    where=f"microVM {self.id}",
                )
            except AgentTimeoutError as exc:
                term = self._stop_vm(
                    Termination(
                        TerminationKind.TIMED_OUT,
                        signal=int(signal.SIGKILL),
                        evidence={
                            "timeout_s": timeout,
                            "guest": f"{exc}; the microVM was stopped",
                        },
                    )
                )
                return ExecResult(b"", b"", term, time.monotonic() - started)
            except AgentGoneError:
                if self._closed:
                    term = Termination(
                        TerminationKind.SIGNALED,
                        signal=int(signal.SIGKILL),
                        evidence={"vmm": "the sandbox was closed while the command ran"},
                    )
                    return ExecResult(b"", b"", term, time.monotonic() - started)
                self._dead = self._death_termination()
                return ExecResult(b"", b"", self._dead, time.monotonic() - started)
            return self._classify(out, timeout)

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
        with self._lock:
            self._check_usable()
            try:
                if not self.agent.connected:  # dropped after a stream that would not end
                    self.agent.connect(deadline=self._call_deadline(), alive=self.proc.alive)
                return fn()
            except AgentError as exc:
                raise file_error(exc, verb, path, f"microVM {self.id}") from exc
            except (AgentGoneError, AgentTimeoutError) as exc:
                raise self._agent_call_failed(exc, f"{_DOING[verb]} {path}") from exc

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

    def stats(self) -> Stats:
        """Host cost of the VM (QEMU's PSS, peak RSS, CPU) and the guest's view
        (process count, guest OOM kills)."""
        with self._lock:
            self._check_usable()
            pss, hwm, cpu_s = _process_memory_cpu(self.proc.pid)
            guest: dict[str, str] = {}
            try:
                guest = self.agent.stats(deadline=time.monotonic() + 10.0)
            except (AgentError, AgentGoneError, AgentTimeoutError) as exc:
                raise self._agent_call_failed(exc, "stats") from exc
            procs = guest.get("procs")
            oom = guest.get("oom_kill")
            return Stats(
                memory_bytes=pss,
                memory_peak_bytes=max(hwm or 0, pss or 0) or None,
                cpu_s=cpu_s,
                pids=int(procs) if procs and procs.isdigit() else None,
                oom_kills=int(oom) if oom and oom.lstrip("-").isdigit() else None,
            )

    def guest_stats(self) -> dict[str, str]:
        """The agent's raw view: meminfo fields, oom_kill, uptime."""
        with self._lock:
            self._check_usable()
            return self.agent.stats(deadline=self._call_deadline())

    # ---- snapshots ------------------------------------------------------------------
    def snapshot(self) -> SnapshotRef:
        """Pause, save device state and RAM, resume. The guest is paused for the
        migration plus a sparse copy of the RAM it has touched."""
        with self._lock:
            self._check_usable()
            root = self.tier.snapshots_root()
            root.mkdir(parents=True, exist_ok=True)
            self._snap_seq += 1
            name = f"{self.id}-{int(time.time() * 1000)}-{self._snap_seq}"
            tmp = root / f".tmp-{name}"
            final = root / name
            tmp.mkdir()
            try:
                timings = self._save(tmp)
                manifest = snapfmt.write_manifest(tmp, self._manifest_data(timings))
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return SnapshotRef(
                tier="microvm",
                path=str(final),
                meta={
                    "spec": self.spec.to_dict(),
                    "source": self.id,
                    "memory_mib": self.machine.memory_mib,
                    "accel": self.machine.accel,
                    "timings_s": timings,
                    "files": manifest.data["files"],
                },
            )

    def _manifest_data(self, timings: dict[str, float]) -> dict[str, Any]:
        g = artifacts.ensure_guest(build=False)
        return {
            "machine": self.machine.to_dict(),
            "machine_type": qemu.MACHINE,
            "tcg_cpu": qemu.TCG_CPU,
            "qemu_version": qemu.qemu_version(),
            "kernel_sha256": g.kernel.sha256,
            "kernel_release": g.kernel.release,
            "initramfs_sha256": g.initramfs.sha256,
            "disk": self.disk_info,
            "guest": {**self.guest.to_dict(), "spec": self.spec.to_dict()},
            "source_sandbox": self.id,
            "timings_s": timings,
        }

    def _save(self, snap_dir: Path) -> dict[str, float]:
        client = self._qmp_client()
        t0 = time.monotonic()
        client.execute("stop")
        try:
            if self.ram_path is not None:
                # RAM is a shared file: the stream carries device state only
                qmp_mod.save_stream(
                    client, snap_dir / snapfmt.STATE, ignore_shared=True, timeout_s=120.0
                )
                t1 = time.monotonic()
                _sparse_copy(self.ram_path, snap_dir / snapfmt.RAM)
                full = None
            else:
                # a restored guest's RAM is private: it goes into the stream,
                # converted below into the same two-file form
                full = snap_dir / "full.bin"
                qmp_mod.save_stream(client, full, ignore_shared=False, timeout_s=120.0)
                t1 = time.monotonic()
        finally:
            client.execute("cont")
        t2 = time.monotonic()
        # the guest's clock stood still while paused
        with contextlib.suppress(AgentError, AgentGoneError, AgentTimeoutError):
            self.agent.sync(deadline=time.monotonic() + 10.0)
        timings = {"paused": round(t2 - t0, 4), "migrate": round(t1 - t0, 4)}
        if full is None:
            timings["ram_copy"] = round(t2 - t1, 4)
        else:
            self.tier.split_full_stream(self.machine, full, snap_dir)
            full.unlink()
            timings["convert"] = round(time.monotonic() - t2, 4)
        timings["total"] = round(time.monotonic() - t0, 4)
        return timings

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
            self.tier.release(self.id, self.files.dir, self.cgroup, self.ram_path)
        return term


class MicroVMTier(Tier):
    name = "microvm"
    capabilities = CAPABILITIES
    isolation = (
        "own guest kernel in a QEMU microvm (virtio-mmio only, no NIC, no PCI); "
        "read-only root disk with a tmpfs overlay; QEMU seccomp-sandboxed in its own cgroup"
    )

    def __init__(
        self,
        *,
        boot_timeout_s: float | None = None,
        exec_grace_s: float = 5.0,
        start_agent: bool = True,
        snapshots_dir: Path | None = None,
    ) -> None:
        """Options are for diagnostics and tests: ``start_agent=False`` boots a
        guest whose agent never starts; ``boot_timeout_s`` bounds a cold boot."""
        self.boot_timeout_s = boot_timeout_s
        self.exec_grace_s = exec_grace_s
        self.start_agent = start_agent
        self._snapshots_dir = snapshots_dir
        self._accel: tuple[str, str] | None = None
        self._accel_lock = threading.Lock()

    def snapshots_root(self) -> Path:
        return self._snapshots_dir or artifacts.snapshots_dir()

    # ---- availability and the accelerator -----------------------------------------
    def available(self) -> Availability:
        if qemu.qemu_path() is None:
            return Availability(
                False,
                f"{qemu.QEMU_BINARY} is not installed: run `make setup` "
                "(apt-get install qemu-system-x86)",
            )
        try:
            artifacts.ensure_guest()
        except TierUnavailableError as exc:
            return Availability(
                False, str(exc), engine=qemu.QEMU_BINARY, version=qemu.qemu_version()
            )
        accel, why = self.accelerator()
        what = "KVM" if accel == "kvm" else "TCG (software emulation, ~17x slower guest CPU)"
        return Availability(
            True,
            f"QEMU {qemu.qemu_version()} -M microvm under {what}: {why}",
            engine=f"{qemu.QEMU_BINARY} -M microvm ({accel})",
            version=qemu.qemu_version(),
        )

    def accelerator(self) -> tuple[str, str]:
        """("kvm" or "tcg", why). KVM only when a test boot worked; cached on disk."""
        with self._accel_lock:
            if self._accel is None:
                self._accel = self._decide_accel()
            return self._accel

    def _decide_accel(self) -> tuple[str, str]:
        forced = os.environ.get(ACCEL_ENV, "")
        if forced in ("kvm", "tcg"):
            return forced, f"forced by {ACCEL_ENV}={forced}"
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "tcg", "no usable /dev/kvm"
        g = artifacts.ensure_guest()
        key = f"{os.uname().release}|{qemu.qemu_version()}|{g.kernel.sha256}|{g.initramfs.sha256}"
        cache = artifacts.microvm_home() / "accel.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            d = json.loads(cache.read_text())
            if d["key"] == key:
                return str(d["accel"]), str(d["reason"])
        ok, detail = self._probe_kvm()
        verdict = (
            ("kvm", "a KVM test boot reached the agent")
            if ok
            else (
                "tcg",
                f"KVM unusable: a test boot failed ({detail})",
            )
        )
        with contextlib.suppress(OSError):
            cache.write_text(json.dumps({"key": key, "accel": verdict[0], "reason": verdict[1]}))
        return verdict

    def _probe_kvm(self) -> tuple[bool, str]:
        machine = qemu.Machine(memory_mib=128, vcpus=1, accel="kvm", disk=None, rw_mib=0)
        qemu_log: list[str] = []
        try:
            inst = self._boot(
                SandboxSpec(),
                machine,
                GuestConfig(0, 0, {"PATH": "/bin"}, "/"),
                None,
                20.0,
                failure_log=qemu_log,
            )
        except SandboxError as exc:
            if qemu_log:
                return False, f"QEMU said: {qemu_log[0][:300]}"
            return False, str(exc).splitlines()[0].split(": ", 1)[-1][:300]
        try:
            r = inst.exec(["true"], timeout_s=10)
            return r.ok, "exec true: " + r.termination.describe()
        finally:
            inst.close()

    # ---- create ------------------------------------------------------------------------
    def _machine_for(self, spec: SandboxSpec, disk: artifacts.RootDisk | None) -> qemu.Machine:
        lim = spec.limits
        mem = lim.memory_mib if lim.memory_mib is not None else qemu.DEFAULT_MEMORY_MIB
        vcpus = max(1, math.ceil(lim.cpus)) if lim.cpus else 1
        vcpus = min(vcpus, os.cpu_count() or 1)
        accel, _ = self.accelerator()
        return qemu.Machine(
            memory_mib=mem,
            vcpus=vcpus,
            accel=accel,
            disk=str(disk.path) if disk is not None else None,
            rw_mib=lim.disk_mib or 0,
            agent=self.start_agent,
        )

    def _guest_for(self, spec: SandboxSpec, disk: artifacts.RootDisk | None) -> GuestConfig:
        uid, gid = parse_user(spec.user)
        env = {"PATH": DEFAULT_PATH, "HOME": "/tmp", "LANG": "C.UTF-8"}
        if disk is not None:
            env.update(disk.env)
        env.update(spec.env)
        workdir = spec.workdir if spec.workdir != "/" else (disk.workdir if disk else "/")
        return GuestConfig(uid=uid, gid=gid, env=env, workdir=workdir or "/")

    def _create(self, spec: SandboxSpec) -> MicroVMInstance:
        if qemu.qemu_path() is None:
            raise TierUnavailableError(self.available().reason)
        if spec.network is not NetworkPolicy.NONE:
            raise NotSupportedError(
                f"the microvm tier gives guests no NIC: network={spec.network.value} "
                "is not supported (use network=none)"
            )
        disk = artifacts.root_disk(spec.image) if spec.image else None
        machine = self._machine_for(spec, disk)
        guest = self._guest_for(spec, disk)
        disk_info = _disk_info(disk)
        timeout = self.boot_timeout_s or BOOT_TIMEOUT_S.get(machine.accel, 60.0)
        return self._boot(spec, machine, guest, disk_info, timeout)

    def _new_sandbox(self, spec: SandboxSpec) -> tuple[str, qemu.Files, SandboxCgroup | None]:
        sid = _state.new_id()
        d = _state.sandbox_dir(sid)
        d.mkdir(parents=True)
        _state.claim(sid)
        cg: SandboxCgroup | None = None
        try:
            cg = SandboxCgroup.create(sid, _qemu_limits(spec))
        except HostError:
            if spec.limits.cpus is not None:
                shutil.rmtree(d, ignore_errors=True)
                raise
        return sid, qemu.Files(d), cg

    def _boot(
        self,
        spec: SandboxSpec,
        machine: qemu.Machine,
        guest: GuestConfig,
        disk_info: dict[str, Any] | None,
        timeout_s: float,
        failure_log: list[str] | None = None,
    ) -> MicroVMInstance:
        g = artifacts.ensure_guest()
        started = time.monotonic()
        sid, files, cg = self._new_sandbox(spec)
        ram = qemu.ram_file(sid)
        inst: MicroVMInstance | None = None
        try:
            argv = qemu.boot_argv(
                sid,
                machine,
                files,
                vmlinux=g.kernel.vmlinux,
                initramfs=g.initramfs.path,
                hz=g.kernel.hz,
                ram_path=ram,
            )
            proc = qemu.QemuProcess.start(argv, files, cgroup=cg)
            inst = MicroVMInstance(self, sid, spec, machine, guest, proc, cg, ram, disk_info)
            inst._save_state()
            inst._connect(deadline=started + timeout_s, hello=True)
        except BaseException:
            if inst is not None:
                inst.proc.kill()
                tail = inst.proc.log_tail(600).strip()
                if failure_log is not None and tail:
                    failure_log.append(tail.splitlines()[-1])
            self.release(sid, files.dir, cg, ram)
            raise
        return inst

    # ---- restore and clones ----------------------------------------------------------
    def restore(self, snap: SnapshotRef) -> MicroVMInstance:
        return self.clone(snap, count=1)[0]

    def clone(self, snap: SnapshotRef, count: int = 1) -> list[MicroVMInstance]:
        """``count`` independent guests from one snapshot, each mapping its RAM
        copy-on-write, each with a fresh RNG seed and the current time."""
        if count < 1:
            raise SpecError(f"count={count}: ask for at least one clone")
        # verified once per call; QEMU gets the very files that were checked
        with snapfmt.open_snapshot(Path(snap.path)) as opened:
            manifest = opened.manifest
            machine = qemu.Machine.from_dict(manifest.machine)
            self._check_compatible(manifest, machine)
            spec = SandboxSpec.from_dict(manifest.guest["spec"])
            guest = GuestConfig.from_dict(manifest.guest)
            disk_info = manifest.data.get("disk")
            started: list[MicroVMInstance] = []
            try:
                for _ in range(count):
                    started.append(self._start_restore(opened, spec, machine, guest, disk_info))
                workers = min(count, 8)
                if workers == 1:
                    for inst in started:
                        self._finish_restore(inst, opened)
                else:
                    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                        for fut in [pool.submit(self._finish_restore, i, opened) for i in started]:
                            fut.result()
            except BaseException:
                for inst in started:
                    inst.close()
                raise
        return started

    def _check_compatible(self, manifest: snapfmt.Manifest, machine: qemu.Machine) -> None:
        accel, _ = self.accelerator()
        d = manifest.data
        if machine.accel != accel:
            raise snapfmt.SnapshotError(
                f"snapshot {manifest.path} was taken under {machine.accel}; this host runs {accel}"
            )
        if d.get("qemu_version") != qemu.qemu_version():
            raise snapfmt.SnapshotError(
                f"snapshot {manifest.path} was taken with QEMU {d.get('qemu_version')}, "
                f"this host has {qemu.qemu_version()}"
            )
        if d.get("machine_type") != qemu.MACHINE or d.get("tcg_cpu") != qemu.TCG_CPU:
            raise snapfmt.SnapshotError(
                f"snapshot {manifest.path} was taken on another machine model "
                f"({d.get('machine_type')}, cpu {d.get('tcg_cpu')})"
            )
        disk = d.get("disk")
        if disk:
            p = Path(disk["path"])
            try:
                size = p.stat().st_size
            except OSError as exc:
                raise snapfmt.SnapshotError(
                    f"snapshot {manifest.path} needs root disk {p} (image {disk.get('image')}), "
                    "which is gone"
                ) from exc
            if size != disk.get("size"):
                raise snapfmt.SnapshotError(
                    f"root disk {p} changed since snapshot {manifest.path} was taken"
                )

    def _start_restore(
        self,
        snap: snapfmt.OpenSnapshot,
        spec: SandboxSpec,
        machine: qemu.Machine,
        guest: GuestConfig,
        disk_info: dict[str, Any] | None,
    ) -> MicroVMInstance:
        sid, files, cg = self._new_sandbox(spec)
        try:
            argv = qemu.restore_argv(sid, machine, files, ram_path=snap.ram_path, ram_share=False)
            proc = qemu.QemuProcess.start(argv, files, cgroup=cg, pass_fds=(snap.ram_fd,))
        except BaseException:
            self.release(sid, files.dir, cg, None)
            raise
        inst = MicroVMInstance(self, sid, spec, machine, guest, proc, cg, None, disk_info)
        inst._save_state()
        return inst

    def _finish_restore(self, inst: MicroVMInstance, snap: snapfmt.OpenSnapshot) -> None:
        deadline = time.monotonic() + RESTORE_TIMEOUT_S
        snap_dir = snap.manifest.path
        try:
            client = inst._qmp_client()
            qmp_mod.load_stream(client, snap.state_path, ignore_shared=True, deadline=deadline)
            client.execute("cont")
        except QMPError as exc:
            detail = inst.proc.log_tail(600).strip() if not inst.proc.alive() else ""
            raise snapfmt.SnapshotError(
                f"QEMU could not load snapshot {snap_dir}: {exc}"
                + (f": {detail}" if detail else "")
            ) from exc
        inst._connect(deadline=deadline, hello=False)

    def split_full_stream(self, machine: qemu.Machine, full: Path, snap_dir: Path) -> None:
        """Turn a migration stream with RAM (from a restored guest) into the
        two-file form: load it into a paused helper QEMU whose RAM is a shared
        file (``ram.bin``), then save device state with ``x-ignore-shared``."""
        helper = f"helper{_state.new_id()}"
        d = sandboxes_dir() / f".{helper}"
        d.mkdir(parents=True)
        files = qemu.Files(d)
        proc: qemu.QemuProcess | None = None
        try:
            argv = qemu.restore_argv(
                helper, machine, files, ram_path=snap_dir / snapfmt.RAM, ram_share=True, paused=True
            )
            proc = qemu.QemuProcess.start(argv, files)
            client = QMPClient(files.qmp, timeout_s=60.0)
            client.connect(alive=proc.alive)
            try:
                qmp_mod.load_stream(
                    client, full, ignore_shared=False, deadline=time.monotonic() + 120
                )
                qmp_mod.save_stream(
                    client, snap_dir / snapfmt.STATE, ignore_shared=True, timeout_s=120.0
                )
            finally:
                client.close()
        finally:
            if proc is not None:
                proc.kill()
            shutil.rmtree(d, ignore_errors=True)

    # ---- attach, release, reap ------------------------------------------------------
    def attach(self, sandbox_id: str, state: dict[str, Any]) -> MicroVMInstance:
        d = _state.sandbox_dir(sandbox_id)
        try:
            vm = json.loads(_vm_state_file(d).read_text())
        except (OSError, ValueError) as exc:
            raise SandboxError(f"microVM {sandbox_id} has no readable vm.json in {d}") from exc
        files = qemu.Files(d)
        proc = qemu.QemuProcess.adopt(int(vm["pid"]), files)
        cg = (
            SandboxCgroup(relpath=vm["cgroup"], version=cgroup_version())
            if vm.get("cgroup")
            else None
        )
        inst = MicroVMInstance(
            self,
            sandbox_id,
            SandboxSpec.from_dict(state.get("spec") or vm["spec"]),
            qemu.Machine.from_dict(vm["machine"]),
            GuestConfig.from_dict(vm["guest"]),
            proc,
            cg,
            Path(vm["ram_path"]) if vm.get("ram_path") else None,
            vm.get("disk"),
        )
        if not proc.alive():
            # a dead VM still attaches: every call says it is dead, close() removes it
            inst._dead = Termination(
                TerminationKind.SIGNALED,
                evidence={"vmm": "QEMU was not running when the sandbox was attached"},
            )
            return inst
        deadline = time.monotonic() + 10.0
        try:
            inst.agent.connect(deadline=deadline, alive=proc.alive)
            inst.agent_info = inst.agent.hello(deadline=deadline)
        except (AgentGoneError, AgentTimeoutError, AgentError) as exc:
            inst.agent.close()
            raise SandboxError(
                f"cannot reach the agent of microVM {sandbox_id} "
                f"(is another process attached?): {exc}"
            ) from exc
        return inst

    def release(self, sandbox_id: str, d: Path, cg: SandboxCgroup | None, ram: Path | None) -> None:
        """Remove everything a sandbox held on the host. Idempotent."""
        if ram is not None:
            ram.unlink(missing_ok=True)
        if cg is not None:
            with contextlib.suppress(HostError, OSError):
                cg.destroy()
        shutil.rmtree(d, ignore_errors=True)

    def reap(self, live: set[str] | None = None) -> list[str]:
        """Kill QEMUs named tierbox-<id> and remove RAM files and sandbox dirs
        of microVMs that are not live (crashed owners, or QEMU already dead)."""
        live = _state.live_ids() if live is None else live
        removed: list[str] = []
        running = qemu.find_marked_qemus(sandboxes_dir())
        for sid, pid in sorted(running.items()):
            d = _state.sandbox_dir(sid)
            if sid in live and d.is_dir():
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            removed.append(f"qemu process {pid} ({qemu.process_name(sid)})")
        ram_dir = qemu.ram_file("x").parent
        if ram_dir.is_dir():
            time.sleep(0.05)  # let the QEMUs killed above exit
            in_use = qemu.ram_files_in_use()
            for f in sorted(ram_dir.glob(f"{MARKER}-*.ram")):
                sid = f.name[len(MARKER) + 1 : -len(".ram")]
                if sid not in live and str(f) not in in_use:
                    f.unlink(missing_ok=True)
                    removed.append(f"microVM RAM file {f}")
        base = sandboxes_dir()
        stale = time.time() - STALE_AFTER_S
        if base.is_dir():
            for d in sorted(base.iterdir()):
                if d.name.startswith(".helper"):
                    if _mtime(d) < stale:
                        shutil.rmtree(d, ignore_errors=True)
                        removed.append(f"directory {d}")
                    continue
                if not _vm_state_file(d).exists() or d.name in live:
                    continue
                with contextlib.suppress(OSError, ValueError):
                    vm = json.loads(_vm_state_file(d).read_text())
                    if vm.get("cgroup"):
                        SandboxCgroup(relpath=vm["cgroup"], version=cgroup_version()).destroy()
                shutil.rmtree(d, ignore_errors=True)
                removed.append(f"microVM directory {d}")
        snaps = self.snapshots_root()
        if snaps.is_dir():
            for tmp in snaps.glob(".tmp-*"):
                if _mtime(tmp) < stale:
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed.append(f"unfinished snapshot {tmp}")
        return removed


# ---- helpers -----------------------------------------------------------------------------


def _qemu_limits(spec: SandboxSpec) -> Limits:
    """Limits for the QEMU process's cgroup: the CPU quota; memory and pids are
    accounted, not limited (guest RAM is the memory limit, QEMU has threads)."""
    return Limits(memory_mib=None, cpus=spec.limits.cpus, pids=None, timeout_s=None)


def _disk_info(disk: artifacts.RootDisk | None) -> dict[str, Any] | None:
    if disk is None:
        return None
    return {
        "path": str(disk.path),
        "size": disk.size_bytes,
        "image": disk.image,
        "digest": disk.digest,
    }


def _sparse_copy(src: Path, dst: Path) -> None:
    """Copy a mostly-empty RAM file keeping its holes (GNU cp finds them)."""
    try:
        run(["cp", "--sparse=always", str(src), str(dst)], timeout_s=300)
    except CommandError as exc:
        raise SandboxError(f"cannot copy guest RAM to the snapshot: {exc}") from exc


def _process_memory_cpu(pid: int) -> tuple[int | None, int | None, float | None]:
    """(PSS bytes, peak RSS bytes, CPU seconds) of one process."""
    pss = hwm = None
    cpu = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return pss, hwm, cpu


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _safe_oom_kills(cg: SandboxCgroup) -> int:
    try:
        return cg.oom_kills()
    except (OSError, HostError):
        return 0
