"""Hostile image archives against the real import path (tarfile, skopeo, umoci); no mocks.

Every archive is built here. Each must be refused with a clear error before
anything is unpacked, leaving nothing in the store; the tar headers two readers
read differently are either refused or read once, and what is stored reads the
same in GNU tar as in the check. A normal busybox import still works.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierbox.errors import UnsafeImageError, UsageError
from tierbox.images import tarstream
from tierbox.images.store import ImageStore

Entry = tuple[tarfile.TarInfo, bytes | None]
SKOPEO_COPY = ["skopeo", "--insecure-policy", "copy", "--quiet"]


# ------------------------------------------------------------------ building archives


def _file(name: str, data: bytes = b"x\n", **fields: object) -> Entry:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def _special(name: str, kind: bytes, **fields: object) -> Entry:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info, None


def _layer(*entries: Entry, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _docker_archive(path: Path, layers: list[bytes]) -> Path:
    """A docker-archive as `docker save` writes it: manifest.json, config, layer tars."""
    names = [f"layer{i}/layer.tar" for i in range(len(layers))]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"]},
        "rootfs": {
            "type": "layers",
            "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers],
        },
    }
    manifest = [{"Config": "config.json", "RepoTags": ["hostile:latest"], "Layers": names}]
    outer = [
        _file("manifest.json", json.dumps(manifest).encode()),
        _file("config.json", json.dumps(config).encode()),
        *(_file(name, layer) for name, layer in zip(names, layers, strict=True)),
    ]
    path.write_bytes(_layer(*outer, fmt=tarfile.USTAR_FORMAT))
    return path


def _gnu_tar(tree: Path, *args: str) -> bytes:
    """A layer made by GNU tar from ``tree`` (sparse files need it: tarfile cannot write them)."""
    out = subprocess.run(["tar", "-C", str(tree), *args, "-cf", "-", "."], capture_output=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _gnu_tar_names(layer: bytes) -> list[str]:
    """What GNU tar, a second reader, lists in a gzipped layer."""
    out = subprocess.run(["tar", "-tzf", "-"], input=layer, capture_output=True)
    assert out.returncode == 0, out.stderr
    return sorted(n.removeprefix("./").rstrip("/") for n in out.stdout.decode().split("\n") if n)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def busybox_archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The built-in busybox image, exported with skopeo as docker-archive and oci-archive."""
    root = tmp_path_factory.mktemp("source-store")
    store = ImageStore(root)
    store.ensure_busybox()
    made = {}
    for kind in ("docker-archive", "oci-archive"):
        made[kind] = root / f"busybox-{kind}.tar"
        subprocess.run(
            [
                *SKOPEO_COPY,
                f"oci:{store.layout}:busybox:latest",
                f"{kind}:{made[kind]}:busybox:latest",
            ],
            check=True,
            capture_output=True,
        )
    made["rootfs"] = store.rootfs("busybox")
    return made


@pytest.fixture()
def fresh(tmp_path: Path) -> Iterator[ImageStore]:
    """An empty store; a refused import must leave it empty."""
    yield ImageStore(tmp_path / "store")


@pytest.fixture()
def canary(tmp_path: Path) -> Iterator[Path]:
    """A path outside the store that hostile names aim at; it must never appear."""
    (tmp_path / "outside").mkdir()
    path = tmp_path / "outside" / f"canary-{uuid.uuid4().hex[:8]}"
    yield path
    assert not path.exists(), f"hostile archive wrote {path}"


def _assert_nothing_left(store: ImageStore) -> None:
    assert store.list() == []
    assert not list((store.root / "tmp").glob("*"))
    assert not (store.root / "rootfs").exists()
    written = sum(p.stat().st_size for p in store.root.rglob("*") if p.is_file())
    assert written < 64 << 10, f"a refused import left {written} bytes in the store"


def _refused(store: ImageStore, archive: Path, match: str, **limits: int) -> str:
    with pytest.raises(UnsafeImageError, match=match) as err:
        store.import_archive(archive, **limits)
    _assert_nothing_left(store)
    return str(err.value)


# ------------------------------------------------------------------ size and count bounds


SPARSE_FORMATS = {
    "gnu": ["--format=gnu"],
    "pax-0.0": ["--format=posix", "--sparse-version=0.0"],
    "pax-0.1": ["--format=posix", "--sparse-version=0.1"],
    "pax-1.0": ["--format=posix", "--sparse-version=1.0"],
}


