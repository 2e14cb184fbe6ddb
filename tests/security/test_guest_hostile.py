"""A guest root against the host, on real guests (QEMU microvm, libvirt VMs).

A guest root can copy the agent's port out of PID 1 (pidfd_getfd), stop the
agent (ptrace) and speak the protocol in its place: ``hostile_agent.c``,
built here with gcc -static, does that. The host must stay bounded and
responsive whatever it says: reads end at their cap with tierbox's RSS
grown by at most the cap plus slack, every wait ends at its deadline and leaves the sandbox dead and
stopped, impossible fields are a dead agent, and text from the guest
reaches the terminal literally. A guest flooding its serial console leaves
a log under its cap.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_image, require_tier
from tests.security.conftest import compile_static
from tierbox import make_spec
from tierbox.errors import (
    FileTooLargeError,
    NotRegularFileError,
    SandboxDeadError,
    SandboxError,
)
from tierbox.spec import Limits, SandboxSpec, TerminationKind
from tierbox.tiers import get_tier
from tierbox.tiers.base import Instance
from tierbox.tiers.microvm import MicroVMInstance, MicroVMTier
from tierbox.tiers.vm import VMInstance, VMTier
from tierbox.vmm import agent as agent_mod
from tierbox.vmm import console_log

pytestmark = pytest.mark.timeout(600)

HERE = Path(__file__).resolve().parent
#: a VM boots in tens of seconds under TCG: its runs are the slow half
TIER_PARAMS = ["microvm", pytest.param("vm", marks=pytest.mark.slow)]
IMAGE = "busybox:latest"
MIB = 1 << 20
#: how far tierbox's RSS may grow during a flood (it used to reach 3-5 GiB): the
#: 64 MiB read cap plus slack. Growth, not the absolute figure: this test
#: process carries the whole suite's memory (~190 MiB late in a full run),
#: while a fresh tierbox process stays well under 200 MiB.
RSS_GROWTH_LIMIT_MIB = 96
#: call timeout for these tests (the tiers' default is 30 s)
CALL_S = 6.0
#: what the markup guest says (see hostile_agent.c)
EVIL = "[/bold]\x1b[2J\x1b]8;;http://evil.example/\x07click\x1b]8;;\x07[red]pwned"


@pytest.fixture(scope="session")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return compile_static(
        HERE / "hostile_agent.c", tmp_path_factory.mktemp("hostile") / "hostile_agent"
    )


@pytest.fixture
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Call timeouts and the liveness watch shortened, so a hung agent is
    found in seconds."""
    import tierbox.tiers.microvm.instance as mvi
    import tierbox.tiers.vm.instance as vmi

    monkeypatch.setattr(mvi, "CALL_TIMEOUT_S", CALL_S)
    monkeypatch.setattr(vmi, "CALL_TIMEOUT_S", CALL_S)
    monkeypatch.setattr(agent_mod, "LIVENESS_S", 2.0)
    monkeypatch.setattr(agent_mod, "LIVENESS_ANSWER_S", 3.0)


def make(tier: str, *, timeout_s: float | None = 60) -> Instance:
    require_tier(tier)
    require_image(IMAGE)
    if tier == "microvm":
        t = get_tier("microvm")
        assert isinstance(t, MicroVMTier)
        return t.create(
            SandboxSpec(image=IMAGE, limits=Limits(memory_mib=256, pids=64, timeout_s=timeout_s))
        )
    t = get_tier("vm")
    assert isinstance(t, VMTier)
    return t.create_vm(make_spec(IMAGE, memory_mib=256, timeout_s=timeout_s))


@pytest.fixture(params=TIER_PARAMS)
def guest(request: pytest.FixtureRequest) -> Iterator[Instance]:
    inst = make(request.param)
    try:
        yield inst
    finally:
        inst.close()


def take_over(inst: Instance, hostile: bytes, mode: str, delay_ms: int = 800) -> None:
    """Start the hostile agent as root; it owns the port once this returns.

    A command left running keeps the host's line open (a VM's line is
    otherwise per call, and a fresh connection that gets no HELLO answer
    could be another process holding the line: that is not a dead agent)."""
    inst.put_file("/tmp/hostile_agent", hostile, mode=0o755)
    inst.start(["sleep", "600"])
    r = inst.exec(["/tmp/hostile_agent", mode, str(delay_ms)], user="0")
    assert r.ok, (r.termination, r.stderr)
    time.sleep(delay_ms / 1000 + 1.5)


def qemu_alive(inst: Instance) -> bool:
    if isinstance(inst, MicroVMInstance):
        return inst.proc.alive()
    assert isinstance(inst, VMInstance)
    return inst.qemu_pid() is not None


def _kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/self/status")


