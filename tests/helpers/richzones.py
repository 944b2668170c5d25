"""Zones with every shape an answer can take, served by NSD, and Unbound as a plain
forwarder to them: the reference side of the conformance tests.

The zones hold CNAME chains (within a zone and across zones), a DNAME, a wildcard, an
empty non-terminal, a delegation with glue, NODATA and NXDOMAIN cases, RRsets too large
for 512 and for 1232 octets, and, when dnspython can sign (it needs ``cryptography``), a
DNSSEC-signed zone. NSD and Unbound are started on free high ports on 127.0.0.1 and
stopped by their PIDs.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rdatatype
import dns.zone

from .realservers import free_port, stop_process, wait_for_dns

#: The zones (origin -> records after the SOA and NS, which are added).
ZONES: dict[str, list[str]] = {
    "conf.test": [
        "www A 192.0.2.1",
        "www AAAA 2001:db8::1",
        'www TXT "hello"',
        "chain1 CNAME chain2",
        "chain2 CNAME chain3",
        "chain3 CNAME www",
        "xzone CNAME www.other.test.",
        "dangling CNAME missing.other.test.",
        "dn DNAME other.test.",
        "*.wild A 192.0.2.7",
        '*.wild TXT "wild"',
        "a.b.ent A 192.0.2.8",
        "mail MX 10 mx1",
        "mail MX 20 mx2",
        "mx1 A 192.0.2.21",
        "mx2 A 192.0.2.22",
        "sub NS ns.sub",
        "ns.sub A 192.0.2.53",
        *(f'big TXT "{i:02d}{"x" * 180}"' for i in range(12)),
        *(f'mid TXT "{i:02d}{"y" * 120}"' for i in range(4)),
        *(f"many A 198.51.100.{i}" for i in range(1, 41)),
    ],
    "other.test": [
        "www A 192.0.2.101",
        "x A 192.0.2.102",
        'x TXT "below the dname"',
    ],
}
SIGNED_ZONE = "signed.test"
SIGNED_RECORDS = [
    "www A 192.0.2.201",
    "www AAAA 2001:db8::201",
    "alias CNAME www",
    "*.wild A 192.0.2.207",
    "dn DNAME other.test.",
    "mail MX 10 www",
]


def _zone_text(origin: str, records: list[str]) -> str:
    return (
        f"$ORIGIN {origin}.\n$TTL 3600\n"
        f"@ IN SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 300\n"
        f"@ IN NS ns.{origin}.\nns IN A 127.0.0.1\n" + "\n".join(records) + "\n"
    )


def signed_zone_text(origin: str, records: list[str]) -> str | None:
    """The zone signed (ECDSA P-256, NSEC) by dnspython, or None when it cannot sign."""
    try:
        import dns._features
        import dns.zone

        dns._features.force("dnssec", True)  # it asks for a newer cryptography than needed
        import dns.dnssec
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError:
        return None
    try:
        zone = dns.zone.from_text(_zone_text(origin, records), relativize=False)
        key = ec.generate_private_key(ec.SECP256R1())
        dnskey = dns.dnssec.make_dnskey(
            key.public_key(), dns.dnssec.Algorithm.ECDSAP256SHA256, flags=257
        )
        dns.dnssec.sign_zone(
            zone, keys=[(key, dnskey)], inception=time.time() - 3600, lifetime=30 * 86400
        )
        return str(zone.to_text())
    except Exception:
        return None


def available() -> bool:
    return bool(shutil.which("nsd") or Path("/usr/sbin/nsd").exists())


def unbound_available() -> bool:
    return bool(shutil.which("unbound") or Path("/usr/sbin/unbound").exists())


class ZoneServer:
    """NSD serving ZONES (and the signed zone, when ``signed`` and signing works)."""

    def __init__(self, workdir: Path, signed: bool = True) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.dir = workdir
        self.port = free_port()
        zones = {origin: _zone_text(origin, records) for origin, records in ZONES.items()}
        self.signed = False
        if signed:
            text = signed_zone_text(SIGNED_ZONE, SIGNED_RECORDS)
            if text is not None:
                zones[SIGNED_ZONE] = text
                self.signed = True
        #: The zone files' text by origin (what a FullAnyProxy answers ANY from).
        self.texts = zones
        stanzas = []
        for origin, text in zones.items():
            (workdir / f"{origin}.zone").write_text(text)
            stanzas.append(f"zone:\n  name: {origin}\n  zonefile: {origin}.zone\n")
        conf = workdir / "nsd.conf"
        conf.write_text(
            "server:\n"
            f"  ip-address: 127.0.0.1@{self.port}\n"
            f"  port: {self.port}\n"
            '  username: ""\n  chroot: ""\n'
            f'  zonesdir: "{workdir}"\n'
            f'  pidfile: "{workdir}/nsd.pid"\n'
            f'  xfrdfile: "{workdir}/xfrd.state"\n'
            f'  zonelistfile: "{workdir}/zone.list"\n'
            '  database: ""\n'
            f'  logfile: "{workdir}/nsd.log"\n'
            "  server-count: 1\n  verbosity: 1\n"
            "remote-control:\n  control-enable: no\n" + "".join(stanzas)
        )
        binary = shutil.which("nsd") or "/usr/sbin/nsd"
        self.proc = subprocess.Popen(
            [binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            for origin in zones:
                wait_for_dns("127.0.0.1", self.port, origin)
        except BaseException:
            self.stop()
            log = workdir / "nsd.log"
            raise RuntimeError(
                f"NSD did not start: {log.read_text() if log.exists() else ''}"
            ) from None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)


class UnboundForwarder:
    """Unbound as a plain forwarder to ``upstream`` (host:port): no validation, its cache
    on, nothing answered locally for ``test.``."""

    def __init__(self, workdir: Path, upstream: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = workdir / "unbound.conf"
        conf.write_text(
            "server:\n"
            f"  interface: 127.0.0.1@{self.port}\n"
            f"  port: {self.port}\n"
            '  do-daemonize: no\n  use-syslog: no\n  username: ""\n  chroot: ""\n'
            f'  directory: "{workdir}"\n  pidfile: "{workdir}/unbound.pid"\n'
            f'  logfile: "{workdir}/unbound.log"\n'
            "  num-threads: 1\n"
            "  access-control: 127.0.0.0/8 allow\n"
            "  do-not-query-localhost: no\n"
            '  module-config: "iterator"\n'
            "  qname-minimisation: no\n"
            '  local-zone: "test." nodefault\n'
            "forward-zone:\n"
            '  name: "."\n'
            f"  forward-addr: {upstream.replace(':', '@')}\n"
            "remote-control:\n  control-enable: no\n"
        )
        binary = shutil.which("unbound") or "/usr/sbin/unbound"
        self.proc = subprocess.Popen(
            [binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for_dns("127.0.0.1", self.port, "conf.test")
        except BaseException:
            self.stop()
            log = workdir / "unbound.log"
            raise RuntimeError(
                f"Unbound did not start: {log.read_text() if log.exists() else ''}"
            ) from None

    def stop(self) -> None:
        stop_process(self.proc)


class Proxy:
    """An upstream in front of NSD (UDP and TCP on one port) that misbehaves the ways the
    tests need: ``force_do`` asks NSD with DO=1 whatever the client said, so DNSSEC
    records come back to a query without DO; ``full_any`` answers ANY for a name that
    exists (and is no alias) with every RRset of the name, from the zone files, as an
    authoritative server without RFC 8482 minimal answers would (NSD answers one RRset)."""

    def __init__(self, zones: ZoneServer, force_do: bool = False, full_any: bool = False):
        self.upstream = zones.port
        self.force_do = force_do
        self.full_any = full_any
        self.zones = {
            dns.name.from_text(origin): dns.zone.from_text(text, origin, relativize=False)
            for origin, text in zones.texts.items()
        }
        for _ in range(50):
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("127.0.0.1", 0))
            self.port = self.udp.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self.tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        self.tcp.listen(16)
        self.udp.settimeout(0.2)
        self.tcp.settimeout(0.2)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _full_any(self, query: dns.message.Message) -> dns.message.Message | None:
        question = query.question[0]
        if question.rdtype != dns.rdatatype.ANY:
            return None
        for origin, zone in self.zones.items():
            if not question.name.is_subdomain(origin):
                continue
            node = zone.get_node(question.name)
            if node is None or any(r.rdtype == dns.rdatatype.CNAME for r in node):
                return None
            reply = dns.message.make_response(query)
            reply.flags |= dns.flags.AA
            do = bool(query.ednsflags & dns.flags.DO)
            for rdataset in node:
                if rdataset.rdtype == dns.rdatatype.RRSIG and not do:
                    continue
                rrset = reply.find_rrset(
                    reply.answer,
                    question.name,
                    rdataset.rdclass,
                    rdataset.rdtype,
                    rdataset.covers,
                    create=True,
                )
                rrset.update(rdataset)
            return reply
        return None

    def answer(self, wire: bytes, tcp: bool) -> bytes:
        query = dns.message.from_wire(wire)
        if self.full_any:
            full = self._full_any(query)
            if full is not None:
                limit = 65535 if tcp else max(512, query.payload if query.edns >= 0 else 512)
                data = full.to_wire(max_size=65535)
                if len(data) > limit:
                    full.flags |= dns.flags.TC
                    full.answer = []
                    data = full.to_wire()
                return data
        ask = dns.message.from_wire(wire)
        if self.force_do:
            ask.use_edns(0, dns.flags.DO, 1232)
        reply = dns.query.tcp(ask, "127.0.0.1", port=self.upstream, timeout=3)
        reply.id = query.id
        return reply.to_wire(max_size=65535)

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self.udp.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            with contextlib.suppress(Exception):
                self.udp.sendto(self.answer(wire, False), peer)

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except (TimeoutError, OSError):
                continue
            with conn, contextlib.suppress(Exception):
                conn.settimeout(3)
                while True:
                    head = conn.recv(2, socket.MSG_WAITALL)
                    if len(head) < 2:
                        break
                    wire = conn.recv(struct.unpack("!H", head)[0], socket.MSG_WAITALL)
                    data = self.answer(wire, True)
                    conn.sendall(struct.pack("!H", len(data)) + data)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        self.udp.close()
        self.tcp.close()
