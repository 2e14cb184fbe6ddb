"""libvirt XML for the ``vm`` tier: domains, their tierbox metadata, snapshots.

A tierbox domain is a q35 PC booted directly from the guest kernel and
initramfs (firmware: QEMU's qboot, which is faster than SeaBIOS under TCG)
with three virtio devices placed straight on the PCIe root bus: the disk (a
qcow2 overlay), a virtio-serial port for the agent (a unix socket on the
host) and an RNG. The first serial port is logged by virtlogd (at most 8 MiB
with its default rollover). There is no USB, no balloon, no graphics,
and no network interface unless the VM has egress: then a virtio-net NIC
whose backend is a passt socket, given as extra QEMU arguments
(``<qemu:commandline>``, see :mod:`tierbox.tiers.vm.network`).

QEMU runs as libvirt's unprivileged user (a static DAC label, ``+uid:+gid``
of ``libvirt-qemu``: no capabilities, no access to root's files) with
``relabel='no'``: libvirt chowns nothing. tierbox hands QEMU exactly the
files it writes (the overlay, 0600, owned by that user); the kernel,
initramfs and base disk stay root's, mode 0444, which QEMU can read and
cannot change, so one QEMU cannot alter what other VMs boot. libvirt itself
opens save images and creates the agent socket as root and passes QEMU the
descriptors. Dynamic ownership would instead chown the shared kernel and
base disk to QEMU's user while any VM runs.

Its ``<metadata>`` carries one element in the namespace :data:`NS`, whose
text is JSON (:class:`VMMeta`): the marker ``Tier.reap`` looks for, and
everything another process needs to reattach without asking anything else.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierbox.errors import SandboxError
from tierbox.vmm import libvirt_guest as guestmod

NS = "https://tierbox.dev/xmlns/vm/1"
#: Bump when the generated XML changes (templates saved with the old one are rebuilt).
DOMAIN_FORMAT = 4
NS_PREFIX = "tierbox"
#: libvirt's namespace for extra QEMU arguments (the NIC of a VM with egress)
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
#: QEMU's minimal firmware: boots a -kernel straight, ~0.15 s sooner than SeaBIOS under TCG.
QBOOT = Path("/usr/share/qemu/qboot.rom")
#: PCI slots on the root bus (pcie.0) for the three devices: no root ports to
#: enumerate and no hot-plug controllers to set up.
SLOTS = {"disk": 0x02, "serial": 0x03, "rng": 0x04}

ET.register_namespace(NS_PREFIX, NS)
ET.register_namespace("qemu", QEMU_NS)


@dataclass(frozen=True)
class VMMeta:
    """What a tierbox domain records about itself in its ``<metadata>``."""

    id: str
    persistent: bool
    created: float
    dir: str
    socket: str
    console: str
    disk: str
    accel: str
    image: str | None = None
    image_digest: str | None = None
    guest: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "persistent": self.persistent,
            "created": self.created,
            "dir": self.dir,
            "socket": self.socket,
            "console": self.console,
            "disk": self.disk,
            "accel": self.accel,
            "image": self.image,
            "image_digest": self.image_digest,
            "guest": self.guest,
            "spec": self.spec,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VMMeta:
        return cls(
            id=str(d["id"]),
            persistent=bool(d.get("persistent")),
            created=float(d.get("created", 0.0)),
            dir=str(d["dir"]),
            socket=str(d["socket"]),
            console=str(d["console"]),
            disk=str(d["disk"]),
            accel=str(d.get("accel", "tcg")),
            image=d.get("image"),
            image_digest=d.get("image_digest"),
            guest=dict(d.get("guest", {})),
            spec=dict(d.get("spec", {})),
        )


@dataclass(frozen=True)
class DomainConfig:
    """Everything that goes into one domain's XML."""

    name: str
    meta: VMMeta
    memory_mib: int
    vcpus: int
    kernel: Path
    initramfs: Path
    cmdline: str
    cpu_quota: float | None = None  # total CPU limit in cores; None: none
    transient_probe: bool = False  # a KVM test boot: no disk, no agent channel
    #: the DAC label QEMU runs with (``+uid:+gid``, never root)
    qemu_label: str = field(default_factory=guestmod.seclabel)
    #: extra QEMU arguments (``<qemu:commandline>``): the NIC of a VM with egress
    qemu_args: tuple[str, ...] = ()


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _pci(parent: ET.Element, slot: int) -> None:
    attrs = {"type": "pci", "domain": "0x0000", "bus": "0x00", "function": "0x0"}
    _sub(parent, "address", slot=f"0x{slot:02x}", **attrs)


