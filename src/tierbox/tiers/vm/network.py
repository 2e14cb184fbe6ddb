"""A VM's egress network and published ports.

libvirt cannot give a domain a tap that lives in another network namespace
(``managed='no'`` wants the tap in libvirtd's own namespace, and it cannot
pass a domain an fd at create), so the VM's NIC is made the way a container's
is, one step further out::

    guest eth0 -- virtio-net -- QEMU -- unix socket -- passt, in the sandbox
    10.200.0.2/30                      (netdev stream)   netns tbs-<id>: its
                                                         sockets leave through
                                                         eth0 10.200.0.2/30
                                                         -> the router tbr-<id>
                                                         (nftables allow-list)
                                                         -> pasta -> host

- the gateway is a :class:`~tierbox.host.netgw.Gateway` of kind ``veth``
  (exactly a container's: sandbox netns, router netns, filter, pasta);
- Debian's ``passt`` runs inside the sandbox netns and turns the guest's
  frames into that namespace's sockets (``--no-map-gw``: the gateway address
  is the router, not the namespace's loopback); it drops to ``nobody``;
- QEMU connects to passt's socket (``-netdev stream``, given through
  libvirt's ``<qemu:commandline>``); QEMU runs as libvirt's unprivileged
  user. passt binds the socket as ``nobody`` in a directory that is
  ``nobody``'s for that moment; then the directory (mode 0710) and the
  socket (0660) become root's with QEMU's group: only QEMU (and root)
  connect, and no other process of ``nobody``'s can swap the socket;
- published ports: the router sends them on to 10.200.0.2 in the sandbox
  netns (as for a container), where passt listens on them (``-t``) and
  forwards them to the guest;
- the guest's /vminit loads virtio_net only with ``tierbox.net=1`` (a VM
  without egress has no NIC), and the agent gives it its address and route
  (``NET``), the allow-list's names in /etc/hosts and, with ``dns=True``,
  the gateway's DNS forwarder in /etc/resolv.conf (as on the microVM).

passt is recorded in the gateway's record (pid and start time), so closing
the VM, and ``tierbox gc`` after a crash, stop it with the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tierbox.errors import HostError, SpecError
from tierbox.host import netgw
from tierbox.host.runner import require, spawn
from tierbox.network import Egress
from tierbox.spec import SandboxSpec
from tierbox.tiers.vm.shared import sockets_dir
from tierbox.vmm import libvirt_guest as guestmod

if TYPE_CHECKING:
    from tierbox.vmm.agent import AgentClient

#: passt's user once it dropped root (Debian's passt switches to nobody)
PASST_USER = "nobody"
#: QEMU's netdev and device ids for the NIC
NETDEV_ID = "tbnet0"
#: how long passt may take to bind its socket and go to the background
PASST_START_S = 10.0
_GATEWAY_ID = re.compile(r"[0-9a-z]{1,32}")


def has_nic(spec: SandboxSpec) -> bool:
    return isinstance(spec.network, Egress)


def check_name(sandbox_id: str, spec: SandboxSpec) -> None:
    """A VM with a NIC names its network namespaces after its id."""
    if has_nic(spec) and not _GATEWAY_ID.fullmatch(sandbox_id):
        raise SpecError(
            f"VM name {sandbox_id!r} cannot name a network namespace: a VM with "
            "network=egress needs a name of lowercase letters and digits (at most 32)"
        )


def socket_dir(sandbox_id: str) -> Path:
    """Where passt's socket (and pid file) of this VM live."""
    return sockets_dir() / f"{sandbox_id}.net"


def socket_path(sandbox_id: str) -> Path:
    return socket_dir(sandbox_id) / "passt.sock"


