"""The CLI with Docker's habits, run as a user runs it, on real engines:
run's flags, pseudo-terminals (through tmux for the interactive shell),
docker cp placement, logs -f, inspect, --version, tier names, help text."""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TIERBOX, require_image, require_tier, wait_until
from tierbox.tiers import get_tier

IMAGE = "busybox"


def tb(
    *args: str,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*TIERBOX, *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def text(p: subprocess.CompletedProcess[bytes]) -> str:
    return p.stdout.decode()


@pytest.fixture
def container() -> None:
    require_tier("container")
    require_image(IMAGE)


@pytest.fixture
def kept(container: None) -> Iterator[str]:
    """A kept container sandbox, removed at the end."""
    p = tb("sandbox", "create", IMAGE)
    assert p.returncode == 0, p.stderr
    sid = text(p).strip()
    try:
        yield sid
    finally:
        tb("sandbox", "rm", sid)


# ---- small things ------------------------------------------------------------------------


def test_version() -> None:
    from importlib.metadata import version

    p = tb("--version")
    assert p.returncode == 0
    assert text(p).strip() == f"tierbox {version('tierbox')}"


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["run", "--help"],
        ["sandbox", "exec", "--help"],
        ["sandbox", "cp", "--help"],
        ["image", "import", "--help"],
        ["vm", "console", "--help"],
    ],
)
def test_help_shows_metavars_not_python_types(args: list[str]) -> None:
    p = tb(*args, env={"COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    out = text(p)
    for noise in ("<bool>", "<str>", "<int>", "<float>", "<list", "<path>", "{"):
        assert noise not in out, (noise, out)
    if args == ["run", "--help"]:
        assert "run [OPTIONS] IMAGE [COMMAND]..." in out
        for flag in ("--tty", "-t", "-T", "--pids-limit", "--env-file", "-v", "-w", "-u"):
            assert flag in out


def test_tier_names_in_any_case_and_a_suggestion_for_typos(container: None) -> None:
    p = tb("run", "-T", "CONTAINER", IMAGE, "--", "echo", "ok")
    assert (p.returncode, p.stdout) == (0, b"ok\n"), p.stderr
    p = tb("run", "--tier", "Container", IMAGE, "--", "true")
    assert p.returncode == 0, p.stderr
    p = tb("run", "--tier", "contaner", IMAGE, "--", "true")
    assert p.returncode == 2
    assert b"unknown tier 'contaner': did you mean container?" in p.stderr
    p = tb("sandbox", "create", "--tier", "gviosr", IMAGE)
    assert p.returncode == 2 and b"did you mean gvisor?" in p.stderr
    p = tb("run", "--tier", "zzz", IMAGE, "--", "true")
    assert p.returncode == 2 and b"did you mean" not in p.stderr and b"unknown tier" in p.stderr


# ---- run's flags ---------------------------------------------------------------------------


def test_limits_flags(container: None) -> None:
    name = f"tbdocker-{secrets.token_hex(3)}"
    p = tb(
        "sandbox",
        "create",
        "-m",
        "64m",
        "--cpus",
        "0.5",
        "--pids-limit",
        "16",
        "--name",
        name,
        IMAGE,
    )
    assert p.returncode == 0, p.stderr
    try:
        info = json.loads(text(tb("sandbox", "inspect", name, "--json")))
        assert info["limits"]["memory_mib"] == 64
        assert info["limits"]["cpus"] == 0.5
        assert info["limits"]["pids"] == 16
        # the pids limit holds: 20 more processes cannot all start
        r = tb(
            "sandbox",
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "for i in $(seq 20); do sleep 3 & done; wait; echo done",
        )
        assert b"can't fork" in r.stderr or b"Resource" in r.stderr, r.stderr
    finally:
        tb("sandbox", "rm", name)
    # a memory limit holds in a one-shot run too, and the status says so
    p = tb("run", "-m", "32m", IMAGE, "--", "sh", "-c", "a=xxxxxxxx; while :; do a=$a$a; done")
    assert p.returncode == 137 and b"out of memory" in p.stderr


def test_env_flags_as_docker_reads_them(container: None, tmp_path: Path) -> None:
    env_file = tmp_path / "app.env"
    env_file.write_text(
        "# a comment\n"
        "\n"
        "FROM_FILE=literal 'quotes' \"kept\" $NOT_EXPANDED\n"
        "   INDENTED=yes\n"
        "OVERRIDDEN=file\n"
        "PASSED_THROUGH\n"
        "NOT_SET_ANYWHERE\n"
    )
    p = tb(
        "run",
        "--env-file",
        str(env_file),
        "-e",
        "OVERRIDDEN=flag",
        "-e",
        "FROM_SHELL",
        "-e",
        "ALSO_NOT_SET",
        "-e",
        "EMPTY=",
        IMAGE,
        "--",
        "env",
        env={"FROM_SHELL": "shell value", "PASSED_THROUGH": "through"},
    )
    assert p.returncode == 0, p.stderr
    env = dict(line.split("=", 1) for line in text(p).splitlines())
    assert env["FROM_FILE"] == "literal 'quotes' \"kept\" $NOT_EXPANDED"
    assert env["INDENTED"] == "yes"
    assert env["OVERRIDDEN"] == "flag"
    assert env["PASSED_THROUGH"] == "through"
    assert env["FROM_SHELL"] == "shell value"
    assert env["EMPTY"] == ""
    assert "NOT_SET_ANYWHERE" not in env and "ALSO_NOT_SET" not in env
    env_file.write_text("BAD KEY=1\n")
    p = tb("run", "--env-file", str(env_file), IMAGE, "--", "true")
    assert p.returncode == 2 and b"contains whitespace" in p.stderr
    p = tb("run", "--env-file", str(tmp_path / "missing.env"), IMAGE, "--", "true")
    assert p.returncode == 2 and b"missing.env" in p.stderr


def test_volumes_read_write_and_read_only(container: None, tmp_path: Path) -> None:
    host = tmp_path / "shared"
    host.mkdir()
    host.chmod(0o777)
    (host / "in.txt").write_text("from the host\n")
    p = tb(
        "run",
        "-v",
        f"{host}:/data",
        IMAGE,
        "--",
        "sh",
        "-c",
        "cat /data/in.txt; echo hi > /data/out.txt",
    )
    assert (p.returncode, p.stdout) == (0, b"from the host\n"), p.stderr
    assert (host / "out.txt").read_text() == "hi\n"
    p = tb("run", "-v", f"{host}:/data:ro", IMAGE, "--", "sh", "-c", "echo no > /data/ro.txt")
    assert p.returncode != 0 and b"Read-only" in p.stderr
    assert not (host / "ro.txt").exists()
    p = tb("run", "-v", "no-colon", IMAGE, "--", "true")
    assert p.returncode == 2 and b"HOST:PATH" in p.stderr


def test_workdir_user_and_rm(container: None) -> None:
    p = tb(
        "run", "--rm", "-w", "/tmp", "-u", "1234:2345", IMAGE, "--", "sh", "-c", "pwd; id -u; id -g"
    )
    assert (p.returncode, text(p).split()) == (0, ["/tmp", "1234", "2345"]), p.stderr
    p = tb("run", "-T", "process", "-w", "/usr", "busybox", "--", "pwd")
    assert (p.returncode, p.stdout) == (0, b"/usr\n"), p.stderr


def test_name_is_usable_while_the_run_lasts(container: None) -> None:
    name = f"tbrun-{secrets.token_hex(3)}"
    proc = subprocess.Popen(
        [*TIERBOX, "run", "--name", name, IMAGE, "--", "sh", "-c", "sleep 4; echo done"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(
            lambda: name in [s["name"] for s in json.loads(text(tb("sandbox", "ls", "--json")))],
            timeout_s=30,
            what="the named run to be listed",
        )
        p = tb("sandbox", "exec", name, "--", "echo", "reached by name")
        assert (p.returncode, p.stdout) == (0, b"reached by name\n"), p.stderr
        stdout, _ = proc.communicate(timeout=60)
        assert (proc.returncode, stdout) == (0, b"done\n")
    finally:
        if proc.poll() is None:
            proc.kill()
    listed = [s["name"] for s in json.loads(text(tb("sandbox", "ls", "--json")))]
    assert name not in listed


@pytest.mark.parametrize("tier", ["container", "process"])
def test_output_streams_as_it_comes(tier: str) -> None:
    require_tier(tier)
    require_image(IMAGE)
    proc = subprocess.Popen(
        [
            *TIERBOX,
            "run",
            "-T",
            tier,
            IMAGE,
            "--",
            "sh",
            "-c",
            "echo first; sleep 5; echo second; exit 3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "no output within 30 s"
        assert proc.stdout.readline() == b"first\n"
        assert proc.poll() is None, "the first line came only at the end"
        rest, _ = proc.communicate(timeout=60)
        assert rest == b"second\n" and proc.returncode == 3
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- pseudo-terminals -------------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["container", "process"])
def test_run_t_puts_the_command_on_a_pty(tier: str) -> None:
    require_tier(tier)
    require_image(IMAGE)
    p = tb(
        "run",
        "-T",
        tier,
        "-t",
        IMAGE,
        "--",
        "sh",
        "-c",
        "tty; stty size; echo out; echo err >&2; exit 5",
    )
    assert p.returncode == 5, p.stderr
    lines = text(p).split("\r\n")
    assert re.fullmatch(r"/dev/pts/\d+", lines[0]), lines
    assert lines[1:4] == ["24 80", "out", "err"]  # one stream, as on any terminal


def test_run_t_on_gvisor() -> None:
    require_tier("gvisor")
    require_image(IMAGE)
    p = tb(
        "run", "-T", "gvisor", "-t", IMAGE, "--", "sh", "-c", "test -t 0 && test -t 1 && stty size"
    )
    assert (p.returncode, p.stdout) == (0, b"24 80\r\n"), p.stderr


def test_exec_t_without_i(kept: str) -> None:
    p = tb("sandbox", "exec", "-t", kept, "--", "tty")
    assert p.returncode == 0, p.stderr
    assert re.fullmatch(rb"/dev/pts/\d+\r\n", p.stdout), p.stdout
    p = tb("sandbox", "exec", "-t", "--json", kept, "--", "tty")
    assert p.returncode == 2 and b"--json and --tty" in p.stderr


class Tmux:
    """A detached tmux session on a private server, as a user's terminal."""

    def __init__(self, command: list[str], *, width: int = 100, height: int = 30) -> None:
        if shutil.which("tmux") is None:
            pytest.fail(
                "tmux is missing: `make setup` installs it (scripts/setup.d/80-cli.packages)"
            )
        self.server = f"tierbox-test-{os.getpid()}-{secrets.token_hex(3)}"
        shell = " ".join(_quote(a) for a in command) + "; echo EXITED $?; sleep 600"
        self.tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height), shell)

    def tmux(self, *args: str) -> str:
        p = subprocess.run(
            ["tmux", "-L", self.server, *args], capture_output=True, text=True, timeout=30
        )
        assert p.returncode == 0, (args, p.stderr)
        return p.stdout

    def send(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "t", "-S", "-200")

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen().splitlines()]

    def wait_line(self, line: str, timeout_s: float = 30) -> None:
        wait_until(
            lambda: line in self.lines(),
            timeout_s=timeout_s,
            what=f"the line {line!r} on the terminal:\n{self.screen()}",
        )

    def wait_prompt(self, *, after: str | None = None, timeout_s: float = 60) -> None:
        """Until a shell prompt shows (below the line ``after``, if given):
        what is typed before it may be lost, on any terminal (the shell sets
        its line editing up first, a Ctrl-C flushes the input queue)."""

        def prompted() -> bool:
            lines = self.lines()
            if after is not None:
                if after not in lines:
                    return False
                lines = lines[len(lines) - lines[::-1].index(after) :]
            return any(line.endswith(("$", "#")) for line in lines)

        wait_until(
            prompted, timeout_s=timeout_s, what=f"a prompt on the terminal:\n{self.screen()}"
        )

    def resize(self, width: int, height: int) -> None:
        self.tmux("resize-window", "-t", "t", "-x", str(width), "-y", str(height))

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.server, "kill-server"], capture_output=True, timeout=30)


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def _interrupt(term: Tmux, *, after: str, presses: int = 3, wait_s: float = 9) -> None:
    """Press Ctrl-C until the prompt is back (at most ``presses`` times), as a
    user would: a Ctrl-C that lands after the shell printed ``after`` but
    before it made ``sleep`` the terminal's foreground job goes to the shell
    itself, which (being interactive) ignores it. The sleep runs 100 s, so a
    prompt within ``presses * wait_s`` seconds means a Ctrl-C interrupted it."""
    for press in range(presses):
        term.send("C-c")
        try:
            term.wait_prompt(after=after, timeout_s=wait_s)
            return
        except AssertionError:
            if press == presses - 1:
                raise


