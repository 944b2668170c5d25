"""An in-process upstream DNS server on loopback, for tests: real sockets, scripted faults.

It answers from a small table of records (dnspython builds the replies) and can misbehave on
request: stay silent, answer late, set TC on UDP, send a spoofed reply first, send garbage,
or answer SERVFAIL. Runs in its own threads, so it serves both in-process and subprocess
resolvers.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset


@dataclass
class Behaviour:
    """What the upstream does for a name (lower case, no trailing dot)."""

    mode: str = (
        "answer"  # answer | drop | servfail | refused | formerr | truncate | spoof | garbage
    )
    delay: float = 0.0


@dataclass
class FakeUpstream:
    records: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    ttl: int = 300
    negative_ttl: int = 120
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    default: Behaviour = field(default_factory=Behaviour)
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(50):  # a free UDP port may be taken for TCP: then try another
            self.udp = socket.socket(family, socket.SOCK_DGRAM)
            self.udp.bind((self.host, 0))
            self.port = self.udp.getsockname()[1]
            self.tcp = socket.socket(family, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.tcp.bind((self.host, self.port))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        self.tcp.listen(64)
        self.spoofer = socket.socket(family, socket.SOCK_DGRAM)
        self.spoofer.bind((self.host, 0))
        self.queries: Counter[tuple[str, str, str]] = Counter()  # (proto, name, type)
        self.last_query: dns.message.Message | None = None
        self.sources: list[tuple[int, int]] = []  # (source port, query ID) of UDP queries
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def count(self, name: str, rtype: str = "A", proto: str | None = None) -> int:
        return sum(
            n
            for (p, qn, qt), n in self.queries.items()
            if qn == name and qt == rtype and (proto is None or p == proto)
        )

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        for sock in (self.udp, self.tcp, self.spoofer):
            sock.close()

    # ------------------------------------------------------------------ answering

    def _reply(self, query: dns.message.Message, proto: str) -> tuple[Behaviour, bytes | None]:
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        rtype = dns.rdatatype.to_text(question.rdtype)
        self.queries[(proto, name, rtype)] += 1
        self.last_query = query
        behaviour = self.behaviours.get(name, self.default)
        if behaviour.mode == "drop":
            return behaviour, None
        if behaviour.mode == "garbage":
            return behaviour, b"\x00\x01garbage"
        response = dns.message.make_response(query)
        if behaviour.mode in ("servfail", "refused", "formerr"):
            response.set_rcode(dns.rcode.from_text(behaviour.mode.upper()))
            return behaviour, response.to_wire()
        owner = question.name
        alias = self.records.get((name, "CNAME")) if rtype != "CNAME" else None
        while alias:  # follow a CNAME chain, as a recursive server's answer does
            response.answer.append(dns.rrset.from_text_list(owner, self.ttl, "IN", "CNAME", alias))
            owner = dns.name.from_text(alias[0])
            name = owner.to_text().rstrip(".").lower()
            alias = self.records.get((name, "CNAME"))
        values = self.records.get((name, rtype))
        if values:
            response.answer.append(dns.rrset.from_text_list(owner, self.ttl, "IN", rtype, values))
        elif response.answer:
            pass  # the chain's end has no such record: the CNAMEs are the answer
        else:
            exists = any(n == name for n, _ in self.records)
            if not exists:
                response.set_rcode(dns.rcode.NXDOMAIN)
            soa = f"ns.test. hostmaster.test. 1 3600 600 86400 {self.negative_ttl}"
            response.authority.append(
                dns.rrset.from_text("test.", self.negative_ttl * 2, "IN", "SOA", soa)
            )
        try:
            wire = response.to_wire(max_size=65535 if proto == "tcp" else 0)
            too_big = False
        except dns.exception.TooBig:
            wire = response.to_wire(max_size=65535)
            too_big = True
        if proto == "udp" and (behaviour.mode == "truncate" or too_big):
            header = bytearray(wire[:12])
            header[2] |= 0x02  # TC
            struct.pack_into("!HHH", header, 6, 0, 0, 0)
            # Keep only header and question: what a server sends when the answer is too big.
            qend = 12 + len(question.name.to_wire()) + 4
            wire = bytes(header) + wire[12:qend]
        return behaviour, wire

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.udp], [], [], 0.05)
            if not ready:
                continue
            data, addr = self.udp.recvfrom(65535)
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            self.sources.append((addr[1], query.id))
            behaviour, wire = self._reply(query, "udp")
            threading.Thread(
                target=self._send_udp, args=(behaviour, wire, addr, query), daemon=True
            ).start()

    def _send_udp(
        self,
        behaviour: Behaviour,
        wire: bytes | None,
        addr: tuple[str, int],
        query: dns.message.Message,
    ) -> None:
        # The socket may be closed by the end of a test while a reply was delayed.
        with contextlib.suppress(OSError):
            if behaviour.delay:
                time.sleep(behaviour.delay)
            if wire is None or self._stop.is_set():
                return
            if behaviour.mode == "spoof":
                # Three forgeries first: wrong ID, wrong question, and the right reply from a
                # different source port. Only the last datagram, from the real port, is genuine.
                fake_id = bytearray(wire)
                struct.pack_into("!H", fake_id, 0, (query.id + 1) & 0xFFFF)
                self.udp.sendto(bytes(fake_id), addr)
                other = dns.message.make_query("spoofed.test.", "A")
                other.id = query.id
                other.flags |= 0x8000
                self.udp.sendto(other.to_wire(), addr)
                forged = dns.message.from_wire(wire)
                forged.answer = [
                    dns.rrset.from_text(query.question[0].name, 300, "IN", "A", "6.6.6.6")
                ]
                self.spoofer.sendto(forged.to_wire(), addr)
                time.sleep(0.05)
            self.udp.sendto(wire, addr)

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.tcp], [], [], 0.05)
            if not ready:
                continue
            conn, _ = self.tcp.accept()
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def _serve_conn(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with conn:
            try:
                while True:
                    head = conn.recv(2, socket.MSG_WAITALL)
                    if len(head) < 2:
                        return
                    data = conn.recv(struct.unpack("!H", head)[0], socket.MSG_WAITALL)
                    query = dns.message.from_wire(data)
                    behaviour, wire = self._reply(query, "tcp")
                    if behaviour.delay:
                        time.sleep(behaviour.delay)
                    if wire is None:
                        continue
                    conn.sendall(struct.pack("!H", len(wire)) + wire)
            except (OSError, dns.exception.DNSException):
                return
