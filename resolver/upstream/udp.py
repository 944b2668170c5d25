"""DNS over UDP to an upstream, and the TCP fallback for a truncated reply.

Spoofing resistance (RFC 5452): each upstream query gets a random ID and its own socket,
connected to the upstream, so the kernel picks a random source port and delivers only
datagrams from the upstream's address and port; a datagram whose ID or question differ is
ignored and the wait goes on. A truncated reply is never final: the question is asked again
over TCP.
"""

from __future__ import annotations

import _socket
import asyncio
import select
from collections.abc import Callable
from typing import Any, Final

from ..core.wire import (
    FLAG_TC,
    RCODE_FORMERR,
    RCODE_NOTIMP,
    FormatError,
    Mismatch,
    Query,
    Scan,
    scan_response,
)
from .base import (
    NETWORK,
    TIMEOUT,
    TRUNCATED,
    Owner,
    UpstreamError,
    query_id,
    register,
    upstream_query,
)
from .endpoints import Upstream
from .tcp import TCPTransport

_MAX_UDP: Final = 65535
# (Final values read once: module attributes of _socket and select are dictionary lookups
# at every use in the compiled build, three of them a query.)
_SOCKET: Final = _socket.socket
_DATAGRAM: Final = _socket.SOCK_DGRAM | _socket.SOCK_NONBLOCK
_EPOLLIN: Final = select.EPOLLIN if hasattr(select, "EPOLLIN") else 1


#: How an exchange ends: ``finish(exchange, scan, failure, detail)``, once.
Finish = Callable[["Exchange", Scan | None, str, str], None]


class Exchange:
    """One UDP question to one upstream from a socket of its own, until its reply or its
    timeout; then ``finish(exchange, scan, failure, detail)`` is called once. The
    forwarder's callback path keeps what it needs then in the exchange itself (``q``,
    ``deadline``, ``started``, ``done``, ``arg``), rather than in a closure per query."""

    __slots__ = (
        "arg",
        "deadline",
        "done",
        "expires",
        "fd",
        "finish",
        "owner",
        "q",
        "qid",
        "question",
        "sock",
        "started",
        "timeout",
        "timer",
        "up",
        "watch",
    )

    def __init__(
        self,
        owner: Owner,
        up: Upstream,
        qid: int,
        question: bytes,
        timeout: float,
        finish: Finish,
    ) -> None:
        self.owner = owner
        self.up = up
        self.sock: _socket.socket | None = None
        self.fd = -1
        self.qid = qid
        self.question = question
        self.timeout = timeout
        self.finish = finish
        self.expires = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.watch: ReadWatch | None = None
        self.q: Query | None = None
        self.deadline = 0.0
        self.started = 0.0
        self.done: Callable[[Any, Scan | None], None] | None = None
        self.arg: Any = None

    def readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        while True:
            try:
                data = sock.recv(_MAX_UDP)
            except BlockingIOError:
                return
            except OSError as exc:  # ICMP port unreachable and friends
                self.end(None, NETWORK, str(exc))
                return
            try:
                scan = scan_response(data, self.qid, self.question)
            except (Mismatch, FormatError) as exc:
                self.owner.ignored(self.up, exc)
                continue
            self.end(scan, "", "")
            return

    def expire(self) -> None:
        self.end(None, TIMEOUT, f"no answer in {self.timeout:.2f} s")

    def end(self, scan: Scan | None, failure: str, detail: str) -> None:
        watch = self.watch
        if watch is None:
            return  # ended already
        watch.forget(self)
        if self.sock is not None:
            self.sock.close()  # which takes it out of the epoll set too
        self.finish(self, scan, failure, detail)