@pytest.mark.parametrize("tier", ["container", "gvisor", "process", "microvm", "vm"])
@pytest.mark.parametrize("how", ["shell", "exec -it"])
def test_interactive_shell_through_tmux(tier: str, how: str) -> None:
    require_tier(tier)
    require_image(IMAGE)
    assert get_tier(tier).capabilities.tty, f"the {tier} tier lost its terminals"
    p = tb("sandbox", "create", "-T", tier, IMAGE)
    assert p.returncode == 0, p.stderr
    sid = text(p).strip()
    if how == "shell":
        command = [*TIERBOX, "sandbox", "shell", sid]
    else:
        command = [*TIERBOX, "sandbox", "exec", "-it", sid, "--", "sh"]
    term = Tmux(command)
    try:
        term.wait_prompt()
        term.send("echo $((6*7))", "Enter")
        term.wait_line("42")
        # the window's size reaches the sandbox's terminal
        term.resize(132, 43)
        term.send("stty size", "Enter")
        term.wait_line("43 132")
        # Ctrl-C interrupts the sandbox's foreground job, and the shell survives
        term.send("echo sleeping-$((5*5)); sleep 100", "Enter")
        term.wait_line("sleeping-25")
        started = time.monotonic()
        _interrupt(term, after="sleeping-25")
        assert time.monotonic() - started < 30, "Ctrl-C did not interrupt sleep 100"
        term.send("echo still $((1+1))", "Enter")
        term.wait_line("still 2")
        term.send("exit 4", "Enter")
        term.wait_line("EXITED 4")
    finally:
        term.close()
        tb("sandbox", "rm", sid)


