"""EDNS(0) padding of answers on encrypted transports (RFC 7830, option 12), by the
block-length policy of RFC 8467: a padded answer is a multiple of 468 bytes long, so that
its length says little about the name asked.

Shared by the DoT, DoH and DoQ listeners: a query that carries a padding option gets its
answer padded (RFC 7830 section 4: a responder pads only then); plain UDP and TCP never.
"""

from __future__ import annotations

from typing import Final

from .wire import TYPE_OPT, FormatError, skip_name

OPTION_PADDING: Final = 12
#: RFC 8467 section 4.1: responses padded to a multiple of 468 bytes.
RESPONSE_BLOCK: Final = 468
_MAX_MESSAGE: Final = 65535


def _opt_rdata(data: bytes) -> tuple[int, int] | None:
    """Where the OPT record's RDATA begins and ends in ``data``; None when there is no OPT
    record or the message cannot be read."""
    try:
        if len(data) < 12:
            return None
        qd = (data[4] << 8) | data[5]
        rrs = ((data[6] << 8) | data[7]) + ((data[8] << 8) | data[9])
        ar = (data[10] << 8) | data[11]
        off = 12
        for _ in range(qd if ar else 0):
            off = skip_name(data, off) + 4
        for index in range(rrs + ar if ar else 0):
            off = skip_name(data, off)
            if off + 10 > len(data):
                return None
            rdlen = (data[off + 8] << 8) | data[off + 9]
            if index >= rrs and (data[off] << 8) | data[off + 1] == TYPE_OPT:
                end = off + 10 + rdlen
                return (off + 10, end) if end <= len(data) else None
            off += 10 + rdlen
    except FormatError:
        return None
    return None


def wants_padding(query: bytes) -> bool:
    """The query carries an EDNS padding option (of any length)."""
    if b"\x00\x0c" not in query:  # no call for the usual query
        return False
    found = _opt_rdata(query)
    if found is None:
        return False
    off, end = found
    while off + 4 <= end:
        if (query[off] << 8) | query[off + 1] == OPTION_PADDING:
            return True
        off += 4 + ((query[off + 2] << 8) | query[off + 3])
    return False


def pad_response(answer: bytes, block: int = RESPONSE_BLOCK) -> bytes:
    """``answer`` with a padding option that brings it to a multiple of ``block`` bytes.

    A padding option already there is replaced. An answer without an OPT record (nothing
    to put the option in) or one that would outgrow a DNS message is returned unchanged;
    so is one that cannot be read (the listener sends what the resolver made)."""
    found = _opt_rdata(answer)
    if found is None:
        return answer
    rdata, end = found
    # The options but any padding already there.
    options = bytearray()
    off = rdata
    while off + 4 <= end:
        size = (answer[off + 2] << 8) | answer[off + 3]
        if (answer[off] << 8) | answer[off + 1] != OPTION_PADDING:
            options += answer[off : off + 4 + size]
        off += 4 + size
    rest = answer[end:]
    unpadded = rdata + len(options) + 4 + len(rest)
    fill = -unpadded % block
    if unpadded + fill > _MAX_MESSAGE or len(options) + 4 + fill > 0xFFFF:
        return answer
    options += OPTION_PADDING.to_bytes(2, "big") + fill.to_bytes(2, "big") + bytes(fill)
    return answer[: rdata - 2] + len(options).to_bytes(2, "big") + bytes(options) + rest
