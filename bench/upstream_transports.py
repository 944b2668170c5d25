#!/usr/bin/env python3
"""Forwarded misses over each upstream transport: UDP against DNS over TLS and DNS over
HTTPS (HTTP/2), each on one reused connection.

Starts Unbound on loopback answering a local zone over UDP, TLS and HTTPS (test
certificate), and the resolver three times: forwarding over UDP, over TLS, over HTTPS. For
each: the latency of unique names asked one at a time (median and p99, ``--count`` names),
and the throughput of unique names with dnsperf when installed (``--seconds``). Unbound
is the peer: its own cost is in every row, so the differences are the transports'.

Run: ``python3 bench/upstream_transports.py [--count 500] [--seconds 5] [--rounds 3]``.
The machine is shared: the resolver's CPU time per forwarded miss (from /proc) is the
figure that contention disturbs least.
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
from typing import NamedTuple

import dns.message
import dns.query

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.realservers import ResolverProcess  # noqa: E402
from tests.test_tls_upstream import TLSServer  # noqa: E402


def latencies(port: int, count: int, prefix: str) -> list[float]:
    # The connection is set up first: what is measured is a reused connection.
    dns.query.udp(dns.message.make_query(f"{prefix}-warm.dot.test", "A"), "127.0.0.1", port=port)
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(server: TLSServer, folder: Path, args: argparse.Namespace, index: int) -> list[Row]:
    rows = []
    for name, upstream in (
        ("udp", f"127.0.0.1:{server.plain}"),
        ("tls", f"tls://127.0.0.1:{server.port}#dot.test"),
        ("https", f"https://127.0.0.1:{server.https}/dns-query#dot.test"),
    ):
        os.environ["SSL_CERT_FILE"] = str(server.cert)
        proc = ResolverProcess(
            "--listen", "127.0.0.1:0", "--upstream", upstream, "--blocklists", str(folder / "lists")
        )
        del os.environ["SSL_CERT_FILE"]
        try:
            cpu = cpu_seconds(proc.proc.pid)
            lat = latencies(proc.port, args.count, f"l{index}{name}")
            cpu = (cpu_seconds(proc.proc.pid) - cpu) / args.count
            qps = throughput(proc.port, args.seconds, f"t{index}{name}", folder)
        finally:
            proc.stop()
        rows.append(Row(name, statistics.median(lat), lat[int(len(lat) * 0.99)], cpu, qps))
    return rows


class Row(NamedTuple):
    name: str
    median: float
    p99: float
    cpu: float  # resolver CPU seconds per forwarded miss (asked one at a time)
    qps: float | None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3, help="the median of rounds is shown")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="transports-") as tmp:
        folder = Path(tmp)
        (folder / "lists").mkdir()
        server = TLSServer(folder)
        try:
            rounds = [one_round(server, folder, args, i) for i in range(args.rounds)]
        finally:
            server.stop()

    def mid(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    rows = [
        Row(
            same[0].name,
            *(mid([getattr(r, f) for r in same]) or 0.0 for f in ("median", "p99", "cpu")),
            mid([r.qps for r in same]),
        )
        for same in zip(*rounds, strict=True)
    ]
    print(
        f"median of {args.rounds} rounds: {args.count} names one at a time,"
        f" dnsperf for {args.seconds} s"
    )
    print(f"{'upstream':>8}  {'median ms':>9}  {'p99 ms':>7}  {'CPU us/miss':>11}  {'misses/s':>9}")
    for row in rows:
        shown = f"{row.qps:9,.0f}" if row.qps is not None else "      n/a"
        print(
            f"{row.name:>8}  {row.median * 1000:9.3f}  {row.p99 * 1000:7.3f}"
            f"  {row.cpu * 1e6:11.0f}  {shown}"
        )
    base = rows[0]
    for row in rows[1:]:
        print(
            f"added over {row.name}: latency median {(row.median - base.median) * 1000:+.3f} ms,"
            f" p99 {(row.p99 - base.p99) * 1000:+.3f} ms;"
            f" CPU {(row.cpu - base.cpu) * 1e6:+.0f} us per miss"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
