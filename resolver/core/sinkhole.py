"""Answers for blocked names, assembled from bytes.

The SOA that NXDOMAIN and NODATA answers carry sits at the blocking rule's domain (a
compression pointer into the question), names the list in its RNAME
(``<list>.blocked.invalid.``) and uses the list's TTL as its negative TTL (RFC 2308), so a
client caches the refusal exactly as long as the policy says.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

from ..policy.model import RuleSet
from .wire import (
    CLASS_IN,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    TYPE_A,
    TYPE_AAAA,
    TYPE_SOA,
    Query,
    encode_name,
    header,
    pointer,
    response_flags,
    rr,
    soa_rdata,
)

_MNAME: Final = encode_name("blocked.invalid")
_ANSWER_OWNER: Final = pointer(12)  # the question's name
_NULL_A: Final = (b"\x00" * 4,)
_NULL_AAAA: Final = (b"\x00" * 16,)


@lru_cache(maxsize=4096)
def _soa_rdata(list_id: str, ttl: int) -> bytes:
    return soa_rdata(_MNAME, encode_name(f"{list_id}.blocked.invalid"), 1, ttl)


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
            records = rr(pointer(12 + apex), TYPE_SOA, ttl, _soa_rdata(blocklist.id, ttl))
            ns = 1
    if q.edns:
        opt = rule.opt_do if q.do else rule.opt_plain
        return header(q.id, response_flags(q, rcode), 1, an, ns, 1) + q.question + records + opt
    return header(q.id, response_flags(q, rcode), 1, an, ns, 0) + q.question + records
