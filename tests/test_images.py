"""The image store against the real tools (umoci, skopeo, busybox-static); no mocks.

Hostile archives are crafted here with tarfile: each must be refused with an
UnsafeImageError naming the entry, and a canary path outside the store must
not appear.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tierbox.errors import (
    ImageError,
    ImageNotFoundError,
    UnsafeImageError,
    UsageError,
)
from tierbox.images.bootstrap import find_mirror
from tierbox.images.store import ImageConfig, ImageStore, default_store, parse_ref

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="chroot/mknod need root")


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A TIERBOX_HOME for this module, so default_store() lands in a temp dir too."""
    path = tmp_path_factory.mktemp("tierbox-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIERBOX_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def store(home: Path) -> ImageStore:
    store = ImageStore(home / "images")
    store.ensure_busybox()
    return store


@pytest.fixture()
def fresh(tmp_path: Path) -> ImageStore:
    """An empty store of its own, for tests that import or corrupt things."""
    return ImageStore(tmp_path / "store")


@pytest.fixture(scope="module")
def archives(store: ImageStore, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """busybox exported from the store itself as docker-archive and oci-archive."""
    out = tmp_path_factory.mktemp("archives")
    source = f"oci:{store.layout}:busybox:latest"
    made = {"docker": out / "busybox-docker.tar", "oci": out / "busybox-oci.tar"}
    for dest in (
        f"docker-archive:{made['docker']}:busybox:latest",
        f"oci-archive:{made['oci']}:busybox:latest",
    ):
        subprocess.run(
            ["skopeo", "--insecure-policy", "copy", "--quiet", source, dest],
            check=True,
            capture_output=True,
        )
    return made


def _tree(tmp_path: Path, files: dict[str, bytes]) -> Path:
    root = tmp_path / f"tree-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _blob(store: ImageStore, digest: str) -> Path:
    return store.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _manifest(store: ImageStore, ref: str) -> dict[str, object]:
    data = json.loads(_blob(store, store.resolve(ref).manifest_digest).read_bytes())
    assert isinstance(data, dict)
    return data


# ------------------------------------------------------------ busybox built-in


def test_busybox_builtin_rootfs(store: ImageStore) -> None:
    record = store.resolve("busybox")
    assert record.ref == "busybox:latest"
    assert record.config.cmd == ["sh"]
    assert record.manifest_digest.startswith("sha256:")
    assert record.size_bytes > 500_000
    rootfs = store.rootfs("busybox")
    assert (rootfs / "bin" / "busybox").is_file()
    assert os.readlink(rootfs / "bin" / "sh") == "/bin/busybox"
    assert os.readlink(rootfs / "bin" / "ls") == "/bin/busybox"
    passwd = (rootfs / "etc" / "passwd").read_text()
    assert passwd.startswith("root:x:0:0:")
    assert "nobody:x:65534:65534:" in passwd
    assert "nobody:x:65534:" in (rootfs / "etc" / "group").read_text()
    assert stat.S_IMODE((rootfs / "tmp").stat().st_mode) == 0o1777


@needs_root
def test_busybox_shell_runs_in_chroot(store: ImageStore) -> None:
    rootfs = store.rootfs("busybox:latest")
    out = subprocess.run(
        ["chroot", str(rootfs), "/bin/sh", "-c", "echo hello from $(id -un nobody)"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "hello from nobody"


def test_ensure_busybox_is_idempotent(store: ImageStore) -> None:
    index = store.layout / "index.json"
    before = (index.stat().st_mtime_ns, store.resolve("busybox").manifest_digest)
    again = store.ensure_busybox()
    assert again.manifest_digest == before[1]
    assert index.stat().st_mtime_ns == before[0]


def test_rootfs_fast_path_is_cheap(store: ImageStore) -> None:
    first = store.rootfs("busybox")
    rounds = 2000
    start = time.perf_counter()
    for _ in range(rounds):
        assert store.rootfs("busybox") == first
    per_call_us = (time.perf_counter() - start) / rounds * 1e6
    assert per_call_us < 500, f"rootfs() cached path took {per_call_us:.0f} µs"
    assert first.parent.name == store.resolve("busybox").manifest_digest[7:]


def test_default_store_uses_tierbox_home(home: Path, store: ImageStore) -> None:
    assert default_store().root == home / "images"
    assert default_store() is default_store()
    assert (
        default_store().resolve("busybox").manifest_digest
        == store.resolve("busybox").manifest_digest
    )


# ------------------------------------------------------------ resolve / list


def test_resolve_accepts_equivalent_refs(store: ImageStore) -> None:
    digest = store.resolve("busybox:latest").manifest_digest
    for ref in ("busybox", "docker.io/library/busybox:latest", "localhost/busybox", digest[:19]):
        assert store.resolve(ref).manifest_digest == digest
    assert parse_ref("ghcr.io/acme/tool:1.2") == ("ghcr.io/acme/tool", "1.2")
    assert parse_ref("localhost:5000/x") == ("localhost:5000/x", "latest")


def test_unknown_image_names_what_exists_and_how_to_get_it(store: ImageStore) -> None:
    with pytest.raises(ImageNotFoundError) as err:
        store.resolve("nosuch:1")
    text = str(err.value)
    assert "nosuch:1" in text and "busybox:latest" in text
    assert "tierbox image import" in text and "tierbox image bootstrap debian:bookworm" in text
    assert isinstance(err.value, UsageError)
    with pytest.raises(ImageNotFoundError, match=r"tierbox image bootstrap python:3\.11"):
        store.resolve("python:3.11")


def test_bad_refs_and_bootstrap_names_are_usage_errors(store: ImageStore) -> None:
    with pytest.raises(UsageError, match="bad image reference"):
        store.resolve("Not A Ref")
    with pytest.raises(UsageError, match=r"debian:bookworm, python:3\.11"):
        store.bootstrap("alpine:3.20")


def test_empty_store_lists_nothing(fresh: ImageStore) -> None:
    assert fresh.list() == []
    with pytest.raises(ImageNotFoundError, match="the store is empty"):
        fresh.resolve("busybox")
    assert not fresh.root.exists()  # reading never creates the store


def test_add_directory_config_and_inspect(store: ImageStore, tmp_path: Path) -> None:
    tree = _tree(tmp_path, {"app/module.wasm": b"\0asm\1\0\0\0", "etc/motd": b"hi\n"})
    config = ImageConfig(
        entrypoint=["/bin/run", "--flag"],
        cmd=["a b", "c=d"],
        env={"A": "1", "B": "x=y"},
        workdir="/app",
        user="65534:65534",
        annotations={"org.tierbox.wasm.module": "/app/module.wasm"},
    )
    record = store.add_directory("wasm/hello:v1", tree, config)
    assert record.ref == "wasm/hello:v1"
    assert record.config == config
    assert store.resolve("wasm/hello:v1") == record
    assert "wasm/hello:v1" in [r.ref for r in store.list()]
    info = record.to_dict()
    assert info["ref"] == "wasm/hello:v1"
    assert info["config"]["annotations"] == {"org.tierbox.wasm.module": "/app/module.wasm"}
    json.dumps(info)  # serialisable for `tierbox image inspect --json`
    assert (store.rootfs("wasm/hello:v1") / "app" / "module.wasm").read_bytes() == b"\0asm\1\0\0\0"
    store.remove("wasm/hello:v1")


def test_list_and_remove_drop_blobs_and_rootfs(store: ImageStore, tmp_path: Path) -> None:
    tree = _tree(tmp_path, {"data/unique.txt": uuid.uuid4().bytes})
    store.add_directory("scratch:1", tree, ImageConfig(cmd=["true"]))
    layer = _manifest(store, "scratch:1")["layers"][0]["digest"]  # type: ignore[index]
    rootfs = store.rootfs("scratch:1")
    assert rootfs.is_dir() and _blob(store, layer).exists()
    with pytest.raises(ImageNotFoundError):
        store.remove("scratch")  # means scratch:latest
    store.remove("scratch:1")
    assert "scratch:1" not in [r.ref for r in store.list()]
    assert not rootfs.exists() and not rootfs.parent.exists()
    assert not _blob(store, layer).exists()
    store.verify("busybox")  # gc kept what busybox needs
    assert (store.rootfs("busybox") / "bin" / "busybox").is_file()


def test_retag_replaces_and_drops_old_rootfs(store: ImageStore, tmp_path: Path) -> None:
    first = store.add_directory("retag:1", _tree(tmp_path, {"v": b"1"}), ImageConfig())
    old_rootfs = store.rootfs("retag:1")
    second = store.add_directory("retag:1", _tree(tmp_path, {"v": b"2"}), ImageConfig())
    assert first.manifest_digest != second.manifest_digest
    assert not old_rootfs.exists()
    assert (store.rootfs("retag:1") / "v").read_bytes() == b"2"
    store.remove("retag:1")


def test_concurrent_rootfs_unpacks_once(store: ImageStore, tmp_path: Path) -> None:
    store.add_directory("many:1", _tree(tmp_path, {"f": b"x" * 100_000}), ImageConfig())
    other = ImageStore(store.root)  # a second instance shares only the files and locks
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda i: (store, other)[i % 2].rootfs("many:1"), range(16)))
    assert len(set(paths)) == 1
    assert (paths[0] / "f").stat().st_size == 100_000
    assert not list((store.root / "rootfs").glob(".tmp-*"))
    store.remove("many:1")


# ------------------------------------------------------------------- import


def test_import_docker_archive(fresh: ImageStore, archives: dict[str, Path]) -> None:
    seen: list[str] = []
    record = fresh.import_archive(archives["docker"], progress=seen.append)
    assert record.ref == "busybox:latest"  # from RepoTags docker.io/library/busybox:latest
    assert record.config.cmd == ["sh"]
    assert seen and any("docker-archive" in line for line in seen)
    rootfs = fresh.rootfs("busybox")
    assert os.readlink(rootfs / "bin" / "sh") == "/bin/busybox"
    fresh.verify("busybox")
    assert not list((fresh.root / "tmp").iterdir())  # staging cleaned up


def test_import_oci_archive_is_canonical_and_stable(
    store: ImageStore, fresh: ImageStore, archives: dict[str, Path], tmp_path: Path
) -> None:
    """Layers are rewritten on import, so digests change once and then stay put."""
    record = fresh.import_archive(archives["oci"], name="mybox:2")
    assert record.ref == "mybox:2"
    assert record.manifest_digest != store.resolve("busybox").manifest_digest
    assert record.config.annotations["org.tierbox.source"] == "builtin busybox-static"
    assert record.config.cmd == ["sh"]
    assert (fresh.rootfs("mybox:2") / "bin" / "busybox").is_file()
    again = fresh.import_archive(archives["oci"])
    assert again.ref == "busybox:latest"
    assert again.manifest_digest == record.manifest_digest  # same input, same bytes
    assert [r.ref for r in fresh.list()] == ["busybox:latest", "mybox:2"]
    exported = tmp_path / "reexported.tar"
    source, dest = f"oci:{fresh.layout}:mybox:2", f"oci-archive:{exported}:mybox:2"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--quiet", source, dest],
        check=True,
        capture_output=True,
    )
    assert fresh.import_archive(exported, name="mybox:3").manifest_digest == record.manifest_digest
    fresh.verify("mybox:3")


def test_import_rejects_non_archives(fresh: ImageStore, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tarball at all" * 100)
    with pytest.raises(UsageError, match=r"^junk\.tar is not an image archive: expected a docker"):
        fresh.import_archive(junk)
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as tar:
        _add(tar, _file("hello.txt"))
    with pytest.raises(UsageError, match=r"empty\.tar is a tar archive but not an image archive"):
        fresh.import_archive(empty)
    with pytest.raises(UsageError, match="no such file"):
        fresh.import_archive(tmp_path / "missing.tar")
    assert not list((fresh.root / "tmp").iterdir())


def test_hardlinks_setuid_and_xattrs_survive_build_and_import(
    fresh: ImageStore, tmp_path: Path
) -> None:
    """umoci-built layers pass the unpack-time check; the import rewrite keeps links and xattrs."""
    tree = _tree(tmp_path, {"usr/bin/tool": b"x" * 1000, "etc/f": b"y"})
    os.link(tree / "usr/bin/tool", tree / "usr/bin/alias")
    os.link(tree / "usr/bin/tool", tree / "aa")  # sorts first, so it is the one stored in full
    (tree / "usr/bin/tool").chmod(0o4755)
    try:
        os.setxattr(tree / "etc/f", "user.note", b"kept")
        xattrs = True
    except OSError:
        xattrs = False  # the test filesystem has no user xattrs
    fresh.add_directory("links:1", tree, ImageConfig())
    exported = tmp_path / "links.tar"
    source, dest = f"oci:{fresh.layout}:links:1", f"oci-archive:{exported}:links:1"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--quiet", source, dest],
        check=True,
        capture_output=True,
    )
    fresh.import_archive(exported, name="links:2")
    for ref in ("links:1", "links:2"):
        rootfs = fresh.rootfs(ref)
        inodes = {os.stat(rootfs / p).st_ino for p in ("aa", "usr/bin/tool", "usr/bin/alias")}
        assert len(inodes) == 1
        assert stat.S_IMODE((rootfs / "usr/bin/tool").stat().st_mode) == 0o4755
        if xattrs:
            assert os.getxattr(rootfs / "etc/f", "user.note") == b"kept"


# ------------------------------------------------------------ verification


def test_verify_catches_corrupted_layer(fresh: ImageStore, tmp_path: Path) -> None:
    fresh.add_directory("victim:1", _tree(tmp_path, {"f": b"y" * 50_000}), ImageConfig())
    fresh.verify("victim:1")
    layer = _blob(fresh, _manifest(fresh, "victim:1")["layers"][0]["digest"])  # type: ignore[index]
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="corrupt"):
        fresh.verify("victim:1")
    with pytest.raises(ImageError, match="corrupt"):
        fresh.rootfs("victim:1")  # never unpacks a corrupt layer
    assert not (fresh.root / "rootfs" / fresh.resolve("victim:1").manifest_digest[7:]).exists()


