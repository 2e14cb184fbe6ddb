"""Host directories in sandboxes, on every tier: a bind mount (container,
gVisor), the path as is (process), a WASI preopen (wasm), a copy in and,
when writable, back out (microVM, VM)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_image, require_tier
from tierbox import Mount, Sandbox
from tierbox.errors import UsageError

IMAGE = {
    "process": None,
    "container": "busybox",
    "gvisor": "busybox",
    "microvm": "busybox",
    "vm": "busybox",
    "wasm": "micropython:wasi",
}


@pytest.fixture
def host_dir() -> Iterator[Path]:
    # outside /tmp: the process tier's /tmp is its own
    d = Path("/srv") / f"tierbox-mount-test-{id(object())}"
    d.mkdir(parents=True)
    d.chmod(0o777)
    (d / "in.txt").write_text("from the host\n")
    yield d
    shutil.rmtree(d)


def _write_cmd(tier: str, path: str) -> list[str]:
    if tier == "wasm":
        code = (
            f"print(open('{path}/in.txt').read(), end=''); open('{path}/out.txt','w').write('back')"
        )
        return ["micropython", "-c", code]
    return ["sh", "-c", f"cat {path}/in.txt && echo -n back > {path}/out.txt"]


@pytest.mark.parametrize("tier", list(IMAGE))
def test_writable_mount_reaches_the_host(tier: str, host_dir: Path) -> None:
    require_tier(tier)
    if IMAGE[tier] and tier != "wasm":
        require_image(IMAGE[tier])
    path = str(host_dir) if tier == "process" else "/data"
    writable = [Mount(str(host_dir), path, read_only=False)]
    with Sandbox.create(IMAGE[tier], tier=tier, mounts=writable) as sb:
        r = sb.run(_write_cmd(tier, path))
        assert r.ok and r.stdout == b"from the host\n", r
    # bind mounts and preopens write through; VMs copy back at close
    assert (host_dir / "out.txt").read_text() == "back"


@pytest.mark.parametrize("tier", ["process", "container", "gvisor", "microvm", "wasm"])
def test_read_only_mount_refuses_writes(tier: str, host_dir: Path) -> None:
    require_tier(tier)
    path = str(host_dir) if tier == "process" else "/data"
    with Sandbox.create(IMAGE[tier], tier=tier, mounts=[Mount(str(host_dir), path)]) as sb:
        r = sb.run(_write_cmd(tier, path))
        assert not r.ok, r
    assert not (host_dir / "out.txt").exists()


@pytest.mark.parametrize(
    ("mount", "needle"),
    [
        (Mount("/", "/data"), "cannot be mounted"),
        (Mount("/proc", "/data"), "cannot be mounted"),
        (Mount("/etc", "/proc/x"), "away from /proc"),
        (Mount("/no/such/dir", "/data"), "no such file"),
    ],
)
def test_dangerous_mounts_are_refused(mount: Mount, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        Sandbox.create("busybox", tier="container", mounts=[mount])


def test_a_symlinked_host_path_is_resolved_once(host_dir: Path, tmp_path: Path) -> None:
    require_tier("container")
    link = tmp_path / "link"
    link.symlink_to(host_dir)
    with Sandbox.create("busybox", tier="container", mounts=[Mount(str(link), "/data")]) as sb:
        assert sb.spec.mounts[0].host == str(host_dir)
        assert sb.run(["cat", "/data/in.txt"]).stdout == b"from the host\n"
