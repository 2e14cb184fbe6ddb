"""SBOMs (the real syft) and vulnerability scans: version order per ecosystem, OSV
ranges on edge cases, Debian's security suite through apt, and the reports
(CycloneDX validated against its schema, SARIF against the OASIS schema)."""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import cli
from tierbox.build.builder import BuildOptions, build_image
from tierbox.build.debsec import DebianSecurity
from tierbox.build.osv import OSVDatabase, severity_of
from tierbox.build.sbom import image_inventory, image_sbom
from tierbox.build.scan import scan_image, scan_inventory
from tierbox.build.versions import compare, ecosystem_order, in_range
from tierbox.errors import AdvisoryDBError, ImageNotFoundError, UsageError
from tierbox.host.runner import which
from tierbox.images.store import ImageStore, default_store

DATA = Path(__file__).parent / "data" / "build"
OSV_DIR = DATA / "osv"

needs_buildah = pytest.mark.skipif(
    which("buildah") is None or os.geteuid() != 0, reason="buildah (as root) missing"
)


# ---------------------------------------------------------------- version order


@pytest.mark.parametrize(
    ("eco", "low", "high"),
    [
        # Debian: epochs win over everything, ~ sorts before anything, even the end
        ("Debian", "2.0-1", "1:1.0-1"),
        ("Debian", "1.0~rc1-1", "1.0-1"),
        ("Debian", "1.0-1~deb12u1", "1.0-1"),
        ("Debian:12", "1.0~~a", "1.0~a"),
        ("Debian", "2.36-9+deb12u9", "2.36-9+deb12u10"),
        ("Debian", "1:1.2.13.dfsg-1", "1:1.2.13.dfsg-1+deb12u1"),
        # PEP 440: dev < pre < release < post; local versions sort after their base
        ("PyPI", "1.0.dev1", "1.0a1"),
        ("PyPI", "1.0rc1", "1.0"),
        ("PyPI", "1.0", "1.0+local.1"),
        ("PyPI", "1.0+local.1", "1.0.post1"),
        ("PyPI", "1.0.post1", "1.0.1"),
        # SemVer: pre-releases before the release, numeric identifiers numerically
        ("npm", "1.0.0-alpha", "1.0.0"),
        ("npm", "1.0.0-alpha.2", "1.0.0-alpha.10"),
        ("npm", "1.0.0-alpha.beta", "1.0.0-beta"),
    ],
)
def test_version_order(eco: str, low: str, high: str) -> None:
    assert compare(eco, low, high) == -1 and compare(eco, high, low) == 1


def test_equal_versions_per_ecosystem() -> None:
    assert compare("Debian", "0:1.0-1", "1.0-1") == 0  # epoch 0 is no epoch
    assert compare("PyPI", "1.0", "1.0.0") == 0
    assert compare("PyPI", "1.0RC1", "1.0rc1") == 0
    assert compare("npm", "1.0.0+build.1", "1.0.0+build.2") == 0  # build metadata ignored


# ---------------------------------------------------------------- OSV ranges


def affected(eco: str, version: str, events: list[dict[str, str]], kind: str = "ECOSYSTEM") -> bool:
    parse = ecosystem_order(eco, kind)
    assert parse is not None
    return in_range(version, events, parse)


def test_osv_ranges_debian() -> None:
    fixed_with_epoch = [{"introduced": "0"}, {"fixed": "1:2.0-1"}]
    assert affected("Debian:12", "3.0-1", fixed_with_epoch)  # no epoch: before 1:anything
    assert affected("Debian:12", "1:2.0-1~bpo12+1", fixed_with_epoch)  # ~ before the fix
    assert not affected("Debian:12", "1:2.0-1", fixed_with_epoch)
    assert not affected("Debian:12", "1:2.0-1+deb12u1", fixed_with_epoch)
    two_windows = [
        {"introduced": "1.0-1"},
        {"fixed": "1.2-1"},
        {"introduced": "2.0~rc1-1"},
        {"fixed": "2.1-1"},
    ]
    assert not affected("Debian", "0.9-1", two_windows)
    assert affected("Debian", "1.1-3", two_windows)
    assert not affected("Debian", "1.5-1", two_windows)
    assert affected("Debian", "2.0~rc2-1", two_windows)
    assert not affected("Debian", "1.99-1", two_windows)


