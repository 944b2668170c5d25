"""``resolver.arpa``, served locally: Discovery of Designated Resolvers (RFC 9462).

A client that knows this resolver only by its address asks ``_dns.resolver.arpa`` SVCB
(type 64) and learns this resolver's encrypted endpoints: one ServiceMode record per kind
(DoT, DoH, DoQ) and port, SvcPriority 1, 2, ... in that order, TargetName the resolver's
authentication domain name (a DNS name of its certificate), SvcParams in key order: alpn,
port, ipv4hint and ipv6hint (the listen addresses that are not wildcards) and, for DoH,
dohpath (RFC 9461). The answer is built once, when the config is applied
(service/assembly.py), and answered as bytes.

``resolver.arpa`` is never forwarded (RFC 9462 6.1: an upstream's designation would fail
to authenticate for this resolver's address); every other name under it, every other type,
and ``_dns.resolver.arpa`` itself when there is nothing to designate get NODATA with the
zone's SOA (RFC 9462 6.4 and 4: a locally served zone, RFC 6303).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from typing import Final

from .wire import (
    FLAG_AA,
    OPT_DO,
    OPT_PLAIN,
    RCODE_NOERROR,
    TYPE_ANY,
    TYPE_SOA,
    Query,
    encode_name,
    header,
    pointer,
    response_flags,
    rr,
    soa_rdata,
)

#: The zone, and the name DDR asks, as lower-case wire names (Query.key).
RESOLVER_ARPA: Final = b"\x08resolver\x04arpa\x00"
DNS_RESOLVER_ARPA: Final = b"\x04_dns" + RESOLVER_ARPA
TYPE_SVCB: Final = 64
#: Seconds clients keep the designation, and the zone's negative TTL: short, so that a
#: listener added or removed is seen soon.
DDR_TTL: Final = 300
_SOA: Final = rr(
    b"",
    TYPE_SOA,
    DDR_TTL,
    soa_rdata(encode_name("resolver.arpa"), encode_name("nobody.invalid"), 1, DDR_TTL),
)
#: SvcParamKeys (RFC 9460 14.3.2, RFC 9461 5).
_ALPN: Final = 1
_PORT: Final = 3
_IPV4HINT: Final = 4
_IPV6HINT: Final = 6
_DOHPATH: Final = 7
_U16: Final = struct.Struct("!H")


class Endpoint:
    """One encrypted endpoint: its ALPN ids, port, address hints and DoH path template."""

    def __init__(
        self, alpn: Sequence[str], port: int, hints: Sequence[str] = (), dohpath: str = ""
    ) -> None:
        self.alpn = tuple(alpn)
        self.port = port
        self.hints = tuple(hints)
        self.dohpath = dohpath

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Endpoint) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def __repr__(self) -> str:
        return f"Endpoint{self.key()!r}"

    def key(self) -> tuple[tuple[str, ...], int, tuple[str, ...], str]:
        return (self.alpn, self.port, self.hints, self.dohpath)


def _param(key: int, value: bytes) -> bytes:
    return _U16.pack(key) + _U16.pack(len(value)) + value


def svcb_rdata(priority: int, target: bytes, endpoint: Endpoint) -> bytes:
    """The RDATA of one ServiceMode SVCB record (RFC 9460 2.2), SvcParams in key order."""
    alpn = b"".join(bytes((len(a),)) + a.encode("ascii") for a in endpoint.alpn)
    out = (
        _U16.pack(priority) + target + _param(_ALPN, alpn) + _param(_PORT, _U16.pack(endpoint.port))
    )
    addresses = [ipaddress.ip_address(h) for h in endpoint.hints]
    v4 = b"".join(a.packed for a in addresses if a.version == 4)
    v6 = b"".join(a.packed for a in addresses if a.version == 6)
    if v4:
        out += _param(_IPV4HINT, v4)
    if v6:
        out += _param(_IPV6HINT, v6)
    if endpoint.dohpath:
        out += _param(_DOHPATH, endpoint.dohpath.encode("utf-8"))
    return out


class Designation:
    """The answers of the locally served ``resolver.arpa``: the SVCB records naming
    ``endpoints`` at ``target`` (none: nothing to designate, NODATA)."""

    def __init__(self, target: str = "", endpoints: Sequence[Endpoint] = ()) -> None:
        self.target = target
        self.endpoints = tuple(endpoints) if target else ()
        wire = encode_name(target) if target else b"\x00"
        owner = pointer(12)  # the question's name
        self.records = b"".join(
            rr(owner, TYPE_SVCB, DDR_TTL, svcb_rdata(i + 1, wire, e))
            for i, e in enumerate(self.endpoints)
        )
        self.count = len(self.endpoints)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Designation)
            and self.target == other.target
            and self.endpoints == other.endpoints
        )

    def __hash__(self) -> int:
        return hash((self.target, self.endpoints))

    def answer(self, q: Query) -> bytes:
        """The answer to ``q``, a query for ``resolver.arpa`` or a name under it
        (:func:`served`): authoritative, the SVCB records or NODATA with the SOA."""
        flags = response_flags(q, RCODE_NOERROR) | FLAG_AA
        opt = (OPT_DO if q.do else OPT_PLAIN) if q.edns else b""
        ar = 1 if q.edns else 0
        qtype = q.qtype
        if self.count and q.key == DNS_RESOLVER_ARPA and qtype in (TYPE_SVCB, TYPE_ANY):
            return header(q.id, flags, 1, self.count, 0, ar) + q.question + self.records + opt
        apex = pointer(12 + len(q.key) - len(RESOLVER_ARPA))
        return header(q.id, flags, 1, 0, 1, ar) + q.question + apex + _SOA + opt


def served(q: Query) -> bool:
    """Whether ``q`` asks for ``resolver.arpa`` or a name under it (the caller has seen
    that its name ends with those bytes: here, that they start a label)."""
    return len(q.key) - len(RESOLVER_ARPA) in q.labels
