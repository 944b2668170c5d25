"""Whole messages rewritten record by record: the DNSSEC records a client without DO must not
get, the minimal answer to ANY over UDP, and a UDP answer without the records it may leave
out. Rare paths (never on a cache hit): each reads every record of the message and writes the
ones it keeps, names expanded where a dropped record may have held their pointers' target.
"""

from __future__ import annotations

import struct
from typing import Final

from .wire import (
    FLAG_QR,
    FLAG_RA,
    RCODE_SERVFAIL,
    TYPE_ANY,
    TYPE_CNAME,
    TYPE_DNAME,
    TYPE_DNSKEY,
    TYPE_DS,
    TYPE_NS,
    TYPE_NSEC,
    TYPE_NSEC3,
    TYPE_OPT,
    TYPE_RRSIG,
    FormatError,
    Scan,
    read_name,
    scan_response,
    skip_name,
)

_HEADER = struct.Struct("!6H")
_U16 = struct.Struct("!H")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength

#: How to find the names in the RDATA of the types whose names may be compressed (RFC 1035
#: 3.3, RFC 3597 4; a receiver decompresses the others listed there too): a positive number
#: is that many octets as they are, NAME a domain name, TEXT a character-string.
_NAME: Final = -1
_TEXT: Final = -2
_RDATA_LAYOUT: Final[dict[int, tuple[int, ...]]] = {
    2: (_NAME,),  # NS
    3: (_NAME,),  # MD
    4: (_NAME,),  # MF
    5: (_NAME,),  # CNAME
    6: (_NAME, _NAME, 20),  # SOA
    7: (_NAME,),  # MB
    8: (_NAME,),  # MG
    9: (_NAME,),  # MR
    12: (_NAME,),  # PTR
    14: (_NAME, _NAME),  # MINFO
    15: (2, _NAME),  # MX
    17: (_NAME, _NAME),  # RP
    18: (2, _NAME),  # AFSDB
    21: (2, _NAME),  # RT
    26: (2, _NAME, _NAME),  # PX
    33: (6, _NAME),  # SRV
    35: (4, _TEXT, _TEXT, _TEXT, _NAME),  # NAPTR
    36: (2, _NAME),  # KX
    39: (_NAME,),  # DNAME
}


class Record:
    """Where one record of a message is: its section (0 answer, 1 authority, 2
    additional), its first octet, its type, its RDATA and its end."""

    __slots__ = ("end", "rdata", "rtype", "section", "start")

    def __init__(self, section: int, start: int, rtype: int, rdata: int, end: int) -> None:
        self.section = section
        self.start = start
        self.rtype = rtype
        self.rdata = rdata
        self.end = end


def records_of(data: bytes) -> list[Record]:
    """Every record of a whole message (header and one question included), in order."""
    n = len(data)
    if n < 12:
        raise FormatError("shorter than a DNS header")
    _qid, _flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    off = 12
    for _ in range(qdcount):
        off = skip_name(data, off) + 4
    out: list[Record] = []
    for index in range(ancount + nscount + arcount):
        section = 0 if index < ancount else 1 if index < ancount + nscount else 2
        start = off
        off = skip_name(data, off)
        if off + 10 > n:
            raise FormatError("record header runs past the end of the message")
        rtype, _rclass, _ttl, rdlen = _RR_FIXED.unpack_from(data, off)
        rdata = off + 10
        off = rdata + rdlen
        if off > n:
            raise FormatError("record data runs past the end of the message")
        out.append(Record(section, start, rtype, rdata, off))
    return out


def owner_of(data: bytes, record: Record) -> bytes:
    """The record's owner, uncompressed and in lower case."""
    return read_name(data, record.start)[0].lower()


def _expanded_rdata(data: bytes, record: Record) -> bytes:
    """The record's RDATA with every (possibly compressed) name written out in full."""
    layout = _RDATA_LAYOUT.get(record.rtype)
    if layout is None:
        return data[record.rdata : record.end]
    out = bytearray()
    off = record.rdata
    for part in layout:
        if off >= record.end:
            raise FormatError("RDATA shorter than its type needs")
        if part == _NAME:
            name, off = read_name(data, off)
            out += name
        else:
            size = data[off] + 1 if part == _TEXT else part
            out += data[off : off + size]
            off += size
        if off > record.end:
            raise FormatError("RDATA runs past its length")
    out += data[off : record.end]
    return bytes(out)


def select_records(data: bytes, records: list[Record], keep: list[bool]) -> bytes:
    """``data`` with only the records whose ``keep`` is true, the header's counts adjusted.

    The records before the first one dropped stay as they are (their compression pointers
    lead backwards, into what is kept); those after it are written with their names in
    full, since a pointer of theirs may have led into a dropped record. Only done on the
    rare paths (a DNSSEC record for a client without DO, ANY over UDP), never on a hit.
    """
    counts = [0, 0, 0]
    first = len(records)
    for index, record in enumerate(records):
        if keep[index]:
            counts[record.section] += 1
        elif first == len(records):
            first = index
    if first == len(records):
        return data
    cut = records[first].start
    parts = [data[:6], _HEADER.pack(0, 0, 0, *counts)[6:], data[12:cut]]
    for index in range(first + 1, len(records)):
        if not keep[index]:
            continue
        record = records[index]
        owner, after = read_name(data, record.start)
        rdata = _expanded_rdata(data, record)
        fixed = data[after : after + 8]  # type, class, TTL
        parts.append(owner + fixed + _U16.pack(len(rdata)) + rdata)
    return b"".join(parts)


