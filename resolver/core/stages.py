"""Stage helpers without state: what the pipeline's stages (pipeline.py) compute from a
query or an entry alone."""

from __future__ import annotations

from typing import Final

from .wire import CLASS_ANY, CLASS_IN, RCODE_BADVERS, RCODE_NOTIMP, RCODE_REFUSED, Query


def unsupported(q: Query) -> int:
    """The rcode for a query we do not serve, or 0: NOTIMP for opcodes other than QUERY,
    BADVERS for EDNS versions above 0 (RFC 6891), REFUSED for classes other than IN and
    ANY. (CHAOS, Hesiod and unassigned classes: the upstreams and the lists are about the
    Internet class only. REFUSED says so, RFC 1035 4.1.1, where SERVFAIL would read as a
    failure; Unbound does the same. QCLASS ANY, RFC 1035 3.2.5, is forwarded, as Unbound
    forwards it.)"""
    if q.opcode:
        return RCODE_NOTIMP
    if q.edns_version:
        return RCODE_BADVERS
    if q.qclass != CLASS_IN and q.qclass != CLASS_ANY:
        return RCODE_REFUSED
    return 0


def cache_key(q: Query) -> bytes:
    """The name in lower case, type and class as sent, and the DO and CD bits: an answer
    with DNSSEC records or unchecked data must not reach a client that did not ask."""
    return q.key + q.question[-4:] + _TAILS[q.do + q.do + ((q.flags >> 4) & 1)]


#: The DO and CD bytes of a cache key, by 2 * DO + CD (made once, not per miss).
_TAILS: Final = (b"\x00\x00", b"\x00\x01", b"\x01\x00", b"\x01\x01")
