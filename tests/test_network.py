"""Egress networking on the container and gVisor tiers, with real engines.

Every server and every denied destination lives in a network namespace this
test makes itself (``tbt-<random>``, 198.18.0.0/15 addresses), reached from
the host side of a veth whose other end is in that namespace: pasta's host
sockets reach it through that link's connected route, which goes with the
link when the namespace is deleted (and the link is deleted in a finally).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import TIERBOX, require_image, require_tier, wait_until
from tierbox import Sandbox
from tierbox.errors import SpecError
from tierbox.host import netgw
from tierbox.network import AllowRule, Egress

TIERS = ["container", "gvisor"]


@dataclass
class Lab:
    netns: str
    host_if: str
    host_ip: str
    allowed_ip: str
    denied_ip: str
    port: int = 8080
    other_port: int = 8081


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _free_subnet() -> int:
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for _ in range(50):
        n = secrets.randbelow(150) + 100
        if f"198.18.{n}." not in routes:
            return n
    raise AssertionError("no free 198.18.x.0/24 for the test network")


@pytest.fixture(scope="module")
def testnet() -> Iterator[Lab]:
    tag = secrets.token_hex(3)
    n = _free_subnet()
    net = Lab(f"tbt-{tag}", f"tbt{tag}h", f"198.18.{n}.1", f"198.18.{n}.2", f"198.18.{n}.3")
    servers: list[subprocess.Popen[bytes]] = []
    try:
        _ip("netns", "add", net.netns)
        _ip("link", "add", net.host_if, "type", "veth", "peer", "name", "eth0", "netns", net.netns)
        _ip("addr", "add", f"{net.host_ip}/24", "dev", net.host_if)
        _ip("link", "set", net.host_if, "up")
        for addr in (net.allowed_ip, net.denied_ip):
            _ip("-n", net.netns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", net.netns, "link", "set", "eth0", "up")
        _ip("-n", net.netns, "link", "set", "lo", "up")
        for addr, port in (
            (net.allowed_ip, net.port),
            (net.allowed_ip, net.other_port),
            (net.denied_ip, net.port),
        ):
            servers.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", net.netns, sys.executable, "-m", "http.server",
                     "--bind", addr, str(port)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd="/",
                )
            )  # fmt: skip

        def listening() -> bool:
            out = subprocess.run(
                ["ip", "netns", "exec", net.netns, "ss", "-ltnH"], capture_output=True, text=True
            ).stdout
            return out.count("\n") >= 3

        wait_until(listening, what="the test's HTTP servers")
        yield net
    finally:
        for s in servers:
            s.kill()
            s.wait()
        subprocess.run(["ip", "link", "del", net.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", net.netns], capture_output=True)


def _gateway_leftovers(ids: set[str]) -> list[str]:
    """Namespaces, records and pasta processes of these sandboxes."""
    left = [n for n in netgw.namespaces() if n[4:] in ids]
    left += [f"record {i}" for i in netgw.recorded() if i in ids]
    procs = subprocess.run(["pgrep", "-af", "pasta"], capture_output=True, text=True).stdout
    left += [line for line in procs.splitlines() if any(f"-{i}" in line for i in ids)]
    return left


def _host_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout


def _host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def _get(sb: Sandbox, ip: str, port: int) -> tuple[bool, float]:
    """(answered 200, seconds taken) for an HTTP request from inside. nc, not
    wget: busybox's wget fails on gVisor's host sockets (EAGAIN on read);
    head ends it once the status line is in (busybox nc waits on past EOF)."""
    script = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc {ip} {port} | head -c 15"
    started = time.monotonic()
    r = sb.run(["sh", "-c", script], timeout_s=2)
    return b"200 OK" in r.stdout, time.monotonic() - started


@pytest.fixture(scope="module", params=TIERS)
def egress_sb(request: pytest.FixtureRequest, testnet: Lab) -> Iterator[Sandbox]:
    require_tier(request.param)
    require_image("busybox")
    allow = [f"{testnet.allowed_ip}:{testnet.port}"]
    with Sandbox.create("busybox", tier=request.param, network=Egress(allow=tuple(allow))) as sb:
        yield sb


def test_allowed_server_answers(egress_sb: Sandbox, testnet: Lab) -> None:
    ok, _ = _get(egress_sb, testnet.allowed_ip, testnet.port)
    assert ok
    st = egress_sb.stats()
    assert st.net_tx_bytes and st.net_rx_bytes and st.net_rx_bytes > 100, st


@pytest.mark.parametrize(
    "where",
    ["other port", "other address", "host side", "metadata", "gateway"],
)
def test_denied_destinations_fail_fast(egress_sb: Sandbox, testnet: Lab, where: str) -> None:
    ip, port = {
        "other port": (testnet.allowed_ip, testnet.other_port),
        "other address": (testnet.denied_ip, testnet.port),
        "host side": (testnet.host_ip, testnet.port),
        "metadata": ("169.254.169.254", 80),
        "gateway": (netgw.GATEWAY_ADDRESS, 22),
    }[where]
    ok, took_s = _get(egress_sb, ip, port)
    assert not ok
    assert took_s < 2.5, f"{where}: {took_s:.2f} s"


@pytest.mark.parametrize("tier", TIERS)
def test_pinned_name_is_reached_through_hosts_file(tier: str, testnet: Lab) -> None:
    """A name pinned at create (here pinned already, so no resolver is
    asked) answers by name inside; with dns=True resolv.conf names the
    gateway's forwarder."""
    require_tier(tier)
    require_image("busybox")
    rule = AllowRule(
        "svc.test:8080", "svc.test", testnet.port, testnet.port, (f"{testnet.allowed_ip}/32",)
    )
    egress = Egress(allow=("svc.test:8080",), dns=True, rules=(rule,))
    with Sandbox.create("busybox", tier=tier, network=egress) as sb:
        assert f"{testnet.allowed_ip}\tsvc.test".encode() in sb.run(["cat", "/etc/hosts"]).stdout
        resolv = sb.run(["cat", "/etc/resolv.conf"]).stdout
        assert f"nameserver {netgw.DNS_ADDRESS}".encode() in resolv
        ok, _ = _get(sb, "svc.test", testnet.port)
        assert ok


