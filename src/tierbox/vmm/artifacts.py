"""What a microVM boots: kernel, initramfs and root disks, built at set-up.

Everything lives under ``$TIERBOX_HOME/microvm`` (see :func:`microvm_home`)::

    kernel/vmlinux        Debian's cloud kernel, decompressed so QEMU can boot
                          it via PVH (the 64-bit ELF with a Xen PVH note)
    kernel/config         its build config (HZ, which drivers are modules)
    kernel/modules/       the few modules the guest needs, with modules.dep
    kernel/kernel.json    package, version, release, digests
    initramfs.cpio        /init (the agent), busybox-static, the modules
    initramfs.json        digests of its inputs (rebuilt when they change)
    rootfs/<digest>.ext4  one read-only root disk per image manifest digest

Tools, all Debian packages driven through :mod:`tierbox.host.runner`:
``apt-get download`` + ``dpkg-deb -x`` fetch the kernel without installing it;
``lz4`` decompresses the bzImage payload; ``busybox depmod`` indexes modules;
``gcc -static`` builds the agent; GNU ``cpio`` packs the initramfs;
``mkfs.ext4 -d`` makes root disks.

Why the bzImage payload is located by hand: the kernel's
``scripts/extract-vmlinux`` is not packaged on its own in Debian (only inside
the 130 MB ``linux-source`` tarball) and it *guesses* the payload by scanning
for compression magics. The x86 boot protocol header states the payload's
offset and length exactly (``payload_offset``/``payload_length`` at 0x248,
Documentation/arch/x86/boot.rst), so we read those two fields and hand the
bytes to the real decompressor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierbox import paths
from tierbox.errors import CommandError, HostError, ImageError, TierUnavailableError
from tierbox.guest import AGENT_SOURCE
from tierbox.host.locks import file_lock
from tierbox.host.runner import require, run, which
from tierbox.spec import MIB

KERNEL_PACKAGE = "linux-image-cloud-amd64"
#: Modules the guest loads from the initramfs (the rest it needs is built in:
#: ext4, tmpfs, devtmpfs, cgroup2, the 8250 serial console, the RTC).
WANTED_MODULES = (
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
    "virtio_rng",
    "overlay",
    "virtio_net",
)
#: Modules loaded only when the machine has that device (``tierbox.disk=1``,
#: ``tierbox.net=1`` on the kernel command line): a guest without a NIC never
#: loads the network driver.
FLAGGED_MODULES = {"virtio_blk": "disk", "virtio_net": "net"}
#: Bump when the initramfs layout changes, so old builds are redone.
INITRAMFS_FORMAT = 3


def microvm_home() -> Path:
    return paths.home() / "microvm"


def kernel_dir() -> Path:
    return microvm_home() / "kernel"


def snapshots_dir() -> Path:
    return microvm_home() / "snapshots"


def _locked(name: str) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock so two processes never build the same thing at once."""
    return file_lock(microvm_home() / f".{name}.lock")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


# ---------------------------------------------------------------- the kernel


@dataclass(frozen=True)
class Kernel:
    """The guest kernel as built: where it is and what it is."""

    vmlinux: Path
    modules: Path
    release: str
    package: str
    version: str
    hz: int
    sha256: str
    modules_builtin: list[str] = field(default_factory=list)
    modules_loaded: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vmlinux": str(self.vmlinux),
            "modules": str(self.modules),
            "release": self.release,
            "package": self.package,
            "version": self.version,
            "hz": self.hz,
            "sha256": self.sha256,
            "modules_builtin": self.modules_builtin,
            "modules_loaded": self.modules_loaded,
        }


