"""TCP under hostile clients (issue 17, items 1, 7 and 12), driven as an attacker would.

- A client that pipelines queries and never reads its answers must not make the server
  queue them without end: reading pauses at ``tcp.max_output`` of pending output, and a
  connection whose output does not drain within the idle timeout is aborted.
- Connections each holding a query to a slow upstream must not lock new clients out.
- A burst of 20,000 pipelined frames in one send is answered in full, a pipeline at a time.

Memory is the resident set of this process (the server runs in it, in a thread).
"""

from __future__ import annotations

import gc
import re
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Callable

import dns.message
import dns.rcode

from resolver.config import Listen, TCPConfig, parse_upstream

from .helpers.client import frame, read_frame
from .helpers.fakeupstream import Behaviour, FakeUpstream
from .helpers.memory import rss
from .helpers.server import RunningServer
from .helpers.wait import wait_until

MiB = 1024 * 1024


def metric(running: RunningServer, name: str, labels: str = "") -> float:
    """One sample from the server's /metrics (``labels`` as written there, or none)."""
    port = running.server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    series = f"{name}{{{labels}}}" if labels else name
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"no {series} in /metrics"
    return float(match.group(1))


def test_a_client_that_never_reads_cannot_grow_the_server(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream
) -> None:
    # A ~16 KB answer, cached, and a blocked name: both answered at once, never forwarded.
    upstream.records[("large.test", "TXT")] = [f'"{i:03d}{"y" * 240}"' for i in range(64)]
    running = make_server(
        tcp=TCPConfig(idle_timeout=1.0), metrics=Listen("127.0.0.1", 0), upstream_timeout=2.0
    )
    warm = running.query("large.test", "TXT", tcp=True)
    assert len(warm.to_wire()) > 15_000
    queries = [frame("large.test", "TXT", 1), frame("deepseek.com", "A", 2)]
    gc.collect()
    before = rss()

    # Pipeline up to 8,000 queries (about 64 MB of answers, 0.25 MB sent) for at most 5 s,
    # reading nothing; the receive buffer is kept small so that the kernel holds little.
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect((running.host, running.port))
    client.setblocking(False)
    # In small sends, as a client writing query after query does: one large send would
    # arrive as one read.
    chunk = b"".join(queries) * 25
    to_send = 160 * len(chunk)
    sent = 0
    view = memoryview(chunk)
    offset = 0
    started = time.monotonic()
    while sent < to_send and time.monotonic() - started < 5.0:
        try:
            n = client.send(view[offset:])
        except BlockingIOError:
            time.sleep(0.01)  # the server stopped reading: its own buffers fill
            continue
        sent += n
        offset = (offset + n) % len(chunk)
        time.sleep(0.002)
    time.sleep(0.5)  # let the server work through what it has read
    grown = rss() - before
    assert grown < 20 * MiB, f"the server grew by {grown / MiB:.1f} MiB"
    assert metric(running, "resolver_tcp_read_pauses_total", 'reason="output"') >= 1

    # The client goes quiet, still not reading: within the idle timeout (and a margin for
    # a loaded machine) the connection is aborted, not left waiting for a flush.
    assert wait_until(lambda: not running.server.connections.open, 5.0)
    assert metric(running, "resolver_tcp_connections_aborted_total", 'reason="stalled"') == 1
    assert metric(running, "resolver_tcp_connections") == 0
    client.close()
    # And the server still answers.
    assert running.query("large.test", "TXT", tcp=True).rcode() == dns.rcode.NOERROR


def test_busy_connections_do_not_lock_new_clients_out(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream
) -> None:
    cap = 10
    upstream.default = Behaviour(mode="drop")  # every forwarded query hangs to the deadline
    running = make_server(
        tcp=TCPConfig(max_connections=cap, max_connections_per_client=0, idle_timeout=30),
        metrics=Listen("127.0.0.1", 0),
        upstream_timeout=3.0,
        upstream_deadline=6.0,
    )
    registry = running.server.connections
    busy = []
    try:
        for index in range(cap):
            sock = socket.create_connection((running.host, running.port), timeout=5)
            sock.sendall(frame(f"slow{index}.test", "A", index))
            busy.append(sock)
        assert wait_until(
            lambda: len(registry.open) == cap and all(c.pending for c in registry.open), 3.0
        )
        answered = 0
        for index in range(15):
            source = f"127.0.0.{10 + index}"
            with socket.create_connection(
                (running.host, running.port), timeout=3, source_address=(source, 0)
            ) as sock:
                sock.sendall(frame("deepseek.com", "A", 1000 + index))
                if read_frame(sock).rcode() == dns.rcode.NXDOMAIN:
                    answered += 1
        assert answered == 15
        assert metric(running, "resolver_tcp_connections_evicted_total", 'reason="busy"') >= 1
        assert len(registry.open) <= cap
    finally:
        for sock in busy:
            sock.close()


