"""The file-API race: a workload swaps a directory with a symlink to ``/`` in a
tight loop while the host reads, writes and copies through that directory.

With a check-then-open file API the host's own files leak (thousands of reads
in ten seconds did, before). Every tier whose files go through the host is
attacked for at least 10 s; the host's planted file must never come back and
the host directory must be byte-for-byte unchanged.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import require_image, require_tier
from tierbox import Sandbox
from tierbox.errors import SandboxFileError
from tierbox.spec import ExecResult

RACE_S = 10.0
IMAGE = {"container": "busybox", "gvisor": "busybox", "process": None}


def _host_state(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mode) for p in sorted(d.iterdir())}


def _tree_bytes(d: Path) -> bytes:
    return b"".join(p.read_bytes() for p in d.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.slow
@pytest.mark.parametrize("tier", ["container", "gvisor", "process"])
def test_swap_race_never_reaches_host_files(tier: str, swaprace: bytes, tmp_path: Path) -> None:
    require_tier(tier)
    if IMAGE[tier]:
        require_image(IMAGE[tier])
    token = secrets.token_hex(8)
    host_secret = f"HOST-SECRET-{token}".encode()
    host = Path(tempfile.mkdtemp(prefix="tierbox-race-"))
    try:
        (host / "secret").write_bytes(host_secret)
        (host / "victim").write_bytes(host_secret)
        (host / "victim").chmod(0o600)
        before = _host_state(host)
        upload_src = tmp_path / "up"
        upload_src.mkdir()
        (upload_src / "victim").write_bytes(b"uploaded")
        with Sandbox.create(IMAGE[tier], tier=tier, memory_mib=128, pids=64, timeout_s=60) as sb:
            # /tmp/race/d mirrors the host path: once "d" is a link to "/", a
            # file API that resolves links itself lands on the host's file
            mirror = f"/tmp/race/d{host}"
            sb.files.write("/tmp/swaprace", swaprace, mode=0o755)
            sb.files.write(f"{mirror}/secret", "sandbox copy")
            sb.files.write(f"{mirror}/victim", "sandbox copy")
            assert sb.run(["ln", "-s", "/", "/tmp/race/l"]).ok
            done: list[ExecResult] = []
            attacker = threading.Thread(
                target=lambda: done.append(
                    sb.run(["/tmp/swaprace", "/tmp/race", str(RACE_S + 3)], timeout_s=60)
                )
            )
            attacker.start()
            time.sleep(1.0)
            counts = {"reads": 0, "read_ok": 0, "writes": 0, "write_ok": 0, "copies": 0, "leaks": 0}
            deadline = time.monotonic() + RACE_S
            i = 0
            while time.monotonic() < deadline:
                i += 1
                counts["reads"] += 1
                try:
                    data = sb.files.read(f"{mirror}/secret")
                    counts["read_ok"] += 1
                    counts["leaks"] += host_secret in data
                except SandboxFileError:
                    pass  # "d" was a link to the sandbox's own root at that moment
                counts["writes"] += 1
                with contextlib.suppress(SandboxFileError):
                    sb.files.write(f"{mirror}/victim", f"sandbox write {i}", mode=0o666)
                    counts["write_ok"] += 1
                if i % 10 == 0:
                    counts["copies"] += 1
                    out = tmp_path / f"copy{i}"
                    with contextlib.suppress(SandboxFileError):
                        sb.files.download("/tmp/race/d", out)
                    if out.exists():
                        counts["leaks"] += host_secret in _tree_bytes(out)
                        shutil.rmtree(out)
                    with contextlib.suppress(SandboxFileError):
                        sb.files.upload(upload_src, mirror)
            attacker.join(timeout=60)
        print(f"\n{tier}: {counts}, swaps={done[0].stdout.decode().strip() if done else '?'}")
        assert done and done[0].ok, done
        # thousands of swaps while the host reads (gVisor's syscalls make it the slowest)
        assert int(done[0].stdout) > 2_000, "the attacker did not really race"
        # gVisor's file calls are execs (tens of ms): fewer of them land while
        # "d" is a directory, so any successful read or write proves the point
        assert counts["read_ok"] + counts["write_ok"] > 0, "nothing succeeded: API not exercised"
        assert counts["leaks"] == 0, counts
        assert _host_state(host) == before, "a host file changed"
    finally:
        shutil.rmtree(host)
