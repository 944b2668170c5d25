"""Forwarding under faults: failover, timeouts, truncation, spoofing, garbage, sharing."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dns.flags
import dns.rcode
import pytest

from resolver.upstream.endpoints import parse_upstream

from .helpers.fakeupstream import Behaviour, FakeUpstream
from .helpers.server import RunningServer
from .helpers.wait import wait_until


def dead_port() -> str:
    """A loopback UDP port with nobody behind it (ICMP port unreachable comes back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_failover_to_the_next_upstream_when_the_first_is_down(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream
) -> None:
    running = make_server(upstreams=(parse_upstream(dead_port()), parse_upstream(upstream.address)))
    reply = running.query("example.test", "A")
    assert reply.rcode() == dns.rcode.NOERROR
    assert running.resolver.forwarder.error_count("network") >= 1


def test_failover_when_the_first_upstream_is_silent(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream
) -> None:
    silent = FakeUpstream(default=Behaviour("drop"))
    try:
        running = make_server(
            upstreams=(parse_upstream(silent.address), parse_upstream(upstream.address))
        )
        started = time.monotonic()
        reply = running.query("example.test", "A")
        elapsed = time.monotonic() - started
        assert reply.rcode() == dns.rcode.NOERROR
        assert 0.3 <= elapsed < 1.5  # one per-try timeout (0.4 s), then the second upstream
        assert running.resolver.forwarder.error_count("timeout") == 1
    finally:
        silent.close()


@pytest.mark.parametrize("mode", ["drop", "servfail", "refused", "formerr", "garbage"])
def test_all_upstreams_failing_gives_servfail_in_bounded_time(
    server: RunningServer, upstream: FakeUpstream, mode: str
) -> None:
    upstream.behaviours["example.test"] = Behaviour(mode)
    started = time.monotonic()
    reply = server.query("example.test", "A", timeout=5)
    elapsed = time.monotonic() - started
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert elapsed < 1.5 + 0.5  # the configured deadline, with slack for a busy machine
    # SERVFAIL is not cached: once the upstream recovers, so does the answer.
    upstream.behaviours.clear()
    assert server.query("example.test", "A").rcode() == dns.rcode.NOERROR


def test_default_deadline_is_under_three_seconds(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream
) -> None:
    from resolver.upstream.forwarder import DEFAULT_DEADLINE, DEFAULT_TIMEOUT

    running = make_server(upstream_timeout=DEFAULT_TIMEOUT, upstream_deadline=DEFAULT_DEADLINE)
    upstream.default = Behaviour("drop")
    started = time.monotonic()
    reply = running.query("example.test", "A", timeout=6)
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - started < 3.0


def test_truncated_upstream_answer_is_retried_over_tcp(
    server: RunningServer, upstream: FakeUpstream
) -> None:
    upstream.behaviours["example.test"] = Behaviour("truncate")
    reply = server.query("example.test", "A")
    assert "TC" not in dns.flags.to_text(reply.flags)
    assert [rd.to_text() for rd in reply.answer[0]] == ["192.0.2.1"]
    assert upstream.count("example.test", "A", "udp") == 1
    assert upstream.count("example.test", "A", "tcp") == 1
    # What was cached is the TCP answer, never the truncated copy.
    again = server.query("example.test", "A")
    assert again.answer and upstream.count("example.test", "A") == 2


def test_spoofed_replies_are_ignored(server: RunningServer, upstream: FakeUpstream) -> None:
    upstream.behaviours["example.test"] = Behaviour("spoof")
    reply = server.query("example.test", "A")
    assert [rd.to_text() for rd in reply.answer[0]] == ["192.0.2.1"]  # never 6.6.6.6
    # Wrong ID and wrong question were read and ignored; the other port never got through.
    errors = server.resolver.forwarder.errors
    assert sum(n for (_, kind), n in errors.items() if kind in ("mismatch", "malformed")) == 2


def test_identical_queries_in_flight_share_one_upstream_query(
    server: RunningServer, upstream: FakeUpstream
) -> None:
    upstream.behaviours["example.test"] = Behaviour(delay=0.3)
    results: list[int] = []

    def ask() -> None:
        results.append(server.query("example.test", "A").rcode())

    threads = [threading.Thread(target=ask) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [dns.rcode.NOERROR] * 10
    assert upstream.count("example.test", "A") == 1


def test_each_upstream_query_uses_a_fresh_source_port_and_id(
    server: RunningServer, upstream: FakeUpstream
) -> None:
    for index in range(8):
        server.query(f"n{index}.test", "A")
    assert len(upstream.sources) == 8
    # Random, not merely different: the kernel picks each port from about 28,000 and the
    # ID is one of 65,536, so one repeat among 8 comes by chance (CI saw it once in
    # about a thousand runs); a reused socket or a fixed ID would repeat every time.
    assert len({port for port, _ in upstream.sources}) >= 7
    assert len({qid for _, qid in upstream.sources}) >= 7


def test_conditional_forwarding_by_longest_zone(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream, lists_dir: Path
) -> None:
    corp = FakeUpstream(
        records={("db.corp.test", "A"): ["10.1.1.1"], ("x.lab.corp.test", "A"): ["10.9.9.9"]}
    )
    lab = FakeUpstream(records={("x.lab.corp.test", "A"): ["10.2.2.2"]})
    try:
        (lists_dir / "corp.yaml").write_text("list: corp\ndomains: [blocked.corp.test]\n")
        running = make_server(
            forward=(
                ("corp.test", (parse_upstream(corp.address),)),
                ("lab.corp.test", (parse_upstream(lab.address),)),
            )
        )
        assert running.query("db.corp.test").answer[0][0].to_text() == "10.1.1.1"
        assert running.query("x.lab.corp.test").answer[0][0].to_text() == "10.2.2.2"
        assert running.query("example.test").answer[0][0].to_text() == "192.0.2.1"
        # The policy applies before forwarding, whatever the zone.
        assert running.query("blocked.corp.test").rcode() == dns.rcode.NXDOMAIN
        assert corp.count("blocked.corp.test") == 0
        assert upstream.count("db.corp.test") == 0 and corp.count("example.test") == 0
    finally:
        corp.close()
        lab.close()


@pytest.mark.parametrize("strategy", ["failover", "random", "fastest", "parallel"])
def test_strategies_answer_and_skip_a_dead_upstream(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream, strategy: str
) -> None:
    silent = FakeUpstream(default=Behaviour("drop"))
    try:
        running = make_server(
            upstreams=(parse_upstream(silent.address), parse_upstream(upstream.address)),
            upstream_strategy=strategy,
        )
        for index in range(6):
            assert running.query(f"n{index}.test", timeout=5).rcode() == dns.rcode.NXDOMAIN
        forwarder = running.resolver.forwarder
        if strategy in ("failover", "parallel"):
            time.sleep(0.6)  # parallel: the silent upstream's attempts time out meanwhile
            # Marked down after three failures in a row, then skipped while it rests.
            assert not forwarder.healthy(forwarder.upstreams[0])
            for index in range(3):
                running.query(f"m{index}.test", timeout=5)
            # (It is probed meanwhile, but asked no client's question.)
            assert sum(silent.count(f"m{index}.test") for index in range(3)) == 0
    finally:
        silent.close()


def test_parallel_takes_the_first_good_answer(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream
) -> None:
    slow = FakeUpstream(
        records={("example.test", "A"): ["192.0.2.99"]}, default=Behaviour(delay=0.3)
    )
    try:
        running = make_server(
            upstreams=(parse_upstream(slow.address), parse_upstream(upstream.address)),
            upstream_strategy="parallel",
        )
        started = time.monotonic()
        reply = running.query("example.test")
        assert time.monotonic() - started < 0.25
        assert reply.answer[0][0].to_text() == "192.0.2.1"
        # It was asked too (its thread may note it a moment after the answer came back).
        wait_until(lambda: slow.count("example.test") >= 1, 2.0)
        assert slow.count("example.test") == 1
    finally:
        slow.close()


def test_a_down_upstream_is_probed_again_and_comes_back(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream
) -> None:
    running = make_server()
    forwarder = running.resolver.forwarder
    # Silence (a transport failure) marks it down; an rcode would not (an answer is one).
    upstream.default = Behaviour("drop")
    for index in range(2):
        running.query(f"d{index}.test", timeout=5)
    assert not forwarder.healthy(forwarder.upstreams[0])
    upstream.default = Behaviour()
    deadline = time.monotonic() + 5
    while running.query("example.test", timeout=5).rcode() != dns.rcode.NOERROR:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert forwarder.healthy(forwarder.upstreams[0])


@pytest.mark.parametrize(
    ("text", "label", "transport", "port", "name"),
    [
        ("192.0.2.1", "192.0.2.1:53", "udp", 53, None),
        ("udp://192.0.2.1:5300", "192.0.2.1:5300", "udp", 5300, None),
        ("tcp://[2001:db8::1]", "tcp://[2001:db8::1]:53", "tcp", 53, None),
        (
            "tls://192.0.2.1#dns.example",
            "tls://192.0.2.1:853#dns.example",
            "tls",
            853,
            "dns.example",
        ),
        ("tls://[2001:db8::1]:8853", "tls://[2001:db8::1]:8853", "tls", 8853, None),
    ],
)
def test_upstream_addresses(
    text: str, label: str, transport: str, port: int, name: str | None
) -> None:
    up = parse_upstream(text)
    assert (up.label, up.transport, up.port, up.tls_name) == (label, transport, port, name)


@pytest.mark.parametrize(
    "text",
    [
        "https://dns.example:0/dns-query",
        "tls://dns.example#other.example",  # a host name is checked itself
        "udp://dns.example",  # plain upstreams by address only
        "tls://bad_name!",
        "udp://192.0.2.1#x",
        "192.0.2.1:0",
    ],
)
def test_bad_upstream_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_upstream(text)
