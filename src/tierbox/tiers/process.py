"""The ``process`` tier: a plain host process in its own cgroup.

This tier gives little isolation from the host: the workload sees the host's
filesystem and processes, and shares its kernel. What it does promise
(SECURITY.md):

- it runs as a uid of its own (``host/uids.py``), never root unless
  ``user="0"`` is asked for, with no capabilities and no supplementary
  groups, so it cannot leave its cgroup, raise its limits, or signal tierbox
  or another sandbox;
- its limits (memory, pids, cpu, wall clock, output) hold through a cgroup it
  is born in; a command's timeout ends the command's process group;
  processes a command leaves running (``sleep 300 &``) live on until the
  sandbox closes, as in a container, and nothing outlives a one-shot run or
  the sandbox;
- ``/tmp`` is its own: a tmpfs of ``disk_mib`` (default 64 MiB) mounted over
  the host's ``/tmp`` in a private mount namespace. It is the working
  directory, ``HOME``, and the only place the files API reaches;
- with ``network="none"`` (the default) it has a network namespace of its
  own holding only ``lo``, made with the mount namespace in one ``unshare``
  (~0.5 ms at create): every command of the sandbox, and each one-shot run,
  starts in it. A sandbox made with ``create`` pins it on ``netns`` in its
  directory, so a process that reattaches joins the same namespace (a server
  a command left running stays reachable on 127.0.0.1); ``close`` unmounts
  it, ``tierbox gc`` unmounts what a crash left, as any other mount in a
  sandbox directory. One-shot runs pin nothing: the namespace lives in the
  pooled slot's thread and its processes, and goes with them.
  ``network="host"`` shares the host's network. An ``Egress`` policy puts
  the workload in the sandbox namespace of a per-sandbox gateway
  (host/netgw.py), as on the container tier; the pinned names reach it
  through an /etc/hosts (and /etc/resolv.conf) of the sandbox's, bound
  read-only over the host's in its private mount namespace only. Ports are
  not published. A workload run as root (``user="0"``) holds every
  capability and can re-join the host's network namespace: these
  namespaces bound unprivileged workloads only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tierbox.errors import HostError, SandboxClosedError, SandboxError, SpecError
from tierbox.host import helpers, mntns, pty, uids
from tierbox.host.capture import Captured, PipePump
from tierbox.host.cgroups import SandboxCgroup, cgroup_version
from tierbox.host.netgw import Gateway
from tierbox.host.privtmp import PrivateTmp, unpin_netns
from tierbox.host.procs import process_info
from tierbox.host.rootfs import RootDir
from tierbox.network import Egress, NetworkPolicy
from tierbox.spec import (
    DEFAULT_PATH,
    ExecResult,
    ProcessInfo,
    SandboxSpec,
    Stats,
    Termination,
    parse_user,
)
from tierbox.tiers import _pool
from tierbox.tiers.base import Availability, Capabilities, DirectoryFiles, Instance, Tier
from tierbox.tiers.commands import Command, ExecRequest, Finished, OutputCallback, PumpCommand
from tierbox.tiers.outcome import classify, not_runnable
from tierbox.tiers.tty import PtyCommand

DEFAULT_TMP_MIB = 64
#: How long to wait for killed processes to be reaped before a new spawn.
ZOMBIE_WAIT_S = 5.0
NOFILE_LIMIT = 4096  # hard limit; root here cannot raise it past 20000 anyway
TMP = "/tmp"
#: commands can run on a pty (host/pty.py); egress through a per-sandbox
#: gateway (host/netgw.py) whose sandbox namespace the workload is born in
CAPABILITIES = Capabilities(tty=True, networks=frozenset(NetworkPolicy))
#: an egress sandbox's name files, shown read-only over the host's
#: in its private mount namespace: sandbox path -> file in its directory
NAME_FILES = {"/etc/hosts": "etc-hosts", "/etc/resolv.conf": "etc-resolv.conf"}


class ProcessInstance(DirectoryFiles, Instance):
    tier_name = "process"
    capabilities = CAPABILITIES
    files_mount = TMP
    workdir = TMP

    def __init__(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        cg: SandboxCgroup,
        host_dir: Path,
        *,
        uid: int,
        gid: int,
        owns_uid: bool,
        gateway: Gateway | None = None,
    ) -> None:
        self.id = sandbox_id
        self.spec = spec
        self.cg = cg
        self.host_dir = host_dir  # mounted at /tmp for the workload
        self.uid, self.gid = uid, gid
        self.owns_uid = owns_uid
        self._ns: PrivateTmp | None = None
        #: the egress gateway, whose sandbox namespace the workload is born in
        self.gateway = gateway
        #: where the network namespace is pinned for other processes (None:
        #: held by the namespace thread alone, as for a one-shot run)
        self.netns_pin: Path | None = None
        self._root: RootDir | None = None
        self._closed = False
        #: (oom_kills, pids_max_hits) after the last exec: the next one's baseline
        self.counters: tuple[int, int] | None = None

    def _env(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        env = {"PATH": DEFAULT_PATH, "HOME": TMP, "TMPDIR": TMP, "LANG": "C.UTF-8"}
        env.update(self.spec.env)
        if extra:
            env.update(extra)
        return env

    def _namespace(self) -> PrivateTmp:
        if self._ns is None:
            read_only = [m.host for m in self.spec.mounts if m.read_only]
            gw = self.gateway
            d = self.host_dir.parent
            self._ns = PrivateTmp(
                self.host_dir,
                TMP,
                read_only=read_only,
                isolate_network=self.spec.network != NetworkPolicy.HOST,
                netns_pin=self.netns_pin,
                join_netns=Path(gw.netns_path) if gw is not None else None,
                files={k: d / v for k, v in NAME_FILES.items()} if gw is not None else None,
            )
        return self._ns

    def _files_root(self) -> RootDir:
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed")
        if self._root is None:
            self._root = RootDir.open(
                str(self.host_dir), uid=self.uid, gid=self.gid, label=self.id, shown_at=TMP
            )
        return self._root

    def _spawn(self, req: ExecRequest, tty_slave: int | None = None) -> subprocess.Popen[bytes]:
        """Start the workload inside its cgroup and private /tmp, as its user.

        Through the static ``dropexec`` helper where it could be built: the
        spawn then stays a vfork, and the helper also lowers the hard
        RLIMIT_NOFILE/RLIMIT_CORE and sets no_new_privs. Without it, Python
        switches users itself (a full fork, ~1 ms more). ``tty_slave``: the
        pty it runs on, as its stdio and controlling terminal."""
        argv = req.argv
        uid, gid = parse_user(req.user) or (self.uid, self.gid)
        piped = req.stdin is not None or req.keep_stdin_open
        kwargs: dict[str, Any] = {
            "stdin": subprocess.PIPE if piped else subprocess.DEVNULL,
            "stdout": subprocess.PIPE,
            "stderr": subprocess.PIPE,
            "env": self._env(req.env),
            "cwd": req.cwd or TMP,
            "start_new_session": True,  # its own process group: kill() reaches its tree
        }
        if tty_slave is not None:
            kwargs.update(stdin=tty_slave, stdout=tty_slave, stderr=tty_slave)
            kwargs["preexec_fn"] = pty.make_controlling
        helper = helpers.path("dropexec")
        if helper is not None and not str(helper).startswith(TMP + "/"):
            ids = [str(uid), str(gid), str(NOFILE_LIMIT), "0", "--"]
            cmd = [str(helper), *ids, *argv]
        elif self.cg.version == 2:
            # v2 joins the cgroup in preexec_fn, which subprocess runs after
            # a user= switch: switch there too, after the join.

            ctty = kwargs.get("preexec_fn")

            def _drop() -> None:
                if ctty is not None:
                    ctty()
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)

            kwargs["preexec_fn"] = _drop
            cmd = list(argv)
        else:
            kwargs.update(user=uid, group=gid, extra_groups=[])
            cmd = list(argv)
        return self._namespace().call(lambda: self.cg.popen(cmd, **kwargs))

    def _spawn_when_room(
        self, req: ExecRequest, tty_slave: int | None = None
    ) -> subprocess.Popen[bytes]:
        """Spawn; if the pids limit refuses the fork because the last exec's
        killed processes still count (zombies wait for the host's init to
        reap them), wait for them to go, then try once more."""
        try:
            return self._spawn(req, tty_slave)
        except BlockingIOError:
            deadline = time.monotonic() + ZOMBIE_WAIT_S
            while self.cg.has_tasks() and time.monotonic() < deadline:
                time.sleep(0.02)
        try:
            return self._spawn(req, tty_slave)
        except BlockingIOError as exc:
            raise SandboxError(
                f"sandbox {self.id} cannot start a process: its pids limit "
                f"({self.spec.limits.pids}) is taken by processes still exiting; try again"
            ) from exc

    def _start(self, req: ExecRequest) -> Command:
        """A command in its own process group: a timeout, an output flood or
        ``kill`` ends its tree; other commands of the sandbox (background
        ones) keep running until the sandbox closes, as in a container."""
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed")
        timeout = req.timeout(self.spec.limits.timeout_s)
        # Counters only move while work runs: after the first exec, the values
        # read at the end of the previous one are the baseline (one-shot hot path).
        before, hits = self.counters or (self.cg.oom_kills(), self.cg.pids_max_hits())
        started = time.monotonic()
        master, slave = pty.open_pty() if req.tty else (-1, None)
        try:
            proc = self._spawn_when_room(req, slave)
        except (FileNotFoundError, PermissionError) as exc:
            if slave is not None:
                os.close(master)
            return Finished(not_runnable(req.argv[0], exc, time.monotonic() - started))
        except BaseException:
            if slave is not None:
                os.close(master)
            raise
        finally:
            if slave is not None:
                os.close(slave)  # the child holds it: the master sees EIO when it is gone
        group = proc.pid

        def signal_group(sig: int) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)

        def finish(cap: Captured) -> ExecResult:
            result = classify(
                cap,
                limits=self.spec.limits,
                timeout_s=timeout,
                cg=self.cg,
                oom_kills_before=before,
                pids_hits_before=hits,
                status_from_runtime=False,
            )
            self.counters = (self.cg.oom_kills(), self.cg.pids_max_hits())
            return result

        if slave is not None:
            tty = pty.PtyPump(
                proc,
                master,
                stdin=req.stdin,
                timeout_s=timeout,
                output_bytes=self.spec.limits.output_bytes,
                kill=lambda: signal_group(signal.SIGKILL),
                started=started,
                on_output=req.on_stdout,
            )
            return PtyCommand(tty, finish, signal_fn=signal_group, pid=proc.pid)
        pipe = PipePump(
            proc,
            stdin=req.stdin,
            timeout_s=timeout,
            output_bytes=self.spec.limits.output_bytes,
            kill=lambda: signal_group(signal.SIGKILL),
            started=started,
            on_stdout=req.on_stdout,
            on_stderr=req.on_stderr,
            keep_stdin_open=req.keep_stdin_open,
        )
        return PumpCommand(pipe, finish, signal_fn=signal_group, pid=proc.pid)

    def stats(self) -> Stats:
        """The cgroup's figures, with the bytes sent and received through an
        egress gateway (0 with network=none: loopback only; unknown with
        the host's network)."""
        stats = self.cg.stats()
        if self.gateway is not None:
            tx, rx = self.gateway.counters()
            return dataclasses.replace(stats, net_tx_bytes=tx, net_rx_bytes=rx)
        if self.spec.network == NetworkPolicy.NONE:
            return dataclasses.replace(stats, net_tx_bytes=0, net_rx_bytes=0)
        return stats

    def host_pids(self) -> list[int]:
        return self.cg.pids()

    def processes(self) -> list[ProcessInfo]:
        """Host pids: the process tier shares the host's pid namespace."""
        found = (process_info(pid, in_namespace=False) for pid in self.cg.pids())
        return [p for p in found if p is not None]

    def state(self) -> dict[str, Any]:
        return {
            "cgroup": self.cg.relpath,
            "host_dir": str(self.host_dir),
            "uid": self.uid,
            "gid": self.gid,
            "owns_uid": self.owns_uid,
            "gateway": self.gateway.state() if self.gateway is not None else None,
        }

    def release_handles(self) -> None:
        """Stop the namespace thread and unpin the root (the slot stays)."""
        if self._ns is not None:
            self._ns.close()
            self._ns = None
        if self._root is not None:
            self._root.close()
            self._root = None

    def close(self) -> Termination | None:
        if self._closed:
            return None
        self._closed = True
        self.cg.destroy()  # nothing of the workload runs past this
        self.release_handles()
        _unmount_tmp(self.host_dir)
        unpin_netns(netns_file(self.host_dir))
        if self.gateway is not None:
            self.gateway.close()
        if self.owns_uid:
            uids.release(self.uid)
        _pool.discard_dir(self.host_dir.parent)
        return None


def _mount_tmp(host_dir: Path, spec: SandboxSpec, uid: int, gid: int) -> None:
    """The sandbox's /tmp: a size-capped tmpfs owned by the workload."""
    size = spec.limits.disk_mib or DEFAULT_TMP_MIB
    host_dir.mkdir()
    mntns.mount_tmpfs(host_dir, f"size={size}m,mode=0700,uid={uid},gid={gid}")


def _unmount_tmp(host_dir: Path) -> None:
    mntns.umount(host_dir)


def _write_name_files(d: Path, policy: Egress, gateway: Gateway) -> None:
    """/etc/hosts with the allow-list's pinned names; /etc/resolv.conf naming
    the gateway's DNS forwarder with ``dns=True``, else no server (a lookup
    past /etc/hosts then fails at once on loopback instead of timing out
    on the host's resolvers, which the filter does not let it reach)."""
    hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    for name, addresses in sorted(policy.hosts().items()):
        hosts += [f"{a}\t{name}" for a in addresses]
    if gateway.dns_address is not None:
        resolv = f"nameserver {gateway.dns_address}\noptions timeout:2\n"
    else:
        resolv = "# no DNS: the allow-list's names are pinned in /etc/hosts\n"
    for text, name in (
        ("\n".join(hosts) + "\n", NAME_FILES["/etc/hosts"]),
        (resolv, NAME_FILES["/etc/resolv.conf"]),
    ):
        path = d / name
        path.write_text(text)
        path.chmod(0o644)


def netns_file(host_dir: Path) -> Path:
    """Where a created sandbox's network namespace is pinned: beside its /tmp."""
    return host_dir.parent / "netns"


class ProcessTier(Tier):
    name = "process"
    capabilities = CAPABILITIES
    isolation = (
        "none: host filesystem and processes are visible; own uid, own /tmp, "
        "loopback-only network namespace (or egress allow-list; network=host shares "
        "the host's), limits via cgroup"
    )

    def __init__(self) -> None:
        self._pool = _pool.SlotPool()

    def check_spec(self, spec: SandboxSpec) -> None:
        super().check_spec(spec)
        for m in spec.mounts:
            if m.path == TMP or m.path.startswith(TMP + "/"):
                raise SpecError(
                    f"mount {m.host}: the process tier's /tmp is its own, so a host path "
                    "below /tmp is not visible there; mount a path outside /tmp"
                )
            if m.path != m.host:
                raise SpecError(
                    f"mount {m.host} at {m.path}: the process tier sees host paths as they are; "
                    f"mount it with path={m.host!r} (read-only still applies), or use a tier "
                    "with its own filesystem (container, gvisor)"
                )

    def _attach_slot(self, slot: _pool.Slot, spec: SandboxSpec) -> ProcessInstance:
        """An instance on ``slot``: the slot's uid and /tmp are made once and
        kept while it is pooled."""
        if "uid" not in slot.extra:
            asked = parse_user(spec.user)
            uid, gid = asked if asked is not None else (uids.claim(slot.id),) * 2
            if asked is None:
                slot.cleanups.append(lambda: uids.release(uid))
            _mount_tmp(slot.dir / "tmp", spec, uid, gid)
            slot.cleanups.append(lambda: _unmount_tmp(slot.dir / "tmp"))
            slot.extra.update(uid=uid, gid=gid, owns_uid=asked is None)
        inst = ProcessInstance(
            slot.id,
            spec,
            slot.cg,
            slot.dir / "tmp",
            uid=slot.extra["uid"],
            gid=slot.extra["gid"],
            owns_uid=slot.extra["owns_uid"],
        )
        if "ns" in slot.extra:
            inst._ns = slot.extra["ns"]
        return inst

    def _run(
        self,
        spec: SandboxSpec,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """One-shot on a pooled slot (see tiers/_pool.py) whose uid, /tmp and
        namespace thread are reused while they stay pristine (egress:
        create, exec, close, since its gateway is made per sandbox)."""
        if isinstance(spec.network, Egress):
            return Tier._run(
                self, spec, argv, stdin=stdin, on_stdout=on_stdout, on_stderr=on_stderr
            )
        # a slot's uid is part of what it is: one asked-for user never shares
        # a pooled slot with the default
        slot = self._pool.acquire(spec.limits, variant=(spec.user, spec.mounts, spec.network))
        try:
            inst = self._attach_slot(slot, spec)
        except BaseException:
            _pool.destroy(slot)
            raise
        inst.counters = slot.counters
        try:
            result = inst.exec(
                argv,
                stdin=stdin,
                timeout_s=spec.limits.timeout_s,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
            )
            if inst.cg.has_tasks():  # a one-shot run leaves nothing behind
                inst.cg.kill_all()
            return result
        finally:
            slot.counters = inst.counters or slot.counters
            if inst._ns is not None and "ns" not in slot.extra:
                ns = inst._ns
                slot.extra["ns"] = ns
                slot.cleanups.append(ns.close)
            self._pool.release(slot, pristine=not any(os.scandir(inst.host_dir)))

    def available(self) -> Availability:
        try:
            version = cgroup_version()
        except HostError as exc:
            return Availability(False, str(exc), engine="subprocess")
        return Availability(
            True,
            f"subprocess as its own uid, private /tmp, cgroup v{version} limits",
            engine="subprocess",
        )

    def _create(self, spec: SandboxSpec) -> ProcessInstance:
        slot = _pool.new_slot(spec.limits)
        try:
            inst = self._attach_slot(slot, spec)
            if isinstance(spec.network, Egress):
                # its namespaces exist on return; the link, filter and uplink
                # are made while the mount namespace is
                inst.gateway = gw = Gateway.start(slot.id, spec.network)
                slot.cleanups.append(gw.close)
                _write_name_files(slot.dir, spec.network, gw)
            else:  # pinned for other processes of this sandbox
                inst.netns_pin = netns_file(inst.host_dir)
                slot.cleanups.append(lambda: unpin_netns(netns_file(inst.host_dir)))
            inst._namespace()  # the namespaces are made now, not at the first command
            if inst.gateway is not None:
                inst.gateway.ready()
            return inst
        except BaseException:
            _pool.destroy(slot)
            raise

    def attach(self, sandbox_id: str, state: dict[str, Any]) -> ProcessInstance:
        cg = SandboxCgroup(relpath=state["cgroup"], version=cgroup_version())
        spec = SandboxSpec.from_dict(state["spec"])
        inst = ProcessInstance(
            sandbox_id,
            spec,
            cg,
            Path(state["host_dir"]),
            uid=int(state["uid"]),
            gid=int(state["gid"]),
            owns_uid=bool(state["owns_uid"]),
            gateway=Gateway.attach(sandbox_id, state["gateway"]) if state.get("gateway") else None,
        )
        inst.netns_pin = netns_file(inst.host_dir)
        return inst

    def reap(self, live: set[str]) -> list[str]:
        return uids.reap(live)
