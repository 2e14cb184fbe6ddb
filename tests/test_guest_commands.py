"""Commands in guests (microvm and vm tiers) side by side, through the agent's
protocol 3: background and foreground commands, files and stats at once;
stdin fed later; signals; leftovers that outlive their command; terminals;
process listings. Real guests (one per tier for the module, TCG here), plus
a fake guest on a socket for what a real one cannot be made to do: speak an
older protocol, or send garbage.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import require_image, require_tier, wait_until
from tierbox import make_spec
from tierbox.errors import AgentError, AgentTimeoutError, AgentTooOldError, SandboxError
from tierbox.runloop import adrive, drive, reactor
from tierbox.spec import ExecResult, TerminationKind
from tierbox.tiers import get_tier
from tierbox.tiers.base import Instance
from tierbox.tiers.commands import Command
from tierbox.vmm import agent as ag
from tierbox.vmm.line import HEADER, MAGIC, MAX_FRAME, RECV_BYTES

pytestmark = pytest.mark.timeout(600)
IMAGE = "busybox:latest"
#: Generous bounds for a guest under TCG on 2 shared cores.
PROMPT_S = 3.0


@pytest.fixture(scope="module", params=["microvm", "vm"])
def box(request: pytest.FixtureRequest) -> Iterator[Instance]:
    name = request.param
    require_tier(name)
    require_image(IMAGE)
    memory = 128 if name == "microvm" else 256
    inst = get_tier(name).create(make_spec(IMAGE, memory_mib=memory, timeout_s=60))
    try:
        yield inst
    finally:
        qemus = inst.host_pids()
        inst.close()
    # whatever ran in the guest (the leftovers below) went with it
    wait_until(
        lambda: not any(_running(p) for p in qemus), timeout_s=20, what=f"QEMU {qemus} to exit"
    )


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def moved(cmd: Command) -> threading.Event:
    """Give ``cmd``'s pump to the reactor (as a background run does); the
    event is set when it is done."""
    done = threading.Event()
    reactor().submit(cmd.pump(), done.set)
    return done


def finished(cmd: Command, done: threading.Event) -> ExecResult:
    assert done.wait(30), "the command did not end"
    return cmd.result()


def test_background_command_blocks_nothing(box: Instance) -> None:
    bg = box.start(["sleep", "5"])
    t0 = time.monotonic()
    try:
        r = box.exec(["echo", "foreground"])
        exec_s = time.monotonic() - t0
        box.put_file("/tmp/side.txt", b"side by side\n")
        assert box.get_file("/tmp/side.txt") == b"side by side\n"
        files_s = time.monotonic() - t0 - exec_s
        st = box.stats()
        all_s = time.monotonic() - t0
        assert r.stdout == b"foreground\n" and r.ok
        assert st.pids and st.pids > 0
        assert not bg.pump().done, "the background sleep ended before the others"
        assert exec_s < PROMPT_S and all_s < PROMPT_S, (exec_s, files_s, all_s)
    finally:
        bg.kill()
    r = bg.wait_here()
    assert r.termination.signal == signal.SIGKILL, r


def test_two_commands_stream_to_their_own_callbacks(box: Instance) -> None:
    seen: list[tuple[str, bytes]] = []
    script = "for i in 1 2 3 4; do echo {0}$i; sleep 0.3; done"

    def run(tag: str) -> object:
        def got(chunk: bytes) -> None:
            assert threading.current_thread() is threading.main_thread()  # the loop's thread
            seen.append((tag, chunk))

        return box.start(["sh", "-c", script.format(tag)], on_stdout=got)

    a, b = run("a"), run("b")
    threads = threading.active_count()
    where: set[str] = set()

    async def both() -> None:  # one event loop waits on both: no thread per command
        where.add(threading.current_thread().name)
        await asyncio.gather(adrive(a.pump()), adrive(b.pump()))  # type: ignore[attr-defined]
        where.add("more threads" if threading.active_count() > threads else "no new thread")

    asyncio.run(both())
    assert where == {threading.main_thread().name, "no new thread"}, where
    ra, rb = a.result(), b.result()  # type: ignore[attr-defined]
    assert ra.stdout == b"a1\na2\na3\na4\n" and rb.stdout == b"b1\nb2\nb3\nb4\n"
    assert all(chunk.startswith(tag.encode()) for tag, chunk in seen)
    order = "".join(tag for tag, _ in seen)
    assert "ab" in order and "ba" in order, f"not interleaved: {order}"


def test_stdin_sent_later_then_closed(box: Instance) -> None:
    got: list[bytes] = []
    cat = box.start(["cat"], keep_stdin_open=True, on_stdout=got.append)
    done = moved(cat)
    t0 = time.monotonic()
    cat.send_stdin(b"first\n")
    wait_until(lambda: b"first\n" in b"".join(got), timeout_s=PROMPT_S, what="cat's echo")
    round_trip_s = time.monotonic() - t0
    cat.send_stdin(b"second\n")
    cat.close_stdin()
    r = finished(cat, done)
    assert r.ok and r.stdout == b"first\nsecond\n", r
    ms = round_trip_s * 1000
    print(f"\n{box.tier_name}: stdin -> guest cat -> callback round trip {ms:.1f} ms")
    # more than the stdin window: the agent's ACKs give the credit back
    wc = box.start(["wc", "-c"], keep_stdin_open=True)
    done = moved(wc)
    for _ in range(6):
        wc.send_stdin(b"x" * 500_000)
    wc.close_stdin()
    r = finished(wc, done)
    assert r.ok and r.stdout.split() == [b"3000000"], r
    with pytest.raises(SandboxError, match="stdin is closed"):
        wc.send_stdin(b"late")


def test_kill_sends_the_signal_asked_for(box: Instance) -> None:
    cmd = box.start(["sleep", "100"])
    assert cmd.pid and cmd.pid > 1
    t0 = time.monotonic()
    cmd.kill(signal.SIGTERM)
    r = cmd.wait_here()
    assert r.termination.kind is TerminationKind.SIGNALED
    assert r.termination.signal == signal.SIGTERM
    assert time.monotonic() - t0 < PROMPT_S


def test_leftovers_outlive_their_command(box: Instance) -> None:
    r = box.exec(["sh", "-c", "sleep 300 & echo $!"])
    assert r.ok, r
    left = int(r.stdout)
    # still there at the next exec, as in a container
    r = box.exec(["sh", "-c", f"kill -0 {left} && echo running"])
    assert r.stdout == b"running\n", r
    procs = box.processes()
    assert any(p.pid == left and p.argv == ["sleep", "300"] for p in procs), procs
    box.exec(["kill", str(left)])


def test_processes_lists_a_background_sleep(box: Instance) -> None:
    bg = box.start(["sleep", "31"])
    try:
        pid = bg.pid
        procs = box.processes()
        mine = [p for p in procs if p.pid == pid]
        assert mine and mine[0].argv == ["sleep", "31"], procs
        assert mine[0].state in "SR" and mine[0].ppid == 1
        assert all(p.pid != 1 for p in procs)  # the agent is not the workload
        assert not any(p.argv == [] and p.state != "Z" for p in procs)  # no kernel threads
    finally:
        bg.kill()
        bg.wait_here()


def test_a_command_on_a_terminal(box: Instance) -> None:
    r = box.start(["sh", "-c", "tty -s && echo yes"], tty=True).wait_here()
    assert r.ok and r.stdout == b"yes\r\n" and r.stderr == b"", r
    out: list[bytes] = []
    sh = box.start(["sh"], tty=True, on_stdout=out.append)
    done = moved(sh)
    sh.resize(30, 100)
    sh.send_stdin(b"stty size; echo err >&2\n")
    wait_until(lambda: b"30 100" in b"".join(out), timeout_s=PROMPT_S, what="stty size")
    # the next line is typed only once this one's output is in: the terminal
    # echoes type-ahead at once, between the shell's writes
    wait_until(lambda: b"err\r\n" in b"".join(out), timeout_s=PROMPT_S, what="echo err")
    sh.send_stdin(b"sleep 50\n")
    wait_until(lambda: b"sleep 50" in b"".join(out), timeout_s=PROMPT_S, what="the echo")
    time.sleep(0.2)
    # Ctrl-C reaches the foreground job, not the shell: the echo's output (a
    # line of its own, not the terminal's echo of the typed command) comes
    # long before sleep's 50 s. A Ctrl-C that lands before the shell made
    # sleep the foreground job goes to the shell, which ignores it (a TCG
    # guest is slow to get there): pressed again, as a user would.
    for press in range(3):
        sh.send_stdin(b"\x03")
        sh.send_stdin(b"echo after-interrupt\n")
        try:
            wait_until(
                lambda: b"\nafter-interrupt\r\n" in b"".join(out),
                timeout_s=PROMPT_S * 2,
                what="the shell after Ctrl-C",
            )
            break
        except AssertionError:
            if press == 2:
                raise
    sh.close_stdin()  # the terminal's end of input: the shell exits
    r = finished(sh, done)
    assert r.exit_code == 0, r
    assert b"err\r\n" in r.stdout  # one stream on a terminal


def test_a_new_connection_ends_the_pipes_of_the_old_ones(box: Instance) -> None:
    """The guest cannot always tell when a host left (its first frames can
    arrive before the guest sees the previous host go): each connection says
    so itself, and commands of earlier ones lose their pipes, as a
    container's exec does when the process that ran it dies."""
    box.exec(["rm", "-f", "/tmp/eof"])
    cat = box.start(["sh", "-c", "cat; echo stdin-ended > /tmp/eof"], keep_stdin_open=True)
    assert cat.pid
    agent: ag.AgentClient = box.agent  # type: ignore[attr-defined]
    agent.close("the test reopened the agent line")
    agent.connect(deadline=time.monotonic() + 10, alive=lambda: True)
    r = cat.wait_here()
    assert r.termination.kind is TerminationKind.SIGNALED
    assert "reopened the agent line" in r.termination.evidence["vmm"], r
    wait_until(
        lambda: box.exec(["cat", "/tmp/eof"]).stdout == b"stdin-ended\n",
        timeout_s=PROMPT_S,
        what="cat to see the end of its stdin",
    )
    assert box.exec(["echo", "still usable"]).stdout == b"still usable\n"


