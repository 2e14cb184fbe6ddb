"""Network policy: what a sandbox may reach, in one shape for every tier.

- ``"none"`` (the default): loopback only.
- ``"host"``: the host's own network (process tier; container when asked).
- ``Egress(allow=[...], dns=...)``: a private network whose only ways out
  are the allow-list's ``HOST:PORT`` entries. Everything else is dropped:
  other sandboxes, the host's own addresses, link-local metadata addresses.

Names in the allow-list are resolved once, when the sandbox is created, and
pinned: the rules hold the addresses, the sandbox's ``/etc/hosts`` maps the
names to them, and ``inspect`` shows them. A name that moves later is not
followed; that is the point (no DNS rebinding past the allow-list).

Published ports (``PortMap``) answer on the host's loopback unless an
address is written (``0.0.0.0:8080:80``).

This module is pure: parsing, checking and resolving. The per-tier plumbing
(namespaces, nftables, QEMU devices) lives with the tiers.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tierbox.errors import SpecError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class NetworkPolicy(enum.StrEnum):
    """What network a sandbox gets. ``none`` means loopback only (the default)."""

    NONE = "none"
    HOST = "host"
    #: a private network out through an allow-list: pass :class:`Egress`
    EGRESS = "egress"


_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$", re.IGNORECASE)


def _hostname(text: str) -> bool:
    """An RFC 1123 host name (``api.example.com``), not an address."""
    labels = text.rstrip(".").split(".")
    return len(text) <= 253 and all(_LABEL.match(x) for x in labels) and not labels[-1].isdigit()


def _port(text: str, entry: str, what: str = "port") -> int:
    if not text.isdigit():
        raise SpecError(f"bad {what} {text!r} in {entry!r}: write a number from 1 to 65535")
    n = int(text)
    if not 1 <= n <= 65535:
        raise SpecError(f"{what} {n} in {entry!r} is out of range: use 1 to 65535")
    return n


@dataclass(frozen=True)
class AllowRule:
    """One allow-list entry: a name, address or CIDR and a port range, for
    TCP and UDP. ``addresses`` is empty for a name until it is pinned."""

    text: str
    host: str
    port_min: int
    port_max: int
    addresses: tuple[str, ...] = ()  # networks, "10.0.0.0/24" or "192.0.2.7/32"

    @property
    def is_name(self) -> bool:
        return _hostname(self.host)

    def networks(self) -> list[IPNetwork]:
        return [ipaddress.ip_network(a) for a in self.addresses]

    def to_dict(self) -> dict[str, Any]:
        return {
            "allow": self.text,
            "host": self.host,
            "ports": [self.port_min, self.port_max],
            "addresses": list(self.addresses),
        }


def parse_allow(text: object) -> AllowRule:
    """``HOST:PORT``, ``CIDR:PORT-RANGE``, ``name.example:443`` or
    ``[2001:db8::1]:443``: one allow-list entry, checked."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError(
            f"bad allow-list entry {text!r}: write HOST:PORT, CIDR:PORT-RANGE or NAME:PORT"
        )
    entry = text.strip()
    if entry.startswith("["):  # [v6 or v6/len]:ports
        host, sep, ports = entry[1:].partition("]:")
    else:
        host, sep, ports = entry.rpartition(":")
    if not sep or not host or not ports:
        raise SpecError(
            f"bad allow-list entry {entry!r}: write HOST:PORT, CIDR:PORT-RANGE or NAME:PORT "
            "(an IPv6 address goes in brackets: [2001:db8::1]:443)"
        )
    lo_text, dash, hi_text = ports.partition("-")
    lo = _port(lo_text, entry)
    hi = _port(hi_text, entry) if dash else lo
    if hi < lo:
        raise SpecError(f"port range {ports} in {entry!r} runs backwards: write {hi}-{lo}")
    if _hostname(host):
        return AllowRule(entry, host.rstrip(".").lower(), lo, hi)
    try:
        net = ipaddress.ip_network(host, strict=True)
    except ValueError as exc:
        raise SpecError(
            f"bad host {host!r} in allow-list entry {entry!r}: {exc}; write an address "
            "(192.0.2.7), a network (10.0.0.0/24) or a host name (api.example.com)"
        ) from None
    return AllowRule(entry, host, lo, hi, (str(net),))


