#!/usr/bin/env python3
"""Forwarded misses over each upstream transport: UDP against DNS over TLS (reused).

Starts Unbound on loopback answering a local zone over UDP and over TLS (test
certificate), and the resolver twice: once forwarding over UDP, once over TLS. For each:
the latency of unique names asked one at a time (median and p99, ``--count`` names), and
the throughput of unique names with dnsperf when installed (``--seconds``). DNS over
HTTPS is not implemented yet, so it has no row.

Run: ``python3 bench/upstream_transports.py [--count 500] [--seconds 5]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dns.message
import dns.query

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.realservers import ResolverProcess  # noqa: E402
from tests.test_tls_upstream import TLSServer  # noqa: E402


def latencies(port: int, count: int, prefix: str) -> list[float]:
    out = []
    for index in range(count):
        query = dns.message.make_query(f"{prefix}{index}.dot.test", "A")
        started = time.perf_counter()
        dns.query.udp(query, "127.0.0.1", port=port, timeout=3)
        out.append(time.perf_counter() - started)
    return sorted(out)


def throughput(port: int, seconds: float, prefix: str, folder: Path) -> float | None:
    if not shutil.which("dnsperf"):
        return None
    data = folder / f"{prefix}.txt"
    data.write_text("".join(f"{prefix}{i}.dot.test A\n" for i in range(200_000)))
    out = subprocess.run(
        [
            "dnsperf",
            "-s",
            "127.0.0.1",
            "-p",
            str(port),
            "-d",
            str(data),
            "-l",
            str(seconds),
            "-c",
            "4",
            "-q",
            "100",
            "-n",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    match = re.search(r"Queries per second:\s+([0-9.]+)", out)
    return float(match.group(1)) if match else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="transports-") as tmp:
        folder = Path(tmp)
        (folder / "lists").mkdir()
        server = TLSServer(folder)
        rows = []
        try:
            for name, upstream in (
                ("udp", f"127.0.0.1:{server.plain}"),
                ("tls", f"tls://127.0.0.1:{server.port}#dot.test"),
            ):
                os.environ["SSL_CERT_FILE"] = str(server.cert)
                proc = ResolverProcess(
                    "--listen",
                    "127.0.0.1:0",
                    "--upstream",
                    upstream,
                    "--blocklists",
                    str(folder / "lists"),
                )
                del os.environ["SSL_CERT_FILE"]
                try:
                    lat = latencies(proc.port, args.count, f"l{name}")
                    qps = throughput(proc.port, args.seconds, f"t{name}", folder)
                finally:
                    proc.stop()
                rows.append((name, statistics.median(lat), lat[int(len(lat) * 0.99)], qps))
        finally:
            server.stop()
    print(f"{'upstream':>8}  {'median ms':>9}  {'p99 ms':>7}  {'misses/s':>9}")
    for name, median, p99, qps in rows:
        shown = f"{qps:9,.0f}" if qps is not None else "      n/a"
        print(f"{name:>8}  {median * 1000:9.3f}  {p99 * 1000:7.3f}  {shown}")
    base = rows[0][1]
    print(f"added median latency over TLS: {(rows[1][1] - base) * 1000:+.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