@pytest.mark.parametrize("fmt", sorted(SPARSE_FORMATS))
def test_small_archive_of_huge_sparse_file_is_refused(
    fmt: str, fresh: ImageStore, tmp_path: Path
) -> None:
    """16 GiB of holes in a ~10 KiB archive: refused from the header, before any byte is written."""
    tree = tmp_path / "tree"
    tree.mkdir()
    with tree.joinpath("holes").open("wb") as fh:
        fh.truncate(16 << 30)
    archive = _docker_archive(
        tmp_path / "bomb.tar", [_gnu_tar(tree, "--sparse", *SPARSE_FORMATS[fmt])]
    )
    assert archive.stat().st_size < 64 << 10
    start = time.monotonic()
    message = _refused(fresh, archive, r"entry '\./holes' \(17,179,869,184 bytes\) takes the image")
    assert "past 8,589,934,592 bytes (8.0 GiB) unpacked" in message  # the default limit
    assert "--max-unpacked-size" in message
    assert time.monotonic() - start < 10


def test_sparse_files_count_at_their_real_size(fresh: ImageStore, tmp_path: Path) -> None:
    """A 64 MiB sparse file passes a 65 MiB limit, fails a 63 MiB one, and unpacks whole."""
    tree = tmp_path / "tree"
    tree.mkdir()
    with tree.joinpath("holes").open("wb") as fh:
        fh.write(b"head")
        fh.truncate(64 << 20)
    archive = _docker_archive(tmp_path / "sparse.tar", [_gnu_tar(tree, "--sparse")])
    _refused(fresh, archive, "takes the image past 66,060,288 bytes", max_unpacked_bytes=63 << 20)
    fresh.import_archive(archive, max_unpacked_bytes=65 << 20)
    unpacked = fresh.rootfs("hostile") / "holes"
    assert unpacked.stat().st_size == 64 << 20
    with unpacked.open("rb") as fh:
        assert fh.read(8) == b"head\0\0\0\0"


def test_base256_size_is_refused_before_reading(fresh: ImageStore, tmp_path: Path) -> None:
    """A GNU base-256 size field claiming 1 TiB, with no data behind it."""
    info = tarfile.TarInfo("huge")
    info.size = 1 << 40
    header = info.tobuf(tarfile.GNU_FORMAT)
    assert header[124] & 0x80  # base-256, not octal
    archive = _docker_archive(tmp_path / "b256.tar", [header + b"\0" * 1024])
    _refused(fresh, archive, r"entry 'huge' \(1,099,511,627,776 bytes\) takes the image past")


def test_too_many_entries_are_refused(fresh: ImageStore, tmp_path: Path) -> None:
    layer = _layer(*(_file(f"f{i}", b"") for i in range(3000)))
    archive = _docker_archive(tmp_path / "many.tar", [layer])
    message = _refused(fresh, archive, "more than 2,000 entries", max_entries=2000)
    assert "--max-entries" in message
    assert fresh.import_archive(archive, max_entries=4000).ref == "hostile:latest"


def test_limits_must_be_positive(fresh: ImageStore, tmp_path: Path) -> None:
    archive = _docker_archive(tmp_path / "ok.tar", [_layer(_file("a"))])
    with pytest.raises(UsageError, match="max_entries must be a whole number of at least 1"):
        fresh.import_archive(archive, max_entries=0)


def test_oversized_header_is_refused(fresh: ImageStore, tmp_path: Path) -> None:
    """A 2 MiB PAX record: memory for headers is bounded, not taken on trust."""
    layer = _layer(_file("a", pax_headers={"comment": "c" * (2 << 20)}))
    archive = _docker_archive(tmp_path / "bighdr.tar", [layer])
    _refused(fresh, archive, r"header of the entry at byte 0 takes more than 1,048,576 bytes")


# ------------------------------------------------------------------ entry types


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        (tarfile.FIFOTYPE, r"entry 'run/pipe' is a FIFO; images may not carry FIFOs or sockets"),
        (tarfile.CHRTYPE, r"entry 'run/pipe' is a device node"),
        (b"V", r"entry 'run/pipe' has tar type b'V', which images may not carry"),
    ],
)
def test_special_entries_are_refused(
    kind: bytes, match: str, fresh: ImageStore, tmp_path: Path
) -> None:
    layer = _layer(_special("run", tarfile.DIRTYPE, mode=0o755), _special("run/pipe", kind))
    _refused(fresh, _docker_archive(tmp_path / "special.tar", [layer]), match)


def test_overlay_xattrs_are_refused(fresh: ImageStore, tmp_path: Path) -> None:
    layer = _layer(_file("a", pax_headers={"SCHILY.xattr.trusted.overlay.opaque": "y"}))
    _refused(
        fresh,
        _docker_archive(tmp_path / "xattr.tar", [layer]),
        r"entry 'a' carries the extended attribute 'trusted.overlay.opaque'",
    )


