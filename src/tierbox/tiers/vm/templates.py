"""Saved templates of VM shapes: the first create of a shape (image, memory,
vCPUs, accelerator, guest, QEMU/libvirt versions) cold-boots and starts a
detached build of the shape's template (a booted guest saved with
``virDomainSave``); later creates restore a copy of it through libvirt's
``virDomainRestore`` as a new domain (~0.6 s here instead of 2-3 s). The
files and locks are :mod:`tierbox.vmm.libvirt_template`'s;
``TIERBOX_VM_TEMPLATES=0`` always cold-boots.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tierbox import libvirt_host as lvh
from tierbox.errors import AgentError, AgentGoneError, AgentTimeoutError, CommandError
from tierbox.host.runner import spawn
from tierbox.paths import MARKER
from tierbox.spec import SandboxSpec
from tierbox.tiers.vm.instance import VMInstance
from tierbox.tiers.vm.shared import (
    BOOT_TIMEOUT_S,
    REVERT_TIMEOUT_S,
    log,
    sockets_dir,
    translated,
)
from tierbox.vmm import libvirt_domain as lvd
from tierbox.vmm import libvirt_guest as guestmod
from tierbox.vmm import libvirt_template as templates
from tierbox.vmm.guest import GUEST_PATH

if TYPE_CHECKING:
    from tierbox.tiers.vm.tier import Shape, VMTier


class TemplateOps:
    """The template half of :class:`~tierbox.tiers.vm.tier.VMTier`."""

    if TYPE_CHECKING:  # provided by VMTier

        def shape(self, spec: SandboxSpec) -> Shape: ...

    def _vm_tier(self) -> VMTier:
        return cast("VMTier", self)

    # ---- restoring ----------------------------------------------------------------------------
    @translated("restoring a VM template")
    def _start_from_template(
        self,
        conn: Any,
        tpl: templates.Template,
        cfg: lvd.DomainConfig,
        timings: dict[str, float],
        t0: float,
    ) -> VMInstance:
        """Restore a copy of the shape's saved template as this VM."""
        lv = lvh.binding()
        templates.touch(tpl)
        guestmod.private_copy(tpl.disk, Path(cfg.meta.disk))
        guestmod.give_to_qemu(Path(cfg.meta.disk))
        img = templates.templates_dir() / f".clone-{cfg.meta.id}-{os.getpid()}.save"
        try:
            templates.write_clone_image(tpl.save, lvd.retarget_xml(tpl.save.xml, cfg), img)
            timings["clone_image_s"] = time.monotonic() - t0
            lvh.call(
                f"restoring template {tpl.key} as {cfg.name}",
                conn.restoreFlags,
                str(img),
                None,
                lv.VIR_DOMAIN_SAVE_RUNNING,
            )
        finally:
            img.unlink(missing_ok=True)
        timings["restore_s"] = time.monotonic() - t0
        dom = lvh.call("looking up the restored domain", conn.lookupByName, cfg.name)
        xml = lvh.call("reading the domain XML", dom.XMLDesc, lv.VIR_DOMAIN_XML_INACTIVE)
        lvh.call(f"defining domain {cfg.name}", conn.defineXML, xml)
        inst = VMInstance(self._vm_tier(), cfg.name, cfg.meta)
        try:
            inst.connect_agent(deadline=time.monotonic() + REVERT_TIMEOUT_S)
            # the host name is cosmetic: a guest that refuses it keeps the template's
            with contextlib.suppress(AgentError):
                inst.agent.put(
                    "/proc/sys/kernel/hostname",
                    cfg.meta.id.encode(),
                    mode=0o644,
                    uid=0,
                    gid=0,
                    deadline=time.monotonic() + 5.0,
                )
        except (AgentGoneError, AgentTimeoutError, AgentError) as exc:
            inst.agent.close()
            raise inst._boot_failure(exc) from exc
        inst._release_agent()
        timings["agent_s"] = time.monotonic() - t0
        timings["from_template"] = 1.0
        return inst

    # ---- building ----------------------------------------------------------------------------
    def _spawn_template_build(self, shape: Shape, spec: SandboxSpec) -> None:
        """Build the shape's template in a detached process (this create
        cold-booted): ``python -m tierbox.tiers.vm template``, logging to
        ``build.log`` in the templates directory."""
        argv = [
            sys.executable, "-m", "tierbox.tiers.vm", "template",
            "--image", shape.image,
            "--memory-mib", str(shape.memory_mib),
            "--vcpus", str(shape.vcpus),
            "--disk-mib", str(shape.disk_mib),
        ]  # fmt: skip
        try:
            guestmod.jail_dir(templates.templates_dir())
            log_path = templates.templates_dir() / "build.log"
            fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.fchmod(fd, 0o600)  # it quotes guest consoles of failed builds
            with open(fd, "ab") as f:
                spawn(
                    argv,
                    message="cannot start the VM template build",
                    stdin=subprocess.DEVNULL,
                    stdout=f,
                    stderr=f,
                    start_new_session=True,
                    close_fds=True,
                )
        except (OSError, CommandError) as exc:
            # this VM runs already; without the template later ones cold-boot
            log.warning("tierbox: no template for VMs of this shape: %s", exc)

    @translated("building a VM template")
    def build_template(self, spec: SandboxSpec) -> templates.Template | None:
        """Boot, settle and save the template of ``spec``'s shape (None: another
        process is building it)."""
        shape = self.shape(spec)
        found = templates.load(shape.key)
        if found is not None:
            return found
        with templates.build_lock(shape.key) as mine:
            if not mine:
                return None
            found = templates.load(shape.key)
            if found is not None:
                return found
            return self._build_template(shape)

    def _build_template(self, shape: Shape) -> templates.Template:
        conn = lvh.connect()
        lv = lvh.binding()
        short = shape.key[:12]
        sid = f"tpl-{short}"
        work = templates.templates_dir() / f".work-{shape.key}"
        shutil.rmtree(work, ignore_errors=True)
        guestmod.jail_dir(work)
        sockets_dir().mkdir(parents=True, exist_ok=True)
        meta = lvd.VMMeta(
            id=sid,
            persistent=False,
            created=time.time(),
            dir=str(work),
            socket=str(sockets_dir() / f"{sid}.sock"),
            console=str(work / "console.log"),
            disk=str(work / "disk.qcow2"),
            accel=shape.accel,
            image=shape.base.image,
            image_digest=shape.base.digest,
            guest={"uid": 0, "gid": 0, "env": {"PATH": GUEST_PATH}, "workdir": "/"},
            spec={},
        )
        cfg = lvd.DomainConfig(
            name=f"{MARKER}-{sid}",
            meta=meta,
            memory_mib=shape.memory_mib,
            vcpus=shape.vcpus,
            kernel=shape.guest.kernel,
            initramfs=shape.guest.initramfs,
            cmdline=shape.guest.cmdline(accel=shape.accel, hostname="tierbox"),
        )
        dom: Any = None
        try:
            guestmod.create_overlay(shape.base.path, Path(meta.disk))
            Path(meta.socket).unlink(missing_ok=True)
            dom = lvh.call("starting a template domain", conn.createXML, lvd.domain_xml(cfg), 0)
            inst = VMInstance(self._vm_tier(), cfg.name, meta)
            try:
                inst.connect_agent(deadline=time.monotonic() + BOOT_TIMEOUT_S[shape.accel])
                inst.exec(["true"], timeout_s=30)  # page in the exec path once
            except (AgentGoneError, AgentTimeoutError, AgentError) as exc:
                raise inst._boot_failure(exc) from exc
            finally:
                inst.agent.close()
            lvh.call("saving the template domain", dom.save, str(work / "state.save"))
            dom = None
            return templates.finish(
                shape.key,
                work,
                {
                    "image": shape.image,
                    "image_digest": shape.base.digest,
                    "disk_mib": shape.disk_mib,
                    "memory_mib": shape.memory_mib,
                    "vcpus": shape.vcpus,
                    "accel": shape.accel,
                },
            )
        finally:
            if dom is not None:
                # a transient domain that died already is gone: nothing to destroy
                with contextlib.suppress(lv.libvirtError):
                    dom.destroy()
            shutil.rmtree(work, ignore_errors=True)
            Path(meta.socket).unlink(missing_ok=True)
