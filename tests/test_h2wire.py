"""HTTP/2 frames of the DoH listener (resolver/service/h2wire.py): what a polite client
(h2's) gets, and what a rude one sending raw frames gets (GOAWAY or RST_STREAM with the
right code). The listener over sockets is tests/test_doh_listener.py's."""

from __future__ import annotations

import struct
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest

from resolver.service import h2wire
from resolver.service.h2wire import H2Error, H2Server, frame

from .test_doh_listener import cert, doh_server  # noqa: F401 (fixtures)

PREFACE = h2wire.PREFACE
SETTINGS = frame(h2wire.SETTINGS, 0, 0)
GET = [(":method", "GET"), (":scheme", "https"), (":authority", "a"), (":path", "/dns-query")]


class Recorder:
    """A Handler that writes down what it is told."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def h2_request(self, sid: int, fields: dict[str, str], size: int, end: bool) -> None:
        self.seen.append(("request", sid, fields, end))

    def h2_data(self, sid: int, data: bytes, end: bool) -> None:
        self.seen.append(("data", sid, data, end))

    def h2_reset(self, sid: int) -> None:
        self.seen.append(("reset", sid))

    def h2_window(self) -> None:
        self.seen.append(("window",))


def server(max_streams: int = 100) -> tuple[H2Server, Recorder]:
    handler = Recorder()
    conn = H2Server(handler, max_streams)
    conn.receive(PREFACE + SETTINGS)
    conn.take()
    return conn, handler


def block(fields: list[tuple[str, str]], encoder: hpack.Encoder | None = None) -> bytes:
    return (encoder or hpack.Encoder()).encode(fields)


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of each frame in ``data``."""
    out, pos = [], 0
    while pos < len(data):
        size = int.from_bytes(data[pos : pos + 3], "big")
        kind, flags = data[pos + 3], data[pos + 4]
        sid = int.from_bytes(data[pos + 5 : pos + 9], "big")
        out.append((kind, flags, sid, data[pos + 9 : pos + 9 + size]))
        pos += 9 + size
    return out


def goaway_code(data: bytes) -> int:
    (payload,) = [p for k, _, _, p in frames(data) if k == h2wire.GOAWAY]
    return int(struct.unpack(">LL", payload[:8])[1])


def refused(conn: H2Server, data: bytes) -> tuple[int, str]:
    """The GOAWAY code and counted reason of a connection error ``data`` causes."""
    with pytest.raises(H2Error) as caught:
        conn.receive(data)
    return goaway_code(conn.take()), caught.value.reason


def test_an_h2_client_is_answered_in_one_headers_and_one_data_frame() -> None:
    handler = Recorder()
    conn = H2Server(handler, 100)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, GET, end_stream=True)
    client.send_headers(3, [*GET[:3], (":method", "POST"), (":path", "/q")][1:])
    client.send_data(3, b"x" * 40, end_stream=False)
    client.send_headers(3, [("x-trailer", "1")], end_stream=True)
    data = client.data_to_send()
    for i in range(0, len(data), 7):  # a few bytes at a time
        assert conn.receive(data[i : i + 7])
    kinds = [s[0] for s in handler.seen]
    assert kinds == ["window", "request", "request", "data", "data"]
    assert handler.seen[1] == ("request", 1, dict(GET), True)
    assert handler.seen[3:] == [("data", 3, b"x" * 40, False), ("data", 3, b"", True)]
    assert conn.respond(1, 200, [("content-type", "application/dns-message")], b"abc") == b""
    assert conn.respond(3, 405, [("allow", "GET, POST")], b"no") == b""
    out = conn.take()
    assert [k for k, *_ in frames(out)].count(h2wire.DATA) == 2
    events = client.receive_data(out)
    responses = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert [dict(r.headers) for r in responses] == [
        {
            b":status": b"200",
            b"content-type": b"application/dns-message",
            b"content-length": b"3",
        },
        {b":status": b"405", b"allow": b"GET, POST", b"content-length": b"2"},
    ]
    assert sum(isinstance(e, h2.events.StreamEnded) for e in events) == 2
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in events)
    assert not conn.streams


