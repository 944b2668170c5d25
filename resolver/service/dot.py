"""DNS over TLS for clients (RFC 7858): the TCP listener's connections inside TLS.

Each connection is a :class:`TCPConnection` (framing, pipelining, answers out of order,
idle timeout, max_pipeline, max_output: see service/listeners.py) whose bytes pass through
asyncio's TLS. The TLS handshake is done first, by ``loop.start_tls`` with a time bound,
so that every failure is seen here and counted by reason; only a completed handshake makes
a connection, which then gets the client id from the TLS server name
(``{id}.{tls.client_id_domain}``) and pads its answers when the query asks (RFC 8467).

Bounds: handshakes in progress (as many as ``tcp.max_connections``; more are refused,
counted as ``busy``), each within :data:`HANDSHAKE_TIMEOUT`; open connections in a table of
their own with the ``tcp`` limits (so that a flood of DoT clients never evicts plain TCP
ones, nor the other way round); the bytes that arrive between the end of the handshake and
the connection taking over (:data:`MAX_EARLY`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

from ..config import Listen, TCPConfig
from ..core.padding import pad_response, wants_padding
from ..core.pending import Pending
from ..core.stats import PROTO_DOT
from .assembly import make_connections
from .certs import CertStore, client_id_from_sni
from .listeners import Tasks, TCPConnection, TCPConnections, make_socket

log = logging.getLogger("resolver.transport")

#: Seconds a client has to complete the TLS handshake (a client that stops half way holds
#: a socket and a handshake slot no longer than this).
HANDSHAKE_TIMEOUT: Final = 10.0
#: Seconds a closing connection waits for the client's TLS close_notify (asyncio's default
#: is 30): a client that never answers it holds the socket no longer than this.
SHUTDOWN_TIMEOUT: Final = 5.0
#: Bytes held between the end of the handshake and the connection taking over (one read).
MAX_EARLY: Final = 512 * 1024
#: The reasons a handshake fails, the label values of resolver_tls_handshake_failures_total.
FAILURE_REASONS: Final = ("timeout", "protocol", "version", "closed", "busy")

#: Resolver.handle: (data, client, tcp, proto, client_id) -> the answer.
Resolve = Callable[[bytes, str, bool, int, str], "bytes | Pending | None"]


def failure_reason(exc: BaseException) -> str:
    """The bounded label for why a handshake failed."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        # (WRONG_VERSION_NUMBER is what a client that does not speak TLS at all gets)
        if reason != "WRONG_VERSION_NUMBER" and ("VERSION" in reason or "UNSUPPORTED" in reason):
            return "version"
        return "protocol"
    if isinstance(exc, ConnectionAbortedError) and "handshake" in str(exc).lower():
        return "timeout"
    return "closed"


def _unused_handler(data: bytes, peer: str, tcp: bool) -> bytes | None:
    return None


async def _padded(pending: Awaitable[bytes | None]) -> bytes | None:
    answer = await pending
    return pad_response(answer) if answer is not None else None


class DoTConnection(TCPConnection):
    """A TCP connection whose queries are DoT queries of one client id, answers padded."""

    def __init__(
        self, resolve: Resolve, tasks: Tasks, registry: TCPConnections, client_id: str
    ) -> None:
        # (the plain handler is unused: _answer calls ``resolve`` with the transport and id)
        super().__init__(_unused_handler, tasks, registry)
        self.resolve = resolve
        self.client_id = client_id
        #: Framed answers of this turn of the loop, written together by _flush: one TLS
        #: record and one send for a pipeline's worth, where one each per answer cost
        #: about a third of the CPU of a blocked name over DoT (bench/encrypted.py). At
        #: most a turn's answers: max_pipeline given at once, and the upstream answers
        #: that arrived in the turn (each of a query in flight, also under max_pipeline).
        self._out: list[bytes] = []

    def _answer(self, message: bytes) -> None:
        pad = wants_padding(message)
        try:
            result = self.resolve(message, self.peer, True, PROTO_DOT, self.client_id)
        except Exception:
            log.exception("internal error answering a DoT query")
            return
        if result is None or isinstance(result, bytes):
            self.burst += 1
            if result is not None:
                self._send(pad_response(result) if pad else result)
            return
        self.pending += 1
        self.tasks.spawn(self._reply_later(_padded(result) if pad else result))

    def _send(self, answer: bytes) -> None:
        out = self._out
        out.append(len(answer).to_bytes(2, "big") + answer)
        if len(out) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        data = b"".join(out)
        out.clear()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        # Answers from upstream still arrive while reading is paused: bound them too.
        if self.blocked_since and transport.get_write_buffer_size() > self.registry.abort_at:
            self.registry.aborted_output += 1
            self._abort(f"over {self.registry.abort_at} bytes of answers unread")

    def close(self) -> None:
        self._flush()  # what this turn answered goes out before the close
        super().close()


