"""TCP per RFC 7766: framing, pipelining answered out of order, idle timeout, connection cap."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import dns.message
import dns.rcode

from resolver.config import TCPConfig

from .helpers.client import read_frame, send_frame
from .helpers.fakeupstream import Behaviour, FakeUpstream
from .helpers.server import RunningServer


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


def test_a_message_trickling_in_is_cut_off_at_the_idle_timeout(
    make_server: Callable[..., RunningServer],
) -> None:
    running = make_server(tcp=TCPConfig(idle_timeout=0.5))
    wire = dns.message.make_query("example.test", "A").to_wire()
    framed = struct.pack("!H", len(wire)) + wire
    with socket.create_connection((running.host, running.port), timeout=5) as sock:
        started = time.monotonic()
        closed = False
        for byte in framed[:-1]:  # never the last byte; each byte "active"
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if is_closed(sock, 0.2):
                closed = True
                break
        assert closed and time.monotonic() - started < 5


def test_too_many_questions_upstream_get_servfail_at_once(
    server: RunningServer, upstream: FakeUpstream
) -> None:
    server.resolver.max_inflight = 2
    upstream.default = Behaviour(delay=0.3)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        for index in range(5):
            query = dns.message.make_query(f"n{index}.test", "A")
            sock.sendto(query.to_wire(), (server.host, server.port))
        rcodes = sorted(dns.message.from_wire(sock.recv(4096)).rcode() for _ in range(5))
    assert rcodes.count(dns.rcode.SERVFAIL) >= 3
    assert server.resolver.stats.stopped["overload"] >= 3
