"""Memory bounds of the answer memo and the cache, tried as a hostile client would (issue 17,
items 2, 3 and 26): queries that vary EDNS option bytes, upstream answers of 59 KB for
many names, and a full memo under the garbage collector. Resident memory is read from
/proc (the server runs in this process)."""

from __future__ import annotations

import gc
import socket
import struct
from collections.abc import Callable, Iterator

import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from resolver.config import CacheConfig
from resolver.observe.metrics import counts_of
from resolver.service.server import settle_memory

from .helpers.fakeupstream import Behaviour, FakeUpstream
from .helpers.memory import rss
from .helpers.server import RunningServer

MIB = 1024 * 1024
DEFAULT_GC_THRESHOLD = gc.get_threshold()


def padded_query(name: str, qid: int, pad: int, serial: int, option: int = 12) -> bytes:
    """A query for ``name`` A whose OPT carries one option (RFC 7830 padding by default)
    of ``pad`` bytes, its first four bytes ``serial``: the same question every time,
    different bytes every time."""
    question = dns.message.make_query(name, "A", use_edns=False).to_wire()[12:]
    data = struct.pack("!I", serial) + bytes(pad - 4)
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 4 + pad) + struct.pack("!HH", option, pad)
    head = struct.pack("!6H", qid, 0x0100, 1, 0, 0, 1)
    return head + question + opt + data


class TCPClient:
    """One TCP connection, one query at a time (length-framed, RFC 1035 4.2.2)."""

    def __init__(self, server: RunningServer) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=5)

    def ask(self, data: bytes) -> dns.message.Message:
        return dns.message.from_wire(self.ask_raw(data))

    def ask_raw(self, data: bytes) -> bytes:
        self.sock.sendall(struct.pack("!H", len(data)) + data)
        size = struct.unpack("!H", self._read(2))[0]
        return self._read(size)

    def _read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise AssertionError("the server closed the connection")
            out += chunk
        return out

    def close(self) -> None:
        self.sock.close()


def test_memo_keys_ignore_edns_option_bytes(server: RunningServer) -> None:
    """Item 2: 1,500 queries over TCP, each with a 60 KB padding option that differs by one
    byte, for a blocked and a cached name. Keyed on the whole query, the memo grew by
    about 58 KB a query (87 MB here); keyed on what decides the answer it holds two
    entries, answers them from the memo, and answers right."""
    resolver = server.resolver
    client = TCPClient(server)
    try:
        names = ("chat.deepseek.com", "example.test")
        for i in range(100):  # warm up: the cache entry, buffers, the memo's two entries
            client.ask(padded_query(names[i % 2], i, 60_000, i))
        before = rss(collect=True)
        hits = resolver.memo_hits
        for i in range(1_500):
            reply = client.ask(padded_query(names[i % 2], i & 0xFFFF, 60_000, 1000 + i))
            assert reply.id == i & 0xFFFF
            if i % 2 == 0:
                assert reply.rcode() == dns.rcode.NXDOMAIN
            else:
                assert reply.rcode() == dns.rcode.NOERROR
                assert reply.answer[0][0].address == "192.0.2.1"
            assert reply.question[0].name.to_text() == names[i % 2] + "."
            assert reply.edns == 0 and all(o.otype != 12 for o in reply.options)  # not echoed
        grown = rss(collect=True) - before
    finally:
        client.close()
    assert grown < 40 * MIB, f"resident memory grew by {grown / MIB:.0f} MiB"
    # Padding left no trace in the memo: one key per (name, transport), hit every time
    # (the cached name's entry is renewed each second).
    assert resolver.memo_entries <= 4
    assert resolver.memo_hits - hits >= 1_400


def test_memo_is_bounded_in_bytes_and_counts_evictions(
    make_server: Callable[..., RunningServer],
) -> None:
    """Item 2: distinct blocked names fill the memo; it stays within cache.memo_max_bytes
    and counts what it evicts; an answer larger than a sixteenth of it is not memoised
    (counted too); evicted or not, every answer is right."""
    running = make_server(cache=CacheConfig(memo_max_bytes=256 * 1024))
    resolver = running.resolver
    client = TCPClient(running)
    try:
        for i in range(2_000):
            name = f"n{i}.deepseek.com"
            reply = client.ask(dns.message.make_query(name, "A").to_wire())
            assert reply.rcode() == dns.rcode.NXDOMAIN
            assert resolver.memo_bytes <= 256 * 1024
        # Options or not, the same question is one entry: asked with EDNS, then with a
        # cookie.
        plain = dns.message.make_query("n1999.deepseek.com", "A", use_edns=0, payload=1232)
        assert client.ask(plain.to_wire()).rcode() == dns.rcode.NXDOMAIN
        query = padded_query("n1999.deepseek.com", 7, 8, 1, option=10)
        assert client.ask(query).rcode() == dns.rcode.NXDOMAIN
    finally:
        client.close()
    counts = counts_of(resolver)
    assert counts.memo_evictions > 0
    assert counts.memo_bytes <= 256 * 1024
    assert 0 < counts.memo_entries < 2_000
    assert resolver.memo_hits >= 1