def test_an_older_agent_is_refused_with_a_clear_error(box: Instance) -> None:
    agent: ag.AgentClient = box.agent  # type: ignore[attr-defined]
    hold = box.start(["sleep", "30"])  # keeps the line (a vm hands an idle one back)
    try:
        assert agent.version == ag.PROTOCOL
        agent.version = 2  # what HELLO says in a guest made by an older tierbox
        with pytest.raises(AgentTooOldError, match=r"protocol 2.*create a new one"):
            box.exec(["true"])
        with pytest.raises(AgentTooOldError):
            box.processes()
    finally:
        agent.version = ag.PROTOCOL
        hold.kill()
        hold.wait_here()
    assert box.exec(["true"]).ok


# ---- a fake guest on the line ------------------------------------------------------------


class FakeGuest:
    """Plays the guest's end of the agent socket: answers HELLO, then lets a
    test script what else it sends."""

    def __init__(self, path: Path, version: int = ag.PROTOCOL) -> None:
        self.version = version
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.conn: socket.socket | None = None
        self.requests: list[tuple[int, int, bytes]] = []
        self.on_request: dict[int, Callable[[int], None]] = {}
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def send(self, ftype: int, fid: int, payload: bytes = b"") -> None:
        assert self.conn is not None
        self.conn.sendall(HEADER.pack(MAGIC, ftype, fid, len(payload)) + payload)

    def _serve(self) -> None:
        self.conn, _ = self.srv.accept()
        buf = b""
        while True:
            try:
                chunk = self.conn.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while len(buf) >= HEADER.size:
                _, ftype, fid, n = HEADER.unpack_from(buf)
                if len(buf) < HEADER.size + n:
                    break
                payload, buf = buf[HEADER.size : HEADER.size + n], buf[HEADER.size + n :]
                self.requests.append((ftype, fid, payload))
                if ftype == ag.T_HELLO:
                    self.send(ag.T_OK, fid, f"agent={self.version}\nnonce=".encode() + payload)
                elif ftype in self.on_request:
                    threading.Thread(
                        target=self.on_request[ftype], args=(fid,), daemon=True
                    ).start()

    def close(self) -> None:
        for s in (self.conn, self.srv):
            if s is not None:
                s.close()


