"""Big-endian fields of DNS wire data read by bytes indexing, for the compiled build.

There, ``data[i]`` is native code (a bounds check and a load) and a tuple of ints that a
function returns is a C struct, where a ``struct.Struct.unpack_from`` call costs about 900
instructions and a tuple with an int object per field more. Interpreted, it is the other
way round: one unpack_from costs less than ten indexings (2.4x). So wire.py reads with
these where :data:`NATIVE` is true, with struct elsewhere.
"""

from __future__ import annotations

from typing import Final

#: Whether this module runs compiled (a C extension, not the .py source).
NATIVE: Final = not __file__.endswith(".py")

#: The six 16-bit words of a DNS header: ID, flags, QD-, AN-, NS- and ARCOUNT.
Header = tuple[int, int, int, int, int, int]
#: TYPE, TTL and RDLENGTH of a resource record's fixed part (CLASS skipped).
Fixed = tuple[int, int, int]


def header_words(data: bytes) -> Header:
    """The header words of ``data`` (at least 12 bytes)."""
    return (
        data[0] << 8 | data[1],
        data[2] << 8 | data[3],
        data[4] << 8 | data[5],
        data[6] << 8 | data[7],
        data[8] << 8 | data[9],
        data[10] << 8 | data[11],
    )


def rr_fixed(data: bytes, off: int) -> Fixed:
    """TYPE, TTL and RDLENGTH of the record whose fixed part starts at ``off`` (10 bytes
    there, which the caller checked)."""
    return (
        data[off] << 8 | data[off + 1],
        data[off + 4] << 24 | data[off + 5] << 16 | data[off + 6] << 8 | data[off + 7],
        data[off + 8] << 8 | data[off + 9],
    )
