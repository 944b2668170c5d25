"""The server side of HTTP/2 (RFC 9113) as DNS over HTTPS needs it, sans I/O.

The ``h2`` library cost about 155 us of the 190 us a DoH query took (its state machine,
an event object per frame, header validation and encoding); DoH needs little of HTTP/2:
requests of a few hundred bytes, answers of one HEADERS and one DATA frame. This module
reads frames from bytes and writes frames into :attr:`H2Server.out`:

- the connection preface, then SETTINGS (acknowledged; INITIAL_WINDOW_SIZE and
  MAX_FRAME_SIZE applied), PING (answered), PRIORITY (ignored), unknown types (ignored);
- HEADERS and CONTINUATION: a header block of at most :data:`MAX_BLOCK` bytes in at most
  :data:`MAX_CONTINUATIONS` frames, decoded by :mod:`.hpackdec` (its dynamic table bounded
  by our SETTINGS_HEADER_TABLE_SIZE, its header list by :data:`MAX_HEADER_LIST`), checked as
  RFC 9113 section 8.2 and 8.3 ask of a request;
- DATA, with connection and stream flow control both ways: what a client sends is given
  back by WINDOW_UPDATE as soon as it is read (the request body bound is the caller's);
  what we send waits for the client's windows (:meth:`H2Server.send_body` returns the rest);
- RST_STREAM, GOAWAY (the client's closes the connection), PUSH_PROMISE refused;
- stream states of section 5.1 as a server sees them: idle, open, half-closed (remote)
  and closed; at most ``max_streams`` not closed (more is a connection error, GOAWAY).

Answers are encoded without the HPACK dynamic table (static indices and literals without
indexing), so that nothing the client's SETTINGS say about the table matters. A connection
error is raised as :class:`H2Error` after its GOAWAY is written; a stream error resets the
stream. What a request means is the caller's (:class:`Handler`).
"""

from __future__ import annotations

import struct
from typing import Final, Protocol

from .hpackdec import DecodeError, Decoder, Field

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_FRAME: Final = 16384  # SETTINGS_MAX_FRAME_SIZE we accept (the default)
WINDOW: Final = 65535  # the initial window, ours and by default the client's
MAX_WINDOW: Final = 2**31 - 1
MAX_BLOCK: Final = 65536  # header block bytes (HEADERS and its CONTINUATIONs)
MAX_CONTINUATIONS: Final = 64
MAX_HEADER_LIST: Final = 65536  # SETTINGS_MAX_HEADER_LIST_SIZE

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# Error codes (RFC 9113 section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 5, 6, 7, 8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 9, 11

_HEAD: Final = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, stream
_U32: Final = struct.Struct(">L")
_SETTING: Final = struct.Struct(">HL")
_PSEUDO: Final = frozenset({":method", ":scheme", ":authority", ":path"})
_CONNECTION: Final = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)
#: HPACK of fields we send: static-table indices, literals never indexed.
_STATUS_200: Final = b"\x88"
_NAMES: Final = {
    "content-type": b"\x0f\x10",
    "cache-control": b"\x0f\x09",
    "content-length": b"\x0f\x0d",
    "allow": b"\x0f\x07",
}


#: Header blocks of answers, by their fields (at most 4,096: a few hundred KB).
_BLOCKS: dict[tuple[object, ...], bytes] = {}


class H2Error(Exception):
    """A connection error: GOAWAY with ``code`` is written; ``reason`` is for counting
    (``malformed``, ``streams``, ``headers_too_large``)."""

    def __init__(self, code: int, reason: str, why: str) -> None:
        super().__init__(why)
        self.code = code
        self.reason = reason


class Handler(Protocol):
    """What the connection learns of its client's streams."""

    def h2_request(self, sid: int, fields: dict[str, str], size: int, end: bool) -> None: ...

    def h2_data(self, sid: int, data: bytes, end: bool) -> None: ...

    def h2_reset(self, sid: int) -> None: ...

    def h2_window(self) -> None: ...


class _Stream:
    """A stream not closed: the client's window for our DATA, ours for its, and whether
    the client has ended its side (half-closed remote)."""

    __slots__ = ("ended", "recv", "send")

    def __init__(self, send: int, ended: bool) -> None:
        self.send = send
        self.recv = WINDOW
        self.ended = ended


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """One frame's bytes."""
    size = len(payload)
    return _HEAD.pack(size >> 16, size & 0xFFFF, kind, flags, sid) + payload


