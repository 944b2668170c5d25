"""RFC behaviour of the running server over real sockets, with dnspython as the client."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest

from resolver.config import UDPConfig
from resolver.policy.model import reference_id

from .helpers.fakeupstream import FakeUpstream
from .helpers.server import RunningServer, has_ipv6
from .helpers.wire import MALFORMED


@pytest.fixture
def server(make_server: Callable[..., RunningServer], udp: UDPConfig) -> RunningServer:
    """Every test here runs on both UDP listeners (see conftest.udp)."""
    return make_server(udp=udp)


def flags_of(message: dns.message.Message) -> set[str]:
    return set(dns.flags.to_text(message.flags).split())


# (query name, type, expected rcode, expected answer texts or None for "don't care")
FORWARDED = [
    ("example.test", "A", "NOERROR", ["192.0.2.1"]),
    ("example.test", "AAAA", "NOERROR", ["2001:db8::1"]),
    ("www.example.test", "A", "NOERROR", ["192.0.2.2"]),
    ("nothing.test", "A", "NXDOMAIN", []),
    ("example.test", "MX", "NOERROR", []),  # NODATA
    ("notdeepseek.com", "A", "NOERROR", ["192.0.2.3"]),  # not a subdomain of deepseek.com
]


@pytest.mark.parametrize(("name", "rtype", "rcode", "answers"), FORWARDED)
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_forwarded_answers(
    server: RunningServer, name: str, rtype: str, rcode: str, answers: list[str], tcp: bool
) -> None:
    reply = server.query(name, rtype, tcp=tcp)
    assert dns.rcode.to_text(reply.rcode()) == rcode
    got = [rd.to_text() for rrset in reply.answer for rd in rrset]
    assert got == answers
    assert {"QR", "RD", "RA"} <= flags_of(reply)
    assert "AA" not in flags_of(reply)
    if rcode == "NXDOMAIN" or (rcode == "NOERROR" and not answers):
        assert reply.authority and reply.authority[0].rdtype == dns.rdatatype.SOA


# (query name, type, expected rcode, expected answers) under the deepseek list.
BLOCKED = [
    ("deepseek.com", "A", "NXDOMAIN"),
    ("chat.deepseek.com", "A", "NXDOMAIN"),
    ("CHAT.DeepSeek.Com.", "AAAA", "NXDOMAIN"),
    ("a.b.c.api.deepseek.com", "TXT", "NXDOMAIN"),
    ("deepseeksvc.com", "A", "NXDOMAIN"),  # listed as 'Deepseeksvc.COM.'
    ("files.deepseeksvc.com", "ANY", "NXDOMAIN"),
]


@pytest.mark.parametrize(("name", "rtype", "rcode"), BLOCKED)
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_blocked_names_are_sinkholed_and_never_forwarded(
    server: RunningServer, upstream: FakeUpstream, name: str, rtype: str, rcode: str, tcp: bool
) -> None:
    reply = server.query(name, rtype, tcp=tcp, use_edns=0)
    assert dns.rcode.to_text(reply.rcode()) == rcode
    assert reply.question[0].name.to_text() == (name if name.endswith(".") else name + ".")
    (ede,) = [o for o in reply.options if o.otype == dns.edns.OptionType.EDE]
    assert ede.code == 15
    # The list and the reference's id (the full reference is in explain).
    assert (
        ede.text
        == f"blocked by list deepseek (reference {reference_id('test ban, effective 2025-02-26')})"
    )
    assert sum(upstream.queries.values()) == 0


def test_no_ede_without_edns(server: RunningServer) -> None:
    reply = server.query("deepseek.com", "A")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.edns == -1 and not reply.options


def test_id_case_rd_cd_are_echoed(server: RunningServer) -> None:
    query = dns.message.make_query("ExAmPlE.TeSt", "A")
    query.flags = dns.flags.CD  # RD clear, CD set
    reply = server.send(query)
    assert reply.id == query.id
    assert reply.question[0].name.to_text() == "ExAmPlE.TeSt."
    assert "RD" not in flags_of(reply) and "CD" in flags_of(reply)
    assert {"QR", "RA"} <= flags_of(reply)


def test_z_and_aa_bits_of_the_query_are_not_echoed(server: RunningServer) -> None:
    query = dns.message.make_query("example.test", "A")
    query.flags |= dns.flags.AA | 0x0040
    reply = server.send(query)
    assert reply.rcode() == dns.rcode.NOERROR
    assert not reply.flags & 0x0040 and "AA" not in flags_of(reply)


def test_cached_answer_keeps_each_clients_case_and_id(server: RunningServer) -> None:
    first = server.query("mixed.case.test", "A")
    second = server.query("MIXED.CASE.TEST", "A")
    assert first.question[0].name.to_text() == "mixed.case.test."
    assert second.question[0].name.to_text() == "MIXED.CASE.TEST."
    assert [rd.to_text() for rd in second.answer[0]] == ["192.0.2.5"]


OPCODES = [
    ("STATUS header only", dns.opcode.STATUS, False),
    ("NOTIFY with question", dns.opcode.NOTIFY, True),
    ("UPDATE", dns.opcode.UPDATE, True),
    ("opcode 15", 15, False),
]


@pytest.mark.parametrize(("case", "opcode", "with_question"), OPCODES, ids=[o[0] for o in OPCODES])
def test_other_opcodes_get_notimp(
    server: RunningServer, case: str, opcode: int, with_question: bool
) -> None:
    qd = 1 if with_question else 0
    data = struct.pack("!6H", 0xBEEF, (opcode << 11) | 0x0100, qd, 0, 0, 0)
    if with_question:
        data += b"\x07example\x04test\x00\x00\x06\x00\x01"
    raw = server.raw(data)
    assert raw is not None
    reply = dns.message.from_wire(raw)
    assert reply.id == 0xBEEF and reply.rcode() == dns.rcode.NOTIMP
    assert reply.opcode() == opcode
    assert len(reply.question) == qd


def test_edns_reply_advertises_1232_and_echoes_do(server: RunningServer) -> None:
    reply = server.query("example.test", "A", use_edns=0, payload=4096, want_dnssec=True)
    assert reply.edns == 0 and reply.payload == 1232
    assert reply.ednsflags & dns.flags.DO
    plain = server.query("example.test", "A", use_edns=0)
    assert plain.edns == 0 and not plain.ednsflags & dns.flags.DO


def test_no_opt_in_reply_without_opt_in_query(server: RunningServer) -> None:
    assert server.query("example.test", "A").edns == -1


def test_unknown_edns_options_and_flags_are_not_echoed(server: RunningServer) -> None:
    options = [dns.edns.GenericOption(100, b"hello"), dns.edns.GenericOption(10, b"\x01" * 8)]
    reply = server.query("example.test", "A", use_edns=0, options=options, ednsflags=0x0080)
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.options == () or list(reply.options) == []
    assert reply.ednsflags == 0


def test_edns_version_1_gets_badvers(server: RunningServer, upstream: FakeUpstream) -> None:
    reply = server.query("example.test", "A", use_edns=1)
    assert reply.rcode() == dns.rcode.BADVERS
    assert reply.edns == 0
    assert sum(upstream.queries.values()) == 0


def test_two_opt_records_get_formerr(server: RunningServer) -> None:
    query = dns.message.make_query("example.test", "A", use_edns=0).to_wire()
    opt = query[-11:]
    data = query[:10] + struct.pack("!H", 2) + query[12:] + opt
    raw = server.raw(data)
    assert raw is not None and dns.message.from_wire(raw).rcode() == dns.rcode.FORMERR


@pytest.mark.parametrize(("case", "data", "outcome"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_packets_then_next_query_is_answered(
    server: RunningServer, case: str, data: bytes, outcome: str
) -> None:
    raw = server.raw(data, timeout=0.3)
    if outcome == "drop":
        assert raw is None
    else:
        assert raw is not None
        reply = dns.message.from_wire(raw)
        assert reply.rcode() == dns.rcode.FORMERR and reply.id == 0x1234
    assert server.query("example.test", "A").rcode() == dns.rcode.NOERROR


def test_malformed_tcp_frames_do_not_kill_the_connection(server: RunningServer) -> None:
    with socket.create_connection((server.host, server.port), timeout=3) as sock:
        for _, data, _ in MALFORMED:
            sock.sendall(struct.pack("!H", len(data)) + data)
        good = dns.message.make_query("example.test", "A")
        wire = good.to_wire()
        sock.sendall(struct.pack("!H", len(wire)) + wire)
        replies = []
        while True:
            size = struct.unpack("!H", sock.recv(2, socket.MSG_WAITALL))[0]
            reply = dns.message.from_wire(sock.recv(size, socket.MSG_WAITALL))
            replies.append(reply)
            if reply.id == good.id:
                break
        formerrs = sum(1 for r in replies if r.rcode() == dns.rcode.FORMERR)
        assert formerrs == sum(1 for m in MALFORMED if m[2] == "formerr")
        assert replies[-1].rcode() == dns.rcode.NOERROR


@pytest.mark.parametrize(("edns", "limit"), [(None, 512), (512, 512), (1232, 1232), (4096, 1232)])
def test_udp_answers_never_exceed_the_client_size(
    server: RunningServer, edns: int | None, limit: int
) -> None:
    kwargs = {"use_edns": 0, "payload": edns} if edns else {}
    query = dns.message.make_query("big.test", "TXT", **kwargs)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(query.to_wire(), (server.host, server.port))
        raw = sock.recv(65535)
    assert len(raw) <= limit
    reply = dns.message.from_wire(raw)
    assert "TC" in flags_of(reply) and not reply.answer
    full = server.query("big.test", "TXT", tcp=True)
    assert "TC" not in flags_of(full) and len(full.answer[0]) == 10


def test_any_is_forwarded_never_invented(server: RunningServer, upstream: FakeUpstream) -> None:
    # RFC 8482 answers are cut from the real answer (tests/test_protocol_hardening.py has
    # the details); nothing is synthesized.
    reply = server.query("example.test", "ANY")
    assert reply.rcode() == dns.rcode.NOERROR
    assert not any(rrset.rdtype == dns.rdatatype.HINFO for rrset in reply.answer)
    assert upstream.count("example.test", "ANY", "udp") == 1
    server.query("example.test", "ANY", tcp=True)  # the same question, from the cache
    assert upstream.count("example.test", "ANY") == 1


def test_upstream_query_is_lower_case_with_our_edns(
    server: RunningServer, upstream: FakeUpstream
) -> None:
    options = [dns.edns.GenericOption(100, b"secret")]
    server.query("WWW.Example.TEST", "A", use_edns=0, options=options)
    sent = upstream.last_query
    assert sent is not None
    assert sent.question[0].name.to_text() == "www.example.test."
    assert sent.edns == 0 and sent.payload == 1232 and not sent.options
    assert "RD" in flags_of(sent)


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 on this machine")
def test_ipv6_listener(make_server: Callable[..., RunningServer]) -> None:
    running = make_server(listen=["[::1]:0"])
    assert running.host == "::1"
    assert running.query("example.test", "A").rcode() == dns.rcode.NOERROR
    assert running.query("deepseek.com", "A", tcp=True).rcode() == dns.rcode.NXDOMAIN
