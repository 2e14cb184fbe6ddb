"""The process tier's network: ``none`` is a namespace holding only ``lo``,
``host`` is the host's, an ``Egress`` policy the namespace of a per-sandbox
gateway, with real processes and real namespaces.

The only server reached from outside a sandbox lives in the network
namespace ``testnet`` (tests/test_network.py) makes for this run; a sandbox
with ``network="host"`` reaches it over that namespace's veth, one with
``network="none"`` must not.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TIERBOX, assert_gone, cli, require_tier, wait_until
from tests.test_network import Lab, _gateway_leftovers, testnet  # noqa: F401 (the fixture)
from tierbox import Sandbox, run
from tierbox.host import netgw
from tierbox.network import AllowRule, Egress
from tierbox.tiers import process

CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("CONNECTED")
except OSError as exc:
    print("REFUSED", exc)
"""

LINKS = (
    "ip -o link | cut -d: -f2; echo /sys:; ls /sys/class/net; "
    "echo /proc:; tail -n +3 /proc/net/dev | cut -d: -f1"
)


def _links(out: str) -> dict[str, set[str]]:
    """Interface names as ``ip link``, /sys/class/net and /proc/net/dev list them."""
    ip, rest = out.split("/sys:")
    sysfs, proc = rest.split("/proc:")
    views = (("ip", ip), ("sys", sysfs), ("proc", proc))
    return {k: {name.split("@")[0] for name in v.split()} for k, v in views}


def _netns(sb: Sandbox) -> str:
    r = sb.run(["readlink", "/proc/self/ns/net"])
    assert r.ok, r
    return r.stdout.decode().strip()


def _holders(ns: str) -> list[str]:
    """Host tasks in the namespace ``ns`` (``net:[inode]``) and mounts pinning
    it, in every mount namespace a process here is in."""
    found, seen_mnt = [], set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                if os.readlink(f"/proc/{pid}/task/{tid}/ns/net") == ns:
                    found.append(f"task {pid}/{tid}")
            mnt = os.readlink(f"/proc/{pid}/ns/mnt")
            if mnt not in seen_mnt:
                seen_mnt.add(mnt)
                if ns in Path(f"/proc/{pid}/mountinfo").read_text():
                    found.append(f"mount seen by {pid}")
        except OSError:
            continue  # gone, or a kernel thread
    return found


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    require_tier("process")
    with Sandbox.create(None, tier="process", timeout_s=20) as box:
        yield box


def test_none_is_loopback_only(sb: Sandbox) -> None:
    r = sb.run(["sh", "-c", LINKS])
    assert r.ok, r
    assert _links(r.stdout.decode()) == {"ip": {"lo"}, "sys": {"lo"}, "proc": {"lo"}}
    assert _netns(sb) != os.readlink("/proc/self/ns/net")
    # lo is up: a server on 127.0.0.1 answers a client of the same sandbox
    script = (
        "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen();"
        "c = socket.create_connection(s.getsockname(), timeout=2); print('LOOPBACK OK')"
    )
    r = sb.run(["python3", "-c", script])
    assert b"LOOPBACK OK" in r.stdout, r


def test_none_cannot_reach_a_server_host_can(sb: Sandbox, testnet: Lab) -> None:  # noqa: F811
    target = [testnet.allowed_ip, str(testnet.port)]
    r = sb.run(["python3", "-c", CONNECT, *target])
    assert b"REFUSED" in r.stdout, r
    with Sandbox.create(None, tier="process", network="host", timeout_s=20) as host:
        r = host.run(["python3", "-c", CONNECT, *target])
        assert b"CONNECTED" in r.stdout, r


