"""Isolation, measured: small probes run inside a sandbox report what they could do.

The bench plants things on the host first (:class:`HostCanaries`):

- a canary process whose argv[0] is a random token (``tbcanary-<hex>``);
- a world-readable file holding a random secret under ``/var/tmp``;
- a TCP listener on all host addresses that records the token in each
  request it receives, so a connection counts only when the host saw it.

Then, inside each tier, one probe run answers eight questions, and three
attacks (:func:`attack_probes`) answer three more:

============== ===============================================================
host_pids      is the host canary process visible in /proc?
host_file      can the planted host file be read?
network        did a connection reach the host listener (127.0.0.1 and the
               host's non-loopback address)?
kernel         is the host kernel shared (same boot_id / uname -r)?
privileges     uid, CapEff, NoNewPrivs: root or capabilities on the host kernel?
proc_sys_write can a (harmless: same value written back) global sysctl be written?
block_devices  can a block device be opened and read (first 512 bytes)?
memory_limit   a memory bomb: stopped at the limit (oom_killed)? did the sandbox live?
userns         can it create a user namespace and mount a tmpfs inside it?
keyring        can it use the kernel keyring (keyctl, add_key)?
file_race      while it swaps a directory with a link to ``/`` (swaprace), do the
               host's reads through the files API ever return a host file?
============== ===============================================================

userns and keyring run ``bench/attacks/nsprobe.c``, file_race runs
``bench/attacks/swaprace.c``: both built static with gcc on the host and copied
in with the files API. A user namespace or a key on a kernel of the
sandbox's own (gVisor's Sentry, a microVM's or VM's guest kernel) is contained;
on the host's kernel it is not.

Shell tiers run one POSIX sh script with busybox tools. The wasm tier has no
shell: its probe is a WASI program (C, built with clang-14 for wasm32-wasi)
that tries the same things through the only interface it has; a question
WASI has no interface for is reported "n/a" with the reason, never guessed.

"contained" is judged from the host's side: root inside a guest with its own
kernel (microVM, VM) writing its own /proc/sys is contained; the same write
with the host kernel shared is not.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tierbox.bench.machine import host_boot_id
from tierbox.bench.workloads import cache_dir
from tierbox.errors import BenchError, CommandError, HostError, ProbeBuildError, SandboxError
from tierbox.spec import ExecResult, TerminationKind
from tierbox.wasm import toolchain

if TYPE_CHECKING:
    from tierbox.sandbox import Sandbox

PROBES: tuple[str, ...] = (
    "host_pids",
    "host_file",
    "network",
    "kernel",
    "privileges",
    "proc_sys_write",
    "block_devices",
    "memory_limit",
    "userns",
    "keyring",
    "file_race",
)

QUESTIONS: dict[str, str] = {
    "host_pids": "see host processes",
    "host_file": "read a host file planted by the bench",
    "network": "reach a TCP listener on the host",
    "kernel": "share the host kernel",
    "privileges": "hold root or capabilities on the host kernel",
    "proc_sys_write": "write a global /proc/sys setting",
    "block_devices": "open and read a block device",
    "memory_limit": "exceed its memory limit",
    "userns": "create a user namespace and mount inside it",
    "keyring": "use the kernel keyring",
    "file_race": "make the files API return a host file (symlink-swap race)",
}

#: Short labels for the summary column.
LABELS: dict[str, str] = {
    "host_pids": "pids",
    "host_file": "files",
    "network": "net",
    "kernel": "kernel",
    "privileges": "privs",
    "proc_sys_write": "/proc/sys",
    "block_devices": "blockdev",
    "memory_limit": "mem limit",
    "userns": "userns",
    "keyring": "keyring",
    "file_race": "file race",
}

SYSCTL = "/proc/sys/kernel/printk_ratelimit"  # global (not namespaced), harmless to rewrite
BOMB_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 45.0


# ---------------------------------------------------------------- host side


def host_address() -> str | None:
    """The host's first global IPv4 address, or None."""
    from tierbox.errors import CommandError
    from tierbox.host.runner import run, which

    ip = which("ip")
    if ip is not None:
        try:
            out = run([ip, "-4", "-o", "addr", "show", "scope", "global"], timeout_s=5).stdout
        except CommandError:
            out = b""
        for m in re.finditer(rb"inet (\d+\.\d+\.\d+\.\d+)/", out):
            return m.group(1).decode()
    with contextlib.suppress(OSError):
        addr = socket.gethostbyname(socket.gethostname())
        if not addr.startswith("127."):
            return addr
    return None


