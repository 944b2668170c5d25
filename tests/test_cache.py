"""The cache, seen from a client: TTLs count down, negatives per RFC 2308, bounds, and
forwarded answers that never outlive a ban's effective date."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import dns.exception
import dns.message
import dns.rcode
import pytest

from resolver.config import AclConfig, CacheConfig, UDPConfig

from .helpers.fakeupstream import Behaviour, FakeUpstream
from .helpers.server import FROZEN_NOW, Clock, RunningServer


@pytest.fixture
def frozen(clock: Clock) -> Clock:
    clock.now = FROZEN_NOW
    return clock


def ttl_of(reply: dns.message.Message) -> int:
    section = reply.answer or reply.authority
    return section[0].ttl


def test_ttl_counts_down_and_entry_expires(
    server: RunningServer, upstream: FakeUpstream, frozen: Clock
) -> None:
    assert ttl_of(server.query("example.test", "A")) == 300
    frozen.advance(100.4)
    # 199.6 s left: the floor, never rounded up past the record's end.
    assert ttl_of(server.query("example.test", "A")) == 199
    frozen.advance(198.6)
    assert ttl_of(server.query("example.test", "A")) == 1
    assert upstream.count("example.test", "A") == 1
    frozen.advance(1)
    assert ttl_of(server.query("example.test", "A")) == 300
    assert upstream.count("example.test", "A") == 2


def test_nxdomain_and_nodata_are_cached_for_the_soa_negative_ttl(
    server: RunningServer, upstream: FakeUpstream, frozen: Clock
) -> None:
    # The fake's SOA has TTL 240 and MINIMUM 120: RFC 2308 takes the smaller.
    for name, rtype, rcode in (("gone.test", "A", "NXDOMAIN"), ("example.test", "MX", "NOERROR")):
        first = server.query(name, rtype)
        assert dns.rcode.to_text(first.rcode()) == rcode
        frozen.advance(119)
        second = server.query(name, rtype)
        assert dns.rcode.to_text(second.rcode()) == rcode
        assert ttl_of(second) == 1  # every TTL in the reply is capped at the entry's life
        assert upstream.count(name, rtype) == 1
        frozen.advance(1)
        server.query(name, rtype)
        assert upstream.count(name, rtype) == 2


def test_servfail_is_not_cached(server: RunningServer, upstream: FakeUpstream) -> None:
    upstream.behaviours["example.test"] = Behaviour("servfail")
    assert server.query("example.test", "A").rcode() == dns.rcode.SERVFAIL
    upstream.behaviours.clear()
    assert server.query("example.test", "A").rcode() == dns.rcode.NOERROR


def test_lru_eviction_bounds_the_cache(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream
) -> None:
    running = make_server(cache=CacheConfig(max_entries=2))
    running.query("example.test", "A")
    running.query("www.example.test", "A")
    running.query("example.test", "A")  # refresh: www is now least recently used
    running.query("notdeepseek.com", "A")  # evicts www
    cache = running.resolver.cache
    assert len(cache) == 2 and cache.evictions == 1
    running.query("example.test", "A")
    running.query("www.example.test", "A")
    assert upstream.count("example.test", "A") == 1
    assert upstream.count("www.example.test", "A") == 2


def test_cache_key_separates_type_class_and_do(
    server: RunningServer, upstream: FakeUpstream
) -> None:
    server.query("example.test", "A")
    server.query("example.test", "AAAA")
    server.query("example.test", "A", use_edns=0, want_dnssec=True)
    server.query("EXAMPLE.test", "A")
    assert upstream.count("example.test", "A") == 2
    assert upstream.count("example.test", "AAAA") == 1


def test_blocked_answers_are_not_cached(server: RunningServer) -> None:
    server.query("deepseek.com", "A")
    assert len(server.resolver.cache) == 0


def _iso(instant: float) -> str:
    return datetime.fromtimestamp(instant, UTC).isoformat()


def test_forwarded_answer_leaves_the_cache_when_a_ban_takes_force(
    make_server: Callable[..., RunningServer],
    upstream: FakeUpstream,
    lists_dir: Path,
    frozen: Clock,
) -> None:
    starts = FROZEN_NOW + 30
    (lists_dir / "soon.yaml").write_text(
        f"list: soon\nactive: {{from: '{_iso(starts)}'}}\ndomains: [soon.test]\n"
    )
    running = make_server()
    first = running.query("soon.test", "A")
    assert first.rcode() == dns.rcode.NOERROR and ttl_of(first) == 30  # not the upstream's 300
    frozen.advance(29)
    assert ttl_of(running.query("soon.test", "A")) == 1
    frozen.advance(1)
    assert running.query("soon.test", "A").rcode() == dns.rcode.NXDOMAIN
    assert upstream.count("soon.test", "A") == 1


def test_blocked_answer_never_outlives_the_ban(
    make_server: Callable[..., RunningServer],
    upstream: FakeUpstream,
    lists_dir: Path,
    frozen: Clock,
) -> None:
    ends = FROZEN_NOW + 20
    (lists_dir / "ending.yaml").write_text(
        f"list: ending\nttl: 3600\nactive: {{until: '{_iso(ends)}'}}\ndomains: [soon.test]\n"
    )
    running = make_server()
    blocked = running.query("soon.test", "A")
    assert blocked.rcode() == dns.rcode.NXDOMAIN and ttl_of(blocked) == 20
    frozen.advance(20)
    assert running.query("soon.test", "A").rcode() == dns.rcode.NOERROR


def test_repeated_query_bytes_get_their_own_id_from_the_answer_memo(
    server: RunningServer, frozen: Clock
) -> None:
    query = dns.message.make_query("Deepseek.com", "A", use_edns=0)
    answers = []
    for qid in (1, 2, 0xFFFF):
        query.id = qid
        answers.append(server.send(query))
    assert [a.id for a in answers] == [1, 2, 0xFFFF]
    assert all(a.question[0].name.to_text() == "Deepseek.com." for a in answers)
    assert all(a.rcode() == dns.rcode.NXDOMAIN for a in answers)
    assert server.resolver.memo_hits >= 2


def test_every_repeat_answered_by_the_udp_fast_path_is_counted(
    make_server: Callable[..., RunningServer], frozen: Clock, udp: UDPConfig
) -> None:
    """Repeats over UDP are answered by the listener from the memo, without a call into
    Resolver.handle; each still counts, in every counter /metrics reads."""
    server = make_server(udp=udp)
    resolver = server.resolver
    blocked = dns.message.make_query("deepseek.com", "A")
    cached = dns.message.make_query("example.test", "A")
    assert server.send(blocked).rcode() == dns.rcode.NXDOMAIN
    for _ in range(2):  # forwarded, then a cache hit: both through handle()
        assert server.send(cached).rcode() == dns.rcode.NOERROR
    through_handle = resolver.memo.hits
    for qid in range(1, 41):
        blocked.id = cached.id = qid
        reply = server.send(blocked)
        assert (reply.id, reply.rcode()) == (qid, dns.rcode.NXDOMAIN)
        reply = server.send(cached)
        assert (reply.id, reply.rcode()) == (qid, dns.rcode.NOERROR) and reply.answer
    assert resolver.memo.hits == through_handle  # the fast path took every repeat
    stats = resolver.stats
    assert stats.answers[("udp", "A", "NXDOMAIN", "blocked")] == 41
    assert stats.answers[("udp", "A", "NOERROR", "cached")] == 41
    assert stats.blocked["deepseek"] == 41
    assert stats.cache_hits == 41
    assert sum(stats.durations["blocked"].counts) == 41
    assert sum(stats.durations["cached"].counts) == 41
    assert resolver.memo_hits == through_handle + 80


def test_the_udp_fast_path_answers_only_clients_the_access_list_lets_in(
    make_server: Callable[..., RunningServer], udp: UDPConfig
) -> None:
    running = make_server(acl=AclConfig(("127.0.0.1/32",), "refuse"), udp=udp)
    query = dns.message.make_query("deepseek.com", "A").to_wire()
    for source, rcode in (
        ("127.0.0.1", "NXDOMAIN"),
        ("127.0.0.1", "NXDOMAIN"),
        ("127.0.0.7", "REFUSED"),
        ("127.0.0.7", "REFUSED"),
    ):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((source, 0))
            sock.settimeout(3)
            sock.sendto(query, (running.host, running.port))
            reply = dns.message.from_wire(sock.recv(65535))
        assert dns.rcode.to_text(reply.rcode()) == rcode, source
    assert running.resolver.stats.stopped["acl"] == 2


def test_reload_replaces_the_policy_and_what_was_memoised(
    server: RunningServer, upstream: FakeUpstream, lists_dir: Path
) -> None:
    assert server.query("example.test", "A").rcode() == dns.rcode.NOERROR
    assert server.query("example.test", "A").rcode() == dns.rcode.NOERROR
    (lists_dir / "new.yaml").write_text("list: new\ndomains: [example.test]\n")
    assert server.call(server.server.reload()) is True
    assert server.query("example.test", "A").rcode() == dns.rcode.NXDOMAIN
    # A broken edit keeps the last good policy.
    (lists_dir / "new.yaml").write_text("list: new\ndomains: [example.test\n")
    assert server.call(server.server.reload()) is False
    assert server.query("example.test", "A").rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize("failure", ["servfail", "drop"])
def test_serve_stale_when_upstreams_fail_or_are_slow(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream, frozen: Clock, failure: str
) -> None:
    running = make_server(cache=CacheConfig(serve_stale=3600, stale_timer=0.3))
    assert ttl_of(running.query("example.test", "A")) == 300
    frozen.advance(400)  # expired 100 s ago
    upstream.default = Behaviour(failure)
    reply = running.query("example.test", "A", use_edns=0, timeout=5)
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.answer[0][0].to_text() == "192.0.2.1" and reply.answer[0].ttl == 30
    (ede,) = [o for o in reply.options if o.otype == 15]
    assert ede.code == 3  # Stale Answer
    assert running.resolver.stats.stale == 1
    # Beyond the maximum staleness: SERVFAIL, as without serve-stale.
    frozen.advance(3600)
    assert running.query("example.test", "A", timeout=5).rcode() == dns.rcode.SERVFAIL


def test_a_stale_answer_is_refreshed_in_the_background(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream, frozen: Clock
) -> None:
    running = make_server(cache=CacheConfig(serve_stale=3600, stale_timer=0.1))
    running.query("example.test", "A")
    frozen.advance(400)
    upstream.behaviours["example.test"] = Behaviour(delay=0.3)  # slower than the timer
    stale = running.query("example.test", "A")
    assert stale.answer[0].ttl == 30
    time.sleep(0.5)  # the fetch lands and refreshes the entry
    fresh = running.query("example.test", "A")
    assert fresh.answer[0].ttl == 300 and upstream.count("example.test", "A") == 2


def test_without_serve_stale_an_expired_entry_is_gone(
    server: RunningServer, upstream: FakeUpstream, frozen: Clock
) -> None:
    server.query("example.test", "A")
    frozen.advance(400)
    upstream.default = Behaviour("servfail")
    assert server.query("example.test", "A", timeout=5).rcode() == dns.rcode.SERVFAIL


def test_flush_one_name_and_its_subdomains_or_everything(
    server: RunningServer, upstream: FakeUpstream
) -> None:
    from resolver.core.wire import encode_name

    for name in ("example.test", "www.example.test", "notdeepseek.com"):
        server.query(name, "A")
        server.query(name, "A")
    cache = server.resolver.cache
    assert cache.flush(encode_name("example.test")) == 2
    server.resolver.forget_answers()
    server.query("www.example.test", "A")
    server.query("notdeepseek.com", "A")
    assert upstream.count("www.example.test", "A") == 2  # flushed: asked again
    assert upstream.count("notdeepseek.com", "A") == 1  # kept
    assert cache.flush(encode_name("test")) == 1  # label boundary: not "notdeepseek.com"
    assert cache.flush() == 1


def test_prefetch_refreshes_a_popular_entry_before_it_expires(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream, frozen: Clock
) -> None:
    running = make_server(cache=CacheConfig(prefetch=True))
    running.query("example.test", "A")
    for _ in range(3):
        frozen.advance(1)  # a new second each time: past the answer memo, to the cache
        running.query("example.test", "A")
    assert upstream.count("example.test", "A") == 1
    frozen.advance(275)  # 278 s old of 300: in the last tenth of its life
    assert ttl_of(running.query("example.test", "A")) == 22  # served from the cache...
    deadline = time.monotonic() + 3
    while upstream.count("example.test", "A") < 2:  # ...and refreshed in the background
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.1)
    frozen.advance(1)
    assert ttl_of(running.query("example.test", "A")) == 299  # the fresh copy
    assert running.resolver.cache.prefetches == 1


def test_a_large_cache_is_sharded_and_stays_bounded() -> None:
    import dns.message
    import dns.rrset

    from resolver.core.cache import Cache, shard_count
    from resolver.core.wire import scan_response

    assert shard_count(2) == 1 and shard_count(4096) == 1  # small caches: exact LRU
    assert shard_count(100_000) == 32 and shard_count(10**8) == 256
    query = dns.message.make_query("example.test", "A")
    reply = dns.message.make_response(query)
    reply.answer.append(dns.rrset.from_text("example.test.", 300, "IN", "A", "192.0.2.1"))
    wire = reply.to_wire()
    question = wire[12 : 12 + len(query.question[0].name.to_wire()) + 4]
    scan = scan_response(wire, query.id, question)
    cache = Cache(max_entries=50_000)
    now = 1000.0
    keep = b"\x04keep\x04test\x00\x00\x01\x00\x01\x00\x00"
    cache.admit(keep, scan, now, float("inf"))
    for i in range(80_000):
        cache.admit(b"\x01x" + i.to_bytes(4, "big") + b"\x04test\x00rest", scan, now, 1e12)
        if i % 1000 == 0:
            assert cache.get(keep, now) is not None  # used often: never the LRU of its shard
    assert 45_000 <= len(cache) <= 50_000 + 31
    assert cache.evictions == 80_001 - len(cache)
    assert cache.get(keep, now) is not None
    assert cache.flush(b"\x04keep\x04test\x00") == 1 and cache.get(keep, now) is None
    before = len(cache)
    assert cache.flush() == before and len(cache) == 0


def test_a_stored_entry_comes_back_whole_and_the_cache_is_no_work_for_the_gc() -> None:
    """Entries are kept packed in bytes (see resolver.cache): what comes back serves the
    same bytes as the entry that went in, at any age; and no shard is tracked by the
    garbage collector, so that a full collection never walks the cache."""
    import gc

    import dns.message
    import dns.rrset

    from resolver.core.cache import Cache
    from resolver.core.wire import scan_response

    query = dns.message.make_query("www.example.test", "A")
    reply = dns.message.make_response(query)
    reply.answer.append(
        dns.rrset.from_text("www.example.test.", 600, "IN", "CNAME", "edge.cdn.test.")
    )
    reply.answer.append(
        dns.rrset.from_text("edge.cdn.test.", 60, "IN", "A", "192.0.2.1", "192.0.2.2")
    )
    reply.authority.append(dns.rrset.from_text("cdn.test.", 300, "IN", "NS", "ns.cdn.test."))
    wire = reply.to_wire()
    question = wire[12 : 12 + len(query.question[0].name.to_wire()) + 4]
    scan = scan_response(wire, query.id, question)
    scan.source = "upstream.example.gov:853 (tls)"
    cache = Cache(max_entries=10_000)
    key = b"\x03www\x07example\x04test\x00\x00\x01\x00\x01\x00\x00"
    fresh = cache.admit(key, scan, 1000.0, float("inf"))
    stored = cache.get(key, 1000.5)
    assert stored is not None and stored is not fresh
    for name in ("chain", "addresses", "upstream", "flags", "rcode", "an", "ns", "ar", "body"):
        assert getattr(stored, name) == getattr(fresh, name), name
    assert stored.ttl_offsets == fresh.ttl_offsets and stored.ttls == fresh.ttls
    assert (stored.stored, stored.expires) == (1000.0, 1060.0)
    assert len(stored.addresses) == 2 and len(stored.chain) == 2
    for age in (0.0, 1.0, 59.0):
        assert stored.records(1000.0 + age) == fresh.records(1000.0 + age)
    for i in range(5000):
        cache.admit(i.to_bytes(4, "big") + key, scan, 1000.0, float("inf"))
    gc.collect()
    assert not any(gc.is_tracked(shard) for shard in cache._shards)
    assert all(type(blob) is bytes for shard in cache._shards for blob in shard.values())


def test_an_error_in_the_udp_fast_path_costs_one_answer_at_most_not_the_listener(
    make_server: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture, udp: UDPConfig
) -> None:
    """The Python paths lose the answer whose handling failed. The C event
    (resolver/_fastudp.c) reads the memo's clock before it reads the socket: a fault
    there loses the event, and the query waiting in the socket is answered at the next."""
    server = make_server(udp=udp)
    query = dns.message.make_query("deepseek.com", "A")
    assert server.send(query).rcode() == dns.rcode.NXDOMAIN  # now in the memo
    resolver = server.resolver
    clock = resolver.clock
    calls = []

    def broken() -> float:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return clock()

    resolver.clock = broken
    try:
        reply = server.send(query, timeout=0.5)
        assert reply.rcode() == dns.rcode.NXDOMAIN  # (the C event: the next one answers)
    except dns.exception.Timeout:
        pass  # (a Python path: that answer is lost)
    finally:
        resolver.clock = clock
    assert calls  # the fault did happen
    assert "internal error answering a UDP query" in caplog.text
    assert "a bug" in caplog.text  # with its cause
    assert server.send(query).rcode() == dns.rcode.NXDOMAIN  # the listener lives on
