"""DNS over HTTPS, SPKI pins and bootstrap against a real server: Unbound on loopback
serving DoH (HTTP/2) and DoT with a test certificate; the resolver runs in-process so that
its connections and error counts can be read."""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.rcode
import pytest

from resolver.upstream.endpoints import Upstream, parse_upstream

from .helpers.fakeupstream import Behaviour, FakeUpstream
from .helpers.realservers import free_port
from .helpers.server import RunningServer
from .helpers.tls import TLSServer

pytestmark = pytest.mark.skipif(
    not (shutil.which("unbound") and shutil.which("openssl")), reason="needs unbound and openssl"
)

WRONG_PIN = "A" * 43 + "="


@pytest.fixture
def silent() -> Iterator[FakeUpstream]:
    """Where Unbound forwards ``slow.test``: it never answers, so queries stay in flight."""
    fake = FakeUpstream(default=Behaviour("drop"))
    yield fake
    fake.close()


@pytest.fixture
def unbound(tmp_path: Path, silent: FakeUpstream) -> Iterator[TLSServer]:
    server = TLSServer(tmp_path, slow=silent.address)
    yield server
    server.stop()


def doh(server: TLSServer, suffix: str = "#dot.test") -> Upstream:
    return parse_upstream(f"https://127.0.0.1:{server.https}/dns-query{suffix}")


def dot(server: TLSServer, suffix: str = "#dot.test") -> Upstream:
    return parse_upstream(f"tls://127.0.0.1:{server.port}{suffix}")


