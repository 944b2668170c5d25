"""Protocol hardening, tried the way a hostile client or a careless upstream would.

- Rate-limit buckets survive a flood of spoofed sources (issue 17, item 8).
- A flood of monitored names makes a bounded number of log lines (item 18).
- Clients without DO get no DNSSEC records, even when the upstream sends them (item 22).
- Answers to opcodes other than QUERY carry QR, the opcode, RD and NOTIMP only (item 23).
- ANY over UDP is cut from the real answer, never invented; other classes are REFUSED
  (issue 22, item 1).

The ANY and DNSSEC tests run against NSD serving the zones of tests/helpers/richzones.py (a signed
one when dnspython can sign), through a proxy that plays the upstream that misbehaves.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from resolver.config import RateLimitConfig
from resolver.upstream.endpoints import parse_upstream

from .helpers.richzones import Proxy, ZoneServer, available
from .helpers.server import RunningServer

needs_nsd = pytest.mark.skipif(not available(), reason="needs nsd")

DNSSEC_TYPES = {
    dns.rdatatype.RRSIG,
    dns.rdatatype.NSEC,
    dns.rdatatype.NSEC3,
    dns.rdatatype.DS,
    dns.rdatatype.DNSKEY,
}


@pytest.fixture(scope="module")
def zones(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZoneServer]:
    if not available():
        pytest.skip("needs nsd")
    server = ZoneServer(tmp_path_factory.mktemp("zones"))
    yield server
    server.stop()


def _proxy_server(
    make_server: Callable[..., RunningServer], zones: ZoneServer, **kind: bool
) -> Iterator[RunningServer]:
    proxy = Proxy(zones, **kind)
    try:
        yield make_server(upstreams=(parse_upstream(proxy.address),), upstream_timeout=1.0)
    finally:
        proxy.close()


@pytest.fixture
def full_any(
    make_server: Callable[..., RunningServer], zones: ZoneServer
) -> Iterator[RunningServer]:
    """The resolver forwarding to an upstream that answers ANY with every RRset."""
    yield from _proxy_server(make_server, zones, full_any=True)


@pytest.fixture
def force_do(
    make_server: Callable[..., RunningServer], zones: ZoneServer
) -> Iterator[RunningServer]:
    """The resolver forwarding to an upstream that sends DNSSEC records whatever DO says."""
    yield from _proxy_server(make_server, zones, force_do=True)


def rrsets(reply: dns.message.Message) -> list[tuple[str, str]]:
    return [(rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype)) for rrset in reply.answer]


# ------------------------------------------------------------------ item 8: rate-limit spoofing


def _answers(sock: socket.socket, wait: float) -> int:
    count = 0
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            break
        sock.recv(4096)
        count += 1
    return count


def test_spoofed_sources_do_not_reset_an_abusers_bucket(
    make_server: Callable[..., RunningServer],
) -> None:
    # 1 query per second, a burst of 5, room for 64 buckets: 32 new sources fill a
    # generation. Before, the table was cleared whole when full, so every 64 spoofed
    # sources gave the abuser a fresh burst of 5.
    server = make_server(ratelimit=RateLimitConfig(qps=1.0, burst=5.0, max_clients=64))
    wire = dns.message.make_query("example.test", "A").to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as abuser:
        abuser.bind(("127.0.0.2", 0))
        started = time.monotonic()
        for _ in range(10):
            abuser.sendto(wire, (server.host, server.port))
        first = _answers(abuser, 0.5)
        later = 0
        for round_ in range(8):
            for i in range(32):  # spoofed: each from its own address, never read
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoofed:
                    spoofed.bind((f"127.1.{round_}.{i + 1}", 0))
                    spoofed.sendto(wire, (server.host, server.port))
            for _ in range(5):
                abuser.sendto(wire, (server.host, server.port))
            later += _answers(abuser, 0.15)
        elapsed = time.monotonic() - started
    guard = server.resolver.guard
    assert first <= 6  # the burst (and what refilled meanwhile)
    # After its burst, the abuser gets what the rate refills, however many sources came.
    assert later <= elapsed * 1.0 + 1, (first, later, elapsed)
    assert guard.evictions >= 3 * 32  # the spoofed buckets went, least recently used
    assert guard.tracked <= 64


# -------------------------------------------------------- item 18: monitored-match log lines


def test_a_flood_of_monitored_names_logs_a_bounded_number_of_lines(
    make_server: Callable[..., RunningServer], lists_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (lists_dir / "watch.yaml").write_text("list: watch\nmode: monitor\ndomains: [example.test]\n")
    server = make_server()
    caplog.set_level(logging.INFO, logger="resolver.chain")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        for i in range(1000):
            sock.sendto(
                dns.message.make_query("example.test", "A", id=i).to_wire(),
                (server.host, server.port),
            )
            sock.recv(4096)
    lines = [r for r in caplog.records if "would block" in r.getMessage()]
    # One line per list per 10 s (the test takes less than 20 s even on a busy machine).
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]
    assert server.resolver.stats.would_block["watch"] == 1000  # every match still counted
    # The next line after the interval says how many went unlogged.
    server.resolver.monitor_log_interval = 0.0
    server.query("example.test", "A")
    last = [r.getMessage() for r in caplog.records if "would block" in r.getMessage()][-1]
    assert "more matches of this list since the last such line" in last


# ------------------------------------------------------------ item 22: DNSSEC records for DO=0


def _no_dnssec(reply: dns.message.Message) -> None:
    for section in (reply.answer, reply.authority, reply.additional):
        for rrset in section:
            assert rrset.rdtype not in DNSSEC_TYPES, reply.to_text()


@needs_nsd
def test_clients_without_do_get_no_dnssec_records(
    force_do: RunningServer, zones: ZoneServer
) -> None:
    if not zones.signed:
        pytest.skip("dnspython cannot sign here (needs cryptography)")
    # The upstream really does send them to a query without DO:
    raw = dns.query.udp(
        dns.message.make_query("www.signed.test", "A"), "127.0.0.1", port=zones.port
    )
    assert not any(r.rdtype == dns.rdatatype.RRSIG for r in raw.answer)
    for edns in ({"use_edns": False}, {"use_edns": 0}):
        reply = force_do.query("www.signed.test", "A", **edns)
        assert rrsets(reply) == [("www.signed.test.", "A")]
        _no_dnssec(reply)
        # A CNAME with its RRSIG, then the target with its own: what follows a stripped
        # record is rewritten (its names were compressed against what is gone).
        alias = force_do.query("alias.signed.test", "A", **edns)
        assert rrsets(alias) == [("alias.signed.test.", "CNAME"), ("www.signed.test.", "A")]
        assert alias.answer[1][0].address == "192.0.2.201"
        _no_dnssec(alias)
        missing = force_do.query("nx.signed.test", "A", **edns)
        assert missing.rcode() == dns.rcode.NXDOMAIN
        assert [r.rdtype for r in missing.authority] == [dns.rdatatype.SOA]
        _no_dnssec(missing)
        wild = force_do.query("a.wild.signed.test", "A", **edns)
        assert rrsets(wild) == [("a.wild.signed.test.", "A")]
        _no_dnssec(wild)
    # Asked for by type, DNSKEY stays (without its RRSIG); over TCP too.
    keys = force_do.query("signed.test", "DNSKEY", tcp=True)
    assert [r.rdtype for r in keys.answer] == [dns.rdatatype.DNSKEY]
    # A client with DO gets the signatures (the cache keeps one entry per DO bit).
    signed = force_do.query("www.signed.test", "A", use_edns=0, want_dnssec=True)
    assert {r.rdtype for r in signed.answer} == {dns.rdatatype.A, dns.rdatatype.RRSIG}
    assert signed.ednsflags & dns.flags.DO
    assert not signed.flags & dns.flags.AD  # nothing validated it (RFC 6840 5.8)


# ----------------------------------------------------------------- item 23: opcode answers


@pytest.mark.parametrize(
    "opcode", [dns.opcode.IQUERY, dns.opcode.STATUS, 3, dns.opcode.NOTIFY, dns.opcode.UPDATE, 15]
)
@pytest.mark.parametrize("edns", [False, True])
def test_notimp_carries_only_qr_opcode_and_rd(
    server: RunningServer, opcode: int, edns: bool
) -> None:
    # RD, CD, AD and AA set in the query; only RD may come back (RFC 8906 3.1.3).
    flags = (opcode << 11) | 0x0100 | 0x0010 | 0x0020 | 0x0400
    question = dns.message.make_query("example.test", "SOA").question[0]
    body = question.name.to_wire() + struct.pack("!HH", question.rdtype, question.rdclass)
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0x8000, 0) if edns else b""
    data = struct.pack("!6H", 0xBEEF, flags, 1, 0, 0, 1 if edns else 0) + body + opt
    reply = server.raw(data)
    assert reply is not None
    rid, rflags = struct.unpack_from("!HH", reply)
    assert rid == 0xBEEF
    assert rflags == 0x8000 | (opcode << 11) | 0x0100 | dns.rcode.NOTIMP


# ------------------------------------------------------- issue 22: ANY, and unknown classes


@needs_nsd
def test_any_over_udp_is_one_real_rrset(full_any: RunningServer) -> None:
    reply = full_any.query("www.conf.test", "ANY")
    assert reply.rcode() == dns.rcode.NOERROR
    (rrset,) = reply.answer
    assert rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.TXT)
    assert rrset.ttl <= 3600
    real = full_any.query("www.conf.test", rrset.rdtype).answer[0]
    assert set(rrset) == set(real)
    # Over TCP the whole answer, as the upstream gave it.
    full = full_any.query("www.conf.test", "ANY", tcp=True)
    assert {r.rdtype for r in full.answer} >= {
        dns.rdatatype.A,
        dns.rdatatype.AAAA,
        dns.rdatatype.TXT,
    }


@needs_nsd
def test_any_for_a_missing_name_is_nxdomain_with_the_soa(full_any: RunningServer) -> None:
    reply = full_any.query("missing.conf.test", "ANY", use_edns=0)
    assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer
    (soa,) = reply.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.ttl <= 300  # the zone's negative TTL


@needs_nsd
def test_any_at_a_cname_owner_is_the_cname(full_any: RunningServer) -> None:
    reply = full_any.query("chain1.conf.test", "ANY")
    assert reply.rcode() == dns.rcode.NOERROR
    assert rrsets(reply) == [("chain1.conf.test.", "CNAME")]
    assert reply.answer[0][0].target.to_text() == "chain2.conf.test."


@needs_nsd
def test_any_below_a_dname_keeps_the_dname_and_its_cname(full_any: RunningServer) -> None:
    reply = full_any.query("x.dn.conf.test", "ANY")
    assert reply.rcode() == dns.rcode.NOERROR
    got = rrsets(reply)
    assert got[:2] == [("dn.conf.test.", "DNAME"), ("x.dn.conf.test.", "CNAME")]
    assert all(owner == "x.other.test." for owner, _ in got[2:]) and len(got) <= 3
    missing = full_any.query("nx.dn.conf.test", "ANY")
    assert missing.rcode() == dns.rcode.NXDOMAIN  # the target's rcode stays
    assert rrsets(missing) == [("dn.conf.test.", "DNAME"), ("nx.dn.conf.test.", "CNAME")]


@needs_nsd
def test_any_with_do_keeps_the_rrsets_signatures(
    full_any: RunningServer, zones: ZoneServer
) -> None:
    if not zones.signed:
        pytest.skip("dnspython cannot sign here (needs cryptography)")
    reply = full_any.query("www.signed.test", "ANY", use_edns=0, want_dnssec=True)
    assert reply.rcode() == dns.rcode.NOERROR
    data = [r for r in reply.answer if r.rdtype != dns.rdatatype.RRSIG]
    sigs = [r for r in reply.answer if r.rdtype == dns.rdatatype.RRSIG]
    assert len(data) == 1 and len(sigs) == 1
    assert sigs[0].covers == data[0].rdtype and sigs[0].name == data[0].name
    # Without DO: the same RRset, unsigned.
    plain = full_any.query("www.signed.test", "ANY", use_edns=0)
    assert len(plain.answer) == 1 and plain.answer[0].rdtype != dns.rdatatype.RRSIG


@needs_nsd
def test_any_too_large_for_udp_is_truncated(full_any: RunningServer) -> None:
    query = dns.message.make_query("big.conf.test", "ANY")
    raw = full_any.raw(query.to_wire())
    assert raw is not None and len(raw) <= 512
    reply = dns.message.from_wire(raw)
    assert reply.flags & dns.flags.TC and not reply.answer


@pytest.mark.parametrize("rdclass", [dns.rdataclass.CH, dns.rdataclass.HS, 3 + 1000])
def test_other_classes_are_refused(server: RunningServer, rdclass: int) -> None:
    reply = server.query("example.test", "TXT", rdclass=rdclass)
    assert reply.rcode() == dns.rcode.REFUSED and not reply.answer
    assert reply.question[0].rdclass == rdclass
