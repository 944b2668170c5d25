"""DNS over QUIC (RFC 9250) against the running server: dnspython's DoQ client, kdig +quic,
and a raw aioquic client for what well-behaved clients never send (non-zero IDs, bytes past
the length, oversized streams, too many streams, too many connections, garbage)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest

from resolver.config import DoQConfig, TCPConfig, TLSConfig, parse_listen
from resolver.service import doq
from resolver.service.assembly import StartupError

from .helpers.fakeupstream import Behaviour, FakeUpstream
from .helpers.server import RunningServer, has_ipv6

quic = pytest.importorskip(
    "aioquic", reason="DoQ needs aioquic, the optional 'quic' extra (pip install aioquic)"
)
import dns.quic  # noqa: E402

if not dns.quic.have_quic:  # dnspython's DoQ client needs aioquic too
    pytest.skip("dnspython has no QUIC support here", allow_module_level=True)

from aioquic.asyncio import connect  # noqa: E402
from aioquic.asyncio.protocol import QuicConnectionProtocol  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402
from aioquic.quic.events import (  # noqa: E402
    ConnectionTerminated,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)

from resolver.service.doqconn import (  # noqa: E402
    DOQ_EXCESSIVE_LOAD,
    DOQ_PROTOCOL_ERROR,
    DOQ_REQUEST_CANCELLED,
)

DOMAIN = "dns.example.test"


def certificate(folder: Path, tag: str = "") -> tuple[Path, Path]:
    """A self-signed certificate for the resolver's name and ``*.{its name}`` (client ids)."""
    cert, key = folder / f"cert{tag}.pem", folder / f"key{tag}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", f"/CN={DOMAIN}",
         "-addext", f"subjectAltName=DNS:{DOMAIN},DNS:*.{DOMAIN},IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path]:
    return certificate(tmp_path)


@pytest.fixture
def start_doq(
    make_server: Callable[..., RunningServer], certs: tuple[Path, Path]
) -> Callable[..., RunningServer]:
    def start(**overrides: Any) -> RunningServer:
        cert, key = certs
        return make_server(
            tls=TLSConfig(cert=cert, key=key, client_id_domain=DOMAIN),
            doq=DoQConfig((parse_listen("127.0.0.1:0"),)),
            **overrides,
        )

    return start


@pytest.fixture
def server(start_doq: Callable[..., RunningServer]) -> RunningServer:
    return start_doq()


def doq_port(server: RunningServer) -> int:
    return next(b.port for b in server.server.bound if b.proto == "doq")


def ask(
    server: RunningServer,
    name: str,
    rtype: str = "A",
    ca: Path | None = None,
    hostname: str = DOMAIN,
    timeout: float = 5,
    **kwargs: Any,
) -> dns.message.Message:
    query = dns.message.make_query(name, rtype, use_edns=0)
    verify: str | bool = str(ca) if ca is not None else False
    return dns.query.quic(
        query, "127.0.0.1", timeout=timeout, port=doq_port(server), verify=verify,
        server_hostname=hostname, **kwargs,
    )  # fmt: skip


def ede(message: dns.message.Message) -> list[tuple[int, str]]:
    return [(o.code, o.text or "") for o in message.options if isinstance(o, dns.edns.EDEOption)]


def test_allowed_blocked_and_forwarded_names(
    server: RunningServer, certs: tuple[Path, Path]
) -> None:
    cert, _ = certs
    forwarded = ask(server, "example.test", ca=cert)
    assert forwarded.rcode() == dns.rcode.NOERROR
    assert forwarded.id == 0  # RFC 9250: the ID is 0 over QUIC, both ways
    assert [r.to_text() for r in forwarded.answer[0]] == ["192.0.2.1"]
    allowed = ask(server, "notdeepseek.com", ca=cert)  # a name near a blocked one
    assert [r.to_text() for r in allowed.answer[0]] == ["192.0.2.3"]
    # A blocked name: the same answer and extended error as over UDP.
    blocked = ask(server, "deepseek.com", ca=cert)
    over_udp = server.query("deepseek.com", "A", use_edns=0)
    assert blocked.rcode() == over_udp.rcode() == dns.rcode.NXDOMAIN
    assert ede(blocked) == ede(over_udp)
    assert ede(blocked)
    assert blocked.authority == over_udp.authority


