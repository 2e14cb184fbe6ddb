"""The ``vm`` tier: every sandbox is a full virtual machine run by libvirt.

A VM is a libvirt domain on ``qemu:///system``: a q35 PC with its own Linux
kernel (the microVM tier's Debian cloud kernel, booted directly), a virtio
disk that is a qcow2 overlay over a per-image base disk, the guest agent on
a virtio-serial port, the serial console logged to a file, no network. The
domain type is ``kvm`` only where a KVM test boot reached the guest, else
``qemu`` (TCG, software emulation). See :mod:`tierbox.vmm.libvirt_domain`
for the XML and :mod:`tierbox.vmm.libvirt_guest` for what it boots.

Creating one cold-boots the guest (2-3 s under TCG) only the first time a
*shape* (image, memory, vCPUs, accelerator, guest, QEMU/libvirt versions) is
seen; that create also starts a detached build of the shape's template (a
booted guest saved with ``virDomainSave``), and later creates restore a copy
of it through libvirt's ``virDomainRestore`` as a new domain (~0.6 s). See
:mod:`tierbox.vmm.libvirt_template`. ``TIERBOX_VM_TEMPLATES=0`` always
cold-boots.

Inside, workloads run as root by default (the guest kernel is the isolation
boundary; ``SandboxSpec.user`` picks another uid). ``memory_mib`` is the
guest's RAM, ``cpus`` the vCPU count (rounded up) plus a libvirt CPU quota,
``pids`` a guest cgroup limit per exec, ``timeout_s`` is enforced per exec by
the agent.

Snapshots are libvirt's own, with ``virsh`` parity: internal (memory and
disk inside the qcow2), taken running, named, with a description and a
parent. ``virsh snapshot-list`` shows what ``tierbox vm snapshot list``
shows. Reverting the fast way: libvirt's ``revertToSnapshot`` stops QEMU and
starts a new one with ``-loadvm`` (about 2 s here); tierbox instead has the
running QEMU load the same internal snapshot (``loadvm`` through libvirt's
monitor pass-through) and then marks the snapshot current in libvirt's
records (a ``REDEFINE|CURRENT`` of its own XML), so libvirt's view — which
snapshot is current, the parent of the next one — stays what its own revert
would have left. Where that cannot apply (the domain is off, the snapshot
holds no memory, a name HMP cannot quote) or it fails, libvirt's revert runs.
After either, the agent connection is re-opened and the guest clock and RNG
reseeded with no user action.

``Tier.reap`` finds domains of crashed runs by the tierbox element in their
``<metadata>``, destroys them and removes their snapshots and disks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from tierbox import libvirt_host as lvh
from tierbox.errors import (
    CommandError,
    HostError,
    ImageError,
    NotSupportedError,
    SandboxClosedError,
    SandboxDeadError,
    SandboxError,
    SpecError,
    TierboxError,
    UsageError,
)
from tierbox.host.runner import which
from tierbox.paths import MARKER, run_dir
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
from tierbox.tiers.oci import DEFAULT_PATH
from tierbox.tiers.outcome import classify_agent
from tierbox.vmm import libvirt_domain as lvd
from tierbox.vmm import libvirt_guest as guestmod
from tierbox.vmm import libvirt_template as templates
from tierbox.vmm import qemu
from tierbox.vmm.agent import (
    AgentClient,
    AgentError,
    AgentGoneError,
    AgentTimeoutError,
    GuestConfig,
    file_error,
    run_in_guest,
)

log = logging.getLogger("tierbox.vm")
T = TypeVar("T")

MIB = 1024 * 1024
DEFAULT_IMAGE = "busybox:latest"
DEFAULT_MEMORY_MIB = 256
#: Below this the guest kernel, initramfs and agent do not fit.
MIN_MEMORY_MIB = 64
#: How long a cold boot may take to reach the agent, per accelerator.
BOOT_TIMEOUT_S = {"kvm": 30.0, "tcg": 90.0}
#: How long a reverted guest may take to answer.
REVERT_TIMEOUT_S = 30.0
#: Host-side deadline for agent calls that are not execs (files, stats).
CALL_TIMEOUT_S = 30.0
#: Extra time the host gives an exec past its own timeout before giving up.
EXEC_GRACE_S = 5.0
KVM_PROBE_TIMEOUT_S = 20.0
ACCEL_ENV = "TIERBOX_VM_ACCEL"
DOMAINS_ENV = "TIERBOX_VM_DOMAINS"
#: Names of VMs and snapshots: safe as file names, domain names and HMP arguments.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
SNAPSHOT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,62}$")
UNIX_PATH_MAX = 107


class SnapshotNotFoundError(SandboxError, UsageError):
    """The VM has no snapshot with that name."""


class SnapshotExistsError(SandboxError, UsageError):
    """The VM already has a snapshot with that name."""


class SnapshotHasChildrenError(SandboxError, UsageError):
    """A snapshot with children cannot be deleted alone."""


class VMExistsError(SandboxError, UsageError):
    """A VM (or another libvirt domain, or a sandbox) already has that name."""


class VMNotFoundError(SandboxError, UsageError):
    """No tierbox VM with that name."""


def domains_dir() -> Path:
    """Where each VM's disk and console log live (``$TIERBOX_VM_DOMAINS`` or
    ``$TIERBOX_HOME/vm/domains``)."""
    given = os.environ.get(DOMAINS_ENV)
    return Path(given) if given else guestmod.vm_home() / "domains"


def sockets_dir() -> Path:
    return run_dir() / "vm"


def _lv() -> Any:
    return lvh.binding()


@dataclass(frozen=True)
class Shape:
    """What a VM is made of, and the key of its template."""

    image: str
    base: guestmod.BaseDisk
    guest: guestmod.VMGuest
    accel: str
    memory_mib: int
    vcpus: int
    key: str


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


_STATE_NAMES = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shutoff",
    6: "crashed",
    7: "pmsuspended",
}


def _console_tail(path: str | Path, n_bytes: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _qemu_pid(domain: str) -> int | None:
    """Pid of a domain's QEMU from libvirt's pid file (no libvirt call)."""
    try:
        pid = int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return pid if f"guest={domain},".encode() in cmdline else None


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


CAPABILITIES = Capabilities(snapshot=SnapshotKind.REVERT, min_memory_mib=MIN_MEMORY_MIB)


class VMInstance(Instance):
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
        #: keep the agent line open between calls (one client at a time)
        self.hold_agent = False

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
        except lvh.LibvirtError as exc:
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
        lv = _lv()
        stranded = {
            lv.VIR_DOMAIN_PAUSED_UNKNOWN,
            lv.VIR_DOMAIN_PAUSED_MIGRATION,
            lv.VIR_DOMAIN_PAUSED_SAVE,
            lv.VIR_DOMAIN_PAUSED_SNAPSHOT,
            lv.VIR_DOMAIN_PAUSED_FROM_SNAPSHOT,
        }
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

    def domain_state(self) -> str:
        st = lvh.call("reading the domain state", self.domain().state)
        return _STATE_NAMES.get(int(st[0]), str(st[0]))

    def host_pids(self) -> list[int]:
        pid = self.qemu_pid()
        return [pid] if pid else []

    def qemu_pid(self) -> int | None:
        return _qemu_pid(self.domain_name)

    def console_tail(self, n_bytes: int = 4000) -> str:
        return _console_tail(self.meta.console, n_bytes)

    # ---- the agent line --------------------------------------------------------------------
    def _alive(self) -> bool:
        return self.qemu_pid() is not None

    def _check_usable(self) -> None:
        if self._closed:
            raise SandboxClosedError(f"VM {self.name} is closed")

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
        """Hand the agent line back after each call (unless ``hold_agent``): QEMU
        serves one client at a time, and reconnecting costs under a millisecond,
        so other processes (the CLI) never wait on an idle holder."""
        if not self.hold_agent:
            self.agent.close()

    # ---- the contract --------------------------------------------------------------------
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
        pid = self.qemu_pid()
        pss, hwm, cpu_s = _process_memory_cpu(pid) if pid else (None, None, None)
        procs = guest.get("procs")
        oom = guest.get("oom_kill")
        return Stats(
            memory_bytes=pss,
            memory_peak_bytes=max(hwm or 0, pss or 0) or None,
            cpu_s=cpu_s,
            pids=int(procs) if procs and procs.isdigit() else None,
            oom_kills=int(oom) if oom and oom.lstrip("-").isdigit() else None,
        )

    # ---- snapshots ---------------------------------------------------------------------------
    def _snapshot_obj(self, dom: Any, name: str) -> Any:
        try:
            return dom.snapshotLookupByName(name, 0)
        except _lv().libvirtError as exc:
            if lvh.is_code(exc, "VIR_ERR_NO_DOMAIN_SNAPSHOT"):
                have = [s.getName() for s in dom.listAllSnapshots(0)]
                listing = ", ".join(sorted(have)) if have else "none"
                raise SnapshotNotFoundError(
                    f"VM {self.name} has no snapshot {name!r} (it has: {listing})"
                ) from exc
            raise lvh.translate(exc, f"looking up snapshot {name!r} of {self.name}") from exc

    def snapshot_info(self, name: str) -> lvd.SnapshotInfo:
        dom = self.domain()
        snap = self._snapshot_obj(dom, name)
        return self._info(dom, snap)

    def _info(self, dom: Any, snap: Any) -> lvd.SnapshotInfo:
        xml = lvh.call("reading a snapshot", snap.getXMLDesc, 0)
        current = bool(lvh.call("reading a snapshot", snap.isCurrent, 0))
        children = int(lvh.call("reading a snapshot", snap.numChildren, 0))
        return lvd.parse_snapshot(xml, current=current, children=children)

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
            lv = _lv()
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
        if isinstance(err, lvh.LibvirtUnreachableError):
            # bring libvirtd back (where allowed) so the guest is not left paused
            try:
                self.domain()
            except TierboxError:
                return err
            return lvh.LibvirtUnreachableError(
                f"lost the connection to libvirtd while creating snapshot {name!r} of VM "
                f"{self.name} ({_short_text(str(exc))}); libvirtd runs again and the VM runs "
                f"on, but the snapshot may not be recorded: "
                f"`tierbox vm snapshot list {self.name}` shows"
            )
        text = str(exc)
        state = ""
        with contextlib.suppress(Exception):
            st = _STATE_NAMES.get(int(dom.state()[0]), "")
            if st == "paused":
                dom.resume()  # a failed save leaves the guest paused on some paths
            state = _STATE_NAMES.get(int(dom.state()[0]), "")
        where = Path(self.meta.disk).parent
        free_mib: float | None = None
        with contextlib.suppress(OSError):
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
                f"and retry. (libvirt: {_short_text(text)})"
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
        with contextlib.suppress(TierboxError):
            if name in self.internal_snapshots(dom):
                self._hmp(dom, f"delvm {name}")

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
            self.agent.close()
            timings: dict[str, float | str] = {}
            used = "libvirt"
            if method == "auto" and self._can_loadvm(dom, info):
                try:
                    self._loadvm(dom, snap, info)
                    used = "loadvm"
                except TierboxError as exc:
                    if isinstance(exc, lvh.LibvirtUnreachableError):
                        raise
                    timings["loadvm_failed"] = str(exc)
            if used == "libvirt":
                lv = _lv()
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
                    self.connect_agent(deadline=time.monotonic() + REVERT_TIMEOUT_S)
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
            and _STATE_NAMES.get(int(dom.state()[0])) in ("running", "paused")
        )

    def _loadvm(self, dom: Any, snap: Any, info: lvd.SnapshotInfo) -> None:
        """Load an internal snapshot into the running QEMU, then make libvirt's
        records say what its own revert would: this snapshot is current."""
        lv = _lv()
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
        state = _STATE_NAMES.get(int(dom.state()[0]))
        if info.state == "running" and state == "paused":
            lvh.call("resuming the VM", dom.resume)
        elif info.state == "paused" and state == "running":
            lvh.call("pausing the VM", dom.suspend)

    def delete_snapshot(self, name: str, *, children: bool = False) -> list[str]:
        """Delete snapshot ``name`` (and with ``children`` its descendants);
        returns the names deleted. A snapshot with children is refused alone."""
        with self._lock:
            dom = self.domain()
            snap = self._snapshot_obj(dom, name)
            lv = _lv()
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
    def start(self) -> None:
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

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Power the VM off (its disk and snapshots stay): the agent syncs the
        guest's file systems and powers off; after ``timeout_s`` libvirt pulls
        the plug."""
        with self._lock:
            dom = self.domain()
            if not dom.isActive():
                return
            with contextlib.suppress(AgentError, AgentGoneError, AgentTimeoutError):
                self.agent.close()
                self.agent.connect(deadline=time.monotonic() + 2.0, alive=self._alive)
                self.agent.poweroff(deadline=time.monotonic() + 5.0)
            self.agent.close()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and dom.isActive():
                time.sleep(0.05)
            if dom.isActive():
                with contextlib.suppress(lvh.LibvirtError):
                    lvh.call(f"stopping VM {self.name}", dom.destroy)

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

    def close(self) -> Termination | None:
        """Destroy the domain and remove its snapshots, disk and files. Idempotent."""
        with self._lock:
            if self._closed:
                return None
            self.agent.close()
            self.tier.remove_domain(self.domain_name, self.meta)
            self._closed = True
            return Termination(TerminationKind.SIGNALED, signal=int(signal.SIGKILL))