def test_shell_on_a_tier_without_terminals_says_which_can(container: None) -> None:
    require_tier("wasm")
    p = tb("sandbox", "create", "-T", "wasm", "python")
    if p.returncode != 0:
        pytest.skip(f"no wasm python image: {p.stderr.decode()}")
    sid = text(p).strip()
    try:
        r = tb("sandbox", "shell", sid)
        assert r.returncode == 125
        assert b"cannot run a command on a terminal" in r.stderr
        assert b"container" in r.stderr and b"gvisor" in r.stderr
    finally:
        tb("sandbox", "rm", sid)


# ---- docker cp ----------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "proj"
    (src / "sub").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "run.sh").write_text("#!/bin/sh\necho run\n")
    (src / "run.sh").chmod(0o750)
    (src / "sub" / "data.txt").write_text("data\n")
    (src / "sub" / "data.txt").chmod(0o640)
    (src / "sub").chmod(0o700)
    return src


def _sh(sid: str, script: str) -> str:
    p = tb("sandbox", "exec", sid, "--", "sh", "-c", script)
    assert p.returncode == 0, p.stderr
    return text(p)


@pytest.mark.parametrize("tier", ["container", "gvisor"])
def test_cp_as_docker_cp(tier: str, tmp_path: Path) -> None:
    require_tier(tier)
    require_image(IMAGE)
    p = tb("sandbox", "create", "-T", tier, IMAGE)
    assert p.returncode == 0, p.stderr
    sid = text(p).strip()
    try:
        src = _tree(tmp_path)
        # a directory into an existing directory lands under its own name
        assert tb("sandbox", "cp", str(src), f"{sid}:/tmp").returncode == 0
        listing = _sh(sid, "cd /tmp/proj && stat -c '%n %a %u' run.sh sub sub/data.txt empty")
        assert listing.split("\n")[:4] == [
            "run.sh 750 65534",
            "sub 700 65534",
            "sub/data.txt 640 65534",
            "empty 755 65534",
        ]
        # a file into an existing directory lands under its name
        note = tmp_path / "note.txt"
        note.write_text("note\n")
        assert tb("sandbox", "cp", str(note), f"{sid}:/tmp/proj/sub").returncode == 0
        assert _sh(sid, "cat /tmp/proj/sub/note.txt") == "note\n"
        # a file to a new name; an existing file is replaced
        assert tb("sandbox", "cp", str(note), f"{sid}:/tmp/renamed.txt").returncode == 0
        note.write_text("newer\n")
        assert tb("sandbox", "cp", str(note), f"{sid}:/tmp/renamed.txt").returncode == 0
        assert _sh(sid, "cat /tmp/renamed.txt") == "newer\n"
        # SRC/. copies a directory's contents into a new directory
        assert tb("sandbox", "cp", f"{src}/.", f"{sid}:/tmp/flat").returncode == 0
        assert _sh(sid, "ls /tmp/flat").split() == ["empty", "run.sh", "sub"]
        # a missing destination directory is not made up
        p = tb("sandbox", "cp", str(note), f"{sid}:/tmp/nowhere/")
        assert p.returncode == 2 and b"no such directory" in p.stderr

        # out: a directory into an existing host directory, modes kept
        out = tmp_path / "out"
        out.mkdir()
        assert tb("sandbox", "cp", f"{sid}:/tmp/proj", str(out)).returncode == 0
        got = out / "proj"
        assert (got / "run.sh").read_text() == "#!/bin/sh\necho run\n"
        assert (_mode(got / "run.sh"), _mode(got / "sub"), _mode(got / "sub" / "data.txt")) == (
            0o750,
            0o700,
            0o640,
        )
        assert (got / "empty").is_dir()
        # again: merged, files replaced
        _sh(sid, "echo changed > /tmp/proj/sub/data.txt")
        assert tb("sandbox", "cp", f"{sid}:/tmp/proj", str(out)).returncode == 0
        assert (got / "sub" / "data.txt").read_text() == "changed\n"
        # SRC/. into a new host directory; a file to a new name
        assert tb("sandbox", "cp", f"{sid}:/tmp/proj/.", str(tmp_path / "flat")).returncode == 0
        assert sorted(os.listdir(tmp_path / "flat")) == ["empty", "run.sh", "sub"]
        assert (
            tb("sandbox", "cp", f"{sid}:/tmp/renamed.txt", str(tmp_path / "r.txt")).returncode == 0
        )
        assert (tmp_path / "r.txt").read_text() == "newer\n"
        # never through a symlink on the host: the link's target stays as it was
        victim = tmp_path / "victim"
        victim.write_text("untouched\n")
        (tmp_path / "link").symlink_to(victim)
        p = tb("sandbox", "cp", f"{sid}:/tmp/renamed.txt", str(tmp_path / "link"))
        assert p.returncode == 2 and b"symlink" in p.stderr
        assert victim.read_text() == "untouched\n"
        # a directory onto a host file is refused
        p = tb("sandbox", "cp", f"{sid}:/tmp/proj", str(victim))
        assert p.returncode == 2 and b"not a directory" in p.stderr
        # symlinks inside the sandbox are not followed out
        _sh(sid, "ln -s /etc /tmp/proj/etc-link")
        (tmp_path / "again").mkdir()
        assert tb("sandbox", "cp", f"{sid}:/tmp/proj", str(tmp_path / "again")).returncode == 0
        assert not (tmp_path / "again" / "proj" / "etc-link").exists()
    finally:
        tb("sandbox", "rm", sid)