@pytest.mark.parametrize("tier", TIERS)
def test_network_none_is_loopback_only(tier: str) -> None:
    require_tier(tier)
    require_image("busybox")
    with Sandbox.create("busybox", tier=tier) as sb:
        links = sb.run(["cat", "/proc/net/dev"]).stdout.decode()
        names = {line.split(":")[0].strip() for line in links.splitlines()[2:] if ":" in line}
        assert names == {"lo"}, links
        st = sb.stats()
        assert (st.net_tx_bytes, st.net_rx_bytes) == (0, 0)


@pytest.mark.parametrize("tier", TIERS)
def test_two_sandboxes_cannot_reach_each_other(tier: str, testnet: Lab) -> None:
    require_tier(tier)
    require_image("busybox")
    allow = ["10.200.0.0/16:9000", f"{testnet.allowed_ip}:{testnet.port}"]
    with (
        Sandbox.create("busybox", tier=tier, network=Egress(allow=tuple(allow))) as a,
        Sandbox.create("busybox", tier=tier, network=Egress(allow=tuple(allow))) as b,
    ):
        listener = a.run(["nc", "-l", "-p", "9000"], background=True)
        try:
            # nothing of b's reaches a's listener: not its address, nor
            # through the gateway or the host (nc -l would have exited)
            for ip in ("10.200.0.2", netgw.GATEWAY_ADDRESS, testnet.host_ip):
                r = b.run(["sh", "-c", f"echo hi | nc {ip} 9000"], timeout_s=2)
                assert not r.ok, (ip, r)
            assert not listener.done
        finally:
            listener.kill()


