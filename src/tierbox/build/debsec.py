"""Debian's security suite as a vulnerability source, through apt.

No vulnerability feed is reachable from these machines, but Debian's apt
mirrors are: the ``<codename>-security`` suite's package index says which
packages have a security update and to which version, and each update's
``changelog.Debian.gz`` (inside its .deb) names the CVEs it fixes. This
module fetches both with apt itself (``apt-get update`` and ``apt-get
download`` on a private state directory, signatures checked against Debian's
archive keyring) and caches them. What it cannot say, it does not: the index
carries no severity, so these findings have severity ``unknown`` unless an
OSV advisory for the same CVE gives one.
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import gzip
import io
import json
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

from debian import deb822
from debian.changelog import Changelog
from debian.debian_support import Version

from tierbox import paths
from tierbox.errors import CommandError, HostError
from tierbox.host.runner import require, run
from tierbox.images import bootstrap as boot

Progress = Callable[[str], None]

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEFAULT_SECURITY_URI = "http://deb.debian.org/debian-security"
#: An index younger than this is used without asking the mirror again.
MAX_INDEX_AGE_S = 6 * 3600.0
APT_TIMEOUT_S = 300.0
_CVE_RE = re.compile(r"CVE-\d{4}-\d{4,}")
#: Changelog blocks kept per update: enough to cover any image older than the update.
_MAX_BLOCKS = 40
#: At most this many .debs are tried for one update's changelog.
_MAX_DEB_TRIES = 3
_MAX_DEB_BYTES = 256 << 20


class _Block(TypedDict):
    """One changelog entry, as cached."""

    version: str
    urgency: str
    cves: list[str]


@dataclass(frozen=True)
class Update:
    """A package's newest version in the security suite."""

    package: str
    version: str
    source: str
    size_bytes: int


@dataclass
class SecurityIndex:
    """The ``<codename>-security`` index for one architecture."""

    suite: str
    uri: str
    arch: str
    date: str  # the Release file's Date, as written
    fetched_unix: float
    updates: dict[str, Update]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ChangelogFacts:
    """What an update's changelog says for the versions newer than the installed one."""

    cves: tuple[str, ...]
    urgency: str
    note: str = ""


