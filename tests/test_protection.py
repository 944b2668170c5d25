"""Protection: who may query, flood control with bounded state, answers that hide a banned
name behind a CNAME, and hostile packets against the running server."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.rcode
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resolver.config import AclConfig, RateLimitConfig

from .helpers.fakeupstream import FakeUpstream
from .helpers.server import RunningServer


def from_address(
    server: RunningServer, source: str, name: str, timeout: float = 1.0, **make: object
) -> dns.message.Message | None:
    query = dns.message.make_query(name, "A", **make)  # type: ignore[arg-type]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.sendto(query.to_wire(), (server.host, server.port))
        try:
            return dns.message.from_wire(sock.recv(65535))
        except TimeoutError:
            return None


@pytest.mark.parametrize(("action", "expect"), [("refuse", "REFUSED"), ("drop", None)])
def test_acl_refuses_or_drops_strangers(
    make_server: Callable[..., RunningServer], action: str, expect: str | None
) -> None:
    running = make_server(acl=AclConfig(("127.0.0.1/32",), action))
    assert from_address(running, "127.0.0.1", "example.test").rcode() == dns.rcode.NOERROR
    reply = from_address(running, "127.0.0.9", "example.test", timeout=0.3)
    if expect is None:
        assert reply is None
    else:
        assert reply is not None and dns.rcode.to_text(reply.rcode()) == expect
        assert reply.question[0].name.to_text() == "example.test."
    assert running.resolver.stats.stopped["acl"] == 1  # refused or dropped: the access list


def test_default_acl_allows_loopback_and_private_networks() -> None:
    from resolver.core.guard import PASS, REFUSE, Guard

    guard = Guard()
    for client in (
        "127.0.0.1",
        "::1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "fd00::1",
        "fe80::1",
        "::ffff:192.168.0.5",
    ):
        assert guard.check(client, False) == PASS, client
    for client in ("8.8.8.8", "2001:4860::8888", "172.32.0.1"):
        assert guard.check(client, False) == REFUSE, client


def flood(server: RunningServer, source: str, count: int, seconds: float) -> tuple[int, int]:
    """Send ``count`` queries from ``source`` as fast as possible (bounded in time too);
    return (answers, truncated answers) received."""
    wire = dns.message.make_query("deepseek.com", "A").to_wire()
    answers = truncated = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.setblocking(False)
        deadline = time.monotonic() + seconds
        sent = 0
        while sent < count and time.monotonic() < deadline:
            sock.sendto(wire, (server.host, server.port))
            sent += 1
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                time.sleep(0.005)
                continue
            answers += 1
            truncated += bool(data[2] & 0x02)
    return answers, truncated


def test_a_flooding_client_is_limited_and_others_are_not(
    make_server: Callable[..., RunningServer],
) -> None:
    running = make_server(ratelimit=RateLimitConfig(qps=20, burst=20))
    answered, _ = flood(running, "127.0.0.3", 400, 2.0)
    assert answered <= 60  # the burst, and what refilled meanwhile
    # The kernel may drop some of the flood before the server reads it; most reach it.
    assert running.resolver.stats.stopped["dropped"] >= 100
    # Another client is not slowed: every one of its queries is answered at once.
    for _ in range(10):
        reply = from_address(running, "127.0.0.4", "example.test", timeout=1.0)
        assert reply is not None and reply.rcode() == dns.rcode.NOERROR
    # Over TCP the same flooding client still gets in (real clients retry there).
    assert running.query("example.test", "A", tcp=True, host="127.0.0.1").rcode() == 0


def test_over_the_limit_can_answer_tc_so_real_clients_retry_over_tcp(
    make_server: Callable[..., RunningServer],
) -> None:
    running = make_server(ratelimit=RateLimitConfig(qps=5, burst=5, over_limit="truncate"))
    answered, truncated = flood(running, "127.0.0.5", 100, 2.0)
    # Every query that reached the server got an answer, nearly all of them TC=1.
    assert answered >= 50 and truncated >= answered - 10


def test_rate_limit_state_is_bounded(make_server: Callable[..., RunningServer]) -> None:
    running = make_server(ratelimit=RateLimitConfig(qps=100, burst=100, max_clients=50))
    for index in range(150):
        from_address(running, f"127.0.1.{index + 1}", "deepseek.com", timeout=1.0)
    assert running.resolver.guard.tracked <= 50


@pytest.fixture
def aliased(upstream: FakeUpstream) -> FakeUpstream:
    upstream.records[("alias.test", "CNAME")] = ["chat.deepseek.com."]
    upstream.records[("chat.deepseek.com", "A")] = ["203.0.113.7"]
    upstream.records[("hop.test", "CNAME")] = ["alias.test."]
    upstream.records[("fine.test", "CNAME")] = ["example.test."]
    return upstream


@pytest.mark.parametrize("name", ["alias.test", "hop.test"])
def test_a_cname_chain_through_a_banned_name_is_blocked(
    server: RunningServer, aliased: FakeUpstream, name: str
) -> None:
    for _ in range(2):  # forwarded, then from the cache
        reply = server.query(name, "A", use_edns=0)
        assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer
        (ede,) = [o for o in reply.options if o.otype == 15]
        assert "deepseek" in ede.text
    assert server.resolver.stats.blocked["deepseek"] == 2


def test_a_harmless_cname_chain_is_answered(server: RunningServer, aliased: FakeUpstream) -> None:
    reply = server.query("fine.test", "A")
    assert reply.rcode() == dns.rcode.NOERROR
    assert [rrset.rdtype for rrset in reply.answer] == [5, 1]


def test_a_chain_is_checked_against_the_policy_in_force(
    server: RunningServer, aliased: FakeUpstream, lists_dir: Path
) -> None:
    assert server.query("fine.test", "A").rcode() == dns.rcode.NOERROR  # cached now
    (lists_dir / "ex.yaml").write_text("list: ex\ndomains: [example.test]\n")
    assert server.call(server.server.reload())
    assert server.query("fine.test", "A").rcode() == dns.rcode.NXDOMAIN


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    header=st.binary(min_size=12, max_size=12),
    body=st.binary(max_size=80),
)
def test_any_packet_gets_formerr_an_answer_or_silence_and_the_server_lives_on(
    server: RunningServer, header: bytes, body: bytes
) -> None:
    data = header[:2] + bytes([header[2] & 0x7F]) + header[3:] + body  # a query, not a reply
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.05)
        sock.sendto(data, (server.host, server.port))
        try:
            raw = sock.recv(65535)
        except TimeoutError:
            raw = None
    if raw is not None:
        assert raw[:2] == data[:2] and raw[2] & 0x80  # our reply to that query
    good = dns.message.make_query("deepseek.com", "A")
    assert server.send(good).rcode() == dns.rcode.NXDOMAIN


def test_garbage_over_tcp_then_a_valid_query(server: RunningServer) -> None:
    with socket.create_connection((server.host, server.port), timeout=3) as sock:
        for size in (0, 1, 5, 11, 300):
            sock.sendall(struct.pack("!H", size) + b"\xff" * size)
        good = dns.message.make_query("deepseek.com", "A").to_wire()
        sock.sendall(struct.pack("!H", len(good)) + good)
        while True:
            size = struct.unpack("!H", sock.recv(2, socket.MSG_WAITALL))[0]
            reply = dns.message.from_wire(sock.recv(size, socket.MSG_WAITALL))
            if reply.rcode() == dns.rcode.NXDOMAIN:
                break


def test_an_answer_address_inside_a_listed_network_is_blocked(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream, lists_dir: Path
) -> None:
    (lists_dir / "nets.yaml").write_text(
        "list: nets\nreference: hosting of banned services\nnetworks: [192.0.2.1/32, '2001:db8::/64']\n"
    )
    running = make_server()
    for name, rtype in (("example.test", "A"), ("example.test", "AAAA")):
        reply = running.query(name, rtype, use_edns=0)
        assert reply.rcode() == dns.rcode.NXDOMAIN, (name, rtype)
        (ede,) = [o for o in reply.options if o.otype == 15]
        assert "nets" in ede.text
    assert running.query("www.example.test", "A").rcode() == dns.rcode.NOERROR  # 192.0.2.2


@pytest.mark.parametrize("enabled", [True, False])
def test_rebinding_protection(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream, enabled: bool
) -> None:
    from resolver.config import RebindingConfig

    upstream.records[("evil.test", "A")] = ["10.0.0.5"]
    upstream.records[("db.corp.test", "A")] = ["10.0.0.6"]
    upstream.records[("loop.test", "AAAA")] = ["::ffff:127.0.0.1"]
    running = make_server(rebinding=RebindingConfig(enabled, ("corp.test",)))
    expect = dns.rcode.NXDOMAIN if enabled else dns.rcode.NOERROR
    assert running.query("evil.test", "A").rcode() == expect
    assert running.query("loop.test", "AAAA").rcode() == expect
    assert running.query("db.corp.test", "A").rcode() == dns.rcode.NOERROR  # internal zone
    assert running.query("example.test", "A").rcode() == dns.rcode.NOERROR  # public address


def test_a_stale_answer_gets_the_cname_check_too(
    make_server: Callable[..., RunningServer], aliased: FakeUpstream, lists_dir: Path
) -> None:
    from resolver.config import CacheConfig

    from .helpers.fakeupstream import Behaviour
    from .helpers.server import FROZEN_NOW

    running = make_server(cache=CacheConfig(serve_stale=3600, stale_timer=0.2))
    running.clock.now = FROZEN_NOW
    aliased.records[("side.test", "CNAME")] = ["evil.test."]
    aliased.records[("evil.test", "A")] = ["203.0.113.7"]
    assert running.query("side.test", "A").rcode() == dns.rcode.NOERROR  # cached, allowed
    (lists_dir / "evil.yaml").write_text("list: evil\ndomains: [evil.test]\n")
    assert running.call(running.server.reload())
    running.clock.advance(400)  # expired; the upstream is down: only the stale copy is left
    aliased.default = Behaviour("drop")
    assert running.query("side.test", "A", timeout=5).rcode() == dns.rcode.NXDOMAIN


def test_the_tcp_connection_cap_holds_for_a_burst(
    make_server: Callable[..., RunningServer],
) -> None:
    from resolver.config import TCPConfig

    running = make_server(tcp=TCPConfig(max_connections=4, idle_timeout=30))
    socks = [socket.create_connection((running.host, running.port), timeout=5) for _ in range(40)]
    try:
        time.sleep(0.3)
        assert len(running.server.connections.open) <= 4
    finally:
        for sock in socks:
            sock.close()
