"""The one tar reader of an import: every header parsed once, bounded, and written back canonically.

Two tar readers can disagree about one archive (PAX records against the ustar
name, global PAX headers, GNU long names, base-256 sizes, sparse maps, data
behind a symlink header, a bad checksum one reader stops at and another skips).
So an image layer is parsed exactly once, by Python's :mod:`tarfile`; each
entry is bounded and checked (:class:`~tierbox.images.safety.TarScanner`) and
then re-serialised as a plain PAX tar that only says what was checked. umoci
unpacks that copy, never the original.

Bounds hold while streaming, before anything reaches the disk: the entry count
and the unpacked size (from headers; sparse files count at their real size)
across all layers of an import (:class:`ImportLimits`), the header blocks of
any one entry (:data:`MAX_HEADER_BYTES`), and the decompressed tar stream.

Why this is written by hand: no maintained tool re-serialises a tar stream from
a parse it also exposes for checking; umoci and skopeo read with Go's
archive/tar, which is exactly the second parser to keep out of the decision.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import re
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, Protocol

from tierbox.errors import ImageError, NotTarError, UnsafeImageError, UsageError
from tierbox.images.safety import TarScanner, image_xattrs

DEFAULT_MAX_UNPACKED_BYTES = 8 << 30
DEFAULT_MAX_ENTRIES = 1_000_000
#: The header blocks of one entry (ustar, PAX records, GNU long names, sparse map).
MAX_HEADER_BYTES = 1 << 20
#: How much a tar stream may exceed its files' sizes per entry: headers and padding.
_STREAM_SLACK_PER_ENTRY_BYTES = 4 << 10
_COPY_CHUNK_BYTES = 1 << 20
_GLOBAL_PAX_KEYS_ALLOWED = frozenset({"comment"})  # what `git archive` writes

_MAGIC = {
    "gzip": b"\x1f\x8b",
    "bzip2": b"BZh",
    "xz": b"\xfd7zXZ\x00",
    "zstd": b"\x28\xb5\x2f\xfd",
}

# CPython before 3.11.10/3.12.6 parses PAX records with regular expressions that
# take quadratic time on long digit runs (CVE-2024-6232); the fix added this name.
_PAX_PARSER_FIXED = hasattr(tarfile, "_header_length_prefix_re")
_PAX_RECORD_START = re.compile(rb"([0-9]{1,20}) ")
_LONG_DIGIT_RUN = re.compile(rb"[0-9]{33}")

_DECODE_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, lzma.LZMAError, zlib.error)


class Readable(Protocol):
    """Anything with ``read(size)``: a file, a tar member, a decompressor, a hashing reader."""

    def read(self, size: int = -1, /) -> bytes: ...


class Writable(Protocol):
    """Anything with ``write(data)``: a file, a gzip stream, a hashing writer."""

    def write(self, data: bytes, /) -> object: ...


def _human(n_bytes: int) -> str:
    if n_bytes >= 1 << 30:
        return f"{n_bytes / (1 << 30):.1f} GiB"
    return f"{n_bytes >> 20} MiB" if n_bytes >= 1 << 20 else f"{n_bytes >> 10} KiB"


@dataclass(frozen=True)
class ImportLimits:
    """Bounds on one import, summed over all its layers."""

    max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES
    max_entries: int = DEFAULT_MAX_ENTRIES

    def __post_init__(self) -> None:
        for field, value in (
            ("max_unpacked_bytes", self.max_unpacked_bytes),
            ("max_entries", self.max_entries),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{field} must be a whole number of at least 1, not {value!r}")

    @property
    def max_stream_bytes(self) -> int:
        """What a decompressed tar stream may hold: the files plus headers and padding."""
        return self.max_unpacked_bytes + self.max_entries * _STREAM_SLACK_PER_ENTRY_BYTES


class Tally:
    """Entries and unpacked bytes read so far by one import; refuses past the limits."""

    def __init__(self, limits: ImportLimits | None) -> None:
        self.limits = limits
        self.entries = 0
        self.unpacked_bytes = 0

    def count(self, member: tarfile.TarInfo, where: str, *, sized: bool) -> None:
        """Count one entry and, if ``sized``, its size (a sparse file at its real size)."""
        self.entries += 1
        if sized and member.isreg():
            self.unpacked_bytes += member.size
        limits = self.limits
        if limits is None:
            return
        if self.entries > limits.max_entries:
            raise UnsafeImageError(
                f"{where}: more than {limits.max_entries:,} entries in the archive and its "
                "layers; refusing it (raise the limit with --max-entries if the image is trusted)"
            )
        if self.unpacked_bytes > limits.max_unpacked_bytes:
            raise UnsafeImageError(
                f"{where}: entry {member.name!r} ({member.size:,} bytes) takes the image past "
                f"{limits.max_unpacked_bytes:,} bytes ({_human(limits.max_unpacked_bytes)}) "
                "unpacked; refusing it (raise the limit with --max-unpacked-size if the image "
                "is trusted)"
            )


class TarStream:
    """The file object tarfile reads: bounds header reads, counts bytes, allows short look-backs.

    Before each header the caller calls :meth:`start_header`; until
    :meth:`start_data`, reads may not pass :data:`MAX_HEADER_BYTES` and are kept
    so that a header can be looked at before tarfile parses it. A source that
    is not seekable (a decompressor) can seek back only within those bytes.
    """

    def __init__(
        self, source: Any, where: str, *, seekable: bool, max_bytes: int | None = None
    ) -> None:
        self._src = source
        self.where = where
        self._seekable = seekable
        self._max_bytes = max_bytes
        self._pos = 0
        self._pulled = 0  # bytes taken from a non-seekable source
        self._window = bytearray()  # the last bytes pulled, while reading a header
        self._header_start: int | None = 0  # header mode from the start: tarfile.open reads one

    def start_header(self) -> None:
        self._header_start = self._pos
        if self._pos == self._pulled:
            self._window.clear()

    def start_data(self) -> None:
        self._header_start = None

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            raise ValueError("TarStream.read needs a size")
        start = self._header_start
        if start is not None and self._pos + size > start + MAX_HEADER_BYTES:
            raise UnsafeImageError(
                f"{self.where}: the header of the entry at byte {start:,} takes more than "
                f"{MAX_HEADER_BYTES:,} bytes (PAX records, long names or a sparse map); refusing it"
            )
        if self._seekable:
            data: bytes = self._src.read(size)
            self._pos += len(data)
            return data
        out = b""
        if self._pos < self._pulled:
            begin = len(self._window) - (self._pulled - self._pos)
            out = bytes(self._window[begin : begin + size])
            self._pos += len(out)
            size -= len(out)
        if size > 0:
            data = self._pull(size)
            self._pos += len(data)
            out += data
        return out

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self._pos
        elif whence != 0:
            raise ValueError("TarStream seeks from the start or the current position only")
        if self._seekable:
            self._pos = self._src.seek(pos)
        elif pos <= self._pulled:
            if pos < self._pulled - len(self._window):
                raise ImageError(f"{self.where}: tar stream seeks back out of reach (to {pos})")
            self._pos = pos
        else:
            self._pos = self._pulled
            while self._pos < pos and (data := self._pull(min(pos - self._pos, _COPY_CHUNK_BYTES))):
                self._pos += len(data)
        return self._pos

    def _pull(self, size: int) -> bytes:
        """Up to ``size`` new bytes from the source; kept in the window while reading a header."""
        chunks: list[bytes] = []
        need = size
        while need > 0 and (chunk := self._src.read(need)):
            chunks.append(chunk)
            need -= len(chunk)
        data = b"".join(chunks)
        self._pulled += len(data)
        if self._max_bytes is not None and self._pulled > self._max_bytes:
            raise UnsafeImageError(
                f"{self.where}: the tar stream is longer than {self._max_bytes:,} bytes "
                "(its files plus headers at the import's limits); refusing it"
            )
        if self._header_start is not None:
            self._window += data
        elif self._window:
            self._window.clear()
        return data


def _check_pax_records(block: bytes, where: str) -> None:
    """Refuse a PAX header whose records are not framed as POSIX says (``LEN KEY=VALUE\\n``).

    Framed records are parsed in linear time by every CPython; on interpreters
    without the CVE-2024-6232 fix long digit runs are refused as well.
    """
    pos = 0
    while pos < len(block) and block[pos] != 0:
        match = _PAX_RECORD_START.match(block, pos)
        end = pos + int(match.group(1)) if match else 0
        if (
            match is None
            or end - pos < 5
            or end > len(block)
            or block[end - 1] != 0x0A
            or b"=" not in block[match.end() : end]
            or block[match.end()] == ord("=")
        ):
            raise UnsafeImageError(f"{where}: malformed PAX header record at byte {pos}")
        pos = end
    if not _PAX_PARSER_FIXED and _LONG_DIGIT_RUN.search(block):
        raise UnsafeImageError(
            f"{where}: a PAX header holds a run of more than 32 digits, which this Python's "
            "tarfile parses in quadratic time (CVE-2024-6232); import it with Python >= 3.11.10"
        )


class _CheckedTarInfo(tarfile.TarInfo):
    """tarfile's own parser, with each PAX header's framing checked before it is parsed."""

    def _proc_pax(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        stream = tar.fileobj
        assert isinstance(stream, TarStream)
        start = stream.tell()
        block = stream.read(-(-self.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
        stream.seek(start)
        _check_pax_records(block, stream.where)
        parsed: tarfile.TarInfo = super()._proc_pax(tar)  # type: ignore[misc]
        return parsed


def open_tar(stream: TarStream, where: str) -> tarfile.TarFile:
    """Open ``stream`` for reading with the checked parser; NotTarError when it is no tar."""
    try:
        fileobj: Any = stream
        return tarfile.TarFile(fileobj=fileobj, mode="r", tarinfo=_CheckedTarInfo)
    except tarfile.ReadError as exc:
        raise NotTarError(f"{where} is not a tar archive ({exc})") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{where} cannot be read: {exc}") from exc


@contextmanager
def decoding_errors(where: str) -> Iterator[None]:
    """Translate what a corrupt tar or compressed stream raises into ImageError."""
    try:
        yield
    except RecursionError as exc:
        raise UnsafeImageError(f"{where}: tar headers nest too deeply; refusing it") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{where} is corrupt: {exc}") from exc


def members(
    tar: tarfile.TarFile, stream: TarStream, where: str, tally: Tally, *, sized: bool = True
) -> Iterator[tarfile.TarInfo]:
    """Each entry of ``tar``, its header bounded, checked for ambiguity and counted.

    The caller may read the entry's data before asking for the next one; what
    it leaves unread is skipped. The end of the archive is checked too.
    ``sized`` counts file sizes toward the unpacked bytes (layers, not the
    outer archive, whose files are the layers).
    """
    first = True
    while True:
        with decoding_errors(where):
            if not first:
                stream.seek(tar.offset)  # skip unread data outside the header bound
                stream.start_header()
            first = False
            member = tar.next()
        if member is None:
            break
        loaded: list[tarfile.TarInfo] = tar.members  # type: ignore[attr-defined]
        loaded.clear()  # nothing looks entries up by name; keeps memory flat
        stream.start_data()
        if tar.offset <= member.offset:  # a negative stored size: the parse would loop
            raise UnsafeImageError(f"{where}: entry {member.name!r} leads the reader backwards")
        _check_header(tar, member, where)
        tally.count(member, where, sized=sized)
        yield member
    _check_end(tar, stream, where)
    stream.start_data()


def _check_header(tar: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> None:
    """Refuse headers that tar readers interpret differently."""
    extra = set(tar.pax_headers) - _GLOBAL_PAX_KEYS_ALLOWED
    if extra:
        raise UnsafeImageError(
            f"{where}: a global PAX header sets {', '.join(sorted(extra))}; tar readers "
            "disagree on whether it applies to later entries, so it is refused"
        )
    if member.size < 0 or member.uid < 0 or member.gid < 0:
        raise UnsafeImageError(f"{where}: entry {member.name!r} has a negative size or owner")
    if not member.isreg() and member.size:
        raise UnsafeImageError(
            f"{where}: entry {member.name!r} is not a regular file but its header carries "
            f"{member.size:,} bytes of data; tar readers disagree on it, so it is refused"
        )
    if member.sparse is not None:
        _check_sparse_map(member, where)


def _check_sparse_map(member: tarfile.TarInfo, where: str) -> None:
    """Data regions must be in order, apart, and inside the file (tarfile loops otherwise).

    Empty regions are padding (old GNU headers always hold four) and are skipped.
    """
    end = 0
    regions: Any = member.sparse
    for offset, length in regions:
        if offset < 0 or length < 0 or offset + length > member.size:
            raise UnsafeImageError(f"{where}: entry {member.name!r} has a malformed sparse map")
        if length == 0:
            continue
        if offset < end:
            raise UnsafeImageError(f"{where}: entry {member.name!r} has overlapping sparse data")
        end = offset + length


def _check_end(tar: tarfile.TarFile, stream: TarStream, where: str) -> None:
    """tarfile stops at a zero block or at a bad checksum; other readers go on after the latter."""
    with decoding_errors(where):
        stream.seek(tar.offset)
        tail = stream.read(2 * tarfile.BLOCKSIZE)
    if tail.strip(b"\0"):
        raise UnsafeImageError(
            f"{where}: the tar header at byte {tar.offset:,} is corrupt (bad checksum) or the "
            "archive goes on after its end marker; other tar readers would read on, so it "
            "is refused"
        )


class _Chain:
    """Reads ``head`` and then ``rest``: lets the compression be sniffed off a stream."""

    def __init__(self, head: bytes, rest: Readable) -> None:
        self._head = head
        self._rest = rest

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._rest.read(size)
        if size < 0:
            out, self._head = self._head + self._rest.read(), b""
            return out
        out, self._head = self._head[:size], self._head[size:]
        return out if len(out) == size else out + self._rest.read(size - len(out))


def compression(head: bytes) -> str | None:
    """``gzip``, ``bzip2``, ``xz`` or ``zstd`` from a stream's first six bytes; None for none."""
    for kind, magic in _MAGIC.items():
        if head.startswith(magic):
            return kind
    return None