def test_bad_allow_entries_fail_before_anything_starts() -> None:
    require_tier("container")
    before = (netgw.namespaces(), netgw.recorded())
    bad_entries = (
        ["nope"],
        ["198.18.0.1:70000"],
        ["198.18.0.1:0"],
        ["198.18.0.1/33:80"],
        ["198.18.0.1:90-80"],
        ["[2001:db8::1]:443"],  # the sandbox link is IPv4 only
    )
    for bad in bad_entries:
        with pytest.raises(SpecError):
            Sandbox.create("busybox", tier="container", network=Egress(allow=tuple(bad)))
    assert (netgw.namespaces(), netgw.recorded()) == before


@pytest.mark.slow
def test_fifty_cycles_leave_nothing(testnet: Lab) -> None:
    require_tier("container")
    require_image("busybox")
    tables = _host_tables()
    links = _host_links()
    ids = set()
    allow = [f"{testnet.allowed_ip}:{testnet.port}"]
    for _ in range(50):
        with Sandbox.create("busybox", tier="container", network=Egress(allow=tuple(allow))) as sb:
            ids.add(sb.id)
    wait_until(lambda: not _gateway_leftovers(ids), timeout_s=5, what="gateways to go")
    assert _host_tables() == tables
    assert _host_links() - links == set()


_MID_CREATE = """
import os, sys, time
from tierbox import Sandbox
from tierbox.network import AllowRule, Egress
from tierbox.tiers import oci_runtime

def stop(self, spec, cg, cgroups_path, d, cid, pid_file):
    print(d.name, flush=True)
    time.sleep(3600)

oci_runtime.OciTier._start_detached = stop
Sandbox.create("busybox", tier="container", network=Egress(allow=(sys.argv[1],)))
"""


@pytest.mark.slow
def test_kill_mid_create_then_gc_leaves_nothing(testnet: Lab) -> None:
    require_tier("container")
    require_image("busybox")
    proc = subprocess.Popen(
        [sys.executable, "-c", _MID_CREATE, f"{testnet.allowed_ip}:{testnet.port}"],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout is not None
        sandbox_id = proc.stdout.readline().decode().strip()
        assert sandbox_id, "the creator printed no id"
        assert netgw.SANDBOX_PREFIX + sandbox_id in netgw.namespaces()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    out = subprocess.run([*TIERBOX, "gc"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not _gateway_leftovers({sandbox_id}), out.stdout


def test_gc_leaves_namespaces_it_did_not_make() -> None:
    """A namespace with tierbox's prefix but no record of ours stays."""
    name = f"{netgw.ROUTER_PREFIX}{secrets.token_hex(6)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        netgw.reap(set())
        assert name in netgw.namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.mark.parametrize("tier", TIERS)
def test_published_ports_answer_on_host_loopback(tier: str) -> None:
    require_tier(tier)
    require_image("busybox")
    with Sandbox.create("busybox", tier=tier, network=Egress(), ports=["8000", "8001"]) as sb:
        assert all(p.host_ip == "127.0.0.1" and p.host_port > 0 for p in sb.spec.ports)
        sb.put_file("/tmp/www/index.html", f"hello from {tier}\n")
        servers = [
            sb.run(["httpd", "-f", "-p", str(p.port), "-h", "/tmp/www"], background=True)
            for p in sb.spec.ports
        ]
        try:
            for p in sb.spec.ports:
                url = f"http://127.0.0.1:{p.host_port}/"
                got: list[bytes] = []

                def answered(url: str = url, got: list[bytes] = got) -> bool:
                    try:
                        got.append(urllib.request.urlopen(url, timeout=2).read())
                    except OSError:
                        return False
                    return True

                wait_until(answered, timeout_s=10, what=f"{url} to answer")
                assert got[-1] == f"hello from {tier}\n".encode()
        finally:
            for server in servers:
                server.kill()


@pytest.mark.parametrize("network", ["none", "host"])
def test_published_ports_need_egress(network: str) -> None:
    require_tier("container")
    with pytest.raises(SpecError, match="needs network=egress"):
        Sandbox.create("busybox", tier="container", network=network, ports=["8000"])