def test_several_queries_share_one_connection(
    server: RunningServer, certs: tuple[Path, Path]
) -> None:
    cert, _ = certs
    port = doq_port(server)
    with dns.quic.SyncQuicManager(verify_mode=str(cert), server_name=DOMAIN) as manager:
        connection = manager.connect("127.0.0.1", port)
        for name, rcode in [("example.test", 0), ("deepseek.com", 3), ("www.example.test", 0)] * 3:
            query = dns.message.make_query(name, "A")
            reply = dns.query.quic(query, "127.0.0.1", timeout=5, port=port, connection=connection)
            assert reply.rcode() == rcode
    counts = server.server.doq.counts() if server.server.doq else {}
    assert counts["connections"] == 1
    assert counts["queries"] == 9


def test_the_client_id_comes_from_the_server_name(
    server: RunningServer, certs: tuple[Path, Path]
) -> None:
    cert, _ = certs
    listeners = server.server.doq
    assert listeners is not None
    seen: list[tuple[str, int, str]] = []
    handler = listeners.limits.handler

    def recording(data: bytes, client: str, tcp: bool, proto: int, client_id: str) -> Any:
        seen.append((client, proto, client_id))
        return handler(data, client, tcp, proto, client_id)

    listeners.limits.handler = recording
    ask(server, "example.test", ca=cert, hostname=f"laptop-7.{DOMAIN}")
    ask(server, "example.test", ca=cert, hostname=DOMAIN)
    ask(server, "example.test")  # no server name at all: verify=False, an address
    from resolver.core.stats import PROTO_DOQ

    assert seen == [
        ("127.0.0.1", PROTO_DOQ, "laptop-7"),
        ("127.0.0.1", PROTO_DOQ, ""),
        ("127.0.0.1", PROTO_DOQ, ""),
    ]


