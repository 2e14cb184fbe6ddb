"""Booted-guest templates: how a ``vm`` is created in about a second under TCG.

A cold boot of the guest kernel on an emulated q35 PC takes 2-3 s under TCG.
For each VM *shape* (image, memory, vCPUs, accelerator, guest kernel and
initramfs, QEMU and libvirt versions: :func:`template_key`) tierbox boots one
template domain once, waits for its agent, and saves it with libvirt's own
``virDomainSave``. That leaves two files under
``/var/lib/tierbox/vm/templates/<key>/``: ``state.save`` (libvirt's save
image: a header, the domain XML, and QEMU's migration stream) and
``disk.qcow2`` (the template's overlay, consistent with the saved memory).
Both are root's, mode 0600: libvirt opens the save image as root and hands
QEMU the descriptor, and each clone gets its own copy of the disk.

A new VM of that shape is then a *restore*: its overlay is a copy of the
template's (a few hundred KiB over the shared base), and libvirt restores a
copy of the save image whose XML names the new domain, its files and a fresh
UUID (:func:`write_clone_image`). libvirt starts QEMU with ``-incoming`` and
loads the stream, exactly as for ``virsh restore``; the restored domain is
then defined persistent. The guest's clock is set and its RNG reseeded
through the agent straight after, as after any restore.

The save image format is libvirt's (``src/qemu/qemu_saveimage.h``): a
92-byte header (magic ``LibvirtQemudSave``, version, data length, was-running,
compression, cookie offset, 14 unused words), then ``data_len`` bytes holding
the NUL-terminated XML and cookie, then the stream. Only uncompressed version
2 images are accepted; anything else makes tierbox cold-boot instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierbox.errors import SandboxError
from tierbox.vmm import libvirt_guest as guestmod

SAVE_MAGIC = b"LibvirtQemudSave"
HEADER = struct.Struct("<16s5I56x")
SUPPORTED_VERSIONS = (2,)
#: Bump when what a template holds changes (the XML generator, the boot).
TEMPLATE_FORMAT = 2
ENABLE_ENV = "TIERBOX_VM_TEMPLATES"


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1") not in ("0", "no", "false")


def templates_dir() -> Path:
    return guestmod.state_dir() / "templates"


def template_key(parts: dict[str, Any]) -> str:
    """A digest of everything a saved guest depends on."""
    text = json.dumps({"format": TEMPLATE_FORMAT, **parts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class SaveImage:
    """The parts of a libvirt save image tierbox needs."""

    path: Path
    version: int
    xml: str
    cookie: bytes
    stream_offset: int


def read_save_image(path: Path) -> SaveImage:
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
        if len(head) < HEADER.size:
            raise SandboxError(f"{path}: truncated libvirt save image")
        magic, version, data_len, _running, compressed, cookie_off = HEADER.unpack(head)
        if magic != SAVE_MAGIC:
            raise SandboxError(f"{path}: not a complete libvirt save image (magic {magic!r})")
        if version not in SUPPORTED_VERSIONS or compressed != 0:
            raise SandboxError(
                f"{path}: libvirt save image version {version}, compression {compressed}: "
                f"tierbox reads uncompressed version {SUPPORTED_VERSIONS} only"
            )
        data = f.read(data_len)
    end = data.find(b"\0")
    if end < 0:
        raise SandboxError(f"{path}: the domain XML in the save image is not terminated")
    cookie = b""
    if cookie_off:
        cend = data.find(b"\0", cookie_off)
        cookie = data[cookie_off : cend if cend >= 0 else len(data)]
    return SaveImage(
        path=path,
        version=version,
        xml=data[:end].decode(),
        cookie=cookie,
        stream_offset=HEADER.size + data_len,
    )


def write_clone_image(src: SaveImage, xml: str, out: Path) -> None:
    """A save image with ``xml`` in place of the template's and the same stream."""
    xml_b = xml.encode() + b"\0"
    # 0600 from the first byte: it holds the guest's memory
    data = xml_b + (src.cookie + b"\0" if src.cookie else b"")
    cookie_off = len(xml_b) if src.cookie else 0
    head = HEADER.pack(SAVE_MAGIC, src.version, len(data), 1, 0, cookie_off)
    tmp = out.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(src.path, "rb") as fin, open(fd, "wb") as fout:
        fout.write(head + data)
        fout.flush()
        size = os.fstat(fin.fileno()).st_size
        off_in = src.stream_offset
        off_out = len(head) + len(data)
        while off_in < size:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), size - off_in, off_in, off_out)
            if n <= 0:
                break
            off_in += n
            off_out += n
        if off_in < size:
            raise SandboxError(f"short copy of {src.path} into {out}")
    os.replace(tmp, out)


@dataclass(frozen=True)
class Template:
    key: str
    dir: Path
    save: SaveImage
    disk: Path
    info: dict[str, Any]


def template_dir(key: str) -> Path:
    return templates_dir() / key


def load(key: str) -> Template | None:
    """The template of ``key`` if one is complete on disk."""
    d = template_dir(key)
    try:
        info = json.loads((d / "template.json").read_text())
        save = read_save_image(d / "state.save")
    except (OSError, ValueError, SandboxError):
        return None
    disk = d / "disk.qcow2"
    if info.get("key") != key or not disk.is_file():
        return None
    return Template(key=key, dir=d, save=save, disk=disk, info=info)


#: A template unused this long is removed by ``tierbox gc`` (its key is stale
#: after an upgrade of QEMU, libvirt, the guest or the image).
UNUSED_TTL_S = 7 * 24 * 3600


def touch(tpl: Template) -> None:
    """Mark a template as used (gc keeps templates used within UNUSED_TTL_S)."""
    with contextlib.suppress(OSError):
        os.utime(tpl.dir / "template.json")


def expired() -> list[Path]:
    """Template directories nobody used within UNUSED_TTL_S and nobody builds."""
    out: list[Path] = []
    base = templates_dir()
    if not base.is_dir():
        return out
    now = time.time()
    for d in sorted(base.iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            age = now - (d / "template.json").stat().st_mtime
        except OSError:
            age = UNUSED_TTL_S + 1
        if age > UNUSED_TTL_S and not is_locked(d.name):
            out.append(d)
    return out


def discard(key: str) -> None:
    """Remove a template (it failed to restore; the next create rebuilds it)."""
    shutil.rmtree(template_dir(key), ignore_errors=True)


@contextlib.contextmanager
def build_lock(key: str) -> Iterator[bool]:
    """Hold the build lock of ``key``; yields False when another process builds it."""
    guestmod.jail_dir(templates_dir())
    with open(templates_dir() / f".{key}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_locked(key: str) -> bool:
    """True while a process holds the build lock of ``key``."""
    path = templates_dir() / f".{key}.lock"
    if not path.exists():
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def finish(key: str, work: Path, info: dict[str, Any]) -> Template:
    """Move a built template (``work`` holds state.save and disk.qcow2) into
    place; its disk becomes root's (no QEMU writes it any more)."""
    guestmod.take_from_qemu(work / "disk.qcow2")
    os.chmod(work / "state.save", 0o600)
    (work / "template.json").write_text(
        json.dumps({**info, "key": key, "built": time.time()}, indent=1, sort_keys=True)
    )
    dest = template_dir(key)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(work, dest)
    tpl = load(key)
    if tpl is None:
        raise SandboxError(f"template {key} is unreadable right after it was built")
    return tpl