def test_corrupted_config_is_caught_on_read(fresh: ImageStore, tmp_path: Path) -> None:
    fresh.add_directory("victim:2", _tree(tmp_path, {"f": b"z"}), ImageConfig(cmd=["x"]))
    config_digest = _manifest(fresh, "victim:2")["config"]["digest"]  # type: ignore[index]
    path = _blob(fresh, config_digest)
    path.write_bytes(path.read_bytes().replace(b'"x"', b'"y"'))
    with pytest.raises(ImageError, match="corrupt"):
        ImageStore(fresh.root).resolve("victim:2")  # a new instance reads from disk
    assert ImageStore(fresh.root).list() == []


# ---------------------------------------------------------- hostile archives


def _file(name: str, data: bytes = b"pwned\n") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def _dir(name: str) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, None


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def _device(name: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.devmajor, info.devminor = 8, 0
    return info, None


def _add(tar: tarfile.TarFile, entry: tuple[tarfile.TarInfo, bytes | None]) -> None:
    info, data = entry
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _layer(*entries: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            _add(tar, entry)
    return buf.getvalue()


def _docker_archive(
    path: Path,
    layers: list[bytes],
    *,
    layer_names: list[str] | None = None,
    config_name: str = "config.json",
    extra: tuple[tuple[tarfile.TarInfo, bytes | None], ...] = (),
) -> Path:
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
    manifest = [
        {
            "Config": config_name,
            "RepoTags": ["hostile:latest"],
            "Layers": layer_names or names,
        }
    ]
    with tarfile.open(path, "w") as tar:
        _add(tar, _file("manifest.json", json.dumps(manifest).encode()))
        _add(tar, _file("config.json", json.dumps(config).encode()))
        for name, layer in zip(names, layers, strict=True):
            _add(tar, _file(name, layer))
        for entry in extra:
            _add(tar, entry)
    return path


@pytest.fixture()
def canary(tmp_path: Path) -> Iterator[Path]:
    """A path outside the store that a hostile archive aims at; it must never appear."""
    target_dir = tmp_path / "outside"
    target_dir.mkdir()
    path = target_dir / f"canary-{uuid.uuid4().hex[:8]}"
    yield path
    assert not path.exists(), f"hostile archive wrote {path}"


def _climb(path: Path) -> str:
    """A relative name that climbs from anywhere up to ``path`` (../../..../path)."""
    return "../" * 40 + str(path).lstrip("/")


HOSTILE_LAYERS = {
    "dotdot": lambda c: [_layer(_file(_climb(c)))],
    "absolute": lambda c: [_layer(_file(str(c)))],
    "through-absolute-symlink": lambda c: [
        _layer(_link("evil", str(c.parent), tarfile.SYMTYPE), _file(f"evil/{c.name}"))
    ],
    "through-symlink-next-layer": lambda c: [
        _layer(_link("evil", str(c.parent), tarfile.SYMTYPE)),
        _layer(_file(f"evil/{c.name}")),
    ],
    "relative-symlink-escape": lambda c: [
        _layer(_dir("a"), _link("a/evil", _climb(c.parent), tarfile.SYMTYPE))
    ],
    "hardlink-dotdot": lambda c: [_layer(_link("x", _climb(c), tarfile.LNKTYPE))],
    "hardlink-absolute": lambda c: [_layer(_link("x", "/etc/passwd", tarfile.LNKTYPE))],
    "hardlink-through-symlink": lambda c: [
        _layer(_link("evil", "/etc", tarfile.SYMTYPE), _link("x", "evil/passwd", tarfile.LNKTYPE))
    ],
    "char-device": lambda c: [_layer(_device("dev/sda", tarfile.CHRTYPE))],
    "block-device": lambda c: [_layer(_device("dev/sda", tarfile.BLKTYPE))],
}
EXPECTED = {
    "dotdot": r"'\.\./.*canary.*' climbs out",
    "absolute": r"'/.*canary.*' is an absolute path",
    "through-absolute-symlink": r"'evil/canary-.*' would be written through the symlink 'evil'",
    "through-symlink-next-layer": r"layer 2/2: .*'evil/canary-.*' would be written through",
    "relative-symlink-escape": r"symlink 'a/evil' -> .* points outside the image root",
    "hardlink-dotdot": r"hardlink 'x' -> .* points outside the image root",
    "hardlink-absolute": r"hardlink 'x' -> '/etc/passwd' points outside",
    "hardlink-through-symlink": r"'evil/passwd' would be written through the symlink 'evil'",
    "char-device": r"'dev/sda' is a device node",
    "block-device": r"'dev/sda' is a device node",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LAYERS))
def test_hostile_layer_is_refused(
    case: str, fresh: ImageStore, tmp_path: Path, canary: Path
) -> None:
    archive = _docker_archive(tmp_path / "hostile.tar", HOSTILE_LAYERS[case](canary))
    with pytest.raises(UnsafeImageError, match=EXPECTED[case]):
        fresh.import_archive(archive)
    assert fresh.list() == []
    assert not list((fresh.root / "tmp").iterdir())
    assert not (fresh.root / "rootfs").exists()


def test_hostile_manifest_paths_are_refused(
    fresh: ImageStore, tmp_path: Path, canary: Path
) -> None:
    layer = _layer(_file("ok.txt"))
    bad_layer = _docker_archive(tmp_path / "a.tar", [layer], layer_names=[_climb(canary)])
    with pytest.raises(UnsafeImageError, match=r"manifest.json points at '\.\./"):
        fresh.import_archive(bad_layer)
    bad_config = _docker_archive(tmp_path / "b.tar", [layer], config_name="/etc/passwd")
    with pytest.raises(UnsafeImageError, match=r"manifest.json points at '/etc/passwd'"):
        fresh.import_archive(bad_config)
    assert fresh.list() == []


def test_hostile_outer_archive_entries_are_refused(
    fresh: ImageStore, tmp_path: Path, canary: Path
) -> None:
    layer = _layer(_file("ok.txt"))
    docker = _docker_archive(tmp_path / "a.tar", [layer], extra=(_file(_climb(canary)),))
    with pytest.raises(UnsafeImageError, match="climbs out"):
        fresh.import_archive(docker)
    oci = tmp_path / "oci.tar"
    with tarfile.open(oci, "w") as tar:
        _add(tar, _file("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'))
        _add(tar, _file("index.json", b'{"schemaVersion": 2, "manifests": []}'))
        _add(tar, _file(str(canary)))
    with pytest.raises(UnsafeImageError, match="absolute path"):
        fresh.import_archive(oci)


def test_benign_crafted_archive_with_absolute_symlinks_imports(
    fresh: ImageStore, tmp_path: Path
) -> None:
    """The crafting above is valid: without the hostile entry the same archive imports."""
    layer = _layer(
        _dir("bin"),
        _file("bin/busybox", b"#!fake\n"),
        _link("bin/sh", "/bin/busybox", tarfile.SYMTYPE),
        _dir("usr"),
        _dir("usr/lib"),
        _link("usr/lib/passwd", "../../etc/passwd", tarfile.SYMTYPE),
        _link("bin/hard", "bin/busybox", tarfile.LNKTYPE),
        _dir("etc"),
        _file("etc/passwd", b"root:x:0:0::/:/bin/sh\n"),
    )
    second = _layer(_file("bin/.wh.hard", b""), _file("etc/hostname", b"box\n"))
    record = fresh.import_archive(_docker_archive(tmp_path / "ok.tar", [layer, second]))
    assert record.ref == "hostile:latest"
    rootfs = fresh.rootfs("hostile")
    assert os.readlink(rootfs / "bin" / "sh") == "/bin/busybox"
    assert (rootfs / "usr" / "lib" / "passwd").read_text().startswith("root:")
    assert not (rootfs / "bin" / "hard").exists()


@needs_root
def test_device_node_in_store_is_refused_at_unpack(fresh: ImageStore, tmp_path: Path) -> None:
    """Defense in depth: whatever is in the layout is scanned again before it is unpacked."""
    tree = _tree(tmp_path, {"etc/ok": b"ok"})
    (tree / "dev").mkdir()
    os.mknod(tree / "dev" / "sda", stat.S_IFBLK | 0o600, os.makedev(8, 0))
    fresh.add_directory("devices:1", tree, ImageConfig())
    with pytest.raises(UnsafeImageError, match="device node"):
        fresh.rootfs("devices:1")


# ---------------------------------------------------------------- bootstrap


def test_find_mirror_reads_deb822_and_one_line_sources(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb deb-src\n# comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert find_mirror("bookworm", apt) == "http://mirror.example/debian"
    (apt / "sources.list").write_text(
        "# deb http://nope/ bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one/debian bookworm main\n"
    )
    assert find_mirror("bookworm", apt) == "http://one/debian"
    assert find_mirror("trixie", tmp_path / "none") == "http://deb.debian.org/debian"


@pytest.mark.slow
def test_bootstrap_debian_bookworm() -> None:
    """~30 s the first time; the result is kept in a persistent store and reused."""
    if shutil.which("debootstrap", path=os.environ.get("PATH", "") + ":/usr/sbin") is None:
        pytest.skip("debootstrap is not installed")
    root = Path(os.environ.get("TIERBOX_TEST_STORE", "/var/tmp/tierbox-test-store"))
    store = ImageStore(root)
    lines: list[str] = []
    record = store.bootstrap("debian:bookworm", progress=lines.append)
    assert record.ref == "debian:bookworm"
    assert lines  # either debootstrap's I: lines or "already in the store"
    assert record.config.cmd == ["bash"]
    store.verify("debian:bookworm")
    rootfs = store.rootfs("debian:bookworm")
    assert (rootfs / "etc" / "debian_version").read_text().startswith("12.")
    assert not list((rootfs / "dev").iterdir())
    if IS_ROOT:
        out = subprocess.run(
            ["chroot", str(rootfs), "/bin/bash", "-c", "dpkg -s apt | head -1"],
            check=True,
            capture_output=True,
            text=True,
        )
        assert out.stdout.strip() == "Package: apt"
