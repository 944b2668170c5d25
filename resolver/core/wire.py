"""DNS wire format: the one place that reads and builds DNS messages.

The hot path never builds a full message object. A query is read as a header, one question
and the additional section (for OPT); answers are assembled from byte strings. Upstream
replies are scanned once, record by record, to find what the cache needs (rcode, TTL offsets,
the negative TTL from the SOA, the OPT record to strip) without decoding names. Rewriting a
whole message record by record (for clients without DO, ANY over UDP) is in :mod:`.records`.

Every reader here is bounds-checked: malformed input raises :class:`FormatError` (answerable
with FORMERR) or :class:`Unanswerable` (drop it), never anything else.
"""

from __future__ import annotations

import struct
from typing import Final

from .octets import NATIVE, Fixed, Header, header_words, rr_fixed

# Record types and classes the resolver itself needs by number.
TYPE_A: Final = 1
TYPE_NS: Final = 2
TYPE_CNAME: Final = 5
TYPE_SOA: Final = 6
TYPE_HINFO: Final = 13
TYPE_AAAA: Final = 28
TYPE_DNAME: Final = 39
TYPE_OPT: Final = 41
TYPE_DS: Final = 43
TYPE_RRSIG: Final = 46
TYPE_NSEC: Final = 47
TYPE_DNSKEY: Final = 48
TYPE_NSEC3: Final = 50
TYPE_ANY: Final = 255
CLASS_IN: Final = 1
CLASS_ANY: Final = 255

RCODE_NOERROR: Final = 0
RCODE_FORMERR: Final = 1
RCODE_SERVFAIL: Final = 2
RCODE_NXDOMAIN: Final = 3
RCODE_NOTIMP: Final = 4
RCODE_REFUSED: Final = 5
RCODE_BADVERS: Final = 16

FLAG_QR: Final = 0x8000
FLAG_AA: Final = 0x0400
FLAG_TC: Final = 0x0200
FLAG_RD: Final = 0x0100
FLAG_RA: Final = 0x0080
FLAG_Z: Final = 0x0040
FLAG_AD: Final = 0x0020
FLAG_CD: Final = 0x0010
OPCODE_MASK: Final = 0x7800

EDNS_DO: Final = 0x8000
EDE_OPTION: Final = 15
EDE_BLOCKED: Final = 15
EDE_STALE: Final = 3

#: The UDP payload size we advertise and the most we send over UDP (DNS Flag Day 2020).
EDNS_PAYLOAD: Final = 1232
MAX_NAME: Final = 255

# (Final: the compiled build then reads them as static values, not from the module's dict
# at every use.)
_HEADER: Final = struct.Struct("!6H")
_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")
_RR_FIXED: Final = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_RR: Final = struct.Struct("!H2xIH")  # type, ttl, rdlength (octets.Fixed)
_TWO_U16: Final = struct.Struct("!HH")

# Response flags copied from the query: opcode, RD and CD (RFC 1035 4.1.1, RFC 4035 3.2.2).
_COPIED_FLAGS: Final = OPCODE_MASK | FLAG_RD | FLAG_CD


class Unanswerable(Exception):
    """The datagram cannot be answered at all (no readable header, or it is a response)."""


class FormatError(Exception):
    """The message has a readable header but is malformed: answer FORMERR."""


class Query:
    """What the resolver needs of a query, read straight from its bytes.

    ``qname`` keeps the client's case (it is echoed back); ``key`` is the same name in lower
    case, used for the cache and the policy. ``labels`` holds the offset of every label in
    ``qname``, so that each parent domain is ``key[offset:]`` without decoding.
    """

    __slots__ = (
        "do",
        "edns",
        "edns_version",
        "flags",
        "id",
        "key",
        "labels",
        "opcode",
        "qclass",
        "qname",
        "qtype",
        "question",
        "udp_size",
    )

    def __init__(self) -> None:
        self.id = 0
        self.flags = 0
        self.opcode = 0
        self.qname = b""
        self.key = b""
        self.labels: tuple[int, ...] = ()
        self.qtype = 0
        self.qclass = 0
        self.question = b""
        self.edns = False
        self.edns_version = 0
        self.do = False
        self.udp_size = 512


