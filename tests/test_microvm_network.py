"""The microVM tier's egress network with real QEMU guests (TCG here) and
real gateways (router namespace, tap, nftables, pasta), no mocks.

Every server the guests talk to lives in the network namespace that
tests/test_network.py's ``testnet`` fixture makes (198.18.0.0/15 addresses,
reached from the host through a veth pair deleted with it); no test traffic
goes anywhere else.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from functools import partial

import pytest

from tests import test_network
from tests.conftest import wait_until
from tests.test_network import Lab, _gateway_leftovers
from tierbox.errors import NotSupportedError, SpecError
from tierbox.host import netgw
from tierbox.network import AllowRule, Egress, NetworkPolicy, PortMap, parse_allow
from tierbox.paths import sandboxes_dir
from tierbox.spec import Limits, SandboxSpec
from tierbox.tiers import _state, get_tier
from tierbox.tiers.microvm import MicroVMInstance, MicroVMTier
from tierbox.vmm import artifacts, qemu

pytestmark = pytest.mark.timeout(300)

#: the container tests' servers, in a namespace of their own (one scheme for all tiers)
testnet = test_network.testnet

#: an allow-list name the guest resolves from its /etc/hosts alone
NAME = "web.tierbox.test"
#: a refused or dropped connection must end within this (issue 16)
DENIED_WITHIN_S = 2.0


@pytest.fixture(scope="module")
def tier() -> MicroVMTier:
    if qemu.qemu_path() is None:
        pytest.skip("qemu-system-x86_64 is not installed (make setup)")
    if artifacts.load_kernel() is None:
        pytest.skip("microVM guest kernel not built (make setup)")
    why = netgw.check_tools()
    if why is not None:
        pytest.skip(f"network gateways cannot be made here: {why}")
    t = get_tier("microvm")
    assert isinstance(t, MicroVMTier)
    assert t.available().available
    return t


def _spec(network: NetworkPolicy | Egress) -> SandboxSpec:
    return SandboxSpec(limits=Limits(memory_mib=128, pids=64, timeout_s=30.0), network=network)


def _create(tier: MicroVMTier, network: NetworkPolicy | Egress) -> MicroVMInstance:
    vm = tier.create(_spec(network))
    assert isinstance(vm, MicroVMInstance)
    return vm


def _get(vm: MicroVMInstance, addr: str, port: int) -> tuple[bool, bytes, float]:
    """(answered 200, what the client said, seconds) of one HTTP GET from
    inside the guest: busybox wget under ``timeout 3`` (its own -T crashes,
    and nc half-closes, which pasta does not always finish)."""
    argv = ["timeout", "3", "wget", "-q", "-O", "/tmp/page", f"http://{addr}:{port}/"]
    t0 = time.monotonic()
    r = vm.exec(argv, timeout_s=20)
    took_s = time.monotonic() - t0
    if not r.ok:
        return False, r.stdout + r.stderr, took_s
    page = vm.exec(["cat", "/tmp/page"]).stdout
    return b"Directory listing" in page, page, took_s


def test_egress_reaches_the_allow_list_and_nothing_else(tier: MicroVMTier, testnet: Lab) -> None:
    allow = f"{testnet.allowed_ip}:{testnet.port}"
    # a name, pinned here to the allowed server (nothing resolves it on this host)
    by_name = AllowRule(
        f"{NAME}:{testnet.port}", NAME, testnet.port, testnet.port, (f"{testnet.allowed_ip}/32",)
    )
    vm = _create(tier, Egress(allow=(allow, by_name.text), rules=(parse_allow(allow), by_name)))
    try:
        r = vm.exec(["ip", "-o", "-4", "addr", "show", "dev", "eth0"])
        assert r.ok and b"10.200.0.2/30" in r.stdout, r.stdout + r.stderr
        ok, out, _ = _get(vm, testnet.allowed_ip, testnet.port)
        assert ok, out
        ok, out, _ = _get(vm, NAME, testnet.port)  # through the guest's /etc/hosts
        assert ok, out
        for addr, port in (
            (testnet.allowed_ip, testnet.other_port),  # the allowed server, another port
            (testnet.denied_ip, testnet.port),  # another server, the allowed port
            (testnet.host_ip, testnet.port),  # the host's side of the test's link
            ("169.254.169.254", 80),  # link-local metadata
            (netgw.GATEWAY_ADDRESS, testnet.port),  # the router itself
        ):
            ok, out, took_s = _get(vm, addr, port)
            assert not ok, f"{addr}:{port} answered: {out!r}"
            assert took_s < DENIED_WITHIN_S, f"{addr}:{port} took {took_s:.2f} s to fail"
        st = vm.stats()
        assert st.net_tx_bytes and st.net_rx_bytes, st
        assert st.net_rx_bytes > 100  # at least the HTTP answer came in
    finally:
        vm.close()
    assert _gateway_leftovers({vm.id}) == []


def test_network_none_is_loopback_only_and_loads_no_driver(tier: MicroVMTier) -> None:
    vm = _create(tier, NetworkPolicy.NONE)
    try:
        r = vm.exec(["ls", "/sys/class/net"])
        assert r.ok and r.stdout.split() == [b"lo"], r.stdout
        r = vm.exec(["cat", "/proc/modules"])
        assert r.ok and b"virtio_net" not in r.stdout
        assert not any(a.startswith("tap") for a in vm.proc.argv)
        assert vm.gateway is None and vm.stats().net_tx_bytes is None
    finally:
        vm.close()


@pytest.mark.slow
def test_clones_get_their_own_gateway(tier: MicroVMTier, testnet: Lab) -> None:
    vm = _create(tier, Egress(allow=(f"{testnet.allowed_ip}:{testnet.port}",), dns=True))
    # dns=True: the guest asks the gateway's forwarder, the one resolver it can reach
    conf = vm.exec(["cat", "/etc/resolv.conf"]).stdout
    assert conf == f"nameserver {netgw.DNS_ADDRESS}\n".encode(), conf
    snap = vm.snapshot()
    clones: list[MicroVMInstance] = []
    try:
        clones = tier.clone(snap, count=2)
        routers = {c.gateway.router_netns for c in clones if c.gateway is not None}
        assert len(routers) == 2 and vm.gateway is not None
        assert vm.gateway.router_netns not in routers
        vm.close()  # the source's gateway goes; the clones keep theirs
        for c in clones:
            ok, out, _ = _get(c, testnet.allowed_ip, testnet.port)
            assert ok, out
            ok, out, took_s = _get(c, testnet.denied_ip, testnet.port)
            assert not ok and took_s < DENIED_WITHIN_S, out
        clones[0].close()
        ok, out, _ = _get(clones[1], testnet.allowed_ip, testnet.port)
        assert ok, out
    finally:
        for c in [vm, *clones]:
            c.close()
        shutil.rmtree(snap.path, ignore_errors=True)
    for c in [vm, *clones]:
        assert _gateway_leftovers({c.id}) == []


@pytest.mark.slow
def test_reap_removes_the_gateway_of_a_crashed_owner(tier: MicroVMTier) -> None:
    code = (
        "import time\n"
        "from tierbox.network import Egress\n"
        "from tierbox.spec import Limits, SandboxSpec\n"
        "from tierbox.tiers import get_tier\n"
        "spec = SandboxSpec(limits=Limits(memory_mib=128), "
        "network=Egress(allow=('198.18.0.9:80',)))\n"
        "print(get_tier('microvm').create(spec).id, flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert owner.stdout is not None
    sandbox_id = owner.stdout.readline().decode().strip()
    owner.kill()  # the owner crashes; its QEMU and gateway stay behind
    owner.wait()
    assert sandbox_id and _gateway_leftovers({sandbox_id}), sandbox_id
    removed = tier.reap(_state.live_ids())
    assert any(f"{netgw.ROUTER_PREFIX}{sandbox_id}" in line for line in removed), removed
    assert _gateway_leftovers({sandbox_id}) == []
    assert sandbox_id not in qemu.find_marked_qemus(sandboxes_dir())


def _answers(url: str, got: list[bytes]) -> bool:
    try:
        got.append(urllib.request.urlopen(url, timeout=5).read())
    except OSError:
        return False
    return True


def test_published_ports_answer_on_host_loopback(tier: MicroVMTier) -> None:
    """pasta listens on the host's loopback, the router sends the connection
    on over the tap to the guest's server."""
    ports = (PortMap(8000), PortMap(8001))
    vm = tier.create(
        SandboxSpec(limits=Limits(memory_mib=128, pids=64), network=Egress(), ports=ports)
    )
    assert isinstance(vm, MicroVMInstance)
    try:
        assert all(p.host_ip == "127.0.0.1" and p.host_port > 0 for p in vm.spec.ports)
        assert vm.gateway is not None and vm.gateway.published == vm.spec.ports
        vm.put_file("/tmp/www/index.html", b"hello from microvm\n")
        servers = [
            vm.start(["httpd", "-f", "-p", str(p.port), "-h", "/tmp/www"], timeout_s=120)
            for p in vm.spec.ports
        ]
        try:
            for p in vm.spec.ports:
                url = f"http://127.0.0.1:{p.host_port}/"
                got: list[bytes] = []
                wait_until(partial(_answers, url, got), timeout_s=20, what=f"{url} to answer")
                assert got[-1] == b"hello from microvm\n"
        finally:
            for server in servers:
                server.kill()
    finally:
        vm.close()
    assert _gateway_leftovers({vm.id}) == []