def _literal(name: str, value: str) -> bytes:
    """A field as a literal never indexed (raw octets; our values are short ASCII)."""
    prefix = _NAMES.get(name)
    data = value.encode("latin-1")
    head = prefix if prefix is not None else b"\x00" + _length(len(name)) + name.encode()
    return head + _length(len(data)) + data


def _length(size: int) -> bytes:
    """An HPACK string length, 7-bit prefix, no Huffman."""
    if size < 127:
        return bytes((size,))
    out, size = bytearray((127,)), size - 127
    while size >= 128:
        out.append((size & 0x7F) | 0x80)
        size >>= 7
    out.append(size)
    return bytes(out)


def encode_headers(status: int, headers: list[tuple[str, str]], length: int) -> bytes:
    """The header block of an answer: ``:status``, ``headers``, content-length (the same
    block for the same fields, which it does not depend on a table for, is remembered)."""
    key = (status, length, *headers)
    block = _BLOCKS.get(key)
    if block is None:
        block = _STATUS_200 if status == 200 else b"\x08\x03" + str(status).encode()
        block += b"".join(_literal(n, v) for n, v in headers)
        block += _literal("content-length", str(length))
        if len(_BLOCKS) >= 4096:
            _BLOCKS.clear()
        _BLOCKS[key] = block
    return block