def decompressed(raw: Readable, where: str) -> IO[bytes]:
    """``raw`` decompressed by its magic bytes: gzip, bzip2, xz or none; zstd is refused."""
    head = raw.read(6)
    chained: Any = _Chain(head, raw)
    kind = compression(head)
    if kind == "zstd":
        raise ImageError(
            f"{where} is zstd-compressed, which tierbox cannot read: re-export the image "
            "with gzip layers (skopeo copy --dest-compress-format gzip)"
        )
    out: Any = chained
    if kind == "gzip":
        out = gzip.GzipFile(fileobj=chained, mode="rb")
    elif kind == "bzip2":
        out = bz2.BZ2File(chained)
    elif kind == "xz":
        out = lzma.LZMAFile(chained)  # noqa: SIM115 - the caller reads it
    return out  # type: ignore[no-any-return]


class HashingWriter:
    """Passes writes on to ``out`` (if any) and hashes them; tarfile asks it for ``tell``."""

    def __init__(self, out: Writable | None = None) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        if self._out is not None:
            self._out.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        """Nothing is buffered here: every write is passed on at once."""

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def _canonical(member: tarfile.TarInfo, name: str, where: str) -> tarfile.TarInfo:
    """A fresh header saying only what was checked: type, name, link, owner, mode, time, xattrs."""
    info = tarfile.TarInfo(name or ".")
    info.mode = member.mode & 0o7777
    info.uid, info.gid = member.uid, member.gid
    info.uname, info.gname = member.uname, member.gname
    info.mtime = member.mtime
    if member.isreg():
        info.type, info.size = tarfile.REGTYPE, member.size
    elif member.isdir():
        info.type = tarfile.DIRTYPE
    elif member.issym():
        info.type, info.linkname = tarfile.SYMTYPE, member.linkname
    else:
        info.type = tarfile.LNKTYPE
        info.linkname = "/".join(p for p in member.linkname.split("/") if p not in ("", "."))
    info.pax_headers = image_xattrs(member, where)
    return info


