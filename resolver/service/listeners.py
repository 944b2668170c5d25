"""UDP and TCP listeners: thin protocol classes around :meth:`Resolver.handle`.

TCP follows RFC 7766: two-byte length framing, several queries in flight per connection and
answered as each is ready (a slow upstream answer does not hold back the others), and an idle
timeout. Each connection is bounded, whatever the client does (see TCPConnection):
- queries in flight (``tcp.max_pipeline``): answers awaited from upstream and answers given
  at once in the same turn of the loop both count; at the limit reading pauses;
- pending output (``tcp.max_output``): above it reading pauses until the client has read
  most of it; output that does not drain within the idle timeout, or that grows past four
  times the mark, gets the connection aborted (not closed gracefully: that would wait for a
  flush that never comes, holding the memory);
- bytes received but not answered: one incomplete frame (under 64 KiB by construction), and
  while reading is paused, the rest of one read.
The connection cap (``tcp.max_connections``, ``tcp.max_connections_per_client``) always makes
room for a new client, evicting the oldest idle connection first and, when all are busy, the
oldest busy one (see TCPConnections). Every eviction, abort and pause is counted.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Container
from math import inf
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from ..core.guard import EVERYONE
from ..core.memo import S_CLIENTS, S_MEMO
from ..core.pending import Pending
from ..defaults import (
    DEFAULT_TCP_IDLE,
    DEFAULT_TCP_MAX_CONNECTIONS,
    DEFAULT_TCP_MAX_OUTPUT,
    DEFAULT_TCP_MAX_PER_CLIENT,
    DEFAULT_TCP_MAX_PIPELINE,
)
from .sockopts import dont_fragment

if TYPE_CHECKING:
    from ..config import Listen
    from ..core.memo import AnswerMemo, Memo
    from ..observe.counts import Counts

log = logging.getLogger("resolver.transport")

Handler = Callable[[bytes, str, bool], bytes | Pending | None]


class FastSource(Protocol):
    """What the UDP fast path reads of the resolver (core.pipeline.Resolver): its memo."""

    memo: AnswerMemo


#: Pending output over this many times max_output aborts the connection: answers from
#: upstream still arrive while reading is paused, and a client that does not read them must
#: not make them pile up.
OUTPUT_ABORT: Final = 4
#: Bytes held while reading is paused: frames waiting for their turn are at most one read
#: (asyncio and uvloop read 256 KiB at a time); more means the transport kept reading.
MAX_HELD: Final = 1024 * 1024


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
    memo is answered here, without a call into the resolver, by the memo's one lookup
    (AnswerMemo.fast_answer), if the client is let in (``fast_clients``). This is the path
    of blocked names and cache hits under load: it costs a third of a full call into
    Resolver.handle (bench/hotpath.py), whose own memo check covers everything else.
    """

    def __init__(self, handler: Handler, tasks: Tasks, fast: FastSource | None = None) -> None:
        self.handle = handler
        self.tasks = tasks
        #: The resolver's answer memo (one object for the resolver's life), for the fast path.
        self.fast = fast.memo if fast is not None else None
        self.transport: asyncio.DatagramTransport | None = None
        #: False while shutting down: answers in progress still go out, new queries do not.
        self.accepting = True
        #: The same socket (a duplicate descriptor), for answers sent straight from here.
        self._direct: socket.socket | None = None

    def stop_accepting(self) -> None:
        """Shutting down: answers in progress still go out, new queries do not."""
        self.accepting = False

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
            if fast is not None:
                # (The memo's state read directly, as fast_answer does: no property calls.)
                state = fast.fast_state
                memo: Memo | None = state[S_MEMO]  # type: ignore[assignment]
                clients: Container[str] = state[S_CLIENTS]  # type: ignore[assignment]
                if (
                    memo is not None
                    and (key := data[2:]) in memo  # (no call for a miss)
                    and (clients is EVERYONE or addr[0] in clients)
                ):
                    body = fast.fast_answer(key)
                    if body is not None:
                        self._sendto(data[:2] + body, addr)
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
    """The open TCP connections of all listeners, oldest first, with their limits.

    Room for a new client is always made: over ``max_connections_per_client`` the client's
    own oldest connection goes (idle first); over ``max_connections`` the oldest idle
    connection of anyone, and when every one is busy, the oldest busy one (its queries in
    progress are lost; the client asks again). Connections holding queries to a slow upstream
    therefore never lock new clients out. Every eviction, every stalled connection aborted
    and every pause of reading is counted here (see :meth:`count_into`).
    """

    def __init__(
        self,
        max_connections: int = DEFAULT_TCP_MAX_CONNECTIONS,
        idle_timeout: float = DEFAULT_TCP_IDLE,
        max_pipeline: int = DEFAULT_TCP_MAX_PIPELINE,
        max_output: int = DEFAULT_TCP_MAX_OUTPUT,
        max_per_client: int = DEFAULT_TCP_MAX_PER_CLIENT,
    ) -> None:
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.max_pipeline = max_pipeline
        #: Pending output (bytes) above which a connection stops reading; below a quarter
        #: of it, reading resumes; above OUTPUT_ABORT times it, the connection is aborted.
        self.max_output = max_output
        self.abort_at = OUTPUT_ABORT * max_output
        self.max_per_client = max_per_client  # 0: no per-client limit
        self.open: dict[TCPConnection, None] = {}  # insertion order = age
        self.by_client: dict[str, dict[TCPConnection, None]] = {}
        #: Connections closed to make room: oldest idle, oldest busy, client over its limit.
        self.evicted_idle = 0
        self.evicted_busy = 0
        self.evicted_client = 0
        #: Connections aborted: output not drained within the idle timeout (stalled), or
        #: over OUTPUT_ABORT x max_output (output).
        self.aborted_stalled = 0
        self.aborted_output = 0
        #: Times reading stopped: pending output over max_output, or max_pipeline reached.
        self.paused_output = 0
        self.paused_pipeline = 0
        self._noted = -inf  # when an abort was last logged (at most one line a minute)
        self._unnoted = 0

    def admit(self, conn: TCPConnection) -> bool:
        """Register ``conn``, first making room for it (see the class docstring)."""
        mine = self.by_client.get(conn.peer)
        if mine is None:
            mine = self.by_client[conn.peer] = {}
        if self.max_per_client and len(mine) >= self.max_per_client:
            idle = next((c for c in mine if c.pending == 0), None)
            self.evicted_client += 1
            self._evict(idle if idle is not None else next(iter(mine)))
        elif len(self.open) >= self.max_connections:
            victim = next((c for c in self.open if c.pending == 0), None)
            if victim is None:
                victim = next(iter(self.open))
                self.evicted_busy += 1
            else:
                self.evicted_idle += 1
            self._evict(victim)
        self.open[conn] = None
        mine[conn] = None
        return True

    def _evict(self, victim: TCPConnection) -> None:
        self.forget(victim)  # gone now, not when connection_lost runs
        victim.shut()

    def forget(self, conn: TCPConnection) -> None:
        """``conn`` is closed (or about to be): it no longer counts."""
        forget_connection(self.open, self.by_client, conn, conn.peer)

    def note_abort(self, peer: str, why: str) -> None:
        """Log an aborted connection: one line a minute at most, with how many were not."""
        now = perf_counter()
        if now - self._noted < 60.0:
            self._unnoted += 1
            return
        more = f" (and {self._unnoted} more since the last such line)" if self._unnoted else ""
        log.warning("aborted a TCP connection from %s: %s%s", peer, why, more)
        self._noted = now
        self._unnoted = 0

    def count_into(self, counts: Counts) -> Counts:
        """Add what the TCP listeners counted to ``counts`` (for /metrics); return it."""
        counts.tcp_connections += len(self.open)
        counts.tcp_evicted_idle += self.evicted_idle
        counts.tcp_evicted_busy += self.evicted_busy
        counts.tcp_evicted_client += self.evicted_client
        counts.tcp_aborted_stalled += self.aborted_stalled
        counts.tcp_aborted_output += self.aborted_output
        counts.tcp_paused_output += self.paused_output
        counts.tcp_paused_pipeline += self.paused_pipeline
        return counts

    def stop_reading(self) -> None:
        for conn in list(self.open):
            conn.stop_reading()

    def close_all(self) -> None:
        for conn in list(self.open):
            conn.close()