def read_name(data: bytes, off: int) -> tuple[bytes, int]:
    """Read a possibly compressed name; return it uncompressed and the offset after it.

    Pointers must point strictly backwards, which rules out loops without a jump counter.
    """
    n = len(data)
    out = bytearray()
    end = -1
    limit = off  # a pointer must land before the place it was read from
    while True:
        if off >= n:
            raise FormatError("name runs past the end of the message")
        length = data[off]
        if length == 0:
            out.append(0)
            if end < 0:
                end = off + 1
            break
        kind = length & 0xC0
        if kind == 0xC0:
            if off + 1 >= n:
                raise FormatError("compression pointer runs past the end of the message")
            target = ((length & 0x3F) << 8) | data[off + 1]
            if end < 0:
                end = off + 2
            if target >= limit:
                raise FormatError("compression pointer does not point backwards (loop)")
            limit = target
            off = target
            continue
        if kind:
            raise FormatError("label longer than 63 octets or of an unknown type")
        if off + 1 + length > n:
            raise FormatError("label runs past the end of the message")
        out += data[off : off + 1 + length]
        if len(out) + 1 > MAX_NAME:
            raise FormatError("name longer than 255 octets")
        off += 1 + length
    return bytes(out), end


def _read_qname(data: bytes, off: int) -> tuple[bytes, tuple[int, ...], int]:
    """Read the question name at ``off``: (uncompressed name, label offsets, offset after)."""
    n = len(data)
    start = off
    labels: list[int] = []
    while True:
        if off >= n:
            raise FormatError("question name runs past the end of the message")
        length = data[off]
        if length == 0:
            off += 1
            name = data[start:off]
            if len(name) > MAX_NAME:
                raise FormatError("question name longer than 255 octets")
            return name, tuple(labels), off
        if length > 63:
            if length & 0xC0 == 0xC0:
                # Rare in a question; decode it the careful way and re-derive the labels.
                name, after = read_name(data, start)
                return name, label_offsets(name), after
            raise FormatError("label longer than 63 octets or of an unknown type")
        labels.append(off - start)
        off += 1 + length
        if off - start >= MAX_NAME:
            raise FormatError("question name longer than 255 octets")


def label_offsets(name: bytes) -> tuple[int, ...]:
    """Offsets of each label in an uncompressed wire name (the root label excluded)."""
    offsets = []
    off = 0
    while name[off]:
        offsets.append(off)
        off += 1 + name[off]
    return tuple(offsets)


def skip_name(data: bytes, off: int) -> int:
    """Return the offset after the (possibly compressed) name at ``off``, without following."""
    n = len(data)
    while True:
        if off >= n:
            raise FormatError("name runs past the end of the message")
        length = data[off]
        if length == 0:
            return off + 1
        if length & 0xC0 == 0xC0:
            if off + 2 > n:
                raise FormatError("compression pointer runs past the end of the message")
            return off + 2
        if length > 63:
            raise FormatError("label longer than 63 octets or of an unknown type")
        off += 1 + length


def parse_query(data: bytes) -> Query:
    """Read a query. Raises :class:`Unanswerable` or :class:`FormatError`.

    A query whose opcode is not QUERY is returned with ``opcode`` set and, when it has one
    readable question, that question; the caller answers NOTIMP.
    """
    n = len(data)
    if n < 12:
        raise Unanswerable("shorter than a DNS header")
    # (Typed: struct returns Any, on which the compiled build does no native arithmetic.)
    head: Header = header_words(data) if NATIVE else _HEADER.unpack_from(data)
    qid, flags, qdcount, ancount, nscount, arcount = head
    if flags & FLAG_QR:
        raise Unanswerable("a response, not a query")
    q = Query()
    q.id = qid
    q.flags = flags
    q.opcode = (flags >> 11) & 0xF
    if qdcount != 1:
        if q.opcode:
            return q  # NOTIMP without a question
        raise FormatError(f"QDCOUNT is {qdcount}, not 1")
    qname, labels, off = _read_qname(data, 12)
    if off + 4 > n:
        raise FormatError("question runs past the end of the message")
    q.qtype, q.qclass = _TWO_U16.unpack_from(data, off)
    q.qname = qname
    q.key = qname.lower()
    q.labels = labels
    q.question = qname + data[off : off + 4] if len(qname) != off - 12 else data[12 : off + 4]
    off += 4
    if arcount:
        # Skip answer and authority (a QUERY should have none) to reach OPT.
        for _ in range(ancount + nscount):
            off = _skip_record(data, off)
        _read_additional(data, off, arcount, q)
    return q


