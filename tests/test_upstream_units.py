"""Upstream health and selection strategies, alone: no sockets, no server.

Health is one object keyed by upstream (resolver.upstream.health); strategies order the
upstreams not marked down (resolver.upstream.strategies)."""

from __future__ import annotations

import asyncio
import time

import dns.message
import dns.rcode
import pytest

from resolver.core.wire import parse_query, scan_response
from resolver.upstream.base import UpstreamError
from resolver.upstream.endpoints import Upstream, parse_upstream
from resolver.upstream.forwarder import Forwarder
from resolver.upstream.health import DOWN_AFTER, Health
from resolver.upstream.strategies import STRATEGIES, strategy_named

A, B, C = (Upstream(f"192.0.2.{n}") for n in (1, 2, 3))


async def never_asked(up: Upstream) -> None:
    raise AssertionError(f"{up} was probed")


def down(health: Health, up: Upstream, times: int = DOWN_AFTER) -> None:
    for _ in range(times):
        health.failed(up, "timeout")


def test_an_upstream_is_down_after_max_fails_transport_failures_in_a_row() -> None:
    health = Health(never_asked)
    health.adjust([A, B])
    down(health, A, DOWN_AFTER - 1)
    assert health.healthy(A) and health.failures(A.label) == DOWN_AFTER - 1
    assert A.label in health.troubled
    health.failed(A, "network")
    assert not health.healthy(A) and health.healthy(B)
    assert health.split([A, B, C]) == ([B, C], [A])


def test_a_reply_resets_the_failures_and_brings_it_back() -> None:
    health = Health(never_asked)
    health.adjust([A])
    health.max_fails = 2
    down(health, A, 2)
    assert not health.healthy(A)
    health.alive(A)
    assert health.healthy(A) and health.failures(A.label) == 0 and not health.troubled


def test_reconfiguring_keeps_the_state_of_remaining_upstreams_and_drops_the_rest() -> None:
    health = Health(never_asked)
    health.adjust([A, B])
    down(health, A)
    down(health, B)
    health.answered(A.label, 0.010)
    health.adjust([A, C])
    assert not health.healthy(A) and health.latency(A) == pytest.approx(0.010)
    assert B.label not in health.entries and B.label not in health.troubled
    assert health.healthy(B) and health.failures(B.label) == 0


def test_latency_is_a_moving_average_of_good_answers() -> None:
    health = Health(never_asked)
    assert health.latency(A) == 0.0
    health.answered(A.label, 0.100)
    health.answered(A.label, 0.200)
    assert health.latency(A) == pytest.approx(0.120)


def test_probes_back_off_then_bring_the_upstream_back() -> None:
    asked: list[float] = []

    async def ask(up: Upstream) -> None:
        asked.append(time.monotonic())
        if len(asked) < 3:
            raise UpstreamError("timeout", "still down")

    async def scenario() -> Health:
        health = Health(ask)
        health.adjust([A])
        health.probe_interval, health.probe_max_interval = 0.02, 0.05
        down(health, A)
        for _ in range(500):  # 5 s at most; about 0.1 s when the machine is idle
            if health.healthy(A):
                break
            await asyncio.sleep(0.01)
        return health

    health = asyncio.run(scenario())
    assert health.healthy(A) and len(asked) == 3
    assert health.probes == {(A.label, "failure"): 2, (A.label, "success"): 1}
    assert not health.probing()


def test_removing_an_upstream_stops_its_probes() -> None:
    async def scenario() -> None:
        health = Health(never_asked)
        health.adjust([A])
        health.probe_interval = 10.0
        down(health, A)
        probes = health.probing()
        assert len(probes) == 1
        health.adjust([B])
        await asyncio.sleep(0)
        assert probes[0].cancelled() and not health.probing()

    asyncio.run(scenario())


