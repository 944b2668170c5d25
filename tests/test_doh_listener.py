"""DNS over HTTPS for clients (issue 19, item 2): the resolver's own DoH listener, driven by
real clients (kdig +https, dnspython over HTTP/2 and HTTP/1.1, curl --doh-url, openssl
s_client) and by raw sockets that do what an attacker would: every error status, X-Forwarded-
For and PROXY protocol v1/v2, truncated HTTP/2 frames, oversized bodies, slow clients and
200 streams at once. A test CA (tests/helpers/tls.py) signs the listener's certificate."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import shutil
import socket
import ssl
import struct
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.query
import dns.rcode
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from resolver.config import DoHConfig, Listen, TCPConfig, TLSConfig
from resolver.core import padding
from resolver.service import dohwire

from .helpers.server import RunningServer

NAME = "doh.test"


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    from .helpers.tls import make_certificate

    pair = (tmp_path / "cert.pem", tmp_path / "key.pem")
    make_certificate(pair[0], pair[1], NAME)
    return pair


@pytest.fixture
def doh_server(
    make_server: Callable[..., RunningServer], cert: tuple[Path, Path]
) -> Callable[..., RunningServer]:
    def start(tcp: TCPConfig | None = None, **doh: Any) -> RunningServer:
        return make_server(
            doh=DoHConfig(listen=(Listen("127.0.0.1", 0),), **doh),
            tls=TLSConfig(cert=cert[0], key=cert[1]),
            metrics=Listen("127.0.0.1", 0),
            admin=Listen("127.0.0.1", 0),
            tcp=tcp or TCPConfig(),
        )

    return start


def port_of(running: RunningServer) -> int:
    (bound,) = [b for b in running.server.bound if b.proto == "doh"]
    return bound.port


def client_context(cafile: Path, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(alpn)
    return context


def metric(running: RunningServer, series: str) -> float:
    port = running.server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"no {series} in /metrics"
    return float(match.group(1))


def record_calls(running: RunningServer) -> list[tuple[str, str]]:
    """Wrap the listener's handle: each call's (client, client id) is recorded."""
    listener = running.server.doh
    assert listener is not None
    calls: list[tuple[str, str]] = []
    inner = listener.handle

    def handle(data: bytes, client: str, tcp: bool, proto: int, client_id: str) -> Any:
        calls.append((client, client_id))
        return inner(data, client, tcp, proto, client_id)

    listener.handle = handle
    return calls


def https(
    running: RunningServer, cafile: Path, method: str, target: str, **kw: Any
) -> http.client.HTTPResponse:
    context = client_context(cafile, ["http/1.1"])
    conn = http.client.HTTPSConnection(NAME, port_of(running), context=context, timeout=5)
    conn.sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port_of(running)), timeout=5),
        server_hostname=NAME,
    )
    conn.request(method, target, **kw)
    return conn.getresponse()


def tls_connect(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return context.wrap_socket(raw, server_hostname=NAME)


def b64(message: bytes) -> str:
    return base64.urlsafe_b64encode(message).rstrip(b"=").decode()


def doh_query(running: RunningServer, cafile: Path, message: dns.message.Message, **kw: Any) -> Any:
    return dns.query.https(
        message,
        f"https://{NAME}:{port_of(running)}/dns-query",
        bootstrap_address="127.0.0.1",
        verify=ssl.create_default_context(cafile=str(cafile)),
        timeout=5,
        **kw,
    )


@pytest.mark.parametrize("version", ["H2", "H1"])
@pytest.mark.parametrize("post", [True, False])
def test_dnspython_over_http2_and_http1(
    doh_server: Callable[..., RunningServer], cert: tuple[Path, Path], version: str, post: bool
) -> None:
    running = doh_server()
    query = dns.message.make_query("example.test", "A")
    query.id = 0  # RFC 8484 section 4.1
    reply = doh_query(
        running, cert[0], query, post=post, http_version=getattr(dns.query.HTTPVersion, version)
    )
    assert reply.id == 0
    assert reply.rcode() == dns.rcode.NOERROR
    assert [str(r) for r in reply.answer[0]] == ["192.0.2.1"]


def test_a_blocked_name_gets_the_same_answer_and_ede_as_over_udp(
    doh_server: Callable[..., RunningServer], cert: tuple[Path, Path]
) -> None:
    running = doh_server()
    over_udp = running.query("deepseek.com", "A", use_edns=0)
    query = dns.message.make_query("deepseek.com", "A", use_edns=0)
    over_doh = doh_query(running, cert[0], query)
    assert over_doh.rcode() == over_udp.rcode() == dns.rcode.NXDOMAIN
    assert over_doh.options == over_udp.options
    assert any(o.otype == dns.edns.EDE for o in over_doh.options)
    assert over_doh.authority == over_udp.authority


def test_cache_control_is_the_smallest_ttl_and_the_id_is_echoed(
    doh_server: Callable[..., RunningServer], cert: tuple[Path, Path]
) -> None:
    running = doh_server()
    query = dns.message.make_query("example.test", "A")
    query.id = 0x1234  # not 0: still echoed
    reply = https(running, cert[0], "GET", f"/dns-query?dns={b64(query.to_wire())}")
    body = reply.read()
    assert reply.status == 200
    assert reply.getheader("content-type") == "application/dns-message"
    answer = dns.message.from_wire(body)
    assert answer.id == 0x1234
    ttl = min(r.ttl for r in answer.answer)
    assert reply.getheader("cache-control") == f"max-age={ttl}"
    # A blocked name: NXDOMAIN's freshness is its SOA's TTL (the list's ttl: 60).
    blocked = dns.message.make_query("deepseek.com", "A")
    reply = https(
        running,
        cert[0],
        "POST",
        "/dns-query",
        body=blocked.to_wire(),
        headers={"content-type": "application/dns-message"},
    )
    answer = dns.message.from_wire(reply.read())
    assert reply.getheader("cache-control") == f"max-age={answer.authority[0].ttl}"


def test_every_fault_gets_its_status(
    doh_server: Callable[..., RunningServer], cert: tuple[Path, Path]
) -> None:
    running = doh_server()
    wire = dns.message.make_query("example.test", "A").to_wire()
    post = {"content-type": "application/dns-message"}
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("GET", "/dns-query", {}, 400, "bad_request"),
        ("GET", "/dns-query?dns=!!!!", {}, 400, "bad_request"),
        ("GET", f"/dns-query?dns={b64(b'not a dns message')}", {}, 400, "bad_request"),
        ("POST", "/dns-query", {"body": b"\x00" * 5, "headers": post}, 400, "bad_request"),
        ("POST", "/dns-query", {"body": b"x" * 70000, "headers": post}, 413, "body_too_large"),
        (
            "POST",
            "/dns-query",
            {"body": wire, "headers": {"content-type": "text/plain"}},
            415,
            "media_type",
        ),
        ("PUT", "/dns-query", {"body": wire, "headers": post}, 405, "method"),
        ("GET", f"/other?dns={b64(wire)}", {}, 404, "not_found"),
        ("GET", "/dns-query?dns=" + "A" * 5000, {}, 414, "uri_too_long"),
        (
            "GET",
            f"/dns-query?dns={b64(wire)}",
            {"headers": {"x-big": "y" * 9000}},
            431,
            "headers_too_large",
        ),
        ("GET", f"/dns-query/Bad_Id?dns={b64(wire)}", {}, 400, "bad_request"),
    ]
    for method, target, kw, status, reason in cases:
        before = metric(running, f'resolver_doh_rejected_total{{reason="{reason}"}}')
        try:
            reply = https(running, cert[0], method, target, **kw)
        except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
            # An oversized body: the listener may answer 413 and close before the client
            # has written all of it; the refusal is then seen only in the counter below.
            assert status == 413, (method, target[:40])
        else:
            reply.read()
            assert reply.status == status, (method, target[:40], reply.status)
        if status == 405:
            assert reply.getheader("allow") == "GET, POST"
        after = metric(running, f'resolver_doh_rejected_total{{reason="{reason}"}}')
        assert after == before + 1, (target[:40], reason)
    # Still serving.
    assert doh_query(running, cert[0], dns.message.make_query("example.test", "A")).answer


def test_the_client_id_in_the_path_reaches_the_resolver(
    doh_server: Callable[..., RunningServer], cert: tuple[Path, Path]
) -> None:
    running = doh_server()
    calls = record_calls(running)
    wire = dns.message.make_query("example.test", "A").to_wire()
    for target, expected in (("/dns-query/Laptop-7", "laptop-7"), ("/dns-query", "")):
        reply = https(running, cert[0], "GET", f"{target}?dns={b64(wire)}")
        reply.read()
        assert reply.status == 200
        assert calls[-1] == ("127.0.0.1", expected)


def _plain_get(port: int, wire: bytes, headers: str = "", prefix: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            prefix
            + (
                f"GET /dns-query?dns={b64(wire)} HTTP/1.1\r\nhost: x\r\n{headers}"
                "connection: close\r\n\r\n"
            ).encode()
        )
        return _read_all(sock)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass  # refused: the server aborted the connection
    return data


def test_x_forwarded_for_counts_from_trusted_proxies_only(
    doh_server: Callable[..., RunningServer],
) -> None:
    wire = dns.message.make_query("example.test", "A").to_wire()
    xff = "x-forwarded-for: 198.51.100.7, 203.0.113.5, 127.0.0.9\r\n"
    trusting = doh_server(plain=True, trusted_proxies=("127.0.0.0/8", "203.0.113.0/24"))
    calls = record_calls(trusting)
    assert _plain_get(port_of(trusting), wire, xff).startswith(b"HTTP/1.1 200")
    assert calls[-1][0] == "198.51.100.7"  # the last untrusted hop, from the right
    wary = doh_server(plain=True, trusted_proxies=("10.9.9.0/24",))
    calls = record_calls(wary)
    assert _plain_get(port_of(wary), wire, xff).startswith(b"HTTP/1.1 200")
    assert calls[-1][0] == "127.0.0.1"  # not a trusted peer: its header is ignored


def test_proxy_protocol_v1_and_v2(
    doh_server: Callable[..., RunningServer], cert: tuple[Path, Path]
) -> None:
    wire = dns.message.make_query("example.test", "A").to_wire()
    running = doh_server(plain=True, trusted_proxies=("127.0.0.0/8",), proxy_protocol=True)
    calls = record_calls(running)
    port = port_of(running)
    v1 = b"PROXY TCP4 192.0.2.77 127.0.0.1 40000 443\r\n"
    assert _plain_get(port, wire, prefix=v1).startswith(b"HTTP/1.1 200")
    assert calls[-1][0] == "192.0.2.77"
    v2 = (
        dohwire.V2_SIGNATURE
        + bytes([0x21, 0x21])
        + struct.pack("!H", 36)
        + socket.inet_pton(socket.AF_INET6, "2001:db8::5")
        + socket.inet_pton(socket.AF_INET6, "::1")
        + struct.pack("!HH", 40000, 443)
    )
    assert _plain_get(port, wire, prefix=v2).startswith(b"HTTP/1.1 200")
    assert calls[-1][0] == "2001:db8::5"
    # No header, or a broken one: the connection is refused, and counted.
    before = metric(running, 'resolver_doh_rejected_total{reason="proxy"}')
    assert _plain_get(port, wire) == b""
    assert _plain_get(port, wire, prefix=b"PROXY TCP4 nonsense\r\n") == b""
    assert metric(running, 'resolver_doh_rejected_total{reason="proxy"}') == before + 2
    # Over TLS: the header comes first, then the handshake.
    tls = doh_server(trusted_proxies=("127.0.0.0/8",), proxy_protocol=True)
    calls = record_calls(tls)
    context = client_context(cert[0], ["http/1.1"])
    with socket.create_connection(("127.0.0.1", port_of(tls)), timeout=5) as raw:
        raw.sendall(v1)
        with context.wrap_socket(raw, server_hostname=NAME) as sock:
            sock.sendall(
                f"GET /dns-query?dns={b64(wire)} HTTP/1.1\r\nhost: x\r\n"
                "connection: close\r\n\r\n".encode()
            )
            assert _read_all(sock).startswith(b"HTTP/1.1 200")
    assert calls[-1][0] == "192.0.2.77"


def test_proxy_protocol_from_an_untrusted_peer_is_refused(
    doh_server: Callable[..., RunningServer],
) -> None:
    wire = dns.message.make_query("example.test", "A").to_wire()
    running = doh_server(plain=True, trusted_proxies=("10.0.0.0/8",), proxy_protocol=True)
    v1 = b"PROXY TCP4 192.0.2.77 127.0.0.1 40000 443\r\n"
    assert _plain_get(port_of(running), wire, prefix=v1) == b""
    assert metric(running, 'resolver_doh_rejected_total{reason="proxy"}') == 1


needs = pytest.mark.skipif(
    not (shutil.which("kdig") and shutil.which("curl") and shutil.which("openssl")),
    reason="needs kdig, curl and openssl",
)


@needs
def test_kdig_curl_and_openssl(
    doh_server: Callable[..., RunningServer],
    cert: tuple[Path, Path],
    upstream: Any,
) -> None:
    running = doh_server()
    port = port_of(running)

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, input="", capture_output=True, text=True, errors="replace", timeout=30
        )

    def kdig(name: str) -> str:
        tls = (f"+tls-ca={cert[0]}", f"+tls-hostname={NAME}")
        done = run("kdig", "@127.0.0.1", "-p", str(port), "+https", *tls, name, "A")
        return done.stdout + done.stderr

    answered = kdig("example.test")
    assert "192.0.2.1" in answered and "HTTP" in answered, answered
    blocked = kdig("deepseek.com")
    assert "NXDOMAIN" in blocked and "EDE" in blocked, blocked
    # curl resolves loop.test through the listener, then fetches /metrics there.
    upstream.records[("loop.test", "A")] = ["127.0.0.1"]
    metrics = running.server.metrics_port
    common = [
        "curl",
        "-sS",
        "--max-time",
        "20",
        "--doh-url",
        f"https://{NAME}:{port}/dns-query",
        "--cacert",
        str(cert[0]),
        "--resolve",
        f"{NAME}:{port}:127.0.0.1",
    ]
    fetched = run(*common, f"http://loop.test:{metrics}/metrics")
    assert "resolver_doh_rejected_total" in fetched.stdout, fetched.stderr
    refused = run(*common, f"http://deepseek.com:{metrics}/metrics")
    assert refused.returncode == 6, refused.stderr  # could not resolve host
    where = ("-connect", f"127.0.0.1:{port}", "-servername", NAME, "-CAfile", str(cert[0]))
    shown = run("openssl", "s_client", *where, "-alpn", "h2")
    assert "ALPN protocol: h2" in shown.stdout
    assert "Verify return code: 0 (ok)" in shown.stdout


class H2Client:
    """A raw HTTP/2 client over TLS, to send what a polite client would not."""

    def __init__(self, port: int, cafile: Path) -> None:
        context = client_context(cafile, ["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock = context.wrap_socket(raw, server_hostname=NAME)
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def get(self, wire: bytes, end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            sid,
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", NAME),
                (":path", f"/dns-query?dns={b64(wire)}"),
            ],
            end_stream=end,
        )
        return sid

    def events(self, until: Callable[[list[Any]], bool], limit: float = 5.0) -> list[Any]:
        seen: list[Any] = []
        deadline = time.monotonic() + limit
        while not until(seen) and time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                break
            if not data:
                seen.append("closed")
                break
            seen += self.conn.receive_data(data)
            self.flush()
        return seen

    def close(self) -> None:
        self.sock.close()


def test_http2_streams_in_parallel_and_200_at_once(
    doh_server: Callable[..., RunningServer], cert: tuple[Path, Path]
) -> None:
    running = doh_server()
    wire = dns.message.make_query("example.test", "A").to_wire()
    client = H2Client(port_of(running), cert[0])
    client.events(lambda s: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in s))
    for _ in range(100):  # the advertised limit: all answered
        client.get(wire)
    client.flush()
    ended = client.events(lambda s: sum(isinstance(e, h2.events.StreamEnded) for e in s) >= 100)
    answers = [e for e in ended if isinstance(e, h2.events.DataReceived)]
    assert sum(isinstance(e, h2.events.StreamEnded) for e in ended) == 100
    assert dns.message.from_wire(answers[0].data).answer
    client.close()
    # 200 streams at once, none ended (so none answered): past the limit, GOAWAY.
    client = H2Client(port_of(running), cert[0])
    client.conn.update_settings({})
    client.conn.remote_settings.max_concurrent_streams = 1000  # lie to our own client
    for _ in range(200):
        client.get(wire, end=False)
    client.flush()
    seen = client.events(
        lambda s: "closed" in s or any(isinstance(e, h2.events.ConnectionTerminated) for e in s)
    )
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in seen) or "closed" in seen
    client.close()
    assert metric(running, 'resolver_doh_rejected_total{reason="streams"}') >= 1
    assert doh_query(running, cert[0], dns.message.make_query("example.test", "A")).answer


def test_malformed_and_slow_input_never_stops_the_listener(
    doh_server: Callable[..., RunningServer], cert: tuple[Path, Path]
) -> None:
    running = doh_server(tcp=TCPConfig(idle_timeout=1.0))
    port = port_of(running)
    context = client_context(cert[0], ["h2"])
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    for junk in (
        preface + b"\x00\x00\x10\x04\x00\x00\x00\x00\x00\x00\x03",  # truncated SETTINGS
        preface + b"\x00\x00\x05\x01\x04\x00\x00\x00\x01garbage-hpack",  # bad HEADERS
        preface + b"\x00\x40\x00\x00\x00\x00\x00\x00\x01" + b"x" * 100,  # DATA, no stream
        b"\x16\x03\x01" * 50,  # not even HTTP/2
    ):
        with tls_connect(port, context) as sock:
            sock.sendall(junk)
            sock.settimeout(5)
            with contextlib.suppress(OSError):
                _read_all(sock)  # the server closes (GOAWAY, or the idle timeout)
    # A slow HTTP/1.1 client: a byte a second is closed within the timeout (408).
    before = metric(running, 'resolver_doh_rejected_total{reason="slow"}')
    h1 = client_context(cert[0], ["http/1.1"])
    with tls_connect(port, h1) as sock:
        started = time.monotonic()
        reply = b""
        sock.settimeout(0.5)
        for byte in b"GET /dns-query?dns=AAAA HTTP/1.1\r\n":
            try:
                sock.send(bytes([byte]))
                reply = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if reply or time.monotonic() - started > 4:
                break
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert time.monotonic() - started < 3.5
    assert metric(running, 'resolver_doh_rejected_total{reason="slow"}') == before + 1
    # Still serving.
    assert doh_query(running, cert[0], dns.message.make_query("example.test", "A")).answer


def test_the_connection_cap_makes_room(
    doh_server: Callable[..., RunningServer], cert: tuple[Path, Path]
) -> None:
    running = doh_server(tcp=TCPConfig(max_connections=4))
    context = client_context(cert[0], ["http/1.1"])
    held = []
    for _ in range(8):
        raw = socket.create_connection(("127.0.0.1", port_of(running)), timeout=5)
        held.append(context.wrap_socket(raw, server_hostname=NAME))
    assert metric(running, 'resolver_doh_rejected_total{reason="evicted"}') >= 4
    assert len(running.server.doh.open) <= 4
    for sock in held:
        sock.close()
    assert doh_query(running, cert[0], dns.message.make_query("example.test", "A")).answer


def test_padding_and_max_age_on_bytes() -> None:
    query = dns.message.make_query("example.test", "A", use_edns=0, pad=128)
    assert padding.wants_padding(query.to_wire())
    assert not padding.wants_padding(dns.message.make_query("a.test", "A").to_wire())
    reply = dns.message.make_response(query)
    reply.use_edns(0)
    padded = padding.pad_response(reply.to_wire())
    assert len(padded) % padding.RESPONSE_BLOCK == 0
    assert dns.message.from_wire(padded).id == query.id
    assert dohwire.max_age(reply.to_wire()) == 0  # no records
    failed = dns.message.make_response(query)
    failed.set_rcode(dns.rcode.SERVFAIL)
    assert dohwire.max_age(failed.to_wire()) == 0


def test_http2_bounds_oversized_body_and_a_stream_that_never_ends(
    doh_server: Callable[..., RunningServer], cert: tuple[Path, Path]
) -> None:
    running = doh_server(tcp=TCPConfig(idle_timeout=1.0))
    client = H2Client(port_of(running), cert[0])
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(
        sid,
        [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", NAME),
            (":path", "/dns-query"),
            ("content-type", "application/dns-message"),
        ],
    )
    for round_ in range(2):  # 96 KB of body, over 65,535, as the windows open
        for _ in range(3):
            client.conn.send_data(sid, b"x" * 16000)
        client.flush()
        if round_ == 0:
            client.events(lambda s: any(isinstance(e, h2.events.WindowUpdated) for e in s))
    seen = client.events(lambda s: any(isinstance(e, h2.events.ResponseReceived) for e in s))
    (response,) = [e for e in seen if isinstance(e, h2.events.ResponseReceived)]
    assert (b":status", b"413") in response.headers
    # A stream opened and never ended: reset within the timeout, then the connection closes.
    client.get(b"", end=False)
    client.flush()
    started = time.monotonic()
    seen = client.events(lambda s: "closed" in s, limit=6.0)
    assert any(isinstance(e, h2.events.StreamReset) for e in seen)
    assert time.monotonic() - started < 4.0
    client.close()
    assert metric(running, 'resolver_doh_rejected_total{reason="slow"}') >= 1
    assert metric(running, 'resolver_doh_rejected_total{reason="body_too_large"}') == 1


def test_a_padded_query_gets_a_padded_answer(
    doh_server: Callable[..., RunningServer], cert: tuple[Path, Path]
) -> None:
    running = doh_server()
    query = dns.message.make_query("example.test", "A", use_edns=0, pad=128)
    reply = https(running, cert[0], "GET", f"/dns-query?dns={b64(query.to_wire())}")
    body = reply.read()
    assert len(body) % padding.RESPONSE_BLOCK == 0
    assert any(o.otype == dns.edns.PADDING for o in dns.message.from_wire(body).options)


def test_a_client_that_never_opens_its_window_is_aborted_and_status_lists_doh(
    doh_server: Callable[..., RunningServer], cert: tuple[Path, Path]
) -> None:
    running = doh_server(tcp=TCPConfig(idle_timeout=1.0))
    port = port_of(running)
    with urllib.request.urlopen(
        f"http://127.0.0.1:{running.server.admin_port}/v1/status", timeout=5
    ) as reply:
        assert f"doh 127.0.0.1:{port}" in json.loads(reply.read())["listeners"]
    client = H2Client(port, cert[0])
    client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    client.flush()
    client.events(lambda s: any(isinstance(e, h2.events.SettingsAcknowledged) for e in s))
    wire = dns.message.make_query("example.test", "A").to_wire()
    client.get(wire)
    client.flush()
    started = time.monotonic()
    seen = client.events(lambda s: "closed" in s, limit=6.0)
    assert "closed" in seen and time.monotonic() - started < 4.0
    assert not any(isinstance(e, h2.events.DataReceived) for e in seen)
    client.close()
    assert metric(running, 'resolver_doh_rejected_total{reason="stalled"}') == 1
    assert doh_query(running, cert[0], dns.message.make_query("example.test", "A")).answer


def test_an_http2_client_trickling_a_frame_is_closed(
    doh_server: Callable[..., RunningServer], cert: tuple[Path, Path]
) -> None:
    running = doh_server(tcp=TCPConfig(idle_timeout=1.0))
    client = H2Client(port_of(running), cert[0])
    client.get(dns.message.make_query("example.test", "A").to_wire())
    frames = client.conn.data_to_send()  # a HEADERS frame, sent a byte at a time
    client.sock.settimeout(0.3)
    started = time.monotonic()
    closed = False
    for byte in frames:
        try:
            client.sock.send(bytes([byte]))
            closed = not client.sock.recv(65536) or closed
        except TimeoutError:
            continue
        except OSError:
            closed = True
        if closed or time.monotonic() - started > 5:
            break
    assert closed and time.monotonic() - started < 3.0
    client.close()
    assert metric(running, 'resolver_doh_rejected_total{reason="slow"}') == 1


def test_handshakes_that_never_end_cannot_lock_clients_out(
    doh_server: Callable[..., RunningServer], cert: tuple[Path, Path]
) -> None:
    running = doh_server(tcp=TCPConfig(max_connections=4, max_connections_per_client=2))
    port = port_of(running)
    silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(6)]
    time.sleep(0.2)
    # Every slot is a handshake that never starts: the oldest makes room.
    assert doh_query(running, cert[0], dns.message.make_query("example.test", "A")).answer
    assert metric(running, 'resolver_doh_rejected_total{reason="evicted"}') >= 3
    # One client over its own limit closes its own oldest connection.
    context = client_context(cert[0], ["http/1.1"])
    mine = []
    for _ in range(4):
        mine.append(tls_connect(port, context))
        time.sleep(0.1)  # the server has the connection once it has the client's Finished
    assert metric(running, 'resolver_doh_rejected_total{reason="client_limit"}') >= 2
    assert len(running.server.doh.by_client["127.0.0.1"]) <= 2
    for sock in silent + mine:
        sock.close()


def test_the_same_on_uvloop(
    make_server: Callable[..., RunningServer],
    cert: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # resolver serve runs on uvloop when it is installed: accept, PROXY then TLS, HTTP/2.
    uvloop = pytest.importorskip("uvloop")
    import asyncio

    monkeypatch.setattr(asyncio, "new_event_loop", uvloop.new_event_loop)
    running = make_server(
        doh=DoHConfig(
            listen=(Listen("127.0.0.1", 0),),
            trusted_proxies=("127.0.0.0/8",),
            proxy_protocol=True,
        ),
        tls=TLSConfig(cert=cert[0], key=cert[1]),
    )
    monkeypatch.undo()
    assert type(running.loop).__module__.startswith("uvloop")
    calls = record_calls(running)
    wire = dns.message.make_query("example.test", "A").to_wire()
    for version in ("h2", "http/1.1"):
        with socket.create_connection(("127.0.0.1", port_of(running)), timeout=5) as raw:
            raw.sendall(b"PROXY TCP4 192.0.2.78 127.0.0.1 40000 443\r\n")
            sock = client_context(cert[0], [version]).wrap_socket(raw, server_hostname=NAME)
            if version == "h2":
                conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                conn.initiate_connection()
                conn.send_headers(
                    1,
                    [
                        (":method", "GET"),
                        (":scheme", "https"),
                        (":authority", NAME),
                        (":path", f"/dns-query?dns={b64(wire)}"),
                    ],
                    end_stream=True,
                )
                sock.sendall(conn.data_to_send())
                events: list[Any] = []
                while not any(isinstance(e, h2.events.StreamEnded) for e in events):
                    events += conn.receive_data(sock.recv(65536))
                (data,) = [e for e in events if isinstance(e, h2.events.DataReceived)]
                # (REFUSED: the default access list does not let 192.0.2.78 in.)
                assert dns.message.from_wire(data.data).question
            else:
                sock.sendall(
                    f"GET /dns-query?dns={b64(wire)} HTTP/1.1\r\nhost: x\r\n"
                    "connection: close\r\n\r\n".encode()
                )
                assert _read_all(sock).startswith(b"HTTP/1.1 200")
            sock.close()
        assert calls[-1][0] == "192.0.2.78"
