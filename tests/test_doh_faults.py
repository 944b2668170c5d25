"""DNS over HTTPS when the server misbehaves (tests/helpers/dohserver.py, real HTTP/2 over TLS on
loopback): every fault is a failed upstream of the right kind, the next upstream answers
at once, and the next query reconnects. Also: config errors name the field and value."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from resolver.config import load_config
from resolver.upstream.endpoints import parse_upstream
from resolver.yamlload import SourceError

from .helpers.dohserver import DoHServer
from .helpers.fakeupstream import FakeUpstream
from .helpers.server import RunningServer
from .helpers.tls import make_certificate

needs_openssl = pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_certificate(cert, key, "doh.test")
    return cert, key


@pytest.fixture
def make_doh(certificate: tuple[Path, Path]) -> Iterator[Callable[..., DoHServer]]:
    started: list[DoHServer] = []

    def make(**kw: object) -> DoHServer:
        server = DoHServer(*certificate, **kw)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield make
    for server in started:
        server.close()


def start(
    make_server: Callable[..., RunningServer],
    doh: DoHServer,
    cert: Path,
    *more: str,
) -> RunningServer:
    ups = (parse_upstream(f"https://127.0.0.1:{doh.port}/dns-query#doh.test"),)
    return make_server(
        upstreams=ups + tuple(parse_upstream(x) for x in more),
        tls_ca_file=cert,
        upstream_timeout=1.5,
        upstream_deadline=3.0,
    )


@needs_openssl
@pytest.mark.parametrize(
    ("mode", "kind"),
    [("goaway", "network"), ("reset", "network"), ("status500", "rcode"), ("text", "malformed")],
)
def test_a_fault_is_a_failed_upstream_and_the_next_one_answers_at_once(
    make_server: Callable[..., RunningServer],
    make_doh: Callable[..., DoHServer],
    certificate: tuple[Path, Path],
    upstream: FakeUpstream,
    mode: str,
    kind: str,
) -> None:
    doh = make_doh(mode=mode)
    running = start(make_server, doh, certificate[0], upstream.address)
    started = time.monotonic()
    reply = running.query("example.test")
    assert reply.answer[0][0].to_text() == "192.0.2.1"  # from the plain upstream
    assert time.monotonic() - started < 1.0  # not after the 1.5 s timeout
    label = running.resolver.forwarder.upstreams[0].label
    assert running.resolver.forwarder.errors[(label, kind)] == 1
    # The next query goes to the DoH server again: after a GOAWAY, on a new connection.
    doh.mode = "answer"
    assert running.query("www.example.test").answer[0][0].to_text() == "192.0.2.7"
    assert doh.connections == (2 if mode == "goaway" else 1)


@needs_openssl
def test_the_servers_stream_limit_is_kept_and_queries_wait_for_a_slot(
    make_server: Callable[..., RunningServer],
    make_doh: Callable[..., DoHServer],
    certificate: tuple[Path, Path],
) -> None:
    doh = make_doh(mode="hold", max_streams=1)
    running = start(make_server, doh, certificate[0])
    answers: list[str] = []

    def one(index: int) -> None:
        reply = running.query(f"n{index}.example.test", timeout=5)
        answers.append(reply.answer[0][0].to_text())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    assert doh.streams == 1  # the others wait for the one stream allowed
    doh.release()
    for thread in threads:
        thread.join(5)
    assert answers == ["192.0.2.7"] * 5
    assert (doh.connections, doh.streams, doh.peak) == (1, 5, 1)


@needs_openssl
def test_a_small_flow_control_window_splits_the_body(
    make_server: Callable[..., RunningServer],
    make_doh: Callable[..., DoHServer],
    certificate: tuple[Path, Path],
) -> None:
    doh = make_doh(window=16)  # a query is about 40 bytes: three DATA frames
    running = start(make_server, doh, certificate[0])
    for index in range(3):
        reply = running.query(f"n{index}.example.test")
        assert reply.answer[0][0].to_text() == "192.0.2.7"
    assert (doh.connections, doh.streams) == (1, 3)


@needs_openssl
def test_an_idle_connection_is_closed_and_the_next_query_reconnects(
    make_server: Callable[..., RunningServer],
    make_doh: Callable[..., DoHServer],
    certificate: tuple[Path, Path],
) -> None:
    doh = make_doh()
    running = start(make_server, doh, certificate[0])
    forwarder = running.resolver.forwarder
    up = forwarder.upstreams[0]
    conn = forwarder.transports["https"].connection(up)
    conn.idle = 0.3
    assert running.query("a.example.test").answer[0][0].to_text() == "192.0.2.7"
    first = conn.session
    time.sleep(1.2)  # closed 0.3 to 0.6 s after the last query
    assert first.closed and first.reason == "idle"
    assert running.query("b.example.test").answer[0][0].to_text() == "192.0.2.7"
    assert (conn.connects, doh.connections) == (2, 2)
    assert forwarder.errors.total() == 0


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        (
            "upstreams: ['https://doh.test/dns-query?pin-sha256=short']",
            r"upstreams\[0\]: 'https://doh.test/dns-query\?pin-sha256=short': pin-sha256 must be",
        ),
        (
            "upstreams: ['tls://1.2.3.4?pin=x']",
            r"upstreams\[0\]: 'tls://1.2.3.4\?pin=x': unknown parameter 'pin'",
        ),
        (
            "upstreams: ['tls://1.2.3.4#dns.test?pin-sha256=x']",
            r"upstreams\[0\]: .*put '\?pin-sha256=...' before '#name'",
        ),
        ("upstreams: ['udp://dns.test']", r"upstreams\[0\]: 'udp://dns.test': a plain upstream"),
        (
            "upstreams: ['tcp://1.2.3.4/q']",
            r"upstreams\[0\]: .*only https:// upstreams have a path",
        ),
        ("upstreams: ['quic://1.2.3.4']", r"upstreams\[0\]: .*scheme 'quic' is not supported"),
        ("bootstrap: ['tls://1.2.3.4']", r"bootstrap\[0\]: 'tls://1.2.3.4': a bootstrap server"),
        ("bootstrap: [dns.test]", r"bootstrap\[0\]: 'dns.test': a plain upstream must be an IP"),
    ],
)
def test_config_errors_name_the_field_and_the_value(
    tmp_path: Path, yaml: str, message: str
) -> None:
    path = tmp_path / "resolver.yaml"
    path.write_text(yaml + "\n")
    with pytest.raises(SourceError, match=message):
        load_config(path)


def test_upstream_forms_and_their_labels() -> None:
    pin = "A" * 43 + "="
    table = [
        ("https://dns.example/dns-query", "https://dns.example:443/dns-query", ()),
        ("https://Dns.Example.:8443/q", "https://dns.example:8443/q", ()),
        ("https://192.0.2.1#dns.example", "https://192.0.2.1:443/dns-query#dns.example", ()),
        (
            f"https://[2001:db8::1]/dns-query?pin-sha256={pin}",
            "https://[2001:db8::1]:443/dns-query",
            (pin,),
        ),
        ("tls://dns.example", "tls://dns.example:853", ()),
        (
            f"tls://192.0.2.1:853?pin-sha256={pin}&pin-sha256={pin}#dns.example",
            "tls://192.0.2.1:853#dns.example",
            (pin, pin),
        ),
    ]
    for text, label, pins in table:
        up = parse_upstream(text)
        assert (up.label, up.pins) == (label, pins), text
