"""Streaming output: how soon a write inside the sandbox reaches the callback,
and what the streaming path costs a one-shot run.

Latency, per tier:
- where a command's stdin streams (process, container, gVisor; microVM and VM
  where their agent streams stdin): a background ``cat`` echoes a byte the
  host sends; half the round trip (send_stdin -> on_stdout) is the one-way
  latency;
- on wasm (stdin is a file there): a guest prints CLOCK_MONOTONIC, which is
  the host's clock, and the callback compares it with its own.

Promise (SPECIFICATION.md): a one-shot run with on_stdout/on_stderr set costs
<= 1.1x the same run without them (container and process, interleaved).
Usage: python benchmarks/bench_streaming.py [N]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Promise, interleaved, p50, p95, report, runs_arg
from tierbox import Sandbox, make_spec
from tierbox.errors import TierboxError
from tierbox.tiers import get_tier

CLOCK_GUEST = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
    for (int i = 0; i < 40; i++) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        printf("%lld.%09ld\n", (long long)ts.tv_sec, ts.tv_nsec);
        fflush(stdout);
        volatile unsigned long spin = 0;
        for (unsigned long j = 0; j < 20000000UL; j++) spin += j;  /* a few ms of CPU */
    }
    return 0;
}
"""


def echo_latency_ms(tier: str, image: str | None, n: int) -> list[float]:
    """One-way latency estimates (half round trips) through a background cat."""
    out: list[float] = []
    got = threading.Event()
    with Sandbox.create(image, tier=tier, memory_mib=128) as sb:
        h = sb.run(["cat"], background=True, on_stdout=lambda _b: got.set())
        try:
            for _ in range(n):
                got.clear()
                t0 = time.monotonic()
                h.send_stdin(b"x")
                if not got.wait(10):
                    raise TierboxError(f"{tier}: no echo within 10 s")
                out.append((time.monotonic() - t0) * 1000 / 2)
        finally:
            h.close_stdin()
            h.wait(30)
    return out


def wasm_latency_ms() -> list[float]:
    from tierbox.wasm import toolchain

    cache = Path(tempfile.gettempdir()) / "tierbox-bench-wasm"
    module = toolchain.build(CLOCK_GUEST.encode(), "clock", cache, ["-O1"])
    lat: list[float] = []

    def on_out(chunk: bytes) -> None:
        now = time.monotonic()
        for line in chunk.decode().split():
            lat.append((now - float(line)) * 1000)

    with Sandbox.create(None, tier="wasm") as sb:
        sb.files.write("/clock.wasm", module.read_bytes())
        r = sb.run(["/clock.wasm"], on_stdout=on_out, timeout_s=60)
        if not r.ok:
            raise TierboxError(f"wasm clock guest: {r.termination.describe()}")
    return lat


def overhead(tier: str, image: str | None, n: int) -> tuple[float, float, float]:
    """p50 of a one-shot run without and with output callbacks, and the
    streamed runs' spread, timed in both orders so that whatever one run
    leaves for the next (a directory deleted in the background) weighs on
    both alike."""
    spec = make_spec(image, memory_mib=128, pids=64, timeout_s=30)
    t = get_tier(tier)
    argv = ["sh", "-c", "echo hello; echo there >&2"]
    sink: list[bytes] = []
    fns = {
        "plain": lambda: t.run(spec, argv),
        "streamed": lambda: t.run(spec, argv, on_stdout=sink.append, on_stderr=sink.append),
    }
    first = interleaved(fns, n // 2)
    second = interleaved(dict(reversed(fns.items())), n - n // 2)
    times = {k: first[k] + second[k] for k in fns}
    return p50(times["plain"]), p50(times["streamed"]), statistics.pstdev(times["streamed"])


def main() -> int:
    n = runs_arg(__doc__, 40)
    promises: list[Promise] = []
    print("write -> callback latency (one way)")
    cases = [("process", None), ("container", "busybox"), ("gvisor", "busybox")]
    cases += [("microvm", "busybox"), ("vm", "busybox")]
    for tier, image in cases:
        if not get_tier(tier).available().available:
            print(f"  {tier:<10} not available here")
            continue
        try:
            xs = echo_latency_ms(tier, image, n)
        except TierboxError as exc:  # e.g. a tier whose stdin does not stream
            print(f"  {tier:<10} not measured: {exc}")
            continue
        print(f"  {tier:<10} p50 {p50(xs):7.2f} ms   p95 {p95(xs):7.2f} ms   (half an echo)")
    if get_tier("wasm").available().available:
        xs = wasm_latency_ms()
        print(f"  {'wasm':<10} p50 {p50(xs):7.2f} ms   p95 {p95(xs):7.2f} ms   (guest clock)")

    for tier, image in (("container", "busybox"), ("process", None)):
        a, b, spread = overhead(tier, image, n)
        print(
            f"{tier} one-shot: plain p50 {a * 1000:.2f} ms, streamed p50 {b * 1000:.2f} ms "
            f"(stdev {spread * 1000:.2f} ms)"
        )
        promises.append(Promise(f"{tier} one-shot streamed / plain", b / a, 1.1, "x"))
    return report(promises)


if __name__ == "__main__":
    sys.exit(main())
