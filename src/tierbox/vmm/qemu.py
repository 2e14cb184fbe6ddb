"""QEMU ``-M microvm``: the argv for a machine, the process, the accelerator.

One QEMU process per guest, in its own process group and session, named
``tierbox-<id>`` (``-name``) so leftovers can be found after a crash. The
machine has no PCI, no firmware option ROMs; its devices are virtio-mmio: the
root disk (read-only), a virtio-serial port for the agent (a unix socket on
the host: this host has no vhost-vsock), virtio-rng, and a virtio-net NIC only
for a sandbox with an egress network (a tap device in the sandbox's router
namespace, handed to QEMU as an open fd: QEMU never opens or configures it).
The serial console goes through a FIFO to ``console.log``, of which the last
4 MiB are kept (:mod:`tierbox.vmm.console_log`); QMP listens on ``qmp.sock``.
QEMU runs jailed (:mod:`tierbox.vmm.jail`): as a uid of its own, inside
bubblewrap's namespaces, opening tierbox's files only as fds it inherits,
writing only in the sandbox's ``vmm/`` directory and its RAM file.

Guest RAM is a memory-backend-file: ``share=on`` on a tmpfs file for a booted
guest (so a snapshot can skip RAM in the migration stream, ``x-ignore-shared``,
and copy the file instead), ``share=off`` on a snapshot's RAM file for a
restored guest (private copy-on-write pages over the page cache, so clones
share what they have not written).

The device part of the argv must be byte-for-byte the same for a machine and
anything restored from its snapshot; :func:`device_args` is the one place it
is made.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from tierbox.errors import CommandError
from tierbox.host.cgroups import SandboxCgroup
from tierbox.host.runner import exit_error, run, spawn, which
from tierbox.paths import MARKER
from tierbox.vmm import console_log, jail
from tierbox.vmm.guest import file_tail
from tierbox.vmm.jail import VmmUser, make_vmm_dir

QEMU_BINARY = "qemu-system-x86_64"
#: The smallest guest RAM allowed. Debian's cloud kernel reserves ~49 MiB at
#: boot (14 MiB code, 8 rodata, 8 data+bss, memmap, the initramfs while it
#: unpacks): 72 MiB panics while booting ("System is deadlocked on memory"),
#: 80 MiB boots with ~10 MiB left for the workload, 96 MiB leaves ~25 MiB.
MIN_MEMORY_MIB = 96
DEFAULT_MEMORY_MIB = 256
#: The machine type and the options that keep it lean (no legacy PIT/PIC, no ROMs).
MACHINE = "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=on,memory-backend=ram0"
#: seccomp filter for QEMU itself: no exec, no privilege changes, no obsolete calls.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: The CPU model under TCG (KVM uses ``host``). Fixed: a snapshot only
#: restores into the same model.
TCG_CPU = "max"


def qemu_path() -> str | None:
    return which(QEMU_BINARY)


@cache
def qemu_version() -> str:
    exe = qemu_path()
    if exe is None:
        return ""
    try:
        out = run([exe, "--version"], timeout_s=10).stdout.decode()
    except CommandError:
        return ""
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else out.strip().splitlines()[0]


@cache
def host_tsc_khz() -> int:
    """The host TSC frequency: under TCG the guest's TSC is the host's."""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.MULTILINE)
        if m:
            return int(float(m.group(1)) * 1000)
    return 2_000_000


@dataclass(frozen=True)
class Machine:
    """What a guest looks like from outside; fixed for its snapshots' lifetime."""

    memory_mib: int
    vcpus: int
    accel: str  # "tcg" or "kvm"
    disk: str | None  # read-only root disk image
    rw_mib: int  # cap of the writable tmpfs layer (0: tmpfs default, half the RAM)
    agent: bool = True
    #: a virtio-net NIC (egress network): its restores need a tap too
    net: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "accel": self.accel,
            "disk": self.disk,
            "rw_mib": self.rw_mib,
            "agent": self.agent,
            "net": self.net,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Machine:
        return cls(
            memory_mib=int(d["memory_mib"]),
            vcpus=int(d["vcpus"]),
            accel=str(d["accel"]),
            disk=d.get("disk"),
            rw_mib=int(d.get("rw_mib", 0)),
            agent=bool(d.get("agent", True)),
            net=bool(d.get("net", False)),
        )


