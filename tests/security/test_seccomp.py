"""The container tier's seccomp profile, played against by a real workload.

containers-common's profile lets a process with no capabilities create a user
namespace (where it has them all again), mount in it and use the kernel
keyring. tierbox converts it to Docker's semantics for a capability-less
process; a static C program (bench/attacks/nsprobe.c, built here with gcc)
tries each call inside a real busybox container and reports its errno.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_image, require_tier
from tierbox import Sandbox
from tierbox.tiers import oci
from tierbox.tiers.container import ContainerTier

ATTACKS = Path(__file__).resolve().parents[2] / "src" / "tierbox" / "bench" / "attacks"

#: What each probe must get inside the container.
REFUSED = {
    "unshare_user": errno.EPERM,
    "unshare_user_mnt": errno.EPERM,
    "userns_mount": errno.EPERM,
    "clone_newuser": errno.EPERM,
    "clone_newns": errno.EPERM,
    "clone3_plain": errno.ENOSYS,  # libc falls back to clone
    "clone3_newuser": errno.ENOSYS,
    "setns": errno.EPERM,
    "keyctl": errno.EPERM,
    "add_key": errno.EPERM,
    "request_key": errno.EPERM,
    "socket:40:1:0": errno.EPERM,  # AF_VSOCK
    "socket:16:3:9": errno.EINVAL,  # NETLINK_AUDIT without CAP_AUDIT_WRITE
}
ALLOWED = ["fork", "pthread", "clone_plain", "socket:1:1:0", "socket:2:1:0", "socket:16:3:0"]


@pytest.fixture(scope="module")
def nsprobe(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler: apt-get install gcc libc6-dev (make setup does)")
    out = tmp_path_factory.mktemp("nsprobe") / "nsprobe"
    subprocess.run(
        [cc, "-static", "-O2", "-pthread", "-o", str(out), str(ATTACKS / "nsprobe.c")], check=True
    )
    return out.read_bytes()


@pytest.fixture(scope="module")
def box() -> Any:
    require_tier("container")
    require_image("busybox")
    with Sandbox.create("busybox", tier="container", memory_mib=64, pids=64) as sb:
        yield sb


def _results(stdout: bytes) -> dict[str, str]:
    out = {}
    for line in stdout.decode().splitlines():
        key, _, value = line.rpartition("=")
        out[key] = value
    assert out.get("nsprobe_done") == "1", stdout
    return out


def test_namespaces_and_keyring_are_refused(box: Sandbox, nsprobe: bytes) -> None:
    box.files.write("/tmp/nsprobe", nsprobe, mode=0o755)
    r = box.run(["/tmp/nsprobe", *REFUSED, *ALLOWED], timeout_s=30)
    assert r.ok, r.stderr
    got = _results(r.stdout)
    for name, want in REFUSED.items():
        assert got[name] == str(want), (name, got[name], errno.errorcode.get(int(want)))
    for name in ALLOWED:
        assert got[name] == "0", (name, got[name])


def test_unshare_cannot_mount_a_tmpfs(box: Sandbox) -> None:
    """The reported attack, with busybox's own unshare."""
    r = box.run(["sh", "-c", "unshare -Umnr sh -c 'mount -t tmpfs none /tmp && echo MOUNTED'"])
    assert r.exit_code != 0
    assert b"MOUNTED" not in r.stdout
    assert b"Operation not permitted" in r.stderr, r.stderr


def test_ordinary_processes_and_threads_still_work(box: Sandbox) -> None:
    r = box.run(["sh", "-c", "true & wait; echo bg=$?; (echo sub); echo a | cat"])
    assert r.ok, r.stderr
    assert r.stdout.split() == [b"bg=0", b"sub", b"a"]


def test_profile_shape() -> None:
    """Derived from containers-common; no rule allows what Docker refuses a
    capability-less process; clone is allowed only with no namespace flag."""
    try:
        raw = json.loads(oci.SECCOMP_PROFILE.read_text())
    except OSError:
        pytest.skip(f"{oci.SECCOMP_PROFILE} missing (golang-github-containers-common)")
    profile = oci.seccomp_profile()
    assert profile["defaultAction"] == raw["defaultAction"]
    allowed: dict[str, list[dict[str, Any]]] = {}
    for rule in profile["syscalls"]:
        if rule["action"] == "SCMP_ACT_ALLOW":
            for name in rule["names"]:
                allowed.setdefault(name, []).append(rule)
    for name in oci.DENIED_WITHOUT_CAPS:
        assert name not in allowed, name
    assert "clone3" not in allowed
    (clone,) = allowed["clone"]
    (arg,) = clone["args"]
    assert arg["op"] == "SCMP_CMP_MASKED_EQ"
    assert arg["value"] == 0x7E020000 and arg["valueTwo"] == 0
    assert {"read", "write", "execve", "openat", "renameat2"} <= set(allowed)


def test_changed_profile_gets_a_new_bpf_cache_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """crun's compiled filter is cached by the profile: a changed profile must
    never be served the filter compiled from the old one."""
    require_tier("container")
    current = ContainerTier()._bpf_cache()
    changed = dict(oci.seccomp_profile())
    changed["syscalls"] = [*changed["syscalls"], {"names": ["uname"], "action": "SCMP_ACT_ALLOW"}]
    monkeypatch.setattr(oci, "seccomp_profile", lambda: changed)
    assert ContainerTier()._bpf_cache() != current