def reply(rcode: int) -> bytes:
    query = dns.message.make_query("example.test", "A")
    query.id = 7
    answer = dns.message.make_response(query)
    answer.set_rcode(rcode)
    return answer.to_wire()


def test_rcodes_never_mark_an_upstream_down() -> None:
    forwarder = Forwarder([A, B])
    forwarder.max_fails = 1
    q = parse_query(dns.message.make_query("example.test", "A").to_wire())
    question = q.key + q.question[-4:]
    for rcode in (dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.FORMERR, dns.rcode.NOTIMP):
        scan = scan_response(reply(rcode), 7, question)
        assert forwarder._accept(A, scan, time.perf_counter()) is None
    assert forwarder.healthy(A) and forwarder.failures[A.label] == 0
    assert forwarder.errors[(A.label, "rcode")] == 4
    # A transport failure, then a reply of any rcode: the transport works again.
    forwarder._failed(B, "timeout")
    assert not forwarder.healthy(B)
    forwarder._accept(B, scan_response(reply(dns.rcode.SERVFAIL), 7, question), 0.0)
    assert forwarder.healthy(B) and forwarder.failures[B.label] == 0


def test_the_forwarder_adjusts_health_to_new_upstreams_and_routes() -> None:
    forwarder = Forwarder([A, B], routes={"corp.example": [C]})
    for up in (A, B, C):
        down(forwarder.health, up)
    forwarder.upstreams = [A]
    assert not forwarder.healthy(A) and not forwarder.healthy(C) and forwarder.healthy(B)
    forwarder.routes = {}
    assert forwarder.healthy(C) and set(forwarder.health.entries) == {A.label}


def test_failover_and_parallel_keep_the_configured_order() -> None:
    health = Health(never_asked)
    for name, fanout in (("failover", 1), ("parallel", 2)):
        chosen = strategy_named(name)
        assert chosen.name == name and chosen.keeps_order and chosen.fanout == fanout
        assert chosen.order([A, B, C], health) == [A, B, C]


def test_random_is_a_permutation_that_varies() -> None:
    chosen = strategy_named("random")
    assert not chosen.keeps_order and chosen.fanout == 1
    orders = {tuple(chosen.order([A, B, C], Health(never_asked))) for _ in range(200)}
    assert all(sorted(o, key=str) == [A, B, C] for o in orders) and len(orders) > 1


def test_fastest_orders_by_latency_the_unmeasured_first() -> None:
    health = Health(never_asked)
    health.answered(A.label, 0.050)
    health.answered(B.label, 0.005)
    chosen = strategy_named("fastest")
    assert not chosen.keeps_order
    assert chosen.order([A, B, C], health) == [C, B, A]


def test_every_configurable_strategy_exists_and_no_other() -> None:
    assert [strategy_named(name).name for name in STRATEGIES] == list(STRATEGIES)
    with pytest.raises(ValueError, match="unknown upstream strategy"):
        strategy_named("round-robin")


def test_the_forwarder_puts_upstreams_marked_down_last_whatever_the_strategy() -> None:
    forwarder = Forwarder([A, B, C], strategy="fastest")
    forwarder.health.answered(C.label, 0.001)
    forwarder.health.answered(B.label, 0.002)
    forwarder.health.answered(A.label, 0.003)
    assert forwarder._order([A, B, C]) == ([C, B, A], [])
    down(forwarder.health, C)
    assert forwarder._order([A, B, C]) == ([B, A], [C])
    forwarder.strategy = "failover"
    assert forwarder.strategy == "failover"
    assert forwarder._order([A, B, C]) == ([A, B], [C])


def test_each_scheme_has_its_transport() -> None:
    forwarder = Forwarder([A])
    for text in ("192.0.2.9", "tcp://192.0.2.9", "tls://192.0.2.9", "https://192.0.2.9"):
        up = parse_upstream(text)
        assert up.transport in forwarder.transports
    assert forwarder.transports["udp"] is forwarder.udp