def test_kdig_over_quic(server: RunningServer, certs: tuple[Path, Path]) -> None:
    kdig = shutil.which("kdig")
    if kdig is None:
        pytest.skip("kdig is not installed")
    cert, _ = certs
    run = subprocess.run(
        [kdig, "@127.0.0.1", "-p", str(doq_port(server)), f"+tls-ca={cert}",
         f"+tls-hostname={DOMAIN}", "+quic", "+timeout=3", "+retry=0", "deepseek.com", "A"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    if "QUIC" in run.stderr and "support" in run.stderr.lower():
        pytest.skip(f"this kdig has no QUIC: {run.stderr.strip()}")
    assert "status: NXDOMAIN" in run.stdout, run.stdout + run.stderr
    assert "QUIC" in run.stdout


# --- what only a hostile or broken client sends: a raw aioquic client ---------------------


class Raw(QuicConnectionProtocol):
    """A bare DoQ client: records what comes back on each stream and how it ended."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.data: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.closed_with: int | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            self.data[event.stream_id] = self.data.get(event.stream_id, b"") + event.data
            if event.end_stream:
                self.ended.add(event.stream_id)
        elif isinstance(event, StreamReset):
            self.resets[event.stream_id] = event.error_code
        elif isinstance(event, ConnectionTerminated):
            self.closed_with = event.error_code

    def send(self, payload: bytes, end: bool = True) -> int:
        stream = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(stream, payload, end_stream=end)
        self.transmit()
        return stream


def framed(wire: bytes) -> bytes:
    return len(wire).to_bytes(2, "big") + wire


def query_wire(name: str = "example.test", qid: int = 0) -> bytes:
    message = dns.message.make_query(name, "A")
    message.id = qid
    return message.to_wire()


async def raw_session(port: int, script: Callable[[Raw], Any], wait: float = 3.0) -> Raw:
    config = QuicConfiguration(alpn_protocols=["doq"], is_client=True, verify_mode=0)
    config.server_name = DOMAIN
    async with connect("127.0.0.1", port, configuration=config, create_protocol=Raw) as client:
        assert isinstance(client, Raw)
        await script(client)
        end = time.monotonic() + wait
        while time.monotonic() < end and client.closed_with is None:
            await asyncio.sleep(0.05)
            if getattr(client, "done", False):
                break
        return client


def still_answers(server: RunningServer) -> None:
    assert ask(server, "example.test").rcode() == dns.rcode.NOERROR
    assert server.query("example.test").rcode() == dns.rcode.NOERROR


def test_non_zero_id_and_bytes_past_the_length_are_protocol_errors(server: RunningServer) -> None:
    port = doq_port(server)

    async def non_zero_id(client: Raw) -> None:
        client.send(framed(query_wire(qid=4242)))

    async def past_length(client: Raw) -> None:
        client.send(framed(query_wire()) + b"extra bytes")

    async def short(client: Raw) -> None:
        client.send(b"\x00")  # a stream that ends inside its length

    for script in (non_zero_id, past_length, short):
        client = asyncio.run(raw_session(port, script))
        assert client.closed_with == DOQ_PROTOCOL_ERROR
    assert server.server.doq is not None
    assert server.server.doq.counts()["protocol_errors"] == 3
    still_answers(server)


def test_oversized_streams_never_stop_the_listener(server: RunningServer) -> None:
    port = doq_port(server)

    async def oversized(client: Raw) -> None:
        # 200 kB on one stream: far past one message; flow control stops it.
        client.send(b"\xff\xff" + os.urandom(200_000))
        await asyncio.sleep(0.5)

    client = asyncio.run(raw_session(port, oversized))
    assert client.closed_with is not None  # FLOW_CONTROL_ERROR or DOQ_PROTOCOL_ERROR
    still_answers(server)


def test_unfinished_queries_are_bounded_in_bytes(server: RunningServer) -> None:
    """Streams that declare the largest message and never finish it: past MAX_BUFFERED
    bytes held for one connection, it is closed."""
    from resolver.service.doqconn import MAX_BUFFERED

    port = doq_port(server)

    async def hoard(client: Raw) -> None:
        for _ in range(MAX_BUFFERED // 50_000 + 1):
            client.send(b"\xff\xff" + os.urandom(50_000), end=False)
        await asyncio.sleep(0.5)

    client = asyncio.run(raw_session(port, hoard))
    assert client.closed_with == DOQ_EXCESSIVE_LOAD
    assert server.server.doq is not None
    assert server.server.doq.counts()["buffer_overflows"] == 1
    still_answers(server)


def test_a_query_trickling_in_is_cancelled_after_the_idle_timeout(
    start_doq: Callable[..., RunningServer],
) -> None:
    server = start_doq(tcp=TCPConfig(idle_timeout=1.0))
    port = doq_port(server)
    wire = framed(query_wire())

    async def trickle(client: Raw) -> None:
        stream = client._quic.get_next_available_stream_id()
        end = time.monotonic() + 4
        for byte in wire[:-1]:  # never the last byte; one every 0.2 s keeps it alive
            if stream in client.resets or time.monotonic() > end:
                break
            client._quic.send_stream_data(stream, bytes([byte]))
            client.transmit()
            await asyncio.sleep(0.2)
        client.done = True  # type: ignore[attr-defined]

    client = asyncio.run(raw_session(port, trickle))
    assert list(client.resets.values()) == [DOQ_REQUEST_CANCELLED]
    assert server.server.doq is not None
    assert server.server.doq.counts()["slow_streams"] == 1
    still_answers(server)


def test_streams_over_the_limit_are_refused(start_doq: Callable[..., RunningServer]) -> None:
    server = start_doq(tcp=TCPConfig(max_pipeline=2))
    port = doq_port(server)

    async def many(client: Raw) -> None:
        # Queries never finished (no FIN, half a message): each holds its stream.
        for _ in range(2):
            client.send(framed(query_wire())[:5], end=False)
        await asyncio.sleep(0.3)
        third = client.send(framed(query_wire()))
        end = time.monotonic() + 3
        while third not in client.resets and time.monotonic() < end:
            await asyncio.sleep(0.05)
        client.done = True  # type: ignore[attr-defined]

    client = asyncio.run(raw_session(port, many))
    assert list(client.resets.values()) == [DOQ_EXCESSIVE_LOAD]
    assert server.server.doq is not None
    assert server.server.doq.counts()["streams_refused"] == 1


def test_connections_over_the_limit_are_dropped(start_doq: Callable[..., RunningServer]) -> None:
    server = start_doq(tcp=TCPConfig(max_connections=1, idle_timeout=30.0))
    port = doq_port(server)
    with dns.quic.SyncQuicManager(verify_mode=False, server_name=DOMAIN) as manager:
        first = manager.connect("127.0.0.1", port)
        query = dns.message.make_query("example.test", "A")
        assert (
            dns.query.quic(query, "127.0.0.1", timeout=5, port=port, connection=first).rcode() == 0
        )
        with pytest.raises(dns.exception.Timeout):
            ask(server, "example.test", timeout=1.5)  # a second connection
    assert server.server.doq is not None
    assert server.server.doq.counts()["connections_refused"] >= 1
    # The first one closed: room again.
    deadline = time.monotonic() + 5
    while server.server.doq.limits.live and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.server.doq.limits.live == 0
    still_answers(server)


def test_garbage_datagrams_never_stop_the_listener(
    start_doq: Callable[..., RunningServer],
) -> None:
    server = start_doq(tcp=TCPConfig(idle_timeout=1.0))
    port = doq_port(server)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for size in (0, 1, 5, 40, 1200, 1500):
            sock.sendto(os.urandom(size), ("127.0.0.1", port))
        # Long-header packets that look like Initials: version 1, random connection ids.
        for _ in range(20):
            head = bytes([0xC0]) + (1).to_bytes(4, "big") + bytes([8]) + os.urandom(8)
            sock.sendto(head + bytes([8]) + os.urandom(8) + os.urandom(1200), ("127.0.0.1", port))
        # An unknown version: answered with version negotiation, not a crash.
        sock.sendto(
            bytes([0xC0]) + b"\x0a\x0a\x0a\x0a" + bytes([8]) + os.urandom(1300), ("127.0.0.1", port)
        )
    still_answers(server)
    # Connections that garbage opened never complete a handshake: closed, none lingers.
    listeners = server.server.doq
    assert listeners is not None
    deadline = time.monotonic() + 6
    while listeners.limits.live and time.monotonic() < deadline:
        time.sleep(0.1)
    assert listeners.limits.live == 0


def test_a_wrong_alpn_gets_no_service(server: RunningServer) -> None:
    config = QuicConfiguration(alpn_protocols=["h3"], is_client=True, verify_mode=0)

    async def attempt() -> None:
        async with connect(
            "127.0.0.1", doq_port(server), configuration=config, wait_connected=True
        ):
            pass

    with pytest.raises(ConnectionError):
        asyncio.run(asyncio.wait_for(attempt(), 5))
    still_answers(server)
    assert server.server.doq is not None
    counts = server.server.doq.counts()
    assert counts["handshake_failures"] == 1
    assert counts["handshakes"] == 1  # still_answers' own connection


def test_a_renewed_certificate_serves_new_connections_and_open_ones_stay(
    start_doq: Callable[..., RunningServer],
    certs: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(doq, "POLL", 0.2)
    server = start_doq()
    port = doq_port(server)
    cert, key = certs
    old = tmp_path / "old-ca.pem"
    shutil.copy(cert, old)
    with dns.quic.SyncQuicManager(verify_mode=str(old), server_name=DOMAIN) as manager:
        open_one = manager.connect("127.0.0.1", port)
        query = dns.message.make_query("example.test", "A")
        assert (
            dns.query.quic(query, "127.0.0.1", timeout=5, port=port, connection=open_one).rcode()
            == 0
        )
        new_cert, new_key = certificate(tmp_path, "-renewed")
        os.replace(new_key, key)
        os.replace(new_cert, cert)
        deadline = time.monotonic() + 5
        assert server.server.doq is not None
        while server.server.doq.renewals == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.server.doq.renewals == 1
        # New connections present the new certificate: the old CA no longer verifies...
        with pytest.raises(Exception):  # noqa: B017 (aioquic's verification error)
            ask(server, "example.test", ca=old)
        assert ask(server, "example.test", ca=cert).rcode() == 0
        # ...and the connection opened before the renewal still answers.
        query = dns.message.make_query("www.example.test", "A")
        assert (
            dns.query.quic(query, "127.0.0.1", timeout=5, port=port, connection=open_one).rcode()
            == 0
        )


def test_without_aioquic_doq_listen_is_a_clear_startup_error(
    start_doq: Callable[..., RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doq, "available", lambda: False)
    with pytest.raises(StartupError, match=r"aioquic.*pip install"):
        start_doq()


def test_status_lists_the_doq_listener(server: RunningServer) -> None:
    assert f"doq 127.0.0.1:{doq_port(server)}" in [str(b) for b in server.server.bound]


def test_config_without_doq_starts_no_quic(make_server: Callable[..., RunningServer]) -> None:
    server = make_server()
    assert server.server.doq is None
    assert not [b for b in server.server.bound if b.proto == "doq"]


def test_the_package_runs_without_aioquic(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    """In a process where aioquic cannot be imported: the resolver imports, checks and
    serves plain DNS, and a doq.listen is a startup error that names the extra."""
    cert, key = certs
    config = tmp_path / "resolver.yaml"
    config.write_text(
        f"listen: [127.0.0.1:0]\nupstreams: [127.0.0.1:9]\ntls: {{cert: {cert}, key: {key}}}\n"
        "doq: {listen: [127.0.0.1:0]}\n"
    )
    script = (
        "import sys; sys.modules['aioquic'] = None\n"  # import aioquic -> ImportError
        "from resolver.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(doq.__file__).parents[2])},
    )
    assert run.returncode == 2, run.stderr
    assert "doq.listen needs aioquic" in run.stderr
    assert "pip install 'dns-filtering-resolver[quic]'" in run.stderr


def test_stopping_answers_queries_in_progress_and_takes_no_new_ones(
    server: RunningServer, upstream: FakeUpstream
) -> None:
    upstream.behaviours["example.test"] = Behaviour(delay=0.3)  # under upstream_timeout
    port = doq_port(server)
    stopped: list[Any] = []

    async def drain(client: Raw) -> None:
        first = client.send(framed(query_wire("example.test")))
        await asyncio.sleep(0.1)  # the query waits for the upstream
        stopped.append(asyncio.run_coroutine_threadsafe(server.server.stop(), server.loop))
        await asyncio.sleep(0.05)
        second = client.send(framed(query_wire("www.example.test")))
        end = time.monotonic() + 3
        while (first not in client.ended or second not in client.resets) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        client.done = True  # type: ignore[attr-defined]
        client.first, client.second = first, second  # type: ignore[attr-defined]

    client = asyncio.run(raw_session(port, drain))
    first, second = client.first, client.second  # type: ignore[attr-defined]
    answer = dns.message.from_wire(client.data[first][2:])
    assert answer.rcode() == dns.rcode.NOERROR and answer.answer
    assert client.resets.get(second) == DOQ_EXCESSIVE_LOAD
    stopped[0].result(10)


def test_a_key_that_does_not_match_is_a_startup_error_naming_the_file(
    make_server: Callable[..., RunningServer], certs: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, _ = certs
    _, other_key = certificate(tmp_path, "-other")
    with pytest.raises(StartupError, match=r"key-other\.pem.*does not match"):
        make_server(
            tls=TLSConfig(cert=cert, key=other_key),
            doq=DoQConfig((parse_listen("127.0.0.1:0"),)),
        )


def test_doq_over_ipv6(make_server: Callable[..., RunningServer], certs: tuple[Path, Path]) -> None:
    if not has_ipv6():
        pytest.skip("no IPv6 loopback here")
    cert, key = certs
    server = make_server(
        tls=TLSConfig(cert=cert, key=key),
        doq=DoQConfig((parse_listen("[::1]:0"), parse_listen("127.0.0.1:0"))),
    )
    ports = [b.port for b in server.server.bound if b.proto == "doq"]
    assert len(ports) == 2
    query = dns.message.make_query("deepseek.com", "A")
    reply = dns.query.quic(query, "::1", port=ports[0], timeout=5, verify=False)
    assert reply.rcode() == dns.rcode.NXDOMAIN


def test_answers_are_padded_when_the_query_asks(server: RunningServer) -> None:
    """RFC 9250 5.4: a query with an EDNS padding option gets its answer padded to a
    multiple of 468 bytes (RFC 8467), forwarded or from the cache; one without, not."""
    from resolver.core.padding import RESPONSE_BLOCK

    def wire(name: str, pad: bool) -> bytes:
        options = [dns.edns.GenericOption(12, b"\0" * 16)] if pad else []
        message = dns.message.make_query(name, "A", use_edns=0, options=options)
        message.id = 0
        return message.to_wire()

    streams: dict[str, int] = {}

    async def script(client: Raw) -> None:
        # forwarded (padded), then the same from the cache (padded), then plain; a blocked
        # name (answered at once) padded too.
        for label, name, pad in [
            ("forwarded", "www.example.test", True),
            ("cached", "www.example.test", True),
            ("plain", "www.example.test", False),
            ("blocked", "deepseek.com", True),
        ]:
            streams[label] = client.send(framed(wire(name, pad)))
            for _ in range(100):
                if streams[label] in client.ended:
                    break
                await asyncio.sleep(0.02)
        client.done = True  # type: ignore[attr-defined]

    client = asyncio.run(raw_session(doq_port(server), script))
    answers = {label: client.data[stream][2:] for label, stream in streams.items()}
    for label in ("forwarded", "cached", "blocked"):
        assert len(answers[label]) % RESPONSE_BLOCK == 0, label
        assert any(o.otype == 12 for o in dns.message.from_wire(answers[label]).options)
    assert len(answers["plain"]) % RESPONSE_BLOCK != 0
    padded, plain = (dns.message.from_wire(answers[k]) for k in ("cached", "plain"))
    assert padded.answer == plain.answer and padded.answer
    assert dns.message.from_wire(answers["blocked"]).rcode() == dns.rcode.NXDOMAIN
