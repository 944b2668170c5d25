"""The batched UDP listener (resolver/service/udpbatch.py) on real loopback sockets.

Queries are queued in the listener's socket before it starts reading, so that one
recvmmsg finds them all: the batches are what these tests are about. The handler is a
plain function that echoes each query as an answer (the resolver behind it is tested
through the server in test_protocol.py and test_cache.py, which run on both listeners).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import pytest

from resolver.core.pending import Pending
from resolver.observe.counts import Counts
from resolver.service import udpbatch
from resolver.service.listeners import Tasks

from .helpers.server import has_ipv6

pytestmark = pytest.mark.skipif(not udpbatch.available(), reason="no recvmmsg here")


def query(qid: int, size: int = 0) -> bytes:
    """A header with ``qid`` and a body of ``size`` bytes that names the ID again."""
    body = struct.pack("!H", qid) * max(1, size // 2)
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + body


def answer_to(data: bytes) -> bytes:
    return data[:2] + bytes([data[2] | 0x80, data[3]]) + data[4:]


class Echo:
    """Answers every query with itself as an answer; remembers who asked."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []

    def __call__(self, data: bytes, client: str, tcp: bool) -> bytes | Pending | None:
        self.seen.append((struct.unpack("!H", data[:2])[0], client))
        return answer_to(data)


