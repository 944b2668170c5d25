"""Answers built from cache entries, and the last step every answer takes (fit).

``render`` makes a cached reply the answer to one query (its ID, its question's case, its
flags, TTLs as served now or stale); ``fit`` cuts an answer to ANY over UDP down to one
RRset of the real answer (RFC 8482 4.1: no amplification, and the rcode, the aliases and
the signatures stay true) and truncates (TC=1) what does not fit the client's UDP size.
"""

from __future__ import annotations

import math
from typing import Final

from .cache import STALE_TTL, Entry, age_of
from .context import TCP_MAX
from .records import minimal_any, without_extras
from .wire import (
    EDE_STALE,
    FLAG_AD,
    OPT_DO,
    OPT_PLAIN,
    RCODE_SERVFAIL,
    TYPE_ANY,
    Query,
    ede_option,
    header,
    opt_record,
    pack_u32_into,
    response_flags,
    truncate,
)

_STALE_OPTION: Final = ede_option(EDE_STALE, "")
_STALE_PLAIN: Final = opt_record(False, 0, _STALE_OPTION)
_STALE_DO: Final = opt_record(True, 0, _STALE_OPTION)
# Our OPT record by (stale, DO).
_OPTS: Final = {
    (False, False): OPT_PLAIN,
    (False, True): OPT_DO,
    (True, False): _STALE_PLAIN,
    (True, True): _STALE_DO,
}
# SERVFAIL for a client over its share of the in-flight budget, saying why (RFC 8914
# Extended DNS Error 0, Other: none of the registered codes says "busy").
_BUSY_OPTION: Final = ede_option(
    0, "too many queries from this client already waiting for upstreams"
)
_BUSY_OPTS: Final = (opt_record(False, 0, _BUSY_OPTION), opt_record(True, 0, _BUSY_OPTION))


def render(entry: Entry, q: Query, now: float, stale: bool = False, cap: float = 0.0) -> bytes:
    """A cached reply as the answer to ``q``: its ID, its question's case, its flags; or,
    ``stale``, as RFC 8767 serves an expired one (TTL 30, Extended DNS Error 3). With
    ``cap`` (an instant before the entry's end; 0: none), no TTL reaches past it."""
    flags = response_flags(q, entry.rcode)
    if q.do or q.flags & FLAG_AD:
        flags |= entry.flags & FLAG_AD  # RFC 6840 5.8: AD only for clients that ask
    if cap:
        records = _capped_records(entry, now, stale, cap)
    elif stale:
        records = entry.stale_records()
    else:
        records = entry.records(now)
    if q.edns:
        opt = _OPTS[stale, q.do]
        head = header(q.id, flags, 1, entry.an, entry.ns, entry.ar + 1)
        return head + q.question + records + opt
    return header(q.id, flags, 1, entry.an, entry.ns, entry.ar) + q.question + records


def _capped_records(entry: Entry, now: float, stale: bool, cap: float) -> bytes:
    """The entry's records with their TTLs as served at ``now`` (stale: 30 s), none of
    them beyond the floor of the seconds left until ``cap``."""
    left = cap - now
    most = int(left) if left > 0 else 0
    age = age_of(now, entry.stored)
    buf = bytearray(entry.body)
    for off, ttl in zip(entry.ttl_offsets, entry.ttls, strict=True):
        served = STALE_TTL if stale else ttl - age if ttl > age else 0
        pack_u32_into(buf, off, served if served < most else most)
    return bytes(buf)


def tick(change: float, now: float) -> float:
    """Until when an answer whose TTLs next change at ``change`` stays right: at ``now``
    only, when they change right after it (a TTL that is whole seconds from its end is
    one less an instant later)."""
    return change if change > now else math.nextafter(now, math.inf)


def busy(q: Query) -> bytes:
    """SERVFAIL, Extended DNS Error 0 saying why: the client's share of the queries
    waiting for upstreams is used up."""
    flags = response_flags(q, RCODE_SERVFAIL)
    if q.edns:
        return header(q.id, flags, 1, 0, 0, 1) + q.question + _BUSY_OPTS[q.do]
    return header(q.id, flags, 1, 0, 0, 0) + q.question


def fit(answer: bytes, q: Query, limit: int) -> bytes:
    """``answer`` as the client may take it (see the module docstring)."""
    if q.qtype == TYPE_ANY and limit < TCP_MAX:
        answer = minimal_any(answer)  # over UDP (TCP answers get the largest limit)
    if len(answer) <= limit:
        return answer
    # Leave out what may be left out (additional records, the NS RRset beside an answer)
    # before setting TC (RFC 2181 9); only oversized answers pay for this.
    answer = without_extras(answer)
    if len(answer) <= limit:
        return answer
    rcode = answer[3] & 0xF
    opt = opt_record(q.do) if q.edns else b""
    return truncate(q, rcode, answer[3] & FLAG_AD, opt)
