"""Snapshots of a VM with ``virsh`` parity: libvirt internal snapshots
(memory and disk inside the qcow2), taken running, named, with a description
and a parent; ``virsh snapshot-list`` shows what ``tierbox vm snapshot list``
shows.

Reverting the fast way: libvirt's ``revertToSnapshot`` stops QEMU and starts
a new one with ``-loadvm`` (about 2 s here); tierbox instead has the running
QEMU load the same internal snapshot (``loadvm`` through libvirt's monitor
pass-through) and then marks the snapshot current in libvirt's records (a
``REDEFINE|CURRENT`` of its own XML), so libvirt's view (which snapshot is
current, the parent of the next one) stays what its own revert would have
left. Where that cannot apply (the domain is off, the snapshot holds no
memory, a name HMP cannot quote) or it fails, libvirt's revert runs. After
either, the agent connection is re-opened and the guest clock and RNG
reseeded with no user action.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierbox import libvirt_host as lvh
from tierbox.errors import (
    AgentError,
    AgentGoneError,
    AgentTimeoutError,
    LibvirtUnreachableError,
    SandboxError,
    SnapshotExistsError,
    SnapshotHasChildrenError,
    SnapshotNotFoundError,
    SpecError,
    TierboxError,
)
from tierbox.spec import MIB, SandboxSpec
from tierbox.tiers.base import SnapshotRef
from tierbox.tiers.vm import network as vm_net
from tierbox.tiers.vm.shared import (
    DEFAULT_MEMORY_MIB,
    REVERT_TIMEOUT_S,
    SNAPSHOT_RE,
    STATE_NAMES,
    short_text,
    translated,
)
from tierbox.vmm import libvirt_domain as lvd
from tierbox.vmm.agent import AgentClient


class SnapshotOps:
    """The snapshot half of :class:`~tierbox.tiers.vm.instance.VMInstance`."""

    if TYPE_CHECKING:  # provided by VMInstance
        domain_name: str
        meta: lvd.VMMeta
        spec: SandboxSpec
        agent: AgentClient
        timings: dict[str, float]
        _lock: threading.RLock

        @property
        def name(self) -> str: ...
        def domain(self) -> Any: ...
        def _check_usable(self) -> None: ...
        def connect_agent(self, *, deadline: float, sync: bool = True) -> None: ...
        def _gone_or_hung(self, exc: Exception, what: str) -> SandboxError: ...
        def _release_agent(self) -> None: ...

    def _snapshot_obj(self, dom: Any, name: str) -> Any:
        try:
            return dom.snapshotLookupByName(name, 0)
        except lvh.binding().libvirtError as exc:
            if lvh.is_code(exc, "VIR_ERR_NO_DOMAIN_SNAPSHOT"):
                have = [s.getName() for s in dom.listAllSnapshots(0)]
                listing = ", ".join(sorted(have)) if have else "none"
                raise SnapshotNotFoundError(
                    f"VM {self.name} has no snapshot {name!r} (it has: {listing})"
                ) from exc
            raise lvh.translate(exc, f"looking up snapshot {name!r} of {self.name}") from exc

    def _info(self, dom: Any, snap: Any) -> lvd.SnapshotInfo:
        xml = lvh.call("reading a snapshot", snap.getXMLDesc, 0)
        current = bool(lvh.call("reading a snapshot", snap.isCurrent, 0))
        children = int(lvh.call("reading a snapshot", snap.numChildren, 0))
        return lvd.parse_snapshot(xml, current=current, children=children)

    @translated("creating a VM snapshot")
    def create_snapshot(self, name: str, description: str | None = None) -> lvd.SnapshotInfo:
        """A libvirt internal snapshot (memory and disk) of the running VM."""
        if not SNAPSHOT_RE.match(name):
            raise SpecError(
                f"bad snapshot name {name!r}: use letters, digits and . _ - : + "
                "(at most 63, starting with a letter or digit)"
            )
        with self._lock:
            self._check_usable()
            dom = self.domain()
            lv = lvh.binding()
            try:
                old = dom.snapshotLookupByName(name, 0)
            except lv.libvirtError as exc:
                if not lvh.is_code(exc, "VIR_ERR_NO_DOMAIN_SNAPSHOT"):
                    raise lvh.translate(exc, f"looking up snapshot {name!r}") from exc
                old = None
            if old is not None:
                info = self._info(dom, old)
                raise SnapshotExistsError(
                    f"VM {self.name} already has a snapshot {name!r} (taken "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.created))}): "
                    "choose another name, or delete it first"
                )
            self._drop_orphan_internal(dom, name)
            started = time.monotonic()
            try:
                snap = dom.snapshotCreateXML(
                    lvd.snapshot_xml(name, description), lv.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                )
            except lv.libvirtError as exc:
                raise self._snapshot_failed(dom, exc, name) from exc
            self.timings = {"snapshot_create_s": time.monotonic() - started}
            return self._info(dom, snap)

    def _snapshot_failed(self, dom: Any, exc: Any, name: str) -> TierboxError:
        err = lvh.translate(exc, f"creating snapshot {name!r} of VM {self.name}")
        if isinstance(err, LibvirtUnreachableError):
            # bring libvirtd back (where allowed) so the guest is not left paused
            try:
                self.domain()
            except TierboxError:
                return err
            return LibvirtUnreachableError(
                f"lost the connection to libvirtd while creating snapshot {name!r} of VM "
                f"{self.name} ({short_text(str(exc))}); libvirtd runs again and the VM runs "
                f"on, but the snapshot may not be recorded: "
                f"`tierbox vm snapshot list {self.name}` shows"
            )
        text = str(exc)
        state = ""
        # only to say what state the VM is left in; the error is reported either way
        with contextlib.suppress(lvh.binding().libvirtError):
            st = STATE_NAMES.get(int(dom.state()[0]), "")
            if st == "paused":
                dom.resume()  # a failed save leaves the guest paused on some paths
            state = STATE_NAMES.get(int(dom.state()[0]), "")
        where = Path(self.meta.disk).parent
        free_mib: float | None = None
        with contextlib.suppress(OSError):  # unknown free space: judged by the message alone
            st_fs = os.statvfs(where)
            free_mib = st_fs.f_bavail * st_fs.f_frsize / MIB
        mem_mib = int(self.spec.limits.memory_mib or DEFAULT_MEMORY_MIB)
        # QEMU reports a full disk as ENOSPC or, while saving RAM, as a bare -5 (EIO)
        if (
            "No space left" in text
            or "ENOSPC" in text
            or (free_mib is not None and free_mib < mem_mib)
        ):
            return SandboxError(
                f"no space left for snapshot {name!r} of VM {self.name}: its disk "
                f"{self.meta.disk} is on a file system with "
                f"{free_mib if free_mib is not None else 0:.1f} MiB free ({where}), and the "
                f"memory state of a {mem_mib} MiB guest needs up to {mem_mib} MiB. No "
                f"snapshot was recorded; the VM is {state or 'unchanged'}. Free some space "
                f"and retry. (libvirt: {short_text(text)})"
            )
        return SandboxError(f"{err} (the VM is {state or 'in an unknown state'})")

    def _hmp(self, dom: Any, command: str) -> str:
        lvq = lvh.qemu_binding()
        out = lvh.call(
            f"monitor command {command!r}",
            lvq.qemuMonitorCommand,
            dom,
            command,
            lvq.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
        )
        return str(out or "")

    @translated("listing a VM's internal snapshots")
    def internal_snapshots(self, dom: Any | None = None) -> list[str]:
        """Tags of the internal snapshots QEMU holds in the disk (``info snapshots``)."""
        dom = dom if dom is not None else self.domain()
        text = self._hmp(dom, "info snapshots")
        tags = []
        for line in text.splitlines():
            parts = line.split()
            # rows start with the snapshot id, or "--" when it is on every disk
            if len(parts) >= 2 and (parts[0].isdigit() or parts[0] == "--"):
                tags.append(parts[1])
        return tags

    def _drop_orphan_internal(self, dom: Any, name: str) -> None:
        """A snapshot interrupted by libvirtd dying can leave QEMU's copy without
        libvirt's record; drop such a leftover before reusing its name."""
        if not dom.isActive():
            return
        # best effort: a leftover that stays makes the snapshot fail with QEMU's reason
        with contextlib.suppress(TierboxError):
            if name in self.internal_snapshots(dom):
                self._hmp(dom, f"delvm {name}")

    @translated("listing VM snapshots")
    def list_snapshots(self) -> list[lvd.SnapshotInfo]:
        dom = self.domain()
        snaps = lvh.call(f"listing the snapshots of {self.name}", dom.listAllSnapshots, 0)
        infos = [self._info(dom, s) for s in snaps]
        return sorted(infos, key=lambda i: (i.created, i.name))

    def snapshot(self) -> SnapshotRef:
        """Contract: a snapshot with a generated name (see :meth:`create_snapshot`)."""
        name = time.strftime("snap-%Y%m%d-%H%M%S") + f"-{int(time.time() * 1000) % 1000:03d}"
        info = self.create_snapshot(name)
        return SnapshotRef(
            tier="vm",
            path=self.meta.disk,
            meta={
                "vm": self.name,
                "domain": self.domain_name,
                "snapshot": info.name,
                "spec": self.spec.to_dict(),
            },
        )

    def revert(self, name: str) -> None:
        """Bring back the memory and disk of snapshot ``name``; the agent line
        works again when this returns."""
        self.revert_timed(name)

    @translated("reverting a VM to a snapshot")
    def revert_timed(self, name: str, *, method: str = "auto") -> dict[str, float | str]:
        """Revert and say how (``loadvm`` or ``libvirt``) and how long each step took.

        ``method``: ``auto`` (fast where it applies), ``libvirt`` (always
        ``virDomainRevertToSnapshot``).
        """
        with self._lock:
            self._check_usable()
            t0 = time.monotonic()
            dom = self.domain()
            snap = self._snapshot_obj(dom, name)
            info = self._info(dom, snap)
            self.agent.close(f"the VM was reverted to snapshot {name!r}")
            timings: dict[str, float | str] = {}
            used = "libvirt"
            if method == "auto" and self._can_loadvm(dom, info):
                try:
                    self._loadvm(dom, snap, info)
                    used = "loadvm"
                except TierboxError as exc:
                    if isinstance(exc, LibvirtUnreachableError):
                        raise
                    timings["loadvm_failed"] = str(exc)
            if used == "libvirt":
                lv = lvh.binding()
                try:
                    dom.revertToSnapshot(snap, lv.VIR_DOMAIN_SNAPSHOT_REVERT_FORCE)
                except lv.libvirtError as exc:
                    raise lvh.translate(
                        exc, f"reverting VM {self.name} to snapshot {name!r}"
                    ) from exc
            timings["method"] = used
            timings["revert_s"] = time.monotonic() - t0
            if info.state in ("running", "paused") and dom.isActive():
                if info.state == "paused":
                    # a paused guest cannot answer: the line reopens on the next call
                    timings["total_s"] = time.monotonic() - t0
                    self.timings = {k: v for k, v in timings.items() if isinstance(v, float)}
                    return timings
                try:
                    deadline = time.monotonic() + REVERT_TIMEOUT_S
                    self.connect_agent(deadline=deadline)
                    # the NIC again (a fresh QEMU reconnected to passt; the
                    # guest forgets the neighbours it knew before)
                    vm_net.configure_guest(self.agent, self.spec, deadline=deadline)
                except (AgentGoneError, AgentTimeoutError, AgentError) as exc:
                    self.agent.close()
                    raise self._gone_or_hung(exc, "reconnecting after the revert") from exc
                self._release_agent()
            timings["total_s"] = time.monotonic() - t0
            self.timings = {k: v for k, v in timings.items() if isinstance(v, float)}
            return timings

    def _can_loadvm(self, dom: Any, info: lvd.SnapshotInfo) -> bool:
        return (
            info.memory == "internal"
            and info.state in ("running", "paused")
            and bool(SNAPSHOT_RE.match(info.name))
            and STATE_NAMES.get(int(dom.state()[0])) in ("running", "paused")
        )

    def _loadvm(self, dom: Any, snap: Any, info: lvd.SnapshotInfo) -> None:
        """Load an internal snapshot into the running QEMU, then make libvirt's
        records say what its own revert would: this snapshot is current."""
        lv = lvh.binding()
        out = self._hmp(dom, f"loadvm {info.name}").strip()
        if out:
            # HMP reports failures as text; the guest may be half-loaded: let
            # libvirt's revert (a fresh QEMU) repair it
            raise SandboxError(f"QEMU could not load snapshot {info.name!r}: {out}")
        xml = lvh.call("reading a snapshot", snap.getXMLDesc, lv.VIR_DOMAIN_SNAPSHOT_XML_SECURE)
        lvh.call(
            "marking the snapshot current",
            dom.snapshotCreateXML,
            xml,
            lv.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE | lv.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT,
        )
        state = STATE_NAMES.get(int(dom.state()[0]))
        if info.state == "running" and state == "paused":
            lvh.call("resuming the VM", dom.resume)
        elif info.state == "paused" and state == "running":
            lvh.call("pausing the VM", dom.suspend)

    @translated("deleting a VM snapshot")
    def delete_snapshot(self, name: str, *, children: bool = False) -> list[str]:
        """Delete snapshot ``name`` (and with ``children`` its descendants);
        returns the names deleted. A snapshot with children is refused alone."""
        with self._lock:
            dom = self.domain()
            snap = self._snapshot_obj(dom, name)
            lv = lvh.binding()
            kids = [
                str(s.getName())
                for s in lvh.call(
                    "listing children",
                    snap.listAllChildren,
                    lv.VIR_DOMAIN_SNAPSHOT_LIST_DESCENDANTS,
                )
            ]
            if kids and not children:
                raise SnapshotHasChildrenError(
                    f"snapshot {name!r} of VM {self.name} has {len(kids)} "
                    f"descendant{'s' if len(kids) != 1 else ''} ({', '.join(sorted(kids))}): "
                    "delete those first, or pass --children to delete it with all of them"
                )
            flags = lv.VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN if children else 0
            lvh.call(f"deleting snapshot {name!r} of VM {self.name}", snap.delete, flags)
            return [name, *kids]

    # ---- power ------------------------------------------------------------------------------
