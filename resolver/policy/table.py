"""A compact set of domain names: open addressing over 64-bit hashes in flat arrays.

A Python dict or set of a million names costs about 100 bytes per name; this table costs
12 bytes per slot (an 8-byte hash and a 4-byte value) at a load factor of at most one half,
so about 24 bytes per name, and a lookup stays one hash and about two probes whatever the
size. Names are not stored: two names whose 64-bit hashes collide would share an entry; at a
million names the chance that any query hits such a collision is about 1e-13 per query.

Keys are lower-case dotted names as bytes (``b"chat.deepseek.com"``); the hash is Python's
own (SipHash, salted per process), so a table lives and dies with its process, or with
processes forked from it (which share the salt: see ``isolated.py``).
"""

from __future__ import annotations

from array import array
from typing import Final

_EMPTY: Final = 0
_MASK64: Final = (1 << 64) - 1


def name_hash(name: bytes) -> int:
    """The table's 64-bit hash of a name (never 0, which marks an empty slot)."""
    return (hash(name) & _MASK64) or 1


class NameTable:
    """Maps names to small integers; built once, then read-only."""

    __slots__ = ("_keys", "_mask", "_values", "count", "depths")

    def __init__(self, expected: int = 0) -> None:
        size = 8
        while size < expected * 2:
            size <<= 1
        self._keys = array("Q", bytes(8 * size))
        self._values = array("I", bytes(4 * size))
        self._mask = size - 1
        self.count = 0
        #: Bit n set when some name has n labels: a lookup can skip the other lengths.
        self.depths = 0

    def _grow(self) -> None:
        keys, values = self._keys, self._values
        size = (self._mask + 1) * 2
        self._keys = array("Q", bytes(8 * size))
        self._values = array("I", bytes(4 * size))
        self._mask = size - 1
        self.count = 0
        for key, value in zip(keys, values, strict=True):
            if key:
                self._put_hash(key, value)

    def _put_hash(self, h: int, value: int) -> int | None:
        keys = self._keys
        mask = self._mask
        i = h & mask
        while True:
            k = keys[i]
            if k == _EMPTY:
                keys[i] = h
                self._values[i] = value
                self.count += 1
                return None
            if k == h:
                return self._values[i]
            i = (i + 1) & mask

    def insert(self, name: bytes, value: int) -> int | None:
        """Insert ``name`` with ``value`` unless present; return the value it already had
        (None when it was not there)."""
        if (self.count + 1) * 2 > self._mask + 1:
            self._grow()
        self.depths |= 1 << (name.count(b".") + 1)
        return self._put_hash(name_hash(name), value)

    def add_many(self, names: list[bytes], value: int) -> list[tuple[bytes, int]]:
        """Insert many names with one value (the bulk path of imports, inlined for speed).

        Returns the names that were already present with another value, and that value,
        for the caller to merge.
        """
        clashes: list[tuple[bytes, int]] = []
        while (self.count + len(names)) * 2 > self._mask + 1:
            self._grow()
        keys = self._keys
        values = self._values
        mask = self._mask
        added = 0
        depths = self.depths
        for name in names:
            depths |= 1 << (name.count(b".") + 1)
            h = (hash(name) & _MASK64) or 1
            i = h & mask
            while True:
                k = keys[i]
                if k == _EMPTY:
                    keys[i] = h
                    values[i] = value
                    added += 1
                    break
                if k == h:
                    if values[i] != value:
                        clashes.append((name, values[i]))
                    break
                i = (i + 1) & mask
        self.count += added
        self.depths = depths
        return clashes

    def replace(self, name: bytes, value: int) -> None:
        """Set the value of a name already in the table."""
        h = name_hash(name)
        keys = self._keys
        mask = self._mask
        i = h & mask
        while keys[i] != h:
            if keys[i] == _EMPTY:
                raise KeyError(name)
            i = (i + 1) & mask
        self._values[i] = value

    def get(self, name: bytes) -> int | None:
        """The value stored for ``name``, or None."""
        h = (hash(name) & _MASK64) or 1
        keys = self._keys
        mask = self._mask
        i = h & mask
        while True:
            k = keys[i]
            if k == h:
                return self._values[i]
            if k == _EMPTY:
                return None
            i = (i + 1) & mask

    def __len__(self) -> int:
        return self.count

    def arrays(self) -> tuple[array[int], array[int]]:
        """The two arrays (hashes, values), to send a built table to another process."""
        return self._keys, self._values

    @staticmethod
    def from_arrays(keys: array[int], values: array[int], count: int, depths: int) -> NameTable:
        """A table from the arrays of :meth:`arrays`, taken as they are (no copy).

        Only valid in a process with the same hash secret as the one that built them: the
        builder process is forked from the server for that reason (see ``isolated.py``).
        """
        size = len(keys)
        if size < 8 or size & (size - 1) or len(values) != size or not 0 <= count <= size // 2:
            raise ValueError("not the arrays of a name table")
        table = NameTable()
        table._keys = keys
        table._values = values
        table._mask = size - 1
        table.count = count
        table.depths = depths
        return table

    @property
    def nbytes(self) -> int:
        """Memory held by the two arrays."""
        return self._keys.itemsize * len(self._keys) + self._values.itemsize * len(self._values)