# ---- logs, inspect, stats ---------------------------------------------------------------------

_OWNER = """
import sys
from tierbox import Sandbox
from tierbox.tiers import get_tier
with Sandbox.create("busybox", tier="container") as sb:
    print(sb.id, flush=True)
    sys.stdin.readline()
    h = sb.run(
        ["sh", "-c", "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 1; done"],
        background=True,
    )
    h.wait()
    print("done", flush=True)
    sys.stdin.readline()
"""


def test_logs_follow_a_background_command(container: None) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    follower: subprocess.Popen[bytes] | None = None
    try:
        assert owner.stdin is not None and owner.stdout is not None
        sid = owner.stdout.readline().strip()
        follower = subprocess.Popen(
            [*TIERBOX, "sandbox", "logs", "-f", sid],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        owner.stdin.write("go\n")
        owner.stdin.flush()
        assert follower.stdout is not None
        got = [follower.stdout.readline() for _ in range(3)]
        assert got == [b"out1\n", b"out2\n", b"out3\n"]
        assert owner.stdout.readline().strip() == "done"
        assert follower.poll() is None, "logs -f stopped while the sandbox lives"
        p = tb("sandbox", "logs", sid)
        assert (p.returncode, p.stdout, p.stderr) == (
            0,
            b"out1\nout2\nout3\n",
            b"err1\nerr2\nerr3\n",
        )
        owner.stdin.write("end\n")
        owner.stdin.flush()
        assert owner.wait(timeout=60) == 0
        assert follower.wait(timeout=30) == 0, "logs -f did not end with its sandbox"
    finally:
        for proc in (owner, follower):
            if proc is not None and proc.poll() is None:
                proc.kill()


def test_inspect_and_stats(container: None) -> None:
    name = f"tbinspect-{secrets.token_hex(3)}"
    p = tb(
        "sandbox", "create", "-m", "96m", "--pids-limit", "32", "-e", "K=V", "--name", name, IMAGE
    )
    assert p.returncode == 0, p.stderr
    sid = text(p).strip()
    try:
        info = json.loads(text(tb("sandbox", "inspect", name, "--json")))
        assert (info["id"], info["name"], info["tier"], info["state"]) == (
            sid,
            name,
            "container",
            "running",
        )
        assert info["limits"]["memory_mib"] == 96 and info["limits"]["pids"] == 32
        assert info["spec"]["env"] == {"K": "V"}
        assert info["capabilities"]["tty"] is True
        assert info["processes"] and info["processes"][0]["pid"] == 1
        assert info["stats"]["memory_bytes"] > 0
        human = text(tb("sandbox", "inspect", sid))
        assert re.search(r"memory limit\s+96\.0 MiB", human), human
        assert re.search(r"memory\s+\d+\.\d MiB", human), human
        assert "env              K=V" in human
        stats = text(tb("sandbox", "stats", sid))
        assert re.search(r"memory\s+\d+\.\d MiB", stats), stats
        assert not re.search(r"\d{6,}", stats), f"raw byte counts: {stats}"
        listing = text(tb("sandbox", "ls"))
        assert "96.0 MiB" in listing
    finally:
        tb("sandbox", "rm", name)
    p = tb("sandbox", "inspect", name)
    assert p.returncode == 2 and b"no sandbox" in p.stderr


def test_image_ls_sizes_in_mib(container: None) -> None:
    p = tb("image", "ls", env={"COLUMNS": "200"})
    assert p.returncode == 0 and re.search(r"\d+\.\d (MiB|GiB)", text(p)), text(p)


# ---- full VM ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_vm_exec_i_and_console_log() -> None:
    """vm exec -i passes stdin (and only with -i); vm console --log shows what
    the guest wrote on its serial console."""
    require_tier("vm")
    require_image(IMAGE)
    name = f"tbcli-{secrets.token_hex(3)}"
    p = tb("vm", "create", name, "--memory", "256m", timeout=600)
    assert p.returncode == 0, p.stderr
    try:
        p = tb("vm", "exec", "-i", name, "--", "tr", "a-z", "A-Z", input=b"shout", timeout=300)
        assert (p.returncode, p.stdout) == (0, b"SHOUT"), p.stderr
        p = tb("vm", "exec", name, "--", "cat", input=b"not passed without -i", timeout=300)
        assert (p.returncode, p.stdout) == (0, b""), p.stderr
        marker = f"console-marker-{secrets.token_hex(4)}"
        p = tb("vm", "exec", name, "--", "sh", "-c", f"echo {marker} > /dev/console", timeout=300)
        assert p.returncode == 0, p.stderr
        wait_until(
            lambda: marker.encode() in tb("vm", "console", name, "--log", timeout=300).stdout,
            timeout_s=30,
            what="the guest's console line in vm console --log",
        )
    finally:
        tb("vm", "rm", name, timeout=300)


@pytest.mark.slow
def test_vm_console_is_interactive_and_ctrl_bracket_leaves() -> None:
    require_tier("vm")
    require_image(IMAGE)
    name = f"tbcon-{secrets.token_hex(3)}"
    p = tb("vm", "create", name, "--memory", "256m", timeout=600)
    assert p.returncode == 0, p.stderr
    term = Tmux([*TIERBOX, "vm", "console", name])
    try:
        term.wait_line("Escape character is ^] (Ctrl + ])")
        term.wait_prompt()
        term.send("echo $((6*7))", "Enter")
        term.wait_line("42")
        term.resize(90, 20)
        term.send("stty size", "Enter")
        term.wait_line("20 90")
        term.send("C-]")
        term.wait_line("EXITED 0")
    finally:
        term.close()
        tb("vm", "rm", name, timeout=300)


@pytest.mark.parametrize("tier", ["microvm", "vm"])
def test_logs_show_the_guest_console(tier: str) -> None:
    require_tier(tier)
    require_image(IMAGE)
    p = tb("sandbox", "create", "-T", tier, IMAGE, timeout=600)
    assert p.returncode == 0, p.stderr
    sid = text(p).strip()
    try:
        marker = f"console-{secrets.token_hex(4)}"
        p = tb("sandbox", "exec", "-u", "0", sid, "--", "sh", "-c", f"echo {marker} > /dev/console")
        assert p.returncode == 0, p.stderr
        wait_until(
            lambda: marker.encode() in tb("sandbox", "logs", sid).stdout,
            timeout_s=30,
            what="the guest's console line in sandbox logs",
        )
    finally:
        tb("sandbox", "rm", sid)