def test_none_cannot_reach_host_abstract_unix_sockets(sb: Sandbox) -> None:
    """Abstract unix sockets belong to the network namespace: a host
    listener on one is out of reach with none, reached with host."""
    name = f"tierbox-test-{os.getpid()}"
    code = (
        "import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(b'\\0' + sys.argv[1].encode()); print('REACHED')\n"
        "except OSError as exc:\n    print('NO', exc)"
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(b"\0" + name.encode())
        srv.listen()
        r = sb.run(["python3", "-c", code, name])
        assert b"NO" in r.stdout, r
        with Sandbox.create(None, tier="process", network="host") as host:
            r = host.run(["python3", "-c", code, name])
            assert b"REACHED" in r.stdout, r


def test_host_sees_the_host_interfaces() -> None:
    require_tier("process")
    before = set(os.listdir("/sys/class/net"))
    with Sandbox.create(None, tier="process", network="host") as sb:
        r = sb.run(["sh", "-c", LINKS])
        assert r.ok, r
        seen = _links(r.stdout.decode())
        assert _netns(sb) == os.readlink("/proc/self/ns/net")
    # other runs on this host add and remove links meanwhile: those here throughout
    stable = before & set(os.listdir("/sys/class/net"))
    assert stable - {"lo"}, "no interface but lo on this host"
    assert all(stable <= names for names in seen.values()), (stable, seen)


def test_every_command_and_background_process_shares_one_namespace(sb: Sandbox) -> None:
    """Execs, a pty command and what a command leaves running are in the
    sandbox's namespace, so a server left running answers the next command."""
    ns = _netns(sb)
    server = (
        "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 47123)); s.listen();"
        "open('/tmp/up', 'w').close(); c, _ = s.accept(); c.sendall(b'FROM-BACKGROUND')"
    )
    sb.files.write("server.py", server.encode())
    assert sb.run(["sh", "-c", "python3 server.py >/dev/null 2>&1 &"]).ok
    wait_until(lambda: sb.run(["test", "-e", "/tmp/up"]).ok, what="the background server")
    client = "import socket; print(socket.create_connection(('127.0.0.1', 47123)).recv(64))"
    r = sb.instance.start(["python3", "-c", client], tty=True).wait_here()
    assert b"FROM-BACKGROUND" in r.stdout, r
    assert _netns(sb) == ns


def test_nothing_left_after_close() -> None:
    require_tier("process")
    with Sandbox.create(None, tier="process") as sb:
        ns = _netns(sb)
        sb.run(["sh", "-c", "sleep 300 &"])
        pin = process.netns_file(sb.instance.host_dir)  # type: ignore[attr-defined]
        assert any("mount" in h for h in _holders(ns)), "the sandbox's namespace is not pinned"
    assert _holders(ns) == []
    assert not pin.exists()
    assert_gone({sb.id})


def test_one_shot_runs_are_isolated_and_leave_nothing() -> None:
    require_tier("process")
    r = run(None, ["sh", "-c", LINKS], tier="process")
    assert r.ok, r
    assert _links(r.stdout.decode()) == {"ip": {"lo"}, "sys": {"lo"}, "proc": {"lo"}}
    r = run(None, ["readlink", "/proc/self/ns/net"], tier="process", network="host")
    assert r.stdout.decode().strip() == os.readlink("/proc/self/ns/net")
    # the CLI's one-shot
    script = "ls /sys/class/net; readlink /proc/self/ns/net"
    p = cli("run", "-T", "process", "-", "--", "sh", "-c", script)
    assert p.returncode == 0, p.stderr
    names, ns = p.stdout.decode().split("\n", 1)
    assert names == "lo", p.stdout
    assert _holders(ns.strip()) == []


@pytest.mark.parametrize("network", ["none", "egress"])
def test_reattaching_process_joins_the_same_namespace(network: str) -> None:
    """A kept sandbox used from another process: same namespace, so a server
    the first process left running is reachable; removal frees it."""
    require_tier("process")
    policy = Egress() if network == "egress" else network
    sb = Sandbox.create(None, tier="process", keep=True, network=policy)
    try:
        ns = _netns(sb)
        sb.run(["sh", "-c", "python3 -m http.server -b 127.0.0.1 47124 >/dev/null 2>&1 &"])
        other = (
            "import sys; from tierbox import Sandbox; sb = Sandbox.connect(sys.argv[1]);"
            "print(sb.run(['readlink', '/proc/self/ns/net']).stdout.decode().strip());"
            "print(sb.run(['python3', '-c', sys.argv[2], '127.0.0.1', '47124']).stdout.decode())"
        )
        ok = False
        for _ in range(50):  # the server may still be starting
            p = subprocess.run(
                [sys.executable, "-c", other, sb.id, CONNECT], capture_output=True, timeout=60
            )
            assert p.returncode == 0, p.stderr
            seen_ns, answer = p.stdout.decode().split("\n", 1)
            assert seen_ns == ns
            if "CONNECTED" in answer:
                ok = True
                break
        assert ok, answer
    finally:
        sb.close()
    assert _holders(ns) == []
    assert _gateway_leftovers({sb.id}) == []


_CRASH = """
import sys
from tierbox import Sandbox
sb = Sandbox.create(None, tier="process")
r = sb.run(["readlink", "/proc/self/ns/net"])
print(sb.id, r.stdout.decode().strip(), flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_gc_frees_the_namespace_a_killed_creator_left() -> None:
    require_tier("process")
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASH],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().split()
        assert len(line) == 2 and re.fullmatch(r"net:\[\d+\]", line[1]), line
        sandbox_id, ns = line
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any("mount" in h for h in _holders(ns))  # the pin outlives its creator
    out = subprocess.run([*TIERBOX, "gc"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert _holders(ns) == [], out.stdout
    assert_gone({sandbox_id})


def _connects(sb: Sandbox, ip: str, port: int) -> bool:
    r = sb.run(["python3", "-c", CONNECT, ip, str(port)], timeout_s=10)
    assert b"CONNECTED" in r.stdout or b"REFUSED" in r.stdout, r
    return b"CONNECTED" in r.stdout


def test_egress_reaches_only_the_allow_list(testnet: Lab) -> None:  # noqa: F811
    require_tier("process")
    hosts_before = Path("/etc/hosts").read_bytes()
    rule = AllowRule(
        "svc.test:8080", "svc.test", testnet.port, testnet.port, (f"{testnet.allowed_ip}/32",)
    )
    egress = Egress(allow=("svc.test:8080",), dns=True, rules=(rule,))
    with Sandbox.create(None, tier="process", network=egress, timeout_s=20) as sb:
        ns = _netns(sb)
        r = sb.run(["sh", "-c", LINKS])
        assert _links(r.stdout.decode()) == {
            "ip": {"lo", "eth0"},
            "sys": {"lo", "eth0"},
            "proc": {"lo", "eth0"},
        }, r
        assert _connects(sb, testnet.allowed_ip, testnet.port)
        for ip, port in (
            (testnet.allowed_ip, testnet.other_port),
            (testnet.denied_ip, testnet.port),
            (testnet.host_ip, testnet.port),
        ):
            assert not _connects(sb, ip, port), (ip, port)
        # the pinned name resolves through the sandbox's own /etc/hosts
        r = sb.run(["getent", "hosts", "svc.test"])
        assert r.stdout.split()[:2] == [testnet.allowed_ip.encode(), b"svc.test"], r
        assert _connects(sb, "svc.test", testnet.port)
        resolv = sb.run(["cat", "/etc/resolv.conf"]).stdout
        assert f"nameserver {netgw.DNS_ADDRESS}".encode() in resolv
        assert not sb.run(["sh", "-c", "echo x >> /etc/hosts"]).ok  # read-only, and not ours
        st = sb.stats()
        assert st.net_tx_bytes and st.net_rx_bytes, st
        sandbox_id = sb.id
    assert Path("/etc/hosts").read_bytes() == hosts_before  # the host's is untouched
    assert _gateway_leftovers({sandbox_id}) == []
    assert _holders(ns) == []
    assert_gone({sandbox_id})


def test_egress_one_shot_and_without_dns(testnet: Lab) -> None:  # noqa: F811
    require_tier("process")
    egress = Egress(allow=(f"{testnet.allowed_ip}:{testnet.port}",))
    script = 'cat /etc/resolv.conf; python3 -c "$0" $1 $2'
    args = [CONNECT, testnet.allowed_ip, str(testnet.port)]
    r = run(None, ["sh", "-c", script, *args], tier="process", network=egress)
    assert b"CONNECTED" in r.stdout and b"nameserver" not in r.stdout, r