# ------------------------------------------------------------------ headers read differently


def test_pax_path_that_climbs_is_refused(fresh: ImageStore, tmp_path: Path, canary: Path) -> None:
    """The ustar name looks harmless; the PAX path record, which wins, climbs out."""
    climb = "../" * 30 + str(canary).lstrip("/")
    layer = _layer(_file("harmless.txt", pax_headers={"path": climb}))
    assert layer[1024:1036] == b"harmless.txt"  # the ustar name field, after the PAX block
    _refused(fresh, _docker_archive(tmp_path / "pax.tar", [layer]), r"climbs out of the root")


def test_ustar_name_and_pax_path_are_read_once(
    fresh: ImageStore, tmp_path: Path, canary: Path
) -> None:
    """A climbing ustar name under a harmless PAX path: what is checked is what is stored.

    The stored layer is a canonical rewrite: GNU tar, a second reader, sees in
    it exactly the names the check saw, and no trace of the ustar name.
    """
    climb = "../" * 30 + str(canary).lstrip("/")
    layer = _layer(_file(climb[:99], b"ok\n", pax_headers={"path": "ok.txt"}))
    record = fresh.import_archive(_docker_archive(tmp_path / "pax.tar", [layer]))
    assert (fresh.rootfs(record.ref) / "ok.txt").read_text() == "ok\n"
    manifest = json.loads((fresh.layout / "blobs/sha256" / record.manifest_digest[7:]).read_text())
    stored = (fresh.layout / "blobs/sha256" / manifest["layers"][0]["digest"][7:]).read_bytes()
    assert _gnu_tar_names(stored) == ["ok.txt"]
    with tarfile.open(fileobj=io.BytesIO(stored)) as tar:
        assert [m.name for m in tar] == ["ok.txt"]
        assert not any(m.pax_headers.get("path", "").startswith("..") for m in tar)