_DNSSEC_PROOFS: Final = (TYPE_RRSIG, TYPE_NSEC, TYPE_NSEC3)
_DNSSEC_KEYS: Final = (TYPE_DS, TYPE_DNSKEY)


def strip_dnssec(data: bytes, qtype: int) -> bytes:
    """``data`` without the DNSSEC records a client that did not set DO must not get
    (RFC 3225 3, RFC 4035 3.2.1): RRSIG, NSEC and NSEC3 in every section unless the
    answer section holds the type asked for; DS and DNSKEY the same way, and kept in the
    answer to ANY, where they are data of the name like any other."""
    records = records_of(data)
    keep = []
    for record in records:
        rtype = record.rtype
        if rtype in _DNSSEC_PROOFS:
            keep.append(record.section == 0 and rtype == qtype)
        elif rtype in _DNSSEC_KEYS:
            keep.append(record.section == 0 and qtype in (rtype, TYPE_ANY))
        else:
            keep.append(True)
    return select_records(data, records, keep)


def for_client(scan: Scan, question: bytes, qtype: int, do: bool) -> Scan:
    """The reply as a client with (``do``) or without DO may have it: ``scan`` itself,
    or, when it carries DNSSEC records and DO is clear, a scan of the reply without them.
    Done once when the reply enters the cache (entries are kept per DO), not per hit."""
    if do or not scan.dnssec:
        return scan
    head = _HEADER.pack(0, scan.flags, 1, scan.ancount, scan.nscount, scan.arcount)
    try:
        stripped = strip_dnssec(head + question + scan.body, qtype)
        out = scan_response(stripped, 0, question)
    except FormatError:
        # RDATA that does not fit its type: no telling what to strip, so no answer
        # (SERVFAIL, never cached) rather than DNSSEC records the client did not ask for.
        out = Scan()
        out.flags = FLAG_QR | FLAG_RA | RCODE_SERVFAIL
        out.rcode = RCODE_SERVFAIL
        out.source = scan.source
        return out
    out.rcode = scan.rcode  # the extended bits came from the OPT record, gone by now
    out.source = scan.source
    out.dnssec = False
    return out


_ALIASES: Final = (TYPE_CNAME, TYPE_DNAME)


def minimal_any(data: bytes) -> bytes:
    """The answer to ANY over UDP cut down to one RRset (RFC 8482 4.1): the aliases on the
    way (CNAME, DNAME) and the first other RRset of the answer, each with its RRSIGs
    (present only when the client set DO), the authority section's NSEC, NSEC3 and their
    RRSIGs (a wildcard answer needs them to validate), and no additional records but OPT.
    A negative answer (NXDOMAIN, NODATA, any other rcode) stays as it is."""
    if len(data) < 12 or data[3] & 0xF or not _U16.unpack_from(data, 6)[0]:
        return data
    try:
        return _minimal_any(data)
    except FormatError:
        return data  # RDATA that does not fit its type: the whole answer, or TC=1


def _minimal_any(data: bytes) -> bytes:
    records = records_of(data)
    chosen: tuple[bytes, int] | None = None
    for record in records:
        if record.section == 0 and record.rtype not in _ALIASES and record.rtype != TYPE_RRSIG:
            chosen = (owner_of(data, record), record.rtype)
            break
    keep = []
    for record in records:
        rtype = record.rtype
        if record.section == 0:
            if rtype in _ALIASES:
                keep.append(True)
                continue
            if rtype == TYPE_RRSIG and record.end - record.rdata >= 2:
                covered = _U16.unpack_from(data, record.rdata)[0]
                keep.append(
                    covered in _ALIASES
                    or (chosen is not None and (owner_of(data, record), covered) == chosen)
                )
                continue
            keep.append(chosen is not None and (owner_of(data, record), rtype) == chosen)
        elif record.section == 1:
            if rtype == TYPE_RRSIG and record.end - record.rdata >= 2:
                rtype = _U16.unpack_from(data, record.rdata)[0]
            keep.append(rtype in (TYPE_NSEC, TYPE_NSEC3))
        else:
            keep.append(rtype == TYPE_OPT)
    return select_records(data, records, keep)


def without_extras(data: bytes) -> bytes:
    """``data`` without what a UDP answer may leave out rather than set TC (RFC 2181 9):
    the additional section (OPT stays) and, beside a non-empty answer, the NS RRset of the
    authority section and its RRSIGs. What proves a negative or a wildcard answer (SOA,
    NSEC, NSEC3, their RRSIGs) and a referral's NS RRset stay."""
    try:
        records = records_of(data)
    except FormatError:
        return data
    answers = _U16.unpack_from(data, 6)[0]
    keep = []
    for record in records:
        rtype = record.rtype
        if record.section == 2:
            keep.append(rtype == TYPE_OPT)
        elif record.section == 1 and answers:
            if rtype == TYPE_RRSIG and record.end - record.rdata >= 2:
                rtype = _U16.unpack_from(data, record.rdata)[0]
            keep.append(rtype != TYPE_NS)
        else:
            keep.append(True)
    return select_records(data, records, keep)