class TCPConnection(asyncio.Protocol):
    """One client connection: frames in, answers out in whatever order they are ready.

    Reading stops while any of these holds, and resumes when none does:
    - the queries in flight reach ``max_pipeline``: the answers awaited from upstream plus
      the answers given at once (blocked names, memo and cache hits) since the loop last
      had a turn to send them (so that one segment of 20,000 frames is answered a pipeline
      at a time, in turns, instead of all in one callback);
    - the pending output is over ``max_output`` (the transport's high-water mark; asyncio
      calls :meth:`pause_writing`) until it falls under a quarter of it (:meth:`resume_writing`):
      a client that sends queries and never reads its answers makes the server stop reading
      them, not queue answers without end;
    - the server is shutting down.
    Output that does not drain within the idle timeout, or that grows past OUTPUT_ABORT
    times ``max_output`` (answers from upstream still arrive while reading is stopped),
    gets the connection aborted: a graceful close would wait for a flush that never comes.
    """

    def __init__(self, handler: Handler, tasks: Tasks, registry: TCPConnections) -> None:
        self.handle = handler
        self.tasks = tasks
        self.registry = registry
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        #: Answers awaited from upstream.
        self.pending = 0
        #: Answers given at once since the loop last had a turn (see the class docstring).
        self.burst = 0
        self.paused = False  # reading is paused (for whichever reason)
        #: When pending output went over max_output (asyncio's pause_writing); 0: it is not.
        self.blocked_since = 0.0
        self.last_active = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.turn: asyncio.Handle | None = None  # the next turn's framing, when scheduled
        self.draining = False
        self.peer = ""
        self.partial_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        limit = self.registry.max_output
        self.transport.set_write_buffer_limits(high=limit, low=limit // 4)
        if not self.registry.admit(self):
            self.transport.abort()
            return
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        self.timer = loop.call_later(self.registry.idle_timeout, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.forget(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.turn is not None:
            self.turn.cancel()
        self.transport = None
        self.buffer.clear()

    def close(self) -> None:
        """Close gracefully: what is pending is sent first."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def shut(self) -> None:
        """Close; abort when output is still pending (a client that is not reading would
        hold it, and the connection, for ever)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def _abort(self, why: str) -> None:
        self.registry.forget(self)
        self.registry.note_abort(self.peer, why)
        if self.transport is not None:
            self.transport.abort()

    def stop_reading(self) -> None:
        """Shutting down: take no new queries; close now if none is in progress."""
        self.draining = True
        if self.pending == 0:
            self.close()
        else:
            self._steer()

    def pause_writing(self) -> None:
        # Pending output is over max_output: the client is not reading as fast as it asks.
        self.blocked_since = asyncio.get_running_loop().time()
        self.registry.paused_output += 1
        transport = self.transport
        if transport is not None and not self.paused and not transport.is_closing():
            transport.pause_reading()
            self.paused = True

    def resume_writing(self) -> None:
        self.blocked_since = 0.0
        now = asyncio.get_running_loop().time()
        self.last_active = now
        if self.paused:
            self._frame(now)

    def _check_idle(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None:
            return
        now = asyncio.get_running_loop().time()
        timeout = self.registry.idle_timeout
        idle_for = now - self.last_active
        if self.blocked_since and now - self.blocked_since >= timeout:
            self._stalled(timeout)  # over max_output for a whole idle timeout
            return
        if self.pending == 0 and idle_for >= timeout:
            if transport.get_write_buffer_size():
                self._stalled(timeout)  # not reading what little was sent
                return
            self.close()
            return
        if self.buffer and not self.paused and now - self.partial_since >= timeout:
            # A message trickling in a byte at a time keeps a connection "active" but
            # never finishes: it gets the idle timeout to arrive whole.
            self.shut()
            return
        due = self.last_active + timeout
        if self.blocked_since:
            due = min(due, self.blocked_since + timeout)
        if self.buffer and not self.paused:
            due = min(due, self.partial_since + timeout)
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(max(0.05, due - now), self._check_idle)

    def _stalled(self, timeout: float) -> None:
        self.registry.aborted_stalled += 1
        self._abort(f"its answers were not read for {timeout:g} s")

    def data_received(self, data: bytes) -> None:
        now = asyncio.get_running_loop().time()
        self.last_active = now
        buf = self.buffer
        if not buf:
            self.partial_since = now
        buf += data
        self.burst = 0  # the loop had a turn since the last read: what was given went out
        if self.paused and len(buf) > MAX_HELD:
            # Bytes keep coming although reading is paused (a transport that does not
            # honour pause_reading): do not hold them without end.
            log.debug("closing a TCP connection from %s: %d bytes held", self.peer, len(buf))
            self.shut()
            return
        self._frame(now)

    def _frame(self, now: float) -> None:
        """Answer the complete frames in the buffer while nothing holds reading; then pause
        or resume reading. What is left is one incomplete frame (under 2 + 65535 bytes by
        construction) or, while reading is paused, frames that wait for their turn."""
        buf = self.buffer
        cap = self.registry.max_pipeline
        while len(buf) >= 2:
            if self.draining or self.blocked_since or self.pending + self.burst >= cap:
                break
            end = 2 + ((buf[0] << 8) | buf[1])
            if len(buf) < end:
                break
            message = bytes(buf[2:end])
            del buf[:end]
            self.partial_since = now
            self._answer(message)
            transport = self.transport
            if transport is None or transport.is_closing():
                return
        self._steer()

    def _steer(self) -> None:
        """Pause or resume reading as the class docstring says."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        cap = self.registry.max_pipeline
        if self.draining or self.blocked_since or self.pending + self.burst >= cap:
            if not self.paused:
                transport.pause_reading()
                self.paused = True
                if not self.draining and not self.blocked_since:
                    self.registry.paused_pipeline += 1
            if (
                self.pending < cap
                and self.turn is None
                and not self.draining
                and not self.blocked_since
            ):
                # Full of answers given at once: go on after the loop has had a turn.
                self.turn = asyncio.get_running_loop().call_soon(self._next_turn)
        elif self.paused:
            transport.resume_reading()
            self.paused = False

    def _next_turn(self) -> None:
        self.turn = None
        self.burst = 0
        if self.transport is not None:
            self._frame(asyncio.get_running_loop().time())

    def _answer(self, message: bytes) -> None:
        try:
            result = self.handle(message, self.peer, True)
        except Exception:
            log.exception("internal error answering a TCP query")
            return
        if result is None or isinstance(result, bytes):
            self.burst += 1
            if result is not None:
                self._send(result)
            return
        self.pending += 1
        self.tasks.spawn(self._reply_later(result))

    async def _reply_later(self, pending: Awaitable[bytes | None]) -> None:
        answer: bytes | None = None
        try:
            answer = await pending
        except Exception:
            log.exception("internal error answering a TCP query")
        finally:
            self.pending -= 1
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        now = asyncio.get_running_loop().time()
        self.last_active = now
        if answer is not None:
            self._send(answer)
        if self.paused and self.transport is not None:
            self._frame(now)  # take the frames that waited, and read again if nothing holds

    def _send(self, answer: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(len(answer).to_bytes(2, "big") + answer)
        # Answers from upstream still arrive while reading is paused: bound them too.
        if self.blocked_since and transport.get_write_buffer_size() > self.registry.abort_at:
            self.registry.aborted_output += 1
            self._abort(f"over {self.registry.abort_at} bytes of answers unread")


def make_socket(host: str, port: int, kind: socket.SocketKind, reuse_port: bool) -> socket.socket:
    """A bound, non-blocking socket. IPv6 sockets are IPv6-only, so that ``[::]`` and
    ``0.0.0.0`` can both be listed on one port; UDP ones send with DF (dont_fragment)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == socket.SOCK_DGRAM:
            dont_fragment(sock, family)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_message(proto: str, listen: Listen, exc: OSError) -> str:
    """Why a listener could not bind, with what to do about the usual causes."""
    hint = ""
    if exc.errno == errno.EACCES and listen.port < 1024:
        hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE; or use a port like 5353)"
    elif exc.errno == errno.EADDRINUSE:
        hint = " (another program listens there; stop it or choose another --listen)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        hint = " (no interface of this machine has that address)"
    return f"cannot listen on {proto} {listen}: {exc.strerror or exc}{hint}"


def forget_connection(
    open_: dict[Any, None], by_client: dict[str, dict[Any, None]], conn: object, peer: str
) -> None:
    """Take ``conn`` out of a listener's connection table (every open one, and those of
    each client address), dropping its client's entry when it was that client's last."""
    if conn in open_:
        del open_[conn]
        mine = by_client.get(peer)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del by_client[peer]