class ReadWatch:
    """The exchanges waiting for a reply: their sockets are watched for reading through
    one epoll set, which the event loop watches (adding a socket is one cheap system call,
    where the loop's own add_reader costs about 25 us a socket under uvloop, a poll handle
    each made and torn down; without epoll, not Linux, add_reader it is). Their timeouts
    are one timer for them all: exchanges expire in the order they started when their
    timeouts are alike, the usual case, which spares a loop timer made and cancelled per
    query (2 us). One whose deadline comes before an earlier one's gets its own timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiting: dict[int, Exchange] = {}  # by descriptor
        #: Exchanges in the order of their deadlines (a dict as an ordered set).
        self.queue: dict[Exchange, None] = {}
        self._last = 0.0  # the latest deadline in the queue so far
        self._timer: asyncio.TimerHandle | None = None
        #: Questions to send at the end of this turn of the loop, with their exchanges.
        self._sends: list[tuple[Exchange, bytes]] = []
        self.epoll = select.epoll() if hasattr(select, "epoll") else None
        if self.epoll is not None:
            loop.add_reader(self.epoll.fileno(), self._ready)

    def add(self, exchange: Exchange, wire: bytes) -> None:
        """Watch ``exchange`` and send its question, ``wire``, at the end of this turn of
        the loop, with the other questions of the same turn: sent together, they wake
        the upstream's reader once, not once each (which cost the sender a few us of
        kernel time per query, as answers sent to clients one by one did)."""
        self._sends.append((exchange, wire))
        loop = self.loop
        if len(self._sends) == 1:
            loop.call_soon(self._send_all)
        expires = exchange.expires = loop.time() + exchange.timeout
        exchange.watch = self
        fd = exchange.fd
        if self.epoll is None:
            loop.add_reader(fd, exchange.readable)
        else:
            self.epoll.register(fd, _EPOLLIN)
        self.waiting[fd] = exchange
        if expires >= self._last:
            self._last = expires
            self.queue[exchange] = None
            if self._timer is None:
                self._timer = loop.call_at(expires, self._expire)
        else:
            exchange.timer = loop.call_at(expires, exchange.expire)

    def forget(self, exchange: Exchange) -> None:
        """Stop watching ``exchange``, whose socket the caller closes at once."""
        exchange.watch = None
        fd = exchange.fd
        if self.waiting.pop(fd, None) is not None and self.epoll is None:
            self.loop.remove_reader(fd)
        if exchange.timer is not None:
            exchange.timer.cancel()
            exchange.timer = None
        else:
            self.queue.pop(exchange, None)

    def close(self) -> None:
        """At shutdown: close what still waits (nobody waits for its answer any more)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for exchange in list(self.waiting.values()):
            self.forget(exchange)
            if exchange.sock is not None:
                exchange.sock.close()
        if self.epoll is not None and not self.epoll.closed:
            self.loop.remove_reader(self.epoll.fileno())
            self.epoll.close()

    def _expire(self) -> None:
        self._timer = None
        now = self.loop.time()
        queue = self.queue
        while queue:
            exchange = next(iter(queue))
            if exchange.expires > now:
                self._timer = self.loop.call_at(exchange.expires, self._expire)
                return
            exchange.expire()  # which takes it out of the queue

    def _send_all(self) -> None:
        sends, self._sends = self._sends, []
        for exchange, wire in sends:
            if exchange.watch is None:
                continue  # ended before it was sent (shutdown)
            try:
                if exchange.sock is not None:
                    exchange.sock.send(wire)
            except OSError as exc:
                exchange.end(None, NETWORK, str(exc))

    def _ready(self) -> None:
        assert self.epoll is not None
        waiting = self.waiting
        for fd, _ in self.epoll.poll(0):
            exchange = waiting.get(fd)
            if exchange is not None:  # None: ended by an earlier one of this batch
                exchange.readable()


class UDPTransport:
    """``udp://`` upstreams (the default): a datagram from a fresh socket each, again
    without EDNS for a server that refuses it, and over TCP when the reply is truncated."""

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self.tcp = TCPTransport(owner)
        #: The exchanges waiting for a reply, on the loop they run on.
        self.watch: ReadWatch | None = None

    def start(self, loop: asyncio.AbstractEventLoop, exchange: Exchange, wire: bytes) -> None:
        """Send ``wire`` from a fresh socket (a new random port, RFC 5452) and end
        ``exchange`` once: with the reply, or with None, the error kind and its detail.
        Replies with another ID or question are ignored (counted), not taken."""
        up = exchange.up
        try:
            # The C socket type, non-blocking from the start: socket.socket's Python-level
            # __init__ and close bookkeeping cost about 3 us per query, for nothing used.
            sock = _SOCKET(up.family, _DATAGRAM)
        except OSError as exc:  # out of file descriptors, say: a failed exchange
            exchange.finish(exchange, None, NETWORK, str(exc))
            return
        try:
            sock.connect(up.address)
        except OSError as exc:
            sock.close()
            exchange.finish(exchange, None, NETWORK, str(exc))
            return
        exchange.sock = sock
        exchange.fd = sock.fileno()
        watch = self.watch
        if watch is None or watch.loop is not loop:
            watch = self.watch = ReadWatch(loop)
        watch.add(exchange, wire)

    async def ask(
        self, up: Upstream, wire: bytes, qid: int, question: bytes, timeout: float
    ) -> Scan:
        """One exchange, awaited: the reply, or :class:`UpstreamError`."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Scan] = loop.create_future()

        def finish(_exchange: Exchange, scan: Scan | None, failure: str, detail: str) -> None:
            if done.done():
                return  # the caller gave up (cancelled)
            if scan is None:
                done.set_exception(UpstreamError(failure, detail))
            else:
                done.set_result(scan)

        self.start(loop, Exchange(self.owner, up, qid, question, timeout, finish), wire)
        return await done

    async def exchange(
        self, up: Upstream, q: Query, timeout: float, deadline: float, reply: Scan | None = None
    ) -> Scan:
        """The answer of ``up``; ``reply``: the one it already sent (the forwarder's
        callback path), which may need more work (truncated, EDNS refused)."""
        question = q.key + q.question[-4:]
        if reply is None:
            qid = query_id()
            scan = await self.ask(up, upstream_query(qid, q, True), qid, question, timeout)
        else:
            scan = reply
        if scan.rcode in (RCODE_FORMERR, RCODE_NOTIMP):
            # An old server that does not speak EDNS: ask again without it (RFC 6891 7).
            qid = query_id()
            scan = await self.ask(up, upstream_query(qid, q, False), qid, question, timeout)
        if scan.flags & FLAG_TC:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise UpstreamError(TRUNCATED, "no time left for TCP")
            qid = query_id()
            scan = await self.tcp.ask(up, upstream_query(qid, q, True), qid, question, left)
            if scan.flags & FLAG_TC:
                raise UpstreamError(TRUNCATED, "truncated over TCP too")
        return scan

    def close(self) -> None:
        """Close the sockets still waiting (nobody waits for their answers any more)."""
        if self.watch is not None:
            self.watch.close()


register("udp", UDPTransport)
