"""A microVM's egress network: the host side is a per-sandbox
:class:`~tierbox.host.netgw.Gateway` (a router namespace whose nftables
filter passes only the pinned allow-list) with a tap device; QEMU gets the
tap as an open fd behind a virtio-net NIC, and the guest agent gives the NIC
its address and default route (``NET``) once the guest answers, after a
boot and after every restore (each clone has its own gateway).

Published ports (``ports=``) are the gateway's (pasta listens on the host,
the router's nftables table sends them on to 10.200.0.2 over the tap); a
restored or cloned microVM publishes the same sandbox ports on host ports
picked anew.

A sandbox with ``network="none"`` has no NIC at all: its kernel never loads
virtio_net (``tierbox.net=0``), so loopback is all there is.

The guest's /etc/hosts maps the allow-list's pinned names; with ``dns=True``
its /etc/resolv.conf names the gateway's DNS forwarder (pasta hands queries
to the host's resolver), the only resolver the filter lets it reach.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import TYPE_CHECKING, Any

from tierbox.network import Egress
from tierbox.spec import SandboxSpec

if TYPE_CHECKING:
    from tierbox.host.netgw import Gateway
    from tierbox.vmm.agent import AgentClient
    from tierbox.vmm.jail import VmmUser


def vmm_credentials(user: VmmUser | None) -> tuple[int, int]:
    """The uid and gid QEMU runs as, who owns the tap: the sandbox's VMM
    user, or this process's own when QEMU runs unjailed (a benchmark knob)."""
    if user is not None:
        return user.uid, user.gid
    return os.getuid(), os.getgid()


def open_gateway(sandbox_id: str, spec: SandboxSpec, user: VmmUser | None = None) -> Gateway | None:
    """The sandbox's gateway with a tap for QEMU, or None without egress.
    Only its first half is made here (namespace and tap); its filter and
    uplink are made while QEMU starts, and :func:`configure_guest` waits
    for them."""
    if not isinstance(spec.network, Egress):
        return None
    from tierbox.host.netgw import Gateway

    uid, gid = vmm_credentials(user)
    return Gateway.start(
        sandbox_id, spec.network, kind="tap", tap_uid=uid, tap_gid=gid, ports=spec.ports
    )


def repick_ports(spec: SandboxSpec) -> SandboxSpec:
    """``spec`` of a restored or cloned microVM: its sandbox ports published
    on host ports picked anew (the source, or another clone, may still hold
    the ones in the snapshot)."""
    if not spec.ports:
        return spec
    from tierbox.host.netgw import pick_host_ports

    fresh = tuple(dataclasses.replace(p, host_port=0) for p in spec.ports)
    return dataclasses.replace(spec, ports=pick_host_ports(fresh))


def attach_gateway(sandbox_id: str, state: dict[str, Any] | None) -> Gateway | None:
    """The gateway of a microVM another process started (its ``vm.json``)."""
    if not state:
        return None
    from tierbox.host.netgw import Gateway

    return Gateway.attach(sandbox_id, state)


def close_gateway(gw: Gateway | None) -> None:
    if gw is not None:
        gw.close()


def tap_fd(gw: Gateway | None) -> int | None:
    """An fd of the gateway's tap for QEMU (the caller closes its copy once
    QEMU has started)."""
    return gw.open_tap() if gw is not None else None


def close_fd(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def hosts_file(egress: Egress) -> bytes:
    """/etc/hosts for the guest: loopback plus the allow-list's pinned names
    (the guest resolves them without DNS, to the addresses the filter passes)."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    for name, addrs in sorted(egress.hosts().items()):
        lines += [f"{a}\t{name}" for a in addrs]
    return ("\n".join(lines) + "\n").encode()


def configure_guest(
    agent: AgentClient, gw: Gateway, egress: Egress, *, deadline: float
) -> dict[str, str]:
    """Give the guest's NIC its address and default route through the
    gateway (once the gateway carries traffic), and map the allow-list's
    names in its /etc/hosts."""
    gw.ready()
    info = agent.net(gw.guest_address, gw.gateway_address, deadline=deadline)
    if egress.hosts():
        agent.put("/etc/hosts", hosts_file(egress), mode=0o644, uid=0, gid=0, deadline=deadline)
    if egress.dns and gw.dns_address:
        conf = f"nameserver {gw.dns_address}\n".encode()
        agent.put("/etc/resolv.conf", conf, mode=0o644, uid=0, gid=0, deadline=deadline)
    return info