def test_global_pax_header_is_refused(fresh: ImageStore, tmp_path: Path) -> None:
    """tarfile applies a global `path` to later entries; Go's archive/tar does not."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"path": "etc/passwd"}
    ) as tar:
        info, data = _file("a")
        tar.addfile(info, io.BytesIO(data))
    archive = _docker_archive(tmp_path / "global.tar", [buf.getvalue()])
    _refused(fresh, archive, r"a global PAX header sets path; tar readers disagree")


def test_bad_checksum_hiding_entries_is_refused(fresh: ImageStore, tmp_path: Path) -> None:
    """tarfile stops at a header with a bad checksum; GNU tar skips it and reads on."""
    layer = bytearray(_layer(*(_file(n, b"xyz") for n in ("a", "hidden", "b"))))
    hidden = layer.index(b"hidden")
    layer[hidden + 148] ^= 0x01  # one checksum digit
    gnu = subprocess.run(["tar", "-tf", "-"], input=bytes(layer), capture_output=True)
    assert gnu.stdout.split() == [b"a", b"b"]  # the second reader goes on past it
    with tarfile.open(fileobj=io.BytesIO(bytes(layer))) as tar:
        assert tar.getnames() == ["a"]  # and the first one silently stops
    archive = _docker_archive(tmp_path / "badsum.tar", [bytes(layer)])
    _refused(fresh, archive, r"tar header at byte 1,024 is corrupt \(bad checksum\)")


def test_data_behind_a_header_only_entry_is_refused(
    fresh: ImageStore, tmp_path: Path, canary: Path
) -> None:
    """A directory header claiming 512 bytes whose "data" is another header.

    Readers that skip the size and readers that do not see different entries.
    """
    hidden, _ = _file("../" * 30 + str(canary).lstrip("/"))
    directory, _ = _special("d", tarfile.DIRTYPE, size=512)
    layer = directory.tobuf(tarfile.USTAR_FORMAT) + hidden.tobuf(tarfile.USTAR_FORMAT)
    archive = _docker_archive(tmp_path / "dirdata.tar", [layer + b"x\n".ljust(512, b"\0")])
    _refused(fresh, archive, r"entry 'd' is not a regular file but its header carries 512 bytes")


def test_duplicate_entries_are_refused(fresh: ImageStore, tmp_path: Path) -> None:
    layer = _layer(_file("etc"), _special("etc", tarfile.SYMTYPE, linkname="/"))
    archive = _docker_archive(tmp_path / "dup.tar", [layer])
    _refused(fresh, archive, r"entry 'etc' appears twice in one layer")


def test_hardlink_to_a_later_entry_is_refused(fresh: ImageStore, tmp_path: Path) -> None:
    layer = _layer(_special("early", tarfile.LNKTYPE, linkname="later"), _file("later"))
    archive = _docker_archive(tmp_path / "fwdlink.tar", [layer])
    _refused(fresh, archive, r"hardlink 'early' -> 'later' does not point at a regular file earl")


def test_malformed_pax_records_are_refused(fresh: ImageStore, tmp_path: Path) -> None:
    """Records whose lengths do not frame them; old tarfile parses these in quadratic time."""
    info, data = _file("a")
    body = b"2 " * 20_000 + b"=\n"
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(body)
    block = pax.tobuf(tarfile.USTAR_FORMAT) + body + b"\0" * (-len(body) % 512)
    layer = block + _layer((info, data))
    start = time.monotonic()
    _refused(fresh, _docker_archive(tmp_path / "pax.tar", [layer]), "malformed PAX header record")
    assert time.monotonic() - start < 5


def test_long_digit_runs_in_pax_stay_fast(fresh: ImageStore, tmp_path: Path) -> None:
    """64 KiB of digits in one record (CVE-2024-6232 in CPython < 3.11.10): no quadratic parse."""
    layer = _layer(_file("a", pax_headers={"comment": "1" * (64 << 10)}))
    archive = _docker_archive(tmp_path / "digits.tar", [layer])
    start = time.monotonic()
    if tarstream._PAX_PARSER_FIXED:
        fresh.import_archive(archive)
    else:
        _refused(fresh, archive, r"run of more than 32 digits.*CVE-2024-6232")
    assert time.monotonic() - start < 5


def test_outer_archive_entries_are_checked_too(
    fresh: ImageStore, tmp_path: Path, canary: Path
) -> None:
    archive = _docker_archive(tmp_path / "a.tar", [_layer(_file("ok"))])
    with tarfile.open(archive, "a") as tar:
        info, _ = _special("pipe", tarfile.FIFOTYPE)
        tar.addfile(info)
    _refused(fresh, archive, r"archive a.tar: entry 'pipe' is a FIFO")


# ------------------------------------------------------------------ what still works


@pytest.mark.parametrize("kind", ["docker-archive", "oci-archive"])
def test_busybox_import_still_works(
    kind: str, fresh: ImageStore, busybox_archives: dict[str, Path]
) -> None:
    """The rewritten image unpacks to the same tree as the original, file for file."""
    record = fresh.import_archive(busybox_archives[kind])
    assert record.ref == "busybox:latest"
    fresh.verify("busybox")
    rootfs = fresh.rootfs("busybox")
    assert _tree(rootfs) == _tree(busybox_archives["rootfs"])
    if os.geteuid() == 0:
        out = subprocess.run(
            ["chroot", str(rootfs), "/bin/sh", "-c", "echo hello from $(id -un nobody)"],
            check=True,
            capture_output=True,
            text=True,
        )
        assert out.stdout.strip() == "hello from nobody"
    assert not list((fresh.root / "tmp").iterdir())


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    """Each path under ``root``: its mode and its content's hash or link target."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            what = "-> " + os.readlink(path)
        elif path.is_file():
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = "dir"
        found[str(path.relative_to(root))] = (st.st_mode, what)
    return found


def test_cli_names_the_file_that_is_not_an_archive(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    env = {**os.environ, "TIERBOX_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, "-m", "tierbox.cli", "image", "import", str(notes)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "notes.txt is not an image archive" in lines[0]
    assert "docker-archive" in lines[0] and "oci-archive" in lines[0]


def test_cli_limits(tmp_path: Path, busybox_archives: dict[str, Path]) -> None:
    env = {**os.environ, "TIERBOX_HOME": str(tmp_path / "home")}
    base = [sys.executable, "-m", "tierbox.cli", "image", "import"]
    archive = str(busybox_archives["docker-archive"])
    small = subprocess.run(
        [*base, "--max-unpacked-size", "1m", archive], capture_output=True, text=True, env=env
    )
    assert small.returncode == 125
    assert "takes the image past 1,048,576 bytes (1 MiB) unpacked" in small.stderr
    bad = subprocess.run(
        [*base, "--max-unpacked-size", "lots", archive], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "bad --max-unpacked-size 'lots'" in bad.stderr
    few = subprocess.run(
        [*base, "--max-entries", "10", archive], capture_output=True, text=True, env=env
    )
    assert few.returncode == 125 and "more than 10 entries" in few.stderr
    wide = {**env, "COLUMNS": "200"}
    shown = subprocess.run([*base, "--help"], capture_output=True, text=True, env=wide).stdout
    assert f"(default {tarstream.DEFAULT_MAX_UNPACKED_BYTES >> 30}g)" in shown
    assert f"(default {tarstream.DEFAULT_MAX_ENTRIES})" in shown