@dataclass(frozen=True)
class Egress:
    """A private network whose only ways out are ``allow``; ``dns`` lets the
    sandbox ask the host's resolvers too (names in ``allow`` resolve without
    it: they are pinned in the sandbox's /etc/hosts)."""

    allow: tuple[str, ...] = ()
    dns: bool = False
    #: the checked entries, addresses filled in once pinned at create
    rules: tuple[AllowRule, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.allow, str):
            raise SpecError(
                f"Egress(allow={self.allow!r}): allow is a list of entries, "
                f"write allow=[{self.allow!r}]"
            )
        allow = tuple(self.allow)
        object.__setattr__(self, "allow", allow)
        if not isinstance(self.dns, bool):
            raise SpecError(f"Egress(dns={self.dns!r}): dns is True or False")
        if not self.rules:
            object.__setattr__(self, "rules", tuple(parse_allow(a) for a in allow))

    @property
    def pinned(self) -> bool:
        return all(r.addresses for r in self.rules)

    def hosts(self) -> dict[str, tuple[str, ...]]:
        """Pinned names and their addresses, for the sandbox's /etc/hosts."""
        return {
            r.host: tuple(str(ipaddress.ip_network(a).network_address) for a in r.addresses)
            for r in self.rules
            if r.is_name
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "allow": list(self.allow),
            "dns": self.dns,
            "rules": [r.to_dict() for r in self.rules],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Egress:
        rules = tuple(
            AllowRule(
                r["allow"], r["host"], r["ports"][0], r["ports"][1], tuple(r.get("addresses", ()))
            )
            for r in data.get("rules", ())
        )
        return cls(tuple(data.get("allow", ())), bool(data.get("dns", False)), rules)


Resolver = Callable[[str], Iterable[str]]


def _getaddrinfo(name: str) -> list[str]:
    infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


def pin(egress: Egress, resolve: Resolver = _getaddrinfo) -> Egress:
    """Resolve every name in the allow-list now, once; a name that does not
    resolve is an error before anything starts."""
    rules = []
    for r in egress.rules:
        if r.addresses:
            rules.append(r)
            continue
        try:
            seen = {ipaddress.ip_address(a.split("%")[0]) for a in resolve(r.host)}
        except (OSError, UnicodeError) as exc:
            raise SpecError(
                f"allow-list name {r.host!r} ({r.text!r}) does not resolve on this host: "
                f"{exc}; write its address instead, or check the host's DNS"
            ) from None
        found = sorted(seen, key=str)
        if not found:
            raise SpecError(f"allow-list name {r.host!r} ({r.text!r}) resolves to no address")
        rules.append(replace(r, addresses=tuple(str(ipaddress.ip_network(a)) for a in found)))
    return replace(egress, rules=tuple(rules))


@dataclass(frozen=True)
class PortMap:
    """A sandbox port published on the host: ``host_ip:host_port`` reaches
    ``port`` inside. ``host_port=0`` lets the host pick a free one."""

    port: int
    host_port: int = 0
    host_ip: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for name, value, least in (("port", self.port, 1), ("host_port", self.host_port, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= 65535:
                raise SpecError(f"PortMap {name}={value!r} is out of range: use {least} to 65535")
        try:
            ipaddress.ip_address(self.host_ip)
        except ValueError:
            raise SpecError(
                f"PortMap host_ip={self.host_ip!r} is not an address: "
                "use 127.0.0.1 (the default) or 0.0.0.0 for every interface"
            ) from None

    @classmethod
    def parse(cls, text: str) -> PortMap:
        """Docker's ``-p``: ``PORT``, ``HOSTPORT:PORT`` or ``IP:HOSTPORT:PORT``."""
        parts = text.rsplit(":", 2)
        hint = "write PORT, HOSTPORT:PORT or IP:HOSTPORT:PORT (e.g. 8080:80)"
        if not all(parts):
            raise SpecError(f"bad port mapping {text!r}: {hint}")
        port = _port(parts[-1], text, "sandbox port")
        if len(parts) == 1:
            return cls(port)
        host_port = 0 if parts[-2] == "0" else _port(parts[-2], text, "host port")
        if len(parts) == 2:
            return cls(port, host_port)
        return cls(port, host_port, parts[0].strip("[]"))

    def to_dict(self) -> dict[str, Any]:
        return {"port": self.port, "host_port": self.host_port, "host_ip": self.host_ip}


NetworkSpec = NetworkPolicy | Egress


def network_mode(network: NetworkSpec) -> NetworkPolicy:
    return NetworkPolicy.EGRESS if isinstance(network, Egress) else network


def check_network(network: object, allow: Sequence[str] = ()) -> NetworkSpec:
    """What a caller wrote as ``network=`` (a string, a policy or an Egress),
    checked; ``allow`` is the CLI's ``--allow`` entries for ``egress``."""
    if isinstance(network, Egress):
        if allow:
            raise SpecError("give the allow-list once: in Egress(allow=...) or as --allow")
        return network
    names = "none, host, egress (with an allow-list) or Egress(allow=[...])"
    try:
        mode = NetworkPolicy(str(network) if isinstance(network, NetworkPolicy | str) else "?")
    except ValueError:
        raise SpecError(f"network={network!r} is not a network policy: use {names}") from None
    if mode is NetworkPolicy.EGRESS:
        return Egress(tuple(allow))
    if allow:
        raise SpecError(f"an allow-list needs network=egress, not network={mode.value}")
    return mode


def network_to_dict(network: NetworkSpec) -> str | dict[str, Any]:
    return {"egress": network.to_dict()} if isinstance(network, Egress) else network.value


def network_from_dict(data: object) -> NetworkSpec:
    if isinstance(data, dict) and "egress" in data:
        return Egress.from_dict(data["egress"])
    return NetworkPolicy(str(data) if data is not None else "none")