@dataclass(frozen=True)
class Files:
    """The host-side files of one running QEMU."""

    dir: Path

    @property
    def vmm_dir(self) -> Path:
        """What QEMU itself writes (sockets, console, pid file): the VMM
        user's, 0700; tierbox's records stay in :attr:`dir` (see
        :mod:`tierbox.vmm.jail`)."""
        return self.dir / "vmm"

    @property
    def qmp(self) -> Path:
        return self.vmm_dir / "qmp.sock"

    @property
    def agent(self) -> Path:
        return self.vmm_dir / "agent.sock"

    @property
    def console(self) -> Path:
        """The guest's console, its last 4 MiB kept by :mod:`tierbox.vmm.console_log`
        (tierbox's file: QEMU only writes the FIFO)."""
        return self.dir / "console.log"

    @property
    def console_pipe(self) -> Path:
        """The FIFO QEMU writes the console into."""
        return self.vmm_dir / "console.pipe"

    @property
    def log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def pidfile(self) -> Path:
        return self.vmm_dir / "qemu.pid"


def ram_file(sandbox_id: str) -> Path:
    """Where a booted guest's RAM lives: tmpfs, never the disk under /run."""
    base = Path(os.environ.get("TIERBOX_MICROVM_RAM_DIR", "/dev/shm"))
    return base / f"{MARKER}-{sandbox_id}.ram"


def process_name(sandbox_id: str) -> str:
    return f"{MARKER}-{sandbox_id}"


#: The NIC's MAC address: fixed, so a restored guest's NIC is the one it
#: had; every sandbox's tap is alone in its own router namespace.
GUEST_MAC = "02:00:c6:12:00:02"