def test_osv_ranges_pypi() -> None:
    events = [{"introduced": "0"}, {"fixed": "1.0"}]
    assert affected("PyPI", "1.0rc1", events)  # a pre-release of the fix is before it
    assert affected("PyPI", "1.0.dev0", events)
    assert affected("PyPI", "0.9.post3", events)
    assert not affected("PyPI", "1.0", events)
    assert not affected("PyPI", "1.0+ubuntu1", events)  # a local version sorts after 1.0
    last = [{"introduced": "2.0a1"}, {"last_affected": "2.1"}]
    assert affected("PyPI", "2.1", last) and affected("PyPI", "2.0b3", last)
    assert not affected("PyPI", "2.1.post1", last) and not affected("PyPI", "1.9", last)
    assert affected("PyPI", "2.1+local", last) is False  # after 2.1 in PEP 440
    with pytest.raises(ValueError, match="PEP 440"):
        affected("PyPI", "not a version", events)


def test_osv_ranges_semver_and_limit() -> None:
    events = [{"introduced": "2.0.0-rc.1"}, {"last_affected": "2.0.0"}]
    assert affected("npm", "2.0.0-rc.2", events)
    assert affected("npm", "2.0.0+build.7", events)  # build metadata: same version
    assert not affected("npm", "2.0.0-beta.9", events)  # beta < rc
    assert not affected("npm", "2.0.1", events)
    assert affected("Go", "v1.4.0", [{"introduced": "0"}, {"fixed": "1.5.0"}], kind="SEMVER")
    limited = [{"introduced": "1.0.0"}, {"limit": "1.5.0"}]
    assert affected("npm", "1.4.9", limited) and not affected("npm", "1.5.0", limited)
    assert ecosystem_order("Maven") is None  # no order known: never guessed


def test_osv_database(tmp_path: Path) -> None:
    db = OSVDatabase.load(OSV_DIR)
    assert db.records == 4 and db.newest_modified == "2026-05-06T07:08:09Z"
    assert db.skipped == 0 and set(db.ecosystems) == {"Debian", "PyPI", "npm"}
    hits, _ = db.matches("PyPI", "tbx-demo", "1.0rc1")  # names normalised (TBX_Demo)
    assert [(h.advisory_id, h.fixed, h.severity) for h in hits] == [
        ("TBX-TEST-PYPI-1", "1.0", "medium")
    ]
    assert db.matches("PyPI", "tbx_demo", "1.0+local")[0] == []
    hits, _ = db.matches("Debian", "python3.11", "3.11.2-6+deb12u8", release="12")
    assert [(h.advisory_id, h.severity) for h in hits] == [("TBX-TEST-DEB-1", "critical")]
    assert db.matches("Debian", "glibc", "2.36-9+deb12u10", release="12")[0] == []
    # the same records from a zip (an osv.dev all.zip)
    archive = tmp_path / "all.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in OSV_DIR.glob("*.json"):
            zf.write(f, f.name)
    assert OSVDatabase.load(archive).records == 4
    with pytest.raises(AdvisoryDBError, match="no OSV records"):
        OSVDatabase.load(DATA / "lint")
    with pytest.raises(AdvisoryDBError, match="no such file"):
        OSVDatabase.load(tmp_path / "missing")


