"""DNS over TLS for clients (service/dot.py), with a test CA made here: real clients (kdig
+tls, dnspython, openssl s_client), pipelining out of order, the same answers and EDE as
over UDP, certificate renewal with a connection open, client ids from the TLS server name,
EDNS padding, and hostile TLS input that never stops the listener."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest

from resolver.config import DoTConfig, Listen, ReloadConfig, TCPConfig, TLSConfig
from resolver.core.padding import RESPONSE_BLOCK
from resolver.core.stats import PROTO_DOT
from resolver.service.dot import watch_certificate
from resolver.service.server import StartupError

from .helpers import server as server_helpers
from .helpers.client import read_frame as read_plain_frame
from .helpers.client import send_frame
from .helpers.fakeupstream import Behaviour, FakeUpstream
from .helpers.http import check_against_spec, http, scrape
from .helpers.server import RunningServer
from .helpers.testca import TestCA


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


@pytest.fixture(params=["asyncio", "uvloop"])
def dot(
    make_server: Callable[..., RunningServer],
    tmp_path: Path,
    ca: TestCA,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[RunningServer]:
    """The server with a DoT listener, on asyncio's loop and on uvloop's (what `resolver
    serve` runs when installed: its TLS protocol and its reads differ)."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        monkeypatch.setattr(server_helpers.asyncio, "new_event_loop", uvloop.new_event_loop)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    ca.issue(cert, key)
    server = make_server(
        tls=TLSConfig(cert=cert, key=key, client_id_domain="dot.test"),
        dot=DoTConfig(listen=(Listen("127.0.0.1", 0),)),
        reload=ReloadConfig(interval=0.1),
    )
    server.dot_port = dot_port(server)  # type: ignore[attr-defined]
    store = server.server.certs
    assert store is not None
    # What Server.serve runs: the certificate files checked every reload.interval.
    watching = asyncio.run_coroutine_threadsafe(
        watch_certificate(store, lambda: 0.1, server.server.stopping), server.loop
    )
    yield server
    watching.cancel()


def dot_port(server: RunningServer) -> int:
    return next(b.port for b in server.server.bound if b.proto == "dot")


def client_context(ca: TestCA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.path))
    ctx.set_alpn_protocols(["dot"])
    return ctx


def connect(server: RunningServer, ca: TestCA, name: str = "dot.test") -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", server.dot_port), timeout=5)  # type: ignore[attr-defined]
    return client_context(ca).wrap_socket(raw, server_hostname=name)


def read_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    for _ in range(10_000):
        if len(data) >= size:
            break
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def read_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack("!H", read_exact(sock, 2))
    return read_exact(sock, size)


def ask(sock: socket.socket, query: dns.message.Message) -> dns.message.Message:
    wire = query.to_wire()
    sock.sendall(struct.pack("!H", len(wire)) + wire)
    return dns.message.from_wire(read_frame(sock))


