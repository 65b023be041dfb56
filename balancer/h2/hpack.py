"""HPACK (RFC 7541) for the proxy: a decoder with caches and a stateless encoder.

gRPC clients send nearly the same header block on every call of a connection, so
the decoder caches whole decoded blocks, keyed by the block bytes and valid while
the dynamic table has not changed since (a block that inserts into the table is
never cached). Huffman-coded strings are cached by their coded bytes, so a fresh
``grpc-timeout`` costs one dictionary lookup, not a Huffman walk. Every cache is
bounded in bytes, not entries: header values are the client's choice.

The encoder never inserts into the peer's dynamic table: every field is either a
static-table index or a literal "without indexing". It is therefore stateless and
shared by every connection; encoded fields and whole blocks are cached.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

Header = tuple[bytes, bytes]
Headers = tuple[Header, ...]

STATIC: tuple[Header, ...] = tuple(HeaderTable.STATIC_TABLE)
_N_STATIC = len(STATIC)
_STATIC_FULL = {h: i + 1 for i, h in reversed(list(enumerate(STATIC)))}
_STATIC_NAME = {h[0]: i + 1 for i, h in reversed(list(enumerate(STATIC)))}

#: largest decoded header list (RFC 7541 size: name + value + 32 per field) we accept by default
MAX_HEADER_LIST = 65536
#: default byte budgets of a decoder's caches and of the process-wide encoder caches; a cache is
#: cleared when it reaches its budget, and an entry over 1/16 of it is never cached, so values a
#: client chooses cannot grow memory (sizes count the bytes plus ~100 bytes of Python objects)
DECODER_CACHE_BYTES = 64 * 1024
ENCODER_CACHE_BYTES = 4 << 20
_ENTRY = 100
#: dynamic table size updates allowed at the start of one block (RFC 7541 4.2: a decrease, then the size)
_MAX_SIZE_UPDATES = 2


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

    __slots__ = ("_blocks", "_cache_bytes", "_cache_max", "_strings", "dynamic", "generation", "max_allowed",
                 "max_list", "max_size", "size")

    def __init__(self, max_table_size: int = 4096, max_list: int = MAX_HEADER_LIST,
                 cache_bytes: int = DECODER_CACHE_BYTES) -> None:
        self.dynamic: deque[Header] = deque()
        self.size = 0
        self.max_size = max_table_size
        #: what we advertised in SETTINGS_HEADER_TABLE_SIZE
        self.max_allowed = max_table_size
        #: largest decoded header list accepted (what we advertised in SETTINGS_MAX_HEADER_LIST_SIZE)
        self.max_list = max_list
        #: bumped on every change of the dynamic table
        self.generation = 0
        self._blocks: dict[bytes, tuple[int, Headers]] = {}
        self._strings: dict[bytes, bytes] = {}
        #: bytes held by both caches, and their budget
        self._cache_bytes = 0
        self._cache_max = cache_bytes

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
            cost = 2 * len(block) + _ENTRY + sum(len(k) + len(v) + _ENTRY for k, v in headers)
            if self._cache(cost):
                self._blocks[block] = (gen, headers)
        return headers

    def _cache(self, cost: int) -> bool:
        """Room for an entry of ``cost`` bytes (clearing both caches when full); False: do not cache it."""
        budget = self._cache_max
        if cost * 16 > budget:
            return False
        total = self._cache_bytes + cost
        if total > budget:
            self._blocks.clear()
            self._strings.clear()
            total = cost
        self._cache_bytes = total
        return True

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
            if self._cache(len(raw) + len(s) + _ENTRY):
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
        budget = self.max_list
        updates = 0
        while i < n:
            b = buf[i]
            if b & 0x80:  # indexed field
                idx, i = _int(buf, i, 7)
                h = self._get(idx)
            elif b & 0x40:  # literal with incremental indexing
                h, i = self._literal(buf, i, 6)
                self._insert(h)
            elif b & 0x20:  # dynamic table size update: only at the start of a block, at most two
                if out or updates >= _MAX_SIZE_UPDATES:
                    raise HpackError("dynamic table size update after a header field" if out else
                                     f"more than {_MAX_SIZE_UPDATES} dynamic table size updates in one block")
                updates += 1
                start = i
                size, i = _int(buf, i, 5)
                if size > self.max_allowed:
                    raise HpackError(f"table size update {size} over the advertised {self.max_allowed}")
                budget -= i - start  # counted against the header list like any other byte
                self.generation += 1
                self.max_size = size
                self._evict()
                continue
            else:  # literal without indexing (0x00) / never indexed (0x10)
                h, i = self._literal(buf, i, 4)
            out.append(h)
            budget -= len(h[0]) + len(h[1]) + 32
            if budget < 0:
                raise HpackError(f"header list over {self.max_list} bytes")
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
#: bytes held by each encoder cache, and the budget of each (see :func:`set_cache_budget`)
_bytes = {"fields": 0, "blocks": 0}
_budget = ENCODER_CACHE_BYTES


def set_cache_budget(nbytes: int) -> None:
    """The byte budget of each process-wide encoder cache (``limits.header_cache_bytes``); clears them."""
    global _budget
    _budget = nbytes
    _fields.clear()
    _blocks.clear()
    _bytes.update(fields=0, blocks=0)


def _room(name: str, cache: dict[Any, bytes], cost: int) -> bool:
    if cost * 16 > _budget:
        return False
    total = _bytes[name] + cost
    if total > _budget:
        cache.clear()
        total = cost
    _bytes[name] = total
    return True


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
    if _room("fields", _fields, len(h[0]) + len(h[1]) + len(e) + _ENTRY):
        _fields[h] = e
    return e


def encode(headers: Headers) -> bytes:
    """A header block for ``headers`` (cached per header tuple)."""
    e = _blocks.get(headers)
    if e is not None:
        return e
    e = b"".join([encode_field(h) for h in headers])
    if _room("blocks", _blocks, len(e) + _ENTRY + sum(len(k) + len(v) + _ENTRY for k, v in headers)):
        _blocks[headers] = e
    return e
