#!/usr/bin/env python3
"""DNS over QUIC against plain TCP, the same resolver in the same run: server CPU per query.

    python3 bench/doq.py                 # 20000 queries a round, 3 rounds each
    python3 bench/doq.py --queries 5000 --rounds 1

Starts ``python -m resolver serve`` from this checkout with a throwaway certificate, DoQ and
TCP on free loopback ports, and sends queries for a blocked name (answered locally, so the
transport is what is measured) over one connection, 50 in flight: DoQ with aioquic's
client, one query per stream; TCP pipelined. Reports queries per second and the server's
CPU per query (utime + stime of its process, /proc), and the ratio DoQ / TCP. No DoQ peer
is installed here (Unbound serves no DoQ), so TCP is the reference. Needs aioquic (the
quic extra) and openssl.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dns.message

ROOT = Path(__file__).resolve().parent.parent
IN_FLIGHT = 50
HZ = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        return int(udp.getsockname()[1])


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def framed_query() -> bytes:
    query = dns.message.make_query("deepseek.com", "A")
    query.id = 0
    wire = query.to_wire()
    return struct.pack("!H", len(wire)) + wire


def run_tcp(port: int, pid: int, count: int) -> tuple[float, float]:
    frame = framed_query()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        got = sent = 0
        buf = b""
        began, cpu0 = time.perf_counter(), cpu(pid)
        while got < count:
            batch = min(IN_FLIGHT - (sent - got), count - sent)
            if batch:
                sock.sendall(frame * batch)
                sent += batch
            buf += sock.recv(65536)
            while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                buf = buf[2 + struct.unpack("!H", buf[:2])[0] :]
                got += 1
        return time.perf_counter() - began, cpu(pid) - cpu0


async def run_doq(port: int, pid: int, count: int) -> tuple[float, float]:
    from aioquic.asyncio import connect
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import QuicEvent, StreamDataReceived

    class Client(QuicConnectionProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.answered = 0
            self.event = asyncio.Event()

        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, StreamDataReceived) and event.end_stream:
                self.answered += 1
                self.event.set()

    frame = framed_query()
    config = QuicConfiguration(alpn_protocols=["doq"], is_client=True, verify_mode=0)
    async with connect("127.0.0.1", port, configuration=config, create_protocol=Client) as c:
        assert isinstance(c, Client)
        sent = 0
        began, cpu0 = time.perf_counter(), cpu(pid)
        while c.answered < count:
            while sent < count and sent - c.answered < IN_FLIGHT:
                stream = c._quic.get_next_available_stream_id()
                c._quic.send_stream_data(stream, frame, end_stream=True)
                sent += 1
            c.transmit()
            c.event.clear()
            await asyncio.wait_for(c.event.wait(), 10)
        return time.perf_counter() - began, cpu(pid) - cpu0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=dns.bench",
             "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        dns_port, doq_port = free_port(), free_port()
        (folder / "resolver.yaml").write_text(
            f"listen: [127.0.0.1:{dns_port}]\nupstreams: [127.0.0.1:9]\n"
            f"blocklists: {ROOT / 'blocklists'}\n"
            "tls: {cert: cert.pem, key: key.pem}\n"
            f"doq: {{listen: [127.0.0.1:{doq_port}]}}\nlog_level: warning\n"
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        server = subprocess.Popen(
            [sys.executable, "-m", "resolver", "serve", "--config", str(folder / "resolver.yaml")],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(3)
            if server.poll() is not None:
                print(server.stderr.read() if server.stderr else "", file=sys.stderr)
                return 1
            results: dict[str, list[float]] = {"tcp": [], "doq": []}
            for round_ in range(args.rounds):
                for name in ("tcp", "doq"):
                    if name == "tcp":
                        wall, used = run_tcp(dns_port, server.pid, args.queries)
                    else:
                        wall, used = asyncio.run(run_doq(doq_port, server.pid, args.queries))
                    per_query = used / args.queries * 1e6
                    results[name].append(per_query)
                    print(
                        f"{name} round {round_ + 1}: {args.queries / wall:8.0f} q/s, "
                        f"server CPU {per_query:6.1f} us/query"
                    )
            tcp, doq = (statistics.median(results[n]) for n in ("tcp", "doq"))
            print(f"median server CPU per query: tcp {tcp:.1f} us, doq {doq:.1f} us, "
                  f"doq/tcp {doq / tcp:.1f}x")  # fmt: skip
        finally:
            server.terminate()
            server.wait(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