def measured(fn: Callable[[], Any]) -> tuple[Any, float, float, float]:
    """(result or exception, seconds, MiB the peak RSS grew, peak RSS MiB)."""
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    base = _kib("VmRSS")
    t0 = time.monotonic()
    try:
        out: Any = fn()
    except Exception as exc:  # returned for the caller to check
        out = exc
    took = time.monotonic() - t0
    peak = _kib("VmHWM")
    return out, took, (peak - base) / 1024, peak / 1024


def assert_dead_and_stopped(inst: Instance) -> None:
    with pytest.raises(SandboxDeadError):
        inst.exec(["true"])
    with pytest.raises(SandboxDeadError):
        inst.get_file("/etc/hostname")
    deadline = time.monotonic() + 15
    while qemu_alive(inst) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not qemu_alive(inst), "the hung guest's QEMU still runs"


# ---- 3. bounded transfers ------------------------------------------------------------------


def test_reads_from_a_hostile_guest_stay_bounded(guest: Instance, hostile: bytes) -> None:
    """The default workload's traps are refused before anything is sent; a
    forged endless DATA stream ends at the 64 MiB cap; RSS grows by at
    most the cap plus slack."""
    r = guest.exec(["sh", "-c", "ln -s /dev/zero /tmp/zero && truncate -s 50G /tmp/sparse50g"])
    assert r.ok, (r.termination, r.stderr)
    for path, error in (("/tmp/zero", NotRegularFileError), ("/tmp/sparse50g", FileTooLargeError)):
        out, took, grew, peak = measured(lambda p=path: guest.get_file(p))  # type: ignore[misc]
        print(f"{guest.tier_name} read {path}: {out!r:.120} in {took:.2f} s, +{grew:.0f} MiB")
        assert isinstance(out, error), out
        assert took < 5 and grew < 24, f"host RSS +{grew:.0f} MiB, peak {peak:.0f} MiB"

    take_over(guest, hostile, "flood")
    out, took, grew, peak = measured(lambda: guest.get_file("/etc/hostname"))
    print(f"{guest.tier_name} forged stream: {out!r:.160} in {took:.1f} s, +{grew:.0f} MiB, "
          f"peak {peak:.0f} MiB")  # fmt: skip
    assert isinstance(out, FileTooLargeError), out
    assert "more than the max_bytes cap" in str(out)
    assert grew < RSS_GROWTH_LIMIT_MIB, f"host RSS +{grew:.0f} MiB, peak {peak:.0f} MiB"
    assert took < 60


# ---- 4. deadlines ------------------------------------------------------------------------------


def test_a_deaf_agent_fails_a_big_put_within_its_deadline(
    guest: Instance, hostile: bytes, short_waits: None
) -> None:
    """32 MiB to an agent that reads nothing: the send times out (it used to
    block 150 s+), the sandbox is dead and its QEMU stopped."""
    take_over(guest, hostile, "deaf")
    limit_s = CALL_S + 32 / 20 + 3
    out, took, _, _ = measured(lambda: guest.put_file("/tmp/big", b"\0" * (32 * MIB)))
    print(f"{guest.tier_name} put to a deaf agent: {out!r:.300} in {took:.1f} s")
    assert isinstance(out, SandboxDeadError), out
    assert took < limit_s, took
    assert_dead_and_stopped(guest)


@pytest.mark.parametrize("tier", TIER_PARAMS)
def test_exec_without_timeout_ends_when_the_agent_goes_silent(
    tier: str, hostile: bytes, short_waits: None
) -> None:
    """``timeout_s=None`` on a silent agent: the liveness watch (STATS after
    LIVENESS_S of silence) ends it instead of waiting forever."""
    inst = make(tier, timeout_s=None)
    try:
        take_over(inst, hostile, "deaf")
        t0 = time.monotonic()
        r = inst.exec(["sleep", "1000"], timeout_s=None)
        took = time.monotonic() - t0
        print(f"{tier} exec on a silent agent: {r.termination.describe()} in {took:.1f} s")
        assert r.termination.kind is TerminationKind.TIMED_OUT
        assert "stopped answering" in r.termination.describe()
        assert took < agent_mod.LIVENESS_S + agent_mod.LIVENESS_ANSWER_S + 5
        assert_dead_and_stopped(inst)
    finally:
        inst.close()


# ---- 7. impossible fields ------------------------------------------------------------------


def test_an_impossible_exit_is_a_dead_agent(guest: Instance, hostile: bytes) -> None:
    """EXIT with signal=-5: not passed on as a result; the agent is dead,
    the VM stopped, and the error names the field."""
    take_over(guest, hostile, "badexit")
    r = guest.exec(["true"])
    text = r.termination.describe()
    print(f"{guest.tier_name} EXIT signal=-5: {text}")
    assert r.termination.kind is TerminationKind.TIMED_OUT
    assert "broke the protocol" in text and "signal='-5'" in text
    assert r.exit_code != 0
    assert_dead_and_stopped(guest)


