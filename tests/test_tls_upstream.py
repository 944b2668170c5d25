"""DNS over TLS to a real server: Unbound on loopback with a test certificate (the same
Unbound serves DNS over HTTPS for tests/test_https_upstream.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.rcode
import pytest

from .helpers.realservers import ResolverProcess, free_port, wait_for_dns
from .test_cli import ask

pytestmark = pytest.mark.skipif(
    not (shutil.which("unbound") and shutil.which("openssl")), reason="needs unbound and openssl"
)


def make_certificate(cert: Path, key: Path, name: str) -> None:
    """A self-signed certificate for ``name`` (its own CA), made by openssl."""
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName=DNS:{name}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


class TLSServer:
    """Unbound answering a local zone over DNS-over-TLS, DNS-over-HTTPS (``/dns-query``) and
    plain UDP (to know it is up). Names under ``slow.test`` are forwarded to ``slow`` (an
    upstream that answers late, so that queries can be caught in flight)."""

    def __init__(self, workdir: Path, slow: str | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.https = free_port()
        self.plain = free_port()
        self.cert = workdir / "cert.pem"
        self.key = workdir / "key.pem"
        self.slow = slow
        make_certificate(self.cert, self.key, "dot.test")
        self.start()

    def start(self) -> None:
        """Start Unbound (again, on the same ports after :meth:`stop`)."""
        workdir = self.workdir
        conf = workdir / "unbound.conf"
        slow = (
            '  local-zone: "slow.test." transparent\n  do-not-query-localhost: no\n'
            'forward-zone:\n  name: "slow.test."\n'
            f"  forward-addr: {self.slow.replace(':', '@')}\n"
            if self.slow
            else ""
        )
        conf.write_text(
            "server:\n"
            f"  interface: 127.0.0.1@{self.port}\n"
            f"  interface: 127.0.0.1@{self.https}\n"
            f"  interface: 127.0.0.1@{self.plain}\n"
            f"  tls-port: {self.port}\n"
            f"  https-port: {self.https}\n"
            '  http-endpoint: "/dns-query"\n'
            f"  tls-service-key: {self.key}\n"
            f"  tls-service-pem: {self.cert}\n"
            '  do-daemonize: no\n  use-syslog: no\n  username: ""\n  chroot: ""\n'
            f"  directory: {workdir}\n  pidfile: {workdir}/unbound.pid\n"
            "  access-control: 127.0.0.0/8 allow\n"
            '  local-zone: "dot.test." static\n'
            '  local-data: "www.dot.test. 300 IN A 192.0.2.53"\n'
            '  local-data: "dot.test. 300 IN SOA ns.dot.test. h.dot.test. 1 2 3 4 60"\n'
            + slow
            + "remote-control:\n  control-enable: no\n"
        )
        self.proc = subprocess.Popen(
            ["unbound", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_for_dns("127.0.0.1", self.plain, "dot.test")
        except BaseException:
            self.stop()
            raise

    def pin(self) -> str:
        """The certificate's SPKI pin, computed by openssl (not by the code under test)."""
        der = subprocess.run(
            f"openssl x509 -in {self.cert} -pubkey -noout | openssl pkey -pubin -outform der"
            " | openssl dgst -sha256 -binary | base64",
            shell=True,
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return der.stdout.strip()

    def kill(self) -> None:
        """Gone at once, connections and all (no goodbye to its clients)."""
        self.proc.kill()
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


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
