"""The vm tier itself: :class:`VMTier` (can it run here, with which
accelerator, what a VM of a spec is made of, and creating one).

Creating a VM cold-boots the guest (2-3 s under TCG) only the first time a
*shape* (image, memory, vCPUs, accelerator, guest, QEMU/libvirt versions) is
seen; later creates restore the shape's saved template
(:mod:`tierbox.tiers.vm.templates`). Finding, listing, attaching to and
removing VMs is in :mod:`tierbox.tiers.vm.records`.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierbox import libvirt_host as lvh
from tierbox.errors import (
    AgentError,
    AgentGoneError,
    AgentTimeoutError,
    CommandError,
    HostError,
    ImageError,
    LibvirtUnreachableError,
    NotSupportedError,
    SandboxError,
    SpecError,
    TierboxError,
)
from tierbox.host.runner import which
from tierbox.paths import MARKER
from tierbox.spec import SandboxSpec
from tierbox.tiers import _state
from tierbox.tiers.base import Availability, Instance, SnapshotRef, Tier
from tierbox.tiers.vm import network as vm_net
from tierbox.tiers.vm.instance import VMInstance
from tierbox.tiers.vm.records import RecordOps
from tierbox.tiers.vm.shared import (
    ACCEL_ENV,
    BOOT_TIMEOUT_S,
    CAPABILITIES,
    DEFAULT_IMAGE,
    DEFAULT_MEMORY_MIB,
    KVM_PROBE_TIMEOUT_S,
    NAME_RE,
    UNIX_PATH_MAX,
    domains_dir,
    log,
    sockets_dir,
    translated,
)
from tierbox.tiers.vm.templates import TemplateOps
from tierbox.vmm import libvirt_domain as lvd
from tierbox.vmm import libvirt_guest as guestmod
from tierbox.vmm import libvirt_template as templates
from tierbox.vmm import qemu
from tierbox.vmm.accel import Accelerator
from tierbox.vmm.agent import GuestConfig
from tierbox.vmm.guest import file_tail, guest_config


@dataclass(frozen=True)
class Shape:
    """What a VM is made of, and the key of its template."""

    image: str
    base: guestmod.BaseDisk
    guest: guestmod.VMGuest
    accel: str
    memory_mib: int
    vcpus: int
    disk_mib: int
    key: str


class VMTier(TemplateOps, RecordOps, Tier):
    """Full VMs on libvirt (``qemu:///system``)."""

    name = "vm"
    capabilities = CAPABILITIES
    isolation = (
        "own guest kernel on an emulated q35 PC (libvirt + QEMU; a NIC only with egress, "
        "its backend passt behind a per-sandbox router that passes only the allow-list); "
        "hardware virtualization where KVM works, else TCG"
    )

    def __init__(self) -> None:
        self._accel = Accelerator(
            env=ACCEL_ENV,
            cache_file=lambda: guestmod.vm_home() / "accel.json",
            guest=guestmod.ensure_guest,
            key=_accel_key,
            probe=_probe_kvm,
            proof="the guest",
        )

    # ---- can it run here ------------------------------------------------------------------
    def available(self) -> Availability:
        if qemu.qemu_path() is None:
            return Availability(
                False, "qemu-system-x86_64 is not installed: run `make setup`", engine="libvirt"
            )
        if which("qemu-img") is None:
            return Availability(False, "qemu-img is not installed: run `make setup`")
        ok, why = lvh.reachable()
        if not ok:
            return Availability(False, why, engine="libvirt")
        try:
            from tierbox.vmm import artifacts

            guestmod.qemu_ids()  # an unprivileged user for QEMU, or the reason there is none
            if artifacts.load_kernel() is None:
                return Availability(
                    False,
                    "the guest kernel is not built: run `make setup` (scripts/setup.d/60-vm.sh)",
                    engine="libvirt",
                )
        except TierboxError as exc:
            return Availability(False, str(exc), engine="libvirt")
        accel = self._accel.known()
        what = {
            "kvm": "domain type kvm",
            "tcg": "domain type qemu (TCG, software emulation)",
        }.get(accel or "", "accelerator decided by a KVM test boot on first use")
        version = lvh.binding_version()
        return Availability(
            True,
            f"libvirt {version} ({lvh.uri()}), QEMU {qemu.qemu_version()} q35: {what}; {why}",
            engine=f"libvirt {version} + qemu-system-x86_64",
            version=f"libvirt {version}",
        )

    @translated("deciding the VM accelerator")
    def accelerator(self) -> tuple[str, str]:
        """("kvm" or "tcg", why). KVM only when a test boot worked; cached on disk."""
        return self._accel.choice()

    # ---- create ---------------------------------------------------------------------------
    def _create(self, spec: SandboxSpec) -> VMInstance:
        return self.create_vm(spec)

    def shape(self, spec: SandboxSpec) -> Shape:
        """Validate ``spec`` and gather what the VM is made of (builds the
        guest initramfs and the image's base disk when missing)."""
        self.check_spec(spec)
        mem = spec.limits.memory_mib or DEFAULT_MEMORY_MIB
        vcpus = max(1, math.ceil(spec.limits.cpus)) if spec.limits.cpus else 1
        if vcpus > (os.cpu_count() or 1):
            raise SpecError(
                f"cpus={spec.limits.cpus} asks for {vcpus} vCPUs but this host has "
                f"{os.cpu_count()} CPUs"
            )
        image = spec.image or DEFAULT_IMAGE
        try:
            base = guestmod.base_disk(image, spec.limits.disk_mib)
        except (CommandError, HostError) as exc:
            raise SandboxError(f"cannot build the base disk of {image}: {exc}") from exc
        except ImageError as exc:
            raise SandboxError(f"image {image}: {exc}") from exc
        g = guestmod.ensure_guest()
        accel, _ = self.accelerator()
        key = templates.template_key(
            {
                "image_digest": base.digest,
                "disk_mib": base.disk_mib,
                "memory_mib": mem,
                "vcpus": vcpus,
                "accel": accel,
                "initramfs": g.sha256,
                "kernel": g.kernel_sha256,
                "qemu": qemu.qemu_version(),
                "libvirt": lvh.binding_version(),
                "domain_format": lvd.DOMAIN_FORMAT,
            }
        )
        return Shape(image, base, g, accel, mem, vcpus, base.disk_mib, key)

    @translated("creating a VM")
    def create_vm(
        self,
        spec: SandboxSpec,
        *,
        name: str | None = None,
        persistent: bool = False,
        template: bool | None = None,
    ) -> VMInstance:
        """Define and start a VM; returns once its agent answers.

        ``name`` (optional) is the VM's name, its sandbox id and its libvirt
        domain name; without one the id is random and the domain is
        ``tierbox-<id>``. ``persistent`` VMs are never reaped as leftovers.
        ``template``: restore the shape's saved template where there is one
        (the default unless ``TIERBOX_VM_TEMPLATES=0``); False always cold-boots.
        """
        t0 = time.monotonic()
        if name is not None and not NAME_RE.match(name):
            raise SpecError(
                f"bad VM name {name!r}: use letters, digits and . _ - "
                "(at most 63, starting with a letter or digit)"
            )
        if name is not None:
            vm_net.check_name(name, spec)
        spec = self.prepare(spec)  # names of the allow-list pinned, host ports picked
        nic = vm_net.has_nic(spec)
        shape = self.shape(spec)
        timings: dict[str, float] = {"prepare_s": time.monotonic() - t0}
        conn = lvh.connect()
        sid = name or _state.new_id()
        domain = name or f"{MARKER}-{sid}"
        self._check_name_free(sid, domain)
        d = domains_dir() / sid
        sock = sockets_dir() / f"{sid}.sock"
        if len(str(sock)) > UNIX_PATH_MAX:
            raise HostError(
                f"the agent socket path {sock} is longer than {UNIX_PATH_MAX} bytes: "
                "use a shorter TIERBOX_RUN or VM name"
            )
        # owned before anything else of it exists: a concurrent `tierbox gc`
        # takes nothing made below for a leftover (a persistent VM's record
        # says "keep" once it is registered)
        _state.make_dir(sid)
        if d.exists():
            shutil.rmtree(d)  # a leftover with no domain (checked above)
        guestmod.jail_dir(d)
        sockets_dir().mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)
        guest = _guest_config(spec, shape.base)
        meta = lvd.VMMeta(
            id=sid,
            persistent=persistent,
            created=time.time(),
            dir=str(d),
            socket=str(sock),
            console=str(d / "console.log"),
            disk=str(d / "disk.qcow2"),
            accel=shape.accel,
            image=shape.base.image,
            image_digest=shape.base.digest,
            guest=guest.to_dict(),
            spec={**spec.to_dict(), "image": shape.image},
        )
        cfg = lvd.DomainConfig(
            name=domain,
            meta=meta,
            memory_mib=shape.memory_mib,
            vcpus=shape.vcpus,
            kernel=shape.guest.kernel,
            initramfs=shape.guest.initramfs,
            cmdline=shape.guest.cmdline(accel=shape.accel, hostname=sid, net=nic),
            cpu_quota=spec.limits.cpus,
            qemu_args=tuple(vm_net.qemu_args(sid)) if nic else (),
        )
        # a template's saved machine has no NIC: a VM with one cold-boots
        use_templates = (templates.enabled() if template is None else template) and not nic
        inst: VMInstance | None = None
        try:
            if nic:
                vm_net.start(sid, spec)  # passt listens before QEMU connects
                timings["network_s"] = time.monotonic() - t0
            tpl = templates.load(shape.key) if use_templates else None
            if tpl is not None:
                try:
                    inst = self._start_from_template(conn, tpl, cfg, timings, t0)
                except LibvirtUnreachableError:
                    raise
                except TierboxError as exc:
                    log.warning("tierbox: vm template %s failed (%s); cold-booting", tpl.key, exc)
                    templates.discard(tpl.key)
                    self.remove_domain(domain, None)
                    Path(meta.disk).unlink(missing_ok=True)
                    inst = None
            if inst is None:
                inst = self._cold_boot(conn, cfg, shape, timings, t0)
                if use_templates:
                    self._spawn_template_build(shape, spec)
        except BaseException:
            # undo what was made; the original error is the one worth reporting
            with contextlib.suppress(TierboxError):
                self.remove_domain(domain, None)
            vm_net.remove(sid)
            shutil.rmtree(d, ignore_errors=True)
            sock.unlink(missing_ok=True)
            _state.remove_dir(sid)
            raise
        inst.timings = timings
        return inst

    def _cold_boot(
        self,
        conn: Any,
        cfg: lvd.DomainConfig,
        shape: Shape,
        timings: dict[str, float],
        t0: float,
    ) -> VMInstance:
        guestmod.create_overlay(shape.base.path, Path(cfg.meta.disk))
        timings["overlay_s"] = time.monotonic() - t0
        dom = lvh.call(f"defining domain {cfg.name}", conn.defineXML, lvd.domain_xml(cfg))
        inst = VMInstance(self, cfg.name, cfg.meta)
        lvh.call(f"starting domain {cfg.name}", dom.create)
        timings["domain_start_s"] = time.monotonic() - t0
        deadline = t0 + BOOT_TIMEOUT_S.get(shape.accel, 90.0)
        try:
            inst.connect_agent(deadline=deadline)
            timings["agent_s"] = time.monotonic() - t0
            vm_net.configure_guest(inst.agent, inst.spec, deadline=deadline)
        except (AgentGoneError, AgentTimeoutError, AgentError) as exc:
            inst.agent.close()
            raise inst._boot_failure(exc) from exc
        inst._release_agent()
        timings["cold_boot"] = 1.0
        return inst

    def restore(self, snap: SnapshotRef) -> Instance:
        raise NotSupportedError(
            "the vm tier reverts in place: use sandbox.revert(name) (or "
            f"`tierbox vm snapshot revert {snap.meta.get('vm', 'VM')} "
            f"{snap.meta.get('snapshot', 'SNAPSHOT')}`)"
        )


