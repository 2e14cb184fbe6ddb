"""What a ``vm``-tier guest boots, built on the microVM tier's artifacts.

The full VM is a q35 PC, so its virtio devices sit on PCI rather than
virtio-mmio, and its root disk is written to (a qcow2 overlay) rather than
read-only under a tmpfs. Everything else is the microVM's, reused as built
by :mod:`tierbox.vmm.artifacts`:

- the kernel: Debian's cloud kernel, decompressed ``vmlinux``, which QEMU
  boots on q35 through the PVH entry point just as on ``-M microvm``;
- the initramfs (busybox, the virtio modules, the agent as ``/init``);
- the per-image ext4 root disks.

On top of those, set-up adds (under ``$TIERBOX_HOME/vm``, see :func:`vm_home`)::

    guest/modules-<release>/   the PCI transport modules (virtio_pci and what it
                               needs) from the same kernel package, plus a
                               modules.dep over the union with the microVM's set
    guest/initramfs.cpio       the microVM initramfs with a second cpio archive
                               appended (the kernel unpacks both, in order):
                               /vminit and the modules above
    guest/initramfs.json       digests of its inputs (rebuilt when they change)

QEMU runs as libvirt's unprivileged user (``libvirt-qemu``, see
:func:`qemu_ids`), which cannot enter ``$TIERBOX_HOME`` (under ``/root``,
mode 0700). Everything a domain opens therefore lives under
:func:`state_dir` (``/var/lib/tierbox/vm``; directories mode 0710, group
the QEMU user's, so only root and QEMU can enter them)::

    boot/<sha>.vmlinux         copies of the kernel and initramfs, root 0444
    boot/<sha>.initramfs       (QEMU reads them, cannot change them)
    base/<digest>-<mib>.qcow2  one read-only base disk per image and disk size:
                               the image's ext4 resized to ``disk_mib``, root 0444
    domains/<id>/              a VM's overlay (QEMU's, 0600) and console log
                               (virtlogd's, root 0600)
    templates/<key>/           saved templates (root 0600 files)

The kernel runs ``/vminit`` (``rdinit=``): it loads the PCI virtio drivers,
mounts ``/dev/vda`` read-write as the root, and execs the agent (the
microVM's ``/init``) with that root as its argument.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import hashlib
import json
import os
import pwd
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierbox import paths
from tierbox.errors import (
    CommandError,
    HostError,
    ImageError,
    SpecError,
    TierUnavailableError,
)
from tierbox.host.locks import file_lock
from tierbox.host.runner import require, run
from tierbox.spec import MIB
from tierbox.vmm import artifacts, qemu

#: Modules /vminit loads, in this order (their dependencies come first).
VM_MODULES = ("virtio_pci", "virtio_console", "virtio_rng", "virtio_blk")
#: Loaded only when the VM has a NIC (``tierbox.net=1``): egress networking.
NET_MODULES = ("virtio_net",)
#: Size of a VM's disk (and of its file system) when the spec sets no ``disk_mib``;
#: the qcow2 files stay sparse.
BASE_DISK_MIB = 2048
#: Where QEMU-facing files live (a path QEMU's unprivileged user can traverse).
STATE_ENV = "TIERBOX_VM_STATE"
DEFAULT_STATE_DIR = Path("/var/lib/tierbox/vm")
#: The host user QEMU runs as (libvirt's default on Debian).
QEMU_USER_ENV = "TIERBOX_VM_QEMU_USER"
DEFAULT_QEMU_USER = "libvirt-qemu"
#: Mode of every directory under :func:`state_dir`: root and QEMU's group enter.
JAIL_DIR_MODE = 0o710
#: Bump when the appended archive's layout or its module set changes.
VM_INITRAMFS_FORMAT = 2
#: What the guest prints on its console when ``tierbox.vm.probe=1`` (KVM test boots).
PROBE_MARK = "tierbox-vm-probe: ok"

VMINIT = """#!/bin/busybox sh
# /vminit of the tierbox vm tier (q35 PC, virtio on PCI, read-write root disk).
# Knobs on the kernel command line:
#   tierbox.hostname=NAME   the guest's host name
#   tierbox.vm.probe=1      print the probe mark and power off (KVM test boots)
#   tierbox.net=1           the VM has a NIC: load virtio_net
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t sysfs sysfs /sys
busybox mount -t devtmpfs devtmpfs /dev
name=tierbox
probe=0
net=0
for arg in $(busybox cat /proc/cmdline); do
\tcase "$arg" in
\ttierbox.hostname=*) name="${arg#*=}" ;;
\ttierbox.vm.probe=*) probe="${arg#*=}" ;;
\ttierbox.net=*) net="${arg#*=}" ;;
\tesac
done
if [ "$probe" = 1 ]; then
\techo "@PROBE_MARK@" >/dev/console
\tbusybox poweroff -f
fi
busybox modprobe -a @MODULES@
if [ "$net" = 1 ]; then
\tbusybox modprobe -a @NET_MODULES@
fi
n=0
while [ ! -b /dev/vda ] && [ $n -lt 1000 ]; do
\tbusybox usleep 10000
\tn=$((n + 1))
done
busybox mkdir -p /newroot
busybox mount -t ext4 -o rw,noatime /dev/vda /newroot || {
\techo "tierbox-vminit: cannot mount the root disk /dev/vda" >&2
\tbusybox poweroff -f
}
for d in proc sys dev tmp run; do
\t[ -d /newroot/$d ] || busybox mkdir -p /newroot/$d
done
busybox chmod 1777 /newroot/tmp
busybox mount -t proc proc /newroot/proc
busybox mount -t sysfs sysfs /newroot/sys
busybox mount -t devtmpfs devtmpfs /newroot/dev
busybox mkdir -p /newroot/dev/pts /newroot/dev/shm
busybox mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
busybox mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
busybox ip link set lo up
busybox hostname "$name"
exec /init /newroot
"""


def vminit_script() -> str:
    return (
        VMINIT.replace("@PROBE_MARK@", PROBE_MARK)
        .replace("@MODULES@", " ".join(VM_MODULES))
        .replace("@NET_MODULES@", " ".join(NET_MODULES))
    )


def vm_home() -> Path:
    return paths.home() / "vm"


def guest_dir() -> Path:
    return vm_home() / "guest"


def state_dir() -> Path:
    """Root of the files QEMU opens (``$TIERBOX_VM_STATE`` or /var/lib/tierbox/vm)."""
    given = os.environ.get(STATE_ENV)
    return Path(given) if given else DEFAULT_STATE_DIR


def base_dir() -> Path:
    return state_dir() / "base"


def boot_dir() -> Path:
    return state_dir() / "boot"


def legacy_dirs() -> list[Path]:
    """Where older tierbox versions kept VM files (under $TIERBOX_HOME): gc reaps them."""
    return [vm_home() / name for name in ("base", "domains", "templates")]


@functools.cache
def qemu_ids() -> tuple[int, int]:
    """(uid, gid) QEMU runs as: ``$TIERBOX_VM_QEMU_USER`` (default libvirt-qemu)
    and the group of the same name (else the user's primary group). Never root."""
    name = os.environ.get(QEMU_USER_ENV, DEFAULT_QEMU_USER)
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise TierUnavailableError(
            f"vm tier: there is no host user {name!r} for QEMU to run as "
            f"(install libvirt-daemon-system, or set {QEMU_USER_ENV})"
        ) from None
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        gid = pw.pw_gid
    if pw.pw_uid == 0 or gid == 0:
        raise TierUnavailableError(
            f"vm tier: QEMU's user {name!r} is root ({pw.pw_uid}:{gid}): "
            f"set {QEMU_USER_ENV} to an unprivileged user"
        )
    return pw.pw_uid, gid


def seclabel() -> str:
    """The static DAC label of every tierbox domain (``+uid:+gid``)."""
    uid, gid = qemu_ids()
    return f"+{uid}:+{gid}"


def jail_dir(path: Path) -> Path:
    """Make ``path`` (under :func:`state_dir`) and its parents up to there:
    root-owned, mode 0710, group QEMU's. The state dir's parent is made 0711."""
    root = state_dir()
    _, gid = qemu_ids()
    if not root.parent.is_dir():
        root.parent.mkdir(parents=True, mode=0o711, exist_ok=True)
        os.chmod(root.parent, 0o711)
    chain = [path, *path.parents]
    if root in chain:
        todo = chain[: chain.index(root) + 1]
    else:  # elsewhere ($TIERBOX_VM_DOMAINS): its parents must let QEMU through
        path.parent.mkdir(parents=True, exist_ok=True)
        todo = [path]
    for p in reversed(todo):
        p.mkdir(mode=JAIL_DIR_MODE, exist_ok=True)
        st = p.stat()
        if (st.st_mode & 0o7777) != JAIL_DIR_MODE or st.st_uid != 0 or st.st_gid != gid:
            os.chown(p, 0, gid)
            os.chmod(p, JAIL_DIR_MODE)
    return path


def give_to_qemu(path: Path) -> None:
    """A file QEMU writes (a disk overlay): owned by QEMU's user, mode 0600."""
    uid, gid = qemu_ids()
    os.chown(path, uid, gid)
    os.chmod(path, 0o600)


def take_from_qemu(path: Path) -> None:
    """A file QEMU no longer uses (a template's disk): root's, mode 0600."""
    os.chown(path, 0, 0)
    os.chmod(path, 0o600)


def private_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new ``dst`` that is 0600 from its first byte."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with open(src, "rb") as fin:
            size = os.fstat(fin.fileno()).st_size
            done = 0
            while done < size:
                n = os.copy_file_range(fin.fileno(), fd, size - done)
                if n <= 0:
                    raise OSError(f"short copy of {src} into {dst}")
                done += n
    finally:
        os.close(fd)


def _publish(src: Path, name: str) -> Path:
    """A root-owned 0444 copy of ``src`` under boot/ (made once per ``name``)."""
    out = jail_dir(boot_dir()) / name
    if out.is_file():
        with contextlib.suppress(OSError):  # in use: gc keeps it
            os.utime(out)
        return out
    tmp = out.with_name(f".{name}.{os.getpid()}.tmp")
    try:
        private_copy(src, tmp)
        os.chmod(tmp, 0o444)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def locked(name: str) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock so two processes never build the same thing at once."""
    return file_lock(vm_home() / f".{name}.lock")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


# ---------------------------------------------------------------- kernel modules


def _closure(dep_file: Path, wanted: tuple[str, ...]) -> list[str]:
    """Module paths (relative to the release dir) of ``wanted``, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in dep_file.read_text().splitlines():
        mod, _, rest = line.partition(":")
        if mod:
            deps[mod] = rest.split()
            by_name[Path(mod).name.split(".ko")[0].replace("-", "_")] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        for d in deps.get(mod, []):
            visit(d)
        if mod not in order:
            order.append(mod)

    for name in wanted:
        if name not in by_name:
            raise ImageError(f"the guest kernel has no module {name} ({dep_file})")
        visit(by_name[name])
    return order


def modules_dir(kernel: artifacts.Kernel) -> Path:
    """A ``lib/modules/<release>`` tree: the microVM's modules plus the PCI ones."""
    return guest_dir() / f"modules-{kernel.release}"


def _modules_ready(kernel: artifacts.Kernel) -> bool:
    """Built for this kernel, with every module /vminit may load (a tree
    built before virtio_net was wanted is built again)."""
    meta = _read_json(modules_dir(kernel) / "modules.json")
    if meta is None or meta.get("kernel_sha256") != kernel.sha256:
        return False
    rel = modules_dir(kernel) / "lib" / "modules" / kernel.release
    try:
        _closure(rel / "modules.dep", VM_MODULES + NET_MODULES)
    except (ImageError, OSError):
        return False
    return True


def _fetch_kernel_tree(kernel: artifacts.Kernel, tmp: Path) -> Path:
    """Unpack the kernel's own Debian package (the exact version) into ``tmp``."""
    given = os.environ.get("TIERBOX_MICROVM_KERNEL_DEB")
    if given:
        deb = Path(given)
    else:
        apt_get = require("apt-get", "apt")
        try:
            run(
                [apt_get, "download", f"{kernel.package}={kernel.version}"],
                cwd=str(tmp),
                timeout_s=600,
                message=f"cannot download {kernel.package}={kernel.version}",
            )
        except CommandError as exc:
            raise HostError(
                f"{exc} (is a Debian mirror reachable? if the version left the archive, "
                "rebuild the microVM kernel: `python -m tierbox.vmm.build --force`)"
            ) from exc
        debs = sorted(tmp.glob(f"{kernel.package}_*.deb"))
        if not debs:
            raise HostError(f"apt-get download {kernel.package} left no .deb in {tmp}")
        deb = debs[0]
    root = tmp / "x"
    run([require("dpkg-deb", "dpkg"), "-x", str(deb), str(root)], timeout_s=300)
    if not (root / "lib" / "modules" / kernel.release).is_dir():
        raise ImageError(f"{deb.name} has no modules for kernel {kernel.release}")
    return root


def ensure_modules(kernel: artifacts.Kernel) -> Path:
    """The module tree for the VM guest, fetched from the kernel package once."""
    with locked("modules"):
        dest = modules_dir(kernel)
        if _modules_ready(kernel):
            return dest
        busybox = require("busybox", "busybox-static")
        guest_dir().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".modules-", dir=guest_dir()) as tmp_s:
            tmp = Path(tmp_s)
            rel = Path("lib") / "modules" / kernel.release
            ours = kernel.modules / rel
            new = tmp / "tree"
            shutil.copytree(ours, new / rel, symlinks=True)
            try:
                order = _closure(new / rel / "modules.dep", VM_MODULES + NET_MODULES)
                missing = [m for m in order if not (new / rel / m).is_file()]
            except ImageError:
                missing = ["(virtio_pci)"]
            if missing:
                src = _fetch_kernel_tree(kernel, tmp)
                run([busybox, "depmod", "-b", str(src), kernel.release], timeout_s=300)
                for m in _closure(src / rel / "modules.dep", VM_MODULES + NET_MODULES):
                    (new / rel / m).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src / rel / m, new / rel / m)
            run([busybox, "depmod", "-b", str(new), kernel.release], timeout_s=120)
            _closure(new / rel / "modules.dep", VM_MODULES + NET_MODULES)  # all there now
            _write_json(
                new / "modules.json",
                {"kernel_sha256": kernel.sha256, "release": kernel.release, "fetched": missing},
            )
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(new, dest)
        return dest


