"""The vm tier's egress network and published ports with real libvirt
domains (TCG here), real gateways (sandbox and router namespaces, nftables,
pasta) and real passt as the NIC's backend, no mocks.

Every server the guests talk to lives in the network namespace that
tests/test_network.py's ``testnet`` fixture makes (198.18.0.0/15 addresses,
reached from the host through a veth pair deleted with it); no test traffic
goes anywhere else.
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
from pathlib import Path

import pytest

from tests import test_network
from tests.conftest import TIERBOX, cli, require_image, require_tier, wait_until
from tests.test_network import Lab, _gateway_leftovers, _host_links, _host_tables
from tierbox import make_spec
from tierbox.errors import SpecError
from tierbox.host import netgw
from tierbox.network import AllowRule, Egress, NetworkPolicy, PortMap, parse_allow
from tierbox.tiers import get_tier
from tierbox.tiers.vm import VMInstance, VMTier
from tierbox.tiers.vm import network as vm_net

pytestmark = pytest.mark.timeout(600)

#: the container tests' servers, in a namespace of their own (one scheme for all tiers)
testnet = test_network.testnet

IMAGE = "busybox:latest"
#: an allow-list name the guest resolves from its /etc/hosts alone
NAME = "web.tierbox.test"
#: a refused or dropped connection must end within this (issue 16)
DENIED_WITHIN_S = 2.0
#: the client's own limit on a connection (passt leaves a connection the
#: gateway refused unanswered, so a denied one ends by this timeout)
CLIENT_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def tier() -> VMTier:
    require_tier("vm")
    require_image(IMAGE)
    why = netgw.check_tools()
    if why is not None:
        pytest.skip(f"network gateways cannot be made here: {why}")
    t = get_tier("vm")
    assert isinstance(t, VMTier)
    return t


def _create(
    tier: VMTier, network: NetworkPolicy | Egress | str, ports: tuple[PortMap, ...] = ()
) -> VMInstance:
    spec = make_spec(IMAGE, memory_mib=256, timeout_s=60, network=network, ports=ports)
    vm = tier.create(spec)
    assert isinstance(vm, VMInstance)
    return vm


def _get(vm: VMInstance, addr: str, port: int) -> tuple[bool, bytes, float]:
    """(answered 200, what the client said, seconds) of one HTTP GET from
    inside the guest: busybox nc under ``timeout`` (its wget -T crashes),
    ``head`` ending it once the status line is in."""
    script = (
        f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout {CLIENT_TIMEOUT_S} nc {addr} {port} "
        "| head -c 15"
    )
    t0 = time.monotonic()
    r = vm.exec(["sh", "-c", script], timeout_s=20)
    took_s = time.monotonic() - t0
    return b"200 OK" in r.stdout, r.stdout + r.stderr, took_s


def _passt_leftovers(ids: set[str]) -> list[str]:
    """passt processes and socket directories of these VMs."""
    procs = subprocess.run(["pgrep", "-af", "passt"], capture_output=True, text=True).stdout
    left = [line for line in procs.splitlines() if any(f"/{i}.net/" in line for i in ids)]
    left += [str(vm_net.socket_dir(i)) for i in ids if vm_net.socket_dir(i).exists()]
    return left


@pytest.fixture(scope="module")
def egress_vm(tier: VMTier, testnet: Lab) -> Iterator[VMInstance]:
    allow = f"{testnet.allowed_ip}:{testnet.port}"
    # a name, pinned here to the allowed server (nothing resolves it on this host)
    by_name = AllowRule(
        f"{NAME}:{testnet.port}", NAME, testnet.port, testnet.port, (f"{testnet.allowed_ip}/32",)
    )
    vm = _create(tier, Egress(allow=(allow, by_name.text), rules=(parse_allow(allow), by_name)))
    try:
        yield vm
    finally:
        vm.close()
    assert _gateway_leftovers({vm.id}) == []
    assert _passt_leftovers({vm.id}) == []


def test_egress_reaches_the_allow_list_and_nothing_else(
    egress_vm: VMInstance, testnet: Lab
) -> None:
    vm = egress_vm
    r = vm.exec(["ip", "-o", "-4", "addr", "show", "dev", "eth0"])
    assert r.ok and b"10.200.0.2/30" in r.stdout, r.stdout + r.stderr
    ok, out, took_s = _get(vm, testnet.allowed_ip, testnet.port)
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


def test_the_nic_is_passt_behind_the_gateway(egress_vm: VMInstance) -> None:
    """QEMU's NIC talks to passt over a socket only passt and QEMU reach;
    passt runs unprivileged inside the sandbox's network namespace."""
    vm = egress_vm
    d = vm_net.socket_dir(vm.id)
    st = d.stat()
    assert (st.st_uid, oct(st.st_mode & 0o777)) == (0, oct(0o710))
    sock = (d / "passt.sock").stat()
    assert (sock.st_uid, oct(sock.st_mode & 0o777)) == (0, oct(0o660))
    record = netgw._read_record(vm.id)
    assert record is not None and record.get("passt"), record
    pid = int(record["passt"][0])
    status = Path(f"/proc/{pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == ["65534"] * 4, uid_line
    sandbox_ns = os.stat(netgw.NETNS_DIR / f"{netgw.SANDBOX_PREFIX}{vm.id}").st_ino
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == sandbox_ns
    xml = vm.domain().XMLDesc(0)
    assert "virtio-net-pci" in xml and str(vm_net.socket_path(vm.id)) in xml


def test_network_none_is_loopback_only_and_loads_no_driver(tier: VMTier) -> None:
    vm = _create(tier, NetworkPolicy.NONE)
    try:
        r = vm.exec(["ls", "/sys/class/net"])
        assert r.ok and r.stdout.split() == [b"lo"], r.stdout
        r = vm.exec(["cat", "/proc/modules"])
        assert r.ok and b"virtio_net" not in r.stdout
        assert "commandline" not in vm.domain().XMLDesc(0)
        assert netgw._read_record(vm.id) is None
        assert vm.stats().net_tx_bytes is None
    finally:
        vm.close()


def test_two_vms_cannot_reach_each_other(tier: VMTier, egress_vm: VMInstance, testnet: Lab) -> None:
    allow = ("10.200.0.0/16:9000", f"{testnet.allowed_ip}:{testnet.port}")
    b = _create(tier, Egress(allow=allow))
    a = egress_vm
    listen = "setsid nc -l -p 9000 </dev/null >/tmp/got 2>&1 & sleep 0.3"
    try:
        assert a.exec(["sh", "-c", listen]).ok
        # nothing of b's reaches a's listener: not its address, nor
        # through the gateway or the host (nc -l would have taken it)
        for ip in ("10.200.0.2", netgw.GATEWAY_ADDRESS, testnet.host_ip):
            script = f"echo hi | timeout {CLIENT_TIMEOUT_S} nc {ip} 9000"
            r = b.exec(["sh", "-c", script], timeout_s=10)
            assert not r.ok or not r.stdout, (ip, r)
        r = a.exec(["sh", "-c", "cat /tmp/got; netstat -ltn"])
        assert b"hi" not in r.stdout and b":9000" in r.stdout, r.stdout
    finally:
        a.exec(["sh", "-c", "pkill -f 'nc -l -p 9000'; true"])
        b.close()
    assert _gateway_leftovers({b.id}) == [] and _passt_leftovers({b.id}) == []


def test_published_port_answers_on_host_loopback(tier: VMTier) -> None:
    ports = (PortMap(port=8000, host_port=0), PortMap(port=8001, host_port=0))
    vm = _create(tier, Egress(), ports=ports)
    try:
        assert all(p.host_ip == "127.0.0.1" and p.host_port > 0 for p in vm.spec.ports)
        vm.put_file("/tmp/www/index.html", b"hello from vm\n")
        servers = [
            vm.start(["httpd", "-f", "-p", str(p.port), "-h", "/tmp/www"]) for p in vm.spec.ports
        ]
        try:
            for p in vm.spec.ports:
                url = f"http://127.0.0.1:{p.host_port}/"
                got: list[bytes] = []

                def answered(url: str = url, got: list[bytes] = got) -> bool:
                    try:
                        got.append(urllib.request.urlopen(url, timeout=5).read())
                    except OSError:
                        return False
                    return True

                wait_until(answered, timeout_s=20, what=f"{url} to answer")
                assert got[-1] == b"hello from vm\n"
        finally:
            for server in servers:
                server.kill()
    finally:
        vm.close()
    assert _gateway_leftovers({vm.id}) == [] and _passt_leftovers({vm.id}) == []


@pytest.mark.slow
@pytest.mark.parametrize("method", ["auto", "libvirt"])
def test_revert_keeps_the_nic(tier: VMTier, testnet: Lab, method: str) -> None:
    """A revert by ``loadvm`` keeps QEMU; libvirt's restarts it, and the new
    QEMU connects to the same passt: the guest reaches the allow-list after
    both, and only it."""
    vm = _create(tier, Egress(allow=(f"{testnet.allowed_ip}:{testnet.port}",)))
    try:
        info = vm.create_snapshot("before")
        assert info.name == "before"
        vm.exec(["touch", "/root/after"])
        timings = vm.revert_timed("before", method=method)
        if method == "libvirt":
            assert timings["method"] == "libvirt"
        assert not vm.exec(["test", "-e", "/root/after"]).ok
        ok, out, _ = _get(vm, testnet.allowed_ip, testnet.port)
        assert ok, out
        ok, out, took_s = _get(vm, testnet.denied_ip, testnet.port)
        assert not ok and took_s < DENIED_WITHIN_S, out
    finally:
        vm.close()
    assert _gateway_leftovers({vm.id}) == [] and _passt_leftovers({vm.id}) == []


@pytest.mark.slow
def test_power_cycle_keeps_the_nic(tier: VMTier, testnet: Lab) -> None:
    """A VM powered off and on again cold-boots: the new QEMU connects to
    the same passt and the agent gives the NIC its address again."""
    vm = _create(tier, Egress(allow=(f"{testnet.allowed_ip}:{testnet.port}",)))
    try:
        vm.power_off(timeout_s=30)
        vm.power_on()
        r = vm.exec(["ip", "-o", "-4", "addr", "show", "dev", "eth0"])
        assert r.ok and b"10.200.0.2/30" in r.stdout, r.stdout + r.stderr
        ok, out, _ = _get(vm, testnet.allowed_ip, testnet.port)
        assert ok, out
    finally:
        vm.close()
    assert _gateway_leftovers({vm.id}) == [] and _passt_leftovers({vm.id}) == []


@pytest.mark.slow
def test_create_close_cycles_leave_nothing(tier: VMTier, testnet: Lab) -> None:
    tables = _host_tables()
    links = _host_links()
    ids = set()
    for _ in range(3):
        vm = _create(tier, Egress(allow=(f"{testnet.allowed_ip}:{testnet.port}",)))
        ids.add(vm.id)
        vm.close()
    assert _gateway_leftovers(ids) == [] and _passt_leftovers(ids) == []
    assert _host_tables() == tables
    # links of the tests' own server namespaces (tbt*, this or a concurrent
    # test's) are not the gateways'
    assert {n for n in _host_links() - links if not n.startswith("tbt")} == set()


_MID_CREATE = """
import sys, time
from tierbox import make_spec
from tierbox.errors import SpecError
from tierbox.network import Egress
from tierbox.tiers import get_tier
from tierbox.tiers.vm import tier as vm_tier

def stop(self, conn, cfg, shape, timings, t0):
    print(cfg.meta.id, flush=True)
    time.sleep(3600)

vm_tier.VMTier._cold_boot = stop
get_tier("vm").create(make_spec("busybox:latest", network=Egress(allow=(sys.argv[1],))))
"""


@pytest.mark.slow
def test_kill_mid_create_then_gc_leaves_nothing(tier: VMTier, testnet: Lab) -> None:
    """Killed once its gateway and passt run (just before the domain is
    defined): `tierbox gc` removes them, the namespaces and passt's socket."""
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
        assert _passt_leftovers({sandbox_id}), "passt was not running"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    out = subprocess.run([*TIERBOX, "gc"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert _gateway_leftovers({sandbox_id}) == [], out.stdout
    assert _passt_leftovers({sandbox_id}) == [], out.stdout


def test_ports_need_egress(tier: VMTier) -> None:
    spec = make_spec(IMAGE, memory_mib=256, ports=["80"])
    with pytest.raises(SpecError, match="needs network=egress"):
        tier.create(spec)


def test_vm_create_from_the_cli_with_egress(tier: VMTier, testnet: Lab) -> None:
    """`tierbox vm create --network egress --allow ...`: the VM outlives the
    command that made it with its NIC working; `vm rm` removes the gateway."""
    name = f"tbnet{secrets.token_hex(4)}"
    allow = f"{testnet.allowed_ip}:{testnet.port}"
    p = cli("vm", "create", name, "--network", "egress", "--allow", allow, timeout=300)
    assert p.returncode == 0, p.stderr
    try:
        gc = cli("gc", "--json")  # the VM lives on without its creator: nothing of it is reaped
        assert gc.returncode == 0 and name.encode() not in gc.stdout, gc.stdout
        for addr, answered in ((testnet.allowed_ip, True), (testnet.denied_ip, False)):
            script = (
                f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout {CLIENT_TIMEOUT_S} "
                f"nc {addr} {testnet.port} | head -c 15"
            )
            r = cli("vm", "exec", name, "--", "sh", "-c", script, timeout=120)
            assert (b"200 OK" in r.stdout) is answered, (addr, r.stdout, r.stderr)
    finally:
        rm = cli("vm", "rm", name, timeout=300)
    assert rm.returncode == 0, rm.stderr
    assert _gateway_leftovers({name}) == []
    assert _passt_leftovers({name}) == []


def test_vm_create_from_the_cli_refuses_bad_network_input(tier: VMTier) -> None:
    p = cli("vm", "create", "tbnetbad", "--network", "egress", "--allow", "nope", timeout=60)
    assert p.returncode != 0 and b"nope" in p.stderr, p.stderr