def _guest_config(spec: SandboxSpec, base: guestmod.BaseDisk) -> GuestConfig:
    """Workloads run as root by default: the guest kernel is the boundary."""
    return guest_config(
        spec,
        default_user=(0, 0),
        root_home="/root",
        image_env=base.env,
        image_workdir=base.workdir,
    )


# ---- the accelerator ----------------------------------------------------------------------


def _accel_key(g: guestmod.VMGuest) -> str:
    return f"{os.uname().release}|{qemu.qemu_version()}|{g.sha256}|{lvh.binding_version()}"


def _probe_kvm(g: guestmod.VMGuest) -> tuple[bool, str]:
    """The KVM test boot: a transient kvm domain that only prints a mark on
    its console and powers off."""
    conn = lvh.connect()
    token = _state.new_id()
    probe_dir = guestmod.vm_home() / "probe"
    probe_dir.mkdir(parents=True, exist_ok=True)
    console = probe_dir / f"{token}.log"
    meta = lvd.VMMeta(
        id=f"probe-{token}",
        persistent=False,
        created=time.time(),
        dir=str(probe_dir),
        socket="",
        console=str(console),
        disk="",
        accel="kvm",
    )
    cfg = lvd.DomainConfig(
        name=f"{MARKER}-probe-{token}",
        meta=meta,
        memory_mib=128,
        vcpus=1,
        kernel=g.kernel,
        initramfs=g.initramfs,
        cmdline=g.cmdline(accel="kvm", hostname="probe", probe=True),
        transient_probe=True,
    )
    lv = lvh.binding()
    try:
        dom = conn.createXML(lvd.domain_xml(cfg), 0)
    except lv.libvirtError as exc:
        console.unlink(missing_ok=True)
        return False, str(exc).strip().splitlines()[-1][:300]
    try:
        deadline = time.monotonic() + KVM_PROBE_TIMEOUT_S
        while time.monotonic() < deadline:
            if guestmod.PROBE_MARK in file_tail(console, 4000):
                return True, "probe mark seen"
            try:
                if not dom.isActive():
                    break
            except lv.libvirtError:
                break
            time.sleep(0.05)
        if guestmod.PROBE_MARK in file_tail(console, 4000):
            return True, "probe mark seen"
        tail = file_tail(console, 300).strip()
        return False, (
            f"no guest output within {KVM_PROBE_TIMEOUT_S:.0f} s"
            + (f": {tail.splitlines()[-1]}" if tail else "")
        )
    finally:
        # a transient domain that already powered off is gone: nothing to destroy
        with contextlib.suppress(lv.libvirtError):
            dom.destroy()
        console.unlink(missing_ok=True)
