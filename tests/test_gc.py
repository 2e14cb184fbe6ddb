"""``tierbox gc`` on a shared host: it removes only what is really left over,
never a sandbox in use, and reports only what it really removed."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import TIERBOX, cli, require_image, require_tier
from tierbox import Sandbox, run
from tierbox.tiers import _pool

GC_LOOP = """
import time
from tierbox import gc
end = time.monotonic() + float(__import__("sys").argv[1])
n = 0
while time.monotonic() < end:
    gc.collect()
    n += 1
print(n)
"""


@pytest.mark.slow
def test_gc_in_a_loop_never_breaks_sandboxes_in_use() -> None:
    for tier in ("process", "container", "gvisor", "microvm", "wasm"):
        require_tier(tier)
    require_image("busybox")
    duration_s = 20.0
    failures: list[str] = []
    work = 0
    vm = Sandbox.create("busybox", tier="microvm", memory_mib=128)
    kept = Sandbox.create("busybox", tier="container", keep=True)
    looper = subprocess.Popen(
        [sys.executable, "-c", GC_LOOP, str(duration_s)], stdout=subprocess.PIPE, text=True
    )
    try:
        end = time.monotonic() + duration_s - 1
        while time.monotonic() < end:
            for tier, image in (("process", None), ("container", "busybox"), ("gvisor", "busybox")):
                try:
                    r = run(image, ["echo", "ok"], tier=tier)
                    if r.stdout != b"ok\n":
                        failures.append(f"{tier} one-shot: {r}")
                    with Sandbox.create(image, tier=tier) as sb:
                        sb.files.write("/tmp/f", "x")
                        if sb.run(["cat", "/tmp/f"]).stdout != b"x":
                            failures.append(f"{tier} sandbox: lost a file")
                except Exception as exc:
                    failures.append(f"{tier}: {type(exc).__name__}: {exc}")
                work += 1
            try:
                for sb in (vm, kept):
                    if sb.run(["echo", "alive"]).stdout != b"alive\n":
                        failures.append(f"{sb.tier} long-lived: wrong output")
                one_shot = run("micropython:wasi", ["micropython", "-c", "print(1)"], tier="wasm")
                if one_shot.stdout != b"1\n":
                    failures.append("wasm one-shot: wrong output")
            except Exception as exc:
                failures.append(f"long-lived: {type(exc).__name__}: {exc}")
    finally:
        out, _ = looper.communicate(timeout=120)
        vm.close()
        kept.close()
    print(f"\n{work} sandboxes while gc ran {out.strip()} times")
    assert int(out) > 5, "gc did not really loop"
    assert failures == []


def test_gc_reports_only_real_removals() -> None:
    require_tier("container")
    require_image("busybox")
    _pool.close_all_pools()
    first = json.loads(cli("gc", "--json").stdout)
    second = json.loads(cli("gc", "--json").stdout)
    assert second["removed"] == [], (first, second)
    assert not any(line.endswith("/tierbox") for line in first["removed"]), first


def test_kept_sandbox_with_ttl_is_reaped_after_it_expires() -> None:
    require_tier("container")
    require_image("busybox")
    ttl_s = 4.0
    asked = time.monotonic()
    p = subprocess.run(
        [*TIERBOX, "sandbox", "create", "--ttl", f"{ttl_s:g}s", "busybox"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    sid = p.stdout.strip()
    assert sid in cli("sandbox", "ls").stdout.decode()
    removed = json.loads(cli("gc", "--json").stdout)["removed"]
    if time.monotonic() - asked < ttl_s:  # a loaded host may take longer than the ttl to get here
        assert not any(sid in line for line in removed), "reaped before its time"
    time.sleep(max(0.0, asked + ttl_s + 0.5 - time.monotonic()))
    removed = json.loads(cli("gc", "--json").stdout)["removed"]
    assert any(sid in line for line in removed), removed
    assert sid not in cli("sandbox", "ls").stdout.decode()


def test_unclosed_sandboxes_are_closed_when_the_program_exits() -> None:
    """Every tier: a script that never closes its sandboxes leaves nothing
    running (no QEMU, runsc, crun or libvirt domain) once it exits."""
    tiers = [("process", None), ("container", "busybox"), ("gvisor", "busybox")]
    tiers += [("microvm", "busybox"), ("vm", "busybox"), ("wasm", "micropython:wasi")]
    for tier, _image in tiers:
        require_tier(tier)
    script = (
        "from tierbox import Sandbox\n"
        f"made = [Sandbox.create(img, tier=t, memory_mib=128) for t, img in {tiers!r}]\n"
        "print(' '.join(sb.id for sb in made))\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    ids = p.stdout.split()
    assert len(ids) == len(tiers)
    from tests.conftest import assert_gone

    assert_gone(set(ids))
    domains = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
    ).stdout
    assert not any(i in domains for i in ids), domains
