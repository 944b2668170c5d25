"""The hand-written wire code, checked against two independent codecs (dnspython, dnslib)."""

from __future__ import annotations

import contextlib
import struct
from zoneinfo import ZoneInfo

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import dnslib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.core import wire
from resolver.core.sinkhole import blocked_answer
from resolver.policy.model import ALL_CLIENTS, DOMAIN, Action, BlockList, Phases, Policy, RuleSet
from resolver.policy.table import NameTable
from resolver.yamlload import Where

from .helpers.wire import MALFORMED, QUESTION, header


@pytest.mark.parametrize(("case", "data", "outcome"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_queries_are_refused_cleanly(case: str, data: bytes, outcome: str) -> None:
    if outcome == "drop":
        with pytest.raises(wire.Unanswerable):
            wire.parse_query(data)
        assert wire.formerr_from_header(data) is None or data[2] & 0x80
        return
    with pytest.raises(wire.FormatError):
        wire.parse_query(data)
    reply = wire.formerr_from_header(data)
    assert reply is not None
    parsed = dns.message.from_wire(reply)
    assert parsed.id == 0x1234
    assert parsed.rcode() == dns.rcode.FORMERR
    assert parsed.flags & dns.flags.QR


def test_question_is_read_with_case_and_label_offsets() -> None:
    data = header() + b"\x03WwW\x07Example\x04TEST\x00" + struct.pack("!HH", 28, 1)
    q = wire.parse_query(data)
    assert q.qname == b"\x03WwW\x07Example\x04TEST\x00"
    assert q.key == b"\x03www\x07example\x04test\x00"
    assert q.labels == (0, 4, 12)
    assert [q.key[o:] for o in q.labels][1] == b"\x07example\x04test\x00"
    assert (q.qtype, q.qclass, q.edns, q.udp_size) == (28, 1, False, 512)


def test_compressed_question_name_is_expanded() -> None:
    # A pointer that points backwards into the name's own earlier labels is legal.
    data = header() + b"\x01a\x00" + struct.pack("!HH", 1, 1)
    q = wire.parse_query(data)
    assert q.qname == b"\x01a\x00"


def test_edns_fields() -> None:
    data = header(ar=1) + QUESTION + b"\x00" + struct.pack("!HHIH", 41, 4096, 0x00008000, 0)
    q = wire.parse_query(data)
    assert q.edns and q.do and q.edns_version == 0
    assert q.udp_size == wire.EDNS_PAYLOAD  # capped at what we send
    tiny = header(ar=1) + QUESTION + b"\x00" + struct.pack("!HHIH", 41, 100, 0x00010000, 0)
    q = wire.parse_query(tiny)
    assert q.udp_size == 512 and q.edns_version == 1


def test_non_query_opcode_is_marked_not_refused() -> None:
    q = wire.parse_query(header(flags=15 << 11, qd=0))
    assert q.opcode == 15 and q.question == b""
    reply = dns.message.from_wire(wire.error_response(q, wire.RCODE_NOTIMP, with_question=False))
    assert reply.rcode() == dns.rcode.NOTIMP and reply.opcode() == 15


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_parser_never_raises_anything_else(data: bytes) -> None:
    with contextlib.suppress(wire.Unanswerable, wire.FormatError):
        wire.parse_query(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_parser_on_mutated_valid_queries(tail: bytes) -> None:
    with contextlib.suppress(wire.Unanswerable, wire.FormatError):
        wire.parse_query(header(ar=1) + QUESTION + tail)


def _rule(action: Action, end: float = float("inf")) -> RuleSet:
    phases = Phases(end=end)
    blocklist = BlockList(
        "ban",
        "",
        "basis: decree 1",
        ZoneInfo("UTC"),
        phases,
        "enforce",
        action,
        60,
        ("all",),
        ALL_CLIENTS,
        Where("x", 1, 1),
    )
    rule = RuleSet(0, blocklist, DOMAIN, phases, "basis: decree 1", action, "domains", None)
    Policy([blocklist], [rule], NameTable(), ())  # compiles the rule set
    return rule


ACTIONS = [
    ("nxdomain", Action("nxdomain"), "A", "NXDOMAIN", 0, 1),
    ("nodata", Action("nodata"), "A", "NOERROR", 0, 1),
    ("refused", Action("refused"), "A", "REFUSED", 0, 0),
    ("null A", Action("null"), "A", "NOERROR", 1, 0),
    ("null AAAA", Action("null"), "AAAA", "NOERROR", 1, 0),
    ("null MX", Action("null"), "MX", "NOERROR", 0, 1),
    (
        "sinkhole A",
        Action("sinkhole", (bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))),
        "A",
        "NOERROR",
        2,
        0,
    ),
    ("sinkhole AAAA none", Action("sinkhole", (bytes([10, 0, 0, 1]),)), "AAAA", "NOERROR", 0, 1),
]


@pytest.mark.parametrize(
    ("case", "action", "qtype", "rcode", "an", "ns"), ACTIONS, ids=[a[0] for a in ACTIONS]
)
@pytest.mark.parametrize("edns", [False, True])
def test_blocked_answers_decode_in_both_codecs(
    case: str, action: Action, qtype: str, rcode: str, an: int, ns: int, edns: bool
) -> None:
    rule = _rule(action)
    query = dns.message.make_query(
        "Sub.Example.TEST", qtype, use_edns=0 if edns else False, want_dnssec=edns
    )
    query.flags |= dns.flags.CD
    q = wire.parse_query(query.to_wire())
    data = blocked_answer(q, rule, q.labels[1], 1000.0)  # the rule named Example.TEST

    reply = dns.message.from_wire(data)
    assert reply.id == query.id
    assert dns.rcode.to_text(reply.rcode()) == rcode
    assert reply.question[0].name.to_text() == "Sub.Example.TEST."
    assert reply.flags & dns.flags.QR and reply.flags & dns.flags.RA and reply.flags & dns.flags.RD
    assert reply.flags & dns.flags.CD
    assert len(reply.answer) == (1 if an else 0) and sum(len(r) for r in reply.answer) == an
    assert len(reply.authority) == ns
    if ns:
        soa = reply.authority[0]
        assert soa.name.to_text().lower() == "example.test."  # the rule's domain is the apex
        assert soa.ttl == 60 and soa[0].minimum == 60
        assert soa[0].rname.to_text() == "ban.blocked.invalid."
    if edns:
        assert reply.edns == 0 and reply.payload == wire.EDNS_PAYLOAD
        assert reply.ednsflags & dns.flags.DO
        (ede,) = [o for o in reply.options if o.otype == dns.edns.OptionType.EDE]
        assert ede.code == 15 and ede.text.startswith("blocked by list ban (reference ")
    else:
        assert reply.edns == -1

    other = dnslib.DNSRecord.parse(data)
    assert other.header.id == query.id
    assert dnslib.RCODE[other.header.rcode] == rcode
    assert str(other.q.qname) == "Sub.Example.TEST."
    assert len(other.rr) == an and len(other.auth) == ns


def test_blocked_ttl_never_outlives_the_window() -> None:
    rule = _rule(Action("nxdomain"), end=1000.0 + 12.5)
    q = wire.parse_query(dns.message.make_query("example.test", "A").to_wire())
    reply = dns.message.from_wire(blocked_answer(q, rule, 0, 1000.0))
    assert reply.authority[0].ttl == 12


def test_scan_response_finds_ttls_and_strips_opt() -> None:
    query = dns.message.make_query("example.test", "A", use_edns=0)
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text("example.test.", 300, "IN", "A", "192.0.2.1"))
    response.answer.append(dns.rrset.from_text("example.test.", 100, "IN", "TXT", '"x"'))
    response.additional.append(dns.rrset.from_text("ns.test.", 50, "IN", "A", "192.0.2.9"))
    data = response.to_wire()
    question = data[12 : 12 + len(b"\x07example\x04test\x00") + 4]
    scan = wire.scan_response(data, query.id, question.upper())
    assert scan.ttls == [300, 100, 50]
    assert scan.min_answer_ttl == 100
    assert (scan.ancount, scan.nscount, scan.arcount) == (2, 0, 1)
    for off, ttl in zip(scan.ttl_offsets, scan.ttls, strict=True):
        assert struct.unpack_from("!I", scan.body, off)[0] == ttl
    rebuilt = data[:10] + struct.pack("!H", 1) + question + scan.body
    again = dns.message.from_wire(rebuilt)
    assert again.edns == -1 and len(again.additional) == 1


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:1] + bytes([d[1] ^ 1]) + d[2:],  # other ID
        lambda d: d[:2] + bytes([d[2] & 0x7F]) + d[3:],  # QR clear
        lambda d: d[:13] + b"y" + d[14:],  # other question
    ],
    ids=["id", "qr", "question"],
)
def test_scan_response_rejects_replies_to_other_questions(mutate: object) -> None:
    query = dns.message.make_query("example.test", "A")
    data = dns.message.make_response(query).to_wire()
    question = data[12:]
    with pytest.raises(wire.Mismatch):
        wire.scan_response(mutate(data), query.id, question)  # type: ignore[operator]


