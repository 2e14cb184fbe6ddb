"""``tierbox serve``: what the daemon costs over the in-process API, and how
fast its dashboard loads.

- create -> first exec result -> delete, through the daemon on its unix
  socket (``tierbox.Client``) against the in-process API (``Sandbox``),
  interleaved in one loop so machine noise hits both alike; container and
  wasm.
- the dashboard (``/``) with 200 live wasm sandboxes, loaded in Debian's
  headless chromium (navigation start -> load event, best of 3).

Promises (SPECIFICATION.md): container daemon/in-process <= 1.25x (p50);
wasm daemon - in-process <= +3 ms (p50); dashboard < 1 s.
Usage: python benchmarks/bench_serve.py [N]
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Promise, interleaved, p50, p95, report, runs_arg
from tierbox import Client, Sandbox, wait_closed
from tierbox.paths import sandboxes_dir

ROOT = Path(__file__).resolve().parent.parent


def _wasm_image() -> str:
    """The contract suite's WASI toolbox image (built and imported once)."""
    sys.path.insert(0, str(ROOT))
    from tests.tiers.test_contract import _toolbox_image

    return _toolbox_image()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tbbench-", dir="/tmp"))
        self.socket = self.dir / "s.sock"
        self.port = _free_port()
        cli = [sys.executable, "-m", "tierbox.cli"]
        keys = [*cli, "keys", "create", "--tenant", "bench", "--state-dir", str(self.dir)]
        self.key = subprocess.run(keys, capture_output=True, text=True, check=True).stdout.strip()
        self.proc = subprocess.Popen(
            [
                *cli,
                "serve",
                "--state-dir",
                str(self.dir),
                "--socket",
                str(self.socket),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--log-level",
                "warning",
            ],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                Client(str(self.socket)).tiers()
                break
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        shutil.rmtree(self.dir, ignore_errors=True)


def cycle_promises(d: Daemon, n: int) -> list[Promise]:
    """Both sides close with their teardown in the background (this process's
    and the daemon's); each cycle is timed until its close returns, and both
    teardowns are waited for, untimed, before the next cycle starts."""
    client = Client(str(d.socket), api_key=d.key)
    out: list[Promise] = []
    closed: list[str] = []

    def settle() -> None:
        wait_closed()
        while closed:
            _wait_torn_down(closed.pop())

    for tier, image, argv, runs in (
        ("container", "busybox", ["true"], max(10, n // 4)),
        ("wasm", _wasm_image(), ["toolbox", "echo", "x"], n),
    ):

        def local(tier: str = tier, image: str = image, argv: list[str] = argv) -> None:
            sb = Sandbox.create(image, tier=tier, memory_mib=64)
            assert sb.run(argv).ok
            sb.close()

        def remote(tier: str = tier, image: str = image, argv: list[str] = argv) -> None:
            sb = client.sandboxes.create(image, tier=tier, memory_mib=64)
            assert sb.run(argv).ok
            sb.close()
            closed.append(sb.id)

        t = interleaved({"in-process": local, "daemon": remote}, runs, warmup=5, settle=settle)
        a, b = p50(t["in-process"]), p50(t["daemon"])
        print(
            f"{tier}: create -> first exec result -> delete, n={runs}: "
            f"in-process p50 {a * 1000:.2f} ms (p95 {p95(t['in-process']) * 1000:.2f}), "
            f"daemon p50 {b * 1000:.2f} ms (p95 {p95(t['daemon']) * 1000:.2f}), "
            f"ratio {b / a:.2f}x, +{(b - a) * 1000:.2f} ms"
        )
        if tier == "container":
            out.append(Promise("container daemon/in-process (p50)", b / a, 1.25, "x"))
        else:
            out.append(Promise("wasm daemon - in-process (p50)", (b - a) * 1000, 3.0, " ms"))
    client.close()
    return out


def _wait_torn_down(sandbox_id: str, timeout_s: float = 60.0) -> None:
    """Until the daemon's teardown of ``sandbox_id`` is done: its directory
    gone from the sandboxes directory and from the trash it is deleted in."""
    base = sandboxes_dir()
    give_up = time.monotonic() + timeout_s
    while (base / sandbox_id).exists() or any((base / ".trash").glob(f"{sandbox_id}-*")):
        if time.monotonic() > give_up:
            raise SystemExit(f"the daemon's teardown of {sandbox_id} took over {timeout_s} s")
        time.sleep(0.001)


def dashboard_promise(d: Daemon) -> list[Promise]:
    chromium, driver_path = "/usr/bin/chromium", "/usr/bin/chromedriver"
    if not (os.path.exists(chromium) and os.path.exists(driver_path)):
        print("dashboard: skipped, chromium and chromium-driver are not installed (make setup)")
        return []
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    client = Client(str(d.socket), api_key=d.key)
    image = _wasm_image()
    made = [client.sandboxes.create(image, tier="wasm", memory_mib=16) for _ in range(200)]
    profile = tempfile.mkdtemp(prefix="tierbox-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get(f"http://127.0.0.1:{d.port}/login")
        browser.find_element(By.ID, "key").send_keys(d.key)
        browser.find_element(By.ID, "login").click()
        times = []
        for _ in range(3):
            browser.get(f"http://127.0.0.1:{d.port}/")
            rows = browser.find_elements(By.CSS_SELECTOR, "#sandboxes tbody tr")
            assert len(rows) == 200, len(rows)
            times.append(
                browser.execute_script(
                    "const t = performance.getEntriesByType('navigation')[0];"
                    "return (t.loadEventEnd - t.startTime) / 1000;"
                )
            )
        print(f"dashboard, 200 live sandboxes: load {[round(t * 1000) for t in times]} ms")
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)
        for sb in made:
            sb.close()
        client.close()
    return [Promise("dashboard load, 200 live sandboxes (best of 3)", min(times), 1.0, " s")]


def main() -> int:
    n = runs_arg(__doc__, 100)
    _wasm_image()
    d = Daemon()
    try:
        promises = cycle_promises(d, n) + dashboard_promise(d)
    finally:
        d.stop()
    return report(promises)


if __name__ == "__main__":
    raise SystemExit(main())
