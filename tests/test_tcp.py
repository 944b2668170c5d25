"""TCP per RFC 7766: framing, pipelining answered out of order, idle timeout, connection cap."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import dns.message
import dns.rcode

from resolver.config import TCPConfig

from .conftest import RunningServer
from .fakeupstream import Behaviour, FakeUpstream


def send_frame(sock: socket.socket, message: dns.message.Message) -> None:
    wire = message.to_wire()
    sock.sendall(struct.pack("!H", len(wire)) + wire)


def read_frame(sock: socket.socket) -> dns.message.Message:
    head = sock.recv(2, socket.MSG_WAITALL)
    assert len(head) == 2, "connection closed"
    return dns.message.from_wire(sock.recv(struct.unpack("!H", head)[0], socket.MSG_WAITALL))


def is_closed(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_pipelined_queries_are_answered_as_each_is_ready(
    server: RunningServer, upstream: FakeUpstream
) -> None:
    upstream.behaviours["example.test"] = Behaviour(delay=0.3)
    slow = dns.message.make_query("example.test", "A")
    fast = [dns.message.make_query(name, "A") for name in ("deepseek.com", "www.example.test")]
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        # All three in one segment: the slow one first.
        sock.sendall(
            b"".join(struct.pack("!H", len(w)) + w for w in (m.to_wire() for m in (slow, *fast)))
        )
        replies = [read_frame(sock) for _ in range(3)]
        order = [r.id for r in replies]
        assert replies[-1].rcode() == dns.rcode.NOERROR
        last = order[-1]
    assert last == slow.id
    assert set(order[:2]) == {m.id for m in fast}


def test_a_query_split_across_segments_is_reassembled(server: RunningServer) -> None:
    query = dns.message.make_query("example.test", "A")
    wire = struct.pack("!H", len(query.to_wire())) + query.to_wire()
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in wire:
            sock.sendall(bytes([byte]))
            time.sleep(0.001)
        assert read_frame(sock).rcode() == dns.rcode.NOERROR


def test_idle_connections_are_closed(make_server: Callable[..., RunningServer]) -> None:
    running = make_server(tcp=TCPConfig(idle_timeout=0.3))
    with socket.create_connection((running.host, running.port), timeout=5) as sock:
        send_frame(sock, dns.message.make_query("example.test", "A"))
        assert read_frame(sock).rcode() == dns.rcode.NOERROR
        assert is_closed(sock, 2.0)


def test_connection_cap_closes_the_oldest_idle_first(
    make_server: Callable[..., RunningServer],
) -> None:
    running = make_server(tcp=TCPConfig(max_connections=2, idle_timeout=30))
    addr = (running.host, running.port)
    oldest = socket.create_connection(addr, timeout=5)
    middle = socket.create_connection(addr, timeout=5)
    try:
        send_frame(middle, dns.message.make_query("example.test", "A"))
        assert read_frame(middle).rcode() == dns.rcode.NOERROR
        newest = socket.create_connection(addr, timeout=5)
        try:
            send_frame(newest, dns.message.make_query("example.test", "A"))
            assert read_frame(newest).rcode() == dns.rcode.NOERROR
            assert is_closed(oldest, 2.0)
            assert not is_closed(middle, 0.2)
        finally:
            newest.close()
    finally:
        oldest.close()
        middle.close()
