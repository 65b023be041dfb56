"""HPACK (RFC 7541) for the proxy: a decoder with caches and a stateless encoder.

gRPC clients send nearly the same header block on every call of a connection, so
the decoder caches whole decoded blocks, keyed by the block bytes and valid while
the dynamic table has not changed since (a block that inserts into the table is
never cached). Huffman-coded strings are cached by their coded bytes, so a fresh
``grpc-timeout`` costs one dictionary lookup, not a Huffman walk.

The encoder never inserts into the peer's dynamic table: every field is either a
static-table index or a literal "without indexing". It is therefore stateless and
shared by every connection; encoded fields and whole blocks are cached.
"""

from __future__ import annotations

from collections import deque

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

Header = tuple[bytes, bytes]
Headers = tuple[Header, ...]

STATIC: tuple[Header, ...] = tuple(HeaderTable.STATIC_TABLE)
_N_STATIC = len(STATIC)
_STATIC_FULL = {h: i + 1 for i, h in reversed(list(enumerate(STATIC)))}
_STATIC_NAME = {h[0]: i + 1 for i, h in reversed(list(enumerate(STATIC)))}

#: largest decoded header list (RFC 7541 size: name + value + 32 per field) we accept
MAX_HEADER_LIST = 65536
#: caches are cleared when they reach these sizes (client-chosen values must not grow memory)
_MAX_BLOCKS = 512
_MAX_STRINGS = 4096
_MAX_ENCODED = 4096


class HpackError(Exception):
    """The peer sent a header block we cannot decode: a connection error (COMPRESSION_ERROR)."""


def _int(buf: bytes, i: int, prefix_bits: int) -> tuple[int, int]:
    mask = (1 << prefix_bits) - 1
    value = buf[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    n = len(buf)
    while True:
        if i >= n or shift > 28:
            raise HpackError("truncated or oversized integer")
        b = buf[i]
        i += 1
        value += (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


class Decoder:
    """One per connection direction (the peer's encoder state)."""

    __slots__ = ("_blocks", "_strings", "dynamic", "generation", "max_allowed", "max_size", "size")

    def __init__(self, max_table_size: int = 4096) -> None:
        self.dynamic: deque[Header] = deque()
        self.size = 0
        self.max_size = max_table_size
        #: what we advertised in SETTINGS_HEADER_TABLE_SIZE
        self.max_allowed = max_table_size
        #: bumped on every change of the dynamic table
        self.generation = 0
        self._blocks: dict[bytes, tuple[int, Headers]] = {}
        self._strings: dict[bytes, bytes] = {}

    def decode(self, block: bytes) -> Headers:
        """The header list of one complete block (HEADERS + CONTINUATION payloads joined)."""
        hit = self._blocks.get(block)
        if hit is not None and hit[0] == self.generation:
            return hit[1]
        gen = self.generation
        try:
            headers = self._decode(block)
        except IndexError as exc:
            raise HpackError("truncated header block") from exc
        if self.generation == gen and len(block) <= 2048:
            if len(self._blocks) >= _MAX_BLOCKS:
                self._blocks.clear()
            self._blocks[block] = (gen, headers)
        return headers

    def _get(self, index: int) -> Header:
        if 0 < index <= _N_STATIC:
            return STATIC[index - 1]
        j = index - _N_STATIC - 1
        if index <= 0 or j >= len(self.dynamic):
            raise HpackError(f"header index {index} out of range")
        return self.dynamic[j]

    def _string(self, buf: bytes, i: int) -> tuple[bytes, int]:
        huff = buf[i] & 0x80
        length, i = _int(buf, i, 7)
        end = i + length
        if end > len(buf):
            raise HpackError("truncated string literal")
        raw = buf[i:end]
        if not huff:
            return raw, end
        s = self._strings.get(raw)
        if s is None:
            try:
                s = decode_huffman(raw)
            except Exception as exc:  # hpack raises its own HPACKDecodingError
                raise HpackError(f"bad Huffman string: {exc}") from exc
            if len(self._strings) >= _MAX_STRINGS:
                self._strings.clear()
            self._strings[raw] = s
        return s, end

    def _insert(self, h: Header) -> None:
        self.generation += 1
        n = len(h[0]) + len(h[1]) + 32
        self.dynamic.appendleft(h)
        self.size += n
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size and self.dynamic:
            old = self.dynamic.pop()
            self.size -= len(old[0]) + len(old[1]) + 32

    def _literal(self, buf: bytes, i: int, prefix_bits: int) -> tuple[Header, int]:
        """A literal field: name by index (or literal), then a literal value."""
        idx, i = _int(buf, i, prefix_bits)
        if idx:
            name = self._get(idx)[0]
        else:
            name, i = self._string(buf, i)
        value, i = self._string(buf, i)
        return (name, value), i

    def _decode(self, buf: bytes) -> Headers:
        out: list[Header] = []
        i, n = 0, len(buf)
        budget = MAX_HEADER_LIST
        while i < n:
            b = buf[i]
            if b & 0x80:  # indexed field
                idx, i = _int(buf, i, 7)
                h = self._get(idx)
            elif b & 0x40:  # literal with incremental indexing
                h, i = self._literal(buf, i, 6)
                self._insert(h)
            elif b & 0x20:  # dynamic table size update
                size, i = _int(buf, i, 5)
                if size > self.max_allowed:
                    raise HpackError(f"table size update {size} over the advertised {self.max_allowed}")
                self.generation += 1
                self.max_size = size
                self._evict()
                continue
            else:  # literal without indexing (0x00) / never indexed (0x10)
                h, i = self._literal(buf, i, 4)
            out.append(h)
            budget -= len(h[0]) + len(h[1]) + 32
            if budget < 0:
                raise HpackError(f"header list over {MAX_HEADER_LIST} bytes")
        return tuple(out)


def _enc_int(value: int, prefix_bits: int, first: int) -> bytes:
    mask = (1 << prefix_bits) - 1
    if value < mask:
        return bytes((first | value,))
    out = bytearray((first | mask,))
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _enc_str(s: bytes) -> bytes:
    return _enc_int(len(s), 7, 0) + s


_fields: dict[Header, bytes] = {}
_blocks: dict[Headers, bytes] = {}


def encode_field(h: Header) -> bytes:
    """One field: a static index, or a literal without indexing (name indexed when static)."""
    e = _fields.get(h)
    if e is not None:
        return e
    idx = _STATIC_FULL.get(h)
    if idx is not None:
        e = _enc_int(idx, 7, 0x80)
    else:
        nidx = _STATIC_NAME.get(h[0])
        e = (_enc_int(nidx, 4, 0) if nidx is not None else b"\x00" + _enc_str(h[0])) + _enc_str(h[1])
    if len(_fields) >= _MAX_ENCODED:
        _fields.clear()
    _fields[h] = e
    return e


def encode(headers: Headers) -> bytes:
    """A header block for ``headers`` (cached per header tuple)."""
    e = _blocks.get(headers)
    if e is not None:
        return e
    e = b"".join([encode_field(h) for h in headers])
    if len(_blocks) >= _MAX_ENCODED:
        _blocks.clear()
    _blocks[headers] = e
    return e