BIG_TXT_STRINGS = 230  # 230 strings of 255 bytes: a 59 KB answer


class BigTXTUpstream(FakeUpstream):
    """An upstream that answers every TXT question below big.test with 59 KB (over TCP;
    over UDP with TC=1, as a real one must), assembled from bytes to stay fast."""

    rdata = b"".join(bytes([255]) + bytes([0x61 + i % 26]) * 255 for i in range(BIG_TXT_STRINGS))

    def _reply(self, query: dns.message.Message, proto: str) -> tuple[Behaviour, bytes | None]:
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        if question.rdtype != dns.rdatatype.TXT or not name.endswith(".big.test"):
            return super()._reply(query, proto)
        self.queries[(proto, name, "TXT")] += 1
        asked = question.name.to_wire() + struct.pack("!HH", question.rdtype, 1)
        if proto == "udp":
            return self.default, struct.pack("!6H", query.id, 0x8380, 1, 0, 0, 0) + asked
        record = b"\xc0\x0c" + struct.pack("!HHIH", 16, 1, 300, len(self.rdata)) + self.rdata
        return self.default, struct.pack("!6H", query.id, 0x8180, 1, 1, 0, 0) + asked + record


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = BigTXTUpstream(records={("example.test", "A"): ["192.0.2.1"]})
    yield fake
    fake.close()


def test_cache_is_bounded_in_bytes(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream
) -> None:
    """Item 3: 400 names with 59 KB TXT answers (24 MB, kept whole when the cache was
    bounded in entries only) with cache.max_bytes at 2 MiB: the cache stays within it,
    counts its evictions, and memory grows by little more than the bound."""
    running = make_server(
        cache=CacheConfig(max_bytes=2 * MIB), upstream_timeout=2.0, upstream_deadline=4.0
    )
    resolver = running.resolver
    client = TCPClient(running)
    try:
        first = client.ask(dns.message.make_query("warm.big.test", "TXT").to_wire())
        assert sum(len(s) for s in first.answer[0][0].strings) == 255 * BIG_TXT_STRINGS
        before = rss(collect=True)
        for i in range(400):
            reply = client.ask_raw(dns.message.make_query(f"n{i}.big.test", "TXT").to_wire())
            assert reply[3] & 0xF == 0 and len(reply) > 256 * BIG_TXT_STRINGS  # whole
            assert resolver.cache.bytes <= 2 * MIB
        grown = rss(collect=True) - before
        # The latest name is still cached, and answered whole.
        asked = upstream.count("n399.big.test", "TXT", "tcp")
        again = client.ask(dns.message.make_query("n399.big.test", "TXT").to_wire())
        assert len(again.answer[0][0].strings) == BIG_TXT_STRINGS
        assert upstream.count("n399.big.test", "TXT", "tcp") == asked
    finally:
        client.close()
    counts = counts_of(resolver)
    assert 0 < counts.cache_bytes <= 2 * MIB
    assert counts.cache_evictions >= 400 - 2 * MIB // (255 * BIG_TXT_STRINGS)
    assert grown < 12 * MIB, f"resident memory grew by {grown / MIB:.0f} MiB"


def test_a_full_memo_adds_nothing_for_the_garbage_collector_to_walk(
    make_server: Callable[..., RunningServer],
) -> None:
    """Item 26: a full collection walks every object the collector tracks and has not
    frozen; 2,000 memo entries (distinct blocked names over UDP and TCP) must add
    nothing to walk. With an Info object in each entry's tuple they did (1M cached names
    filled the memo and every full collection walked it), and an untracked memo dict is
    tracked again by each new entry: settled as the server settles it once started
    (server.settle_memory), the dicts stay in the permanent generation."""
    running = make_server()
    resolver = running.resolver
    settle_memory(resolver)
    try:
        tracked = len(gc.get_objects())
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(2)
        try:
            for i in range(1_000):
                query = dns.message.make_query(f"g{i}.deepseek.com", "A")
                sock.sendto(query.to_wire(), (running.host, running.port))
                assert dns.message.from_wire(sock.recv(4096)).rcode() == dns.rcode.NXDOMAIN
        finally:
            sock.close()
        client = TCPClient(running)
        try:
            for i in range(1_000):
                query = dns.message.make_query(f"t{i}.deepseek.com", "A")
                assert client.ask(query.to_wire()).rcode() == dns.rcode.NXDOMAIN
        finally:
            client.close()
        assert resolver.memo_entries == 2_000
        # What the next full collection would walk: neither memo dict, nor their entries.
        walked = gc.get_objects()
        assert not any(o is memo for o in walked for memo in resolver.memo.dicts)
        gc.collect()
        grown = len(gc.get_objects()) - tracked
        assert grown < 200, f"{grown} more objects for the collector to walk"
    finally:
        gc.unfreeze()
        gc.set_threshold(*DEFAULT_GC_THRESHOLD)
