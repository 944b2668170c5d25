"""DNS over TLS to a real server: Unbound on loopback with a test certificate (the same
Unbound serves DNS over HTTPS for tests/test_https_upstream.py)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.rcode
import pytest

from .helpers.client import ask
from .helpers.realservers import ResolverProcess
from .helpers.tls import TLSServer

pytestmark = pytest.mark.skipif(
    not (shutil.which("unbound") and shutil.which("openssl")), reason="needs unbound and openssl"
)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TLSServer]:
    server = TLSServer(tmp_path)
    yield server
    server.stop()


def start(upstream: str, cert: Path, lists: Path) -> ResolverProcess:
    os.environ["SSL_CERT_FILE"] = str(cert)  # inherited by the child: our test CA
    try:
        return ResolverProcess(
            "--listen", "127.0.0.1:0", "--upstream", upstream, "--blocklists", str(lists)
        )
    finally:
        del os.environ["SSL_CERT_FILE"]


def test_forwarding_over_tls_with_a_verified_certificate(
    tls_server: TLSServer, lists_dir: Path
) -> None:
    proc = start(f"tls://127.0.0.1:{tls_server.port}#dot.test", tls_server.cert, lists_dir)
    try:
        reply = ask(proc.port, "www.dot.test")
        assert reply.answer[0][0].to_text() == "192.0.2.53"
        assert ask(proc.port, "nothing.dot.test").rcode() == dns.rcode.NXDOMAIN
        assert ask(proc.port, "deepseek.com").rcode() == dns.rcode.NXDOMAIN  # policy first
        # Pipelining on the reused connection: many questions at once, all answered.
        results: list[int] = []

        def one(index: int) -> None:
            results.append(ask(proc.port, f"n{index}.dot.test").rcode())

        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [dns.rcode.NXDOMAIN] * 20
    finally:
        assert proc.stop() == 0


def test_a_certificate_for_another_name_is_a_failed_upstream_never_a_downgrade(
    tls_server: TLSServer, lists_dir: Path
) -> None:
    proc = start(f"tls://127.0.0.1:{tls_server.port}#other.test", tls_server.cert, lists_dir)
    try:
        started = time.monotonic()
        assert ask(proc.port, "www.dot.test").rcode() == dns.rcode.SERVFAIL
        assert time.monotonic() - started < 3.0
    finally:
        assert proc.stop() == 0
