#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris) of everything that reads bytes from the network.

Three targets, chosen by the first input byte: the query parser, the upstream-reply
scanner (against a fixed question), and the whole synchronous query path
(Resolver.handle with the shipped policy and a cache). The only exceptions allowed out
are the wire module's own (Unanswerable, FormatError, Mismatch); anything else is a bug.

Run: ``python3 fuzz/fuzz_wire.py fuzz/corpus -max_total_time=60`` (libFuzzer flags).
The seed corpus holds real queries and replies; CI runs it for a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path

import atheris

with atheris.instrument_imports():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from resolver.core import wire
    from resolver.core.cache import Cache
    from resolver.core.pending import Pending
    from resolver.core.pipeline import Resolver
    from resolver.policy import load_policy
    from resolver.upstream.endpoints import Upstream
    from resolver.upstream.forwarder import Forwarder

ROOT = Path(__file__).resolve().parent.parent
QUESTION = b"\x07example\x04test\x00\x00\x01\x00\x01"
# Forwarding is not fuzzed here, and nothing leaves the machine: the upstream is the
# broadcast address, which a UDP socket without SO_BROADCAST may not connect to (EACCES), so
# every exchange fails at once and a miss is answered SERVFAIL through the same code that
# answers a real reply. (Not a replaced method: the compiled build's classes forbid that.)
RESOLVER = Resolver(
    load_policy(ROOT / "blocklists"),
    Cache(1000),
    Forwarder([Upstream("255.255.255.255", 9)], timeout=0.5, deadline=0.5),
)
LOOP = asyncio.new_event_loop()


async def _handle(body: bytes, tcp: bool) -> None:
    result = RESOLVER.handle(body, "127.0.0.1", tcp)
    if isinstance(result, Pending):
        # A miss: its second attempt runs in a task, done within a few turns of the loop.
        for _ in range(10):
            if result.done():
                break
            await asyncio.sleep(0)
        assert result.done()
        if result.error is not None:
            raise result.error  # an exception from the answer path is a bug


def one_input(data: bytes) -> None:
    if not data:
        return
    target, body = data[0] % 3, data[1:]
    if target == 0:
        with contextlib.suppress(wire.Unanswerable, wire.FormatError):
            wire.parse_query(body)
    elif target == 1:
        qid = int.from_bytes(body[:2], "big") if len(body) >= 2 else 0
        try:
            scan = wire.scan_response(body, qid, QUESTION)
        except (wire.Mismatch, wire.FormatError):
            return
        # What the scanner accepted must be servable from the cache.
        entry = RESOLVER.cache.admit(b"k", scan, time.time(), float("inf"))
        entry.records(time.time())
    else:
        LOOP.run_until_complete(_handle(body, bool(data[0] & 4)))


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
