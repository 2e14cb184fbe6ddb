"""Egress networking: what a container's gateway costs at create, and how
soon the first HTTP request from inside gets its answer.

The HTTP server lives in a network namespace this benchmark makes
(``tbt-bench-<random>``, a 198.18.x address reached through a veth whose host
end goes with the namespace), so no traffic leaves the machine.

Promises (SPECIFICATION.md), measured in the same run, interleaved:
- container create with ``network=Egress(...)`` <= 1.5x create with
  ``network="none"`` (p50 of create + nothing else; close is not timed);
- the first HTTP request from inside (an ``exec`` of busybox ``wget``
  reading the status line and the page) completes within 20 ms of create returning
  (p50). The same exec of ``true`` is printed beside it: most of the time is
  the runtime's exec, not the network.

Usage: python benchmarks/bench_network.py [N]
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Promise, p50, p95, report, runs_arg
from tierbox import Sandbox
from tierbox.errors import TierboxError
from tierbox.network import Egress


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Server:
    """An HTTP server in a namespace of the benchmark's own."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
        n = next(n for n in range(200, 250) if f"198.18.{n}." not in routes)
        self.netns, self.host_if = f"tbt-bench-{tag}", f"tbtb{tag}"
        self.ip, self.port = f"198.18.{n}.2", 8080
        _ip("netns", "add", self.netns)
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", "eth0",
                "netns", self.netns)  # fmt: skip
            _ip("addr", "add", f"198.18.{n}.1/24", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip("-n", self.netns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
            _ip("-n", self.netns, "link", "set", "eth0", "up")
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-m", "http.server",
                 "--bind", self.ip, str(self.port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
            )  # fmt: skip
            deadline = time.monotonic() + 10
            while (
                b"LISTEN"
                not in subprocess.run(
                    ["ip", "netns", "exec", self.netns, "ss", "-ltn"], capture_output=True
                ).stdout
            ):
                if time.monotonic() > deadline:
                    raise TierboxError("the benchmark's HTTP server did not start")
                time.sleep(0.02)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if getattr(self, "proc", None) is not None:
            self.proc.kill()
            self.proc.wait()
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


def measure(server: Server, n: int) -> dict[str, list[float]]:
    """Interleaved: create none, create egress + first request, create
    egress + exec of true. Seconds."""
    egress = Egress(allow=(f"{server.ip}:{server.port}",))
    request = f"wget -q -O - http://{server.ip}:{server.port}/ | head -c 15"
    out: dict[str, list[float]] = {"none": [], "egress": [], "first_http": [], "exec_true": []}
    for i in range(n + 2):  # two rounds of warm-up
        t0 = time.perf_counter()
        sb = Sandbox.create("busybox", tier="container", memory_mib=128)
        t_none = time.perf_counter() - t0
        sb.close()
        t0 = time.perf_counter()
        sb = Sandbox.create("busybox", tier="container", memory_mib=128, network=egress)
        t_egress = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            r = sb.run(["sh", "-c", request], timeout_s=5)
            t_http = time.perf_counter() - t0
            if not r.ok or not r.stdout.startswith(b"<!DOCTYPE"):
                raise TierboxError(f"no answer from inside: {r.termination.describe()}")
        finally:
            sb.close()
        sb = Sandbox.create("busybox", tier="container", memory_mib=128, network=egress)
        try:
            t0 = time.perf_counter()
            sb.run(["sh", "-c", "true"])
            t_true = time.perf_counter() - t0
        finally:
            sb.close()
        if i >= 2:
            out["none"].append(t_none)
            out["egress"].append(t_egress)
            out["first_http"].append(t_http)
            out["exec_true"].append(t_true)
    return out


def main() -> int:
    n = runs_arg(__doc__, 30)
    server = Server()
    try:
        times = measure(server, n)
    finally:
        server.close()
    ms = {k: [x * 1000 for x in v] for k, v in times.items()}
    for k, label in (
        ("none", "create, network=none"),
        ("egress", "create, network=egress"),
        ("first_http", "first HTTP request after create"),
        ("exec_true", "exec of `sh -c true` (for scale)"),
    ):
        print(f"  {label:<36} p50 {p50(ms[k]):7.2f} ms   p95 {p95(ms[k]):7.2f} ms")
    ratio = p50(ms["egress"]) / p50(ms["none"])
    promises = [
        Promise("container create egress / none (p50)", ratio, 1.5, "x"),
        Promise("first HTTP request after create (p50)", p50(ms["first_http"]), 20.0, " ms"),
    ]
    return report(promises)


if __name__ == "__main__":
    sys.exit(main())