def _skip_record(data: bytes, off: int) -> int:
    off = skip_name(data, off)
    if off + 10 > len(data):
        raise FormatError("record header runs past the end of the message")
    rdlen = _U16.unpack_from(data, off + 8)[0]
    off += 10 + rdlen
    if off > len(data):
        raise FormatError("record data runs past the end of the message")
    return off


def _read_additional(data: bytes, off: int, count: int, q: Query) -> None:
    n = len(data)
    seen_opt = False
    for _ in range(count):
        name_start = off
        off = skip_name(data, off)
        if off + 10 > n:
            raise FormatError("record header runs past the end of the message")
        rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, off)
        rdata = off + 10
        off = rdata + rdlen
        if off > n:
            raise FormatError("record data runs past the end of the message")
        if rtype != TYPE_OPT:
            continue
        if seen_opt:
            raise FormatError("more than one OPT record")
        seen_opt = True
        if data[name_start] != 0:
            raise FormatError("OPT record owner is not the root")
        # Options must be well-formed even though none is acted on (unknown ones are ignored).
        pos = rdata
        while pos < off:
            if pos + 4 > off:
                raise FormatError("EDNS option header runs past the OPT record")
            optlen = _U16.unpack_from(data, pos + 2)[0]
            pos += 4 + optlen
            if pos > off:
                raise FormatError("EDNS option runs past the OPT record")
        q.edns = True
        q.edns_version = (ttl >> 16) & 0xFF
        q.do = bool(ttl & EDNS_DO)
        # Never less than 512 (RFC 6891 6.2.5); never more than we are willing to send.
        q.udp_size = min(max(rclass, 512), EDNS_PAYLOAD)


# --------------------------------------------------------------------------- building


def opt_record(do: bool, ext_rcode: int = 0, options: bytes = b"") -> bytes:
    """Our OPT record: 1232-byte payload, version 0, DO echoed, the given options."""
    ttl = ((ext_rcode >> 4) << 24) | (EDNS_DO if do else 0)
    return b"\x00" + _RR_FIXED.pack(TYPE_OPT, EDNS_PAYLOAD, ttl, len(options)) + options


OPT_PLAIN: Final = opt_record(False)
OPT_DO: Final = opt_record(True)


def ede_option(info_code: int, text: str) -> bytes:
    """An Extended DNS Error option (RFC 8914), the text cut to keep UDP answers small."""
    raw = text.encode("utf-8")[:200]
    return _TWO_U16.pack(EDE_OPTION, 2 + len(raw)) + _U16.pack(info_code) + raw


def response_flags(q: Query, rcode: int) -> int:
    """Header flags of our answer to ``q``: QR and RA set, opcode/RD/CD copied, rcode."""
    return FLAG_QR | FLAG_RA | (q.flags & _COPIED_FLAGS) | (rcode & 0xF)


def error_response(q: Query, rcode: int, with_question: bool = True) -> bytes:
    """A response with no records: FORMERR, SERVFAIL, NOTIMP, REFUSED, BADVERS.

    To an opcode other than QUERY the header carries QR, the opcode, RD and the rcode and
    nothing else (RFC 8906 3.1.3): no RA and no CD, which mean something only for QUERY."""
    question = q.question if with_question else b""
    if q.opcode:
        flags = FLAG_QR | (q.flags & (OPCODE_MASK | FLAG_RD)) | (rcode & 0xF)
    else:
        flags = response_flags(q, rcode)
    if q.edns and rcode != RCODE_FORMERR:
        opt = opt_record(q.do, rcode)
        return _HEADER.pack(q.id, flags, 1 if question else 0, 0, 0, 1) + question + opt
    return _HEADER.pack(q.id, flags, 1 if question else 0, 0, 0, 0) + question


def formerr_from_header(data: bytes) -> bytes | None:
    """FORMERR for a message whose header is readable but whose body is not."""
    if len(data) < 12:
        return None
    qid, flags = _TWO_U16.unpack_from(data)
    if flags & FLAG_QR:
        return None
    out_flags = FLAG_QR | FLAG_RA | (flags & _COPIED_FLAGS) | RCODE_FORMERR
    return _HEADER.pack(qid, out_flags, 0, 0, 0, 0)


def truncate(q: Query, rcode: int, flags_extra: int, opt: bytes) -> bytes:
    """The answer to send when the full one does not fit the client's UDP size: TC=1."""
    flags = response_flags(q, rcode) | FLAG_TC | flags_extra
    return _HEADER.pack(q.id, flags, 1, 0, 0, 1 if opt else 0) + q.question + opt


