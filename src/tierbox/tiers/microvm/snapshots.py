"""Snapshots of microVMs, and the new guests made from them.

A snapshot pauses the guest, saves its device state by QMP migration (RAM
skipped with ``x-ignore-shared``: it lives in a shared file) and copies the
RAM file sparsely, then resumes it; the files and their manifest are
:mod:`tierbox.vmm.snapshot`'s. A restore or a clone starts a new QEMU with
``-incoming`` whose RAM maps the snapshot's RAM file copy-on-write (so clones
share what they have not written), loads the device state, then reseeds the
guest's RNG and sets its clock.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tierbox.errors import (
    AgentError,
    AgentGoneError,
    AgentTimeoutError,
    CommandError,
    QMPError,
    SandboxError,
    SnapshotError,
    SpecError,
)
from tierbox.host.cgroups import SandboxCgroup
from tierbox.host.runner import run
from tierbox.paths import sandboxes_dir
from tierbox.spec import SandboxSpec
from tierbox.tiers import _state
from tierbox.tiers.base import SnapshotRef
from tierbox.tiers.microvm import network as guest_net
from tierbox.vmm import artifacts, jail, qemu
from tierbox.vmm import qmp as qmp_mod
from tierbox.vmm import snapshot as snapfmt
from tierbox.vmm.agent import AgentClient, GuestConfig
from tierbox.vmm.qmp import QMPClient

if TYPE_CHECKING:
    from tierbox.host.netgw import Gateway
    from tierbox.tiers.microvm.instance import MicroVMInstance
    from tierbox.tiers.microvm.tier import MicroVMTier

#: How long a restored guest may take to answer.
RESTORE_TIMEOUT_S = 20.0


class SnapshotOps:
    """The snapshot half of :class:`~tierbox.tiers.microvm.instance.MicroVMInstance`."""

    if TYPE_CHECKING:  # provided by MicroVMInstance
        id: str
        tier: MicroVMTier
        spec: SandboxSpec
        machine: qemu.Machine
        guest: GuestConfig
        agent: AgentClient
        ram_path: Path | None
        disk_info: dict[str, Any] | None
        _lock: threading.RLock
        _snap_seq: int

        def _check_usable(self) -> None: ...
        def _qmp_client(self) -> QMPClient: ...

    def snapshot(self) -> SnapshotRef:
        """Pause, save device state and RAM, resume. The guest is paused for the
        migration plus a sparse copy of the RAM it has touched."""
        with self._lock:
            self._check_usable()
            root = self.tier.snapshots_root()
            root.mkdir(parents=True, exist_ok=True)
            self._snap_seq += 1
            name = f"{self.id}-{int(time.time() * 1000)}-{self._snap_seq}"
            tmp = root / f".tmp-{name}"
            final = root / name
            tmp.mkdir()
            try:
                timings = self._save(tmp)
                manifest = snapfmt.write_manifest(tmp, self._manifest_data(timings))
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return SnapshotRef(
                tier="microvm",
                path=str(final),
                meta={
                    "spec": self.spec.to_dict(),
                    "source": self.id,
                    "memory_mib": self.machine.memory_mib,
                    "accel": self.machine.accel,
                    "timings_s": timings,
                    "files": manifest.data["files"],
                },
            )

    def _manifest_data(self, timings: dict[str, float]) -> dict[str, Any]:
        g = artifacts.ensure_guest(build=False)
        return {
            "machine": self.machine.to_dict(),
            "machine_type": qemu.MACHINE,
            "tcg_cpu": qemu.TCG_CPU,
            "qemu_version": qemu.qemu_version(),
            "kernel_sha256": g.kernel.sha256,
            "kernel_release": g.kernel.release,
            "initramfs_sha256": g.initramfs.sha256,
            "disk": self.disk_info,
            "guest": {**self.guest.to_dict(), "spec": self.spec.to_dict()},
            "source_sandbox": self.id,
            "timings_s": timings,
        }

    def _save(self, snap_dir: Path) -> dict[str, float]:
        client = self._qmp_client()
        t0 = time.monotonic()
        client.execute("stop")
        try:
            if self.ram_path is not None:
                # RAM is a shared file: the stream carries device state only
                qmp_mod.save_stream(
                    client, snap_dir / snapfmt.STATE, ignore_shared=True, timeout_s=120.0
                )
                t1 = time.monotonic()
                _sparse_copy(self.ram_path, snap_dir / snapfmt.RAM)
                full = None
            else:
                # a restored guest's RAM is private: it goes into the stream,
                # converted below into the same two-file form
                full = snap_dir / "full.bin"
                qmp_mod.save_stream(client, full, ignore_shared=False, timeout_s=120.0)
                t1 = time.monotonic()
        finally:
            client.execute("cont")
        t2 = time.monotonic()
        # the guest's clock stood still while paused; a guest that cannot be
        # told now is told at its next restore, and its snapshot is whole
        with contextlib.suppress(AgentError, AgentGoneError, AgentTimeoutError):
            self.agent.sync(deadline=time.monotonic() + 10.0)
        timings = {"paused": round(t2 - t0, 4), "migrate": round(t1 - t0, 4)}
        if full is None:
            timings["ram_copy"] = round(t2 - t1, 4)
        else:
            self.tier.split_full_stream(self.machine, full, snap_dir)
            full.unlink()
            timings["convert"] = round(time.monotonic() - t2, 4)
        timings["total"] = round(time.monotonic() - t0, 4)
        return timings


class RestoreOps:
    """The restore and clone half of :class:`~tierbox.tiers.microvm.tier.MicroVMTier`."""

    if TYPE_CHECKING:  # provided by MicroVMTier

        def accelerator(self) -> tuple[str, str]: ...
        def _new_sandbox(
            self, spec: SandboxSpec, machine: qemu.Machine
        ) -> tuple[str, qemu.Files, SandboxCgroup | None]: ...
        def release(
            self,
            sandbox_id: str,
            d: Path,
            cg: SandboxCgroup | None,
            ram: Path | None,
            gateway: Gateway | None = None,
            vmm_user: jail.VmmUser | None = None,
        ) -> None: ...

    def _microvm_tier(self) -> MicroVMTier:
        return cast("MicroVMTier", self)

    def restore(self, snap: SnapshotRef) -> MicroVMInstance:
        return self.clone(snap, count=1)[0]

    def clone(self, snap: SnapshotRef, count: int = 1) -> list[MicroVMInstance]:
        """``count`` independent guests from one snapshot, each mapping its RAM
        copy-on-write, each with a fresh RNG seed and the current time."""
        if count < 1:
            raise SpecError(f"count={count}: ask for at least one clone")
        # verified once per call; QEMU gets the very files that were checked
        with snapfmt.open_snapshot(Path(snap.path)) as opened:
            manifest = opened.manifest
            snapfmt.share_with_vmms(opened.ram_fd)
            machine = qemu.Machine.from_dict(manifest.machine)
            self._check_compatible(manifest, machine)
            spec = SandboxSpec.from_dict(manifest.guest["spec"])
            guest = GuestConfig.from_dict(manifest.guest)
            disk_info = manifest.data.get("disk")
            started: list[MicroVMInstance] = []
            try:
                for _ in range(count):
                    started.append(self._start_restore(opened, spec, machine, guest, disk_info))
                workers = min(count, 8)
                if workers == 1:
                    for inst in started:
                        self._finish_restore(inst, opened)
                else:
                    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                        for fut in [pool.submit(self._finish_restore, i, opened) for i in started]:
                            fut.result()
            except BaseException:
                for inst in started:
                    inst.close()
                raise
        return started

    def _check_compatible(self, manifest: snapfmt.Manifest, machine: qemu.Machine) -> None:
        accel, _ = self.accelerator()
        d = manifest.data
        if machine.accel != accel:
            raise SnapshotError(
                f"snapshot {manifest.path} was taken under {machine.accel}; this host runs {accel}"
            )
        if d.get("qemu_version") != qemu.qemu_version():
            raise SnapshotError(
                f"snapshot {manifest.path} was taken with QEMU {d.get('qemu_version')}, "
                f"this host has {qemu.qemu_version()}"
            )
        if d.get("machine_type") != qemu.MACHINE or d.get("tcg_cpu") != qemu.TCG_CPU:
            raise SnapshotError(
                f"snapshot {manifest.path} was taken on another machine model "
                f"({d.get('machine_type')}, cpu {d.get('tcg_cpu')})"
            )
        disk = d.get("disk")
        if disk:
            p = Path(disk["path"])
            try:
                size = p.stat().st_size
            except OSError as exc:
                raise SnapshotError(
                    f"snapshot {manifest.path} needs root disk {p} (image {disk.get('image')}), "
                    "which is gone"
                ) from exc
            if size != disk.get("size"):
                raise SnapshotError(
                    f"root disk {p} changed since snapshot {manifest.path} was taken"
                )

    def _start_restore(
        self,
        snap: snapfmt.OpenSnapshot,
        spec: SandboxSpec,
        machine: qemu.Machine,
        guest: GuestConfig,
        disk_info: dict[str, Any] | None,
    ) -> MicroVMInstance:
        spec = guest_net.repick_ports(spec)
        sid, files, cg = self._new_sandbox(spec, machine)
        gw = None
        tap: int | None = None
        user: jail.VmmUser | None = None
        disk: list[int] = []
        try:
            user = jail.claim(sid, restored=True)
            # a clone gets its own gateway (and tap) when the machine has a NIC
            gw = guest_net.open_gateway(sid, spec, user) if machine.net else None
            tap = guest_net.tap_fd(gw)
            if machine.disk:
                disk.append(jail.open_readonly(machine.disk))
            argv = qemu.restore_argv(
                sid,
                machine,
                files,
                ram_path=snap.ram_path,
                ram_share=False,
                tap_fd=tap,
                disk_path=jail.fd_path(disk[0]) if disk else None,
            )
            fds = (snap.ram_fd, *disk) if tap is None else (snap.ram_fd, *disk, tap)
            proc = qemu.QemuProcess.start(argv, files, cgroup=cg, pass_fds=fds, user=user)
        except BaseException:
            self.release(sid, files.dir, cg, None, gw, user)
            raise
        finally:
            guest_net.close_fd(tap)
            jail.close_fds(disk)
        # imported here: the instance module imports this one for SnapshotOps
        from tierbox.tiers.microvm.instance import MicroVMInstance

        inst = MicroVMInstance(
            self._microvm_tier(), sid, spec, machine, guest, proc, cg, None, disk_info,
            gateway=gw, vmm_user=user,
        )  # fmt: skip
        inst._save_state()
        return inst

    def _finish_restore(self, inst: MicroVMInstance, snap: snapfmt.OpenSnapshot) -> None:
        deadline = time.monotonic() + RESTORE_TIMEOUT_S
        snap_dir = snap.manifest.path
        try:
            client = inst._qmp_client()
            qmp_mod.load_stream(client, snap.state_path, ignore_shared=True, deadline=deadline)
            client.execute("cont")
        except QMPError as exc:
            detail = "" if inst.proc.alive() else str(inst.proc.exit_error("QEMU exited"))
            raise SnapshotError(
                f"QEMU could not load snapshot {snap_dir}: {exc}"
                + (f": {detail}" if detail else "")
            ) from exc
        inst._connect(deadline=deadline, hello=True)
        inst._configure_network(deadline=deadline)

    def split_full_stream(self, machine: qemu.Machine, full: Path, snap_dir: Path) -> None:
        """Turn a migration stream with RAM (from a restored guest) into the
        two-file form: load it into a paused helper QEMU whose RAM is a shared
        file (``ram.bin``), then save device state with ``x-ignore-shared``."""
        helper = f"helper{_state.new_id()}"
        d = sandboxes_dir() / f".{helper}"
        d.mkdir(mode=0o700, parents=True)
        files = qemu.Files(d)
        proc: qemu.QemuProcess | None = None
        # jailed like any QEMU: it parses a stream a guest's QEMU wrote
        user = jail.claim(helper)
        fds: list[int] = []
        try:
            jail.private_file(snap_dir / snapfmt.RAM, user)
            fds.append(os.open(snap_dir / snapfmt.RAM, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC))
            if machine.disk:
                fds.append(jail.open_readonly(machine.disk))
            argv = qemu.restore_argv(
                helper,
                machine,
                files,
                ram_path=jail.fd_path(fds[0]),
                ram_share=True,
                paused=True,
                disk_path=jail.fd_path(fds[1]) if machine.disk else None,
            )
            proc = qemu.QemuProcess.start(argv, files, pass_fds=tuple(fds), user=user)
            client = QMPClient(files.qmp, timeout_s=60.0)
            client.connect(alive=proc.alive)
            try:
                qmp_mod.load_stream(
                    client, full, ignore_shared=False, deadline=time.monotonic() + 120
                )
                qmp_mod.save_stream(
                    client, snap_dir / snapfmt.STATE, ignore_shared=True, timeout_s=120.0
                )
            finally:
                client.close()
        finally:
            if proc is not None:
                proc.kill()
            jail.close_fds(fds)
            jail.release(user)
            shutil.rmtree(d, ignore_errors=True)


def _sparse_copy(src: Path, dst: Path) -> None:
    """Copy a mostly-empty RAM file keeping its holes (GNU cp finds them)."""
    try:
        run(["cp", "--sparse=always", str(src), str(dst)], timeout_s=300)
    except CommandError as exc:
        raise SandboxError(f"cannot copy guest RAM to the snapshot: {exc}") from exc