def test_name_codec_round_trip() -> None:
    assert wire.encode_name("Example.TEST.") == b"\x07Example\x04TEST\x00"
    assert wire.decode_name(b"\x03a.b\x01c\x00") == "a\\.b.c."
    assert wire.decode_name(b"\x00") == "."
    with pytest.raises(ValueError):
        wire.encode_name("a" * 64 + ".test")


def test_a_reply_cut_mid_record_with_tc_is_read_as_truncated() -> None:
    query = dns.message.make_query("example.test", "TXT")
    response = dns.message.make_response(query)
    response.answer.append(
        dns.rrset.from_text("example.test.", 300, "IN", "TXT", '"' + "x" * 200 + '"')
    )
    data = bytearray(response.to_wire())
    data[2] |= 0x02  # TC
    cut = bytes(data[:60])  # in the middle of the TXT record
    question = cut[12 : 12 + len(b"\x07example\x04test\x00") + 4]
    scan = wire.scan_response(cut, query.id, question)
    assert scan.flags & wire.FLAG_TC


def test_the_question_type_must_match_exactly() -> None:
    query = dns.message.make_query("example.test", "HTTPS")  # type 65 = 0x41, 'A'
    data = dns.message.make_response(query).to_wire()
    question = data[12:]
    other = question[:-4] + b"\x00\x61" + question[-2:]  # type 97 = 'a'
    with pytest.raises(wire.Mismatch):
        wire.scan_response(data, query.id, other)