def test_one_client_cannot_take_every_connection(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream
) -> None:
    upstream.default = Behaviour(mode="drop")
    running = make_server(
        tcp=TCPConfig(max_connections=20, max_connections_per_client=4, idle_timeout=30),
        metrics=Listen("127.0.0.1", 0),
        upstream_timeout=3.0,
        upstream_deadline=6.0,
    )
    registry = running.server.connections
    hog = []
    try:
        for index in range(10):
            sock = socket.create_connection(
                (running.host, running.port), timeout=5, source_address=("127.0.0.2", 0)
            )
            sock.sendall(frame(f"slow{index}.test", "A", index))
            hog.append(sock)
            # One at a time, so that the server has seen each before the next arrives.
            assert wait_until(lambda n=index: len(registry.open) == min(n + 1, 4), 3.0)
        assert len(registry.by_client["127.0.0.2"]) == 4
        with socket.create_connection(
            (running.host, running.port), timeout=3, source_address=("127.0.0.3", 0)
        ) as sock:
            sock.sendall(frame("deepseek.com", "A", 99))
            assert read_frame(sock).rcode() == dns.rcode.NXDOMAIN
        evicted = "resolver_tcp_connections_evicted_total"
        assert metric(running, evicted, 'reason="client_limit"') == 6
        assert metric(running, evicted, 'reason="busy"') == 0
    finally:
        for sock in hog:
            sock.close()


def test_twenty_thousand_frames_in_one_send_are_all_answered(
    make_server: Callable[..., RunningServer],
) -> None:
    running = make_server(tcp=TCPConfig(max_pipeline=100), metrics=Listen("127.0.0.1", 0))
    total = 20_000
    one = frame("deepseek.com", "A", 0)
    burst = b"".join(one[:2] + struct.pack("!H", i) + one[4:] for i in range(total))
    seen: set[int] = set()
    with socket.create_connection((running.host, running.port), timeout=10) as sock:
        sender = threading.Thread(target=sock.sendall, args=(burst,), daemon=True)
        sender.start()
        data = bytearray()
        deadline = time.monotonic() + 20
        while len(seen) < total and time.monotonic() < deadline:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break  # closed by the server
            data += chunk
            while len(data) >= 2:
                end = 2 + ((data[0] << 8) | data[1])
                if len(data) < end:
                    break
                seen.add((data[2] << 8) | data[3])
                del data[:end]
        sender.join(5)
    assert len(seen) == total
    # Answered a pipeline at a time, with reading paused in between.
    assert metric(running, "resolver_tcp_read_pauses_total", 'reason="pipeline"') >= 1


class BigAnswers:
    """An upstream that answers every question with the same ~60 KB TXT set, fast: over
    UDP it says TC, over TCP it sends a wire answer built once (dnspython building 60 KB
    per query in this process would starve the server of the GIL)."""

    def __init__(self) -> None:
        template = dns.message.make_query("large000.test", "TXT")
        response = dns.message.make_response(template)
        texts = [f'"{i:03d}{"z" * 240}"' for i in range(250)]
        response.answer.append(dns.rrset.from_text_list("large000.test.", 300, "IN", "TXT", texts))
        self.wire = response.to_wire(max_size=65535)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.port = self.udp.getsockname()[1]
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", self.port))
        self.tcp.listen(256)
        self.stop = threading.Event()
        for target in (self._udp, self._accept):
            threading.Thread(target=target, daemon=True).start()

    def answer(self, query: bytes) -> bytes:
        # Same-length names: the question's name is patched in, the ID copied over.
        name = query[13:21]
        return query[:2] + self.wire[2:13] + name + self.wire[21:]

    def _udp(self) -> None:
        self.udp.settimeout(0.2)
        while not self.stop.is_set():
            try:
                query, addr = self.udp.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            header = bytearray(query[:12])
            header[2] |= 0x82  # QR, TC
            struct.pack_into("!HHH", header, 6, 0, 0, 0)
            header[11] = 0  # no OPT echoed: the question only
            end = 12 + query[12:].index(b"\0") + 5
            self.udp.sendto(bytes(header) + query[12:end], addr)

    def _accept(self) -> None:
        self.tcp.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                while True:
                    head = conn.recv(2, socket.MSG_WAITALL)
                    if len(head) < 2:
                        return
                    query = conn.recv(struct.unpack("!H", head)[0], socket.MSG_WAITALL)
                    wire = self.answer(query)
                    conn.sendall(struct.pack("!H", len(wire)) + wire)
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.udp.close()
        self.tcp.close()


def test_answers_arriving_while_reading_is_paused_get_the_connection_aborted(
    make_server: Callable[..., RunningServer],
) -> None:
    # Reading pauses at tcp.max_output, but answers already asked of the upstream still
    # arrive: a client that asks a pipeline of large uncached answers and never reads
    # would have them queue in full. Past 4 x max_output the connection is aborted.
    # The kernel's send buffer on loopback takes a few MB before asyncio holds anything,
    # so the answers total 12 MB: 200 of ~60 KB.
    big = BigAnswers()
    names = [f"large{i:03d}.test" for i in range(200)]
    try:
        running = make_server(
            upstreams=(parse_upstream(f"127.0.0.1:{big.port}"),),
            tcp=TCPConfig(max_output=8192, max_pipeline=250, idle_timeout=10.0),
            metrics=Listen("127.0.0.1", 0),
            upstream_timeout=3.0,
        )
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect((running.host, running.port))
        client.sendall(b"".join(frame(name, "TXT", i) for i, name in enumerate(names)))
        aborted = 'reason="output"'
        assert wait_until(
            lambda: metric(running, "resolver_tcp_connections_aborted_total", aborted) == 1,
            10.0,
        )
        assert metric(running, "resolver_tcp_read_pauses_total", 'reason="output"') >= 1
        assert wait_until(lambda: not running.server.connections.open, 3.0)
        client.close()
        answer = running.query(names[0], "TXT", tcp=True)
        assert answer.rcode() == dns.rcode.NOERROR and len(answer.answer[0]) == 250
    finally:
        big.close()