def mac_address(sandbox_id: str) -> str:
    """A stable, locally administered MAC (QEMU's 52:54:00 prefix) per VM."""
    h = hashlib.sha256(sandbox_id.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


def qemu_args(sandbox_id: str) -> list[str]:
    """QEMU arguments of the NIC: a virtio-net device on a stream netdev
    connected to passt's socket."""
    return [
        "-netdev",
        f"stream,id={NETDEV_ID},server=off,addr.type=unix,addr.path={socket_path(sandbox_id)}",
        "-device",
        f"virtio-net-pci,netdev={NETDEV_ID},mac={mac_address(sandbox_id)}",
    ]


def _passt_ids() -> tuple[int, int]:
    """(uid of passt's drop user, gid of QEMU's group)."""
    import pwd

    try:
        uid = pwd.getpwnam(PASST_USER).pw_uid
    except KeyError:
        raise HostError(f"there is no host user {PASST_USER!r} for passt to run as") from None
    return uid, guestmod.qemu_ids()[1]


def start(sandbox_id: str, spec: SandboxSpec) -> netgw.Gateway | None:
    """The VM's gateway and its passt, ready for QEMU to connect; None
    without egress. Everything made is removed if a step fails."""
    if not isinstance(spec.network, Egress):
        return None
    check_name(sandbox_id, spec)
    passt = require("passt", "passt")
    gw = netgw.Gateway.start(sandbox_id, spec.network, kind="veth", ports=spec.ports)
    try:
        d = socket_dir(sandbox_id)
        shutil.rmtree(d, ignore_errors=True)
        sockets_dir().mkdir(parents=True, exist_ok=True)
        d.mkdir(mode=0o700)
        uid, gid = _passt_ids()
        os.chown(d, uid, gid)  # passt binds its socket as nobody
        os.chmod(d, 0o710)
        gw.ready()  # passt copies the namespace's address and route: they must exist
        pid = _start_passt(gw, passt, d, [p.port for p in spec.ports])
        gw.record_helper("passt", pid)
        # bound and listening: from now on root's, so no other process of
        # nobody's can swap the socket or connect in QEMU's place
        sock = d / "passt.sock"
        os.chown(sock, 0, gid)
        os.chmod(sock, 0o660)
        os.chown(d, 0, gid)
        os.chmod(d, 0o710)
    except BaseException:
        remove(sandbox_id, gw)
        raise
    return gw


def _start_passt(gw: netgw.Gateway, passt: str, d: Path, ports: list[int]) -> int:
    """passt started inside the sandbox netns (the thread that runs it has
    entered it; the child inherits that): it binds its socket, writes its
    pid and goes to the background as ``nobody``."""
    pid_file = d / "passt.pid"
    argv = [
        passt,
        "--quiet",
        "--socket", str(d / "passt.sock"),
        "--pid", str(pid_file),
        "--no-map-gw",
        "-4",
        "-t", ",".join(str(p) for p in ports) if ports else "none",
        "-u", "none",
    ]  # fmt: skip
    what = f"passt for VM {gw.sandbox_id}"

    def run_inside() -> None:
        proc = spawn(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            message=f"cannot start {what}",
        )
        netgw.wait_forked(proc, what, timeout_s=PASST_START_S)

    netgw.in_netns(Path(gw.netns_path), run_inside)
    deadline = time.monotonic() + PASST_START_S
    while True:
        with contextlib.suppress(OSError, ValueError):
            return int(pid_file.read_text().strip())
        if time.monotonic() > deadline:
            raise HostError(f"{what} wrote no pid to {pid_file}")
        time.sleep(0.01)


def remove(sandbox_id: str, gw: netgw.Gateway | None = None) -> list[str]:
    """Stop passt, remove the gateway and passt's socket directory (from the
    gateway's record when ``gw`` is None). Idempotent."""
    if gw is not None:
        gw.close()
        removed = []
    else:
        removed = netgw.remove_recorded(sandbox_id)
    d = socket_dir(sandbox_id)
    if d.is_dir():
        shutil.rmtree(d, ignore_errors=True)
        removed.append(f"passt socket directory {d}")
    return removed


def counters(sandbox_id: str, spec: SandboxSpec) -> tuple[int, int] | None:
    """(tx, rx) bytes of the VM's link as the guest sees them; None without a NIC."""
    if not isinstance(spec.network, Egress):
        return None
    return netgw.Gateway(sandbox_id, spec.network, "veth", {}).counters()


def configure_guest(agent: AgentClient, spec: SandboxSpec, *, deadline: float) -> None:
    """Address, default route, /etc/hosts and /etc/resolv.conf of the
    guest's NIC (the microVM's steps, against a gateway that is ready)."""
    if not isinstance(spec.network, Egress):
        return
    agent.net(netgw.GUEST_ADDRESS, netgw.GATEWAY_ADDRESS, deadline=deadline)
    egress = spec.network
    if egress.hosts():
        from tierbox.tiers.microvm.network import hosts_file

        hosts = hosts_file(egress)
        agent.put("/etc/hosts", hosts, mode=0o644, uid=0, gid=0, deadline=deadline)
    if egress.dns:
        conf = f"nameserver {netgw.DNS_ADDRESS}\n".encode()
        agent.put("/etc/resolv.conf", conf, mode=0o644, uid=0, gid=0, deadline=deadline)