# ---------------------------------------------------------------- the initramfs


@dataclass(frozen=True)
class VMGuest:
    """Kernel and initramfs of a VM guest, and what the command line needs."""

    kernel: Path
    initramfs: Path
    release: str
    hz: int
    sha256: str  # of the initramfs
    kernel_sha256: str

    def cmdline(self, *, accel: str, hostname: str, probe: bool = False, net: bool = False) -> str:
        parts = [
            "console=ttyS0",
            "quiet",
            "panic=-1",
            "8250.nr_uarts=1",
            "cryptomgr.notests",
            "random.trust_cpu=on",
            "rdinit=/vminit",
            f"tierbox.hostname={hostname}",
        ]
        if probe:
            parts.append("tierbox.vm.probe=1")
        if net:
            parts.append("tierbox.net=1")
        if accel != "kvm":
            # without these the kernel hangs calibrating its clocks under TCG
            khz = qemu.host_tsc_khz()
            parts += [f"tsc_early_khz={khz}", f"lpj={khz * 1000 // self.hz}", "no_timer_check"]
        return " ".join(parts)


def initramfs_path() -> Path:
    return guest_dir() / "initramfs.cpio"


def _inputs_digest(base: artifacts.Initramfs, modules: Path) -> str:
    h = hashlib.sha256(f"format={VM_INITRAMFS_FORMAT};base={base.sha256}".encode())
    h.update(vminit_script().encode())
    h.update((modules / "modules.json").read_bytes())
    return h.hexdigest()


