"""The metrics and the status of every encrypted transport, against the running server with
DoT, DoH and DoQ up: TLS handshakes and their failures counted per proto in one store, the
answer metrics' proto series there from the start, DoH's open connections, DoQ's bounds by
reason, and /v1/status listing every listener (checked against the OpenAPI schema). The
scrape passes `promtool check metrics`."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.query
import pytest

from resolver.config import DoHConfig, DoQConfig, DoTConfig, Listen, TCPConfig, TLSConfig

from .helpers.http import check_against_spec, http
from .helpers.http import scrape as scrape_metrics
from .helpers.server import RunningServer
from .helpers.testca import TestCA
from .helpers.wait import wait_for

pytest.importorskip("aioquic", reason="DoQ needs aioquic, the optional 'quic' extra")

NAME = "dot.test"


def port(server: RunningServer, proto: str) -> int:
    return next(b.port for b in server.server.bound if b.proto == proto)


def scrape(server: RunningServer) -> tuple[str, dict[str, float]]:
    return scrape_metrics(server.server.metrics_port)


@pytest.fixture
def encrypted(make_server: Callable[..., RunningServer], tmp_path: Path) -> RunningServer:
    ca = TestCA(tmp_path)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    ca.issue(cert, key)
    server = make_server(
        tls=TLSConfig(cert=cert, key=key, client_id_domain=NAME),
        dot=DoTConfig(listen=(Listen("127.0.0.1", 0),)),
        doh=DoHConfig(listen=(Listen("127.0.0.1", 0),)),
        doq=DoQConfig(listen=(Listen("127.0.0.1", 0),)),
        admin=Listen("127.0.0.1", 0),
        metrics=Listen("127.0.0.1", 0),
    )
    server.ca = ca  # type: ignore[attr-defined]
    return server


def garbage(port: int) -> None:
    """Not TLS at all: a handshake failure of reason ``protocol``."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            sock.recv(100)


def test_every_transport_counts_its_handshakes_and_answers_from_zero(
    encrypted: RunningServer,
) -> None:
    server = encrypted
    ca: TestCA = server.ca  # type: ignore[attr-defined]
    text, before = scrape(server)
    # Before any query: every transport served has its series, at 0.
    for proto in ("udp", "tcp", "dot", "doh", "doq"):
        assert before[f'resolver_requests_total{{proto="{proto}",qtype="A"}}'] == 0
    for proto in ("dot", "doh", "doq"):
        assert before[f'resolver_tls_handshakes_total{{proto="{proto}"}}'] == 0
        for reason in ("timeout", "protocol", "version", "closed", "busy"):
            key = f'resolver_tls_handshake_failures_total{{proto="{proto}",reason="{reason}"}}'
            assert before[key] == 0
    assert before["resolver_doh_connections"] == 0
    assert before["resolver_doq_connections"] == 0
    assert before['resolver_doq_rejected_total{reason="stream_limit"}'] == 0

    verify = ssl.create_default_context(cafile=str(ca.path))
    query = dns.message.make_query("example.test", "A")
    assert dns.query.tls(query, "127.0.0.1", port=port(server, "dot"), timeout=5,
                         ssl_context=verify, server_hostname=NAME).rcode() == 0  # fmt: skip
    reply = dns.query.https(
        query, f"https://{NAME}:{port(server, 'doh')}/dns-query", timeout=5,
        bootstrap_address="127.0.0.1", verify=verify,
    )  # fmt: skip
    assert reply.rcode() == 0
    reply = dns.query.quic(query, "127.0.0.1", port=port(server, "doq"), timeout=5,
                           verify=str(ca.path), server_hostname=NAME)  # fmt: skip
    assert reply.rcode() == 0
    garbage(port(server, "dot"))
    garbage(port(server, "doh"))
    store = server.server.certs
    assert store is not None
    wait_for(lambda: store.handshake_failures["doh", "protocol"] == 1)
    wait_for(lambda: store.handshake_failures["dot", "protocol"] == 1)

    text, samples = scrape(server)
    for proto in ("dot", "doh", "doq"):
        assert samples[f'resolver_tls_handshakes_total{{proto="{proto}"}}'] == 1, proto
        assert samples[f'resolver_requests_total{{proto="{proto}",qtype="A"}}'] == 1, proto
    for proto in ("dot", "doh"):
        key = f'resolver_tls_handshake_failures_total{{proto="{proto}",reason="protocol"}}'
        assert samples[key] == 1
    assert samples["resolver_doq_connections_accepted_total"] >= 1
    assert "resolver_doh_connections" in samples
    if shutil.which("promtool"):
        result = subprocess.run(
            ["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
            timeout=30,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr


def test_a_doq_client_without_the_doq_alpn_is_a_failed_handshake(
    encrypted: RunningServer,
) -> None:
    from aioquic.asyncio import connect
    from aioquic.quic.configuration import QuicConfiguration

    server = encrypted
    config = QuicConfiguration(alpn_protocols=["h3"], is_client=True, server_name=NAME)
    config.verify_mode = ssl.CERT_NONE

    async def attempt() -> None:
        with contextlib.suppress(ConnectionError, TimeoutError, OSError):
            async with connect("127.0.0.1", port(server, "doq"), configuration=config,
                               wait_connected=True):  # fmt: skip
                pass

    import asyncio

    asyncio.run(asyncio.wait_for(attempt(), 5))
    store = server.server.certs
    assert store is not None
    wait_for(lambda: store.handshake_failures["doq", "protocol"] == 1)
    assert store.handshakes["doq"] == 0


def test_the_status_lists_every_listener_and_the_certificate(encrypted: RunningServer) -> None:
    server = encrypted
    status, doc, _ = http(f"http://127.0.0.1:{server.server.admin_port}/v1/status")
    assert status == 200
    check_against_spec("/v1/status", "GET", status, doc)
    endpoints = {(e["proto"], e["address"], e["port"]) for e in doc["endpoints"]}
    for proto in ("udp", "tcp", "dot", "doh", "doq"):
        assert (proto, "127.0.0.1", port(server, proto)) in endpoints
    certificate = doc["certificate"]
    assert certificate["names"] == ["dot.test", "*.dot.test", "127.0.0.1"]
    assert 29 < certificate["days_left"] <= 30


def test_doh_counts_a_silent_client_as_a_handshake_timeout_and_an_evicted_one_as_busy(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    ca = TestCA(tmp_path)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    ca.issue(cert, key)
    server = make_server(
        tls=TLSConfig(cert=cert, key=key),
        doh=DoHConfig(listen=(Listen("127.0.0.1", 0),)),
        tcp=TCPConfig(idle_timeout=0.5, max_connections=2),
    )
    store = server.server.certs
    assert store is not None
    doh = port(server, "doh")
    with socket.create_connection(("127.0.0.1", doh), timeout=5):
        wait_for(lambda: store.handshake_failures["doh", "timeout"] == 1)
    # Three silent clients for two slots: the oldest handshake makes room.
    socks = [socket.create_connection(("127.0.0.1", doh), timeout=5) for _ in range(3)]
    try:
        wait_for(lambda: store.handshake_failures["doh", "busy"] == 1)
    finally:
        for sock in socks:
            sock.close()
    assert store.handshakes["doh"] == 0
