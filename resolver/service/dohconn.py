"""One DNS-over-HTTPS client connection: HTTP/2 (frames by :mod:`.h2wire`) or HTTP/1.1 with
keep-alive, its bounds and timeouts (see :mod:`.doh` for the whole listener). What it needs
of its listener is :class:`Owner`; what a request is answered with is the owner's
``serve``."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Final, Protocol, cast

from .h2wire import CANCEL, NO_ERROR, PREFACE, H2Error, H2Server
from .httpstatus import REASONS as REASON_PHRASES
from .listeners import OUTPUT_ABORT

#: Called with (status, headers, body) when a request's answer is ready.
Reply = Callable[[int, list[tuple[str, str]], bytes], None]

MAX_STREAMS: Final = 100
MAX_TARGET: Final = 4096
MAX_HEADERS: Final = 8192
MAX_HEADER_COUNT: Final = 100
MAX_BODY: Final = 65535
#: HTTP/1.1 bytes held: a head, a body and one read beyond (reading pauses while busy).
MAX_HELD: Final = MAX_TARGET + MAX_HEADERS + MAX_BODY + 256 * 1024
MEDIA: Final = "application/dns-message"
#: Why a connection or request was refused: the values of the ``reason`` label.
REASONS: Final = (
    "connection_limit",  # no connection to close for a new one: refused
    "evicted",  # a connection closed to make room for a new one
    "client_limit",  # a client's own oldest closed, over tcp.max_connections_per_client
    "proxy",  # PROXY header from an untrusted peer, malformed or late
    "handshake",  # TLS handshake failed or timed out
    "slow",  # a request not complete in time (408, stream reset, or closed)
    "stalled",  # answers not taken within the idle timeout
    "output",  # answers not taken, over four times tcp.max_output
    "malformed",  # not HTTP as this listener reads it (400, 501, HTTP/2 protocol error)
    "streams",  # over MAX_STREAMS streams at once on an HTTP/2 connection
    "uri_too_long",  # 414
    "headers_too_large",  # 431
    "body_too_large",  # 413
    "bad_request",  # 400: no dns parameter, bad base64, not a DNS query, bad client id
    "media_type",  # 415
    "method",  # 405
    "not_found",  # 404
    "no_answer",  # 403: the resolver answers nothing (access list, rate limit)
)
PHRASES: Final = {**REASON_PHRASES, 415: "Unsupported Media Type"}
_SINGLE: Final = frozenset({"host", "content-length", "content-type"})


class _Fault(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Owner(Protocol):
    """What a connection reads of its listener (doh.DoHListener)."""

    max_output: int
    idle_timeout: float
    request_timeout: float

    @property
    def tick(self) -> float: ...

    def count(self, reason: str) -> None: ...

    def admit(self, conn: DoHConnection) -> None: ...

    def forget(self, conn: DoHConnection) -> None: ...

    def serve(
        self,
        peer: str,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        reply: Reply,
    ) -> None: ...


class _Stream:
    """An HTTP/2 request being read (its body bounded by MAX_BODY) or answered."""

    __slots__ = ("body", "ended", "headers", "method", "started", "target")

    def __init__(self, method: str, target: str, headers: dict[str, str], started: float) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.started = started
        self.body = b""  # most bodies are one DATA frame: no copy then
        self.ended = False


class DoHConnection(asyncio.Protocol):
    """One client connection, HTTP/2 or HTTP/1.1 (see the module docstring for its bounds)."""

    def __init__(self, listener: Owner, peer: str, token: object = None) -> None:
        self.listener = listener
        self.peer = peer
        #: What the listener knew it by until it was up (see doh.DoHListener.connect).
        self.token = token
        self.transport: asyncio.Transport | None = None
        self.h2: H2Server | None = None
        self.sniff = False  # plain HTTP: the first bytes say HTTP/2 or HTTP/1.1
        self.buffer = bytearray()  # HTTP/1.1 bytes not yet a whole request
        self.busy = False  # HTTP/1.1: a request is being answered
        self.keep = True
        self.in_parse = False
        self.pending = 0  # answers awaited
        self.streams: dict[int, _Stream] = {}
        self.waiting: dict[int, bytes] = {}  # HTTP/2 answer bytes held by flow control
        self.waiting_bytes = 0
        self.waiting_since = 0.0
        self.paused = False
        self.blocked_since = 0.0
        self.draining = False
        self.progress = 0.0  # when a request last completed or an answer went out
        self.trickle = False  # bytes came since then
        self.request_since = 0.0  # HTTP/1.1: when the request in the buffer began
        self.timer: asyncio.TimerHandle | None = None
        self.now = 0.0  # the loop's time when the read being parsed arrived
        self.chunks: list[bytes] = []  # HTTP/2 answers of the read being parsed

    @property
    def idle(self) -> bool:
        return self.pending == 0 and not self.streams and not self.busy and not self.buffer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        listener = self.listener
        limit = listener.max_output
        self.transport.set_write_buffer_limits(high=limit, low=limit // 4)
        listener.admit(self)
        loop = asyncio.get_running_loop()
        self.progress = loop.time()
        tls = transport.get_extra_info("ssl_object")
        if tls is not None and tls.selected_alpn_protocol() == "h2":
            self._start_h2()
        elif tls is None:
            self.sniff = True
        self.timer = loop.call_later(listener.tick, self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.forget(self)
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None
        self.buffer.clear()
        self.streams.clear()
        self.waiting.clear()

    def abort(self) -> None:
        self.listener.forget(self)
        if self.transport is not None:
            self.transport.abort()

    def drain(self) -> None:
        self.draining = True
        self._steer()

    def _goodbye(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.h2 is not None:
            self.h2.goaway(NO_ERROR)
            self._flush()
        self._close()

    def _close(self) -> None:
        """Close after what is written has gone out. The slot is free at once: a TLS
        close that waits for the client is bounded by asyncio's shutdown timeout."""
        self.listener.forget(self)
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        self.blocked_since = asyncio.get_running_loop().time()
        self._steer()

    def resume_writing(self) -> None:
        self.blocked_since = 0.0
        self._steer()
        if self.h2 is None and not self.busy and self.buffer:
            self._http1()

    def _steer(self) -> None:
        """Pause reading while a bound holds; resume when none does; close when drained."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.draining and self.idle:
            return self._goodbye()
        full = self.busy if self.h2 is None else self.pending >= MAX_STREAMS
        hold = self.draining or bool(self.blocked_since) or full
        hold = hold or self.waiting_bytes > self.listener.max_output
        if hold and not self.paused:
            transport.pause_reading()
            self.paused = True
        elif not hold and self.paused:
            transport.resume_reading()
            self.paused = False
        return None

    def _check(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        listener = self.listener
        loop = asyncio.get_running_loop()
        now = loop.time()
        idle = listener.idle_timeout
        if (self.blocked_since and now - self.blocked_since >= idle) or (
            self.waiting and now - self.waiting_since >= idle
        ):
            listener.count("stalled")
            return self.abort()
        if self.h2 is None:
            late = now - self.request_since >= listener.request_timeout
            if self.buffer and not self.busy and late:
                listener.count("slow")
                return self._fail(408, "request not received in time")
        else:
            for sid, stream in list(self.streams.items()):
                if not stream.ended and now - stream.started >= listener.request_timeout:
                    listener.count("slow")
                    del self.streams[sid]
                    self._reset(sid, CANCEL)
            self._flush()
        if self.idle and now - self.progress >= idle:
            if self.trickle:
                listener.count("slow")  # bytes, but never a whole request
            return self._goodbye()
        self.timer = loop.call_later(listener.tick, self._check)
        return None

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        self.trickle = True
        if self.h2 is not None:
            return self._h2_received(data)
        buf = self.buffer
        if not buf:
            self.request_since = asyncio.get_running_loop().time()
        buf += data
        if self.sniff:
            if len(buf) < len(PREFACE) and PREFACE.startswith(buf):
                return None
            self.sniff = False
            if buf.startswith(PREFACE):
                data = bytes(buf)
                buf.clear()
                self._start_h2()
                return self._h2_received(data)
        if len(buf) > MAX_HELD:
            self.listener.count("malformed")
            return self.abort()
        self._http1()
        return None

    # HTTP/1.1

    def _http1(self) -> None:
        self.in_parse = True
        try:
            while self.buffer and not self.busy and not self.blocked_since:
                transport = self.transport
                if transport is None or transport.is_closing() or not self._one_request():
                    break
        finally:
            self.in_parse = False
        self._steer()

    def _one_request(self) -> bool:
        """Parse and serve the request at the buffer's start; False if it is not whole."""
        buf = self.buffer
        end = buf.find(b"\r\n\r\n", 0, MAX_TARGET + MAX_HEADERS)
        try:
            if end < 0:
                if buf.find(b"\r\n", 0, MAX_TARGET + 32) < 0 and len(buf) > MAX_TARGET + 32:
                    raise _Fault(414, "uri_too_long")
                if len(buf) >= MAX_TARGET + MAX_HEADERS:
                    raise _Fault(431, "headers_too_large")
                return False
            method, target, headers, length, keep = _parse_head(bytes(buf[:end]))
        except _Fault as fault:
            self.listener.count(fault.reason)
            self._fail(fault.status, fault.reason)
            return False
        if len(buf) < end + 4 + length:
            return False
        body = bytes(buf[end + 4 : end + 4 + length])
        del buf[: end + 4 + length]
        self.request_since = asyncio.get_running_loop().time()
        self.busy = True
        self.keep = keep
        self.pending += 1
        self.listener.serve(self.peer, method, target, headers, body, self._reply1)
        return True

    def _reply1(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.pending -= 1
        self.busy = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        close = not self.keep or self.draining
        transport.write(_head1(status, headers, body, close) + body)
        self.progress = asyncio.get_running_loop().time()
        self.trickle = bool(self.buffer)
        if self._over_output():
            return
        if close:
            self._close()
        elif not self.in_parse:
            self._http1()  # the next request may be waiting in the buffer

    def _fail(self, status: int, why: str) -> None:
        """Answer ``status`` and close (a request whose rest cannot be read)."""
        transport = self.transport
        self.buffer.clear()
        if transport is None or transport.is_closing():
            return
        text = f"{status} {PHRASES[status]}: {why}\n".encode()
        transport.write(_head1(status, [("content-type", "text/plain")], text, True) + text)
        self._close()

    def _over_output(self) -> bool:
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() > (
            OUTPUT_ABORT * self.listener.max_output
        ):
            self.listener.count("output")
            self.abort()
            return True
        return False

    # HTTP/2 (h2wire.H2Server reads and writes the frames; this is what they mean)

    def _start_h2(self) -> None:
        self.h2 = H2Server(self, MAX_STREAMS)
        self._flush()

    def _h2_received(self, data: bytes) -> None:
        conn = self.h2
        assert conn is not None
        self.now = asyncio.get_running_loop().time()
        self.in_parse = True
        try:
            alive = conn.receive(data)
        except H2Error as exc:
            return self._h2_fault(exc.reason)
        finally:
            self.in_parse = False
        self._flush()
        if not alive:  # the client said GOAWAY
            return self._close()
        self._steer()
        return None

    def _h2_fault(self, reason: str) -> None:
        self.listener.count(reason)
        self._flush()  # its GOAWAY is written
        self._close()

    def h2_request(self, sid: int, fields: dict[str, str], size: int, end: bool) -> None:
        method, target = fields.get(":method", ""), fields.get(":path", "")
        self.streams[sid] = _Stream(method, target, fields, self.now)
        if size > MAX_HEADERS:
            self._h2_refuse(sid, 431, "headers_too_large")
        elif len(target) > MAX_TARGET:
            self._h2_refuse(sid, 414, "uri_too_long")
        elif end:
            self._h2_ended(sid)

    def h2_data(self, sid: int, data: bytes, end: bool) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            return
        if len(stream.body) + len(data) > MAX_BODY:
            self._h2_refuse(sid, 413, "body_too_large")
            return
        stream.body += data
        if end:
            self._h2_ended(sid)

    def h2_reset(self, sid: int) -> None:
        self.streams.pop(sid, None)
        self._unwait(sid)

    def h2_window(self) -> None:
        if self.waiting:
            self._send_waiting()

    def _h2_ended(self, sid: int) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            return
        stream.ended = True
        self.pending += 1
        reply = functools.partial(self._reply2, sid)
        self.listener.serve(
            self.peer, stream.method, stream.target, stream.headers, stream.body, reply
        )

    def _h2_refuse(self, sid: int, status: int, reason: str) -> None:
        """Answer ``status`` before the request is whole, then reset the rest of it."""
        self.listener.count(reason)
        text = f"{status} {PHRASES[status]}\n".encode()
        self._h2_respond(sid, status, [("content-type", "text/plain")], text)
        self._reset(sid, NO_ERROR)

    def _reply2(self, sid: int, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.pending -= 1
        if self.transport is None:
            return
        self._h2_respond(sid, status, headers, body)
        self.progress = self.now if self.in_parse else asyncio.get_running_loop().time()
        self.trickle = False
        if self.in_parse:  # _h2_received writes them all once the read is done
            if self.h2 is not None and self.h2.out:
                self.chunks.append(self.h2.take())
        else:
            self._flush()
            self._steer()

    def _h2_respond(
        self, sid: int, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        conn = self.h2
        if self.streams.pop(sid, None) is None or conn is None:
            return  # reset by the client meanwhile
        rest = conn.respond(sid, status, headers, body)
        if rest:
            self._hold(sid, rest)

    def _hold(self, sid: int, body: bytes) -> None:
        """Keep what the client's windows hold back (bounded: over it, abort)."""
        if not self.waiting:
            self.waiting_since = asyncio.get_running_loop().time()
        self.waiting[sid] = body
        self.waiting_bytes += len(body)
        if self.waiting_bytes > OUTPUT_ABORT * self.listener.max_output:
            self.listener.count("output")
            self.abort()

    def _unwait(self, sid: int) -> None:
        held = self.waiting.pop(sid, None)
        if held is not None:
            self.waiting_bytes -= len(held)

    def _send_waiting(self) -> None:
        conn = self.h2
        assert conn is not None
        for sid in list(self.waiting):
            body = self.waiting.pop(sid)
            self.waiting_bytes -= len(body)
            rest = conn.send_body(sid, body)
            if rest:
                self.waiting[sid] = rest
                self.waiting_bytes += len(rest)
        if not self.waiting:
            self.waiting_since = 0.0

    def _reset(self, sid: int, code: int) -> None:
        self._unwait(sid)
        if self.h2 is not None:
            self.h2.reset(sid, code)

    def _flush(self) -> None:
        """Write what is ready: the answers of one read in one writelines call, so one
        send, each answer still a TLS record of its own (dnsperf -m doh takes one answer
        of a record and loses the rest: 98% lost when the answers of a read were one)."""
        transport, conn, chunks = self.transport, self.h2, self.chunks
        if transport is None or conn is None or transport.is_closing():
            chunks.clear()
            return
        if conn.out:
            chunks.append(conn.take())
        if not chunks:
            return
        if len(chunks) == 1:
            transport.write(chunks[0])
        else:
            transport.writelines(chunks)
        chunks.clear()
        self._over_output()


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str], int, bool]:
    """(method, target, headers, body length, keep-alive) of an HTTP/1.x request head."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise _Fault(400, "malformed")
    method, target, version = (p.decode("latin-1") for p in parts)
    if len(target) > MAX_TARGET:
        raise _Fault(414, "uri_too_long")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _Fault(400, "malformed")
    if len(lines) - 1 > MAX_HEADER_COUNT or len(head) - len(lines[0]) > MAX_HEADERS:
        raise _Fault(431, "headers_too_large")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            raise _Fault(400, "malformed")
        key, text = name.decode("latin-1").lower(), value.strip().decode("latin-1")
        if key in headers and key in _SINGLE:
            raise _Fault(400, "malformed")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    if "transfer-encoding" in headers:
        raise _Fault(501, "malformed")  # DNS messages are small: Content-Length only
    length_text = headers.get("content-length", "0")
    if not (length_text.isascii() and length_text.isdigit()):
        raise _Fault(400, "malformed")
    if int(length_text) > MAX_BODY:
        raise _Fault(413, "body_too_large")
    connection = headers.get("connection", "").lower()
    keep = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    return method, target, headers, int(length_text), keep


def _head1(status: int, headers: list[tuple[str, str]], body: bytes, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {PHRASES[status]}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"content-length: {len(body)}")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