def _check_base_layout(cpio: str, base: Path, release: str) -> None:
    """The appended archive relies on the microVM initramfs having these."""
    listing = set(
        run([cpio, "-it", "--quiet"], input=base.read_bytes(), timeout_s=60)
        .stdout.decode(errors="replace")
        .split("\n")
    )
    need = ["init", "bin", "rootfs/bin/busybox", f"lib/modules/{release}"]
    missing = [p for p in need if p not in listing]
    if missing:
        raise TierUnavailableError(
            f"the microVM initramfs {base} changed layout (no {', '.join(missing)}): "
            "the vm tier's /vminit needs the agent at /init and busybox at /bin"
        )


def ensure_guest() -> VMGuest:
    """Kernel and initramfs for a VM, (re)built when the microVM's changed."""
    try:
        g = artifacts.ensure_guest()
    except TierUnavailableError as exc:
        raise TierUnavailableError(f"vm tier: {exc}") from exc
    kernel = g.kernel
    out = initramfs_path()
    meta_path = guest_dir() / "initramfs.json"
    if _modules_ready(kernel):
        meta = _read_json(meta_path)
        digest = _inputs_digest(g.initramfs, modules_dir(kernel))
        if meta is not None and meta.get("inputs") == digest and out.is_file():
            return _published(
                VMGuest(
                    kernel.vmlinux,
                    out,
                    kernel.release,
                    kernel.hz,
                    str(meta["sha256"]),
                    kernel.sha256,
                )
            )
    try:
        return _published(build_initramfs(g))
    except (CommandError, HostError, ImageError) as exc:
        raise TierUnavailableError(f"cannot build the vm guest initramfs: {exc}") from exc


