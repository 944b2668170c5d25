"""UDP exchanges with upstreams share one epoll set and one timer (upstream.udp.ReadWatch):
each still ends on time, with its reply or its own timeout, in whatever order they were
started, and a shutdown closes the sockets still waiting. The questions of one turn of
the loop are sent together at its end."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator

import dns.message
import pytest

from resolver.core.wire import Scan, parse_query
from resolver.upstream.base import query_id, upstream_query
from resolver.upstream.endpoints import Upstream
from resolver.upstream.forwarder import Forwarder
from resolver.upstream.udp import Exchange


def ask(forwarder: Forwarder, up: Upstream, qid: int, finish: Callable[..., None]) -> None:
    """Start an exchange for example.test A with ID ``qid`` and a 5 s timeout."""
    q = parse_query(dns.message.make_query("example.test", "A").to_wire())
    question = q.key + q.question[-4:]
    loop = asyncio.get_running_loop()
    exchange = Exchange(forwarder, up, qid, question, 5.0, finish)
    forwarder.udp.start(loop, exchange, upstream_query(qid, q, True))


@pytest.fixture
def silent() -> Iterator[socket.socket]:
    """An upstream that reads and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def test_timeouts_fire_on_time_whatever_the_order(silent: socket.socket) -> None:
    up = Upstream("127.0.0.1", silent.getsockname()[1])
    forwarder = Forwarder([up])
    q = parse_query(dns.message.make_query("example.test", "A").to_wire())
    question = q.key + q.question[-4:]

    async def scenario() -> list[tuple[str, float, str]]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        ended: list[tuple[str, float, str]] = []
        done = asyncio.Event()

        def finisher(name: str):  # type: ignore[no-untyped-def]
            def finish(_ex: Exchange, scan: Scan | None, failure: str, detail: str) -> None:
                assert scan is None
                ended.append((name, round(loop.time() - started, 1), failure))
                if len(ended) == 4:
                    done.set()

            return finish

        # Alike timeouts share the queue; a shorter one after a longer one gets its own
        # timer and must not wait for the longer one.
        for name, timeout in (("a", 0.6), ("b", 0.6), ("short", 0.2), ("c", 0.8)):
            qid = query_id()
            wire = upstream_query(qid, q, True)
            exchange = Exchange(forwarder, up, qid, question, timeout, finisher(name))
            forwarder.udp.start(loop, exchange, wire)
            await asyncio.sleep(0)
        await asyncio.wait_for(done.wait(), 3)
        watch = forwarder.udp.watch
        assert watch is not None and not watch.waiting and not watch.queue
        await forwarder.close()
        return ended

    ended = asyncio.run(scenario())
    assert ended == [
        ("short", 0.2, "timeout"),
        ("a", 0.6, "timeout"),
        ("b", 0.6, "timeout"),
        ("c", 0.8, "timeout"),
    ]


def test_close_closes_the_sockets_still_waiting(silent: socket.socket) -> None:
    up = Upstream("127.0.0.1", silent.getsockname()[1])
    forwarder = Forwarder([up])
    finished: list[str] = []

    async def scenario() -> None:
        for _ in range(3):
            ask(
                forwarder,
                up,
                query_id(),
                lambda _ex, scan, failure, detail: finished.append(failure),
            )
        watch = forwarder.udp.watch
        assert watch is not None and len(watch.waiting) == 3
        socks = [exchange.sock for exchange in watch.waiting.values()]
        await forwarder.close()
        assert all(sock.fileno() == -1 for sock in socks)
        assert not watch.waiting and not watch.queue
        await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert finished == []  # nobody is told: the answers were given up on before


def test_questions_of_one_turn_leave_together_and_a_failed_send_ends_its_exchange(
    silent: socket.socket,
) -> None:
    up = Upstream("127.0.0.1", silent.getsockname()[1])
    forwarder = Forwarder([up])
    finished: list[tuple[int, str]] = []
    silent.setblocking(False)

    async def scenario() -> None:
        qids = [query_id() for _ in range(5)]
        for qid in qids:
            ask(
                forwarder,
                up,
                qid,
                lambda _ex, scan, failure, detail, i=qid: finished.append((i, failure)),
            )
        with pytest.raises(BlockingIOError):
            silent.recv(512)  # nothing sent yet: the questions wait for the turn's end
        watch = forwarder.udp.watch
        assert watch is not None
        # One of them cannot be sent (its socket shut for writing): it ends at once as a
        # network failure; the others go out.
        broken = next(e for e in watch.waiting.values() if e.qid == qids[2])
        assert broken.sock is not None
        broken.sock.shutdown(socket.SHUT_WR)
        await asyncio.sleep(0.05)
        got = set()
        while True:
            try:
                got.add(int.from_bytes(silent.recv(512)[:2], "big"))
            except BlockingIOError:
                break
        assert got == set(qids) - {qids[2]}
        assert finished == [(qids[2], "network")]
        assert len(watch.waiting) == 4
        await forwarder.close()

    asyncio.run(scenario())


def test_query_ids_are_random_16_bit_numbers() -> None:
    ids = [query_id() for _ in range(20000)]  # across several refills of the pool
    assert all(0 <= i < 65536 for i in ids)
    assert len(set(ids)) > 15000  # about 17,300 distinct expected from 20,000 draws
