"""How the vm tier keeps track of its VMs: the sandbox state record of each
(``tierbox sandbox ls``, attaching from another process without libvirt),
finding one by name, listing them (:class:`VMInfo`, ``tierbox vm ls``), and
removing them: one VM, or the leftovers of crashed runs (``Tier.reap``),
found by the tierbox element in their libvirt ``<metadata>``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tierbox import libvirt_host as lvh
from tierbox.errors import (
    SandboxError,
    TierboxError,
    UsageError,
    VMExistsError,
    VMNotFoundError,
)
from tierbox.paths import MARKER
from tierbox.tiers import _state
from tierbox.tiers.vm import network as vm_net
from tierbox.tiers.vm.instance import VMInstance
from tierbox.tiers.vm.shared import (
    KVM_PROBE_TIMEOUT_S,
    STATE_NAMES,
    domain_meta,
    domains_dir,
    lookup_or_none,
    sockets_dir,
    translated,
)
from tierbox.vmm import libvirt_domain as lvd
from tierbox.vmm import libvirt_guest as guestmod
from tierbox.vmm import libvirt_template as templates

if TYPE_CHECKING:
    from tierbox.tiers.vm.tier import VMTier

#: How long a domain whose destroy failed may take to stop before that is an error.
DESTROY_WAIT_S = 10.0


@dataclass(frozen=True)
class VMInfo:
    """One tierbox VM as ``tierbox vm ls`` shows it."""

    name: str
    id: str
    domain: str
    state: str
    image: str | None
    memory_mib: int
    vcpus: int
    accel: str
    snapshots: int
    persistent: bool
    created: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "domain": self.domain,
            "state": self.state,
            "image": self.image,
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "accel": self.accel,
            "snapshots": self.snapshots,
            "persistent": self.persistent,
            "created": self.created,
        }


class RecordOps:
    """The records half of :class:`~tierbox.tiers.vm.tier.VMTier`."""

    def _vm_tier(self) -> VMTier:
        return cast("VMTier", self)

    def _check_name_free(self, sid: str, domain: str) -> None:
        dom = lookup_or_none(domain)
        if dom is not None:
            meta = domain_meta(dom)
            if meta is not None:
                raise VMExistsError(
                    f"a VM named {sid!r} exists already: `tierbox vm rm {sid}` removes it"
                )
            raise VMExistsError(
                f"libvirt already has a domain named {domain!r} that tierbox did not make: "
                "choose another name"
            )
        if (_state.sandbox_dir(sid) / "state.json").exists():
            raise VMExistsError(f"a sandbox with id {sid!r} exists already: choose another name")

    # ---- find, attach, list ------------------------------------------------------------------
    @translated("attaching to a VM")
    def attach(self, sandbox_id: str, state: dict[str, Any]) -> VMInstance:
        """Reconnect from a state record; needs no libvirt (the agent socket suffices)."""
        try:
            meta = lvd.VMMeta.from_dict(state["meta"])
            domain = str(state["domain"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SandboxError(f"VM {sandbox_id}: unreadable state record") from exc
        return VMInstance(self._vm_tier(), domain, meta)

    @translated("opening a VM")
    def open(self, name: str) -> VMInstance:
        """The VM called ``name`` (its id, or its libvirt domain name)."""
        # no record (or an unreadable one): libvirt knows the VM by name
        with contextlib.suppress(TierboxError):
            st = _state.read_state(name)
            if st.get("tier") == "vm":
                return self.attach(name, st["tier_state"])
        for candidate in (name, f"{MARKER}-{name}"):
            dom = lookup_or_none(candidate)
            if dom is None:
                continue
            meta = domain_meta(dom)
            if meta is None:
                raise UsageError(f"libvirt domain {candidate!r} is not a tierbox VM")
            inst = VMInstance(self._vm_tier(), str(dom.name()), meta)
            self.register(inst)
            return inst
        raise VMNotFoundError(f"no VM {name!r}: `tierbox vm ls` lists them")

    @translated("recording a VM")
    def register(self, inst: VMInstance) -> None:
        """Write the sandbox state record (``tierbox sandbox ls``, attach without libvirt)."""
        if (_state.sandbox_dir(inst.id) / "state.json").exists():
            return
        _state.write_state(
            inst.id,
            {
                "id": inst.id,
                "tier": "vm",
                "spec": inst.spec.to_dict(),
                "created": inst.meta.created,
                "persistent": inst.meta.persistent,
                # a VM made by `tierbox vm create` lives until removed, not
                # with the process that made it (gc's liveness reads "keep")
                "keep": inst.meta.persistent,
                "owner_pid": os.getpid(),
                "tier_state": inst.state(),
            },
        )

    @translated("listing VMs")
    def domains(self) -> list[tuple[Any, lvd.VMMeta]]:
        """Every libvirt domain carrying the tierbox marker, with its metadata."""
        conn = lvh.connect()
        out = []
        for dom in lvh.call("listing domains", conn.listAllDomains, 0):
            meta = domain_meta(dom)
            if meta is not None:
                out.append((dom, meta))
        return out

    @translated("listing VMs")
    def list_vms(self) -> list[VMInfo]:
        rows = []
        for dom, meta in self.domains():
            if meta.id.startswith(("probe-", "tpl-")):
                continue  # a KVM test boot or a template being built
            try:
                st, _maxmem, mem_kib, vcpus, _cpu = dom.info()
                n = int(dom.snapshotNum(0))
            except lvh.binding().libvirtError:
                continue  # went away while listing
            rows.append(
                VMInfo(
                    name=meta.id,
                    id=meta.id,
                    domain=str(dom.name()),
                    state=STATE_NAMES.get(int(st), str(st)),
                    image=meta.image,
                    memory_mib=int(mem_kib) // 1024,
                    vcpus=int(vcpus),
                    accel=meta.accel,
                    snapshots=n,
                    persistent=meta.persistent,
                    created=meta.created,
                )
            )
        return sorted(rows, key=lambda r: (r.created, r.name))

    # ---- removal ------------------------------------------------------------------------------
    @translated("removing a VM")
    def remove_domain(self, domain: str, meta: lvd.VMMeta | None) -> list[str]:
        """Destroy and undefine ``domain`` with its snapshot records, delete its
        files. Idempotent; returns a line per thing removed."""
        removed: list[str] = []
        lv = lvh.binding()
        dom = lookup_or_none(domain)
        if dom is not None:
            if dom.isActive():
                try:
                    dom.destroy()
                except lv.libvirtError as exc:
                    # stopped or gone meanwhile (or stopping slowly) is what was asked for
                    if _stays_active(dom, DESTROY_WAIT_S):
                        raise lvh.translate(exc, f"stopping domain {domain}") from exc
                removed.append(f"stopped domain {domain}")
            try:
                persistent = bool(dom.isPersistent())
            except lv.libvirtError as exc:
                if not lvh.is_code(exc, "VIR_ERR_NO_DOMAIN"):
                    raise lvh.translate(exc, f"reading domain {domain}") from exc
                persistent = False  # a transient domain is gone once stopped
            if persistent:
                flags = (
                    lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                    | lv.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                    | lv.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                )
                try:
                    dom.undefineFlags(flags)
                except lv.libvirtError as exc:
                    if not lvh.is_code(exc, "VIR_ERR_NO_DOMAIN"):
                        raise lvh.translate(exc, f"undefining domain {domain}") from exc
                removed.append(f"domain {domain} and its snapshot records")
        dirs: list[Path] = []
        socks: list[Path] = []
        if meta is not None:
            dirs.append(Path(meta.dir))
            if meta.socket:
                socks.append(Path(meta.socket))
        if meta is not None and meta.id.startswith("probe-"):
            dirs = []  # a KVM test boot: its console log is all it has
        for p in dirs:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(f"disk directory {p}")
        for s in socks:
            s.unlink(missing_ok=True)
        if meta is not None and not meta.id.startswith("probe-"):
            # the NIC's passt, gateway and socket (nothing for a VM without one)
            removed += vm_net.remove(meta.id)
        if meta is not None:
            _state.remove_dir(meta.id)
        return removed

    @staticmethod
    def _busy_helper(meta: lvd.VMMeta) -> bool:
        """A template being built or a KVM probe still running (not leftovers)."""
        if meta.id.startswith("tpl-"):
            return templates.is_locked(Path(meta.dir).name.removeprefix(".work-"))
        if meta.id.startswith("probe-"):
            return time.time() - meta.created < KVM_PROBE_TIMEOUT_S + 30
        return False

    @translated("removing leftover VMs")
    def reap(self, live: set[str]) -> list[str]:
        """Remove VMs of crashed runs: marked domains whose sandbox is not live.

        A persistent VM (``tierbox vm create``) whose state record is missing
        (the host rebooted and /run was emptied) is kept and re-registered.
        """
        removed: list[str] = []
        known: set[str] = set()
        booted: set[str] = set()  # kernels and initramfs files a domain names
        for dom, meta in self.domains():
            known.add(meta.id)
            with contextlib.suppress(lvh.binding().libvirtError):  # gone meanwhile
                booted.add(str(dom.XMLDesc(lvh.binding().VIR_DOMAIN_XML_INACTIVE)))
            if meta.id in live or self._busy_helper(meta):
                continue
            has_state = (_state.sandbox_dir(meta.id) / "state.json").exists()
            if meta.persistent and not has_state:
                # the VM is kept either way; a record that cannot be written now
                # is written again by the next `tierbox vm` command that opens it
                with contextlib.suppress(OSError, TierboxError):
                    self.register(VMInstance(self._vm_tier(), str(dom.name()), meta))
                continue
            removed += [
                f"vm {meta.id}: {line}" for line in self.remove_domain(str(dom.name()), meta)
            ]
        legacy_base, legacy_domains, legacy_templates = guestmod.legacy_dirs()
        for base in (domains_dir(), legacy_domains):
            if base.is_dir():
                for d in sorted(base.iterdir()):
                    if d.is_dir() and d.name not in known and d.name not in live:
                        shutil.rmtree(d, ignore_errors=True)
                        removed.append(f"vm disk directory {d} (no domain)")
        # VM files of older versions (under $TIERBOX_HOME, which QEMU's user
        # cannot enter): templates are caches; base disks go with the last
        # domain whose overlay they back
        if legacy_templates.is_dir():
            shutil.rmtree(legacy_templates, ignore_errors=True)
            removed.append(f"vm templates of an older tierbox {legacy_templates}")
        if legacy_domains.is_dir() and not any(legacy_domains.iterdir()):
            with contextlib.suppress(OSError):  # a VM made meanwhile keeps it
                legacy_domains.rmdir()
        if legacy_base.is_dir() and not legacy_domains.exists():
            shutil.rmtree(legacy_base, ignore_errors=True)
            removed.append(f"vm base disks of an older tierbox {legacy_base}")
        socks = sockets_dir()
        if socks.is_dir():
            for s in sorted(socks.glob("*.sock")):
                if s.stem not in known:
                    s.unlink(missing_ok=True)
            for n in sorted(socks.glob("*.net")):
                # passt's socket directory of a VM with neither a domain nor
                # a live sandbox (killed while it was created)
                if n.is_dir() and n.stem not in known and n.stem not in live:
                    removed += vm_net.remove(n.stem)
        tdir = templates.templates_dir()
        if tdir.is_dir():
            for w in sorted(tdir.glob(".work-*")):
                if not templates.is_locked(w.name[len(".work-") :]):
                    shutil.rmtree(w, ignore_errors=True)
                    removed.append(f"unfinished vm template {w}")
            for old in templates.expired():
                shutil.rmtree(old, ignore_errors=True)
                removed.append(f"vm template unused for a week {old}")
            for f in tdir.glob(".clone-*"):
                if _older_than(f, 600):
                    f.unlink(missing_ok=True)
                    removed.append(f"vm clone image {f}")
        probe = guestmod.vm_home() / "probe"
        if probe.is_dir():
            for f in probe.glob("*.log"):
                if _older_than(f, 3600):
                    f.unlink(missing_ok=True)
        boot = guestmod.boot_dir()
        if boot.is_dir():
            # copies of kernels and initramfs files nothing used for a week
            # (each create touches its own) and no domain names
            xml = "\n".join(booted)
            for f in sorted(boot.iterdir()):
                if f.is_file() and str(f) not in xml and _older_than(f, templates.UNUSED_TTL_S):
                    f.unlink(missing_ok=True)
                    removed.append(f"vm guest file unused for a week {f}")
        return removed


def _stays_active(dom: Any, wait_s: float) -> bool:
    """True if ``dom`` still runs after ``wait_s`` (a domain that is gone does not)."""
    lv = lvh.binding()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if not dom.isActive():
                return False
        except lv.libvirtError as exc:
            if lvh.is_code(exc, "VIR_ERR_NO_DOMAIN"):
                return False
            raise lvh.translate(exc, "reading the state of a domain") from exc
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)


def _older_than(path: Path, age_s: float) -> bool:
    """True if ``path`` was last modified more than ``age_s`` ago (False if gone)."""
    try:
        return time.time() - path.stat().st_mtime > age_s
    except OSError:
        return False
