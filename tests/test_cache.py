"""The cache, seen from a client: TTLs count down, negatives per RFC 2308, bounds, and
forwarded answers that never outlive a ban's effective date."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import dns.rcode
import pytest

from resolver.config import CacheConfig

from .conftest import FROZEN_NOW, Clock, RunningServer
from .fakeupstream import Behaviour, FakeUpstream


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
    assert ttl_of(server.query("example.test", "A")) == 200
    frozen.advance(199)
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