def _published(g: VMGuest) -> VMGuest:
    """``g`` with its kernel and initramfs copied where QEMU's user can read them."""
    try:
        kernel = _publish(g.kernel, f"{g.kernel_sha256[:32]}.vmlinux")
        initramfs = _publish(g.initramfs, f"{g.sha256[:32]}.initramfs")
    except OSError as exc:
        raise TierUnavailableError(
            f"vm tier: cannot copy the guest kernel and initramfs to {boot_dir()}: {exc}"
        ) from exc
    return VMGuest(kernel, initramfs, g.release, g.hz, g.sha256, g.kernel_sha256)


def build_initramfs(g: artifacts.GuestArtifacts) -> VMGuest:
    kernel = g.kernel
    modules = ensure_modules(kernel)
    with locked("initramfs"):
        digest = _inputs_digest(g.initramfs, modules)
        meta_path = guest_dir() / "initramfs.json"
        meta = _read_json(meta_path)
        out = initramfs_path()
        if meta is not None and meta.get("inputs") == digest and out.is_file():
            return VMGuest(
                kernel.vmlinux, out, kernel.release, kernel.hz, str(meta["sha256"]), kernel.sha256
            )
        cpio = require("cpio", "cpio")
        _check_base_layout(cpio, g.initramfs.path, kernel.release)
        with tempfile.TemporaryDirectory(prefix=".initramfs-", dir=guest_dir()) as tmp_s:
            st = Path(tmp_s) / "root"
            rel = Path("lib") / "modules" / kernel.release
            shutil.copytree(modules / rel, st / rel, symlinks=True)
            (st / "vminit").write_text(vminit_script())
            (st / "vminit").chmod(0o755)
            names = sorted(str(p.relative_to(st)) for p in st.rglob("*"))
            extra = run(
                [cpio, "-o", "-H", "newc", "-R", "0:0", "--reproducible", "--quiet"],
                input=("\n".join(names) + "\n").encode(),
                cwd=str(st),
                timeout_s=120,
            ).stdout
        data = g.initramfs.path.read_bytes() + extra
        tmp_out = out.with_suffix(".tmp")
        tmp_out.write_bytes(data)
        os.replace(tmp_out, out)
        sha = hashlib.sha256(data).hexdigest()
        _write_json(meta_path, {"inputs": digest, "sha256": sha, "size": len(data)})
        return VMGuest(kernel.vmlinux, out, kernel.release, kernel.hz, sha, kernel.sha256)


