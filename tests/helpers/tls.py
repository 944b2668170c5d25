"""A test certificate made by openssl, and Unbound serving DNS over TLS and over HTTPS on
loopback with it (for the upstream tests over TLS and HTTPS)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .realservers import free_port, stop_process, wait_for_dns


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
        stop_process(self.proc)
