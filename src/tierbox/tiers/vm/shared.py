"""What every module of the vm tier shares: its names, sizes and deadlines,
where each VM's files live, how it finds its domains in libvirt (by name, by
the tierbox element in their ``<metadata>``, their QEMU's pid), and the
boundary that keeps libvirt's and the OS's own exceptions inside the tier.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from tierbox import libvirt_host as lvh
from tierbox.errors import LibvirtError, SandboxError, TierboxError
from tierbox.network import NetworkPolicy
from tierbox.paths import run_dir
from tierbox.tiers.base import Capabilities, SnapshotKind
from tierbox.vmm import libvirt_domain as lvd
from tierbox.vmm import libvirt_guest as guestmod

log = logging.getLogger("tierbox.vm")
P = ParamSpec("P")
R = TypeVar("R")

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

#: egress through a per-sandbox gateway with passt as the NIC's backend
#: (tiers/vm/network.py), which also publishes ports
CAPABILITIES = Capabilities(
    snapshot=SnapshotKind.REVERT,
    min_memory_mib=MIN_MEMORY_MIB,
    shares_host_files=False,
    tty=True,
    networks=frozenset({NetworkPolicy.NONE, NetworkPolicy.EGRESS}),
    publish_ports=True,
)

#: libvirt's ``virDomainState`` numbers, as ``virsh domstate`` names them.
STATE_NAMES = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shutoff",
    6: "crashed",
    7: "pmsuspended",
}


def domains_dir() -> Path:
    """Where each VM's disk and console log live (``$TIERBOX_VM_DOMAINS`` or
    ``/var/lib/tierbox/vm/domains``: QEMU's unprivileged user must reach them)."""
    given = os.environ.get(DOMAINS_ENV)
    return Path(given) if given else guestmod.state_dir() / "domains"


def sockets_dir() -> Path:
    return run_dir() / "vm"


def qemu_pid(domain: str) -> int | None:
    """Pid of a domain's QEMU from libvirt's pid file (no libvirt call)."""
    try:
        pid = int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return pid if f"guest={domain},".encode() in cmdline else None


def lookup_or_none(name: str) -> Any:
    """The libvirt domain called ``name``, or None."""
    try:
        return lvh.lookup(name)
    except LibvirtError as exc:
        if lvh.is_code(exc, "VIR_ERR_NO_DOMAIN"):
            return None
        raise


def domain_meta(dom: Any) -> lvd.VMMeta | None:
    """The tierbox metadata of a domain; None for domains tierbox did not make."""
    lv = lvh.binding()
    try:
        text = dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, lvd.NS, 0)
    except lv.libvirtError:
        return None
    return lvd.parse_meta(str(text))


def short_text(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def translated(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """The boundary of a public method: a ``libvirtError`` or ``OSError`` that
    escaped the method's own handling becomes a tierbox error saying ``what``
    was being done (``raise ... from exc``); tierbox errors pass unchanged."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def boundary(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except TierboxError:
                raise
            except OSError as exc:
                raise SandboxError(f"{what} failed: {exc}") from exc
            except Exception as exc:
                if lvh.is_libvirt_error(exc):
                    raise lvh.translate(exc, what) from exc
                raise

        return boundary

    return wrap