def device_args(
    m: Machine,
    files: Files,
    *,
    ram_path: Path | str,
    ram_share: bool,
    tap_fd: int | None = None,
    disk_path: str | None = None,
) -> list[str]:
    """Everything but the boot source: identical for boot, snapshot and
    restore (``tap_fd``, the open tap behind the NIC, is a backend and may
    differ; without one the NIC is wired to an empty hub, for the paused
    helper that converts a snapshot and never runs the guest).
    ``disk_path`` names the root disk as QEMU opens it (an inherited fd's
    ``/proc/self/fd/N``), default ``m.disk``."""
    args = [
        "-M", MACHINE,
        "-object",
        f"memory-backend-file,id=ram0,size={m.memory_mib}M,mem-path={ram_path},"
        f"share={'on' if ram_share else 'off'},prealloc=off",
        "-m", f"{m.memory_mib}M",
        "-smp", str(m.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-chardev", f"file,id=con,path={files.console_pipe}",
        "-serial", "chardev:con",
        "-chardev", f"socket,id=qmp,path={files.qmp},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", f"socket,id=agent,path={files.agent},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=tierbox.agent",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-device,rng=rng0",
    ]  # fmt: skip
    if m.accel == "kvm":
        args += ["-accel", "kvm", "-cpu", "host"]
    else:
        args += ["-accel", "tcg", "-cpu", TCG_CPU]
    if m.disk:
        disk = disk_path or m.disk
        args += [
            "-drive", f"id=root,file={disk},format=raw,if=none,readonly=on,cache=unsafe",
            "-device", "virtio-blk-device,drive=root",
        ]  # fmt: skip
    if m.net:
        backend = (
            f"tap,id=net0,fd={tap_fd},vhost=off"
            if tap_fd is not None
            else "hubport,id=net0,hubid=0"
        )
        args += [
            "-netdev", backend,
            "-device", f"virtio-net-device,netdev=net0,mac={GUEST_MAC}",
        ]  # fmt: skip
    return args


def kernel_cmdline(m: Machine, hz: int) -> str:
    parts = [
        "console=ttyS0",
        "quiet",
        "panic=-1",  # reboot at once on panic; -no-reboot turns that into QEMU exiting
        "reboot=t",  # by triple fault: microvm has no reset device the default finds
        "8250.nr_uarts=1",
        "cryptomgr.notests",  # crypto self-tests cost ~0.3 s under TCG
        "random.trust_cpu=on",
        "apparmor=0",  # the guest has no profiles to enforce; saves boot time
        "audit=0",
        f"tierbox.disk={1 if m.disk else 0}",
        f"tierbox.net={1 if m.net else 0}",
        f"tierbox.rw_mib={m.rw_mib}",
        f"tierbox.agent={1 if m.agent else 0}",
    ]
    if m.accel == "tcg":
        # without these the kernel hangs calibrating its clocks under TCG
        khz = host_tsc_khz()
        parts += [
            f"tsc_early_khz={khz}",
            f"lpj={khz * 1000 // hz}",
            "no_timer_check",
            "tsc=reliable",
        ]
        # An emulated CPU does not speculate: Spectre/Meltdown mitigations guard
        # nothing under TCG and cost ~10% (page-table switches flush TCG's TLB).
        parts += ["mitigations=off", "init_on_alloc=0"]
    return " ".join(parts)


def boot_argv(
    sandbox_id: str,
    m: Machine,
    files: Files,
    *,
    vmlinux: Path | str,
    initramfs: Path | str,
    hz: int,
    ram_path: Path,
    tap_fd: int | None = None,
    disk_path: str | None = None,
) -> list[str]:
    """A cold boot; ``vmlinux``, ``initramfs`` and ``disk_path`` are what
    QEMU opens (inherited fds' ``/proc/self/fd/N`` for a jailed QEMU)."""
    exe = qemu_path() or QEMU_BINARY
    return [
        exe,
        "-name", f"{process_name(sandbox_id)},debug-threads=on",
        *device_args(
            m, files, ram_path=ram_path, ram_share=True, tap_fd=tap_fd, disk_path=disk_path
        ),
        "-kernel", str(vmlinux),
        "-initrd", str(initramfs),
        "-append", kernel_cmdline(m, hz),
        "-pidfile", str(files.pidfile),
        "-sandbox", SANDBOX,
    ]  # fmt: skip


def restore_argv(
    sandbox_id: str,
    m: Machine,
    files: Files,
    *,
    ram_path: Path | str,
    ram_share: bool,
    paused: bool = False,
    tap_fd: int | None = None,
    disk_path: str | None = None,
) -> list[str]:
    """Start a machine that waits for its state (``-incoming defer``).

    QEMU 7.2 has no command-line switch for the ``x-ignore-shared`` capability
    the stream was written with, so the caller sets it over QMP and then
    starts the load with ``migrate-incoming`` (see :func:`start_incoming`).
    No kernel is given: the guest's memory comes from the snapshot, so QEMU
    need not read (or keep a copy of) the 50 MB vmlinux.
    """
    exe = qemu_path() or QEMU_BINARY
    argv = [
        exe,
        "-name", f"{process_name(sandbox_id)},debug-threads=on",
        *device_args(
            m, files, ram_path=ram_path, ram_share=ram_share, tap_fd=tap_fd, disk_path=disk_path
        ),
        "-incoming", "defer",
        "-pidfile", str(files.pidfile),
        "-sandbox", SANDBOX,
    ]  # fmt: skip
    if paused:
        argv.append("-S")
    return argv


class QemuProcess:
    """A running QEMU, in its own process group, started through the one
    runner (:func:`~tierbox.host.runner.spawn`): ``argv`` is kept, a start
    that fails raises CommandError, and :meth:`exit_error` gives the exit
    code and the end of QEMU's log."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None, files: Files) -> None:
        self.pid = pid
        self.popen = popen
        self.files = files
        self._returncode: int | None = None

    @property
    def argv(self) -> list[str]:
        """QEMU's command line (empty for a QEMU adopted from another process)."""
        if self.popen is None:
            return []
        return [str(a) for a in self.popen.args] if isinstance(self.popen.args, list) else []

    @classmethod
    def start(
        cls,
        argv: list[str],
        files: Files,
        *,
        cgroup: SandboxCgroup | None = None,
        pass_fds: tuple[int, ...] = (),
        user: VmmUser | None = None,
        binds: tuple[Path, ...] = (),
    ) -> QemuProcess:
        """Start QEMU as ``user`` (None: as tierbox itself) with only
        ``pass_fds`` inherited; its ``vmm/`` directory is made first. A
        jailed QEMU runs in its own namespaces (:mod:`tierbox.vmm.jail`)
        seeing only its ``vmm/`` directory and ``binds``; :attr:`pid` is
        then QEMU's own, not its bwrap parent's."""
        make_vmm_dir(files.vmm_dir, user)
        console_log.start(
            files.console_pipe,
            files.console,
            uid=user.uid if user is not None else None,
            gid=user.gid if user is not None else None,
        )
        info_r = info_w = -1
        if user is not None:
            info_r, info_w = os.pipe()
            argv = jail.namespaced_argv(argv, binds=[files.vmm_dir, *binds], info_fd=info_w)
            pass_fds = (*pass_fds, info_w)
        log = open(files.log, "ab")  # noqa: SIM115 - handed to the child
        try:
            popen = spawn(
                argv,
                launch=cgroup.popen if cgroup is not None else None,
                message=f"cannot start {QEMU_BINARY}",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                pass_fds=pass_fds,
                close_fds=True,
                **(user.popen_kwargs() if user is not None else {}),
            )
        finally:
            log.close()
            if info_w >= 0:
                os.close(info_w)
        if info_r < 0:
            return cls(popen.pid, popen, files)
        try:
            pid = jail.read_child_pid(info_r)
        finally:
            os.close(info_r)
        if pid is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=5)
            message = f"cannot start {QEMU_BINARY} in its jail"
            raise exit_error(popen, message=message, log=files.log)
        return cls(pid, popen, files)

    @classmethod
    def adopt(cls, pid: int, files: Files) -> QemuProcess:
        """A QEMU started by another process (reattaching to a sandbox)."""
        return cls(pid, None, files)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _pid_is_qemu(self.pid, self.files)

    @property
    def jailed(self) -> bool:
        """Started inside bwrap: :attr:`popen` is bwrap, :attr:`pid` QEMU."""
        return self.popen is not None and self.popen.pid != self.pid

    def _status(self, rc: int | None) -> int | None:
        """QEMU's exit status: bwrap reports a QEMU killed by signal N as 128+N."""
        if rc is not None and self.jailed and rc > 128:
            return -(rc - 128)
        return rc

    @property
    def returncode(self) -> int | None:
        if self.popen is not None:
            return self._status(self.popen.poll())
        return self._returncode

    def kill(self, *, timeout_s: float = 5.0) -> int | None:
        """SIGKILL QEMU, then its process group (a jailed QEMU's is its bwrap
        parent's, which reaps QEMU and exits), and reap it. Idempotent."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGKILL)
        if self.popen is not None:
            try:
                self.popen.wait(timeout=timeout_s if self.jailed else 0.001)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(timeout=timeout_s)
            return self.returncode
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while _pid_is_qemu(self.pid, self.files) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._returncode = -9
        return self._returncode

    def wait(self, timeout_s: float) -> int | None:
        if self.popen is None:
            deadline = time.monotonic() + timeout_s
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            return None if self.alive() else self._returncode
        try:
            return self._status(self.popen.wait(timeout=timeout_s))
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, n_bytes: int = 2000) -> str:
        return file_tail(self.files.log, n_bytes)

    def console_tail(self, n_bytes: int = 4000) -> str:
        return file_tail(self.files.console, n_bytes)

    def exit_error(self, message: str) -> CommandError:
        """The error for a QEMU that failed: its argv, exit code and log tail."""
        if self.popen is None:
            return CommandError([QEMU_BINARY], self.returncode, self.log_tail(), message=message)
        return exit_error(
            self.popen, message=message, log=self.files.log, returncode=self.returncode
        )


def _pid_is_qemu(pid: int, files: Files) -> bool:
    """True if ``pid`` is alive and is the QEMU of these files (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return False
    return str(files.agent).encode() in cmdline


def find_marked_qemus(under: Path) -> dict[str, int]:
    """Sandbox id -> pid of every running QEMU named ``tierbox-<id>`` whose
    sockets live under ``under`` (so a test run with its own TIERBOX_RUN never
    touches another run's guests)."""
    out: dict[str, int] = {}
    prefix = str(under).rstrip("/").encode() + b"/"
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            args = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not args or not args[0].endswith(QEMU_BINARY.encode()):
            continue
        if not any(prefix in a for a in args):
            continue
        for i, a in enumerate(args[:-1]):
            if a == b"-name":
                m = re.match(rb"^" + MARKER.encode() + rb"-([0-9a-z]+)(,|$)", args[i + 1])
                if m:
                    out[m.group(1).decode()] = int(name)
    return out


def ram_files_in_use() -> set[str]:
    """RAM file paths named on the command line of any running QEMU."""
    used: set[str] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            args = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(QEMU_BINARY.encode()):
            for a in args:
                m = re.search(rb"mem-path=([^,]+)", a)
                if m:
                    used.add(m.group(1).decode(errors="replace"))
    return used


def console_panic(text: str) -> str | None:
    """The guest kernel's panic line in console output, if it panicked."""
    for line in text.splitlines():
        if "Kernel panic" in line:
            return re.sub(r"^\[\s*[\d.]+\]\s*", "", line).strip()
    return None
