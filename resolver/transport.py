"""UDP and TCP listeners: thin protocol classes around :meth:`Resolver.handle`.

TCP follows RFC 7766: two-byte length framing, several queries in flight per connection and
answered as each is ready (a slow upstream answer does not hold back the others), an idle
timeout, and a cap on connections that closes the oldest idle one first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Container
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from .metrics import BUCKETS
from .pending import Pending

if TYPE_CHECKING:
    from .chain import Info

log = logging.getLogger("resolver.transport")

Handler = Callable[[bytes, str, bool], bytes | Pending | None]

#: Fast-path answers slower than this (the first latency bucket) are counted one by one.
FAST_BOUND: Final = BUCKETS[0]


class _Everyone:
    """Every client: the fast path's access list when there is no guard."""

    def __contains__(self, client: object) -> bool:
        return True


EVERYONE: Final = _Everyone()


class FastSource(Protocol):
    """What the UDP fast path reads of the resolver (chain.Resolver)."""

    fast_memo: dict[bytes, tuple[bytes, float, int]] | None
    #: The memo entries' Info objects, by the slot that an entry holds.
    fast_infos: list[Info]
    fast_clients: Container[str]

    def clock(self) -> float: ...

    def memo_answered(self, info: Info, client: str, started: float) -> None: ...


DEFAULT_TCP_IDLE: Final = 10.0
DEFAULT_TCP_MAX_CONNECTIONS: Final = 1000
DEFAULT_TCP_MAX_PIPELINE: Final = 100
#: Bytes a connection may have received but not yet framed: one largest message and more.
MAX_BUFFERED: Final = 2 * (2 + 65535)


