"""The OCI runtime driver shared by the ``container`` (crun, runc) and
``gvisor`` (runsc) tiers.

A sandbox is an OCI bundle whose rootfs is an overlayfs over the image's
read-only unpacked layers, placed in a child of the sandbox's tierbox cgroup
(so OOM counters survive the runtime deleting its own cgroup). One-shot runs
use ``<runtime> run`` with the workload as PID 1, which is exactly what the raw
engine does; long-lived sandboxes run catatonit as PID 1 and ``exec`` into it.
Each tier subclasses :class:`OciTier` with its runtime's specifics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from tierbox.errors import (
    CommandError,
    SandboxClosedError,
    SpecError,
)
from tierbox.host import capture, mntns, netgw, pty
from tierbox.host.cgroups import SandboxCgroup, cgroup_version
from tierbox.host.netgw import Gateway
from tierbox.host.pinned import PinnedProcess, start_time
from tierbox.host.procs import kill_tree, process_info
from tierbox.host.rootfs import RootDir
from tierbox.host.runner import exit_error, run, spawn
from tierbox.network import Egress, NetworkPolicy
from tierbox.paths import MARKER, run_dir
from tierbox.spec import (
    DEFAULT_PATH,
    ExecResult,
    FileEntry,
    Limits,
    ProcessInfo,
    SandboxSpec,
    Stats,
    Termination,
    TerminationKind,
)
from tierbox.tiers import _pool, oci, teardown
from tierbox.tiers.base import Capabilities, Instance, Tier
from tierbox.tiers.commands import Command, ExecRequest, OutputCallback, PumpCommand
from tierbox.tiers.oci import INIT_PATH
from tierbox.tiers.outcome import classify, not_runnable
from tierbox.tiers.tty import PtyCommand

INIT_BINARY = "/usr/bin/catatonit"
#: how long close() waits for a SIGKILLed init to exit (crun's delete of a
#: running container polls for the init it killed and takes ~6 ms longer;
#: measured in benchmarks/bench_lifecycle.py)
INIT_KILL_WAIT_S = 2.0
_NOT_FOUND = re.compile(
    r"executable file .* not found|error finding executable|exec(ve)? .*: No such file"
)
_NOT_EXECUTABLE = re.compile(
    r"open executable: (Permission denied|Operation not permitted)"
    r"|failed to load .*: permission denied|exec(ve)? .*: [Pp]ermission denied"
)
_CID = re.compile(rf"{MARKER}-([0-9a-f]{{12}})")


def container_id(sandbox_id: str) -> str:
    return f"{MARKER}-{sandbox_id}"


def runtime_version(binary: str) -> str:
    """First line of ``binary --version`` ("" if it cannot say)."""
    try:
        out = run([binary, "--version"], timeout_s=10).stdout.decode()
    except CommandError:
        return ""
    return out.splitlines()[0] if out else ""


#: commands can run on a pty the runtime makes (``exec --console-socket``);
#: egress through a per-sandbox gateway (host/netgw.py), which also
#: publishes ports
CAPABILITIES = Capabilities(tty=True, networks=frozenset(NetworkPolicy), publish_ports=True)


class OciInstance(Instance):
    """A long-lived OCI container: PID 1 is an init, work arrives by ``exec``."""

    capabilities = CAPABILITIES
    tears_down_in_background = True

    def __init__(
        self, tier: OciTier, sandbox_id: str, spec: SandboxSpec, state: dict[str, Any]
    ) -> None:
        self.tier = tier
        self.tier_name = tier.name
        self.id = sandbox_id
        self.spec = spec
        self.cg = SandboxCgroup(relpath=state["cgroup"], version=cgroup_version())
        self.dir = Path(state["dir"])
        self.init_pid = int(state["init_pid"])
        self.image_env: dict[str, str] = dict(state.get("image_env", {}))
        self.cwd: str = state.get("cwd", "/")
        self.workdir = self.cwd
        self.managed: bool = state.get("managed", True)
        self._counter = itertools.count()
        self._closed = False
        # Pinned now: the recorded start time proves the PID is still our init.
        self.init = PinnedProcess(self.init_pid, state.get("init_start"), label=sandbox_id)
        self._root: RootDir | None = None
        self.gateway: Gateway | None = None
        if state.get("gateway"):
            self.gateway = Gateway.attach(sandbox_id, state["gateway"])

    def state(self) -> dict[str, Any]:
        return {
            "gateway": self.gateway.state() if self.gateway is not None else None,
            "cgroup": self.cg.relpath,
            "dir": str(self.dir),
            "init_pid": self.init_pid,
            "init_start": self.init.start,
            "image_env": self.image_env,
            "cwd": self.cwd,
            "managed": self.managed,
        }

    def _check_open(self) -> None:
        """Closed or dead sandboxes refuse work with an error that says so."""
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed")
        self.init.check()

    def _start(self, req: ExecRequest) -> Command:
        self._check_open()
        timeout = req.timeout(self.spec.limits.timeout_s)
        return self._runtime_start(req, timeout, self.spec.limits.output_bytes)

    def _runtime_exec(
        self,
        argv: Sequence[str],
        stdin: bytes | None,
        env: Mapping[str, str] | None,
        timeout: float | None,
        output_bytes: int,
    ) -> ExecResult:
        """``<runtime> exec`` waited for here, output capped at ``output_bytes``."""
        req = ExecRequest(argv=list(argv), stdin=stdin, env=env)
        return self._runtime_start(req, timeout, output_bytes).wait_here()

    def _runtime_start(self, req: ExecRequest, timeout: float | None, output_bytes: int) -> Command:
        """``<runtime> exec`` of one command, not yet waited for."""
        n = next(self._counter)
        proc_file = self.dir / f"exec-{os.getpid()}-{threading.get_native_id()}-{n}.json"
        pid_file = proc_file.with_suffix(".pid")
        process = oci.process_json(
            req.argv,
            self.spec,
            env=self.tier.merged_env(self.image_env, self.spec, req.env),
            cwd=req.cwd or self.cwd,
            rlimits=self.tier.process_rlimits(self.spec),
            user=req.user,
        )
        if req.tty:  # 80x24 until resized
            process["terminal"] = True
            process["consoleSize"] = {"height": pty.DEFAULT_ROWS, "width": pty.DEFAULT_COLS}
        oci.write_json(proc_file, process)
        cmd = [*self.tier.runtime_argv(self.managed), "exec", *self.tier.exec_pid_args(pid_file)]
        console, master, slave = None, None, None
        if req.tty and self.tier.tty_console_socket:
            console = pty.ConsoleSocket(proc_file.with_suffix(".sock"))
            cmd += ["--tty", "--console-socket", str(console.path)]
        elif req.tty:
            master, slave = pty.open_pty()
        cmd += ["--process", str(proc_file), container_id(self.id)]
        before = self.cg.oom_kills()
        hits = self.cg.pids_max_hits()
        started = time.monotonic()
        piped = (req.stdin is not None or req.keep_stdin_open) and not req.tty
        stdio: dict[str, Any] = {
            "stdin": subprocess.PIPE if piped else subprocess.DEVNULL,
            "stdout": subprocess.PIPE,
            "stderr": subprocess.PIPE,
        }
        if slave is not None:  # the runtime's own terminal, passed on to the command
            stdio = {"stdin": slave, "stdout": slave, "stderr": slave}
            stdio["preexec_fn"] = pty.make_controlling
        # The runtime itself puts the exec'd process into the container's
        # cgroup (crun, runc) or runs it inside the Sentry (runsc).
        try:
            proc = spawn(cmd, start_new_session=True, **stdio)
            if console is not None:
                master = console.receive(proc)
        except BaseException:
            if master is not None:
                os.close(master)
            raise
        finally:
            if console is not None:
                console.close()
            if slave is not None:
                os.close(slave)

        def signal_exec(sig: int) -> None:
            self.tier.kill_exec(self, pid_file, sig)

        def kill() -> None:
            signal_exec(signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

        def finish(cap: capture.Captured) -> ExecResult:
            proc_file.unlink(missing_ok=True)
            pid_file.unlink(missing_ok=True)
            result = classify(
                cap,
                limits=self.spec.limits,
                timeout_s=timeout,
                cg=self.cg,
                oom_kills_before=before,
                pids_hits_before=hits,
                status_from_runtime=True,
            )
            # A dead sandbox is not a workload that exited; but an OOM kill is
            # reported as one even when it took the whole sandbox (gVisor's Sentry
            # dies with it): the next call finds the sandbox dead.
            if not result.ok and result.termination.kind is not TerminationKind.OOM_KILLED:
                self.init.check()
            return self.tier.runtime_failure(cap, req.argv) or result

        if req.tty:
            if master is None:  # the runtime failed before it made the terminal
                master, unused = pty.open_pty()
                os.close(unused)
            tty = pty.PtyPump(
                proc,
                master,
                stdin=req.stdin,
                timeout_s=timeout,
                output_bytes=output_bytes,
                kill=kill,
                started=started,
                on_output=req.on_stdout,
            )
            return PtyCommand(
                tty, finish, signal_fn=signal_exec, pid_fn=lambda: self.tier.exec_pid(pid_file)
            )
        pipe = capture.PipePump(
            proc,
            stdin=req.stdin,
            timeout_s=timeout,
            output_bytes=output_bytes,
            kill=kill,
            started=started,
            on_stdout=req.on_stdout,
            on_stderr=req.on_stderr,
            keep_stdin_open=req.keep_stdin_open,
        )
        return PumpCommand(
            pipe, finish, signal_fn=signal_exec, pid_fn=lambda: self.tier.exec_pid(pid_file)
        )

    # ---- files -------------------------------------------------------------
    # Through the init's root (/proc/PID/root, pinned): exactly the workload's
    # view, tmpfs /tmp included, resolved by openat2 inside it (host/rootfs.py).
    def _files_root(self) -> RootDir:
        self._check_open()
        if self._root is None:
            uid, gid = oci.parse_user(self.spec.user)
            self._root = RootDir(self.init.open_root(), uid=uid, gid=gid, label=self.id)
        return self._root

    def _put_file(self, path: str, data: bytes, mode: int) -> None:
        self._files_root().write_file(path, data, mode)

    def _get_file(self, path: str, max_bytes: int) -> bytes:
        return self._files_root().read_file(path, max_bytes)

    def _copy_out(self, path: str, out: BinaryIO, max_bytes: int | None) -> int:
        return self._files_root().copy_out(path, out, max_bytes)

    def _entries(self, path: str) -> list[FileEntry]:
        return self._files_root().entries(path)

    def stats(self) -> Stats:
        return self.with_network(self.cg.stats())

    def with_network(self, stats: Stats) -> Stats:
        """``stats`` with the bytes the sandbox sent and received: its
        gateway's counters; 0 with network=none (loopback only); unknown
        with the host's network."""
        if self.gateway is not None:
            tx, rx = self.gateway.counters()
            return dataclasses.replace(stats, net_tx_bytes=tx, net_rx_bytes=rx)
        if self.spec.network is NetworkPolicy.NONE:
            return dataclasses.replace(stats, net_tx_bytes=0, net_rx_bytes=0)
        return stats

    def host_pids(self) -> list[int]:
        return self.cg.pids()

    def alive(self) -> bool:
        """Open, and its init (held by a pidfd) still running."""
        return not self._closed and self.init.alive()

    def processes(self) -> list[ProcessInfo]:
        """Pids as the container numbers them (its init is 1)."""
        self._check_open()
        found = (process_info(pid, in_namespace=True) for pid in self.cg.pids())
        return sorted((p for p in found if p is not None), key=lambda p: p.pid)

    def close(self) -> Termination | None:
        if self._closed:
            return None
        self._closed = True
        if self._root is not None:
            self._root.close()
        # The workload stops here; the runtime's own delete, the gateway, the
        # overlay and the cgroup go off the caller's path (tiers/teardown.py).
        self.tier.stop(self)
        self.init.close()
        teardown.later(f"sandbox {self.id}", self._release)
        return None

    def _release(self) -> None:
        """What close() leaves to the teardown thread, in order."""
        self.tier.released(self)
        self.tier.delete_container(self.id, managed=self.managed)
        if self.gateway is not None:
            self.gateway.close()
        self.tier.teardown(self.cg, self.dir)