class VMTier(Tier):
    """Full VMs on libvirt (``qemu:///system``)."""

    name = "vm"
    capabilities = CAPABILITIES
    isolation = (
        "own guest kernel on an emulated q35 PC (libvirt + QEMU); "
        "hardware virtualization where KVM works, else TCG"
    )

    def __init__(self) -> None:
        self._accel: tuple[str, str] | None = None
        self._accel_lock = threading.Lock()

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

            if artifacts.load_kernel() is None:
                return Availability(
                    False,
                    "the guest kernel is not built: run `make setup` (scripts/setup.d/60-vm.sh)",
                    engine="libvirt",
                )
        except TierboxError as exc:
            return Availability(False, str(exc), engine="libvirt")
        accel = self._accel[0] if self._accel else _cached_accel()
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
        if not os.path.exists("/dev/kvm"):
            return "tcg", "no /dev/kvm"
        g = guestmod.ensure_guest()
        key = _accel_key(g)
        cache = guestmod.vm_home() / "accel.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            d = json.loads(cache.read_text())
            if d["key"] == key:
                return str(d["accel"]), str(d["reason"])
        ok, detail = self._probe_kvm(g)
        verdict = (
            ("kvm", "a KVM test boot reached the guest")
            if ok
            else ("tcg", f"KVM unusable: a test boot failed ({detail})")
        )
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": key, "accel": verdict[0], "reason": verdict[1]}))
        return verdict

    def _probe_kvm(self, g: guestmod.VMGuest) -> tuple[bool, str]:
        """Boot a transient kvm domain that only prints a mark and powers off."""
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
        lv = _lv()
        try:
            dom = conn.createXML(lvd.domain_xml(cfg), 0)
        except lv.libvirtError as exc:
            console.unlink(missing_ok=True)
            return False, str(exc).strip().splitlines()[-1][:300]
        try:
            deadline = time.monotonic() + KVM_PROBE_TIMEOUT_S
            while time.monotonic() < deadline:
                if guestmod.PROBE_MARK in _console_tail(console):
                    return True, "probe mark seen"
                try:
                    if not dom.isActive():
                        break
                except lv.libvirtError:
                    break
                time.sleep(0.05)
            if guestmod.PROBE_MARK in _console_tail(console):
                return True, "probe mark seen"
            tail = _console_tail(console, 300).strip()
            return False, (
                f"no guest output within {KVM_PROBE_TIMEOUT_S:.0f} s"
                + (f": {tail.splitlines()[-1]}" if tail else "")
            )
        finally:
            with contextlib.suppress(lv.libvirtError):
                dom.destroy()
            console.unlink(missing_ok=True)

    # ---- create ---------------------------------------------------------------------------
    def _create(self, spec: SandboxSpec) -> VMInstance:
        return self.create_vm(spec)

    def shape(self, spec: SandboxSpec) -> Shape:
        """Validate ``spec`` and gather what the VM is made of (builds the
        guest initramfs and the image's base disk when missing)."""
        if spec.network is not NetworkPolicy.NONE:
            raise SpecError(
                f"network={spec.network.value}: the vm tier has no network interface yet; "
                "use network=none"
            )
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
            base = guestmod.base_disk(image)
        except (CommandError, HostError) as exc:
            raise SandboxError(f"cannot build the base disk of {image}: {exc}") from exc
        except ImageError as exc:
            raise SandboxError(f"image {image}: {exc}") from exc
        g = guestmod.ensure_guest()
        accel, _ = self.accelerator()
        key = templates.template_key(
            {
                "image_digest": base.digest,
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
        return Shape(image, base, g, accel, mem, vcpus, key)

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
        if d.exists():
            shutil.rmtree(d)  # a leftover with no domain (checked above)
        d.mkdir(parents=True)
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
            cmdline=shape.guest.cmdline(accel=shape.accel, hostname=sid),
            cpu_quota=spec.limits.cpus,
        )
        use_templates = templates.enabled() if template is None else template
        inst: VMInstance | None = None
        try:
            if not persistent:
                _state.sandbox_dir(sid).mkdir(parents=True, exist_ok=True)
                _state.claim(sid)
            tpl = templates.load(shape.key) if use_templates else None
            if tpl is not None:
                try:
                    inst = self._start_from_template(conn, tpl, cfg, timings, t0)
                except lvh.LibvirtUnreachableError:
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
            with contextlib.suppress(TierboxError):
                self.remove_domain(domain, None)
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
        try:
            inst.connect_agent(deadline=t0 + BOOT_TIMEOUT_S.get(shape.accel, 90.0))
        except (AgentGoneError, AgentTimeoutError, AgentError) as exc:
            inst.agent.close()
            raise inst._boot_failure(exc) from exc
        inst._release_agent()
        timings["agent_s"] = time.monotonic() - t0
        timings["cold_boot"] = 1.0
        return inst

    def _start_from_template(
        self,
        conn: Any,
        tpl: templates.Template,
        cfg: lvd.DomainConfig,
        timings: dict[str, float],
        t0: float,
    ) -> VMInstance:
        """Restore a copy of the shape's saved template as this VM."""
        lv = _lv()
        templates.touch(tpl)
        shutil.copyfile(tpl.disk, cfg.meta.disk)
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
        inst = VMInstance(self, cfg.name, cfg.meta)
        try:
            inst.connect_agent(deadline=time.monotonic() + REVERT_TIMEOUT_S)
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

    # ---- templates ---------------------------------------------------------------------------
    def _spawn_template_build(self, shape: Shape, spec: SandboxSpec) -> None:
        """Build the shape's template in a detached process (this create cold-booted)."""
        templates.templates_dir().mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "tierbox.tiers.vm", "template",
            "--image", shape.image,
            "--memory-mib", str(shape.memory_mib),
            "--vcpus", str(shape.vcpus),
        ]  # fmt: skip
        with contextlib.suppress(OSError), open(templates.templates_dir() / "build.log", "ab") as f:
            subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=f,
                start_new_session=True,
                close_fds=True,
            )

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
        lv = _lv()
        short = shape.key[:12]
        sid = f"tpl-{short}"
        work = templates.templates_dir() / f".work-{shape.key}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
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
            guest={"uid": 0, "gid": 0, "env": {"PATH": DEFAULT_PATH}, "workdir": "/"},
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
            inst = VMInstance(self, cfg.name, meta)
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
                    "memory_mib": shape.memory_mib,
                    "vcpus": shape.vcpus,
                    "accel": shape.accel,
                },
            )
        finally:
            if dom is not None:
                with contextlib.suppress(lv.libvirtError):
                    dom.destroy()
            shutil.rmtree(work, ignore_errors=True)
            Path(meta.socket).unlink(missing_ok=True)

    def _check_name_free(self, sid: str, domain: str) -> None:
        dom = _lookup_or_none(domain)
        if dom is not None:
            meta = _domain_meta(dom)
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
    def attach(self, sandbox_id: str, state: dict[str, Any]) -> VMInstance:
        """Reconnect from a state record; needs no libvirt (the agent socket suffices)."""
        try:
            meta = lvd.VMMeta.from_dict(state["meta"])
            domain = str(state["domain"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SandboxError(f"VM {sandbox_id}: unreadable state record") from exc
        return VMInstance(self, domain, meta)

    def open(self, name: str) -> VMInstance:
        """The VM called ``name`` (its id, or its libvirt domain name)."""
        with contextlib.suppress(TierboxError):
            st = _state.read_state(name)
            if st.get("tier") == "vm":
                return self.attach(name, st["tier_state"])
        for candidate in (name, f"{MARKER}-{name}"):
            dom = _lookup_or_none(candidate)
            if dom is None:
                continue
            meta = _domain_meta(dom)
            if meta is None:
                raise UsageError(f"libvirt domain {candidate!r} is not a tierbox VM")
            inst = VMInstance(self, str(dom.name()), meta)
            self.register(inst)
            return inst
        raise VMNotFoundError(f"no VM {name!r}: `tierbox vm ls` lists them")

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
                "owner_pid": os.getpid(),
                "tier_state": inst.state(),
            },
        )

    def domains(self) -> list[tuple[Any, lvd.VMMeta]]:
        """Every libvirt domain carrying the tierbox marker, with its metadata."""
        conn = lvh.connect()
        out = []
        for dom in lvh.call("listing domains", conn.listAllDomains, 0):
            meta = _domain_meta(dom)
            if meta is not None:
                out.append((dom, meta))
        return out

    def list_vms(self) -> list[VMInfo]:
        rows = []
        for dom, meta in self.domains():
            if meta.id.startswith(("probe-", "tpl-")):
                continue  # a KVM test boot or a template being built
            try:
                st, _maxmem, mem_kib, vcpus, _cpu = dom.info()
                n = int(dom.snapshotNum(0))
            except _lv().libvirtError:
                continue  # went away while listing
            rows.append(
                VMInfo(
                    name=meta.id,
                    id=meta.id,
                    domain=str(dom.name()),
                    state=_STATE_NAMES.get(int(st), str(st)),
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

    def restore(self, snap: SnapshotRef) -> Instance:
        raise NotSupportedError(
            "the vm tier reverts in place: use sandbox.revert(name) (or "
            f"`tierbox vm snapshot revert {snap.meta.get('vm', 'VM')} "
            f"{snap.meta.get('snapshot', 'SNAPSHOT')}`)"
        )

    # ---- removal ------------------------------------------------------------------------------
    def remove_domain(self, domain: str, meta: lvd.VMMeta | None) -> list[str]:
        """Destroy and undefine ``domain`` with its snapshot records, delete its
        files. Idempotent; returns a line per thing removed."""
        removed: list[str] = []
        lv = _lv()
        dom = _lookup_or_none(domain)
        if dom is not None:
            if dom.isActive():
                with contextlib.suppress(lv.libvirtError):
                    dom.destroy()
                removed.append(f"stopped domain {domain}")
            if dom.isPersistent():
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

    def reap(self, live: set[str]) -> list[str]:
        """Remove VMs of crashed runs: marked domains whose sandbox is not live.

        A persistent VM (``tierbox vm create``) whose state record is missing
        (the host rebooted and /run was emptied) is kept and re-registered.
        """
        removed: list[str] = []
        known: set[str] = set()
        for dom, meta in self.domains():
            known.add(meta.id)
            if meta.id in live or self._busy_helper(meta):
                continue
            has_state = (_state.sandbox_dir(meta.id) / "state.json").exists()
            if meta.persistent and not has_state:
                with contextlib.suppress(OSError, TierboxError):
                    self.register(VMInstance(self, str(dom.name()), meta))
                continue
            removed += [
                f"vm {meta.id}: {line}" for line in self.remove_domain(str(dom.name()), meta)
            ]
        base = domains_dir()
        if base.is_dir():
            for d in sorted(base.iterdir()):
                if d.is_dir() and d.name not in known and d.name not in live:
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(f"vm disk directory {d} (no domain)")
        socks = sockets_dir()
        if socks.is_dir():
            for s in sorted(socks.glob("*.sock")):
                if s.stem not in known:
                    s.unlink(missing_ok=True)
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
                if time.time() - f.stat().st_mtime > 600:
                    f.unlink(missing_ok=True)
                    removed.append(f"vm clone image {f}")
        probe = guestmod.vm_home() / "probe"
        if probe.is_dir():
            for f in probe.glob("*.log"):
                if time.time() - f.stat().st_mtime > 3600:
                    f.unlink(missing_ok=True)
        return removed


def _short_text(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _lookup_or_none(name: str) -> Any:
    """The libvirt domain called ``name``, or None."""
    try:
        return lvh.lookup(name)
    except lvh.LibvirtError as exc:
        if lvh.is_code(exc, "VIR_ERR_NO_DOMAIN"):
            return None
        raise


def _domain_meta(dom: Any) -> lvd.VMMeta | None:
    lv = _lv()
    try:
        text = dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, lvd.NS, 0)
    except lv.libvirtError:
        return None
    return lvd.parse_meta(str(text))


def _guest_config(spec: SandboxSpec, base: guestmod.BaseDisk) -> GuestConfig:
    if spec.user is None:
        uid, gid = 0, 0  # root in the guest: the guest kernel is the boundary
    else:
        uid_s, _, gid_s = spec.user.partition(":")
        try:
            uid = int(uid_s)
            gid = int(gid_s) if gid_s else uid
        except ValueError as exc:
            raise SpecError(
                f"bad user {spec.user!r}: give a numeric uid[:gid], like 1000:1000"
            ) from exc
    env = {"PATH": DEFAULT_PATH, "HOME": "/root" if uid == 0 else "/tmp", "LANG": "C.UTF-8"}
    env.update(base.env)
    env.update(spec.env)
    workdir = spec.workdir if spec.workdir != "/" else (base.workdir or "/")
    return GuestConfig(uid=uid, gid=gid, env=env, workdir=workdir)


def _accel_key(g: guestmod.VMGuest) -> str:
    return f"{os.uname().release}|{qemu.qemu_version()}|{g.sha256}|{lvh.binding_version()}"


def _cached_accel() -> str | None:
    forced = os.environ.get(ACCEL_ENV, "")
    if forced in ("kvm", "tcg"):
        return forced
    with contextlib.suppress(OSError, ValueError, KeyError):
        return str(json.loads((guestmod.vm_home() / "accel.json").read_text())["accel"])
    return None


# ------------------------------------------------------------------------ set-up


def setup(image: str = DEFAULT_IMAGE) -> list[str]:
    """Everything the tier needs before its first VM: the PCI modules, the
    guest initramfs, the base disk of ``image``, the accelerator verdict."""
    from tierbox.vmm import artifacts

    lines = list(lvh.start_daemons())
    lines.append(f"libvirt {lvh.binding_version()} answers at {lvh.uri()}")
    if artifacts.load_kernel() is None:
        lines.append("fetching the guest kernel (shared with the microvm tier)")
        artifacts.build_kernel()
    g = guestmod.ensure_guest()
    lines.append(f"guest initramfs {g.initramfs} ({g.sha256[:12]})")
    tier = VMTier()
    accel, why = tier.accelerator()
    lines.append(f"accelerator: {accel} ({why})")
    b = guestmod.base_disk(image)
    lines.append(f"base disk of {b.image}: {b.path}")
    if templates.enabled():
        spec = SandboxSpec(image=image, limits=Limits(memory_mib=DEFAULT_MEMORY_MIB))
        tpl = tier.build_template(spec)
        lines.append(
            f"template of {image}, {DEFAULT_MEMORY_MIB} MiB, 1 vCPU: "
            + (str(tpl.dir) if tpl else "being built by another process")
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tierbox.tiers.vm setup|status`` (set-up scripts, debugging)."""
    parser = argparse.ArgumentParser(prog="python -m tierbox.tiers.vm")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup", help="build the guest artifacts and decide the accelerator")
    s.add_argument("--image", default=DEFAULT_IMAGE)
    sub.add_parser("status", help="is the tier available here, and why (not)")
    t = sub.add_parser("template", help="build the saved template of one VM shape")
    t.add_argument("--image", default=DEFAULT_IMAGE)
    t.add_argument("--memory-mib", type=int, default=DEFAULT_MEMORY_MIB)
    t.add_argument("--vcpus", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        if args.command == "setup":
            for line in setup(args.image):
                print(f"vm: {line}")
        elif args.command == "template":
            spec = SandboxSpec(
                image=args.image,
                limits=Limits(memory_mib=args.memory_mib, cpus=float(args.vcpus)),
            )
            started = time.monotonic()
            tpl = VMTier().build_template(spec)
            if tpl is None:
                print("vm: another process is building this template")
            else:
                print(f"vm: template {tpl.key} ready in {time.monotonic() - started:.1f} s")
        else:
            a = VMTier().available()
            print(json.dumps(a.to_dict(), indent=1))
            return 0 if a.available else 1
    except TierboxError as exc:
        print(f"vm: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