@pytest.mark.parametrize("raw_ttl", [300, 0x80000005])
def test_a_fresh_entry_serves_the_replys_ttls_or_zero_for_a_top_bit_ttl(raw_ttl: int) -> None:
    """At age 0 a cache entry serves the reply's own bytes, unless a TTL had its top bit
    set: that one is read, and served, as zero (RFC 2181 8)."""
    from resolver.core.cache import Entry

    query = dns.message.make_query("www.example.test", "A")
    reply = dns.message.make_response(query)
    reply.answer.append(dns.rrset.from_text("www.example.test.", 300, "IN", "A", "192.0.2.1"))
    data = bytearray(reply.to_wire())
    question = data[12 : 12 + len("www.example.test") + 2 + 4]
    ttl_at = len(data) - 4 - 2 - 4  # the answer's TTL: before RDLENGTH and the address
    struct.pack_into("!I", data, ttl_at, raw_ttl)
    scan = wire.scan_response(bytes(data), query.id, bytes(question))
    entry = Entry(scan, 1000.0, 1000.0 + 300)
    served = entry.records(1000.0)
    expected = raw_ttl if raw_ttl < 0x80000000 else 0
    assert struct.unpack_from("!I", served, ttl_at - 12 - len(question))[0] == expected
    later = entry.records(1010.0)
    assert struct.unpack_from("!I", later, ttl_at - 12 - len(question))[0] == max(0, expected - 10)