class Tasks:
    """The answers still being worked on, so that shutdown can wait for them."""

    def __init__(self) -> None:
        self.running: set[asyncio.Future[Any]] = set()
        #: Answers on their way from upstream, without a task (see pending.Pending).
        self.held: set[Pending] = set()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        return task

    async def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` for running answers; cancel the rest; return how many."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.running or self.held:
            left = end - loop.time()
            if left <= 0:
                break
            if self.running:
                await asyncio.wait(set(self.running), timeout=min(left, 0.05))
            else:
                await asyncio.sleep(min(left, 0.01))
        running, held = list(self.running), list(self.held)
        for task in running:
            task.cancel()
        for answer in held:
            answer.cancel()
        return len(running) + len(held)


class UDPListener(asyncio.DatagramProtocol):
    """One UDP socket. Synchronous answers are sent at once; others from a task.

    With ``fast`` (the resolver), a query whose bytes after the ID are in its UDP answer
    memo (``fast.fast_memo``) is answered here, without a call into the resolver: the
    memo's answer with the query's ID, if the client is let in (``fast.fast_clients``),
    the answer is still valid, and the audit log does not want it. Its counts go on the
    answer's Info and reach the counters at the next Resolver.fold(). This is the path
    of blocked names and cache hits under load: it costs a third of a full call into
    Resolver.handle (bench/hotpath.py), whose own memo check covers everything else.
    """

    def __init__(self, handler: Handler, tasks: Tasks, fast: FastSource | None = None) -> None:
        self.handle = handler
        self.tasks = tasks
        self.fast = fast
        self.transport: asyncio.DatagramTransport | None = None
        #: False while shutting down: answers in progress still go out, new queries do not.
        self.accepting = True
        #: The same socket (a duplicate descriptor), for answers sent straight from here.
        self._direct: socket.socket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        # Answers go out through a plain socket's sendto: the loop's transport converts the
        # address tuple back into a sockaddr through its own caches on every send, which
        # cost about a tenth of the CPU of a blocked or cached answer (bench/core_bench.py).
        # The transport still sends when the socket buffer is full (it queues).
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._direct = socket.socket(sock.family, sock.type, fileno=os.dup(sock.fileno()))
            self._direct.setblocking(False)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.accepting:
            return
        fast = self.fast
        try:
            if fast is not None and self._fast(fast, data, addr):
                return
            result = self.handle(data, addr[0], False)
        except Exception:  # a bug must cost one answer, never the listener
            log.exception("internal error answering a UDP query")
            return
        if result is None:
            return
        if isinstance(result, bytes):
            self._sendto(result, addr)
            return
        result.then(self._sendto, addr, self.tasks.held)  # a Pending answer

    def _fast(self, fast: FastSource, data: bytes, addr: Any) -> bool:
        """Answer from the memo if the fast path may (see the class docstring)."""
        memo = fast.fast_memo
        if memo is None:
            return False
        started = perf_counter()
        hit = memo.get(data[2:])
        if hit is None:
            return False
        info = fast.fast_infos[hit[2]]
        if info.logged or addr[0] not in fast.fast_clients or fast.clock() >= hit[1]:
            return False
        answer = data[:2] + hit[0]
        elapsed = perf_counter() - started
        if elapsed < FAST_BOUND:
            info.fast += 1
            info.fast_time += elapsed
        else:  # (a pause): counted by the full path, in its own bucket
            fast.memo_answered(info, addr[0], started)
        self._sendto(answer, addr)
        return True

    def _sendto(self, answer: bytes | None, addr: Any) -> None:
        if answer is None:
            return
        # The direct socket is there from connection_made to connection_lost.
        direct = self._direct
        if direct is not None:
            try:
                direct.sendto(answer, addr)
                return
            except (BlockingIOError, InterruptedError):
                pass  # the buffer is full: the transport queues it
            except OSError as exc:
                self.error_received(exc)
                return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.sendto(answer, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (a client went away) are no reason to stop.
        log.debug("UDP error: %s", exc)


class TCPConnections:
    """The open TCP connections of all listeners, oldest first, with their limits."""

    def __init__(
        self,
        max_connections: int = DEFAULT_TCP_MAX_CONNECTIONS,
        idle_timeout: float = DEFAULT_TCP_IDLE,
        max_pipeline: int = DEFAULT_TCP_MAX_PIPELINE,
    ) -> None:
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.max_pipeline = max_pipeline
        self.open: dict[TCPConnection, None] = {}  # insertion order = age

    def admit(self, conn: TCPConnection) -> bool:
        """Register ``conn``; when over the cap, close the oldest idle connection first."""
        if len(self.open) >= self.max_connections:
            victim = next((c for c in self.open if c.pending == 0), None)
            if victim is None:
                return False
            victim.close()
            self.open.pop(victim, None)  # gone now, not when connection_lost runs
        self.open[conn] = None
        return True

    def stop_reading(self) -> None:
        for conn in self.open:
            conn.stop_reading()

    def close_all(self) -> None:
        for conn in list(self.open):
            conn.close()


class TCPConnection(asyncio.Protocol):
    """One client connection: frames in, answers out in whatever order they are ready."""

    def __init__(self, handler: Handler, tasks: Tasks, registry: TCPConnections) -> None:
        self.handle = handler
        self.tasks = tasks
        self.registry = registry
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.pending = 0
        self.paused = False
        self.last_active = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.draining = False
        self.peer = ""
        self.partial_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        if not self.registry.admit(self):
            self.transport.abort()
            return
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        self.timer = loop.call_later(self.registry.idle_timeout, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.open.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def stop_reading(self) -> None:
        """Shutting down: take no new queries; close now if none is in progress."""
        if self.pending == 0:
            self.close()
        elif self.transport is not None and not self.paused:
            self.transport.pause_reading()
            self.paused = True
        self.draining = True

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        idle_for = now - self.last_active
        if self.pending == 0 and idle_for >= self.registry.idle_timeout:
            self.close()
            return
        if self.buffer and now - self.partial_since >= self.registry.idle_timeout:
            # A message trickling in a byte at a time keeps a connection "active" but
            # never finishes: it gets the idle timeout to arrive whole.
            self.close()
            return
        wait = max(0.05, self.registry.idle_timeout - idle_for)
        self.timer = loop.call_later(wait, self._check_idle)

    def data_received(self, data: bytes) -> None:
        now = asyncio.get_running_loop().time()
        self.last_active = now
        buf = self.buffer
        if not buf:
            self.partial_since = now
        buf += data
        if len(buf) > MAX_BUFFERED:
            # More than a full message and then some, unread: not a DNS client.
            log.debug("closing a TCP connection from %s: %d bytes buffered", self.peer, len(buf))
            self.close()
            return
        while len(buf) >= 2:
            size = (buf[0] << 8) | buf[1]
            if len(buf) < 2 + size:
                break
            message = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            self.partial_since = now
            self._answer(message)
            if self.transport is None or self.transport.is_closing():
                return
            if self.paused:
                break  # at the pipeline limit: the rest waits until answers go out

    def _answer(self, message: bytes) -> None:
        try:
            result = self.handle(message, self.peer, True)
        except Exception:
            log.exception("internal error answering a TCP query")
            return
        if result is None:
            return
        if isinstance(result, bytes):
            self._send(result)
            return
        self.pending += 1
        if self.pending >= self.registry.max_pipeline and not self.paused and self.transport:
            self.transport.pause_reading()  # bound the work one client can queue
            self.paused = True
        self.tasks.spawn(self._reply_later(result))

    async def _reply_later(self, pending: Awaitable[bytes | None]) -> None:
        try:
            answer = await pending
        except Exception:
            log.exception("internal error answering a TCP query")
            answer = None
        finally:
            self.pending -= 1
            self.last_active = asyncio.get_running_loop().time()
            if (
                self.paused
                and not self.draining
                and self.transport is not None
                and not self.transport.is_closing()
            ):
                self.transport.resume_reading()
                self.paused = False
                if len(self.buffer) >= 2:
                    self.data_received(b"")  # frame what arrived while paused
        if answer is not None:
            self._send(answer)

    def _send(self, answer: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(len(answer).to_bytes(2, "big") + answer)


def make_socket(host: str, port: int, kind: socket.SocketKind, reuse_port: bool) -> socket.socket:
    """A bound, non-blocking socket. IPv6 sockets are IPv6-only, so that ``[::]`` and
    ``0.0.0.0`` can both be listed on one port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