def domain_xml(cfg: DomainConfig) -> str:
    kvm = cfg.meta.accel == "kvm"
    dom = ET.Element("domain", {"type": "kvm" if kvm else "qemu"})
    _sub(dom, "name", cfg.name)
    _sub(dom, "title", f"tierbox vm {cfg.meta.id}")
    md = _sub(dom, "metadata")
    _sub(md, f"{{{NS}}}vm", json.dumps(cfg.meta.to_dict(), sort_keys=True))
    _sub(dom, "memory", str(cfg.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(cfg.vcpus))
    if cfg.cpu_quota is not None:
        tune = _sub(dom, "cputune")
        period = 100_000
        _sub(tune, "period", str(period))
        _sub(tune, "quota", str(max(1000, int(cfg.cpu_quota / cfg.vcpus * period))))
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="q35")
    if QBOOT.is_file():
        _sub(os_el, "loader", str(QBOOT), type="rom")
    _sub(os_el, "kernel", str(cfg.kernel))
    _sub(os_el, "initrd", str(cfg.initramfs))
    _sub(os_el, "cmdline", cfg.cmdline)
    feats = _sub(dom, "features")
    _sub(feats, "acpi")
    if kvm:
        _sub(dom, "cpu", mode="host-passthrough", check="none", migratable="on")
    else:
        _sub(dom, "cpu", mode="maximum", check="none", migratable="on")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "destroy")
    _sub(dom, "on_crash", "destroy")
    dev = _sub(dom, "devices")
    if not cfg.transient_probe:
        disk = _sub(dev, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type="qcow2", cache="writeback", discard="unmap")
        _sub(disk, "source", file=cfg.meta.disk)
        _sub(disk, "target", dev="vda", bus="virtio")
        _pci(disk, SLOTS["disk"])
    # the console is logged by virtlogd, which rolls the file over at its
    # max_size (2 MiB by default) and keeps max_backups (3) old ones: a guest
    # flooding ttyS0 costs the host at most 8 MiB (SECURITY.md)
    serial = _sub(dev, "serial", type="pty")
    _sub(serial, "log", file=cfg.meta.console, append="on")
    _sub(serial, "target", port="0")
    if not cfg.transient_probe:
        ctl = _sub(dev, "controller", type="virtio-serial", index="0")
        _pci(ctl, SLOTS["serial"])
        chan = _sub(dev, "channel", type="unix")
        _sub(chan, "source", mode="bind", path=cfg.meta.socket)
        _sub(chan, "target", type="virtio", name="tierbox.agent")
    rng = _sub(dev, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    _pci(rng, SLOTS["rng"])
    _sub(dev, "controller", type="usb", model="none")
    _sub(dev, "memballoon", model="none")
    _seclabel(dom, cfg.qemu_label)
    if cfg.qemu_args:
        extra = _sub(dom, f"{{{QEMU_NS}}}commandline")
        for arg in cfg.qemu_args:
            _sub(extra, f"{{{QEMU_NS}}}arg", value=arg)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def _seclabel(dom: ET.Element, label: str) -> None:
    """QEMU as ``label`` (``+uid:+gid``), and libvirt relabels no file."""
    if label.startswith(("+0:", "0:", "root:")) or label.endswith((":+0", ":0", ":root")):
        raise SandboxError(f"refusing to run QEMU as root (DAC label {label})")
    for old in dom.findall("seclabel"):
        dom.remove(old)
    sec = _sub(dom, "seclabel", type="static", model="dac", relabel="no")
    _sub(sec, "label", label)


def retarget_xml(xml: str, cfg: DomainConfig) -> str:
    """A template domain's XML (as libvirt wrote it into its save image) made
    into the XML of ``cfg``'s domain: its name, no UUID (libvirt makes a new
    one), its metadata, disk, console log, agent socket, command line, CPU
    quota and QEMU's user. Every device and address stays as libvirt laid it
    out, so the saved QEMU state loads into it."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise SandboxError(f"unreadable domain XML in a template: {exc}") from exc

    def need(path: str) -> ET.Element:
        el = root.find(path)
        if el is None:
            raise SandboxError(f"the template's domain XML has no {path}")
        return el

    need("name").text = cfg.name
    for uuid in root.findall("uuid"):
        root.remove(uuid)
    title = root.find("title")
    if title is None:
        title = _sub(root, "title")
    title.text = f"tierbox vm {cfg.meta.id}"
    md = root.find("metadata")
    if md is None:
        md = _sub(root, "metadata")
    for old in md.findall(f"{{{NS}}}vm"):
        md.remove(old)
    _sub(md, f"{{{NS}}}vm", json.dumps(cfg.meta.to_dict(), sort_keys=True))
    need("os/cmdline").text = cfg.cmdline
    need("devices/disk/source").set("file", cfg.meta.disk)
    for tag in ("serial", "console"):
        for dev in root.findall(f"devices/{tag}"):
            if dev.get("type") == "file":
                for src in dev.findall("source"):
                    src.set("path", cfg.meta.console)
            elif dev.get("type") == "pty":
                for src in dev.findall("source"):
                    dev.remove(src)  # the template's pty; libvirt allocates a new one
            for log in dev.findall("log"):
                log.set("file", cfg.meta.console)
    need("devices/channel/source").set("path", cfg.meta.socket)
    _seclabel(root, cfg.qemu_label)
    for tune in root.findall("cputune"):
        root.remove(tune)
    if cfg.cpu_quota is not None:
        tune = ET.Element("cputune")
        _sub(tune, "period", "100000")
        _sub(tune, "quota", str(max(1000, int(cfg.cpu_quota / cfg.vcpus * 100_000))))
        root.insert(list(root).index(need("vcpu")) + 1, tune)
    return ET.tostring(root, encoding="unicode")


def parse_meta(text: str) -> VMMeta | None:
    """The tierbox metadata in a domain's XML or in the element libvirt returns
    for :data:`NS`; None when there is none (not a tierbox domain)."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return None
    # libvirt hands the element back without its namespace; a full domain XML keeps it
    el = root if root.tag in ("vm", f"{{{NS}}}vm") else root.find(f"./metadata/{{{NS}}}vm")
    if el is None or not el.text:
        return None
    try:
        return VMMeta.from_dict(json.loads(el.text))
    except (ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class SnapshotInfo:
    """One libvirt snapshot as ``virsh snapshot-list --parent`` and
    ``snapshot-info`` show it."""

    name: str
    created: int  # seconds since the epoch
    state: str  # the domain's state when taken: running, paused, shutoff
    description: str
    parent: str | None
    memory: str  # internal, external or no
    current: bool = False
    children: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created": self.created,
            "state": self.state,
            "description": self.description,
            "parent": self.parent,
            "memory": self.memory,
            "current": self.current,
            "children": self.children,
        }


def snapshot_xml(name: str, description: str | None) -> str:
    snap = ET.Element("domainsnapshot")
    _sub(snap, "name", name)
    if description:
        _sub(snap, "description", description)
    return ET.tostring(snap, encoding="unicode")


def parse_snapshot(text: str, *, current: bool = False, children: int = 0) -> SnapshotInfo:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise SandboxError(f"libvirt returned unreadable snapshot XML: {exc}") from exc
    mem = root.find("memory")
    return SnapshotInfo(
        name=root.findtext("name", ""),
        created=int(root.findtext("creationTime", "0") or 0),
        state=root.findtext("state", ""),
        description=root.findtext("description", "") or "",
        parent=root.findtext("parent/name"),
        memory=mem.get("snapshot", "no") if mem is not None else "no",
        current=current,
        children=children,
    )