def network_files(d: Path, network: object, gateway: Gateway) -> dict[str, str]:
    """/etc/hosts (and /etc/resolv.conf with DNS) for an egress sandbox,
    written to its directory and bind-mounted read-only: the image's own
    would name resolvers the sandbox cannot reach. Sandbox path -> host file."""
    hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if isinstance(network, Egress):
        for name, addresses in sorted(network.hosts().items()):
            hosts += [f"{a}\t{name}" for a in addresses]
    files = {"/etc/hosts": "\n".join(hosts) + "\n"}
    if gateway.dns_address is not None:
        files["/etc/resolv.conf"] = f"nameserver {gateway.dns_address}\noptions timeout:2\n"
    binds = {}
    for inside, text in files.items():
        host = d / f"net-{inside.rsplit('/', 1)[-1]}"
        host.write_text(text)
        binds[inside] = str(host)
    return binds


class _Image(NamedTuple):
    rootfs: Path
    env: dict[str, str]
    cwd: str
    entrypoint: list[str]
    cmd: list[str]


class OciTier(Tier):
    """Shared machinery of tiers driven by an OCI runtime binary."""

    def __init__(self) -> None:
        self._pool = _pool.SlotPool()

    #: subclasses set these
    runtime: str = ""
    instance_cls = OciInstance
    capabilities = CAPABILITIES
    #: a tty command's pty is made by the runtime and its master sent over
    #: ``--console-socket`` (crun, runc); False: the runtime runs on a pty
    #: tierbox makes and hands its terminal on (runsc, whose console socket
    #: works only with --detach)
    tty_console_socket = True
    seccomp = True

    def prepare(self, spec: SandboxSpec) -> SandboxSpec:
        """As every tier, and the gateway's rules built once from the pinned
        allow-list, so an entry the gateway cannot carry (IPv6 only) is
        refused before anything is made."""
        spec = super().prepare(spec)
        if isinstance(spec.network, Egress):
            netgw.ruleset(spec.network, spec.ports)
        return spec

    # ---- runtime specifics (overridden by gvisor) --------------------------
    def runtime_argv(self, managed: bool = True) -> list[str]:
        """The runtime's argv prefix; ``managed`` False: it manages no cgroups."""
        raise NotImplementedError

    def exec_pid_args(self, pid_file: Path) -> list[str]:
        return ["--pid-file", str(pid_file)]

    def kill_exec(self, inst: OciInstance, pid_file: Path, sig: int = signal.SIGKILL) -> None:
        """Signal one exec'd process tree (its host pid is in ``pid_file``)."""
        with contextlib.suppress(OSError, ValueError):
            kill_tree(int(pid_file.read_text().strip()), sig)

    def exec_pid(self, pid_file: Path) -> int | None:
        """The exec'd process's pid inside the sandbox (from its host pid)."""
        try:
            host_pid = int(pid_file.read_text().strip())
            with open(f"/proc/{host_pid}/status") as f:
                for line in f:
                    if line.startswith("NSpid:"):
                        return int(line.split()[-1])
        except (OSError, ValueError):
            return None
        return None

    def stop(self, inst: OciInstance) -> None:
        """Stop a sandbox's workload for good, as close() begins: its init
        (crun: the container's PID 1, whose exit kills the rest of its PID
        namespace before the exit is seen) SIGKILLed through its pidfd and
        waited for."""
        inst.init.kill(timeout_s=INIT_KILL_WAIT_S)

    def released(self, inst: OciInstance) -> None:
        """First step of the background teardown, before the runtime's delete."""

    def runtime_failure(self, cap: capture.Captured, argv: Sequence[str]) -> ExecResult | None:
        """The runtime's own "no such executable" or "not executable" (not the
        workload's failure) as the result every tier gives: 127 or 126 and
        one line on stderr, as a shell reports it."""
        if cap.returncode == 0 or cap.stop is not capture.StopReason.NONE:
            return None
        lines = cap.stderr.decode(errors="replace").strip().splitlines()
        last = lines[-1] if lines else ""
        if _NOT_FOUND.search(last):
            return not_runnable(argv[0], FileNotFoundError(), cap.duration_s)
        if _NOT_EXECUTABLE.search(last):
            denied = PermissionError(errno.EACCES, "Permission denied")
            return not_runnable(argv[0], denied, cap.duration_s)
        return None

    def cgroups_path(self, cg: SandboxCgroup, *, one_shot: bool) -> str | None:
        """Where the runtime should put the container, or None to have it
        manage no cgroups and inherit ours (then it is started inside ``cg``).

        One-shot runs use None: the runtime deletes the cgroup it manages the
        moment PID 1 exits, before tierbox could read the OOM counter, and on
        cgroup v1 that counter does not propagate to a parent. Long-lived
        sandboxes let the runtime manage our own cgroup: tierbox reads the
        counters after each exec, while the container still exists, and the
        runtime places exec'd processes itself.
        """
        return None

    def popen(
        self, cg: SandboxCgroup, cgroups_path: str | None, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        """Start the runtime, inside ``cg`` when it manages no cgroups."""
        return spawn(argv, launch=cg.popen if cgroups_path is None else None, **kwargs)

    def cgroup_limits(self, spec: SandboxSpec) -> Limits:
        """Limits for the host cgroup; engines with their own overhead add to it."""
        return spec.limits

    def process_rlimits(self, spec: SandboxSpec) -> list[dict[str, Any]]:
        """Extra OCI rlimits for the workload."""
        return []

    def global_args(self, spec: SandboxSpec) -> list[str]:
        """Runtime flags that depend on the sandbox (runsc's --network)."""
        return []

    def annotations(self) -> dict[str, str]:
        """OCI annotations for the runtime."""
        return {}

    def helper_binds(self) -> dict[str, str]:
        """Host binaries a long-lived sandbox gets beside its init."""
        return {}

    def prime(self, spec: SandboxSpec) -> None:
        """Make once-per-host caches before the first one-shot run."""

    def after_start(self, cid: str) -> None:
        """Hook run once a long-lived container is up."""

    def _start_detached(
        self,
        spec: SandboxSpec,
        cg: SandboxCgroup,
        cgroups_path: str | None,
        d: Path,
        cid: str,
        pid_file: Path,
    ) -> None:
        """``run --detach``. Output goes to a file, not a pipe: the container's
        init inherits the runtime's stdio and would hold a pipe open forever."""
        argv = [
            *self.runtime_argv(managed=cgroups_path is not None),
            *self.global_args(spec),
            "run",
            "--detach",
            "--pid-file",
            str(pid_file),
            "--bundle",
            str(d),
            cid,
        ]
        log = d / "runtime.log"
        with open(log, "wb") as out:
            proc = self.popen(
                cg,
                cgroups_path,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
            try:
                rc = capture.wait_exit(proc, 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise exit_error(
                    proc, message=f"{self.runtime} did not start {cid} in 60 s", log=log
                ) from None
        if rc != 0:
            raise exit_error(proc, message=f"{self.runtime} could not start {cid}", log=log)

    # ---- shared life cycle -------------------------------------------------
    def image_config(
        self, spec: SandboxSpec
    ) -> tuple[Path, dict[str, str], str, list[str], list[str]]:
        """(rootfs, env, cwd, entrypoint, cmd) of the spec's image."""
        from tierbox.images.store import default_store

        if not spec.image:
            raise SpecError(f"the {self.name} tier needs an image: e.g. busybox")
        store = default_store()
        record = store.resolve(spec.image)
        rootfs = store.rootfs(spec.image)
        cfg = record.config
        cwd = spec.workdir if spec.workdir != "/" else (cfg.workdir or "/")
        return rootfs, dict(cfg.env), cwd, list(cfg.entrypoint), list(cfg.cmd)

    def merged_env(
        self, image_env: Mapping[str, str], spec: SandboxSpec, extra: Mapping[str, str] | None
    ) -> dict[str, str]:
        env = {"PATH": DEFAULT_PATH, "HOME": "/tmp", "LANG": "C.UTF-8"}
        env.update(image_env)
        env.update(spec.env)
        if extra:
            env.update(extra)
        return env

    def _prepare(self, spec: SandboxSpec, *, pooled: bool) -> tuple[_pool.Slot, _Image]:
        """A slot (directory + cgroup, pooled for one-shot runs) with a fresh
        overlay rootfs over the image mounted at ``<slot>/rootfs``."""
        image = _Image(*self.image_config(spec))
        self.runtime_argv()  # creates the runtime namespace before we mount under it
        limits = self.cgroup_limits(spec)
        slot = self._pool.acquire(limits) if pooled else _pool.new_slot(limits)
        d = slot.dir
        try:
            (d / "upper").mkdir()
            (d / "work").mkdir()
            (d / "rootfs").mkdir(exist_ok=True)
            slot.cg.enable_child_controllers()
            mntns.mount_overlay(image.rootfs, d / "upper", d / "work", d / "rootfs")
        except BaseException:
            self.release(slot, pooled=pooled)
            raise
        return slot, image

    def release(self, slot: _pool.Slot, *, pooled: bool) -> None:
        """Undo _prepare: unmount; a pooled slot goes back without its overlay
        dirs (deleted off the hot path), any other is destroyed."""
        if not pooled:
            self.teardown(slot.cg, slot.dir)
            return
        for m in mntns.mounts_under(slot.dir):
            mntns.umount(m)
        for sub in ("upper", "work"):
            _pool.discard_dir(slot.dir / sub)
        self._pool.release(slot, pristine=True)

    def _write_bundle(
        self,
        d: Path,
        spec: SandboxSpec,
        image: _Image,
        argv: list[str],
        cgroups_path: str | None,
        *,
        init: bool = False,
        gateway: Gateway | None = None,
    ) -> None:
        """config.json for ``argv`` as PID 1; ``init``: the long-lived
        sandbox's catatonit, bind-mounted from the host, working in /;
        ``gateway``: the egress sandbox joins its network namespace and
        gets an /etc/hosts with the pinned names (and an /etc/resolv.conf
        naming the gateway's DNS forwarder when the policy allows DNS)."""
        process = oci.process_json(
            argv,
            spec,
            env=self.merged_env(image.env, spec, None),
            cwd="/" if init else image.cwd,
            rlimits=self.process_rlimits(spec),
        )
        config = oci.bundle_config(
            rootfs=d / "rootfs",
            process=process,
            spec=spec,
            cgroups_path=cgroups_path,
            hostname=MARKER,
            binds={
                **({INIT_PATH: INIT_BINARY, **self.helper_binds()} if init else {}),
                **(network_files(d, spec.network, gateway) if gateway is not None else {}),
            },
            seccomp=self.seccomp,
            annotations=self.annotations(),
            netns_path=gateway.bind_netns(d / "netns") if gateway is not None else None,
        )
        oci.write_json(d / "config.json", config)

    def teardown(self, cg: SandboxCgroup, d: Path) -> None:
        """Unmount, remove the cgroup, discard the directory."""
        for m in mntns.mounts_under(d):
            mntns.umount(m)
        cg.destroy()
        _pool.discard_dir(d)

    def _argv(self, argv: Sequence[str], entrypoint_cmd: list[str], spec: SandboxSpec) -> list[str]:
        if argv:
            return list(argv)
        if entrypoint_cmd:
            return entrypoint_cmd
        raise SpecError(f"no command given and image {spec.image} has no default command")

    def _run(
        self,
        spec: SandboxSpec,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """One-shot: the workload is PID 1 of a fresh container (egress:
        create, exec, close, since its gateway is made per sandbox)."""
        if isinstance(spec.network, Egress):
            return Tier._run(
                self, spec, argv, stdin=stdin, on_stdout=on_stdout, on_stderr=on_stderr
            )
        self.prime(spec)
        slot, image = self._prepare(spec, pooled=True)
        sandbox_id, d, cg = slot.id, slot.dir, slot.cg
        default = image.entrypoint + image.cmd
        cgroups_path = self.cgroups_path(cg, one_shot=True)
        managed = cgroups_path is not None
        exited = False  # the runtime deletes its container itself once PID 1 is reaped
        try:
            self._write_bundle(d, spec, image, self._argv(argv, default, spec), cgroups_path)
            cid = container_id(sandbox_id)
            argv_run = [*self.runtime_argv(managed), *self.global_args(spec), "run"]
            started = time.monotonic()
            proc = self.popen(
                cg,
                cgroups_path,
                [*argv_run, "--bundle", str(d), cid],
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            cap = capture.communicate(
                proc,
                stdin=stdin,
                timeout_s=spec.limits.timeout_s,
                output_bytes=spec.limits.output_bytes,
                kill=cg.kill_all,
                started=started,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
            )
            exited = True
            result = classify(
                cap,
                limits=spec.limits,
                timeout_s=spec.limits.timeout_s,
                cg=cg,
                oom_kills_before=slot.counters[0],
                pids_hits_before=slot.counters[1],
                status_from_runtime=True,
            )
            slot.refresh_counters()
            return self.runtime_failure(cap, argv or default) or result
        finally:
            if not exited:
                self.delete_container(sandbox_id, managed=managed)
            self.release(slot, pooled=exited)

    def _create(self, spec: SandboxSpec) -> OciInstance:
        slot, image = self._prepare(spec, pooled=False)
        sandbox_id, d, cg = slot.id, slot.dir, slot.cg
        cid = container_id(sandbox_id)
        cgroups_path = self.cgroups_path(cg, one_shot=False)
        gateway = None
        try:
            if isinstance(spec.network, Egress):  # the sandbox's directory is ours by now
                # ready() below, once the runtime has started
                gateway = Gateway.start(sandbox_id, spec.network, ports=spec.ports)
            self._write_bundle(
                d, spec, image, [INIT_PATH, "-P"], cgroups_path, init=True, gateway=gateway
            )
            pid_file = d / "init.pid"
            self._start_detached(spec, cg, cgroups_path, d, cid, pid_file)
            if gateway is not None:  # its router side was made while the runtime started
                gateway.ready()
            self.after_start(cid)
            init_pid = int(pid_file.read_text().strip())
            state = {
                "cgroup": cg.relpath,
                "dir": str(d),
                "init_pid": init_pid,
                "init_start": start_time(init_pid),
                "image_env": image.env,
                "cwd": image.cwd,
                "managed": cgroups_path is not None,
                "gateway": gateway.state() if gateway is not None else None,
            }
        except BaseException:
            self.delete_container(sandbox_id, managed=cgroups_path is not None)
            if gateway is not None:
                gateway.close()
            self.release(slot, pooled=False)
            raise
        return self.instance_cls(self, sandbox_id, spec, state)

    def attach(self, sandbox_id: str, state: dict[str, Any]) -> OciInstance:
        return self.instance_cls(self, sandbox_id, SandboxSpec.from_dict(state["spec"]), state)

    def delete_container(self, sandbox_id: str, *, managed: bool = True) -> None:
        run(
            [*self.runtime_argv(managed), "delete", "--force", container_id(sandbox_id)],
            check=False,
            timeout_s=30,
        )

    def reap(self, live: set[str]) -> list[str]:
        """Delete containers named tierbox-<id> whose sandbox is not live;
        report one only when its runtime state is really gone."""
        removed: list[str] = []
        state_root = self.state_root()
        if not state_root.is_dir():
            return removed
        entries: dict[str, list[Path]] = {}
        for e in state_root.iterdir():
            if m := _CID.search(e.name):
                entries.setdefault(m.group(1), []).append(e)
        for sandbox_id in sorted(i for i in entries if i not in live):
            self.delete_container(sandbox_id)
            for e in entries[sandbox_id]:
                if e.is_file() and e.name.endswith(".lock"):
                    e.unlink(missing_ok=True)  # runsc leaves its lock file behind
            if not any(e.exists() for e in entries[sandbox_id]):
                removed.append(f"{self.runtime} container {container_id(sandbox_id)}")
        return removed

    def state_root(self) -> Path:
        return run_dir() / self.runtime
