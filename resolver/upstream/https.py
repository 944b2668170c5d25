"""DNS over HTTPS upstreams (RFC 8484): HTTP/2 over one reused TLS connection per upstream.

Each query is a POST of ``application/dns-message`` on its own stream, with DNS ID 0
(RFC 8484 4.1), so replies are matched by stream, never by ID. The ``h2`` package keeps the
HTTP/2 state (frames, HPACK, flow control); this module only moves bytes and maps what
happens onto :class:`~resolver.upstream.base.UpstreamError` kinds, so that health and metrics
treat a DoH upstream like any other:

- ``network``: the connection could not be set up or verified, was lost, closed by GOAWAY
  before our stream was taken, or our stream was reset;
- ``rcode``: the server answered with an HTTP status other than 200;
- ``malformed``: a wrong content type, a body over 65535 bytes, or not the DNS reply to our
  question;
- ``timeout``: no answer in time (the stream is then cancelled).

A lost connection fails the queries in flight; the next query opens a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from functools import partial
from typing import Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from ..core.wire import FormatError, Mismatch, Query, Scan, scan_response
from .base import MALFORMED, NETWORK, RCODE, TIMEOUT, UpstreamError, register, upstream_query
from .endpoints import Upstream
from .tls import EncryptedConnection, TLSTransport, connect_tls

# hpack logs every header field it codes at DEBUG: noise that would drown our debug log.
logging.getLogger("hpack").setLevel(logging.INFO)

MEDIA_TYPE: Final = b"application/dns-message"
_MAX_BODY: Final = 65535  # a DNS message is never longer


class _Stream:
    """One query waiting for its reply."""

    __slots__ = ("body", "future", "qid", "question", "status")

    def __init__(self, future: asyncio.Future[Scan], qid: int, question: bytes) -> None:
        self.future = future
        self.qid = qid
        self.question = question
        self.status = 0
        self.body = bytearray()


class _Session:
    """One HTTP/2 connection and its streams; closed for good once lost."""

    def __init__(
        self,
        up: Upstream,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        idle: float,
        ignored: Callable[[Exception], None],
    ) -> None:
        self.up = up
        self.writer = writer
        self.idle = idle
        self.ignored = ignored
        # Our request headers are fixed and well-formed: checking them again on every
        # request costs about a quarter of h2's time per request. The server's headers are
        # still checked.
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
            )
        )
        self.h2.initiate_connection()
        self.h2.update_settings({h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self.streams: dict[int, _Stream] = {}
        #: GOAWAY received: streams already taken finish, no new ones start.
        self.goaway = False
        #: The server's SETTINGS arrived: until then its stream limit is unknown.
        self.settled = False
        self.closed = False
        self.reason = ""
        #: Streams opened on this connection (for tests and status).
        self.opened = 0
        self._wake = asyncio.Event()
        self.authority = up.server_name if up.tls_name or ":" not in up.host else f"[{up.host}]"
        if up.port != 443:
            self.authority += f":{up.port}"
        self._flush()
        self.task = asyncio.ensure_future(self._read(reader))

    @property
    def usable(self) -> bool:
        return not (self.closed or self.goaway or self.writer.is_closing())

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def _notify(self) -> None:
        # Wakes whoever waits for a stream slot or for flow-control window.
        self._wake.set()
        self._wake = asyncio.Event()

    async def _until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            if not self.usable:
                raise UpstreamError(NETWORK, f"HTTP/2 connection closed: {self.reason}")
            await self._wake.wait()

    async def exchange(self, wire: bytes, qid: int, question: bytes) -> Scan:
        conn = self.h2
        # The server's SETTINGS_MAX_CONCURRENT_STREAMS (known once its SETTINGS came, which
        # is with the end of the handshake): beyond it, wait for a slot.
        await self._until(
            lambda: (
                self.settled
                and conn.open_outbound_streams < conn.remote_settings.max_concurrent_streams
            )
        )
        if not self.usable:
            raise UpstreamError(NETWORK, f"HTTP/2 connection closed: {self.reason}")
        sid = conn.get_next_available_stream_id()
        stream = _Stream(asyncio.get_running_loop().create_future(), qid, question)
        self.streams[sid] = stream
        self.opened += 1
        try:
            conn.send_headers(
                sid,
                [
                    (b":method", b"POST"),
                    (b":scheme", b"https"),
                    (b":authority", self.authority.encode()),
                    (b":path", self.up.path.encode()),
                    (b"accept", MEDIA_TYPE),
                    (b"content-type", MEDIA_TYPE),
                    (b"content-length", str(len(wire)).encode()),
                ],
            )
            await self._send_body(sid, wire)
            return await stream.future
        except h2.exceptions.ProtocolError as exc:
            raise UpstreamError(NETWORK, f"HTTP/2: {exc!r}") from None
        finally:
            self.streams.pop(sid, None)
            if not stream.future.done() and self.usable:
                # Timed out or cancelled: tell the server, and free the slot.
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    conn.reset_stream(sid, ErrorCodes.CANCEL)
                self._flush()
            self._notify()

    async def _send_body(self, sid: int, wire: bytes) -> None:
        """The request body, within the server's flow-control window."""
        conn = self.h2
        rest = wire
        while True:
            await self._until(lambda: conn.local_flow_control_window(sid) > 0)
            room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            conn.send_data(sid, rest[:room], end_stream=room >= len(rest))
            self._flush()
            rest = rest[room:]
            if not rest:
                return

    async def _read(self, reader: asyncio.StreamReader) -> None:
        reason = "closed by the server"
        try:
            while True:
                try:
                    # Checked every ``idle`` seconds: closed when no query was in flight
                    # at a check, within two of them after the last one.
                    async with asyncio.timeout(self.idle):
                        data = await reader.read(65536)
                except TimeoutError:
                    if self.streams:
                        continue
                    reason = "idle"
                    self.h2.close_connection()
                    self._flush()
                    return
                if not data:
                    return
                for event in self.h2.receive_data(data):
                    self._event(event)
                self._flush()
                if self.goaway and not self.streams:
                    reason = "GOAWAY from the server"
                    return
        except h2.exceptions.ProtocolError as exc:
            reason = f"HTTP/2 protocol error: {exc!r}"
        except (OSError, ssl.SSLError) as exc:
            reason = str(exc) or type(exc).__name__
        finally:
            self.closed = True
            self.reason = reason
            for stream in self.streams.values():
                _fail(stream, NETWORK, f"HTTP/2 connection lost: {reason}")
            self.writer.close()
            self._notify()

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            # Always give the window back, or the connection's window would run dry.
            if event.flow_controlled_length:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            stream = self.streams.get(event.stream_id)
            if stream is not None and event.data:
                stream.body += event.data
                if len(stream.body) > _MAX_BODY:
                    self._refuse(event.stream_id, stream, MALFORMED, "a body over 65535 bytes")
        elif isinstance(event, h2.events.ResponseReceived):
            self._headers(event)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                self._complete(stream)
            self._notify()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                _fail(stream, NETWORK, f"stream reset by the server ({event.error_code!r})")
            self._notify()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # GOAWAY: streams above the last one the server took will never be answered.
            self.goaway = True
            last = event.last_stream_id or 0
            for sid in [sid for sid in self.streams if sid > last]:
                detail = f"GOAWAY from the server ({event.error_code!r})"
                _fail(self.streams.pop(sid), NETWORK, detail)
            self._notify()
        elif isinstance(event, h2.events.PushedStreamReceived) and event.pushed_stream_id:
            self.h2.reset_stream(event.pushed_stream_id, ErrorCodes.REFUSED_STREAM)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.settled = True
            self._notify()
        elif isinstance(event, h2.events.WindowUpdated):
            self._notify()

    def _headers(self, event: h2.events.ResponseReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        content_type = b""
        for name, value in event.headers or ():
            if name == b":status":
                stream.status = int(value) if value.isdigit() else 0
            elif name == b"content-type":
                content_type = bytes(value).split(b";")[0].strip().lower()
        if stream.status != 200:
            self._refuse(event.stream_id, stream, RCODE, f"HTTP status {stream.status}")
        elif content_type != MEDIA_TYPE:
            self._refuse(
                event.stream_id, stream, MALFORMED, f"content type {content_type.decode()!r}"
            )

    def _refuse(self, sid: int, stream: _Stream, kind: str, detail: str) -> None:
        self.streams.pop(sid, None)
        _fail(stream, kind, detail)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(sid, ErrorCodes.CANCEL)

    def _complete(self, stream: _Stream) -> None:
        if stream.future.done():
            return
        if stream.status != 200:
            _fail(stream, MALFORMED, "a reply without a response header")
            return
        try:
            stream.future.set_result(scan_response(bytes(stream.body), stream.qid, stream.question))
        except (Mismatch, FormatError) as exc:
            self.ignored(exc)
            _fail(stream, MALFORMED, str(exc))


def _fail(stream: _Stream, kind: str, detail: str) -> None:
    if not stream.future.done():
        stream.future.set_exception(UpstreamError(kind, detail))


class HTTPSConnection(EncryptedConnection):
    """One reused DNS-over-HTTPS connection (HTTP/2, ALPN h2) to one upstream, many queries
    at once on their own streams. It reconnects on the next query after a loss, a GOAWAY or
    an idle close; a certificate that does not verify (or matches no pin) is a failure,
    never a downgrade."""

    session: _Session | None = None

    async def _session(self, timeout: float) -> _Session:
        async with self._connecting:
            if self.session is not None and self.session.usable:
                return self.session
            reader, writer = await connect_tls(self.up, self.context, self.bootstrap, timeout)
            if writer.get_extra_info("ssl_object").selected_alpn_protocol() != "h2":
                writer.close()
                raise UpstreamError(NETWORK, "the server did not agree to HTTP/2 (ALPN h2)")
            self.session = _Session(self.up, reader, writer, self.idle, self.ignored)
            self.connects += 1
            return self.session

    async def query(self, wire: bytes, qid: int, question: bytes, timeout: float) -> Scan:
        try:
            async with asyncio.timeout(timeout):
                session = await self._session(timeout)
                return await session.exchange(wire, qid, question)
        except TimeoutError:
            raise UpstreamError(TIMEOUT, f"no HTTPS answer in {timeout:.2f} s") from None


class HTTPSTransport(TLSTransport):
    """``https://`` upstreams: one reused HTTP/2 connection each (ALPN h2)."""

    alpn = "h2"

    def connect(self, up: Upstream) -> EncryptedConnection:
        conn = HTTPSConnection(up, self.context, bootstrap=self.owner.bootstrap)
        conn.ignored = partial(self.owner.ignored, up)
        return conn

    async def exchange(self, up: Upstream, q: Query, timeout: float, deadline: float) -> Scan:
        # ID 0 (RFC 8484 4.1, cache friendliness): replies are matched by stream.
        wire = upstream_query(0, q, True)
        return await self.connection(up).query(wire, 0, q.key + q.question[-4:], timeout)


register("https", HTTPSTransport)