def encode_name(text: str) -> bytes:
    """Encode a presentation-format name (no escapes; IDNA is the caller's job) to wire."""
    text = text.rstrip(".")
    if not text:
        return b"\x00"
    out = bytearray()
    for label in text.split("."):
        raw = label.encode("ascii")
        if not raw or len(raw) > 63:
            raise ValueError(f"bad label {label!r} in {text!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > MAX_NAME:
        raise ValueError(f"name longer than 255 octets: {text!r}")
    return bytes(out)


#: Bytes that stand for themselves in presentation form (everything else is escaped).
_PLAIN: Final = bytes(b for b in range(0x21, 0x7F) if chr(b) not in '.\\"()@;$ ')


def decode_name(wire: bytes) -> str:
    """Presentation form of an uncompressed wire name (with a trailing dot, escapes as dig)."""
    if wire == b"\x00":
        return "."
    parts = []
    off = 0
    while wire[off]:
        length = wire[off]
        label = wire[off + 1 : off + 1 + length]
        if not label.translate(None, _PLAIN):  # the usual label: nothing to escape
            parts.append(label.decode("ascii"))
            off += 1 + length
            continue
        text = []
        for byte in label:
            ch = chr(byte)
            if ch in '.\\"()@;$ ':
                text.append("\\" + ch)
            elif 0x21 <= byte <= 0x7E:
                text.append(ch)
            else:
                text.append(f"\\{byte:03d}")
        parts.append("".join(text))
        off += 1 + length
    return ".".join(parts) + "."


def rr(name_ptr: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    """One resource record with an already encoded owner (often a pointer), class IN."""
    return name_ptr + _RR_FIXED.pack(rtype, CLASS_IN, ttl, len(rdata)) + rdata


def pointer(offset: int) -> bytes:
    """A compression pointer to ``offset`` in the message."""
    return _U16.pack(0xC000 | offset)


def soa_rdata(mname: bytes, rname: bytes, serial: int, minimum: int) -> bytes:
    """SOA RDATA with conventional refresh/retry/expire and the given negative TTL."""
    return mname + rname + struct.pack("!5I", serial, 3600, 600, 86400, minimum)


def header(qid: int, flags: int, qd: int, an: int, ns: int, ar: int) -> bytes:
    """A packed DNS header."""
    return _HEADER.pack(qid, flags, qd, an, ns, ar)


def pack_u32_into(buf: bytearray, off: int, value: int) -> None:
    """Write a 32-bit big-endian integer (a TTL) at ``off``."""
    _U32.pack_into(buf, off, value)


# --------------------------------------------------------------------------- upstream replies


class Scan:
    """What the cache needs to know of an upstream reply, found in one pass.

    ``body`` is the reply without its OPT record (and without anything after it), from the
    end of the question on; ``ttl_offsets`` and ``ttls`` locate every TTL in ``body`` so that
    it can be served with TTLs counted down.
    """

    __slots__ = (
        "addresses",
        "ancount",
        "arcount",
        "body",
        "chain",
        "dnssec",
        "flags",
        "min_answer_ttl",
        "negative_ttl",
        "nscount",
        "rcode",
        "source",
        "ttl_offsets",
        "ttls",
        "ttls_as_sent",
    )

    def __init__(self) -> None:
        #: Owners and targets of CNAME and DNAME records in the answer (lower-case wire).
        self.chain: list[bytes] = []
        #: A and AAAA addresses in the answer (packed), for network rules and rebinding.
        self.addresses: list[bytes] = []
        #: The upstream that sent it (set by the forwarder).
        self.source = ""
        self.flags = 0
        self.rcode = 0
        self.ancount = 0
        self.nscount = 0
        self.arcount = 0
        self.body = b""
        self.ttl_offsets: list[int] = []
        self.ttls: list[int] = []
        #: False when a TTL in ``body`` is not the one in ``ttls`` (RFC 2181 8).
        self.ttls_as_sent = True
        self.min_answer_ttl: int | None = None
        self.negative_ttl: int | None = None
        #: A record of a type from DS (43) to NSEC3 (50) is in it: DNSSEC records that a
        #: client without DO must not get (see records.for_client).
        self.dnssec = False


class Mismatch(Exception):
    """An upstream datagram that is not the answer to our question (ignored, RFC 5452)."""


def _reply_header(data: bytes, qid: int, question: bytes) -> tuple[int, int, int, int]:
    """The flags, ANCOUNT, NSCOUNT and ARCOUNT of an upstream reply, once its ID, QR bit and
    question are those of the query we sent; else raise :class:`Mismatch`."""
    if len(data) < 12:
        raise Mismatch("shorter than a DNS header")
    head: Header = header_words(data) if NATIVE else _HEADER.unpack_from(data)  # (as above)
    rid, flags, qdcount, ancount, nscount, arcount = head
    if rid != qid or not flags & FLAG_QR:
        raise Mismatch("ID or QR does not match")
    if qdcount != 1:
        raise Mismatch("question does not match")
    # The name compares without case; type and class exactly (lower() would fold them).
    # Upstreams echo the question as we sent it, which the first test takes with no copy.
    if not data.startswith(question, 12):
        qend = 12 + len(question)
        if (
            data[12 : qend - 4].lower() != question[:-4].lower()
            or data[qend - 4 : qend] != question[-4:]
        ):
            raise Mismatch("question does not match")
    return flags, ancount, nscount, arcount


def scan_response(data: bytes, qid: int, question: bytes) -> Scan:
    """Check an upstream reply against the query we sent and scan its records.

    Raises :class:`Mismatch` when ID, QR or question differ (the reply is ignored and the
    wait goes on) and :class:`FormatError` when the reply is malformed.
    """
    flags, ancount, nscount, arcount = _reply_header(data, qid, question)
    n = len(data)
    qend = 12 + len(question)
    s = Scan()
    s.flags = flags
    s.rcode = flags & 0xF
    if flags & FLAG_TC:
        return s  # cut short (RFC 1035 allows mid-record): only its TC bit is used
    s.ancount = ancount
    s.nscount = nscount
    off = qend
    ttl_offsets = s.ttl_offsets
    ttls = s.ttls
    addresses = s.addresses
    min_answer_ttl: int | None = None
    negative_ttl: int | None = None
    body_end = n
    kept_ar = 0
    answers = ancount
    both = ancount + nscount
    for index in range(both + arcount):
        rstart = off
        first = data[off] if off < n else 1
        if first >= 0xC0:  # the usual owner: a pointer (to the question)
            off += 2
        elif first == 0:  # the root: OPT's owner
            off += 1
        else:
            off = skip_name(data, off)
        if off + 10 > n:
            raise FormatError("record header runs past the end of the reply")
        rr: Fixed = rr_fixed(data, off) if NATIVE else _RR.unpack_from(data, off)  # (as above)
        rtype, ttl, rdlen = rr
        ttl_at = off + 4 - qend
        rdata = off + 10
        off = rdata + rdlen
        if off > n:
            raise FormatError("record data runs past the end of the reply")
        if rtype == TYPE_OPT:
            if index < both:
                raise FormatError("OPT record outside the additional section")
            s.rcode |= (ttl >> 24) << 4
            body_end = rstart  # drop OPT and whatever follows it (TSIG, SIG(0))
            break
        if TYPE_DS <= rtype <= TYPE_NSEC3:
            s.dnssec = True
        if ttl & 0x80000000:
            ttl = 0  # RFC 2181 8: a TTL with the top bit set is read as zero
            s.ttls_as_sent = False
        ttl_offsets.append(ttl_at)
        ttls.append(ttl)
        if index < answers:
            if min_answer_ttl is None or ttl < min_answer_ttl:
                min_answer_ttl = ttl
            if (rtype == TYPE_A and rdlen == 4) or (rtype == TYPE_AAAA and rdlen == 16):
                addresses.append(data[rdata:off])
            elif rtype in (TYPE_CNAME, TYPE_DNAME):
                # The names an answer passes through, for policy to see behind the alias.
                s.chain.append(read_name(data, rstart)[0].lower())
                s.chain.append(read_name(data, rdata)[0].lower())
        elif index < both:
            if rtype == TYPE_SOA and rdlen >= 22:
                minimum: int = _U32.unpack_from(data, off - 4)[0]
                neg = min(ttl, minimum)
                if negative_ttl is None or neg < negative_ttl:
                    negative_ttl = neg
        else:
            kept_ar += 1
    s.min_answer_ttl = min_answer_ttl
    s.negative_ttl = negative_ttl
    s.arcount = kept_ar
    s.body = data[qend:body_end]
    return s
