#!/usr/bin/env python3
"""The cache and the garbage collector: how long a full collection stalls the event loop
with N cached entries, and the memory each entry takes.

The cache keeps entries packed in bytes in plain dicts (resolver/core/cache.py), which the
collector does not track. The peer, in the same run, is the layout it replaced: the same
entries as Entry objects in OrderedDict shards. Run:
``python3 bench/cache_gc.py [--entries 100000,1000000]``. Each size runs in a fresh process.

Then, under load (``--load 1000000``, 0 to skip): a real Resolver, settled as the server
settles it once started (server.settle_memory), with that many cached names and both
answer memos full, answers a mix of queries through Resolver.handle: repeats (memo
hits), distinct cached names (the full path, each memoised, evicting older entries) and
distinct blocked names. Every collection the interpreter makes meanwhile is timed (by
``gc.callbacks``), and a full one is made eight times along (the interpreter's own come
rarely once the server raised the young threshold); the figure is the worst full
(generation 2) collection, wall-clock and CPU of this thread (the wall-clock time also
holds whatever else the machine ran meanwhile). Issue 17
item 26's target: no pause over 10 ms with a 1,000,000-entry cache.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _one(layout: str, entries: int) -> dict[str, float]:
    import dns.message
    import dns.rrset

    from resolver.core.cache import Cache, Entry, shard_count
    from resolver.core.wire import scan_response

    query = dns.message.make_query("www.example.test", "A")
    reply = dns.message.make_response(query)
    reply.answer.append(dns.rrset.from_text("www.example.test.", 300, "IN", "A", "192.0.2.1"))
    reply.authority.append(dns.rrset.from_text("example.test.", 300, "IN", "NS", "ns.example."))
    wire = reply.to_wire()
    question = wire[12 : 12 + len(query.question[0].name.to_wire() or b"") + 4]
    scan = scan_response(wire, query.id, question)
    scan.source = "127.0.0.1:53"
    gc.collect()
    before = _rss_kib()
    started = time.perf_counter()
    if layout == "packed":
        cache = Cache(max_entries=entries)
        for i in range(entries):
            cache.admit(b"\x01x" + i.to_bytes(4, "big") + b"\x04test\x00\x00\x01", scan, 1e3, 1e12)
        keep: object = cache
    else:
        count = shard_count(entries)
        shards: list[OrderedDict[bytes, Entry]] = [OrderedDict() for _ in range(count)]
        for i in range(entries):
            key = b"\x01x" + i.to_bytes(4, "big") + b"\x04test\x00\x00\x01"
            shards[hash(key) & (count - 1)][key] = Entry(scan, 1e3, 1e12)
        keep = shards
    fill = time.perf_counter() - started
    gc.collect()
    pauses = []
    for _ in range(3):
        started = time.perf_counter()
        gc.collect()
        pauses.append(time.perf_counter() - started)
    rss = _rss_kib() - before
    del keep
    return {
        "full_gc_ms": min(pauses) * 1000,
        "bytes_per_entry": rss * 1024 / entries,
        "fill_us_per_entry": fill / entries * 1e6,
    }


def _under_load(entries: int, queries: int) -> dict[str, float]:
    """See the module docstring: the worst collection pause while answering."""
    import dns.message
    import dns.rrset

    from resolver.core.cache import Cache
    from resolver.core.pipeline import Resolver, _cache_key
    from resolver.core.wire import parse_query, scan_response
    from resolver.policy import load_policy
    from resolver.service.server import settle_memory
    from resolver.upstream.endpoints import Upstream
    from resolver.upstream.forwarder import Forwarder

    root = Path(__file__).resolve().parent.parent
    resolver = Resolver(
        load_policy(root / "blocklists"),
        Cache(max_entries=entries + entries // 4),  # room: shards fill unevenly
        Forwarder([Upstream("127.0.0.1", 9)]),
    )
    settle_memory(resolver)  # as the server does once started: start-up objects frozen
    tag = b"n0000000"
    query = dns.message.make_query(tag.decode() + ".example.test", "A")
    query.id = 7
    reply = dns.message.make_response(query)
    reply.answer.append(dns.rrset.from_text(query.question[0].name, 86400, "IN", "A", "192.0.2.1"))
    query_wire, reply_wire = query.to_wire(), reply.to_wire()
    blocked_wire = dns.message.make_query("n0000000.deepseek.com", "A").to_wire()
    now = time.time()
    started = time.perf_counter()
    for i in range(entries):
        name = b"n%07d" % i
        wire = reply_wire.replace(tag, name)
        parsed = parse_query(query_wire.replace(tag, name))
        scan = scan_response(wire, 7, wire[12 : 12 + len(parsed.question)])
        scan.source = "127.0.0.1:53"
        resolver.cache.admit(_cache_key(parsed), scan, now, now + 86400)  # (a slow fill)
    fill = time.perf_counter() - started

    def ask(i: int, tcp: bool) -> None:
        resolver.handle(query_wire.replace(tag, b"n%07d" % (i % entries)), "127.0.0.1", tcp)

    # Both memos full: distinct cached names over UDP and TCP, as many as they keep.
    memo_cap = 2 * 50_000
    for i in range(memo_cap):
        ask(i, i % 2 == 1)
    memo_entries = sum(len(memo) for memo in resolver.memo.dicts)
    pauses: list[tuple[int, float, float]] = []
    begun = [0.0, 0.0]

    def timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            begun[0], begun[1] = time.perf_counter(), time.thread_time()
        else:
            wall, cpu = time.perf_counter() - begun[0], time.thread_time() - begun[1]
            pauses.append((info["generation"], wall, cpu))

    gc.callbacks.append(timer)
    started = time.perf_counter()
    worst_query = 0.0
    # The interpreter's own full collections come rarely (settle_memory raised the young
    # threshold), so a full one is also made eight times along: what one costs then.
    every = max(1, queries // 8)
    forced: list[tuple[float, float, int]] = []
    try:
        for i in range(queries):
            if i % every == every - 1:
                began, cpu = time.perf_counter(), time.thread_time()
                gc.collect()
                held = sum(len(memo) for memo in resolver.memo.dicts)
                forced.append((time.perf_counter() - began, time.thread_time() - cpu, held))
            before = time.perf_counter()
            kind = i % 4
            if kind == 0:
                ask(i % 100, False)  # repeats: memo hits
            elif kind == 1:
                ask(memo_cap + i, i % 8 == 1)  # distinct cached names: full path, memoised
            elif kind == 2:
                name = b"n%07d" % i
                resolver.handle(blocked_wire.replace(tag, name), "127.0.0.1", False)
            else:
                ask(i % 100, True)
            worst_query = max(worst_query, time.perf_counter() - before)
    finally:
        gc.callbacks.remove(timer)
    elapsed = time.perf_counter() - started
    full = [p for p in pauses if p[0] == 2]
    return {
        "cache_entries": len(resolver.cache),
        "memo_entries": memo_entries,
        "fill_s": fill,
        "queries_per_s": queries / elapsed,
        "collections": len(pauses),
        "full_collections": len(full),
        "worst_full_ms": max((p[1] for p in full), default=0.0) * 1000,
        "worst_full_cpu_ms": max((p[2] for p in full), default=0.0) * 1000,
        "worst_any_ms": max((p[1] for p in pauses), default=0.0) * 1000,
        "worst_query_ms": worst_query * 1000,
        "forced_full_ms": max(f[0] for f in forced) * 1000,
        "forced_full_cpu_ms": max(f[1] for f in forced) * 1000,
        "forced_memo_entries": min(f[2] for f in forced),
        "tracked_objects": len(gc.get_objects()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", default="100000,1000000", help="'' to skip")
    parser.add_argument(
        "--load", type=int, default=1_000_000, help="cached entries under load (0: skip)"
    )
    parser.add_argument("--queries", type=int, default=400_000, help="queries under load")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--one-load", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one[0], int(args.one[1]))))
        return 0
    if args.one_load:
        print(json.dumps(_under_load(args.one_load, args.queries)))
        return 0
    print(f"{'entries':>9}  {'layout':<24} {'full GC ms':>10} {'B/entry':>8} {'fill us':>8}")
    for entries in (int(n) for n in args.entries.split(",") if n):
        rows = {}
        for layout in ("packed", "objects"):
            out = subprocess.run(
                [sys.executable, __file__, "--one", layout, str(entries)],
                capture_output=True,
                text=True,
                check=True,
                timeout=600,
            )
            rows[layout] = json.loads(out.stdout)
        for layout, name in (
            ("packed", "bytes in dicts (now)"),
            ("objects", "Entry in OrderedDict"),
        ):
            r = rows[layout]
            print(
                f"{entries:>9,}  {name:<24} {r['full_gc_ms']:>10.1f} "
                f"{r['bytes_per_entry']:>8.0f} {r['fill_us_per_entry']:>8.2f}"
            )
        ratio = rows["objects"]["full_gc_ms"] / max(rows["packed"]["full_gc_ms"], 1e-3)
        print(f"{'':>9}  full-collection pause: {ratio:,.0f}x shorter now")
    if args.load:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one-load",
                str(args.load),
                "--queries",
                str(args.queries),
            ],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(out.stdout)
        print(
            f"\nunder load: {r['cache_entries']:,} cached entries, {r['memo_entries']:,} memo "
            f"entries, {args.queries:,} queries ({r['queries_per_s']:,.0f}/s)"
        )
        print(
            f"  collections: {r['collections']:,}, of them full: {r['full_collections']:,}; "
            f"worst full: {r['worst_full_ms']:.1f} ms ({r['worst_full_cpu_ms']:.1f} ms CPU); "
            f"worst of any: {r['worst_any_ms']:.1f} ms"
        )
        print(
            f"  worst of 8 full collections made along: {r['forced_full_ms']:.1f} ms "
            f"({r['forced_full_cpu_ms']:.1f} ms CPU; memo entries then: "
            f"{r['forced_memo_entries']:,} or more)"
        )
        print(
            f"  worst query: {r['worst_query_ms']:.1f} ms (collections included); objects "
            f"tracked at the end (not frozen): {r['tracked_objects']:,}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