def load_kernel() -> Kernel | None:
    """The kernel built by set-up, or None when there is none."""
    meta = kernel_dir() / "kernel.json"
    try:
        d = json.loads(meta.read_text())
        k = Kernel(
            vmlinux=Path(d["vmlinux"]),
            modules=Path(d["modules"]),
            release=d["release"],
            package=d["package"],
            version=d["version"],
            hz=int(d["hz"]),
            sha256=d["sha256"],
            modules_builtin=list(d.get("modules_builtin", [])),
            modules_loaded=list(d.get("modules_loaded", [])),
        )
    except (OSError, ValueError, KeyError):
        return None
    have = {m.split(".ko")[0].replace("-", "_") for m in k.modules_loaded} | set(k.modules_builtin)
    if not set(WANTED_MODULES) <= have:
        return None  # built before a module was wanted (virtio_net): set-up fetches it again
    return k if k.vmlinux.is_file() else None


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Decompress the kernel inside an x86 bzImage into the ELF ``vmlinux``.

    The payload's place comes from the boot protocol header (see the module
    docstring); the decompression is done by the matching Debian tool.
    """
    data = bzimage.read_bytes()
    if len(data) < 0x260 or data[0x202:0x206] != b"HdrS":
        raise ImageError(f"{bzimage} is not an x86 bzImage (no HdrS boot header)")
    setup_sects = data[0x1F1] or 4
    protected_mode_start = (setup_sects + 1) * 512
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = protected_mode_start + payload_offset
    payload = data[start : start + payload_length]
    tools: list[tuple[bytes, str, list[str], int]] = [
        # magic, tool, argv to decompress stdin to stdout, trailing bytes
        (b"\x02\x21\x4c\x18", "lz4", ["-d", "-c", "-q"], 4),  # kernel appends the size
        (b"\x1f\x8b", "gzip", ["-d", "-c"], 0),
        (b"\xfd7zXZ\x00", "xz", ["-d", "-c", "--single-stream"], 0),
        (b"\x28\xb5\x2f\xfd", "zstd", ["-d", "-c", "-q"], 0),
    ]
    for magic, tool, args, trailer in tools:
        if payload.startswith(magic):
            exe = require(tool, tool)
            body = payload[: len(payload) - trailer] if trailer else payload
            proc = run(
                [exe, *args], input=body, timeout_s=120, message=f"cannot decompress {bzimage}"
            )
            if proc.stdout[:4] != b"\x7fELF":
                raise ImageError(f"{tool} gave no ELF image when decompressing {bzimage}")
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(proc.stdout)
            os.replace(tmp, out)
            return
    raise ImageError(f"unknown compression in {bzimage}: payload starts {payload[:6].hex()}")


def _module_closure(dep_file: Path, wanted: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(paths of the modules to ship, in load order; wanted names that are built in)."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in dep_file.read_text().splitlines():
        mod, _, rest = line.partition(":")
        if not mod:
            continue
        deps[mod] = rest.split()
        name = Path(mod).name.split(".ko")[0].replace("-", "_")
        by_name[name] = mod
    builtin_text = (dep_file.parent / "modules.builtin").read_text()
    builtin = {Path(p).name.split(".ko")[0].replace("-", "_") for p in builtin_text.split()}
    order: list[str] = []
    built_in: list[str] = []

    def visit(mod: str) -> None:
        for d in deps.get(mod, []):
            visit(d)
        if mod not in order:
            order.append(mod)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
        elif name in builtin:
            built_in.append(name)
        else:
            raise ImageError(f"the guest kernel has no module or built-in driver {name}")
    return order, built_in


def _fetch_deb(tmp: Path) -> Path:
    """Download the cloud kernel package into ``tmp`` (or use TIERBOX_MICROVM_KERNEL_DEB)."""
    given = os.environ.get("TIERBOX_MICROVM_KERNEL_DEB")
    if given:
        return Path(given)
    apt_cache = require("apt-cache", "apt")
    out = run(
        [apt_cache, "depends", "--no-recommends", "--no-suggests", KERNEL_PACKAGE]
    ).stdout.decode()
    found = re.findall(r"Depends:\s*(linux-image-[\w.+~-]+)", out)
    if not found:
        raise HostError(
            f"apt does not know {KERNEL_PACKAGE}: "
            "run `apt-get update` (is a Debian mirror reachable?)"
        )
    package = found[0]
    run([require("apt-get", "apt"), "download", package], cwd=str(tmp), timeout_s=600)
    debs = sorted(tmp.glob(f"{package}_*.deb"))
    if not debs:
        raise HostError(f"apt-get download {package} left no .deb in {tmp}")
    return debs[0]


def _config_value(config: str, key: str) -> str | None:
    m = re.search(rf"^{key}=(.*)$", config, re.MULTILINE)
    return m.group(1).strip('"') if m else None


def build_kernel(*, force: bool = False) -> Kernel:
    """Fetch Debian's cloud kernel, decompress it for PVH, pick its modules."""
    with _locked("kernel"):
        existing = load_kernel()
        if existing is not None and not force:
            return existing
        dest = kernel_dir()
        microvm_home().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".kernel-", dir=microvm_home()) as tmp_s:
            tmp = Path(tmp_s)
            deb = _fetch_deb(tmp)
            dpkg_deb = require("dpkg-deb", "dpkg")
            fields = run([dpkg_deb, "-f", str(deb), "Package", "Version"]).stdout.decode()
            meta = dict(line.split(": ", 1) for line in fields.splitlines() if ": " in line)
            root = tmp / "x"
            run([dpkg_deb, "-x", str(deb), str(root)], timeout_s=300)
            images = sorted((root / "boot").glob("vmlinuz-*"))
            if not images:
                raise ImageError(f"{deb.name} has no /boot/vmlinuz-*")
            release = images[0].name[len("vmlinuz-") :]
            config = (root / "boot" / f"config-{release}").read_text()
            new = tmp / "kernel"
            new.mkdir()
            extract_vmlinux(images[0], new / "vmlinux")
            shutil.copyfile(root / "boot" / f"config-{release}", new / "config")
            # index every module once, ship only the closure of what we need
            busybox = require("busybox", "busybox-static")
            run([busybox, "depmod", "-b", str(root), release], timeout_s=300)
            src_mods = root / "lib" / "modules" / release
            order, built_in = _module_closure(src_mods / "modules.dep", WANTED_MODULES)
            mods = new / "modules" / "lib" / "modules" / release
            for rel in order:
                (mods / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src_mods / rel, mods / rel)
            for extra in ("modules.builtin", "modules.order", "modules.builtin.modinfo"):
                if (src_mods / extra).exists():
                    shutil.copyfile(src_mods / extra, mods / extra)
            run([busybox, "depmod", "-b", str(new / "modules"), release])
            kernel = Kernel(
                vmlinux=dest / "vmlinux",
                modules=dest / "modules",
                release=release,
                package=meta.get("Package", KERNEL_PACKAGE),
                version=meta.get("Version", ""),
                hz=int(_config_value(config, "CONFIG_HZ") or 250),
                sha256=sha256_file(new / "vmlinux"),
                modules_builtin=built_in,
                modules_loaded=[Path(p).name for p in order],
            )
            _write_json(new / "kernel.json", kernel.to_dict())
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(new, dest)
        return kernel