class DebianSecurity:
    """The security suite of Debian releases, fetched with apt into tierbox's cache."""

    def __init__(self, root: Path | None = None, *, max_age_s: float = MAX_INDEX_AGE_S) -> None:
        self.root = root if root is not None else paths.home() / "build" / "debian-security"
        self.max_age_s = max_age_s

    # ----------------------------------------------------------- the index
    def _dirs(self, suite: str, arch: str) -> tuple[Path, Path, Path]:
        base = self.root / f"{suite}_{arch}"
        lists, cache, etc = base / "lists", base / "cache", base / "etc"
        for d in (lists / "partial", cache / "archives" / "partial", etc):
            d.mkdir(parents=True, exist_ok=True)
        return lists, cache, etc

    def _apt_options(self, suite: str, arch: str, uri: str) -> list[str]:
        lists, cache, etc = self._dirs(suite, arch)
        sources = etc / "sources.list"
        line = f"deb [signed-by={KEYRING} arch={arch}] {uri} {suite} main\n"
        if not sources.is_file() or sources.read_text() != line:
            sources.write_text(line)
        return [
            "-o", f"Dir::Etc::SourceList={sources}",
            "-o", f"Dir::Etc::SourceParts={etc / 'sources.list.d'}",
            "-o", f"Dir::State::Lists={lists}",
            "-o", f"Dir::Cache={cache}",
            "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
            "-o", "Debug::NoLocking=1",
            "-o", "Acquire::GzipIndexes=false",
            "-o", "Acquire::Languages=none",
            "-o", "APT::Get::List-Cleanup=false",  # a failed refresh keeps the last good index
            "-o", "APT::Sandbox::User=root",
            "-o", f"APT::Architecture={arch}",
            "-o", f"APT::Architectures::={arch}",
        ]  # fmt: skip

    def security_uri(self, suite: str) -> str:
        """The host's apt source for the security suite (the mirror it already reaches),
        else Debian's."""
        uri = boot.find_mirror(suite)
        # find_mirror falls back to any non-security mirror when no source serves
        # the suite; that mirror does not carry it
        return uri if "security" in uri else DEFAULT_SECURITY_URI

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One apt run at a time on this cache (apt's own locking is off: the lists
        directory is private to tierbox)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def index(
        self, codename: str, arch: str, *, refresh: bool = False, progress: Progress | None = None
    ) -> SecurityIndex:
        """The security index of ``codename`` for ``arch``: fetched when missing, older than
        :data:`MAX_INDEX_AGE_S` or ``refresh``; an older copy is used (and said) when the
        mirror cannot be reached. HostError when there is none at all."""
        with self._locked():
            return self._index(codename, arch, refresh=refresh, progress=progress)

    def _index(
        self, codename: str, arch: str, *, refresh: bool = False, progress: Progress | None = None
    ) -> SecurityIndex:
        say = progress or (lambda _m: None)
        suite = f"{codename}-security"
        uri = self.security_uri(suite)
        options = self._apt_options(suite, arch, uri)
        lists = self._dirs(suite, arch)[0]
        release = _find(lists, f"_dists_{suite}_InRelease")
        notes: list[str] = []
        age = time.time() - release.stat().st_mtime if release is not None else None
        if refresh or age is None or age > self.max_age_s:
            say(f"fetching the {suite} index from {uri} (apt-get update)")
            apt = require("apt-get", "apt")
            try:
                run(
                    [apt, *options, "--error-on=any", "-qq", "update"],
                    timeout_s=APT_TIMEOUT_S,
                    message=f"apt-get could not fetch the {suite} index from {uri}",
                )
            except CommandError as exc:
                if release is None:
                    raise HostError(f"no {suite} index: {exc}") from exc
                notes.append(
                    f"could not refresh the {suite} index ({_first_line(exc)}); "
                    f"using the copy fetched {_ago(age)}"
                )
            release = _find(lists, f"_dists_{suite}_InRelease")
        packages = _find(lists, f"_dists_{suite}_main_binary-{arch}_Packages")
        if release is None or packages is None:
            raise HostError(f"apt fetched no {suite} index for {arch} from {uri}")
        date = ""
        with release.open(errors="replace") as fh:
            for line in fh:
                if line.startswith("Date:"):
                    date = line.split(":", 1)[1].strip()
                    break
        updates: dict[str, Update] = {}
        with packages.open(errors="replace") as fh:
            for para in deb822.Packages.iter_paragraphs(fh, use_apt_pkg=False):
                name, version = para.get("Package"), para.get("Version")
                if not name or not version:
                    continue
                prev = updates.get(name)
                if prev is None or Version(version) > Version(prev.version):
                    source = (para.get("Source") or name).split(" ", 1)[0]
                    updates[name] = Update(name, version, source, int(para.get("Size") or 0))
        return SecurityIndex(suite, uri, arch, date, release.stat().st_mtime, updates, notes)

    # ----------------------------------------------------------- changelogs
    def changelog(
        self, index: SecurityIndex, source: str, version: str, installed: str, prefer: list[str]
    ) -> ChangelogFacts:
        """CVE ids and urgency of the changelog entries of ``source`` newer than
        ``installed`` up to ``version``, read from the update's .deb (cached)."""
        with self._locked():
            blocks = self._blocks(index, source, version, prefer)
        if blocks is None:
            return ChangelogFacts((), "", f"no changelog found in the {source} {version} packages")
        inst = Version(installed)
        cves: list[str] = []
        urgencies: list[str] = []
        for block in blocks:
            if Version(block["version"]) <= inst:
                break
            cves += [c for c in block["cves"] if c not in cves]
            urgencies.append(block["urgency"])
        order = ["low", "medium", "high", "emergency", "critical"]
        urgency = max(urgencies, key=lambda u: order.index(u) if u in order else -1, default="")
        return ChangelogFacts(tuple(cves), urgency)

    def _blocks(
        self, index: SecurityIndex, source: str, version: str, prefer: list[str]
    ) -> list[_Block] | None:
        cache = self.root / "changelogs" / f"{source}_{version}.json"
        if cache.is_file():
            try:
                data = json.loads(cache.read_text())
                return list(data["blocks"])
            except (OSError, ValueError, KeyError):
                cache.unlink(missing_ok=True)
        candidates = [
            u for u in index.updates.values() if u.source == source and u.version == version
        ]
        candidates.sort(key=lambda u: (u.package not in prefer, u.size_bytes))
        for update in candidates[:_MAX_DEB_TRIES]:
            text = self._deb_changelog(index, update)
            if text is None:
                continue
            blocks: list[_Block] = []
            for block in Changelog(text, max_blocks=_MAX_BLOCKS, strict=False):
                body = "\n".join(block.changes())
                blocks.append(
                    {
                        "version": str(block.version),
                        "urgency": (block.urgency or "").lower(),
                        "cves": sorted(set(_CVE_RE.findall(body)), key=body.index),
                    }
                )
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"package": update.package, "blocks": blocks}))
            return blocks
        return None

    def _deb_changelog(self, index: SecurityIndex, update: Update) -> str | None:
        """``usr/share/doc/<pkg>/changelog.Debian.gz`` from the update's .deb, or None
        when that package ships none (its doc directory is a link to another's)."""
        if update.size_bytes > _MAX_DEB_BYTES:
            return None
        apt = require("apt-get", "apt")
        dpkg_deb = require("dpkg-deb", "dpkg")
        options = self._apt_options(index.suite, index.arch, index.uri)
        with tempfile.TemporaryDirectory(prefix="deb-", dir=self.root) as tmp:
            try:
                run(
                    [apt, *options, "-qq", "download", f"{update.package}={update.version}"],
                    cwd=tmp,
                    timeout_s=APT_TIMEOUT_S,
                    message=f"apt-get could not download {update.package} {update.version}",
                )
            except CommandError:
                return None
            debs = list(Path(tmp).glob("*.deb"))
            if not debs:
                return None
            data = run([dpkg_deb, "--fsys-tarfile", str(debs[0])], timeout_s=APT_TIMEOUT_S).stdout
        doc = f"usr/share/doc/{update.package}/"
        # a native package (no Debian revision) ships its Debian changelog as changelog.gz
        names = ["changelog.Debian.gz"] + (["changelog.gz"] if "-" not in update.version else [])
        found: dict[str, bytes] = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name.startswith(doc) and name[len(doc) :] in names and member.isfile():
                    fh = tar.extractfile(member)
                    if fh is not None:
                        found[name[len(doc) :]] = fh.read()
        for name in names:
            if name in found:
                return gzip.decompress(found[name]).decode("utf-8", errors="replace")
        return None


def _find(directory: Path, suffix: str) -> Path | None:
    for p in directory.iterdir():
        if p.name.endswith(suffix) and p.is_file():
            return p
    return None


def _first_line(exc: Exception) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1][:200] if lines else type(exc).__name__


def _ago(age_s: float | None) -> str:
    if age_s is None:
        return "never"
    hours = age_s / 3600
    return f"{hours:.1f} h ago" if hours < 48 else f"{hours / 24:.0f} days ago"


def release_date_unix(date: str) -> float | None:
    """A Release file's Date as a Unix time (None when it does not parse)."""
    try:
        return email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None
