"""A per-sandbox network gateway with an egress allow-list, made of
maintained parts: iproute2 (namespaces, veth, tap), nftables (the filter)
and pasta from Debian's ``passt`` (the uplink).

::

    sandbox netns tbs-<id>        router netns tbr-<id>              host
    eth0 10.200.0.2/30  --veth--  tb0 10.200.0.1/30
                                  nft table inet tierbox:            pasta: host
                                    forward: allow-list, else drop   sockets, as
                                    masquerade out of the uplink  -- any program
                                  eth0 (pasta's tap, host address)

For a VM (``kind="tap"``) there is no sandbox netns: a tap device ``tb0`` in
the router netns carries the gateway address and the VMM gets it as an fd.

Why this shape: the filter lives in a namespace the workload cannot reach
(gVisor sends through AF_PACKET, which bypasses any OUTPUT hook inside the
sandbox's own netns), and pasta turns the router's traffic into ordinary
host sockets, so no host sysctl, host route or host nftables table is ever
touched; ``ip_forward`` is set only inside the router netns.

Published ports are pasta listeners on the host (``-t``) whose connections
the router's nftables table sends on to the sandbox (DNAT).

``create`` = ``start`` + ``ready``: ``start`` makes only the namespaces, so a
runtime can join the sandbox's while the link, the filter and pasta are made
in the background; ``ready`` waits for them.

Both namespaces are named from the sandbox id with a tierbox prefix, and a
record (``<run_dir>/netgw/<id>.json``, written before anything is made)
names what was made and the pasta process with its start time (and a VM's
passt, see tiers/vm/network.py), so ``reap`` removes only what tierbox
made, for sandboxes that are no longer live.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import ipaddress
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from tierbox.errors import HostError, SpecError
from tierbox.host.pinned import start_time
from tierbox.host.runner import exit_error, require, run, spawn
from tierbox.network import Egress, PortMap
from tierbox.paths import run_dir

SANDBOX_PREFIX = "tbs-"
ROUTER_PREFIX = "tbr-"
NETNS_DIR = Path("/run/netns")
#: the sandbox's side of the link and its gateway (the same in every sandbox:
#: each has its own router, so nothing is shared)
GUEST_ADDRESS = "10.200.0.2/30"
GATEWAY_ADDRESS = "10.200.0.1"
_GATEWAY_CIDR = "10.200.0.1/30"
#: where the sandbox asks DNS when ``dns=True``: outside the link, so it is
#: routed to pasta, which hands it to the host's first resolver
#: (``--dns-forward``); the host's resolv.conf may name a loopback resolver
#: the sandbox could never reach itself
DNS_ADDRESS = "10.200.1.53"
#: interface names inside the namespaces (private to each, so fixed)
ROUTER_IF = "tb0"
SANDBOX_IF = "eth0"
UPLINK_IF = "up0"
NFT_TABLE = "tierbox"
_ID = re.compile(r"[0-9a-z]{1,32}")

Kind = Literal["veth", "tap"]
_T = TypeVar("_T")


def records_dir() -> Path:
    return run_dir() / "netgw"


def _check_id(sandbox_id: str) -> None:
    if not _ID.fullmatch(sandbox_id):
        raise SpecError(f"sandbox id {sandbox_id!r} cannot name a network namespace")


def _ip() -> str:
    return require("ip", "iproute2")


def _nft() -> str:
    return require("nft", "nftables")


def _pasta() -> str:
    return require("pasta", "passt")


# ---- namespaces entered by one thread ---------------------------------------
_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]


def in_netns(path: Path, fn: Callable[[], _T]) -> _T:
    """``fn()`` run by a fresh thread that has entered the network namespace
    at ``path`` (setns is per thread; the thread ends with the call, so no
    other work ever runs in that namespace by accident)."""
    out: list[_T] = []
    err: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"setns {path}: {os.strerror(e)}")
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            err.append(exc)

    t = threading.Thread(target=body, name=f"netns {path.name}")
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
        fcntl.ioctl(fd, _TUNSETIFF, ifr)
    except OSError:
        os.close(fd)
        raise
    return fd


# ---- rules -------------------------------------------------------------------
def _v4_networks(policy: Egress) -> list[tuple[ipaddress.IPv4Network, int, int]]:
    """(network, first port, last port) per pinned IPv4 address of the
    allow-list. The sandbox's link is IPv4 only: a rule with no IPv4
    address at all is refused (a name with both families keeps its IPv4)."""
    out = []
    for rule in policy.rules:
        if not rule.addresses:
            raise SpecError(f"allow-list entry {rule.text!r} is not pinned to an address yet")
        nets = [n for n in rule.networks() if isinstance(n, ipaddress.IPv4Network)]
        if not nets:
            raise SpecError(
                f"allow-list entry {rule.text!r} has only IPv6 addresses; sandbox networks "
                "are IPv4: allow an IPv4 address or a name with one"
            )
        out += [(n, rule.port_min, rule.port_max) for n in nets]
    return out


def free_port(host_ip: str) -> int:
    """A TCP port free on ``host_ip`` now, for a published port written as 0."""
    family = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host_ip, 0))
        return int(sock.getsockname()[1])


def pick_host_ports(ports: Sequence[PortMap]) -> tuple[PortMap, ...]:
    """``ports`` with a host port picked for each written as 0."""
    return tuple(
        p if p.host_port else dataclasses.replace(p, host_port=free_port(p.host_ip)) for p in ports
    )


def ruleset(
    policy: Egress,
    ports: Sequence[PortMap] = (),
    *,
    inner_if: str = ROUTER_IF,
    uplink_if: str = UPLINK_IF,
) -> str:
    """The router's nftables table: from the sandbox, only the allow-list
    (and DNS to pasta's forwarder when asked) goes out, masqueraded; what
    else it sends is refused (TCP reset, ICMP for the rest) so a denied
    connection fails at once instead of hanging; nothing reaches the
    router itself."""
    allow = []
    for net, lo, hi in _v4_networks(policy):
        span = str(lo) if lo == hi else f"{lo}-{hi}"
        allow.append(
            f'iifname "{inner_if}" ip daddr {net} meta l4proto {{ tcp, udp }} '
            f"th dport {span} accept"
        )
    if policy.dns:
        allow.append(
            f'iifname "{inner_if}" ip daddr {DNS_ADDRESS} meta l4proto {{ tcp, udp }} '
            "th dport 53 accept"
        )
    rules = "\n    ".join(allow)
    # Published ports: pasta (-t) brings a host connection into the router
    # namespace, spliced to its loopback when the client is local, or over
    # its tap otherwise; both are sent on to the sandbox's address, from
    # the gateway's (so the sandbox answers through the router).
    guest = GUEST_ADDRESS.split("/")[0]
    dnat_out, dnat_in = [], []
    for p in ports:
        dnat_out.append(f"ip daddr 127.0.0.1 tcp dport {p.port} dnat ip to {guest}:{p.port}")
        dnat_in.append(f'iifname "{uplink_if}" tcp dport {p.port} dnat ip to {guest}:{p.port}')
    nat = ""
    if ports:
        nat = f"""
  chain output_nat {{
    type nat hook output priority -100; policy accept;
    {chr(10).join("    " + r for r in dnat_out).strip()}
  }}
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    {chr(10).join("    " + r for r in dnat_in).strip()}
  }}"""
        rules += f'\n    oifname "{inner_if}" ct status dnat accept'
    return f"""table inet {NFT_TABLE} {{{nat}
  chain forward {{
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    ct state invalid drop
    {rules}
    iifname "{inner_if}" meta l4proto tcp reject with tcp reset
    iifname "{inner_if}" reject with icmpx type admin-prohibited
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "{inner_if}" ct state established,related accept
    iifname "{inner_if}" meta l4proto tcp reject with tcp reset
    iifname "{inner_if}" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    oifname "{uplink_if}" masquerade
    oifname "{inner_if}" ct status dnat snat ip to {GATEWAY_ADDRESS}
  }}
}}
"""


# ---- records -----------------------------------------------------------------
def _record_path(sandbox_id: str) -> Path:
    return records_dir() / f"{sandbox_id}.json"


def _write_record(sandbox_id: str, record: dict[str, Any]) -> None:
    d = records_dir()
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{sandbox_id}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, _record_path(sandbox_id))


def _read_record(sandbox_id: str) -> dict[str, Any] | None:
    try:
        data = json.loads(_record_path(sandbox_id).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _stop_pasta(pid: int | None, start: str | None) -> bool:
    """SIGKILL pasta only if ``pid`` still names the process we started
    (same start time); True if it was ours and is gone now."""
    if not pid or not start or start_time(pid) != start:
        return False
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        if start_time(pid) != start:  # the PID moved on before we pinned it
            return False
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)
    return True


def _del_netns(name: str) -> bool:
    """``ip netns del``; True if it existed and is gone."""
    if not (NETNS_DIR / name).exists():
        return False
    run([_ip(), "netns", "del", name], check=False, timeout_s=10)
    return not (NETNS_DIR / name).exists()


class Gateway:
    """One sandbox's way out: its namespaces, link, filter and uplink.

    ``create`` makes it; ``close`` removes all of it (idempotent); a
    gateway made by another process is taken back with ``attach``.
    """

    def __init__(self, sandbox_id: str, policy: Egress, kind: Kind, record: dict[str, Any]) -> None:
        self.sandbox_id = sandbox_id
        self.policy = policy
        self.kind: Kind = kind
        self.router_netns = ROUTER_PREFIX + sandbox_id
        self.sandbox_netns: str | None = SANDBOX_PREFIX + sandbox_id if kind == "veth" else None
        self.guest_address = GUEST_ADDRESS
        self.gateway_address = GATEWAY_ADDRESS
        self.dns_address: str | None = DNS_ADDRESS if policy.dns else None
        self._record = record
        self._closed = False
        #: published ports, each with its host port (picked when it was 0)
        self.published: tuple[PortMap, ...] = ()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []

    @property
    def netns_path(self) -> str:
        """The sandbox's network namespace (veth): what the OCI config joins."""
        if self.sandbox_netns is None:
            raise HostError(f"gateway {self.sandbox_id} is a tap: it has no sandbox namespace")
        return str(NETNS_DIR / self.sandbox_netns)

    def bind_netns(self, target: Path) -> str:
        """Bind the sandbox's network namespace onto ``target`` too, and
        return that path. The runtime may run in a mount namespace of its
        own (crun on hybrid-cgroup hosts) where /run/netns is not shared but
        the sandboxes directory is: a bind there is seen by the runtime, and
        goes when the sandbox's mounts are unmounted."""
        target.touch(0o600)
        src = self.netns_path.encode()
        if _libc.mount(src, str(target).encode(), None, _MS_BIND, None) != 0:
            e = ctypes.get_errno()
            raise HostError(f"cannot bind {self.netns_path} to {target}: {os.strerror(e)}")
        return str(target)

    @property
    def router_path(self) -> Path:
        return NETNS_DIR / self.router_netns

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "policy": self.policy.to_dict()}

    @classmethod
    def attach(cls, sandbox_id: str, state: dict[str, Any]) -> Gateway:
        record = _read_record(sandbox_id) or {}
        return cls(sandbox_id, Egress.from_dict(state["policy"]), state["kind"], record)

    @classmethod
    def create(
        cls,
        sandbox_id: str,
        policy: Egress,
        *,
        kind: Kind = "veth",
        tap_uid: int | None = None,
        tap_gid: int | None = None,
        ports: Sequence[PortMap] = (),
    ) -> Gateway:
        """Make the gateway for ``sandbox_id`` whose ways out are ``policy``'s
        pinned allow-list, ready to carry traffic. Everything made is undone
        if any step fails."""
        gw = cls.start(sandbox_id, policy, kind=kind, tap_uid=tap_uid, tap_gid=tap_gid, ports=ports)
        try:
            gw.ready()
        except BaseException:
            gw.close()
            raise
        return gw

    @classmethod
    def start(
        cls,
        sandbox_id: str,
        policy: Egress,
        *,
        kind: Kind = "veth",
        tap_uid: int | None = None,
        tap_gid: int | None = None,
        ports: Sequence[PortMap] = (),
    ) -> Gateway:
        """``create`` in two halves, so a runtime can start meanwhile: on
        return the namespaces exist (what a runtime joining the sandbox's
        needs); the link, the filter, forwarding and pasta are being made by
        two threads, and ``ready`` waits for them. Until then nothing is forwarded:
        ``ip_forward`` is set only once the filter is loaded."""
        _check_id(sandbox_id)
        if kind not in ("veth", "tap"):
            raise SpecError(f"gateway kind {kind!r}: use veth or tap")
        published = pick_host_ports(ports)
        rules = ruleset(policy, published)  # a bad policy fails before anything is made
        ip, nft, pasta = _ip(), _nft(), _pasta()
        pid = os.getpid()
        record: dict[str, Any] = {
            "kind": kind,
            "creator": [pid, start_time(pid)],
            "netns": [ROUTER_PREFIX + sandbox_id]
            + ([SANDBOX_PREFIX + sandbox_id] if kind == "veth" else []),
        }
        _write_record(sandbox_id, record)  # before anything exists: gc can find it all
        gw = cls(sandbox_id, policy, kind, record)
        gw.published = published
        try:
            gw._link(ip, tap_uid, tap_gid)
            gw._spawn(gw._background, ip, nft, rules, pasta)
        except BaseException:
            gw.close()
            raise
        return gw

    def _spawn(self, fn: Callable[..., None], *args: Any) -> None:
        def body() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # raised again by ready()
                self._errors.append(exc)

        t = threading.Thread(target=body, name=f"gateway {self.sandbox_id}")
        t.start()
        self._threads.append(t)

    def ready(self) -> None:
        """Wait until the gateway carries traffic; raise what went wrong."""
        while self._threads:
            self._threads.pop().join()
        if self._errors:
            raise self._errors[0]

    @property
    def _what(self) -> str:
        return f"network gateway of sandbox {self.sandbox_id}"

    def _link(self, ip: str, tap_uid: int | None, tap_gid: int | None) -> None:
        """The namespaces (one ``ip`` for both); for a tap, the tap too."""
        r, s = self.router_netns, self.sandbox_netns
        names = [r] if s is None else [r, s]
        self._batch(ip, None, [f"netns add {n}" for n in names])
        if s is None:
            owner = []
            if tap_uid is not None:
                owner += ["user", str(tap_uid)]
            if tap_gid is not None:
                owner += ["group", str(tap_gid)]
            tap = " ".join(["tuntap add dev", ROUTER_IF, "mode tap vnet_hdr", *owner])
            self._batch(ip, r, [tap])

    def _batch(self, ip: str, netns: str | None, lines: list[str]) -> None:
        argv = [ip, *(["-n", netns] if netns else []), "-batch", "-"]
        run(
            argv, input="\n".join(lines).encode(), timeout_s=10, message=f"cannot make {self._what}"
        )

    def _router_side(self, ip: str, nft: str, rules: str) -> None:
        """The veth; then from a thread inside the router namespace (so
        ``ip``, ``nft`` and the sysctl all act there): the gateway address,
        the filter, and only then forwarding (that namespace's own
        ``ip_forward``)."""

        s = self.sandbox_netns
        if s is not None:  # the veth, its sandbox end configured there
            self._batch(
                ip,
                s,
                [
                    f"link add {SANDBOX_IF} type veth peer name {ROUTER_IF} "
                    f"netns {self.router_netns}",
                    f"addr add {GUEST_ADDRESS} dev {SANDBOX_IF}",
                    f"link set {SANDBOX_IF} up",
                    "link set lo up",
                    f"route add default via {GATEWAY_ADDRESS} dev {SANDBOX_IF} onlink",
                ],
            )

        def inside() -> None:
            self._batch(
                ip,
                None,
                [
                    f"addr add {_GATEWAY_CIDR} dev {ROUTER_IF}",
                    f"link set {ROUTER_IF} up",
                    "link set lo up",
                ],
            )
            run(
                [nft, "-f", "-"],
                input=rules.encode(),
                timeout_s=10,
                message=f"cannot load the nftables rules of {self._what}",
            )
            if self.published:  # pasta's spliced connections come from 127.0.0.1
                with open("/proc/sys/net/ipv4/conf/all/route_localnet", "w") as f:
                    f.write("1")
            with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
                f.write("1")

        try:
            in_netns(self.router_path, inside)
        except OSError as exc:
            raise HostError(f"cannot set up the router of {self._what}: {exc}") from exc

    def _background(self, ip: str, nft: str, rules: str, pasta: str) -> None:
        """pasta starting (its own process) while the link and filter are
        made; then wait for pasta, whatever happened, so its pid is recorded
        before anyone removes the gateway. One thread: each one more costs
        its start on the create path."""
        proc, pid_file = self._start_pasta(pasta)
        try:
            self._router_side(ip, nft, rules)
        finally:
            self._wait_pasta(proc, pid_file)

    def _start_pasta(self, pasta: str) -> tuple[subprocess.Popen[bytes], Path]:
        """pasta on the router netns: it copies the host's address and
        default route onto its tap there and turns what leaves through it
        into host sockets. ``--runas 0``: as root with no other user given
        pasta switches to nobody and then cannot enter a namespace owned by
        the host's user namespace; it still drops every capability once set
        up. ``--no-map-gw``: the gateway address is not the host's loopback.
        No port is forwarded in either direction."""
        pid_file = records_dir() / f".{self.sandbox_id}.pasta.pid"
        pid_file.unlink(missing_ok=True)
        argv = [
            pasta,
            "--quiet",
            "--netns",
            str(self.router_path),
            "--runas",
            "0",
            "--config-net",
            "--ns-ifname",
            UPLINK_IF,
            "--no-map-gw",
            "-u", "none", "-T", "none", "-U", "none",
            "--pid",
            str(pid_file),
        ]  # fmt: skip
        # inward TCP: only the published ports, each on its host address
        for p in self.published:
            argv += ["-t", f"{p.host_ip}/{p.host_port}:{p.port}"]
        if not self.published:
            argv += ["-t", "none"]
        if self.dns_address is not None:
            argv += ["--dns-forward", self.dns_address]
        proc = spawn(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            message=f"cannot start pasta for {self._what}",
        )
        return proc, pid_file

    def _wait_pasta(self, proc: subprocess.Popen[bytes], pid_file: Path) -> None:
        """pasta forks to the background once set up: its first process
        exits then, having written the daemon's pid."""
        try:
            wait_forked(proc, f"pasta for {self._what}", timeout_s=10)
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError) as exc:
                raise HostError(f"pasta for {self._what} wrote no pid: {exc}") from exc
        finally:
            pid_file.unlink(missing_ok=True)
        self._record["pasta"] = [pid, start_time(pid)]
        _write_record(self.sandbox_id, self._record)

    def record_helper(self, name: str, pid: int) -> None:
        """Name one more process of this gateway in its record (``name`` in
        :data:`HELPERS`), pinned by its start time, so ``close`` and ``reap``
        stop it with the rest."""
        if name not in HELPERS:
            raise HostError(f"unknown gateway helper {name!r}")
        self._record[name] = [pid, start_time(pid)]
        _write_record(self.sandbox_id, self._record)

    def open_tap(self) -> int:
        """A new fd on the tap device (kind="tap") for the VMM to inherit
        (``-netdev tap,fd=N,vhost=off``); it is O_CLOEXEC: the caller clears
        that on the copy it passes. Opened from inside the router netns,
        where the device lives."""
        if self.kind != "tap":
            raise HostError(f"gateway {self.sandbox_id} is a veth: it has no tap to open")
        try:
            return in_netns(self.router_path, lambda: _open_tap(ROUTER_IF))
        except OSError as exc:
            raise HostError(f"cannot open the tap of sandbox {self.sandbox_id}: {exc}") from exc

    def counters(self) -> tuple[int, int]:
        """(tx, rx) bytes as the sandbox sees them: what the router side of
        its link received and sent. (0, 0) once the gateway is gone."""
        proc = run(
            [_ip(), "-n", self.router_netns, "-j", "-s", "link", "show", ROUTER_IF],
            check=False,
            timeout_s=10,
        )
        if proc.returncode != 0:
            return 0, 0
        try:
            stats = json.loads(proc.stdout)[0]["stats64"]
            return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])
        except (ValueError, LookupError, TypeError):
            return 0, 0

    def close(self) -> None:
        """Stop pasta, delete both namespaces (the link and the rules go with
        them), forget the record. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.ready()  # what is being made is made before it is removed
        remove(self.sandbox_id, self._record or _read_record(self.sandbox_id) or {})

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: helper processes a record may name (``[pid, start time]``): pasta, the
#: uplink; passt, a VM's NIC inside the sandbox netns (tiers/vm/network.py)
HELPERS = ("pasta", "passt")


def remove(sandbox_id: str, record: dict[str, Any]) -> list[str]:
    """Undo what ``record`` says was made for ``sandbox_id``; a line per thing removed."""
    removed = []
    for helper in HELPERS:
        proc = record.get(helper) or [None, None]
        if _stop_pasta(proc[0], proc[1]):
            removed.append(f"{helper} process {proc[0]} of sandbox {sandbox_id}")
    names = record.get("netns") or []
    for name in names:
        if name in (ROUTER_PREFIX + sandbox_id, SANDBOX_PREFIX + sandbox_id) and _del_netns(name):
            removed.append(f"network namespace {name}")
    left = [n for n in names if (NETNS_DIR / n).exists()]
    if not left:
        _record_path(sandbox_id).unlink(missing_ok=True)
    return removed


def remove_recorded(sandbox_id: str) -> list[str]:
    """Remove the gateway a record names for ``sandbox_id`` (none: nothing)."""
    record = _read_record(sandbox_id)
    return remove(sandbox_id, record) if record is not None else []


def recorded() -> list[str]:
    """Sandbox ids with a gateway record."""
    d = records_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json") if _ID.fullmatch(p.stem))


def namespaces() -> list[str]:
    """Network namespaces with a tierbox gateway prefix (made by any tierbox)."""
    try:
        names = os.listdir(NETNS_DIR)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith((SANDBOX_PREFIX, ROUTER_PREFIX)))


def wait_forked(proc: subprocess.Popen[bytes], what: str, *, timeout_s: float) -> None:
    """Wait for a program that goes to the background once set up (pasta,
    passt): its first process exits then; a failure or a hang is raised
    with its stderr."""
    try:
        _out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
        raise exit_error(proc, message=f"{what} was not up in {timeout_s:g} s", log=err) from None
    if proc.returncode != 0:
        raise exit_error(proc, message=f"cannot start {what}", log=err)


def reap(live: Iterable[str]) -> list[str]:
    """Remove gateways of sandboxes that are not live: only what a record
    of ours names (a namespace with our prefix and no record was not made
    by this tierbox, and stays), and pasta only while its recorded start
    time still matches. A record younger than CREATE_GRACE_S whose creator
    still runs is being made right now, and is left alone."""
    removed: list[str] = []
    alive = live if isinstance(live, set) else set(live)
    for sandbox_id in recorded():
        if sandbox_id in alive:
            continue
        record = _read_record(sandbox_id)
        if record is None or _creating(sandbox_id, record.get("creator")):
            continue
        removed += remove(sandbox_id, record)
    return removed


#: how long a creator that still runs may take to make its sandbox
CREATE_GRACE_S = 60.0


def _creating(sandbox_id: str, creator: object) -> bool:
    try:
        pid, start = int(creator[0]), str(creator[1])  # type: ignore[index]
        age_s = time.time() - _record_path(sandbox_id).stat().st_mtime
    except (ValueError, IndexError, TypeError, KeyError, OSError):
        return False
    return bool(start) and start_time(pid) == start and age_s < CREATE_GRACE_S


def check_tools() -> str | None:
    """Why gateways cannot be made here, or None."""
    try:
        _ip(), _nft(), _pasta()
    except HostError as exc:
        return str(exc)
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing: pasta needs it (modprobe tun)"
    return None
