"""Reads a hostile workload offers: an 8 GB sparse file, a link to /dev/zero,
a FIFO nobody writes. Each is refused at once with a clear error, and tierbox
neither grows nor blocks (tiers whose files go through the host; microVM and
VM are covered in test_guest_files.py)."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator

import pytest

from tests.conftest import require_image, require_tier
from tierbox import Sandbox
from tierbox.errors import FileTooLargeError, NotRegularFileError, SandboxFileError, UsageError

IMAGE = {"container": "busybox", "gvisor": "busybox", "process": None}
MIB = 1024 * 1024


@pytest.fixture(scope="module", params=["container", "gvisor", "process"])
def sb(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    tier = request.param
    require_tier(tier)
    if IMAGE[tier]:
        require_image(IMAGE[tier])
    with Sandbox.create(IMAGE[tier], tier=tier, memory_mib=128, pids=32) as box:
        r = box.run(
            [
                "sh",
                "-c",
                "truncate -s 8G /tmp/sparse && ln -s /dev/zero /tmp/zero && mkfifo /tmp/fifo"
                " && head -c 2000 /dev/zero > /tmp/small && mkdir /tmp/dir",
            ]
        )
        assert r.ok, r
        yield box


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/tmp/sparse", FileTooLargeError),
        ("/tmp/zero", NotRegularFileError),
        ("/tmp/fifo", NotRegularFileError),
        ("/tmp/dir", NotRegularFileError),
    ],
)
def test_hostile_read_is_refused_fast_and_small(sb: Sandbox, path: str, error: type) -> None:
    if sb.tier == "process" and path == "/tmp/zero":
        # links are resolved inside the process tier's /tmp: /dev/zero is not there
        error = SandboxFileError
    rss_before = _max_rss_mib()
    start = time.monotonic()
    with pytest.raises(error, match=path):
        sb.files.read(path)
    assert time.monotonic() - start < 5.0
    assert _max_rss_mib() - rss_before < 32, "tierbox grew while refusing a read"


def test_download_refuses_the_same(sb: Sandbox, tmp_path: object) -> None:
    from pathlib import Path

    dest = Path(str(tmp_path)) / "out"
    with pytest.raises(FileTooLargeError):
        sb.files.download("/tmp/sparse", dest, max_bytes=16 * MIB)
    assert not dest.exists(), "a refused download left a partial file"
    with pytest.raises(SandboxFileError):
        sb.files.download("/tmp/fifo", dest)


def test_cap_is_exact(sb: Sandbox) -> None:
    assert len(sb.files.read("/tmp/small", max_bytes=2000)) == 2000
    with pytest.raises(FileTooLargeError, match="1999"):
        sb.files.read("/tmp/small", max_bytes=1999)


@pytest.mark.parametrize("bad", [b"/tmp/x", "/tmp/a\0b", "", 7])
def test_bad_paths_are_usage_errors(sb: Sandbox, bad: object) -> None:
    with pytest.raises(UsageError):
        sb.files.read(bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        sb.files.write(bad, "x")  # type: ignore[arg-type]


def test_relative_and_dotted_paths_land_where_the_workload_sees_them(sb: Sandbox) -> None:
    """Writes to /./tmp/x or ../tmp/x once reported success but vanished."""
    for i, path in enumerate(["/./tmp/dotted", "../tmp/dotdot", "/tmp//double/../double2"]):
        sb.files.write(path, f"v{i}")
    r = sb.run(["cat", "/tmp/dotted", "/tmp/dotdot", "/tmp/double2"])
    assert r.stdout == b"v0v1v2", r
