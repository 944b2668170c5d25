#!/usr/bin/env python3
"""CPU cost of Resolver.handle() per query, in-process, without sockets or an event loop.

Measures the synchronous paths: a blocked name and a cache hit, each first through the
full path (parse, policy, cache, build) with the answer memo cleared before every query,
then through the answer memo (the same query bytes again); then the UDP listeners in front
of it, without sockets, and with real loopback sockets one datagram or 64 per system
call. Run:
``python3 bench/hotpath.py [--count 200000]``. The socket and event-loop share of the cost
is measured by bench/core_bench.py against dnsmasq.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from pathlib import Path
from typing import Any, cast

import dns.message
import dns.rrset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from resolver.core.cache import Cache
from resolver.core.pipeline import Resolver, _cache_key
from resolver.core.wire import parse_query, scan_response
from resolver.policy import load_policy
from resolver.service import udpbatch
from resolver.service.listeners import Tasks, UDPListener
from resolver.upstream.endpoints import Upstream
from resolver.upstream.forwarder import Forwarder

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000)
    args = parser.parse_args()
    resolver = Resolver(
        load_policy(ROOT / "blocklists"), Cache(), Forwarder([Upstream("127.0.0.1", 9)])
    )
    blocked = dns.message.make_query("chat.deepseek.com", "A").to_wire()
    query = dns.message.make_query("www.example.com", "A")
    reply = dns.message.make_response(query)
    reply.answer.append(dns.rrset.from_text("www.example.com.", 300, "IN", "A", "192.0.2.1"))
    parsed = parse_query(query.to_wire())
    wire = reply.to_wire()
    scan = scan_response(wire, query.id, wire[12 : 12 + len(parsed.question)])
    resolver.cache.admit(_cache_key(parsed), scan, time.time(), float("inf"))
    hit = query.to_wire()
    for name, data in (("blocked", blocked), ("cache hit", hit)):
        for memo in (False, True):
            n = args.count
            started = time.perf_counter()
            for _ in range(n):
                if not memo:
                    resolver.memo.dicts[0].clear()
                    resolver.memo.sizes[0] = 0  # (as the memo's bound counts it)
                resolver.handle(data, "127.0.0.1", False)
            per = (time.perf_counter() - started) / n * 1e6
            path = "answer memo" if memo else "full path  "
            print(f"{name:>9} via {path}: {per:5.2f} us/query")
    # The UDP listener in front of it: its fast path answers memo hits without calling
    # handle(); "through handle" is the same listener without it. The socket is a sink,
    # so this is the Python cost alone (best of 5 runs).
    listeners = (
        ("fast path", UDPListener(resolver.handle, Tasks(), resolver)),
        ("through handle", UDPListener(resolver.handle, Tasks())),
    )
    for label, listener in listeners:
        listener.transport = cast(Any, _Open())
        listener._direct = cast(Any, _Sink())
        for name, data in (("blocked", blocked), ("cache hit", hit)):
            best = float("inf")
            for _ in range(5):
                n = args.count
                started = time.perf_counter()
                for _ in range(n):
                    listener.datagram_received(data, ("127.0.0.1", 5300))
                best = min(best, (time.perf_counter() - started) / n * 1e6)
            print(f"{name:>9} via UDP listener, {label}: {best:5.2f} us/query")
    if udpbatch.available():
        asyncio.run(_sockets(resolver, blocked, hit, args.count))
    return 0


async def _sockets(resolver: Resolver, blocked: bytes, hit: bytes, count: int) -> None:
    """The fast path with real loopback sockets, system calls included: one datagram per
    recvfrom and sendto (as the loop's transport reads them), then 64 per recvmmsg and
    sendmmsg (udpbatch). The client's socket holds the answers, drained untimed."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    for sock in (server, client):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    where = server.getsockname()
    single = UDPListener(resolver.handle, Tasks(), resolver)
    single.transport = cast(Any, _Open())
    single._direct = server
    batched = udpbatch.BatchListener(server.dup(), resolver.handle, Tasks(), resolver)
    batch = udpbatch.SLOTS
    rounds = max(1, count // batch // 4)
    client.setblocking(False)

    def one_at_a_time() -> None:
        for _ in range(batch):
            data, addr = server.recvfrom(65535)
            single.datagram_received(data, addr)

    for name, data in (("blocked", blocked), ("cache hit", hit)):
        for label, serve in (("one per call", one_at_a_time), ("64 per call", batched._batches)):
            spent = 0.0
            for _ in range(rounds):
                for _ in range(batch):
                    client.sendto(data, where)
                started = time.perf_counter()
                serve()
                spent += time.perf_counter() - started
                for _ in range(batch):
                    client.recv(65535)
            per = spent / (rounds * batch) * 1e6
            print(f"{name:>9} via loopback socket, {label}: {per:5.2f} us/query")
    batched.close()
    server.close()
    client.close()


class _Open:
    def is_closing(self) -> bool:
        return False


class _Sink:
    def sendto(self, data: bytes, addr: object) -> None:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