def rewrite_layer(
    raw: Readable, out: Writable, *, where: str, scanner: TarScanner, tally: Tally
) -> str:
    """Parse the layer tarball ``raw`` once, check it, write it canonically to ``out``.

    Returns the diff_id (sha256 of the uncompressed canonical tar).
    """
    limits = tally.limits
    max_bytes = limits.max_stream_bytes if limits is not None else None
    with decoding_errors(where):
        source = decompressed(raw, where)
    stream = TarStream(source, where, seekable=False, max_bytes=max_bytes)
    tar = open_tar(stream, where)
    hashed = HashingWriter(out)
    scanner.begin_layer()
    fileobj: Any = hashed
    with tarfile.TarFile(
        fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT, copybufsize=_COPY_CHUNK_BYTES
    ) as dest:
        for member in members(tar, stream, where, tally):
            name = scanner.check(member, where)
            info = _canonical(member, name, where)
            with decoding_errors(where):
                data = tar.extractfile(member) if member.isreg() else None
                dest.addfile(info, data)
    return hashed.digest


def scan_layer(raw: Readable, where: str, scanner: TarScanner) -> None:
    """Check every entry of the layer tarball ``raw`` without writing anything (no size limits)."""
    with decoding_errors(where):
        source = decompressed(raw, where)
    stream = TarStream(source, where, seekable=False)
    tar = open_tar(stream, where)
    scanner.begin_layer()
    for member in members(tar, stream, where, Tally(None)):
        scanner.check(member, where)
