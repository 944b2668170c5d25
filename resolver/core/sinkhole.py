"""Answers for blocked names, assembled from bytes.

The SOA that NXDOMAIN and NODATA answers carry sits at the blocking rule's domain (a
compression pointer into the question), names the list in its RNAME
(``<list>.blocked.invalid.``) and uses the list's TTL as its negative TTL (RFC 2308), so a
client caches the refusal exactly as long as the policy says.
"""

from __future__ import annotations

import struct
from typing import Final

from ..policy.model import RuleSet
from .wire import (
    CLASS_IN,
    FLAG_CD,
    FLAG_QR,
    FLAG_RA,
    FLAG_RD,
    OPCODE_MASK,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    TYPE_A,
    TYPE_AAAA,
    TYPE_SOA,
    Query,
    encode_name,
    pointer,
    rr,
    soa_rdata,
)

_HEADER: Final = struct.Struct("!6H")
_U32: Final = struct.Struct("!I")
_ANSWER_FLAGS: Final = FLAG_QR | FLAG_RA
_COPIED_FLAGS: Final = OPCODE_MASK | FLAG_RD | FLAG_CD  # as wire.response_flags copies
_MNAME: Final = encode_name("blocked.invalid")
_ANSWER_OWNER: Final = pointer(12)  # the question's name
_NULL_A: Final = (b"\x00" * 4,)
_NULL_AAAA: Final = (b"\x00" * 16,)


#: The SOA record of a blocked answer, by (list id, TTL, label offset of its owner):
#: made once per distinct such answer, not per query (TTLs are whole seconds of a list's
#: TTL or less, offsets under 255: a few per list in practice).
_SOAS: dict[tuple[str, int, int], bytes] = {}
_SOAS_MAX: Final = 4096


def soa_prefix(list_id: str) -> bytes:
    """The RDATA of a blocked answer's SOA for list ``list_id``, less its last field (the
    negative TTL, which is the answer's TTL)."""
    return soa_rdata(_MNAME, encode_name(f"{list_id}.blocked.invalid"), 1, 0)[:-4]


def _soa(list_id: str, ttl: int, apex: int) -> bytes:
    key = (list_id, ttl, apex)
    record = _SOAS.get(key)
    if record is None:
        if len(_SOAS) >= _SOAS_MAX:
            _SOAS.clear()
        rdata = soa_prefix(list_id) + _U32.pack(ttl)
        record = _SOAS[key] = rr(pointer(12 + apex), TYPE_SOA, ttl, rdata)
    return record


def blocked_answer(q: Query, rule: RuleSet, apex: int, now: float) -> bytes:
    """The answer to ``q``, blocked by ``rule`` at ``now``; the rule named the domain at
    label offset ``apex`` of the question (where the synthetic SOA sits).

    The TTL is the list's, cut so that the answer does not outlive the rule's window.
    """
    blocklist = rule.blocklist
    action = rule.action
    ttl = blocklist.ttl
    left = rule.t2 - now
    if left < ttl:
        ttl = max(0, int(left))
    kind = action.kind
    rcode = RCODE_NOERROR
    records = b""
    an = ns = 0
    if kind == "refused":
        rcode = RCODE_REFUSED
    else:
        addrs: tuple[bytes, ...] = ()
        qtype = q.qtype
        if q.qclass == CLASS_IN and kind in ("null", "sinkhole"):
            if qtype == TYPE_A:
                addrs = _NULL_A if kind == "null" else action.a
                rtype = TYPE_A
            elif qtype == TYPE_AAAA:
                addrs = _NULL_AAAA if kind == "null" else action.aaaa
                rtype = TYPE_AAAA
        if addrs:
            records = b"".join(rr(_ANSWER_OWNER, rtype, ttl, addr) for addr in addrs)
            an = len(addrs)
        else:
            if kind == "nxdomain":
                rcode = RCODE_NXDOMAIN
            records = _soa(blocklist.id, ttl, apex)
            ns = 1
    # (wire.header and wire.response_flags, inline: two calls less for every blocked
    # name that the memo does not answer.)
    flags = _ANSWER_FLAGS | (q.flags & _COPIED_FLAGS) | rcode
    if q.edns:
        opt = rule.opt_do if q.do else rule.opt_plain
        return _HEADER.pack(q.id, flags, 1, an, ns, 1) + q.question + records + opt
    return _HEADER.pack(q.id, flags, 1, an, ns, 0) + q.question + records