# ---------------------------------------------------------------- the initramfs


@dataclass(frozen=True)
class Initramfs:
    path: Path
    sha256: str
    inputs: str


def initramfs_path() -> Path:
    return microvm_home() / "initramfs.cpio"


def _initramfs_inputs(kernel: Kernel) -> str:
    """Digest of everything the initramfs is made of: rebuilt when it changes."""
    h = hashlib.sha256(f"format={INITRAMFS_FORMAT};kernel={kernel.sha256}".encode())
    h.update(AGENT_SOURCE.read_bytes())
    busybox = which("busybox")
    if busybox:
        st = os.stat(busybox)
        h.update(f"busybox={st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def load_initramfs(kernel: Kernel) -> Initramfs | None:
    """The built initramfs if it matches the current sources, else None."""
    try:
        d = json.loads((microvm_home() / "initramfs.json").read_text())
    except (OSError, ValueError):
        return None
    if not initramfs_path().is_file() or d.get("inputs") != _initramfs_inputs(kernel):
        return None
    return Initramfs(initramfs_path(), d["sha256"], d["inputs"])


def _module_flag(release_dir: Path, module: str) -> str:
    """`` disk`` or `` net`` for a module only that device needs (itself or
    its dependencies no other wanted module shares), else nothing."""
    dep = release_dir / "modules.dep"
    for name, flag in FLAGGED_MODULES.items():
        rest = tuple(w for w in WANTED_MODULES if w not in FLAGGED_MODULES)
        base, _ = _module_closure(dep, rest)
        own, _ = _module_closure(dep, (name,))
        if module in own and module not in base:
            return f" {flag}"
    return ""


def build_agent(out: Path) -> None:
    """Compile the guest agent statically with the host's gcc."""
    gcc = require("gcc", "gcc libc6-dev")
    run(
        [gcc, "-static", "-O2", "-Wall", "-Wextra", "-o", str(out), str(AGENT_SOURCE)],
        timeout_s=300,
        message="cannot compile the guest agent",
    )


_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"


def build_initramfs(kernel: Kernel, *, force: bool = False) -> Initramfs:
    """Pack the agent (as /init), busybox and the modules into a newc cpio.

    ``/rootfs`` holds busybox and its applets: the root of a sandbox without
    an image. ``/etc/tierbox-modules`` lists the modules in load order.
    """
    with _locked("initramfs"):
        existing = load_initramfs(kernel)
        if existing is not None and not force:
            return existing
        inputs = _initramfs_inputs(kernel)
        busybox = require("busybox", "busybox-static")
        cpio = require("cpio", "cpio")
        with tempfile.TemporaryDirectory(prefix=".initramfs-", dir=microvm_home()) as tmp_s:
            st = Path(tmp_s) / "root"
            for d in ("proc", "sys", "dev", "run", "newroot", "rootfs/bin", "rootfs/etc"):
                (st / d).mkdir(parents=True, exist_ok=True)
            for d in ("proc", "sys", "dev", "tmp", "root", "run", "home"):
                (st / "rootfs" / d).mkdir(exist_ok=True)
            (st / "rootfs" / "tmp").chmod(0o1777)
            shutil.copyfile(busybox, st / "rootfs" / "bin" / "busybox")
            (st / "rootfs" / "bin" / "busybox").chmod(0o755)
            applets = run([busybox, "--list"]).stdout.decode().split()
            for applet in applets:
                if applet != "busybox" and "/" not in applet:
                    (st / "rootfs" / "bin" / applet).symlink_to("busybox")
            (st / "rootfs" / "etc" / "passwd").write_text(_PASSWD)
            (st / "rootfs" / "etc" / "group").write_text(_GROUP)
            (st / "rootfs" / "etc" / "hostname").write_text("tierbox\n")
            (st / "bin").symlink_to("rootfs/bin")
            shutil.copytree(kernel.modules / "lib", st / "lib", symlinks=True)
            mods = Path("/lib/modules") / kernel.release
            order, _ = _module_closure(st / mods.relative_to("/") / "modules.dep", WANTED_MODULES)
            (st / "etc").mkdir()
            (st / "etc" / "tierbox-modules").write_text(
                "".join(f"{mods / m}{_module_flag(st / mods.relative_to('/'), m)}\n" for m in order)
            )
            build_agent(st / "init")
            names = sorted(
                str(p.relative_to(st)) for p in st.rglob("*")
            )  # sorted: the archive is reproducible
            out = run(
                [cpio, "-o", "-H", "newc", "-R", "0:0", "--reproducible", "--quiet"],
                input=("\n".join(names) + "\n").encode(),
                cwd=str(st),
                timeout_s=120,
            ).stdout
            tmp_out = initramfs_path().with_suffix(".tmp")
            tmp_out.write_bytes(out)
            os.replace(tmp_out, initramfs_path())
        digest = hashlib.sha256(out).hexdigest()
        _write_json(
            microvm_home() / "initramfs.json",
            {"sha256": digest, "inputs": inputs, "built": time.time(), "size": len(out)},
        )
        return Initramfs(initramfs_path(), digest, inputs)


@dataclass(frozen=True)
class GuestArtifacts:
    kernel: Kernel
    initramfs: Initramfs


def ensure_guest(*, build: bool = True) -> GuestArtifacts:
    """Kernel and initramfs, rebuilding the initramfs when its sources changed.

    The kernel is only fetched by set-up (it downloads a package); a missing
    one raises TierUnavailableError saying how to get it.
    """
    kernel = load_kernel()
    if kernel is None:
        raise TierUnavailableError(
            "the microVM guest kernel is not built, or lacks a module now wanted: run `make setup` "
            "(scripts/setup.d/50-microvm.sh fetches Debian's linux-image-cloud-amd64)"
        )
    initramfs = load_initramfs(kernel)
    if initramfs is None:
        if not build:
            raise TierUnavailableError(
                "the microVM initramfs is missing or stale: run `make setup`"
            )
        try:
            initramfs = build_initramfs(kernel)
        except (CommandError, HostError) as exc:
            raise TierUnavailableError(f"cannot build the microVM initramfs: {exc}") from exc
    return GuestArtifacts(kernel, initramfs)


# ---------------------------------------------------------------- root disks


@dataclass(frozen=True)
class RootDisk:
    """A read-only ext4 root disk made from one image, and that image's config."""

    path: Path
    image: str
    digest: str
    env: dict[str, str]
    workdir: str
    user: str
    size_bytes: int


def rootfs_dir() -> Path:
    return microvm_home() / "rootfs"


def _tree_size(root: Path) -> tuple[int, int]:
    """(bytes allocated, number of inodes) of a directory tree."""
    total, count = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += max(st.st_blocks * 512, 4096 if not name.startswith(".wh.") else 0)
            count += 1
    return total, count


def root_disk(ref: str) -> RootDisk:
    """The ext4 root disk of image ``ref``, built once per manifest digest."""
    from tierbox.images.store import default_store

    store = default_store()
    record = store.resolve(ref)
    digest = record.manifest_digest
    out = rootfs_dir() / f"{digest.removeprefix('sha256:')}.ext4"
    cfg = record.config

    def disk() -> RootDisk:
        return RootDisk(
            path=out,
            image=record.ref,
            digest=digest,
            env=dict(cfg.env),
            workdir=cfg.workdir or "/",
            user=cfg.user,
            size_bytes=out.stat().st_size,
        )

    if out.is_file():
        return disk()
    with _locked("rootfs"):
        if out.is_file():
            return disk()
        src = store.rootfs(ref)
        used, inodes = _tree_size(src)
        size_mib = int(used * 1.15 / MIB) + 32
        rootfs_dir().mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        mkfs = require("mkfs.ext4", "e2fsprogs")
        run(
            [
                mkfs, "-q", "-F", "-t", "ext4", "-d", str(src), "-L", "tierbox-root",
                "-N", str(int(inodes * 1.2) + 1024), "-m", "0", "-O", "^has_journal",
                "-b", "4096", "-E", "lazy_itable_init=0", str(tmp), f"{size_mib}M",
            ],
            timeout_s=900,
            message=f"cannot build the ext4 root disk of {ref}",
        )  # fmt: skip
        os.replace(tmp, out)
    return disk()