def _client(tmp_path: Path, guest: FakeGuest) -> ag.AgentClient:
    client = ag.AgentClient(tmp_path / "agent.sock")
    client.connect(deadline=time.monotonic() + 5, alive=lambda: True)
    return client


def _start(client: ag.AgentClient, *, cap: int, host_deadline: float | None) -> ag.GuestExec:
    return client.start(
        ["true"],
        env={},
        workdir="/",
        uid=0,
        gid=0,
        stdin=None,
        keep_stdin_open=False,
        tty=False,
        timeout_s=1,
        output_bytes=cap,
        pids_max=None,
        host_deadline=host_deadline,
    )


def test_an_older_agent_is_refused_by_the_client(tmp_path: Path) -> None:
    guest = FakeGuest(tmp_path / "agent.sock", version=2)
    client = _client(tmp_path, guest)
    try:
        with pytest.raises(AgentTooOldError, match="protocol 2"):
            _start(client, cap=100, host_deadline=None)
        with pytest.raises(AgentTooOldError):
            client.get("/etc/hostname", uid=0, gid=0, max_bytes=100, idle_timeout_s=5)
        assert not any(t == ag.T_EXEC for t, _, _ in guest.requests)  # nothing it would misread
    finally:
        client.close()
        guest.close()


def test_a_hostile_guest_cannot_make_the_host_grow_or_hang(tmp_path: Path) -> None:
    guest = FakeGuest(tmp_path / "agent.sock")
    flood_bytes = 0
    flooded = threading.Event()

    def hostile_exec(fid: int) -> None:
        nonlocal flood_bytes
        junk = os.urandom(1 << 20)
        guest.send(ag.T_STARTED, fid, struct.pack("<I", 42))
        for _ in range(40):  # 40 MiB of garbage, and headers that lie
            assert guest.conn is not None
            guest.conn.sendall(junk)
            guest.conn.sendall(HEADER.pack(MAGIC, ag.T_STDOUT, fid, MAX_FRAME + 1))
            flood_bytes += len(junk)
        chunk = b"o" * (256 << 10)
        for _ in range(200):  # 50 MiB of output for a cap of 64 KiB
            guest.send(ag.T_STDOUT, fid, chunk)
            guest.send(ag.T_DATA, fid ^ 0x5A5A, chunk)  # for nobody
            flood_bytes += 2 * len(chunk)
        assert guest.conn is not None
        guest.conn.sendall(HEADER.pack(MAGIC, ag.T_EXIT, fid, 1000))  # half a frame, then silence
        flooded.set()

    guest.on_request[ag.T_EXEC] = hostile_exec
    client = _client(tmp_path, guest)
    try:
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.monotonic()
        cmd = _start(client, cap=64 << 10, host_deadline=t0 + 4)
        drive(cmd)
        took = time.monotonic() - t0
        with pytest.raises(AgentTimeoutError, match="stopped answering"):
            cmd.outcome()
        assert took < 4 + ag.KILL_ANSWER_S + 2, took
        assert flooded.wait(30)
        assert flood_bytes >= 80 << 20
        assert cmd.pid == 42
        assert client.line().buffered <= MAX_FRAME + HEADER.size + RECV_BYTES
        assert any(t == ag.T_KILL and fid == cmd.fid for t, fid, _ in guest.requests)
        grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        assert grew_mib < 64, f"the host grew {grew_mib:.0f} MiB"

        # a stream answered past its cap is cut at the cap; a reply that never
        # comes times out at its deadline; the line still works after both
        def hostile_get(fid: int) -> None:
            for _ in range(64):
                guest.send(ag.T_DATA, fid, b"d" * (256 << 10))

        guest.on_request[ag.T_GET] = hostile_get
        with pytest.raises(AgentError, match="more than the max_bytes cap"):
            client.get("/x", uid=0, gid=0, max_bytes=1000, idle_timeout_s=5)
        t0 = time.monotonic()
        with pytest.raises(AgentTimeoutError):
            client.stats(deadline=t0 + 1)
        assert time.monotonic() - t0 < 3
        assert client.hello(deadline=time.monotonic() + 5)["agent"] == str(ag.PROTOCOL)
    finally:
        client.close()
        guest.close()