def established(port: int) -> int:
    """TCP connections established to ``port`` on loopback, as the kernel sees them."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    return len(out.splitlines())


def test_forwarding_over_https_many_queries_on_one_connection(
    make_server: Callable[..., RunningServer], unbound: TLSServer
) -> None:
    up = doh(unbound)
    running = make_server(upstreams=(up,), tls_ca_file=unbound.cert, upstream_timeout=2.0)
    reply = running.query("www.dot.test")
    assert reply.answer[0][0].to_text() == "192.0.2.53"
    assert running.query("nothing.dot.test").rcode() == dns.rcode.NXDOMAIN
    assert running.query("deepseek.com").rcode() == dns.rcode.NXDOMAIN  # policy first
    results: list[int] = []

    def one(index: int) -> None:
        results.append(running.query(f"n{index}.dot.test", timeout=5).rcode())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [dns.rcode.NXDOMAIN] * 40
    conn = running.resolver.forwarder.connections[up]
    assert conn.connects == 1
    assert conn.session.opened == 42  # one stream per question, all on that connection
    if shutil.which("ss"):
        assert established(unbound.https) == 1
    assert running.resolver.forwarder.errors.total() == 0


@pytest.mark.parametrize("case", ["wrong name", "untrusted CA"])
def test_a_certificate_that_does_not_verify_is_a_failed_upstream_never_a_downgrade(
    make_server: Callable[..., RunningServer],
    unbound: TLSServer,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    up = doh(unbound, "#other.test" if case == "wrong name" else "#dot.test")
    ca = unbound.cert if case == "wrong name" else None
    running = make_server(upstreams=(up,), tls_ca_file=ca)
    started = time.monotonic()
    assert running.query("www.dot.test").rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - started < 3.0
    forwarder = running.resolver.forwarder
    assert forwarder.errors[(up.label, "network")] >= 1
    assert forwarder.connections[up].connects == 0


@pytest.mark.parametrize("transport", ["tls", "https"])
def test_spki_pins(
    make_server: Callable[..., RunningServer], unbound: TLSServer, transport: str
) -> None:
    make = dot if transport == "tls" else doh
    good = make(unbound, f"?pin-sha256={unbound.pin()}#dot.test")
    wrong = make(unbound, f"?pin-sha256={WRONG_PIN}#dot.test")
    # A backup pin that matches nothing does not hurt, as long as one pin matches.
    either = make(unbound, f"?pin-sha256={WRONG_PIN}&pin-sha256={unbound.pin()}#dot.test")
    for up in (good, either):
        running = make_server(upstreams=(up,), tls_ca_file=unbound.cert)
        assert running.query("www.dot.test").answer[0][0].to_text() == "192.0.2.53"
    running = make_server(upstreams=(wrong,), tls_ca_file=unbound.cert)
    assert running.query("www.dot.test").rcode() == dns.rcode.SERVFAIL
    assert running.resolver.forwarder.errors[(wrong.label, "network")] >= 1


def test_server_killed_mid_flight_fails_over_then_reconnects(
    make_server: Callable[..., RunningServer], unbound: TLSServer, upstream: FakeUpstream
) -> None:
    upstream.records[("x.slow.test", "A")] = ["192.0.2.88"]
    up = doh(unbound)
    running = make_server(
        upstreams=(up, parse_upstream(upstream.address)),
        tls_ca_file=unbound.cert,
        upstream_timeout=2.5,
        upstream_deadline=4.0,
    )
    assert running.query("nothing.dot.test").rcode() == dns.rcode.NXDOMAIN  # connected
    replies: list[tuple[float, str]] = []

    def slow() -> None:
        started = time.monotonic()
        reply = running.query("x.slow.test", timeout=5)
        replies.append((time.monotonic() - started, reply.answer[0][0].to_text()))

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.5)  # the query waits on its stream: Unbound's own upstream is silent
    unbound.kill()
    thread.join(6)
    took, answer = replies[0]
    assert answer == "192.0.2.88"  # from the next upstream ...
    assert took < 2.0  # ... as soon as the connection was lost, not after the timeout
    forwarder = running.resolver.forwarder
    assert forwarder.errors[(up.label, "network")] >= 1
    unbound.start()
    # The next query opens a new connection (the fake upstream knows nothing of www).
    assert running.query("www.dot.test").answer[0][0].to_text() == "192.0.2.53"
    assert forwarder.connections[up].connects == 2


@pytest.mark.parametrize("scheme", ["tls", "https"])
def test_host_name_upstream_resolved_through_bootstrap_and_verified_against_it(
    make_server: Callable[..., RunningServer],
    unbound: TLSServer,
    upstream: FakeUpstream,
    scheme: str,
) -> None:
    upstream.records[("dot.test", "A")] = ["127.0.0.1"]
    upstream.records[("other.test", "A")] = ["127.0.0.1"]
    port = unbound.port if scheme == "tls" else unbound.https
    path = "/dns-query" if scheme == "https" else ""
    up = parse_upstream(f"{scheme}://dot.test:{port}{path}")
    running = make_server(
        upstreams=(up,), bootstrap=(parse_upstream(upstream.address),), tls_ca_file=unbound.cert
    )
    assert running.query("www.dot.test").answer[0][0].to_text() == "192.0.2.53"
    assert running.query("nothing.dot.test").rcode() == dns.rcode.NXDOMAIN
    assert upstream.count("dot.test", "A") == 1  # looked up once, kept for its TTL
    assert running.resolver.forwarder.bootstrap.known["dot.test"][1] == ["127.0.0.1"]
    # Another name at the same address: the certificate (dot.test only) does not verify.
    other = parse_upstream(f"{scheme}://other.test:{port}{path}")
    running = make_server(
        upstreams=(other,), bootstrap=(parse_upstream(upstream.address),), tls_ca_file=unbound.cert
    )
    assert running.query("www.dot.test").rcode() == dns.rcode.SERVFAIL
    assert running.resolver.forwarder.errors[(other.label, "network")] >= 1


def test_bootstrap_down_is_a_failed_upstream_with_a_clear_log_line(
    make_server: Callable[..., RunningServer],
    unbound: TLSServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    up = parse_upstream(f"https://dot.test:{unbound.https}/dns-query")
    dead = parse_upstream(f"127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING, logger="resolver.bootstrap"):
        running = make_server(upstreams=(up,), bootstrap=(dead,), tls_ca_file=unbound.cert)
        started = time.monotonic()
        assert running.query("www.dot.test").rcode() == dns.rcode.SERVFAIL
        assert time.monotonic() - started < 3.0
    assert running.resolver.forwarder.errors[(up.label, "bootstrap")] >= 1
    assert (
        f"cannot resolve upstream host dot.test: no A or AAAA record from bootstrap servers {dead}"
        in caplog.text
    )
