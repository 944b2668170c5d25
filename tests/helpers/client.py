"""A DNS client for the tests: queries to a resolver on 127.0.0.1 over UDP or TCP, and the
two-byte length framing of DNS over TCP for tests that drive a stream socket by hand."""

from __future__ import annotations

import socket
import struct

import dns.message
import dns.query


def ask(
    port: int, name: str, rtype: str = "A", tcp: bool = False, **kw: object
) -> dns.message.Message:
    query = dns.message.make_query(name, rtype, **kw)  # type: ignore[arg-type]
    if tcp:
        return dns.query.tcp(query, "127.0.0.1", port=port, timeout=3)
    return dns.query.udp(query, "127.0.0.1", port=port, timeout=3)


def frame(name: str, rtype: str, qid: int) -> bytes:
    query = dns.message.make_query(name, rtype)
    query.id = qid
    wire = query.to_wire()
    return struct.pack("!H", len(wire)) + wire


def send_frame(sock: socket.socket, message: dns.message.Message) -> None:
    wire = message.to_wire()
    sock.sendall(struct.pack("!H", len(wire)) + wire)


def read_frame(sock: socket.socket) -> dns.message.Message:
    head = sock.recv(2, socket.MSG_WAITALL)
    assert len(head) == 2, "connection closed"
    return dns.message.from_wire(sock.recv(struct.unpack("!H", head)[0], socket.MSG_WAITALL))
