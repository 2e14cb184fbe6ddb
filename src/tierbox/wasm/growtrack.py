"""Counting refused ``memory.grow``, which wasmtime's C API never reports.

A ``memory.grow`` past the Store's memory limit returns -1 to the guest and
nothing to the host: the C API has static store limits only, no limiter
callback. A guest that handles the failure and exits 0 would leave no trace.
So before a module is compiled, every ``memory.grow`` on memory 0 is rewritten
into a call to one function appended to the module, which performs the same
grow and, when it returns -1, updates three appended globals, exported as
:data:`COUNT`, :data:`LAST_PAGES` and :data:`MAX_PAGES` (pages of the size the
guest asked for, current size included). The run reads them afterwards.

Nothing of the module shifts: its new type, function and globals come after
every existing index, and a ``call`` replaces each ``memory.grow`` in place.
Only the bytes of code bodies are re-encoded; wasmtime then validates the
result like any module. A module this rewriter does not fully understand
(GC types, unknown opcodes, custom page sizes, a body that does not decode
to its exact end) is returned unchanged and its runs report growth refusals
as untracked.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Exported globals the rewritten module carries (i64, mutable).
COUNT = "tierbox:memory_grow_refused"
LAST_PAGES = "tierbox:memory_grow_last_pages"
MAX_PAGES = "tierbox:memory_grow_max_pages"
EXPORTS = (COUNT, LAST_PAGES, MAX_PAGES)
#: Part of the compiled-module cache key: bump when the rewrite changes.
VERSION = 1

_MAGIC = b"\0asm\x01\x00\x00\x00"
_TYPE, _IMPORT, _FUNC, _MEMORY, _GLOBAL, _EXPORT, _CODE = 1, 2, 3, 5, 6, 7, 10
#: Canonical order of the known sections (the tag section, 13, sits before globals).
_ORDER = [1, 2, 3, 4, 5, 13, 6, 7, 8, 9, 12, 10, 11]
_I32, _I64 = 0x7F, 0x7E
_REF_WITH_HEAP = (0x63, 0x64)  # (ref null ht) / (ref ht): a heap type follows


class Unsupported(Exception):
    """The module uses something the rewriter does not decode."""


@dataclass(frozen=True)
class Rewrite:
    """The module to compile, and whether its refused growth is counted."""

    data: bytes
    tracked: bool
    sites: int  # memory.grow instructions rewritten
    reason: str = ""


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise Unsupported("truncated")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def u(self) -> int:
        """An unsigned LEB128."""
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 70:
                raise Unsupported("LEB128 too long")

    def skip_leb(self) -> int:
        """Skip a signed or unsigned LEB128; returns its first byte."""
        first = self.byte()
        b = first
        n = 1
        while b & 0x80:
            b = self.byte()
            n += 1
            if n > 10:
                raise Unsupported("LEB128 too long")
        return first

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.data):
            raise Unsupported("truncated")
        self.pos += n

    def name(self) -> bytes:
        n = self.u()
        start = self.pos
        self.skip(n)
        return self.data[start : self.pos]

    def valtype(self) -> None:
        if self.byte() in _REF_WITH_HEAP:
            self.skip_leb()

    def blocktype(self) -> None:
        if self.skip_leb() in _REF_WITH_HEAP:
            self.skip_leb()

    def memarg(self) -> None:
        if self.u() & 0x40:  # multi-memory: a memory index follows
            self.u()
        self.u()

    def limits(self) -> int:
        """Skip limits; returns the flags byte."""
        flags = self.byte()
        self.u()
        if flags & 1:
            self.u()
        if flags & 8:
            raise Unsupported("custom page sizes")
        return flags


def _uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _vec(items: list[bytes]) -> bytes:
    return _uleb(len(items)) + b"".join(items)


# Opcodes by the immediates they carry (core, multi-value, reference types,
# tail calls, typed function references, exceptions, bulk memory, SIMD, threads).
_NONE = {0x00, 0x01, 0x05, 0x0A, 0x0B, 0x0F, 0x19, 0x1A, 0x1B, 0xD1, 0xD3, 0xD4}
_NONE.update(range(0x45, 0xC5))
_BLOCK = {0x02, 0x03, 0x04, 0x06}
_ONE_INDEX = {0x07, 0x08, 0x09, 0x0C, 0x0D, 0x10, 0x12, 0x14, 0x15, 0x18, 0xD2, 0xD5, 0xD6}
_ONE_INDEX.update(range(0x20, 0x27))
_TWO_INDEX = {0x11, 0x13}
_MEMARG = set(range(0x28, 0x3F))
_MISC_IMMEDIATES = {8: 2, 9: 1, 10: 2, 11: 1, 12: 2, 13: 1, 14: 2, 15: 1, 16: 1, 17: 1}


def _scan_body(r: _Reader, end: int) -> list[tuple[int, int]]:
    """Decode one function body's instructions up to ``end``; returns the
    (offset, length) of each ``memory.grow 0``. Raises Unsupported unless the
    body decodes to exactly its last byte, an ``end`` closing the function."""
    for _ in range(r.u()):  # locals
        r.u()
        r.valtype()
    sites: list[tuple[int, int]] = []
    depth = 0
    while r.pos < end:
        at = r.pos
        op = r.byte()
        if op in _NONE:
            if op == 0x0B:
                if depth == 0:
                    if r.pos != end:
                        raise Unsupported("code after the function's end")
                    return sites
                depth -= 1
        elif op in _BLOCK:
            r.blocktype()
            depth += 1
        elif op in _ONE_INDEX:
            r.u()
            if op == 0x18:  # delegate closes its try
                depth -= 1
        elif op in _TWO_INDEX:
            r.u()
            r.u()
        elif op in _MEMARG:
            r.memarg()
        elif op == 0x3F:
            r.u()
        elif op == 0x40:
            if r.u() == 0:
                sites.append((at, r.pos - at))
        elif op in (0x41, 0x42):
            r.skip_leb()
        elif op == 0x43:
            r.skip(4)
        elif op == 0x44:
            r.skip(8)
        elif op == 0x0E:
            for _ in range(r.u() + 1):
                r.u()
        elif op == 0x1C:
            for _ in range(r.u()):
                r.valtype()
        elif op == 0x1F:  # try_table
            r.blocktype()
            for _ in range(r.u()):
                kind = r.byte()
                if kind in (0, 1):
                    r.u()
                elif kind not in (2, 3):
                    raise Unsupported(f"try_table catch kind {kind}")
                r.u()
            depth += 1
        elif op == 0xD0:
            r.skip_leb()
        elif op == 0xFC:
            sub = r.u()
            if sub > 17:
                raise Unsupported(f"opcode 0xfc {sub}")
            for _ in range(_MISC_IMMEDIATES.get(sub, 0)):
                r.u()
        elif op == 0xFD:
            sub = r.u()
            if sub <= 11 or sub in (92, 93):
                r.memarg()
            elif sub in (12, 13):
                r.skip(16)
            elif 21 <= sub <= 34:
                r.skip(1)
            elif 84 <= sub <= 91:
                r.memarg()
                r.skip(1)
        elif op == 0xFE:
            if r.u() == 3:  # atomic.fence
                r.skip(1)
            else:
                r.memarg()
        else:
            raise Unsupported(f"opcode {op:#04x}")
    raise Unsupported("function body without its end")


def _helper(index_type: int, count: int, last: int, largest: int) -> bytes:
    """(func (param idx) (result idx) (local idx i64)): memory.grow, then on -1
    count it and record the size asked for, in pages."""
    is64 = index_type == _I64
    g = _uleb
    extend = b"" if is64 else b"\xad"  # i64.extend_i32_u
    eq = b"\x51" if is64 else b"\x46"  # i64.eq / i32.eq
    code = b"".join(
        [
            b"\x02\x01" + bytes([index_type]) + b"\x01\x7e",  # locals: 1 x idx, 1 x i64
            b"\x20\x00\x40\x00\x22\x01",  # local.get 0; memory.grow 0; local.tee 1
            (b"\x42\x7f" if is64 else b"\x41\x7f") + eq,  # == -1
            b"\x04\x40",  # if
            b"\x23" + g(count) + b"\x42\x01\x7c\x24" + g(count),  # count += 1
            b"\x3f\x00" + extend + b"\x20\x00" + extend + b"\x7c",  # size + delta (pages)
            b"\x22\x02\x24" + g(last),  # local.tee 2; global.set last
            b"\x20\x02\x23" + g(largest) + b"\x56",  # > largest (i64.gt_u)
            b"\x04\x40\x20\x02\x24" + g(largest) + b"\x0b",  # if: largest = it; end
            b"\x0b",  # end if
            b"\x20\x01\x0b",  # local.get 1; end
        ]
    )
    return _uleb(len(code)) + code


def rewrite(data: bytes) -> Rewrite:
    """``data`` with every ``memory.grow 0`` counted; unchanged when it cannot be."""
    try:
        return _rewrite(data)
    except (Unsupported, IndexError) as exc:
        return Rewrite(data, tracked=False, sites=0, reason=str(exc) or type(exc).__name__)


def _rewrite(data: bytes) -> Rewrite:
    if data[:8] != _MAGIC:
        raise Unsupported("not a core Wasm module")
    sections: list[tuple[int, bytes]] = []
    r = _Reader(data, 8)
    while r.pos < len(data):
        sid = r.byte()
        size = r.u()
        start = r.pos
        r.skip(size)
        sections.append((sid, data[start : r.pos]))
    ids = [sid for sid, _ in sections]
    if _CODE not in ids or _TYPE not in ids or _EXPORT not in ids:
        return Rewrite(data, tracked=True, sites=0, reason="no code")

    def content(sid: int) -> bytes:
        return sections[ids.index(sid)][1] if sid in ids else b""

    # types: plain function types only (no GC rec groups), counted
    tr = _Reader(content(_TYPE))
    n_types = tr.u()
    for _ in range(n_types):
        if tr.byte() != 0x60:
            raise Unsupported("non-function type (GC)")
        for _ in range(2):
            for _ in range(tr.u()):
                tr.valtype()
    # imports: functions and globals shift nothing of ours, but count them
    n_funcs = n_globals = 0
    memory_flags: int | None = None
    ir = _Reader(content(_IMPORT))
    for _ in range(ir.u() if _IMPORT in ids else 0):
        ir.name()
        ir.name()
        kind = ir.byte()
        if kind == 0:
            ir.u()
            n_funcs += 1
        elif kind == 1:
            ir.valtype()
            ir.limits()
        elif kind == 2:
            flags = ir.limits()
            if memory_flags is None:
                memory_flags = flags
        elif kind == 3:
            ir.valtype()
            ir.byte()
            n_globals += 1
        elif kind == 4:
            ir.byte()
            ir.u()
        else:
            raise Unsupported(f"import kind {kind}")
    if memory_flags is None and _MEMORY in ids:
        mr = _Reader(content(_MEMORY))
        if mr.u():
            memory_flags = mr.limits()
    if memory_flags is None:
        return Rewrite(data, tracked=True, sites=0, reason="no memory")
    index_type = _I64 if memory_flags & 4 else _I32
    fr = _Reader(content(_FUNC))
    n_defined = fr.u() if _FUNC in ids else 0
    n_defined_globals = _Reader(content(_GLOBAL)).u() if _GLOBAL in ids else 0
    er = _Reader(content(_EXPORT))
    n_exports = er.u()
    for _ in range(n_exports):
        name = er.name()
        if name.decode(errors="replace") in EXPORTS:
            raise Unsupported(f"the module already exports {name!r}")
        er.byte()
        er.u()

    helper_index = n_funcs + n_defined
    call = b"\x10" + _uleb(helper_index)
    cr = _Reader(content(_CODE))
    n_bodies = cr.u()
    if n_bodies != n_defined:
        raise Unsupported("function and code sections disagree")
    bodies: list[bytes] = []
    sites = 0
    for _ in range(n_bodies):
        size = cr.u()
        start = cr.pos
        end = start + size
        found = _scan_body(_Reader(cr.data, start), end)
        cr.pos = end
        if not found:
            bodies.append(_uleb(size) + cr.data[start:end])
            continue
        sites += len(found)
        parts = []
        prev = start
        for at, length in found:
            parts.append(cr.data[prev:at])
            parts.append(call)
            prev = at + length
        parts.append(cr.data[prev:end])
        body = b"".join(parts)
        bodies.append(_uleb(len(body)) + body)
    if not sites:
        return Rewrite(data, tracked=True, sites=0, reason="no memory.grow")

    g_count = n_globals + n_defined_globals
    g_last, g_max = g_count + 1, g_count + 2
    new_type = b"\x60\x01" + bytes([index_type]) + b"\x01" + bytes([index_type])
    new_globals = [b"\x7e\x01\x42\x00\x0b"] * 3  # (mut i64) (i64.const 0)
    new_exports = [
        _uleb(len(name.encode())) + name.encode() + b"\x03" + _uleb(idx)
        for name, idx in zip(EXPORTS, (g_count, g_last, g_max), strict=True)
    ]

    def extended(sid: int, count: int, extra: bytes) -> bytes:
        rest = _Reader(content(sid))
        if sid in ids:
            rest.u()  # the old count, however it was encoded
        return _uleb(count) + rest.data[rest.pos :] + extra

    replaced: dict[int, bytes] = {
        _TYPE: extended(_TYPE, n_types + 1, new_type),
        _FUNC: extended(_FUNC, n_defined + 1, _uleb(n_types)),
        _GLOBAL: extended(_GLOBAL, n_defined_globals + 3, b"".join(new_globals)),
        _EXPORT: extended(_EXPORT, n_exports + 3, b"".join(new_exports)),
        _CODE: _vec([*bodies, _helper(index_type, g_count, g_last, g_max)]),
    }
    if _FUNC not in ids:
        raise Unsupported("code without a function section")
    out = bytearray(_MAGIC)
    pending_globals = _GLOBAL not in ids  # a new global section goes before the first later one
    for sid, body in sections:
        if pending_globals and sid in _ORDER and _ORDER.index(sid) > _ORDER.index(_GLOBAL):
            out += bytes([_GLOBAL]) + _uleb(len(replaced[_GLOBAL])) + replaced[_GLOBAL]
            pending_globals = False
        body = replaced.get(sid, body)
        out += bytes([sid]) + _uleb(len(body)) + body
    return Rewrite(bytes(out), tracked=True, sites=sites)
