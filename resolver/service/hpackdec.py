"""HPACK (RFC 7541) decoding of request header blocks, for :mod:`.h2wire`.

``hpack.Decoder`` cost about half of what an HTTP/2 DoH request took after h2 was gone (an
object per field, an integer decoder per byte). This one keeps its dynamic table as
``(name, value)`` string pairs, bounded by our SETTINGS_HEADER_TABLE_SIZE (4,096 bytes), and
remembers the fields of the blocks that do not change the table (a client that indexed
its fields sends the same few bytes for each request), until the table changes. Huffman
strings are decoded by ``hpack``'s table-driven decoder."""

from __future__ import annotations

from collections import deque
from typing import Final

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

#: A field as decoded: name and value, latin-1.
Field = tuple[str, str]

TABLE_SIZE: Final = 4096  # SETTINGS_HEADER_TABLE_SIZE: the default, never changed
_STATIC: Final = tuple(
    (n.decode("latin-1"), v.decode("latin-1")) for n, v in HeaderTable.STATIC_TABLE
)
#: Blocks remembered at once, of at most REMEMBER_BLOCK bytes and fields of at most
#: REMEMBER_LIST (so a connection's at most 48 KB).
_REMEMBERED: Final = 16
REMEMBER_BLOCK: Final = 512
REMEMBER_LIST: Final = 2048


class DecodeError(ValueError):
    """Not HPACK, or over the header list bound (``oversized``)."""

    def __init__(self, why: str, oversized: bool = False) -> None:
        super().__init__(why)
        self.oversized = oversized


class Decoder:
    """One connection's HPACK decoder (the client's encoder's mirror)."""

    def __init__(self, max_list: int) -> None:
        self.max_list = max_list
        self.table: deque[Field] = deque()  # newest first
        self.size = 0
        self.max_size = TABLE_SIZE
        self.known: dict[bytes, tuple[list[Field], int]] = {}

    def decode(self, block: bytes) -> tuple[list[Field], int]:
        """The fields of ``block`` and their size (RFC 9113 section 6.5.2)."""
        known = self.known.get(block)
        if known is not None:
            return known
        changed = False
        fields: list[Field] = []
        total, pos, end = 0, 0, len(block)
        while pos < end:
            byte = block[pos]
            if byte & 0x80:  # indexed
                index, pos = _integer(block, pos, 7)
                field = self._get(index)
            elif byte & 0x40:  # literal, then into the table
                field, pos = self._literal(block, pos, 6)
                self._add(field)
                changed = True
            elif byte & 0x20:  # a table size update, only before the first field
                size, pos = _integer(block, pos, 5)
                if fields or size > TABLE_SIZE:
                    raise DecodeError("a bad dynamic table size update")
                self.max_size = size
                self._evict()
                changed = True
                continue
            else:  # literal, without indexing or never indexed
                field, pos = self._literal(block, pos, 4)
            total += len(field[0]) + len(field[1]) + 32
            if total > self.max_list:
                raise DecodeError("header list over its bound", oversized=True)
            fields.append(field)
        if changed:
            self.known.clear()
        elif end <= REMEMBER_BLOCK and total <= REMEMBER_LIST:
            if len(self.known) >= _REMEMBERED:
                self.known.clear()
            self.known[block] = (fields, total)
        return fields, total

    def _get(self, index: int) -> Field:
        if 0 < index <= 61:
            return _STATIC[index - 1]
        if 61 < index <= 61 + len(self.table):
            return self.table[index - 62]
        raise DecodeError(f"no table entry {index}")

    def _literal(self, block: bytes, pos: int, prefix: int) -> tuple[Field, int]:
        index, pos = _integer(block, pos, prefix)
        if index:
            name = self._get(index)[0]
        else:
            name, pos = _string(block, pos)
        value, pos = _string(block, pos)
        return (name, value), pos

    def _add(self, field: Field) -> None:
        size = len(field[0]) + len(field[1]) + 32
        if size > self.max_size:  # too large: the table empties (RFC 7541 section 4.4)
            self.table.clear()
            self.size = 0
            return
        self.table.appendleft(field)
        self.size += size
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size:
            name, value = self.table.pop()
            self.size -= len(name) + len(value) + 32


def _integer(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """An integer of ``prefix`` bits at ``pos`` (RFC 7541 section 5.1), and the offset after."""
    mask = (1 << prefix) - 1
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    for _ in range(4):  # at most 2**28 more: bigger than anything a bound here allows
        if pos >= len(block):
            break
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise DecodeError("an integer cut short or too large")


def _string(block: bytes, pos: int) -> tuple[str, int]:
    """A string literal at ``pos`` (section 5.2), and the offset after."""
    if pos >= len(block):
        raise DecodeError("a string cut short")
    huffman = block[pos] & 0x80
    size, pos = _integer(block, pos, 7)
    if pos + size > len(block):
        raise DecodeError("a string cut short")
    raw = block[pos : pos + size]
    if huffman:
        try:
            raw = decode_huffman(raw)
        except HPACKDecodingError:
            raise DecodeError("bad Huffman code") from None
    return raw.decode("latin-1"), pos + size