def test_answers_wait_for_the_clients_windows() -> None:
    conn, handler = server()
    settings = struct.pack(">HL", 0x4, 0)  # INITIAL_WINDOW_SIZE 0
    conn.receive(frame(h2wire.SETTINGS, 0, 0, settings))
    conn.receive(frame(h2wire.HEADERS, 0x5, 1, block(GET)))
    assert conn.respond(1, 200, [], b"answer") == b"answer"
    assert [k for k, *_ in frames(conn.take())] == [h2wire.SETTINGS, h2wire.HEADERS]
    conn.receive(frame(h2wire.WINDOW_UPDATE, 0, 1, struct.pack(">L", 4)))
    assert handler.seen[-1] == ("window",)
    assert conn.send_body(1, b"answer") == b"er"
    conn.receive(frame(h2wire.WINDOW_UPDATE, 0, 1, struct.pack(">L", 100)))
    assert conn.send_body(1, b"er") == b""
    sent = frames(conn.take())
    assert [(k, f, p) for k, f, _, p in sent] == [
        (h2wire.DATA, 0, b"answ"),
        (h2wire.DATA, h2wire.END_STREAM, b"er"),
    ]
    assert not conn.streams


def test_ping_priority_padding_and_reset() -> None:
    conn, handler = server()
    conn.receive(frame(h2wire.PING, 0, 0, b"12345678"))
    assert frames(conn.take()) == [(h2wire.PING, h2wire.ACK, 0, b"12345678")]
    padded = b"\x03" + b"\x00\x00\x00\x00\x10" + block(GET) + b"\x00" * 3
    conn.receive(frame(h2wire.HEADERS, 0x4 | 0x8 | 0x20, 1, padded))
    conn.receive(frame(h2wire.PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10"))
    conn.receive(frame(h2wire.DATA, 0x8, 1, b"\x02ab\x00\x00"))
    assert handler.seen[-1] == ("data", 1, b"ab", False)
    conn.receive(frame(h2wire.RST_STREAM, 0, 1, struct.pack(">L", 8)))
    assert handler.seen[-1] == ("reset", 1)
    assert conn.respond(1, 200, [], b"late") == b""  # reset meanwhile: nothing sent
    conn.receive(frame(h2wire.DATA, 0, 1, b"more"))  # a closed stream: dropped
    assert handler.seen[-1] == ("reset", 1)
    assert not conn.take()


def test_stream_errors_reset_only_the_stream() -> None:
    conn, handler = server()
    conn.receive(frame(h2wire.HEADERS, 0x5, 1, block(GET)))
    conn.receive(frame(h2wire.DATA, 0, 1, b"after the end"))  # half-closed (remote)
    assert frames(conn.take())[-1] == (h2wire.RST_STREAM, 0, 1, struct.pack(">L", 5))
    assert handler.seen[-1] == ("reset", 1)
    encoder = hpack.Encoder()
    conn.receive(frame(h2wire.HEADERS, 0x5, 1, block(GET, encoder)))  # a closed stream
    assert frames(conn.take())[-1] == (h2wire.RST_STREAM, 0, 1, struct.pack(">L", 5))
    conn.receive(frame(h2wire.HEADERS, 0x5, 3, block(GET, encoder)))  # the table followed
    assert handler.seen[-1] == ("request", 3, dict(GET), True)


@pytest.mark.parametrize(
    ("data", "code", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n" + b"x" * 20, h2wire.PROTOCOL_ERROR, "malformed"),
        (b"PRI * HTTP/2.0\r\n\r\nXX", h2wire.PROTOCOL_ERROR, "malformed"),
        (PREFACE + frame(h2wire.PING, 0, 0, b"12345678"), h2wire.PROTOCOL_ERROR, "malformed"),
        (PREFACE + frame(h2wire.SETTINGS, 0, 0, b"12345"), h2wire.FRAME_SIZE_ERROR, "malformed"),
    ],
)
def test_a_bad_start_is_a_connection_error(data: bytes, code: int, reason: str) -> None:
    conn = H2Server(Recorder(), 100)
    assert refused(conn, data) == (code, reason)
    assert conn.receive(frame(h2wire.PING, 0, 0, b"12345678"))  # nothing read after GOAWAY
    assert not conn.take()


def _headers(sid: int, fields: list[tuple[str, str]]) -> bytes:
    return frame(h2wire.HEADERS, 0x5, sid, block(fields))


@pytest.mark.parametrize(
    ("data", "code", "reason"),
    [
        (frame(h2wire.DATA, 0, 0, b"x"), h2wire.PROTOCOL_ERROR, "malformed"),
        (frame(h2wire.DATA, 0, 7, b"x"), h2wire.PROTOCOL_ERROR, "malformed"),  # idle
        (_headers(2, GET), h2wire.PROTOCOL_ERROR, "malformed"),  # an even stream
        (_headers(1, GET[1:]), h2wire.PROTOCOL_ERROR, "malformed"),  # no :method
        (_headers(1, [*GET, ("Upper", "x")]), h2wire.PROTOCOL_ERROR, "malformed"),
        (_headers(1, [*GET, ("connection", "x")]), h2wire.PROTOCOL_ERROR, "malformed"),
        (_headers(1, [("x", "1"), *GET]), h2wire.PROTOCOL_ERROR, "malformed"),  # order
        (_headers(1, [*GET, ("x", "a\nb")]), h2wire.PROTOCOL_ERROR, "malformed"),
        (frame(h2wire.HEADERS, 0x5, 1, b"\xff\xff\xff"), h2wire.COMPRESSION_ERROR, "malformed"),
        (frame(h2wire.PUSH_PROMISE, 0x4, 1, b"\x00" * 4), h2wire.PROTOCOL_ERROR, "malformed"),
        (frame(h2wire.RST_STREAM, 0, 9, b"\x00" * 4), h2wire.PROTOCOL_ERROR, "malformed"),
        (frame(h2wire.WINDOW_UPDATE, 0, 0, b"\x00" * 4), h2wire.PROTOCOL_ERROR, "malformed"),
        (
            frame(h2wire.WINDOW_UPDATE, 0, 0, struct.pack(">L", 2**31 - 1)),
            h2wire.FLOW_CONTROL_ERROR,
            "malformed",
        ),
        (b"\x00\x40\x01\x00\x00\x00\x00\x00\x01", h2wire.FRAME_SIZE_ERROR, "malformed"),
        (
            frame(h2wire.SETTINGS, 0, 0, struct.pack(">HL", 0x5, 100)),
            h2wire.PROTOCOL_ERROR,
            "malformed",
        ),
    ],
)
def test_a_bad_frame_is_a_connection_error(data: bytes, code: int, reason: str) -> None:
    conn, _ = server()
    assert refused(conn, data) == (code, reason)


def test_a_continuation_flood_and_an_interrupted_block_are_refused() -> None:
    conn, _ = server()
    data = frame(h2wire.HEADERS, 0x1, 1, block(GET)[:2])
    data += frame(h2wire.CONTINUATION, 0, 1) * (h2wire.MAX_CONTINUATIONS + 1)
    assert refused(conn, data) == (h2wire.ENHANCE_YOUR_CALM, "headers_too_large")
    conn, _ = server()
    data = frame(h2wire.HEADERS, 0x1, 1, b"") + frame(h2wire.CONTINUATION, 0, 1, b"x" * 16384) * 5
    assert refused(conn, data) == (h2wire.ENHANCE_YOUR_CALM, "headers_too_large")
    conn, _ = server()
    data = frame(h2wire.HEADERS, 0x1, 1, block(GET)) + frame(h2wire.PING, 0, 0, b"12345678")
    assert refused(conn, data) == (h2wire.PROTOCOL_ERROR, "malformed")
    conn, handler = server()  # the polite way: a block split in three
    whole = block(GET)
    data = frame(h2wire.HEADERS, 0x1, 1, whole[:3]) + frame(h2wire.CONTINUATION, 0, 1, whole[3:6])
    conn.receive(data + frame(h2wire.CONTINUATION, 0x4, 1, whole[6:]))
    assert handler.seen[-1] == ("request", 1, dict(GET), True)


def test_window_abuse_and_too_many_streams_are_refused() -> None:
    conn, _ = server()
    post = [*GET[1:], (":method", "POST")]
    data = frame(h2wire.HEADERS, 0x4, 1, block(post))
    data += frame(h2wire.DATA, 0, 1, b"x" * 16384) * 4  # 65,536: one over the window
    assert refused(conn, data) == (h2wire.FLOW_CONTROL_ERROR, "malformed")
    conn, _ = server(max_streams=3)
    encoder = hpack.Encoder()
    data = b"".join(frame(h2wire.HEADERS, 0x4, s, block(post, encoder)) for s in (1, 3, 5))
    conn.receive(data)
    assert len(conn.streams) == 3
    assert refused(conn, frame(h2wire.HEADERS, 0x4, 7, block(post, encoder))) == (
        h2wire.PROTOCOL_ERROR,
        "streams",
    )


def test_what_is_read_is_given_back_once_half_a_window_is_read() -> None:
    conn, handler = server()
    post = [*GET[1:], (":method", "POST")]
    conn.receive(frame(h2wire.HEADERS, 0x4, 1, block(post)))
    conn.receive(frame(h2wire.DATA, 0, 1, b"x" * 16000))
    assert not conn.take()
    conn.receive(frame(h2wire.DATA, 0, 1, b"x" * 16000) * 2)
    updates = [(s, p) for k, _, s, p in frames(conn.take()) if k == h2wire.WINDOW_UPDATE]
    assert updates == [(1, struct.pack(">L", 48000)), (0, struct.pack(">L", 48000))]
    conn.receive(frame(h2wire.DATA, 0, 1, b"x" * 16000) * 4)  # the windows were opened
    assert len([s for s in handler.seen if s[0] == "data"]) == 7


def test_hpack_decoding_follows_the_encoders_table() -> None:
    from resolver.service.hpackdec import DecodeError, Decoder

    encoder, decoder = hpack.Encoder(), Decoder(65536)
    for i in range(300):  # the table fills, evicts, and blocks repeat
        fields = [*GET, ("x-long", "v" * (i % 50)), ("x-n", str(i % 7))]
        block = encoder.encode(fields, huffman=bool(i % 2))
        assert decoder.decode(block)[0] == fields
        assert decoder.size <= 4096
    sensitive = encoder.encode([hpack.NeverIndexedHeaderTuple("authorization", "secret")])
    assert decoder.decode(sensitive)[0] == [("authorization", "secret")]
    encoder.header_table_size = 0  # a size update first, then nothing indexed
    assert decoder.decode(encoder.encode(GET))[0] == GET and not decoder.table
    for bad in (b"\x80", b"\xff\xff\xff\xff\xff\xff", b"\x40\x05abc", b"\x82\x3f\xe1\x1f"):
        with pytest.raises(DecodeError):
            Decoder(65536).decode(bad)
    with pytest.raises(DecodeError) as caught:
        Decoder(100).decode(hpack.Encoder().encode([("x", "y" * 100)]))
    assert caught.value.oversized


def test_raw_frames_over_tls_get_goaway_and_the_listener_serves_on(
    request: pytest.FixtureRequest,
) -> None:
    """A hand-written client on the running listener: each abuse is a GOAWAY with its
    code, counted by reason; the listener answers the next client."""
    start_server = request.getfixturevalue("doh_server")
    pair = request.getfixturevalue("cert")
    from .test_doh_listener import (
        _read_all,
        client_context,
        doh_query,
        metric,
        port_of,
        tls_connect,
    )

    running = start_server()
    context = client_context(pair[0], ["h2"])
    post = [*GET[1:], (":method", "POST")]
    start = PREFACE + SETTINGS
    flood = frame(h2wire.HEADERS, 0x1, 1, block(GET)[:2])
    flood += frame(h2wire.CONTINUATION, 0, 1) * (h2wire.MAX_CONTINUATIONS + 1)
    abuse = frame(h2wire.HEADERS, 0x4, 1, block(post)) + frame(h2wire.DATA, 0, 1, b"x" * 16384) * 4
    encoder = hpack.Encoder()
    many = b"".join(frame(h2wire.HEADERS, 0x4, s, block(post, encoder)) for s in range(1, 204, 2))
    for data, code in (
        (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", h2wire.PROTOCOL_ERROR),
        (start + flood, h2wire.ENHANCE_YOUR_CALM),
        (start + abuse, h2wire.FLOW_CONTROL_ERROR),
        (start + many, h2wire.PROTOCOL_ERROR),
    ):
        with tls_connect(port_of(running), context) as sock:
            sock.sendall(data)
            sock.settimeout(5)
            assert goaway_code(_read_all(sock)) == code
    for reason, count in (("malformed", 2), ("headers_too_large", 1), ("streams", 1)):
        assert metric(running, f'resolver_doh_rejected_total{{reason="{reason}"}}') == count
    import dns.message

    assert doh_query(running, pair[0], dns.message.make_query("example.test", "A")).answer
