"""The microvm tier itself: :class:`MicroVMTier` (can it run here, with
which accelerator, booting a guest, attaching to one from another process).

A guest boots from the shared kernel and initramfs
(:mod:`tierbox.vmm.artifacts`) with the image's read-only root disk; its
QEMU runs jailed (:mod:`tierbox.vmm.jail`: its own uid, its own namespaces)
in the sandbox's cgroup (the CPU quota; memory: guest RAM plus QEMU's
overhead). Restores and clones are in
:mod:`tierbox.tiers.microvm.snapshots`, leftovers of crashed runs in
:mod:`tierbox.tiers.microvm.reap`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierbox.errors import (
    AgentError,
    AgentGoneError,
    AgentTimeoutError,
    HostError,
    SandboxError,
    TierUnavailableError,
)
from tierbox.host.cgroups import SandboxCgroup, cgroup_version
from tierbox.network import Egress
from tierbox.spec import Limits, SandboxSpec, Termination, TerminationKind
from tierbox.tiers import _state
from tierbox.tiers.base import Availability, Tier
from tierbox.tiers.microvm import network as guest_net
from tierbox.tiers.microvm.instance import CAPABILITIES, MicroVMInstance, vm_state_file
from tierbox.tiers.microvm.reap import reap_leftovers
from tierbox.tiers.microvm.snapshots import RestoreOps
from tierbox.vmm import artifacts, jail, qemu
from tierbox.vmm.accel import Accelerator
from tierbox.vmm.agent import GuestConfig
from tierbox.vmm.guest import guest_config

if TYPE_CHECKING:
    from tierbox.host.netgw import Gateway

#: How long a cold boot may take to reach the agent, per accelerator.
BOOT_TIMEOUT_S = {"kvm": 20.0, "tcg": 60.0}
ACCEL_ENV = "TIERBOX_MICROVM_ACCEL"
#: Who workloads run as when the spec names nobody: nobody:nogroup.
DEFAULT_USER = (65534, 65534)


class MicroVMTier(RestoreOps, Tier):
    """MicroVMs on QEMU ``-M microvm``, KVM where a test boot proved it works."""

    name = "microvm"
    capabilities = CAPABILITIES
    isolation = (
        "own guest kernel in a QEMU microvm (virtio-mmio only, no PCI; a NIC only with "
        "egress, behind a per-sandbox router that passes only the allow-list); "
        "read-only root disk with a tmpfs overlay; QEMU seccomp-sandboxed, as a uid of its "
        "own in its own namespaces (bubblewrap), in a memory-limited cgroup"
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
        self._accel = Accelerator(
            env=ACCEL_ENV,
            cache_file=lambda: artifacts.microvm_home() / "accel.json",
            guest=artifacts.ensure_guest,
            key=_accel_key,
            probe=self._probe_kvm,
            proof="the agent",
        )

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
        return self._accel.choice()

    def _probe_kvm(self, _guest: artifacts.GuestArtifacts) -> tuple[bool, str]:
        """The KVM test boot: a microVM under KVM whose agent runs ``true``."""
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
            net=isinstance(spec.network, Egress),
        )

    def _guest_for(self, spec: SandboxSpec, disk: artifacts.RootDisk | None) -> GuestConfig:
        """Workloads run as nobody by default, with HOME=/tmp (root's too)."""
        return guest_config(
            spec,
            default_user=DEFAULT_USER,
            root_home="/tmp",
            image_env=disk.env if disk is not None else {},
            image_workdir=disk.workdir if disk is not None else None,
        )

    def _create(self, spec: SandboxSpec) -> MicroVMInstance:
        if qemu.qemu_path() is None:
            raise TierUnavailableError(self.available().reason)
        disk = artifacts.root_disk(spec.image) if spec.image else None
        machine = self._machine_for(spec, disk)
        guest = self._guest_for(spec, disk)
        disk_info = _disk_info(disk)
        timeout = self.boot_timeout_s or BOOT_TIMEOUT_S.get(machine.accel, 60.0)
        return self._boot(spec, machine, guest, disk_info, timeout)

    def _new_sandbox(
        self, spec: SandboxSpec, machine: qemu.Machine
    ) -> tuple[str, qemu.Files, SandboxCgroup | None]:
        sid = _state.new_id()
        d = _state.sandbox_dir(sid)
        d.mkdir(mode=0o700, parents=True)
        _state.claim(sid)
        cg: SandboxCgroup | None = None
        try:
            cg = SandboxCgroup.create(sid, _qemu_limits(spec, machine))
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
        sid, files, cg = self._new_sandbox(spec, machine)
        ram = qemu.ram_file(sid)
        inst: MicroVMInstance | None = None
        gw = None
        tap: int | None = None
        user: jail.VmmUser | None = None
        fds: list[int] = []
        try:
            user = jail.claim(sid)
            jail.private_file(ram, user)
            gw = guest_net.open_gateway(sid, spec, user)
            tap = guest_net.tap_fd(gw)
            # QEMU cannot reach root's home: it gets the files as open fds
            fds = [jail.open_readonly(g.kernel.vmlinux), jail.open_readonly(g.initramfs.path)]
            if machine.disk:
                fds.append(jail.open_readonly(machine.disk))
            argv = qemu.boot_argv(
                sid,
                machine,
                files,
                vmlinux=jail.fd_path(fds[0]),
                initramfs=jail.fd_path(fds[1]),
                hz=g.kernel.hz,
                ram_path=ram,
                tap_fd=tap,
                disk_path=jail.fd_path(fds[2]) if machine.disk else None,
            )
            passed = (*fds, tap) if tap is not None else tuple(fds)
            proc = qemu.QemuProcess.start(
                argv, files, cgroup=cg, pass_fds=passed, user=user, binds=(ram,)
            )
            jail.close_fds(fds)
            fds = []
            guest_net.close_fd(tap)
            tap = None
            inst = MicroVMInstance(
                self, sid, spec, machine, guest, proc, cg, ram, disk_info, gateway=gw,
                vmm_user=user,
            )  # fmt: skip
            inst._save_state()
            inst._connect(deadline=started + timeout_s, hello=True)
            inst._configure_network(deadline=started + timeout_s)
        except BaseException:
            guest_net.close_fd(tap)
            jail.close_fds(fds)
            if inst is not None:
                inst.proc.kill()
                tail = inst.proc.log_tail(600).strip()
                if failure_log is not None and tail:
                    failure_log.append(tail.splitlines()[-1])
            self.release(sid, files.dir, cg, ram, gw, user)
            raise
        return inst

    # ---- attach, release, reap ------------------------------------------------------
    def attach(self, sandbox_id: str, state: dict[str, Any]) -> MicroVMInstance:
        d = _state.sandbox_dir(sandbox_id)
        try:
            vm = json.loads(vm_state_file(d).read_text())
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
            gateway=guest_net.attach_gateway(sandbox_id, vm.get("net")),
            vmm_user=jail.VmmUser(int(vm["vmm_uid"]), int(vm["vmm_uid"]))
            if vm.get("vmm_uid") is not None
            else None,
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

    def release(
        self,
        sandbox_id: str,
        d: Path,
        cg: SandboxCgroup | None,
        ram: Path | None,
        gateway: Gateway | None = None,
        vmm_user: jail.VmmUser | None = None,
    ) -> None:
        """Remove everything a sandbox held on the host. Idempotent."""
        guest_net.close_gateway(gateway)
        jail.release(vmm_user)
        if ram is not None:
            ram.unlink(missing_ok=True)
        if cg is not None:
            # a cgroup that cannot go now (a process still leaving) is reaped by gc
            with contextlib.suppress(HostError, OSError):
                cg.destroy()
        shutil.rmtree(d, ignore_errors=True)

    def reap(self, live: set[str] | None = None) -> list[str]:
        """Kill QEMUs named tierbox-<id> and remove RAM files and sandbox dirs
        of microVMs that are not live (crashed owners, or QEMU already dead)."""
        return reap_leftovers(_state.live_ids() if live is None else live, self.snapshots_root())


def _accel_key(g: artifacts.GuestArtifacts) -> str:
    return f"{os.uname().release}|{qemu.qemu_version()}|{g.kernel.sha256}|{g.initramfs.sha256}"


# ---- helpers -----------------------------------------------------------------------------


def _qemu_limits(spec: SandboxSpec, machine: qemu.Machine) -> Limits:
    """Limits for the QEMU process's cgroup: the CPU quota, and memory for
    guest RAM plus QEMU's own measured overhead (a QEMU a guest has taken
    over cannot take the host's memory); pids are accounted, not limited
    (QEMU has threads)."""
    return Limits(
        memory_mib=machine.memory_mib + jail.OVERHEAD_MIB,
        cpus=spec.limits.cpus,
        pids=None,
        timeout_s=None,
    )


def _disk_info(disk: artifacts.RootDisk | None) -> dict[str, Any] | None:
    if disk is None:
        return None
    return {
        "path": str(disk.path),
        "size": disk.size_bytes,
        "image": disk.image,
        "digest": disk.digest,
    }