def server_socket(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((host, 0))
    return sock


def clients(count: int, host: str = "127.0.0.1") -> list[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    made = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        sock.settimeout(2)
        made.append(sock)
    return made


def collect(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(65535) for _ in range(count)]


class Counted(udpbatch.BatchListener):
    """Notes how many queries the handler had seen after each readable event."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.after_each: list[int] = []
        super().__init__(*args, **kwargs)

    def _readable(self) -> None:
        super()._readable()
        self.after_each.append(len(self.handle.seen))  # type: ignore[attr-defined]


def run(test: Callable[[], Any]) -> Any:
    return asyncio.run(test())


@contextlib.asynccontextmanager
async def serving(
    handler: Any,
    queued: Iterable[bytes] = (),
    *,
    host: str = "127.0.0.1",
    kind: type[udpbatch.BatchListener] = udpbatch.BatchListener,
    tasks: Tasks | None = None,
    slots: int = udpbatch.SLOTS,
) -> AsyncIterator[tuple[Any, socket.socket, Any]]:
    """A listener on a fresh loopback socket, and one client: (listener, client, the
    listener's address). The ``queued`` queries are sent before the listener starts
    reading, so that they wait in its socket together. Both are closed at the end."""
    sock = server_socket(host)
    (asker,) = clients(1, host)
    where = sock.getsockname()
    for data in queued:
        asker.sendto(data, where)
    listener = kind(sock, handler, tasks or Tasks(), slots=slots)
    try:
        yield listener, asker, where
    finally:
        listener.close()
        asker.close()


def test_one_readable_event_answers_a_whole_batch_each_to_its_sender() -> None:
    async def main() -> None:
        sock = server_socket()
        where = sock.getsockname()
        askers = clients(3)
        for n, client in enumerate(askers):
            for i in range(20):
                client.sendto(query(n * 100 + i, 40), where)
        echo = Echo()
        listener = Counted(sock, echo, Tasks())
        await asyncio.sleep(0.05)
        try:
            # A quiet socket is read a few datagrams the plain way; finding more waiting,
            # the listener reads all the rest in one batch, in the next event.
            plain = udpbatch._PLAIN_READS
            assert listener.after_each[:2] == [plain, 60]
            for n, client in enumerate(askers):
                got = collect(client, 20)
                assert got == [answer_to(query(n * 100 + i, 40)) for i in range(20)]
            assert {client for _, client in echo.seen} == {"127.0.0.1"}
        finally:
            listener.close()
            for client in askers:
                client.close()

    run(main)


def test_more_queries_than_slots_take_rounds_then_the_next_event() -> None:
    async def main() -> None:
        sent = udpbatch._PLAIN_READS + 16 * udpbatch.ROUNDS + 5
        queued = [query(i) for i in range(sent)]
        async with serving(Echo(), queued, kind=Counted, slots=16) as (listener, asker, _):
            await asyncio.sleep(0.05)
            # The plain reads of a quiet socket, then ROUNDS full batches in an event,
            # then the rest in the next one.
            plain = udpbatch._PLAIN_READS
            assert listener.after_each[:3] == [plain, plain + 16 * udpbatch.ROUNDS, sent]
            assert collect(asker, sent) == [answer_to(query(i)) for i in range(sent)]

    run(main)


def test_a_quiet_socket_is_read_plainly_and_a_busy_one_in_batches() -> None:
    async def main() -> None:
        async with serving(Echo(), kind=Counted) as (listener, asker, where):
            modes = []
            for burst in (1, 3, 30, 5, 3, 1):
                for i in range(burst):
                    asker.sendto(query(i), where)
                await asyncio.sleep(0.03)
                assert collect(asker, burst) == [answer_to(query(i)) for i in range(burst)]
                modes.append(listener._busy)
            # A backlog (as many as the plain reads take, or more) switches to batches;
            # a batch of fewer switches back.
            assert modes == [False, False, True, True, False, False]

    run(main)


def test_the_sender_address_is_what_the_socket_module_reports() -> None:
    hosts = ["127.0.0.1"] + (["::1"] if has_ipv6() else [])
    for host in hosts:
        sock = server_socket(host)
        (asker,) = clients(1, host)
        asker.sendto(query(7), sock.getsockname())
        buffers = udpbatch.Buffers(4)
        try:
            count = udpbatch._LIBC.recvmmsg(sock.fileno(), buffers.recv_ptr, 4, 0x40, None)
            assert count == 1
            assert buffers.length(0) == len(query(7))
            assert buffers.address(0) == asker.getsockname()
        finally:
            buffers.close()
            sock.close()
            asker.close()


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 on loopback")
def test_ipv6_clients_get_their_answers_now_and_later() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        tasks = Tasks()
        seen: list[Any] = []

        def handler(data: bytes, client: str, tcp: bool) -> bytes | Pending | None:
            seen.append(client)
            if data[1] % 2:
                return answer_to(data)
            later = Pending()
            loop.call_later(0.02, later.deliver, answer_to(data))
            return later

        queued = [query(i) for i in range(10)]
        async with serving(handler, queued, host="::1", tasks=tasks) as (_, asker, _):
            await asyncio.sleep(0.15)
            assert seen == ["::1"] * 10
            got = sorted(collect(asker, 10))
            assert got == sorted(answer_to(query(i)) for i in range(10))
            assert not tasks.held  # every later answer was delivered and let go

    run(main)


def test_an_answer_larger_than_a_send_slot_goes_out_whole() -> None:
    async def main() -> None:
        sizes = [30, udpbatch.SEND_SIZE + 2000, 30]
        queued = [query(i, size) for i, size in enumerate(sizes)]
        async with serving(Echo(), queued) as (_, asker, _):
            await asyncio.sleep(0.05)
            got = collect(asker, 3)
            assert sorted(got) == sorted(answer_to(query(i, s)) for i, s in enumerate(sizes))

    run(main)


def test_a_failing_query_costs_its_own_answer_not_the_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        echo = Echo()

        def handler(data: bytes, client: str, tcp: bool) -> bytes | Pending | None:
            if data[1] == 3:
                raise RuntimeError("a bug")
            return echo(data, client, tcp)

        async with serving(handler, [query(i) for i in range(6)]) as (_, asker, where):
            await asyncio.sleep(0.05)
            got = collect(asker, 5)
            assert got == [answer_to(query(i)) for i in (0, 1, 2, 4, 5)]
            asker.sendto(query(9), where)  # and the listener lives on
            await asyncio.sleep(0.05)
            assert collect(asker, 1) == [answer_to(query(9))]

    with caplog.at_level(logging.ERROR):
        run(main)
    assert "internal error answering a UDP query" in caplog.text


def test_answers_that_wait_for_room_keep_their_order_and_the_queue_is_bounded() -> None:
    async def main() -> None:
        async with serving(Echo()) as (listener, asker, _):
            where = asker.getsockname()
            # As when sendmmsg found the send buffer full: answers wait in the queue,
            # and one sent later (a Pending answer) goes behind them, not before.
            for i in range(3):
                listener._enqueue(answer_to(query(i)), where)
            listener._sendto(answer_to(query(3)), where)
            assert len(listener._queue) == 4
            await asyncio.sleep(0.05)  # the writer callback drains the queue
            assert not listener._queue and not listener._writing
            assert collect(asker, 4) == [answer_to(query(i)) for i in range(4)]
            for _ in range(udpbatch.MAX_QUEUED + 10):
                listener._enqueue(b"x", where)
            assert len(listener._queue) == udpbatch.MAX_QUEUED
            assert listener.answers_dropped == 10  # (resolver_udp_answers_dropped_total)
            counts = udpbatch.count_into([listener], Counts())
            assert counts.udp_answers_dropped == 10

    run(main)


def test_while_shutting_down_queries_are_read_but_not_answered() -> None:
    async def main() -> None:
        echo = Echo()
        async with serving(echo) as (listener, asker, where):
            asker.settimeout(0.2)
            listener.stop_accepting()
            asker.sendto(query(1), where)
            await asyncio.sleep(0.05)
            assert echo.seen == []
            with pytest.raises(TimeoutError):
                asker.recv(512)
            listener.close()
            listener.close()  # twice is harmless (and a third time on the way out)
            listener._sendto(b"late", asker.getsockname())  # and a late answer is dropped

    run(main)


def test_late_answers_of_one_turn_go_out_together_even_beyond_a_batch() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        tasks = Tasks()
        later: list[tuple[Pending, bytes]] = []

        def handler(data: bytes, client: str, tcp: bool) -> bytes | Pending | None:
            answer = Pending()
            later.append((answer, answer_to(data)))
            return answer

        def deliver_all() -> None:  # as when upstream replies land in one epoll wake-up
            for answer, wire in later:
                answer.deliver(wire)

        sent = 40  # more than the 16 slots: the flush sends in chunks
        queued = [query(i) for i in range(sent)]
        async with serving(handler, queued, tasks=tasks, slots=16) as (listener, asker, where):
            await asyncio.sleep(0.05)
            assert len(later) == sent and len(tasks.held) == sent
            loop.call_soon(deliver_all)
            await asyncio.sleep(0.05)
            assert collect(asker, sent) == [answer_to(query(i)) for i in range(sent)]
            assert not tasks.held
            # An answer that lands just before the listener closes still goes out.
            asker.sendto(query(99), where)
            await asyncio.sleep(0.05)
            answer, wire = later[-1]
            answer.deliver(wire)
            listener.close()
            assert collect(asker, 1) == [answer_to(query(99))]

    run(main)


class Refusing:
    """The C library as a seccomp filter leaves it: the batch calls fail with ENOSYS
    (``refuse`` names which); the others go through to the real ones."""

    def __init__(self, *refuse: str) -> None:
        self.refuse = refuse
        self.real = udpbatch._LIBC

    def __getattr__(self, name: str) -> Any:
        if name not in self.refuse:
            return getattr(self.real, name)

        def refused(*args: Any) -> int:
            ctypes.set_errno(errno.ENOSYS)
            return -1

        return refused


@pytest.mark.parametrize("refused", ["recvmmsg", "sendmmsg"])
def test_a_system_that_refuses_batches_gets_every_answer_one_by_one(
    refused: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(udpbatch, "_LIBC", Refusing(refused))

    async def main() -> None:
        async with serving(Echo()) as (listener, asker, where):
            for burst in (30, 30):  # a backlog: batches are tried, then given up
                for i in range(burst):
                    asker.sendto(query(i), where)
                await asyncio.sleep(0.1)
                got = collect(asker, burst)
                assert sorted(got) == sorted(answer_to(query(i)) for i in range(burst))
            assert not listener._batching

    with caplog.at_level(logging.WARNING):
        run(main)
    assert f"the system refused {refused}" in caplog.text
    assert caplog.text.count("the system refused") == 1