@pytest.mark.slow
def test_clones_publish_on_host_ports_of_their_own(tier: MicroVMTier) -> None:
    spec = SandboxSpec(
        limits=Limits(memory_mib=128, pids=64), network=Egress(), ports=(PortMap(8000),)
    )
    vm = tier.create(spec)
    assert isinstance(vm, MicroVMInstance)
    snap = vm.snapshot()
    clones: list[MicroVMInstance] = []
    try:
        clones = tier.clone(snap, count=2)
        used = {vm.spec.ports[0].host_port, *(c.spec.ports[0].host_port for c in clones)}
        assert len(used) == 3, used
        for i, c in enumerate(clones):
            c.put_file("/tmp/www/index.html", f"clone {i}\n".encode())
            c.start(["httpd", "-f", "-p", "8000", "-h", "/tmp/www"], timeout_s=120)
        for i, c in enumerate(clones):
            url = f"http://127.0.0.1:{c.spec.ports[0].host_port}/"
            got: list[bytes] = []
            wait_until(partial(_answers, url, got), timeout_s=20, what=f"{url} to answer")
            assert got[-1] == f"clone {i}\n".encode()
    finally:
        for c in [vm, *clones]:
            c.close()
        shutil.rmtree(snap.path, ignore_errors=True)
    for c in [vm, *clones]:
        assert _gateway_leftovers({c.id}) == []


@pytest.mark.parametrize("network", ["none", "host"])
def test_published_ports_need_egress(tier: MicroVMTier, network: str) -> None:
    spec = SandboxSpec(network=NetworkPolicy(network), ports=(PortMap(8000),))
    with pytest.raises((SpecError, NotSupportedError)):
        tier.create(spec)