def serial(sock: ssl.SSLSocket) -> int:
    from cryptography import x509

    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_kdig_over_tls_gets_an_answer(dot: RunningServer, ca: TestCA) -> None:
    out = subprocess.run(
        [
            "kdig",
            "@127.0.0.1",
            "-p",
            str(dot.dot_port),  # type: ignore[attr-defined]
            "+tls",
            f"+tls-ca={ca.path}",
            "+tls-hostname=dot.test",
            "+timeout=3",
            "+retry=0",
            "example.test",
            "A",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "192.0.2.1" in out.stdout, out.stdout + out.stderr
    assert "TLS session (TLS1.3)" in out.stdout


def test_many_new_connections_one_after_another(dot: RunningServer, ca: TestCA) -> None:
    # (uvloop delivers the first bytes of a connection before reading pauses: lost, they
    # stalled one handshake in two)
    query = dns.message.make_query("www.example.test", "A")
    for _ in range(30):
        with connect(dot, ca) as sock:
            assert ask(sock, query).rcode() == dns.rcode.NOERROR
    out = subprocess.run(
        ["openssl", "s_time", "-connect", f"127.0.0.1:{dot.dot_port}", "-new", "-time", "1"],  # type: ignore[attr-defined]
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and " connections in " in out.stdout, out.stdout + out.stderr


def test_openssl_negotiates_alpn_dot(dot: RunningServer, ca: TestCA) -> None:
    out = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{dot.dot_port}",  # type: ignore[attr-defined]
            "-alpn",
            "dot",
            "-servername",
            "dot.test",
            "-CAfile",
            str(ca.path),
            "-verify_return_error",
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "ALPN protocol: dot" in out.stdout, out.stdout + out.stderr
    assert "Verify return code: 0 (ok)" in out.stdout
    tls12 = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{dot.dot_port}", "-tls1_1"],  # type: ignore[attr-defined]
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "Cipher is (NONE)" in tls12.stdout or tls12.returncode != 0  # below TLS 1.2: no


def test_many_queries_on_one_connection_answered_out_of_order(
    dot: RunningServer, ca: TestCA, upstream: FakeUpstream
) -> None:
    upstream.behaviours["example.test"] = Behaviour(delay=0.4)
    with connect(dot, ca) as sock:
        assert sock.selected_alpn_protocol() == "dot"
        # Reuse: dnspython's DoT client on the one connection, many queries.
        for _ in range(20):
            reply = dns.query.tls(
                dns.message.make_query("www.example.test", "A"), "127.0.0.1", sock=sock, timeout=3
            )
            assert reply.answer[0][0].address == "192.0.2.2"
        slow = dns.message.make_query("example.test", "A")
        blocked = dns.message.make_query("deepseek.com", "A")
        fast = dns.message.make_query("www.example.test", "A")
        sock.sendall(
            b"".join(
                struct.pack("!H", len(w)) + w for w in (m.to_wire() for m in (slow, blocked, fast))
            )
        )
        replies = [dns.message.from_wire(read_frame(sock)) for _ in range(3)]
    assert [r.id for r in replies][-1] == slow.id
    assert {r.id for r in replies[:2]} == {blocked.id, fast.id}


def test_a_blocked_name_gets_the_same_answer_and_ede_as_over_udp(
    dot: RunningServer, ca: TestCA
) -> None:
    query = dns.message.make_query("deepseek.com", "A", use_edns=0)
    over_udp = dot.send(query)
    with connect(dot, ca) as sock:
        over_dot = ask(sock, query)
    assert over_dot.rcode() == over_udp.rcode() == dns.rcode.NXDOMAIN
    assert over_dot.answer == over_udp.answer and over_dot.authority == over_udp.authority
    ede = [(o.code, o.text) for o in over_dot.options if o.otype == dns.edns.EDE]
    assert ede and ede == [(o.code, o.text) for o in over_udp.options if o.otype == 15]


def test_answers_are_padded_when_the_query_asks(dot: RunningServer, ca: TestCA) -> None:
    padded = dns.message.make_query(
        "www.example.test", "A", use_edns=0, options=[dns.edns.GenericOption(12, b"\0" * 16)]
    )
    plain = dns.message.make_query("www.example.test", "A", use_edns=0)
    with connect(dot, ca) as sock:
        for query in (padded, plain):
            sock.sendall(struct.pack("!H", len(query.to_wire())) + query.to_wire())
        first, second = read_frame(sock), read_frame(sock)
    assert len(first) % RESPONSE_BLOCK == 0
    assert len(second) % RESPONSE_BLOCK != 0
    assert dns.message.from_wire(first).answer == dns.message.from_wire(second).answer


def test_a_renewal_is_taken_while_a_connection_stays_open(
    dot: RunningServer, ca: TestCA, tmp_path: Path
) -> None:
    store = dot.server.certs
    assert store is not None
    query = dns.message.make_query("www.example.test", "A")
    with connect(dot, ca) as old:
        assert ask(old, query).rcode() == dns.rcode.NOERROR
        before = serial(old)
        leaf = ca.issue(tmp_path / "server.pem", tmp_path / "server.key", days=60)
        assert wait_until(lambda: store.reloads["success"] == 1)
        with connect(dot, ca) as new:
            assert serial(new) == leaf.serial_number != before
            assert ask(new, query).rcode() == dns.rcode.NOERROR
        # The open connection keeps its session and keeps answering.
        for _ in range(5):
            assert ask(old, query).rcode() == dns.rcode.NOERROR
        assert serial(old) == before


def test_a_bad_key_keeps_the_old_pair(dot: RunningServer, ca: TestCA, tmp_path: Path) -> None:
    store = dot.server.certs
    assert store is not None
    with connect(dot, ca) as sock:
        before = serial(sock)
    ca.issue(tmp_path / "server.pem", tmp_path / "server.key", other_key=True)
    assert wait_until(lambda: store.reloads["failure"] == 1)
    assert str(tmp_path / "server.key") in store.last_error
    with connect(dot, ca) as sock:
        assert serial(sock) == before
        assert ask(sock, dns.message.make_query("example.test", "A")).rcode() == 0


def test_the_client_id_comes_from_the_server_name(dot: RunningServer, ca: TestCA) -> None:
    listeners = dot.server.dot
    assert listeners is not None
    calls: list[tuple[int, str]] = []
    real = listeners.resolve

    def recording(data: bytes, peer: str, tcp: bool, proto: int, client_id: str) -> Any:
        calls.append((proto, client_id))
        return real(data, peer, tcp, proto, client_id)

    listeners.resolve = recording
    query = dns.message.make_query("www.example.test", "A")
    for name in ("laptop-7.dot.test", "dot.test"):
        with connect(dot, ca, name) as sock:
            assert ask(sock, query).rcode() == dns.rcode.NOERROR
    assert calls == [(PROTO_DOT, "laptop-7"), (PROTO_DOT, "")]


def _handshake_failures(server: RunningServer, reason: str) -> int:
    store = server.server.certs
    assert store is not None
    return store.handshake_failures["dot", reason]


def test_hostile_tls_input_never_stops_the_listener(dot: RunningServer, ca: TestCA) -> None:
    listeners = dot.server.dot
    assert listeners is not None
    listeners.handshake_timeout = 0.5
    port = dot.dot_port  # type: ignore[attr-defined]
    held: list[socket.socket] = []
    try:
        # A client that stops mid-handshake: half a ClientHello, then silence.
        hello = bytes.fromhex("160301020001000200")  # record header, then a cut hello
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(hello)
            held.append(sock)
        # A truncated record (says 16 KiB, brings 10 bytes), then the client leaves.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"\x16\x03\x01\x40\x00" + b"\x01" * 10)
        # Plain DNS over TCP to the TLS port, and garbage.
        for junk in (struct.pack("!H", 29) + b"\0" * 29, b"GET / HTTP/1.1\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(junk)
                sock.settimeout(3)
                with contextlib.suppress(ConnectionResetError, TimeoutError):
                    sock.recv(100)
        # A slow client: the handshake a byte at a time, never finished in time.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            closed = False
            try:
                for byte in hello * 2:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.1)
                sock.settimeout(3)
                closed = sock.recv(100) == b""
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            assert closed  # by the server, at the handshake time bound
        assert wait_until(lambda: _handshake_failures(dot, "timeout") >= 6)
        assert _handshake_failures(dot, "protocol") >= 2  # plain DNS, HTTP
        assert _handshake_failures(dot, "closed") >= 1  # the truncated record
        for sock in held:
            sock.settimeout(3)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""
        # And still answering.
        with connect(dot, ca) as sock:
            assert ask(sock, dns.message.make_query("example.test", "A")).rcode() == 0
        assert not listeners.handshaking
    finally:
        for sock in held:
            sock.close()


def test_the_handshake_slots_are_bounded(dot: RunningServer, ca: TestCA) -> None:
    listeners = dot.server.dot
    assert listeners is not None
    listeners.max_handshakes = 3
    listeners.handshake_timeout = 1.0
    held: Iterator[socket.socket] = iter(())
    socks = [socket.create_connection(("127.0.0.1", dot.dot_port), timeout=5) for _ in range(6)]  # type: ignore[attr-defined]
    try:
        assert wait_until(lambda: _handshake_failures(dot, "busy") >= 3)
        assert len(listeners.handshaking) <= 3
        assert wait_until(lambda: not listeners.handshaking)
        with connect(dot, ca) as sock:
            assert ask(sock, dns.message.make_query("example.test", "A")).rcode() == 0
    finally:
        for sock in [*socks, *held]:
            sock.close()


def test_status_and_metrics_show_the_listeners_and_the_certificate(
    make_server: Callable[..., RunningServer], tmp_path: Path, ca: TestCA
) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    leaf = ca.issue(cert, key, days=10)
    server = make_server(
        tls=TLSConfig(cert=cert, key=key),
        dot=DoTConfig(listen=(Listen("127.0.0.1", 0),)),
        admin=Listen("127.0.0.1", 0),
        metrics=Listen("127.0.0.1", 0),
    )
    server.dot_port = dot_port(server)  # type: ignore[attr-defined]
    with connect(server, ca) as sock:
        assert ask(sock, dns.message.make_query("example.test", "A")).rcode() == 0
    with socket.create_connection(("127.0.0.1", server.dot_port), timeout=5) as sock:  # type: ignore[attr-defined]
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            sock.recv(100)
    status, doc, _ = http(f"http://127.0.0.1:{server.server.admin_port}/v1/status")
    assert status == 200
    check_against_spec("/v1/status", "GET", status, doc)
    assert {"proto": "dot", "address": "127.0.0.1", "port": server.dot_port} in doc["endpoints"]  # type: ignore[attr-defined]
    assert {e["proto"] for e in doc["endpoints"]} == {"udp", "tcp", "dot"}
    certificate = doc["certificate"]
    assert certificate["names"] == ["dot.test", "*.dot.test", "127.0.0.1"]
    assert 9.9 < certificate["days_left"] <= 10
    assert certificate["not_after"] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    text, samples = scrape(server.server.metrics_port)
    assert samples['resolver_tls_handshakes_total{proto="dot"}'] == 1
    assert wait_until(lambda: server.server.certs.handshake_failures["dot", "protocol"] == 1)  # type: ignore[union-attr]
    expiry = samples["resolver_tls_certificate_expiry_timestamp_seconds"]
    assert expiry == leaf.not_valid_after_utc.timestamp()
    assert samples['resolver_tls_certificate_reloads_total{result="failure"}'] == 0
    assert "resolver_dot_connections" in samples
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_post_reload_takes_a_new_certificate(
    make_server: Callable[..., RunningServer], tmp_path: Path, ca: TestCA
) -> None:
    # No file watcher here (Server.serve runs it): the admin API's reload, as SIGHUP's.
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    ca.issue(cert, key)
    server = make_server(
        tls=TLSConfig(cert=cert, key=key),
        dot=DoTConfig(listen=(Listen("127.0.0.1", 0),)),
        admin=Listen("127.0.0.1", 0),
    )
    server.dot_port = dot_port(server)  # type: ignore[attr-defined]
    leaf = ca.issue(cert, key, names=("renewed.dot.test",))
    status, doc, _ = http(f"http://127.0.0.1:{server.server.admin_port}/v1/reload", "POST")
    assert status == 200, doc
    with connect(server, ca, "renewed.dot.test") as sock:
        assert serial(sock) == leaf.serial_number
        assert ask(sock, dns.message.make_query("example.test", "A")).rcode() == 0


def dot_server(
    make_server: Callable[..., RunningServer], tmp_path: Path, ca: TestCA, **overrides: Any
) -> RunningServer:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    ca.issue(cert, key)
    server = make_server(
        tls=TLSConfig(cert=cert, key=key),
        dot=DoTConfig(listen=(Listen("127.0.0.1", 0),)),
        **overrides,
    )
    server.dot_port = dot_port(server)  # type: ignore[attr-defined]
    return server


def test_the_connection_cap_closes_the_oldest_idle_dot_connection(
    make_server: Callable[..., RunningServer], tmp_path: Path, ca: TestCA
) -> None:
    server = dot_server(
        make_server, tmp_path, ca, tcp=TCPConfig(max_connections=2, idle_timeout=30)
    )
    query = dns.message.make_query("example.test", "A")
    # Plain TCP connections are not in the DoT table: they neither count nor get evicted.
    plain = socket.create_connection((server.host, server.port), timeout=5)
    with connect(server, ca) as oldest, connect(server, ca) as middle:
        assert ask(middle, query).rcode() == 0
        with connect(server, ca) as newest:
            assert ask(newest, query).rcode() == 0
            oldest.settimeout(3)
            with contextlib.suppress(ConnectionResetError, ssl.SSLError):
                assert oldest.recv(10) == b""
            assert ask(middle, query).rcode() == 0
    listeners = server.server.dot
    assert listeners is not None and listeners.connections.evicted_idle == 1
    assert server.server.connections.evicted_idle == 0
    send_frame(plain, query)
    assert read_plain_frame(plain).rcode() == 0
    plain.close()


def test_a_dot_client_that_never_reads_is_aborted(
    make_server: Callable[..., RunningServer], tmp_path: Path, ca: TestCA
) -> None:
    server = dot_server(
        make_server, tmp_path, ca, tcp=TCPConfig(idle_timeout=1.0, max_output=16384)
    )
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", server.dot_port))  # type: ignore[attr-defined]
    sock = client_context(ca).wrap_socket(raw, server_hostname="dot.test")
    wire = dns.message.make_query("deepseek.com", "TXT").to_wire()
    chunk = (struct.pack("!H", len(wire)) + wire) * 50
    listeners = server.server.dot
    assert listeners is not None
    table = listeners.connections
    assert wait_until(lambda: len(table.open) == 1, 5.0)  # the handshake is done server side
    sock.setblocking(False)
    started = time.monotonic()
    sent = 0
    # Send until the server's own output buffer is full. The answers are small and the
    # kernel's send buffer can take a megabyte or more of them first: on a loaded machine a
    # fixed amount of sending may never get there. Bounded in bytes and time all the same.
    while not table.paused_output and time.monotonic() - started < 10.0 and sent < 16_000_000:
        try:
            sent += sock.send(chunk)
        except (ssl.SSLWantWriteError, BlockingIOError):
            time.sleep(0.01)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            break
    assert wait_until(lambda: not table.open, 6.0)
    assert table.paused_output + table.paused_pipeline >= 1
    assert table.aborted_stalled + table.aborted_output >= 1
    sock.close()
    with connect(server, ca) as fresh:
        assert ask(fresh, dns.message.make_query("example.test", "A")).rcode() == 0


@pytest.mark.parametrize("issue", [{"other_key": True}, {"days": -1, "starts": -2}])
def test_a_bad_pair_at_start_up_is_a_start_up_error_naming_the_file(
    make_server: Callable[..., RunningServer],
    tmp_path: Path,
    ca: TestCA,
    issue: dict[str, Any],
) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    ca.issue(cert, key, **issue)
    with pytest.raises(StartupError, match="tls: ") as caught:
        make_server(
            tls=TLSConfig(cert=cert, key=key), dot=DoTConfig(listen=(Listen("127.0.0.1", 0),))
        )
    assert str(key if "other_key" in issue else cert) in str(caught.value)