class HostCanaries:
    """What the probes look for, planted on the host; removed on close.

    Use as a context manager: the canary process is killed, the planted file
    deleted and the listener closed even on Ctrl-C.
    """

    def __init__(self) -> None:
        self.canary_token = f"tbcanary-{secrets.token_hex(6)}"
        self.secret = f"tbsecret-{secrets.token_hex(8)}"
        self.net_token = secrets.token_hex(8)
        self.secret_dir = Path("/var/tmp") / f"tbcanary-{secrets.token_hex(6)}"
        self.secret_path = self.secret_dir / "secret"
        self.host_ip = host_address()
        self.host_kernel = os.uname().release
        self.host_boot_id = host_boot_id()
        self.port = 0
        self.canary_pid: int | None = None
        self._canary: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._seen: dict[str, str] = {}
        self._lock = threading.Lock()

    # life cycle ---------------------------------------------------------
    def open(self) -> HostCanaries:
        try:
            self.secret_dir.mkdir(mode=0o755)
            self.secret_dir.chmod(0o755)
            self.secret_path.write_text(self.secret + "\n")
            self.secret_path.chmod(0o644)
            sleep = shutil.which("sleep") or "/bin/sleep"
            self._canary = subprocess.Popen(
                [self.canary_token, "3600"],
                executable=sleep,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.canary_pid = self._canary.pid
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", 0))
            sock.listen(16)
            sock.settimeout(0.2)
            self._sock = sock
            self.port = sock.getsockname()[1]
            self._thread = threading.Thread(target=self._serve, name="bench-listener", daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        if self._canary is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._canary.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._canary.wait(timeout=5)
            self._canary = None
        shutil.rmtree(self.secret_dir, ignore_errors=True)

    def __enter__(self) -> HostCanaries:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # listener -----------------------------------------------------------
    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2.0)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\n" not in data and len(data) < 4096:
                        chunk = conn.recv(1024)
                        if not chunk:
                            break
                        data += chunk
                for tok in re.findall(rb"[0-9a-f]{16}-[A-Za-z0-9_.-]+", data):
                    with self._lock:
                        self._seen[tok.decode()] = f"{peer[0]}:{peer[1]}"
                with contextlib.suppress(OSError):
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")

    def token(self, tier: str, target: str) -> str:
        return f"{self.net_token}-{tier}-{target}"

    def seen(self, token: str) -> str | None:
        """The peer address a request carrying ``token`` came from, if any."""
        with self._lock:
            return self._seen.get(token)


# ---------------------------------------------------------- shell probe


def shell_probe_script(c: HostCanaries, tier: str) -> str:
    """One POSIX sh script printing ``key=value`` lines (busybox tools when present)."""
    pattern = f"tbcanary-[{c.canary_token[9]}]{c.canary_token[10:]}"  # never matches itself
    targets = f"lo:127.0.0.1:{c.token(tier, 'lo')}"
    if c.host_ip:
        targets += f" ip:{c.host_ip}:{c.token(tier, 'ip')}"
    return f"""
bb() {{ if command -v busybox >/dev/null 2>&1; then busybox "$@"; else "$@"; fi; }}
one() {{ bb head -n 1 | bb tr -d '\\r' | bb cut -c 1-160; }}
get() {{
  if command -v busybox >/dev/null 2>&1; then busybox timeout 5 busybox wget -q -O - "$1"
  else timeout 5 wget -q -O - "$1"; fi
}}
echo "uid=$(bb id -u 2>/dev/null)"
echo "capeff=$(bb grep '^CapEff:' /proc/self/status 2>/dev/null | bb awk '{{print $2}}')"
echo "nonewprivs=$(bb grep '^NoNewPrivs:' /proc/self/status 2>/dev/null | bb awk '{{print $2}}')"
echo "kernel=$(bb uname -r 2>/dev/null)"
echo "boot_id=$(bb cat /proc/sys/kernel/random/boot_id 2>/dev/null)"
echo "nprocs=$(bb ls /proc 2>/dev/null | bb grep -c '^[0-9][0-9]*$')"
hit=$(bb grep -l '{pattern}' /proc/[0-9]*/cmdline 2>/dev/null | one)
echo "canary=$hit"
out=$(bb cat {c.secret_path} 2>&1); echo "host_file_rc=$?"
echo "host_file=$(echo "$out" | one)"
for t in {targets}; do
  name=${{t%%:*}}; rest=${{t#*:}}; addr=${{rest%%:*}}; tok=${{rest#*:}}
  out=$(get "http://$addr:{c.port}/$tok" 2>&1); rc=$?
  echo "net_${{name}}_rc=$rc"
  echo "net_${{name}}=$(echo "$out" | one)"
done
f={SYSCTL}
v=$(bb cat $f 2>/dev/null)
if [ -n "$v" ]; then
  out=$( (echo "$v" > $f) 2>&1 ); rc=$?
else
  out="cannot read $f"; rc=255
fi
echo "procsys_rc=$rc"
echo "procsys=$(echo "$out" | one)"
found=""; seen=""; errs=""
for d in /sys/class/block/* /dev/vd? /dev/sd? /dev/nvme?n? /dev/xvd?; do
  n=${{d##*/}}
  case " $seen " in *" $n "*) continue;; esac
  [ -e "$d" ] || continue
  seen="$seen $n"
  if [ -b "/dev/$n" ]; then
    c=$(bb head -c 512 "/dev/$n" 2>/dev/null | bb wc -c)
    if [ "${{c:-0}}" -gt 0 ]; then found="$n"; break; fi
    errs="$errs $n:$(bb head -c 1 "/dev/$n" 2>&1 >/dev/null | one)"
  else
    errs="$errs $n:no-node"
  fi
done
echo "blockdev_read=$found"
echo "blockdev_seen=$seen"
echo "blockdev_errors=$(echo "$errs" | bb cut -c 1-200)"
echo "probe_done=1"
"""


BOMB_SCRIPT = (
    "if command -v busybox >/dev/null 2>&1; then exec busybox tail /dev/zero; "
    "else exec tail /dev/zero; fi"
)


def parse_kv(stdout: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in stdout.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[A-Za-z0-9_]+", key):
            out[key.lower()] = value.strip()
    return out


def run_record(r: ExecResult, argv_label: str) -> dict[str, Any]:
    """Evidence that a probe value came from an actual run."""
    return {
        "argv": argv_label,
        "termination": r.termination.kind.value,
        "exit_code": r.exit_code,
        "duration_ms": round(r.duration_s * 1000.0, 3),
        "evidence": r.termination.evidence,
    }


def _probe(
    value: str, contained: bool | None, detail: str, run: dict[str, Any] | None, reason: str = ""
) -> dict[str, Any]:
    rec: dict[str, Any] = {"value": value, "contained": contained, "detail": detail, "run": run}
    if reason:
        rec["reason"] = reason
    return rec


def _caps(text: str) -> int | None:
    try:
        return int(text, 16)
    except ValueError:
        return None


def judge_shell(
    kv: dict[str, str], c: HostCanaries, tier: str, run: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Turn the shell probe's output (and what the host saw) into verdicts."""
    out: dict[str, dict[str, Any]] = {}
    if kv.get("probe_done") != "1":
        raise BenchError(f"the probe script did not finish: got {sorted(kv)}")
    nprocs = kv.get("nprocs", "?")
    hit = kv.get("canary", "")
    if hit:
        pid = hit.split("/")[2] if hit.count("/") >= 3 else hit
        out["host_pids"] = _probe(
            "visible",
            False,
            f"found the host canary process ({pid}); {nprocs} pids in /proc",
            run,
        )
    else:
        out["host_pids"] = _probe(
            "hidden", True, f"host canary not found; {nprocs} pids visible in /proc", run
        )
    host_file = kv.get("host_file", "")
    if c.secret in host_file:
        out["host_file"] = _probe("readable", False, f"read the secret in {c.secret_path}", run)
    else:
        out["host_file"] = _probe(
            "not readable", True, f"cat {c.secret_path}: {host_file or 'no output'}", run
        )
    reached = []
    tried = []
    for name in ("lo", "ip"):
        if f"net_{name}_rc" not in kv:
            continue
        addr = "127.0.0.1" if name == "lo" else c.host_ip
        tried.append(f"{addr}: {kv.get(f'net_{name}') or 'rc=' + kv[f'net_{name}_rc']}")
        peer = c.seen(c.token(tier, name))
        if peer is not None:
            reached.append(f"{addr}:{c.port} (host saw {peer})")
    if reached:
        out["network"] = _probe("reached host", False, "connected to " + "; ".join(reached), run)
    else:
        out["network"] = _probe(
            "blocked",
            True,
            "host listener saw nothing; wget said " + " | ".join(tried),
            run,
        )
    kernel = kv.get("kernel", "")
    boot_id = kv.get("boot_id", "")
    # boot_id identifies a running kernel; without it, fall back to the release string
    shared = boot_id == c.host_boot_id if boot_id else kernel == c.host_kernel
    how = f"uname -r {kernel or '?'} (host {c.host_kernel}); boot_id " + (
        "same as host" if boot_id == c.host_boot_id else boot_id or "unreadable"
    )
    out["kernel"] = _probe("shared" if shared else "own", not shared, how, run)
    uid = kv.get("uid", "")
    caps = _caps(kv.get("capeff", ""))
    nnp = kv.get("nonewprivs", "?")
    privileged = uid == "0" or bool(caps)
    desc = f"uid {uid or '?'}, CapEff {kv.get('capeff') or '?'}, NoNewPrivs {nnp or '?'}"
    if not privileged:
        out["privileges"] = _probe("unprivileged", True, desc, run)
    elif shared:
        out["privileges"] = _probe("privileged on host kernel", False, desc, run)
    else:
        out["privileges"] = _probe("root in its own kernel", True, desc, run)
    wrote = kv.get("procsys_rc") == "0"
    pdesc = f"{SYSCTL}: " + ("wrote its current value back" if wrote else kv.get("procsys") or "?")
    if kv.get("procsys_rc") == "255":
        out["proc_sys_write"] = _probe("not present", True, pdesc, run)
    elif not wrote:
        out["proc_sys_write"] = _probe("refused", True, pdesc, run)
    elif shared:
        out["proc_sys_write"] = _probe("writable (host kernel)", False, pdesc, run)
    else:
        out["proc_sys_write"] = _probe("writable (own kernel)", True, pdesc, run)
    dev = kv.get("blockdev_read", "")
    seen = kv.get("blockdev_seen", "").strip() or "none"
    errs = kv.get("blockdev_errors", "").strip()
    if not dev:
        out["block_devices"] = _probe(
            "none readable", True, f"devices seen: {seen}" + (f"; {errs}" if errs else ""), run
        )
    elif shared:
        out["block_devices"] = _probe(
            "host disk readable", False, f"read 512 bytes of /dev/{dev} (host kernel)", run
        )
    else:
        out["block_devices"] = _probe(
            "own disk only", True, f"read /dev/{dev}: the guest's own virtual disk", run
        )
    return out


def _bomb_limit(ev: dict[str, Any], limit: Any) -> str:
    """The limit the workload really had: where an engine shares the cgroup
    (gVisor), the cgroup's limit less the engine's share, not the spec's."""
    cg = ev.get("cgroup_limit_mib")
    engine = ev.get("engine_overhead_mib")
    if cg is not None and engine is not None:
        return f" at ~{float(cg) - float(engine):.0f} MiB ({cg} MiB cgroup - {engine} MiB engine)"
    if cg is not None:
        return f" at {cg} MiB (cgroup, engine included; {limit} MiB asked)"
    return f" at {limit} MiB" if limit is not None else ""


def judge_bomb(
    r: ExecResult | None, error: str | None, survived: bool | None, label: str
) -> dict[str, Any]:
    """memory_limit verdict from a memory bomb run."""
    if r is None:
        return _probe("error", None, f"the bomb run failed: {error}", None)
    t = r.termination
    ev = t.evidence
    limit = ev.get("limit_mib")
    peak = ev.get("peak_mib")
    bits = [t.describe()]
    if survived is not None:
        bits.append("sandbox " + ("still answered afterwards" if survived else "died with it"))
    detail = "; ".join(bits)
    run = run_record(r, label)
    if t.kind is TerminationKind.OOM_KILLED:
        return _probe(
            f"oom_killed{_bomb_limit(ev, limit)}",
            True,
            detail + (f"; peak {peak} MiB" if peak else ""),
            run,
        )
    if t.kind is TerminationKind.SIGNALED and t.signal == signal.SIGKILL:
        return _probe("killed (SIGKILL)", True, detail, run)
    if t.kind is TerminationKind.TIMED_OUT:
        return _probe("not stopped before the timeout", None, detail, run)
    return _probe(t.kind.value, False, detail, run)


# ----------------------------------------------------------- WASI probe

WASI_PROBE_C = r"""
/* tierbox bench: isolation probe for the wasm tier (WASI preview 1).
 *   probe SECRET_PATH [BLOCKDEV...]   try what the shell probe tries
 *   probe membomb                     allocate and touch 1 MiB blocks until refused */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <unistd.h>
#include <wasi/api.h>

static void try_open(const char *key, const char *path, int flags) {
    int fd = open(path, flags);
    if (fd < 0) { printf("%s=error: %s\n", key, strerror(errno)); return; }
    if ((flags & O_ACCMODE) == O_RDONLY) {
        char buf[200];
        ssize_t n = read(fd, buf, sizeof buf - 1);
        if (n < 0) { printf("%s=opened, read failed: %s\n", key, strerror(errno)); }
        else {
            buf[n] = 0;
            for (char *p = buf; *p; p++) if (*p == '\n' || *p == '\r') *p = ' ';
            printf("%s=read: %s\n", key, buf);
        }
    } else {
        printf("%s=opened for writing\n", key);
    }
    close(fd);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "membomb") == 0) {
        unsigned long mib = 0;
        for (;;) {
            char *volatile p = malloc(1 << 20);
            if (p == NULL) { fprintf(stderr, "malloc refused after %lu MiB\n", mib); abort(); }
            memset((char *)p, 0x5a, 1 << 20);
            mib++;
        }
    }
    const char *secret = argc > 1 ? argv[1] : "/nonexistent";
    DIR *d = opendir("/proc");
    if (!d) printf("proc=error: %s\n", strerror(errno));
    else {
        int n = 0; struct dirent *e;
        while ((e = readdir(d)) != NULL) if (e->d_name[0] >= '0' && e->d_name[0] <= '9') n++;
        printf("proc=%d pids\n", n);
        closedir(d);
    }
    try_open("host_file", secret, O_RDONLY);
    char esc[1024];
    snprintf(esc, sizeof esc, "../../../../../../../..%s", secret);
    try_open("host_file_escape", esc, O_RDONLY);
    int fds = 0, sockets = 0;
    for (int fd = 0; fd < 64; fd++) {
        __wasi_fdstat_t st;
        if (__wasi_fd_fdstat_get(fd, &st) == 0) {
            fds++;
            if (st.fs_filetype == __WASI_FILETYPE_SOCKET_STREAM ||
                st.fs_filetype == __WASI_FILETYPE_SOCKET_DGRAM) sockets++;
        }
    }
    printf("fds=%d\nsockets=%d\n", fds, sockets);
    struct utsname u;
    if (uname(&u) == 0) printf("uname=%s %s\n", u.sysname, u.release);
    else printf("uname=error: %s\n", strerror(errno));
    try_open("boot_id", "/proc/sys/kernel/random/boot_id", O_RDONLY);
    try_open("procsys", "/proc/sys/kernel/printk_ratelimit", O_WRONLY);
    for (int i = 2; i < argc; i++) {
        char key[96], path[128];
        snprintf(key, sizeof key, "blockdev_%s", argv[i]);
        snprintf(path, sizeof path, "/dev/%s", argv[i]);
        try_open(key, path, O_RDONLY);
    }
    printf("probe_done=1\n");
    return 0;
}
"""

WASI_CFLAGS = ("-O1",)


def wasi_probe() -> Path:
    """Build the WASI probe once (cached by source and compiler version); it
    runs as ``probe`` (argv[0], its program name)."""
    try:
        return toolchain.build(
            WASI_PROBE_C.encode(), "probe", cache_dir() / "wasm-probe", WASI_CFLAGS
        )
    except (HostError, CommandError) as exc:
        raise ProbeBuildError(f"the WASI probe cannot be built: {exc}") from exc


def host_block_devices() -> list[str]:
    """The host's block devices, real disks first (loop and zram devices last)."""
    with contextlib.suppress(OSError):
        names = os.listdir("/sys/class/block")
        return sorted(names, key=lambda n: (n.startswith(("loop", "ram", "zram")), n))[:8]
    return []


WASI_NA_PRIVILEGES = (
    "n/a (no such interface in WASI): WASI preview 1 has no users, uids, setuid or "
    "capabilities (wasi-libc has no getuid); the guest acts only through WASI calls"
)


def judge_wasi(
    kv: dict[str, str], c: HostCanaries, tier: str, run: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    if kv.get("probe_done") != "1":
        raise BenchError(f"the WASI probe did not finish: got {sorted(kv)}")
    out: dict[str, dict[str, Any]] = {}
    proc = kv.get("proc", "")
    visible = proc.endswith("pids") and not proc.startswith("0 ")
    out["host_pids"] = _probe(
        "visible" if visible else "hidden",
        not visible,
        f"opendir /proc: {proc} (WASI has no process interface)",
        run,
    )
    hf = kv.get("host_file", "")
    esc = kv.get("host_file_escape", "")
    leaked = c.secret in hf or c.secret in esc
    out["host_file"] = _probe(
        "readable" if leaked else "not readable",
        not leaked,
        f"open {c.secret_path}: {hf}; via ../ escape: {esc}",
        run,
    )
    sockets = kv.get("sockets", "?")
    peer = c.seen(c.token(tier, "lo")) or c.seen(c.token(tier, "ip"))
    no_net = sockets == "0" and peer is None
    out["network"] = _probe(
        "no sockets" if no_net else f"{sockets} socket handles",
        no_net if sockets != "?" else None,
        f"{sockets} socket handles among {kv.get('fds', '?')} open fds (0-63 checked); "
        "WASI preview 1 has no socket() or connect(), and none were granted",
        run,
    )
    boot = kv.get("boot_id", "")
    shared = c.host_boot_id in boot
    out["kernel"] = _probe(
        "shared" if shared else "not reachable",
        not shared,
        f"uname: {kv.get('uname', '?')}; boot_id: {boot}; the guest makes no system calls, "
        "only WASI calls served by wasmtime inside the bench process",
        run,
    )
    out["privileges"] = _probe("n/a", None, WASI_NA_PRIVILEGES, None, reason=WASI_NA_PRIVILEGES)
    ps = kv.get("procsys", "")
    wrote = ps.startswith("opened")
    out["proc_sys_write"] = _probe(
        "writable" if wrote else "refused", not wrote, f"open {SYSCTL} for writing: {ps}", run
    )
    devs = {k[len("blockdev_") :]: v for k, v in kv.items() if k.startswith("blockdev_")}
    readable = [d for d, v in devs.items() if v.startswith("read")]
    out["block_devices"] = _probe(
        "readable" if readable else "none readable",
        not readable,
        "; ".join(f"/dev/{d}: {v}" for d, v in sorted(devs.items())) or "no devices tried",
        run,
    )
    for name, why in WASI_NA_ATTACKS.items():
        out[name] = _probe("n/a", None, why, None, reason=why)
    return out


WASI_NA_ATTACKS = {
    "userns": (
        "n/a (no such interface in WASI): WASI preview 1 has no namespaces, "
        "unshare, clone or mount; the guest makes no system calls"
    ),
    "keyring": (
        "n/a (no such interface in WASI): WASI preview 1 has no keyctl or add_key; "
        "the guest makes no system calls"
    ),
    "file_race": (
        "n/a (no such interface in WASI): the attack swaps a directory and a link to / "
        "with renameat2(RENAME_EXCHANGE), which WASI preview 1 does not have, and the "
        "guest cannot run the native swaprace program"
    ),
}


# ------------------------------------------------------------ attack probes

ATTACKS = Path(__file__).resolve().parent / "attacks"
#: Seconds the file race runs (the host reads for as long): --quick, full.
RACE_S = {"quick": 1.0, "full": 5.0}
#: Tiers whose files API is served inside the guest, one request at a time.
AGENT_TIERS = ("microvm", "vm")
AGENT_RACE_NA = (
    "not applicable: files go through the guest agent, not the host's file system; the "
    "agent serves one request at a time and kills an exec's cgroup when it ends, so no "
    "workload runs while a file is read, and paths resolve (openat2 RESOLVE_IN_ROOT) in "
    "the guest's own kernel, where the host's files do not exist"
)
IN_SANDBOX_NSPROBE = "/tmp/tb-nsprobe"
IN_SANDBOX_SWAPRACE = "/tmp/tb-swaprace"
RACE_DIR = "/tmp/tb-race"

RunFn = Callable[["Sandbox", Sequence[str], "float | None"], ExecResult]


def native_attack(name: str) -> Path:
    """bench/attacks/NAME.c built static with gcc, once per source and compiler."""
    src = ATTACKS / f"{name}.c"
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise ProbeBuildError(
            f"a C compiler is needed to build {src.name}: apt-get install gcc libc6-dev"
        )
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(src.read_bytes() + version.encode()).hexdigest()[:16]
    out = cache_dir() / f"native-{key}" / name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    proc = subprocess.run(
        [cc, "-static", "-O2", "-pthread", "-o", str(tmp), str(src)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise ProbeBuildError(f"building {src.name} failed: {proc.stderr.strip()[-800:]}")
    os.replace(tmp, out)
    return out


def _errno_text(value: str) -> str:
    if value == "0":
        return "ok"
    with contextlib.suppress(ValueError):
        return errno.errorcode.get(int(value), f"errno {value}")
    return value


def judge_attacks(
    kv: dict[str, str], kernel_shared: bool, run: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """userns and keyring verdicts from nsprobe's output. Only the host's
    kernel makes a namespace or a key a way out; a kernel of the sandbox's own
    keeps them inside."""
    if kv.get("nsprobe_done") != "1":
        raise BenchError(f"nsprobe did not finish: got {sorted(kv)}")
    where = "the host kernel" if kernel_shared else "the sandbox's own kernel"
    created = kv.get("unshare_user") == "0" or kv.get("userns_mount") == "0"
    mounted = kv.get("userns_mount") == "0"
    detail = (
        f"unshare(CLONE_NEWUSER): {_errno_text(kv.get('unshare_user', '?'))}; "
        f"unshare(CLONE_NEWUSER|CLONE_NEWNS) + uid map + mount tmpfs: "
        f"{_errno_text(kv.get('userns_mount', '?'))}"
    )
    if not created:
        value = "refused"
    else:
        value = ("created, tmpfs mounted" if mounted else "created, mount refused") + (
            " (host kernel)" if kernel_shared else " (own kernel)"
        )
    out = {"userns": _probe(value, not (created and kernel_shared), f"{detail}; on {where}", run)}
    usable = kv.get("keyctl") == "0" or kv.get("add_key") == "0"
    kdetail = (
        f"keyctl(KEYCTL_GET_KEYRING_ID, session): {_errno_text(kv.get('keyctl', '?'))}; "
        f"add_key(user, process keyring): {_errno_text(kv.get('add_key', '?'))}; on {where}"
    )
    if not usable:
        kvalue = "refused"
    else:
        kvalue = "usable (host kernel)" if kernel_shared else "usable (own kernel)"
    out["keyring"] = _probe(kvalue, not (usable and kernel_shared), kdetail, run)
    return out


def attack_probes(
    sb: Sandbox, tier: str, run: RunFn, *, kernel_shared: bool, quick: bool
) -> dict[str, dict[str, Any]]:
    """userns, keyring and file_race inside ``sb``; a probe that cannot be run
    is reported as such with the reason, never guessed."""
    out: dict[str, dict[str, Any]] = {}
    try:
        binary = native_attack("nsprobe")
        sb.files.write(IN_SANDBOX_NSPROBE, binary.read_bytes(), mode=0o755)
        argv = [IN_SANDBOX_NSPROBE, "unshare_user", "userns_mount", "keyctl", "add_key"]
        r = run(sb, argv, PROBE_TIMEOUT_S)
        kv = parse_kv(r.stdout)
        if kv.get("nsprobe_done") != "1":
            raise BenchError(
                f"nsprobe failed: {r.termination.describe()}: "
                f"{r.stderr.decode(errors='replace').strip()[:300]}"
            )
        out.update(judge_attacks(kv, kernel_shared, run_record(r, "nsprobe <calls>")))
    except ProbeBuildError as exc:
        why = f"not measured: {exc}"
        out.update(
            {p: _probe("not measured", None, why, None, reason=why) for p in ("userns", "keyring")}
        )
    except Exception as exc:
        err = f"{type(exc).__name__}: {exc}"
        out.update({p: _probe("error", None, err, None) for p in ("userns", "keyring")})
    try:
        out["file_race"] = file_race_probe(sb, tier, run, RACE_S["quick" if quick else "full"])
    except ProbeBuildError as exc:
        why = f"not measured: {exc}"
        out["file_race"] = _probe("not measured", None, why, None, reason=why)
    except Exception as exc:
        out["file_race"] = _probe("error", None, f"{type(exc).__name__}: {exc}", None)
    return out


def file_race_probe(sb: Sandbox, tier: str, run: RunFn, seconds: float) -> dict[str, Any]:
    """The host reads ``D/d/<host dir>/secret`` through the files API in a loop
    while swaprace swaps ``D/d`` (a real directory holding that path) with
    ``D/l -> /``. A files API that resolves links itself, or checks and then
    opens, sometimes follows ``d`` to the host's ``/`` and returns the host's
    planted file. Counts reads, reads that returned anything, and leaks."""
    if tier in AGENT_TIERS:
        return _probe("n/a", None, AGENT_RACE_NA, None, reason=AGENT_RACE_NA)
    binary = native_attack("swaprace")
    host = Path(tempfile.mkdtemp(prefix="tierbox-race-"))
    try:
        host.chmod(0o755)  # readable by the workload's user, were the API to reach it
        secret = f"tbrace-{secrets.token_hex(8)}"
        (host / "secret").write_text(secret + "\n")
        (host / "secret").chmod(0o644)
        mirror = f"{RACE_DIR}/d{host}/secret"
        sb.files.write(IN_SANDBOX_SWAPRACE, binary.read_bytes(), mode=0o755)
        sb.files.write(mirror, "sandbox copy\n")
        made = run(sb, ["ln", "-s", "/", f"{RACE_DIR}/l"], 30.0)
        if not made.ok:
            raise BenchError(f"ln -s / {RACE_DIR}/l: {made.termination.describe()}")
        done: list[ExecResult] = []
        failed: list[BaseException] = []

        def attack() -> None:
            try:
                argv = [IN_SANDBOX_SWAPRACE, RACE_DIR, f"{seconds + 0.5:.1f}"]
                done.append(run(sb, argv, seconds + 30.0))
            except BaseException as exc:  # reported below, never lost in the thread
                failed.append(exc)

        attacker = threading.Thread(target=attack, name=f"swaprace-{tier}", daemon=True)
        attacker.start()
        time.sleep(0.2)  # let it start swapping
        reads = answered = leaks = refused = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and attacker.is_alive():
            reads += 1
            try:
                data = sb.files.read(mirror, max_bytes=4096)
            except SandboxError:
                refused += 1
                continue
            answered += 1
            leaks += secret.encode() in data
        attacker.join(seconds + 40.0)
        if failed:
            raise failed[0]
        r = done[0] if done else None
        swaps = r.stdout.decode(errors="replace").strip() if r is not None else "?"
        record = run_record(r, "swaprace <dir> <s>") if r is not None else None
        detail = (
            f"{leaks} of {reads} reads through the files API returned the host's planted "
            f"file ({answered - leaks} returned the sandbox's copy, {refused} were refused) "
            f"in {seconds:.1f} s while swaprace made {swaps} swaps"
        )
        if r is None or not swaps.isdigit() or int(swaps) == 0 or reads == 0:
            return _probe("attack did not run", None, detail, record)
        return _probe(f"{leaks} leaks in {reads} reads", leaks == 0, detail, record)
    finally:
        shutil.rmtree(host, ignore_errors=True)
        with contextlib.suppress(Exception):  # tidying a sandbox that is closed next anyway
            run(sb, ["rm", "-rf", RACE_DIR, IN_SANDBOX_SWAPRACE, IN_SANDBOX_NSPROBE], 30.0)


def not_measured(reason: str) -> dict[str, dict[str, Any]]:
    """Every probe marked as not measured (e.g. no toolchain for the WASI probe)."""
    return {p: _probe("not measured", None, reason, None, reason=reason) for p in PROBES}


def summarize(probes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A one-line verdict ("6/8 contained; open: kernel") plus counts for the JSON."""
    measured = {k: v for k, v in probes.items() if v.get("contained") is not None}
    contained = [k for k, v in measured.items() if v["contained"]]
    leaks = [k for k, v in measured.items() if not v["contained"]]
    na = [k for k in PROBES if k in probes and probes[k].get("contained") is None]
    text = f"{len(contained)}/{len(measured)} contained"
    if leaks:
        text += "; open: " + ", ".join(LABELS[k] for k in leaks)
    if na:
        text += "; n/a: " + ", ".join(LABELS[k] for k in na)
    return {
        "contained": len(contained),
        "measured": len(measured),
        "open": leaks,
        "not_measured": na,
        "text": text,
    }
