"""DNS over QUIC connections (RFC 9250) on aioquic: one query per client-initiated
bidirectional stream, a 2-byte length before the message, the answer on the same stream,
then FIN. An answer is padded (RFC 9250 5.4, by RFC 8467's block policy: core/padding.py)
when its query carries an EDNS Padding option, as over DoT and DoH.

This module imports aioquic, the optional ``quic`` extra; :mod:`.doq` imports it only when
``doq.listen`` is set, so that the package runs without aioquic.

Bounds (each counted in :class:`DoQCounts` when hit):
- connections: ``max_connections``; a new connection's Initial packets beyond it are dropped
  before any cryptography is done for them;
- streams: at most ``max_streams`` queries open or awaiting their answer per connection;
  more are reset with DOQ_EXCESSIVE_LOAD;
- bytes: a stream carries one message (2 + 65535 bytes; bytes past its length prefix are
  a protocol error), and a connection holds at most MAX_BUFFERED bytes of unfinished
  queries, else it is closed with DOQ_EXCESSIVE_LOAD;
- time: the idle timeout closes quiet connections; a handshake that has not completed
  within it is closed, and a query still incomplete after it (a client trickling bytes
  to keep a connection busy) is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from aioquic import tls
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)

from ..core.padding import pad_response, wants_padding
from ..core.pending import Pending
from ..core.stats import PROTO_DOQ
from .certs import CertStore, client_id_from_sni

log = logging.getLogger("resolver")

#: RFC 9250 section 8.4 error codes.
DOQ_NO_ERROR: Final = 0x0
DOQ_INTERNAL_ERROR: Final = 0x1
DOQ_PROTOCOL_ERROR: Final = 0x2
DOQ_REQUEST_CANCELLED: Final = 0x3
DOQ_EXCESSIVE_LOAD: Final = 0x4

#: One DNS message and its length prefix: all a stream may carry.
MAX_STREAM_BYTES: Final = 2 + 65535
#: Bytes of unfinished queries one connection may hold (two of the largest messages):
#: real queries are a few hundred bytes, so only a hostile client comes near it.
MAX_BUFFERED: Final = 2 * MAX_STREAM_BYTES

Handler = Callable[[bytes, str, bool, int, str], Any]


@dataclass(slots=True)
class DoQCounts:
    """What the DoQ listeners have counted (bounds hit, faults), for status and metrics."""

    connections: int = 0  # connections accepted
    connections_refused: int = 0  # new connections over max_connections (Initials dropped)
    handshakes_timed_out: int = 0  # no completed handshake within the idle timeout
    streams_refused: int = 0  # queries over max_streams on one connection
    protocol_errors: int = 0  # non-zero DNS ID, bytes past the length, short message
    buffer_overflows: int = 0  # over MAX_BUFFERED bytes of unfinished queries: closed
    slow_streams: int = 0  # a query not complete within the idle timeout: cancelled
    handshakes: int = 0  # TLS handshakes completed
    handshake_failures: int = 0  # connections that ended before their handshake completed
    queries: int = 0


def configuration(cert: str, key: str, idle_timeout: float, max_streams: int) -> QuicConfiguration:
    """A server configuration for ALPN ``doq``; aioquic reads the PEM files itself."""
    config = QuicConfiguration(
        alpn_protocols=["doq"],
        is_client=False,
        idle_timeout=idle_timeout,
        # Flow control is the byte bound: one message per stream, max_streams per connection.
        max_stream_data=MAX_STREAM_BYTES,
        max_data=MAX_STREAM_BYTES * max_streams,
    )
    config.load_cert_chain(cert, key)
    return config


def _nothing() -> None:
    return None


class Limits:
    """The bounds and the counters that every connection of one listener set shares."""

    def __init__(
        self,
        handler: Handler,
        held: set[Pending],
        client_id_domain: str,
        max_connections: int,
        max_streams: int,
        idle_timeout: float,
    ) -> None:
        self.handler = handler
        self.held = held
        self.client_id_domain = client_id_domain
        self.max_connections = max_connections
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self.counts = DoQCounts()
        self.live = 0
        #: Where every encrypted listener counts its TLS handshakes (doq.py sets it).
        self.certs: CertStore | None = None
        #: Called before a long-header (handshake) packet is handled: a renewed
        #: certificate is then used for the connection it may open (doq.py sets it).
        self.certificate_check: Callable[[], object] = _nothing

    def handshake_failed(self, reason: str) -> None:
        """Count a failed handshake in the certificate store, as DoT and DoH do."""
        if self.certs is not None:
            self.certs.handshake_failures["doq", reason] += 1


def _failure_reason(error_code: int) -> str:
    """The reason label (as DoT's, service/dot.py) of a connection that ended before its
    handshake: a TLS alert (QUIC CRYPTO_ERROR 0x100 + alert) is ``version`` for
    protocol_version (70), else ``protocol``; any other end is the client leaving."""
    if 0x100 <= error_code <= 0x1FF:
        return "version" if error_code - 0x100 == 70 else "protocol"
    return "closed"


def _watch_server_name(connection: QuicConnection, seen: Callable[[str | None], None]) -> None:
    """Report the ClientHello's server name (SNI): aioquic's server reads it but keeps
    nothing of it. The hook wraps two of the connection's own methods on this one
    connection; the hello is parsed again from where aioquic is about to read it. With an
    aioquic that lacks these methods, connections are served without the name (no client
    id from it); tests/test_doq.py checks the name arrives with the aioquic installed."""
    initialize = getattr(connection, "_initialize", None)
    if initialize is None:  # another aioquic: serve without client ids from the name
        return

    def hooked_initialize(peer_cid: bytes) -> None:
        initialize(peer_cid)
        context = connection.tls
        handle_hello = getattr(context, "_server_handle_hello", None)
        if handle_hello is None:
            return

        def hooked_hello(input_buf: Any, initial_buf: Any, handshake_buf: Any) -> None:
            start = input_buf.tell()
            # A malformed hello: aioquic's own parse below fails the handshake.
            with contextlib.suppress(Exception):
                seen(tls.pull_client_hello(input_buf).server_name)
            input_buf.seek(start)
            handle_hello(input_buf, initial_buf, handshake_buf)

        context._server_handle_hello = hooked_hello  # type: ignore[method-assign]

    connection._initialize = hooked_initialize  # type: ignore[method-assign]


class DoQConnection(QuicConnectionProtocol):
    """One client's QUIC connection: streams in, answers out."""

    def __init__(self, quic: QuicConnection, limits: Limits, **kwargs: Any) -> None:
        super().__init__(quic, **kwargs)
        self.limits = limits
        self.peer = ""
        self.server_name: str | None = None
        self.client_id = ""
        self.ended = False
        #: Streams being read: their bytes so far (None: refused, ignored until it ends).
        self.reading: dict[int, bytearray | None] = {}
        #: When each stream being read began (for the slow-query check).
        self.started: dict[int, float] = {}
        self.buffered = 0  # bytes held in ``reading``
        self.slow_timer: asyncio.TimerHandle | None = None
        self.handshake_done = False
        #: Inside datagram_received, which sends what is due once the events are handled;
        #: else a send is scheduled once per loop turn (_send_soon), so that answers that
        #: arrive together leave in as few packets as they fit in.
        self.receiving = False
        self.send_scheduled = False
        self.answering = 0
        limits.live += 1
        limits.counts.connections += 1
        _watch_server_name(quic, self._named)
        loop = asyncio.get_running_loop()
        self.handshake_timer: asyncio.TimerHandle | None = loop.call_later(
            limits.idle_timeout, self._handshake_late
        )

    def _named(self, name: str | None) -> None:
        self.server_name = name

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if not self.peer:
            host = str(addr[0])
            self.peer = host[7:] if host.startswith("::ffff:") else host
        self.receiving = True
        try:
            super().datagram_received(data, addr)
        finally:
            self.receiving = False

    def _send_soon(self) -> None:
        if self.receiving or self.send_scheduled:
            return
        self.send_scheduled = True
        asyncio.get_running_loop().call_soon(self._send_now)

    def _send_now(self) -> None:
        self.send_scheduled = False
        if not self.ended:
            self.transmit()

    def _handshake_late(self) -> None:
        self.handshake_timer = None
        self.limits.counts.handshakes_timed_out += 1
        self.limits.handshake_failed("timeout")
        self._end()
        self.close(error_code=DOQ_PROTOCOL_ERROR, reason_phrase="handshake too slow")

    def _end(self) -> None:
        """Leave the connection count once, however the connection ends."""
        if not self.ended:
            self.ended = True
            self.limits.live -= 1
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
            self.handshake_timer = None
        if self.slow_timer is not None:
            self.slow_timer.cancel()
            self.slow_timer = None
        self._forget_all()

    def _forget(self, stream: int) -> None:
        buf = self.reading.pop(stream, None)
        self.started.pop(stream, None)
        if buf is not None:
            self.buffered -= len(buf)

    def _forget_all(self) -> None:
        self.reading.clear()
        self.started.clear()
        self.buffered = 0

    def _check_slow(self) -> None:
        """Cancel the queries that have taken the idle timeout to arrive; check again when
        the next one would."""
        self.slow_timer = None
        if self.ended:
            return
        now = asyncio.get_running_loop().time()
        timeout = self.limits.idle_timeout
        for stream, since in list(self.started.items()):
            if now - since >= timeout:
                self.limits.counts.slow_streams += 1
                self._forget(stream)
                self.reading[stream] = None  # ignored until the client ends it
                self._refuse(stream, DOQ_REQUEST_CANCELLED)
        if self.started:
            due = min(self.started.values()) + timeout
            loop = asyncio.get_running_loop()
            self.slow_timer = loop.call_later(max(0.05, due - now), self._check_slow)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            self._data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, HandshakeCompleted):
            self.handshake_done = True
            self.limits.counts.handshakes += 1
            if self.limits.certs is not None:
                self.limits.certs.handshakes["doq"] += 1
            if self.handshake_timer is not None:
                self.handshake_timer.cancel()
                self.handshake_timer = None
            self.client_id = client_id_from_sni(self.server_name, self.limits.client_id_domain)
        elif isinstance(event, StreamReset):
            self._forget(event.stream_id)
        elif isinstance(event, ConnectionTerminated):
            if not self.handshake_done and not self.ended:
                self.limits.counts.handshake_failures += 1
                self.limits.handshake_failed(_failure_reason(event.error_code))
            self._end()

    def _data(self, stream: int, data: bytes, end: bool) -> None:
        if stream % 4 != 0:
            # Only client-initiated bidirectional streams carry queries (RFC 9250 4.2).
            self._protocol_error("a query on a unidirectional stream")
            return
        reading = self.reading
        if stream not in reading:
            limits = self.limits
            if len(reading) + self.answering >= limits.max_streams:
                limits.counts.streams_refused += 1
                self._refuse(stream, DOQ_EXCESSIVE_LOAD)
                reading[stream] = None
            else:
                reading[stream] = bytearray()
                loop = asyncio.get_running_loop()
                self.started[stream] = loop.time()
                if self.slow_timer is None:
                    self.slow_timer = loop.call_later(limits.idle_timeout, self._check_slow)
        buf = reading[stream]
        if buf is None:
            if end:
                del reading[stream]
            return
        buf += data
        self.buffered += len(data)
        if self.buffered > MAX_BUFFERED:
            self.limits.counts.buffer_overflows += 1
            self._forget_all()
            self.close(error_code=DOQ_EXCESSIVE_LOAD, reason_phrase="too many bytes unfinished")
            return
        if len(buf) < 2:
            if end:
                self._protocol_error("a stream ended before its length")
            return
        size = 2 + ((buf[0] << 8) | buf[1])
        if len(buf) > size:
            self._protocol_error("bytes past the message's length")
        elif len(buf) == size:
            self._forget(stream)
            self._query(stream, bytes(buf[2:]))
        elif end:
            self._protocol_error("a stream ended inside its message")

    def _refuse(self, stream: int, code: int) -> None:
        try:
            self._quic.stop_stream(stream, code)
            self._quic.reset_stream(stream, code)
        except Exception:
            pass  # the stream is already gone
        self._send_soon()

    def _protocol_error(self, why: str) -> None:
        self.limits.counts.protocol_errors += 1
        log.debug("closing a DoQ connection from %s: %s", self.peer, why)
        self._forget_all()
        self.close(error_code=DOQ_PROTOCOL_ERROR, reason_phrase=why)

    def _query(self, stream: int, message: bytes) -> None:
        if len(message) < 12 or message[0] or message[1]:
            # The DNS ID must be 0 over QUIC (RFC 9250 4.2.1): a protocol error.
            self._protocol_error("a message shorter than a header or a non-zero ID")
            return
        limits = self.limits
        limits.counts.queries += 1
        try:
            result = limits.handler(message, self.peer, True, PROTO_DOQ, self.client_id)
        except Exception:
            log.exception("internal error answering a DoQ query")
            self._refuse(stream, DOQ_INTERNAL_ERROR)
            return
        # RFC 9250 5.4: padded as DoT and DoH pad, when the query carries the option.
        pad = wants_padding(message)
        if result is None or isinstance(result, bytes):
            self._answer(result, stream, pad)
            return
        self.answering += 1
        result.then(self._answered, (stream, pad), limits.held)

    def _answered(self, answer: bytes | None, arg: tuple[int, bool]) -> None:
        self.answering -= 1
        self._answer(answer, *arg)

    def _answer(self, answer: bytes | None, stream: int, pad: bool = False) -> None:
        if self.ended:
            return
        if answer is None:
            # Nothing to say (an access list that drops): cancel rather than leave it open.
            self._refuse(stream, DOQ_REQUEST_CANCELLED)
            return
        if pad:
            answer = pad_response(answer)
        try:
            self._quic.send_stream_data(
                stream, len(answer).to_bytes(2, "big") + answer, end_stream=True
            )
        except Exception:
            return  # the client reset the stream meanwhile
        self._send_soon()


class DoQServer(QuicServer):
    """aioquic's server with the connection bound, and a configuration that can be swapped
    for new connections (a renewed certificate) while open ones keep theirs."""

    def __init__(self, limits: Limits, configuration: QuicConfiguration) -> None:
        super().__init__(
            configuration=configuration,
            create_protocol=lambda quic, **kw: DoQConnection(quic, limits, **kw),
        )
        self.limits = limits

    def use(self, configuration: QuicConfiguration) -> None:
        """New connections use ``configuration`` (QuicServer reads it per connection)."""
        self._configuration = configuration

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        limits = self.limits
        if len(data) > 6 and isinstance(data, bytes) and data[0] & 0x80:
            # A long-header packet: a handshake, maybe a new connection.
            if (
                limits.live >= limits.max_connections
                and data[6 : 6 + data[5]] not in self._protocols
            ):
                # Over the bound: dropped before aioquic does any work for it; the client
                # retries or gives up.
                limits.counts.connections_refused += 1
                limits.handshake_failed("busy")
                return
            limits.certificate_check()
        super().datagram_received(data, addr)