class _Early(asyncio.Protocol):
    """Holds what the client sends right after its handshake, until the connection takes
    over (asyncio delivers it before ``start_tls`` returns)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost = False
        self.transport: asyncio.Transport | None = None

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > MAX_EARLY and self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class _Accept(asyncio.Protocol):
    """A new TCP connection, until its TLS handshake begins (then a :class:`DoTConnection`).

    Reading is paused at once, but uvloop may still deliver what it read in the same turn:
    those bytes (the start of the ClientHello) are kept and handed to the TLS protocol
    (:func:`_feed`); losing them would stall the handshake."""

    def __init__(self, listeners: DoTListeners) -> None:
        self.listeners = listeners
        self.data = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()  # start_tls takes the bytes from here on
        self.listeners.accepted(self.transport, self)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > MAX_EARLY and self.transport is not None:
            self.transport.abort()


def _feed(protocol: Any, data: bytes) -> None:
    """Hand ``data`` to ``protocol`` as if its transport had read it. Duck-typed: uvloop's
    TLS protocol has the buffered protocol's methods without being an asyncio class."""
    if hasattr(protocol, "buffer_updated"):
        view = memoryview(data)
        for _ in range(len(data) + 1):  # a byte at least per round
            if not view:
                break
            buf = memoryview(protocol.get_buffer(len(view)))
            size = min(len(buf), len(view))
            buf[:size] = view[:size]
            protocol.buffer_updated(size)
            view = view[size:]
    else:
        protocol.data_received(data)


class DoTListeners:
    """Every DoT listener of a server: sockets, handshakes in progress, connections."""

    def __init__(
        self,
        certs: CertStore,
        resolve: Resolve,
        tasks: Tasks,
        tcp: TCPConfig,
        client_id_domain: str = "",
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.certs = certs
        self.resolve = resolve
        self.tasks = tasks
        self.context = certs.context(("dot",))
        #: Open connections, with the tcp limits but a table of their own.
        self.connections = make_connections(tcp)
        self.client_id_domain = client_id_domain
        self.handshake_timeout = handshake_timeout
        self.max_handshakes = tcp.max_connections
        self.handshaking: set[asyncio.Task[None]] = set()
        self.servers: list[asyncio.Server] = []
        self.accepting = True

    async def bind(self, listen: Listen, reuse_port: bool) -> int:
        """Listen on ``listen`` (TCP); the port bound. Raises OSError."""
        sock = make_socket(listen.host, listen.port, socket.SOCK_STREAM, reuse_port)
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(lambda: _Accept(self), sock=sock, backlog=1024)
        except BaseException:
            sock.close()
            raise
        self.servers.append(server)
        return int(sock.getsockname()[1])

    def accepted(self, transport: asyncio.Transport, accept: _Accept) -> None:
        if not self.accepting or len(self.handshaking) >= self.max_handshakes:
            self.certs.handshake_failures["dot", "busy"] += 1
            transport.abort()
            return
        task = asyncio.ensure_future(self._handshake(transport, accept))
        self.handshaking.add(task)
        task.add_done_callback(self.handshaking.discard)

    async def _handshake(self, transport: asyncio.Transport, accept: _Accept) -> None:
        loop = asyncio.get_running_loop()
        early = _Early()
        early.transport = transport
        upgrade = asyncio.ensure_future(
            loop.start_tls(
                transport,
                early,
                self.context,
                server_side=True,
                ssl_handshake_timeout=self.handshake_timeout,
                ssl_shutdown_timeout=SHUTDOWN_TIMEOUT,
            )
        )
        try:
            # start_tls installs its TLS protocol in its first step and starts the
            # handshake one turn later (connection_made): then it takes what was read.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            if accept.data and not upgrade.done():
                _feed(transport.get_protocol(), bytes(accept.data))
                accept.data.clear()
            tls = await upgrade
        except asyncio.CancelledError:
            upgrade.cancel()
            transport.abort()
            raise
        except Exception as exc:
            self.certs.handshake_failures["dot", failure_reason(exc)] += 1
            log.debug("DoT handshake failed: %r", exc)
            transport.abort()
            return
        if tls is None or early.lost:  # pragma: no cover (gone right after its handshake)
            transport.abort()
            return
        self.certs.handshakes["dot"] += 1
        name = self.certs.server_name(tls.get_extra_info("ssl_object"))
        client_id = client_id_from_sni(name, self.client_id_domain)
        conn = DoTConnection(self.resolve, self.tasks, self.connections, client_id)
        early.transport = None
        tls.set_protocol(conn)
        conn.connection_made(tls)
        if early.data and conn.transport is not None:
            conn.data_received(bytes(early.data))

    def stop_reading(self) -> None:
        """Shutting down: accept no more, take no new queries."""
        self._stop_accepting()
        self.connections.stop_reading()

    def close(self) -> None:
        """Close the listeners and every connection."""
        self._stop_accepting()
        self.connections.close_all()
        self.servers.clear()

    def _stop_accepting(self) -> None:
        self.accepting = False
        for server in self.servers:
            server.close()
        for task in list(self.handshaking):
            task.cancel()


async def watch_certificate(
    certs: CertStore, interval: Callable[[], float], stopping: asyncio.Event
) -> None:
    """Reload the certificate when its files change, every ``interval()`` seconds (the
    file watcher's reload.interval), until ``stopping``."""
    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=max(0.05, interval()))
        if stopping.is_set():
            return
        try:
            certs.reload_if_changed()
        except Exception:  # a bug must not end the watching
            log.exception("internal error checking the TLS certificate files")