def test_osv_severity_sources() -> None:
    v3 = {
        "severity": [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:U/C:L/I:N/A:N"}]
    }
    assert severity_of(v3)[0] == "medium"  # 4.3
    v4 = {
        "severity": [
            {
                "type": "CVSS_V4",
                "score": "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N",
            }
        ]
    }
    assert severity_of(v4) == ("critical", "CVSS_V4 9.3")
    assert severity_of({"database_specific": {"severity": "MODERATE"}})[0] == "medium"
    assert severity_of({"severity": [{"type": "CVSS_V3", "score": "garbage"}]})[0] == "unknown"
    assert severity_of({})[0] == "unknown"


# ---------------------------------------------------------------- SBOM


@pytest.fixture(scope="module")
def store() -> ImageStore:
    st = default_store()
    st.ensure_busybox()
    return st


@pytest.fixture(scope="module")
def python311(store: ImageStore) -> str:
    try:
        store.resolve("python:3.11")
    except ImageNotFoundError:
        store.bootstrap("python:3.11")  # ~60 s, once per store
    return "python:3.11"


@pytest.fixture(scope="module")
def debian(store: ImageStore) -> str:
    try:
        store.resolve("debian:bookworm")
    except ImageNotFoundError:
        store.bootstrap("debian:bookworm")  # ~45 s, once per store
    return "debian:bookworm"


@pytest.fixture(scope="module")
def mixed_image(store: ImageStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """busybox plus a Python distribution (dist-info) and an npm package: no dpkg."""
    if which("buildah") is None or os.geteuid() != 0:
        pytest.skip("buildah (as root) missing")
    ctx = tmp_path_factory.mktemp("mixed")
    info = ctx / "site" / "TBX_Demo-1.0rc1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: TBX_Demo\nVersion: 1.0rc1\n")
    (info / "RECORD").write_text("")
    pkg = ctx / "node_modules" / "tbx-left-pad"
    pkg.mkdir(parents=True)
    (pkg / "package.json").write_text('{"name": "tbx-left-pad", "version": "2.0.0"}')
    (ctx / "Dockerfile").write_text(
        "FROM busybox\nCOPY site/ /usr/lib/python3/dist-packages/\n"
        "COPY node_modules/ /app/node_modules/\n"
    )
    build_image(BuildOptions(ctx, "tbtest-mixed:1"))
    yield "tbtest-mixed:1"
    with contextlib.suppress(ImageNotFoundError):
        store.remove("tbtest-mixed:1")


def test_sbom_of_python_lists_python3_and_libc6(python311: str) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    data, inv = image_sbom(python311, "cyclonedx-json")
    doc = json.loads(data)
    by_name = {c["name"]: c for c in doc["components"]}
    for name in ("python3", "libc6", "python3.11"):
        comp = by_name[name]
        assert comp["version"] and comp["purl"].startswith(f"pkg:deb/debian/{name}@")
    assert "upstream=glibc" in by_name["libc6"]["purl"]  # the source package
    libc6 = next(p for p in inv.packages if p.name == "libc6")
    assert libc6.source_name == "glibc" and libc6.version.startswith("2.36-")
    assert (inv.distro_id, inv.distro_version, inv.distro_codename) == ("debian", "12", "bookworm")
    assert inv.has_package_database and len(inv.packages) > 80
    assert (
        JsonStrictValidator(SchemaVersion.from_version(doc["specVersion"])).validate_str(
            data.decode()
        )
        is None
    )
    broken = json.dumps({**doc, "components": [{"name": "x"}]})  # no type: invalid
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(broken) is not None
    spdx, _ = image_sbom(python311, "spdx-json")
    spdx_doc = json.loads(spdx)
    assert spdx_doc["spdxVersion"].startswith("SPDX-2.")
    assert any(p["name"] == "libc6" and p.get("versionInfo") for p in spdx_doc["packages"])
    with pytest.raises(UsageError, match="cyclonedx-json or spdx-json"):
        image_sbom(python311, "xml")


def test_sbom_cli(python311: str, tmp_path: Path) -> None:
    out = tmp_path / "bom.json"
    r = cli("image", "sbom", python311, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert b"python:3.11:" in r.stderr and b"deb" in r.stderr
    assert json.loads(out.read_text())["bomFormat"] == "CycloneDX"


def test_sbom_of_python_and_npm_packages(mixed_image: str) -> None:
    inv = image_inventory(mixed_image)
    found = {(p.type, p.name, p.version) for p in inv.packages}
    assert ("python", "tbx-demo", "1.0rc1") in found  # syft normalises the name
    assert ("npm", "tbx-left-pad", "2.0.0") in found
    purls = {p.purl for p in inv.packages}
    assert "pkg:pypi/tbx-demo@1.0rc1" in purls and "pkg:npm/tbx-left-pad@2.0.0" in purls


def test_an_image_without_a_package_database_gets_an_empty_sbom_said_plainly(
    store: ImageStore, tmp_path: Path
) -> None:
    if which("buildah") is None or os.geteuid() != 0:
        pytest.skip("buildah (as root) missing")
    host_status = tmp_path / "host-status"  # what a symlink in the image points at on the host
    host_status.write_text(
        "Package: host-only-package\nStatus: install ok installed\n"
        "Version: 1.0\nArchitecture: all\n"
    )
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "hello.txt").write_text("no packages here\n")
    (ctx / "Dockerfile").write_text(
        "FROM busybox AS links\n"
        f"RUN mkdir -p /var/lib/dpkg && ln -s {host_status} /var/lib/dpkg/status\n"
        "FROM scratch\nCOPY hello.txt /hello.txt\nCOPY --from=links /var /var\n"
    )
    build_image(BuildOptions(ctx, "tbtest-empty:1"))
    try:
        data, inv = image_sbom("tbtest-empty:1")
        assert inv.packages == [] and not inv.has_package_database
        assert "no package database" in inv.plainly() and "lists no packages" in inv.plainly()
        assert json.loads(data).get("components", []) == []
        assert b"host-only-package" not in data  # the image's link was never followed out
        r = cli("image", "sbom", "tbtest-empty:1")
        assert r.returncode == 0 and b"the SBOM lists no packages" in r.stderr
        report = scan_image("tbtest-empty:1")
        assert report.findings == [] and report.packages == 0
    finally:
        store.remove("tbtest-empty:1")


# ---------------------------------------------------------------- scans


def test_debian_security_suite_finds_pending_fixes(debian: str) -> None:
    """debian:bookworm is bootstrapped from the release without its updates: the
    security suite names packages with a fix pending, with CVE ids from the changelog."""
    report = scan_image(debian)
    source = next(s for s in report.sources if s.name.startswith("debian"))
    assert source.used, f"the security suite was not checked: {source.detail}"
    assert source.date and "Debian packages compared" in source.detail
    sec = [f for f in report.findings if f.source == "debian-security"]
    if not sec:
        # possible right after a point release: the report must say so, with numbers
        assert "0 with a security update pending" in source.detail
        return
    for f in sec:
        assert compare("Debian", f.installed, f.fixed or "") == -1
        assert f.severity == "unknown" and f.advisory_id.startswith("bookworm-security:")
    assert any(f.aliases and all(a.startswith("CVE-") for a in f.aliases) for f in sec)


def test_scan_with_osv_db_every_ecosystem(python311: str, mixed_image: str) -> None:
    report = scan_image(python311, db_path=OSV_DIR)
    osv = {(f.advisory_id, f.package) for f in report.findings if f.source == "osv"}
    # TBX-TEST-DEB-1 names the source package python3.11: every binary built from it
    assert ("TBX-TEST-DEB-1", "python3.11") in osv and (
        "TBX-TEST-DEB-1",
        "libpython3.11-stdlib",
    ) in osv
    assert not [f for f in report.findings if f.advisory_id == "TBX-TEST-DEB-2"]
    osv_src = next(s for s in report.sources if s.name.startswith("OSV"))
    assert "feed dated 2026-05-06T07:08:09Z" in osv_src.detail
    mixed = scan_image(mixed_image, db_path=OSV_DIR)
    got = {(f.advisory_id, f.package, f.installed, f.fixed, f.severity) for f in mixed.findings}
    assert ("TBX-TEST-PYPI-1", "tbx-demo", "1.0rc1", "1.0", "medium") in got
    assert ("TBX-TEST-NPM-1", "tbx-left-pad", "2.0.0", None, "critical") in got
    assert "debian" in mixed.sources[0].name and not mixed.sources[0].used


def test_scan_reports_and_fail_on(mixed_image: str, tmp_path: Path) -> None:
    r = cli("image", "scan", mixed_image, "--db", str(OSV_DIR))
    assert r.returncode == 0, r.stderr
    table = r.stdout.decode()
    assert table.index("CRITICAL (1)") < table.index("MEDIUM (1)")  # grouped by severity
    assert "TBX-TEST-NPM-1" in table and "feed dated 2026-05-06T07:08:09Z" in table
    assert (
        cli("image", "scan", mixed_image, "--db", str(OSV_DIR), "--fail-on", "critical").returncode
        == 1
    )
    assert cli("image", "scan", mixed_image, "--fail-on", "low").returncode == 0  # no --db: nothing
    r = cli("image", "scan", mixed_image, "--db", str(OSV_DIR), "--format", "json")
    doc = json.loads(r.stdout)
    assert doc["summary"]["critical"] == 1 and doc["summary"]["medium"] == 1
    assert {"advisory_id", "package", "installed", "fixed", "severity"} <= set(doc["findings"][0])
    r = cli("image", "scan", mixed_image, "--db", str(OSV_DIR), "--format", "sarif")
    log = json.loads(r.stdout)
    schema = json.loads((DATA / "sarif-schema-2.1.0.json").read_text())
    assert list(jsonschema.Draft4Validator(schema).iter_errors(log)) == []
    assert {res["ruleId"] for res in log["runs"][0]["results"]} == {
        "TBX-TEST-NPM-1",
        "TBX-TEST-PYPI-1",
    }
    r = cli("image", "scan", mixed_image, "--fail-on", "severe")
    assert r.returncode == 2
    r = cli("image", "scan", mixed_image, "--db", str(tmp_path / "nope"))
    assert r.returncode == 2 and b"no such file" in r.stderr


class _Unreachable(DebianSecurity):
    """The security suite on a mirror nobody serves (a closed port on loopback)."""

    def security_uri(self, suite: str) -> str:
        return "http://127.0.0.1:9/debian-security"


def test_an_unreachable_security_mirror_is_said_not_hidden(debian: str, tmp_path: Path) -> None:
    inv = image_inventory(debian)
    report = scan_inventory(inv, debian=_Unreachable(tmp_path / "never-fetched"))
    source = report.sources[0]
    assert not source.used and source.detail.startswith("not checked: no bookworm-security index")
    assert report.unchecked.get("deb") == len(inv.packages)  # said, not silently passed
    assert "not checked by any source" in report.table()
    # a copy fetched earlier is used when a refresh fails, and the report says so
    cache = tmp_path / "fetched"
    DebianSecurity(cache).index("bookworm", inv.arch or "amd64")
    stale = scan_inventory(inv, debian=_Unreachable(cache, max_age_s=0))
    assert stale.sources[0].used
    assert any("could not refresh the bookworm-security index" in n for n in stale.notes)
