#!/usr/bin/env python3
"""The cache and the garbage collector: how long a full collection stalls the event loop
with N cached entries, and the memory each entry takes.

The cache keeps entries packed in bytes in plain dicts (resolver/cache.py), which the
collector does not track. The peer, in the same run, is the layout it replaced: the same
entries as Entry objects in OrderedDict shards. Run:
``python3 bench/cache_gc.py [--entries 100000,1000000]``. Each size runs in a fresh process.
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

    from resolver.cache import Cache, Entry, shard_count
    from resolver.wire import scan_response

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", default="100000,1000000")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one[0], int(args.one[1]))))
        return 0
    print(f"{'entries':>9}  {'layout':<24} {'full GC ms':>10} {'B/entry':>8} {'fill us':>8}")
    for entries in (int(n) for n in args.entries.split(",")):
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