class H2Server:
    """One HTTP/2 connection, the server's side: feed it with :meth:`receive`, send with
    :meth:`respond`, take what to write from :attr:`out`."""

    def __init__(self, handler: Handler, max_streams: int) -> None:
        self.handler = handler
        self.max_streams = max_streams
        self.out = bytearray(
            frame(
                SETTINGS,
                0,
                0,
                _SETTING.pack(0x3, max_streams) + _SETTING.pack(0x6, MAX_HEADER_LIST),
            )
        )
        self.buf = b""
        self.preface = True  # the client's preface is still to come
        self.settings = False  # its first frame (SETTINGS) is still to come
        self.streams: dict[int, _Stream] = {}
        self.last = 0  # the highest stream id the client opened
        self.send_window = WINDOW  # the connection's, for our DATA
        self.initial = WINDOW  # the client's SETTINGS_INITIAL_WINDOW_SIZE
        self.max_frame = MAX_FRAME  # the client's SETTINGS_MAX_FRAME_SIZE
        self.recv_window = WINDOW
        self.block = bytearray()  # a header block awaiting its CONTINUATION
        self.block_sid = 0
        self.block_flags = 0
        self.block_frames = 0
        self.closed = False  # GOAWAY sent or received
        self.decoder = Decoder(MAX_HEADER_LIST)
        #: The request of a remembered block's fields (the decoder's list, by identity).
        self.requests: dict[int, tuple[list[Field], dict[str, str]]] = {}

    def receive(self, data: bytes) -> bool:
        """Read ``data``; False when the client said GOAWAY. Raises :class:`H2Error`."""
        if self.closed:
            return True
        buf = self.buf + data if self.buf else data
        try:
            pos = self._preface(buf)
            if pos < 0:  # the preface is not whole yet
                self.buf = buf
                return True
            end = len(buf)
            while end - pos >= 9:
                hi, lo, kind, flags, sid = _HEAD.unpack_from(buf, pos)
                size = hi << 16 | lo
                if size > MAX_FRAME:
                    raise H2Error(FRAME_SIZE_ERROR, "malformed", "frame over the maximum size")
                if end - pos - 9 < size:
                    break
                payload = buf[pos + 9 : pos + 9 + size]
                pos += 9 + size
                if kind <= HEADERS and self.settings and not self.block_sid:  # most frames
                    if kind == DATA:
                        self._data(flags, sid & 0x7FFFFFFF, payload)
                    else:
                        self._headers(flags, sid & 0x7FFFFFFF, payload)
                elif not self._frame(kind, flags, sid & 0x7FFFFFFF, payload):
                    self.closed = True
                    return False
        except H2Error as exc:
            self.goaway(exc.code)
            raise
        self.buf = buf[pos:]
        if self.recv_window < WINDOW // 2:  # given back in one step, as h2 does
            self.out += frame(WINDOW_UPDATE, 0, 0, _U32.pack(WINDOW - self.recv_window))
            self.recv_window = WINDOW
        return True

    def _preface(self, buf: bytes) -> int:
        if not self.preface:
            return 0
        if len(buf) < len(PREFACE):
            if not PREFACE.startswith(buf):
                raise H2Error(PROTOCOL_ERROR, "malformed", "not the HTTP/2 preface")
            return -1
        if not buf.startswith(PREFACE):
            raise H2Error(PROTOCOL_ERROR, "malformed", "not the HTTP/2 preface")
        self.preface = False
        return len(PREFACE)

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes) -> bool:
        if not self.settings and kind != SETTINGS:
            raise H2Error(PROTOCOL_ERROR, "malformed", "the first frame is not SETTINGS")
        if self.block_sid and kind != CONTINUATION:
            raise H2Error(PROTOCOL_ERROR, "malformed", "a header block interrupted")
        if kind == HEADERS:
            self._headers(flags, sid, payload)
        elif kind == DATA:
            self._data(flags, sid, payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif kind == SETTINGS:
            self._settings(flags, sid, payload)
        elif kind == CONTINUATION:
            self._continuation(flags, sid, payload)
        elif kind == RST_STREAM:
            self._rst(sid, payload)
        elif kind == PING:
            if sid or len(payload) != 8:
                raise H2Error(FRAME_SIZE_ERROR if sid == 0 else PROTOCOL_ERROR, "malformed", "PING")
            if not flags & ACK:
                self.out += frame(PING, ACK, 0, payload)
        elif kind == PRIORITY:
            if not sid:
                raise H2Error(PROTOCOL_ERROR, "malformed", "PRIORITY on stream 0")
            if len(payload) != 5:
                self._stream_error(sid, FRAME_SIZE_ERROR)
        elif kind == GOAWAY:
            if sid:
                raise H2Error(PROTOCOL_ERROR, "malformed", "GOAWAY on a stream")
            return False
        elif kind == PUSH_PROMISE:
            raise H2Error(PROTOCOL_ERROR, "malformed", "PUSH_PROMISE from a client")
        return True

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise H2Error(PROTOCOL_ERROR, "malformed", "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise H2Error(FRAME_SIZE_ERROR, "malformed", "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise H2Error(FRAME_SIZE_ERROR, "malformed", "SETTINGS of a bad length")
        self.settings = True
        for off in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, off)
            if key == 0x2 and value > 1:
                raise H2Error(PROTOCOL_ERROR, "malformed", "SETTINGS_ENABLE_PUSH not 0 or 1")
            if key == 0x4:
                if value > MAX_WINDOW:
                    raise H2Error(FLOW_CONTROL_ERROR, "malformed", "initial window too large")
                delta, self.initial = value - self.initial, value
                for stream in self.streams.values():
                    stream.send += delta
                    if stream.send > MAX_WINDOW:
                        raise H2Error(FLOW_CONTROL_ERROR, "malformed", "stream window overflow")
            elif key == 0x5:
                if not MAX_FRAME <= value <= 2**24 - 1:
                    raise H2Error(PROTOCOL_ERROR, "malformed", "bad SETTINGS_MAX_FRAME_SIZE")
                self.max_frame = value
        self.out += frame(SETTINGS, ACK, 0)
        self.handler.h2_window()  # a larger initial window may free held answers

    def _unpad(self, flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise H2Error(PROTOCOL_ERROR, "malformed", "padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid or not sid & 1:
            raise H2Error(PROTOCOL_ERROR, "malformed", "HEADERS on a stream a client cannot use")
        payload = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise H2Error(FRAME_SIZE_ERROR, "malformed", "HEADERS too short for priority")
            payload = payload[5:]
        self.block_flags = flags
        if flags & END_HEADERS:
            self._block(sid, flags, payload)
        else:
            self.block_sid, self.block_frames = sid, 0
            self.block[:] = payload

    def _continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if not self.block_sid or sid != self.block_sid:
            raise H2Error(PROTOCOL_ERROR, "malformed", "CONTINUATION without its HEADERS")
        self.block += payload
        self.block_frames += 1
        if len(self.block) > MAX_BLOCK or self.block_frames > MAX_CONTINUATIONS:
            raise H2Error(ENHANCE_YOUR_CALM, "headers_too_large", "header block too large")
        if flags & END_HEADERS:
            self.block_sid = 0
            block = bytes(self.block)
            self.block.clear()
            self._block(sid, self.block_flags, block)

    def _decode(self, block: bytes) -> tuple[list[Field], int]:
        """The fields of ``block`` and their size; raises :class:`H2Error`."""
        try:
            return self.decoder.decode(block)
        except DecodeError as exc:
            if exc.oversized:
                raise H2Error(ENHANCE_YOUR_CALM, "headers_too_large", str(exc)) from None
            raise H2Error(COMPRESSION_ERROR, "malformed", str(exc)) from None

    def _request(self, fields: list[Field]) -> dict[str, str]:
        """The request of ``fields`` (checked once for a block the decoder remembers; the
        same dict then, which no one changes)."""
        seen = self.requests.get(id(fields))
        if seen is not None and seen[0] is fields:
            return seen[1]
        request = _request(fields)
        if len(self.requests) >= 16:
            self.requests.clear()
        self.requests[id(fields)] = (fields, request)
        return request

    def _block(self, sid: int, flags: int, block: bytes) -> None:
        """A whole header block on ``sid``: a request, trailers, or a stream error."""
        # Always decoded: the decoder's table must follow the client's.
        fields, size = self._decode(block)
        end = bool(flags & END_STREAM)
        stream = self.streams.get(sid)
        if stream is not None:  # trailers: only to end the stream, and not read
            if stream.ended or not end:
                self._stream_error(sid, STREAM_CLOSED if stream.ended else PROTOCOL_ERROR)
                return
            stream.ended = True
            self.handler.h2_data(sid, b"", True)
            return
        if sid <= self.last:  # a closed stream
            self._stream_error(sid, STREAM_CLOSED)
            return
        self.last = sid
        if len(self.streams) >= self.max_streams:
            raise H2Error(PROTOCOL_ERROR, "streams", "over SETTINGS_MAX_CONCURRENT_STREAMS")
        self.streams[sid] = _Stream(self.initial, end)
        remembered = self.decoder.known.get(block) is not None
        request = self._request(fields) if remembered else _request(fields)
        self.handler.h2_request(sid, request, size, end)

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            raise H2Error(PROTOCOL_ERROR, "malformed", "DATA on stream 0")
        size = len(payload)
        self.recv_window -= size
        if self.recv_window < 0:
            raise H2Error(FLOW_CONTROL_ERROR, "malformed", "DATA over the connection window")
        data = self._unpad(flags, payload)
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.last:
                raise H2Error(PROTOCOL_ERROR, "malformed", "DATA on an idle stream")
            return  # a stream closed meanwhile (reset, answered): counted, dropped
        if stream.ended:
            self._stream_error(sid, STREAM_CLOSED)
            return
        stream.recv -= size
        if stream.recv < 0:
            raise H2Error(FLOW_CONTROL_ERROR, "malformed", "DATA over the stream window")
        end = bool(flags & END_STREAM)
        if end:
            stream.ended = True
        elif stream.recv < WINDOW // 2:
            self.out += frame(WINDOW_UPDATE, 0, sid, _U32.pack(WINDOW - stream.recv))
            stream.recv = WINDOW
        self.handler.h2_data(sid, data, end)

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2Error(FRAME_SIZE_ERROR, "malformed", "WINDOW_UPDATE of a bad length")
        step = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not sid:
            if not step:
                raise H2Error(PROTOCOL_ERROR, "malformed", "WINDOW_UPDATE of 0")
            self.send_window += step
            if self.send_window > MAX_WINDOW:
                raise H2Error(FLOW_CONTROL_ERROR, "malformed", "connection window overflow")
            self.handler.h2_window()
            return
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.last:
                raise H2Error(PROTOCOL_ERROR, "malformed", "WINDOW_UPDATE on an idle stream")
            return
        if not step:
            self._stream_error(sid, PROTOCOL_ERROR)
            return
        stream.send += step
        if stream.send > MAX_WINDOW:
            self._stream_error(sid, FLOW_CONTROL_ERROR)
            return
        self.handler.h2_window()

    def _rst(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2Error(FRAME_SIZE_ERROR, "malformed", "RST_STREAM of a bad length")
        if not sid or sid > self.last:
            raise H2Error(PROTOCOL_ERROR, "malformed", "RST_STREAM on an idle stream")
        if self.streams.pop(sid, None) is not None:
            self.handler.h2_reset(sid)

    def _stream_error(self, sid: int, code: int) -> None:
        known = self.streams.get(sid) is not None
        self.reset(sid, code)
        if known:
            self.handler.h2_reset(sid)

    # What the server sends.

    def reset(self, sid: int, code: int) -> None:
        """RST_STREAM ``sid``: it is closed."""
        self.streams.pop(sid, None)
        self.out += frame(RST_STREAM, 0, sid, _U32.pack(code))

    def goaway(self, code: int) -> None:
        """GOAWAY: no stream after the last one opened will be read."""
        if not self.closed:
            self.closed = True
            self.out += frame(GOAWAY, 0, 0, _U32.pack(self.last) + _U32.pack(code))

    def respond(self, sid: int, status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
        """Answer stream ``sid``: HEADERS, then DATA as the windows allow; the part of
        ``body`` they hold back (send it with :meth:`send_body` when they open)."""
        stream = self.streams.get(sid)
        if stream is None:
            return b""  # reset meanwhile
        block = encode_headers(status, headers, len(body))
        if len(block) > self.max_frame:
            self.reset(sid, INTERNAL_ERROR)
            return b""
        size = len(body)
        if size and size <= stream.send and size <= self.send_window and size <= self.max_frame:
            # The common case: one HEADERS and one DATA frame, the stream closed.
            stream.send -= size
            self.send_window -= size
            del self.streams[sid]
            out = self.out
            out += _HEAD.pack(0, len(block), HEADERS, END_HEADERS, sid)
            out += block
            out += _HEAD.pack(size >> 16, size & 0xFFFF, DATA, END_STREAM, sid)
            out += body
            return b""
        self.out += frame(HEADERS, END_HEADERS | (0 if body else END_STREAM), sid, block)
        if not body:
            del self.streams[sid]
            return b""
        return self.send_body(sid, body)

    def send_body(self, sid: int, body: bytes) -> bytes:
        """DATA of ``body`` on ``sid`` as far as the windows allow; the rest."""
        stream = self.streams.get(sid)
        while body and stream is not None:
            room = min(stream.send, self.send_window, self.max_frame)
            if room <= 0:
                return body
            chunk, body = body[:room], body[room:]
            stream.send -= len(chunk)
            self.send_window -= len(chunk)
            self.out += frame(DATA, 0 if body else END_STREAM, sid, chunk)
            if not body:
                del self.streams[sid]
        return b""

    def take(self) -> bytes:
        """What to write, and forget it."""
        data = bytes(self.out)
        self.out.clear()
        return data


def _request(fields: list[Field]) -> dict[str, str]:
    """A request's fields (repeats joined), checked as RFC 9113 section 8.2 and 8.3 ask;
    raises :class:`H2Error`."""
    out: dict[str, str] = {}
    regular = False
    for name, value in fields:
        if "\r" in value or "\n" in value or "\x00" in value:
            raise H2Error(PROTOCOL_ERROR, "malformed", "a field value with CR, LF or NUL")
        if name[:1] == ":":
            if regular or name not in _PSEUDO or name in out:
                raise H2Error(PROTOCOL_ERROR, "malformed", "a bad or repeated pseudo-header")
        else:
            regular = True
            if not name or name in _CONNECTION or name.lower() != name:
                raise H2Error(PROTOCOL_ERROR, "malformed", "a field not allowed in HTTP/2")
            if name == "te" and value != "trailers":
                raise H2Error(PROTOCOL_ERROR, "malformed", "te other than trailers")
        out[name] = f"{out[name]}, {value}" if name in out else value
    if not (":method" in out and ":scheme" in out and out.get(":path")):
        raise H2Error(PROTOCOL_ERROR, "malformed", "a request without :method, :scheme, :path")
    return out
