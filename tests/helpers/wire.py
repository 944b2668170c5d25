"""Hand-made DNS packets: a header and a question to build queries from, and every malformed
packet the resolver must refuse cleanly (for the parser tests and the listener tests)."""

from __future__ import annotations

import struct


def header(
    qid: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0
) -> bytes:
    return struct.pack("!6H", qid, flags, qd, an, ns, ar)


QUESTION = b"\x03www\x07example\x04test\x00" + struct.pack("!HH", 1, 1)
OPT = b"\x00" + struct.pack("!HHIH", 41, 4096, 0, 0)

# Every malformed packet the core issue names, and a few more: (id, bytes, outcome).
# outcome: "drop" = no answer possible, "formerr" = FORMERR from the header.
MALFORMED = [
    ("empty", b"", "drop"),
    ("short header", b"\x12\x34\x01", "drop"),
    ("eleven bytes", header()[:11], "drop"),
    ("a response", header(flags=0x8100) + QUESTION, "drop"),
    ("qdcount 0", header(qd=0), "formerr"),
    ("qdcount 2", header(qd=2) + QUESTION + QUESTION, "formerr"),
    ("question cut short", header() + QUESTION[:-3], "formerr"),
    ("name runs past end", header() + b"\x05ab", "formerr"),
    ("label over 63", header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", "formerr"),
    ("extended label type", header() + b"\x41a\x00\x00\x01\x00\x01", "formerr"),
    (
        "name over 255",
        header() + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01",
        "formerr",
    ),
    ("pointer loop to itself", header() + b"\xc0\x0c\x00\x01\x00\x01", "formerr"),
    (
        "pointer loop via a label",
        header() + b"\x01a\xc0\x0c\x00\x01\x00\x01",
        "formerr",
    ),
    ("pointer forward", header() + b"\xc0\x20\x00\x01\x00\x01" + b"\x00" * 30, "formerr"),
    ("pointer past end", header() + b"\xc0", "formerr"),
    ("two OPT records", header(ar=2) + QUESTION + OPT + OPT, "formerr"),
    ("OPT not at root", header(ar=1) + QUESTION + b"\x01x\x00" + OPT[1:], "formerr"),
    ("OPT cut short", header(ar=1) + QUESTION + OPT[:-3], "formerr"),
    (
        "EDNS option overruns OPT",
        header(ar=1) + QUESTION + b"\x00" + struct.pack("!HHIHHH", 41, 4096, 0, 4, 10, 8),
        "formerr",
    ),
    ("arcount beyond data", header(ar=3) + QUESTION + OPT, "formerr"),
]
