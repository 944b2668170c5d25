"""core/octets.py reads the header and record fields struct reads (both builds: the
compiled one reads with octets, the interpreted one with struct)."""

from __future__ import annotations

import random
import struct

from resolver.core import octets


def test_the_fields_read_by_indexing_are_those_struct_reads() -> None:
    rng = random.Random(21)
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(40))
        assert octets.header_words(data) == struct.unpack_from("!6H", data)
        for off in range(0, 30):
            assert octets.rr_fixed(data, off) == struct.unpack_from("!H2xIH", data, off)
    top = bytes([0xFF] * 12)
    assert octets.header_words(top) == (0xFFFF,) * 6
    assert octets.rr_fixed(top[:10], 0) == (0xFFFF, 0xFFFFFFFF, 0xFFFF)