# ---------------------------------------------------------------- base disks


@dataclass(frozen=True)
class BaseDisk:
    """The read-only qcow2 base of one image at one disk size, and that image's config."""

    path: Path
    image: str
    digest: str
    env: dict[str, str]
    workdir: str
    user: str
    disk_mib: int


def base_disk(ref: str, disk_mib: int | None = None) -> BaseDisk:
    """The base disk of image ``ref``: its ext4 root disk resized to
    ``disk_mib`` (default :data:`BASE_DISK_MIB`) and made qcow2.

    The file system fills the whole disk, so a guest that writes past
    ``disk_mib`` gets ENOSPC from its own ext4; every overlay backed by it has
    the same virtual size. Built once per image manifest digest and size.
    """
    mib = disk_mib or BASE_DISK_MIB
    root = artifacts.root_disk(ref)
    used = root.path.stat().st_blocks * 512
    out = base_dir() / f"{root.digest.removeprefix('sha256:')}-{mib}.qcow2"

    def disk() -> BaseDisk:
        return BaseDisk(out, root.image, root.digest, root.env, root.workdir, root.user, mib)

    if out.is_file():
        return disk()
    with locked("base"):
        if out.is_file():
            return disk()
        jail_dir(base_dir())
        qemu_img = require("qemu-img", "qemu-utils")
        resize2fs = require("resize2fs", "e2fsprogs")
        with tempfile.TemporaryDirectory(prefix=".base-", dir=base_dir()) as tmp_s:
            raw = Path(tmp_s) / "root.ext4"
            run(["cp", "--sparse=always", str(root.path), str(raw)], timeout_s=300)
            size = mib * MIB
            if size < raw.stat().st_size:
                # shrinking: the image's data must fit with room to spare
                try:
                    run(
                        [resize2fs, "-f", str(raw), f"{mib}M"],
                        timeout_s=300,
                        message=f"cannot shrink {raw}",
                    )
                except CommandError as exc:
                    raise SpecError(
                        f"disk_mib={mib} is too small for image {ref} "
                        f"(its file system holds ~{used // MIB + 1} MiB): {exc}"
                    ) from exc
                os.truncate(raw, size)
            else:
                os.truncate(raw, size)
                run([resize2fs, "-f", str(raw)], timeout_s=300, message=f"cannot grow {raw}")
            tmp = out.with_suffix(".tmp")
            run(
                [qemu_img, "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(tmp)],
                timeout_s=600,
                message=f"cannot convert the root disk of {ref} to qcow2",
            )
            tmp.chmod(0o444)
            os.replace(tmp, out)
    return disk()


def create_overlay(base: Path, overlay: Path) -> None:
    """A new qcow2 overlay whose reads fall through to ``base`` (same virtual
    size), owned by QEMU's user, mode 0600."""
    run(
        [
            require("qemu-img", "qemu-utils"),
            "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay),
        ],
        timeout_s=60,
        message=f"cannot create the disk {overlay}",
    )  # fmt: skip
    give_to_qemu(overlay)