# ---- 6. guest text on the terminal ---------------------------------------------------------


def _cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "COLUMNS": "300", "TERM": "xterm"}
    return subprocess.run(
        [sys.executable, "-m", "tierbox.cli", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )


def _assert_literal(text: bytes, what: str) -> None:
    shown = text.decode(errors="replace")
    assert "\x1b" not in shown and "\x07" not in shown, f"{what}: raw escapes reach the terminal"
    assert "MarkupError" not in shown and "Traceback" not in shown, f"{what}: {shown}"
    assert "[/bold]" in shown and "\\x1b[2J" in shown, f"{what}: {shown}"


def test_cli_prints_guest_text_literally(hostile: bytes, tmp_path: Path) -> None:
    """An error text and a process name from the guest holding ``[/bold]``
    and terminal escapes: the CLI prints them as text, escapes shown."""
    require_tier("microvm")
    require_image(IMAGE)
    made = _cli("sandbox", "create", "--tier", "microvm", "--ttl", "10m", IMAGE)
    assert made.returncode == 0, made.stderr
    sid = made.stdout.decode().strip().splitlines()[-1]
    try:
        binary = tmp_path / "hostile_agent"
        binary.write_bytes(hostile)
        binary.chmod(0o755)
        r = _cli("sandbox", "cp", str(binary), f"{sid}:/tmp/hostile_agent")
        assert r.returncode == 0, r.stderr
        r = _cli("sandbox", "exec", "-u", "0", sid, "/tmp/hostile_agent", "markup", "300")
        assert r.returncode == 0, r.stderr
        time.sleep(2.0)
        got = _cli("sandbox", "cp", f"{sid}:/etc/hostname", "-")
        print(got.stderr.decode(errors="replace"))
        assert got.returncode == 125, got
        _assert_literal(got.stderr, "an error from the guest")
        shown = _cli("sandbox", "inspect", sid)
        print(shown.stdout.decode(errors="replace")[-600:], shown.stderr.decode()[-400:])
        assert shown.returncode == 0, shown.stderr
        _assert_literal(shown.stdout, "a process name from the guest")
    finally:
        _cli("sandbox", "rm", sid)


def test_console_helpers_escape_everything_from_a_sandbox() -> None:
    """The CLI's consoles themselves: strings (tables included) print
    literally, with control characters escaped."""
    from rich.table import Table

    from tierbox.cli_common import PlainConsole, error_text, plain

    con = PlainConsole(record=True, width=300, force_terminal=True)
    table = Table("name")
    table.add_row(EVIL)
    con.print(EVIL)
    con.print(table)
    con.print(error_text(SandboxError(EVIL)))
    text = con.export_text(styles=False)
    assert text.count("[/bold]") == 3 and "\x1b" not in text and "\x07" not in text
    assert plain("a\tb\nc\rd\x9b") == "a\tb\nc\\x0dd\\x9b"


# ---- 5. the console log ------------------------------------------------------------------


@pytest.mark.slow
def test_a_console_flood_stays_under_the_cap(guest: Instance, hostile: bytes) -> None:
    """12 MiB written by a guest root to /dev/ttyS0 (more than either cap: a
    serial port under TCG takes seconds per MiB): the console log stays under
    its cap and the sandbox keeps working."""
    guest.put_file("/tmp/hostile_agent", hostile, mode=0o755)
    done: dict[str, Any] = {}

    def flood() -> None:
        done["r"] = guest.exec(["/tmp/hostile_agent", "console", "12"], user="0", timeout_s=400)

    t = threading.Thread(target=flood)
    t.start()
    t.join(420)
    r = done["r"]
    assert r.ok, (r.termination, r.stderr)
    log = console_files(guest)
    total = sum(p.stat().st_size for p in log)
    print(f"{guest.tier_name} console after 12 MiB: {[(p.name, p.stat().st_size) for p in log]}")
    assert total <= console_cap_bytes(guest), total
    assert guest.exec(["echo", "still here"]).stdout == b"still here\n"


def console_files(inst: Instance) -> list[Path]:
    """The console log and what was rotated out of it."""
    if isinstance(inst, MicroVMInstance):
        main = inst.proc.files.console
    else:
        assert isinstance(inst, VMInstance)
        main = Path(inst.meta.console)
    return [p for p in main.parent.iterdir() if p.name.startswith(main.name)]


def console_cap_bytes(inst: Instance) -> int:
    """microVM: tierbox's console writer; VM: virtlogd's defaults (max_size
    2 MiB, max_backups 3: four files)."""
    if isinstance(inst, MicroVMInstance):
        return console_log.CONSOLE_CAP_BYTES
    return 4 * (2 << 20)
