#!/usr/bin/env python3
"""Query store benchmark: rows per second into SQLite and PostgreSQL while the resolver
answers, and what the store costs the query path.

    python3 bench/store.py                  # ~4 min
    python3 bench/store.py --rounds 3 --duration 10 --json store.json

Setup (as bench/core_bench.py): NSD serves the generated zone on loopback, the resolver
(``python -m resolver serve`` from this checkout) forwards to it, with ``audit: log: all``
so that every query is a record. Variants, one resolver process each:

* ``off``        -- no audit sink at all (the baseline);
* ``jsonl``      -- the JSON-lines file log, for comparison with the sink operators run today;
* ``sqlite``     -- the query store in a SQLite file (no JSON log);
* ``postgresql`` -- the query store in a throwaway PostgreSQL cluster (initdb, pg_ctl, a
  unix socket in a temporary folder), skipped when the binaries or psycopg are absent;
* ``jsonl+sqlite`` -- both sinks: against ``jsonl``, what adding the store costs when the
  records are produced anyway (with ``log: all`` every answer is a record, and a record
  is never answered from the listeners' memo fast path: that cost is the audit log's,
  ``jsonl`` against ``off`` shows it).

Per variant and round, two dnsperf runs over 100 warmed zone names (cache hits, the
resolver's normal traffic at its highest rate):

* ``max``  -- as fast as dnsperf goes for ``--duration`` seconds: qps, the CPU per query of
  the event-loop thread (``/proc/PID/task/PID/stat``: the query path) and of the whole
  process (the writer thread included), and the rows the store wrote per second during
  the run and until its queue drained, with drops;
* ``rate`` -- at ``--rate`` queries per second (``dnsperf -Q``): rows per second sustained
  with no drop, the answer rate a deployment of that size would see.

The figures: rows/s per store, and query-path CPU per query with the store on against
``off`` (target: under 5% more). Medians over the rounds; compare only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import core_bench as cb

from tests.helpers import postgres

HIT_SET = 100
VARIANTS = ("off", "jsonl", "sqlite", "postgresql", "jsonl+sqlite")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class StoreResolver(cb.Resolver):
    """The resolver with one audit variant and /metrics on a port of its own."""

    variant = "off"
    dsn = ""

    def command(self) -> tuple[list[str], Path, dict[str, str] | None]:
        argv, cwd, env = super().command()
        conf = self.dir / "resolver.yaml"
        jsonl = f"audit:\n  sink: file\n  log: all\n  path: {self.dir / 'audit.jsonl'}\n"
        sqlite = f"store:\n  kind: sqlite\n  path: {self.dir / 'queries.sqlite3'}\n"
        extra = {
            "off": "",
            "jsonl": jsonl,
            "sqlite": "audit:\n  log: all\n" + sqlite,
            "postgresql": f"audit:\n  log: all\nstore:\n  kind: postgresql\n  dsn: '{self.dsn}'\n",
            "jsonl+sqlite": jsonl + sqlite,
        }[self.variant]
        conf.write_text(conf.read_text() + extra)
        self.metrics_port = cb.free_port(self.ctx.ports)
        return [*argv, "--metrics", f"{cb.LOOPBACK}:{self.metrics_port}"], cwd, env

    def metric(self, name: str) -> float:
        url = f"http://{cb.LOOPBACK}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        total = 0.0
        for line in text.splitlines():
            if re.match(rf"{re.escape(name)}(\{{| )", line):
                total += float(line.rsplit(" ", 1)[1])
        return total


def thread_cpu(pid: int) -> float:
    """CPU seconds of the process's main thread (the event loop: the query path)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run(
    server: StoreResolver, datafile: Path, opts: cb.DnsperfOptions, rate: int
) -> dict[str, Any]:
    """One dnsperf run, with the CPU and the store's rows around it."""
    rows0 = server.metric("resolver_store_rows_total")
    drops0 = server.metric("resolver_store_dropped_total")
    loop0, proc0 = thread_cpu(server.pid), server.cpu_seconds()
    started = time.monotonic()
    stats = cb.run_dnsperf(server.port, datafile, opts, loop=True, rate=rate)
    elapsed = time.monotonic() - started
    loop1, proc1 = thread_cpu(server.pid), server.cpu_seconds()
    rows_during = server.metric("resolver_store_rows_total") - rows0
    # Let the writer drain its queue (bounded wait), to count what it wrote in all.
    deadline = time.monotonic() + 60
    while server.metric("resolver_store_queue") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    drained = time.monotonic() - started
    rows = server.metric("resolver_store_rows_total") - rows0
    done = max(stats.completed, 1)
    return {
        "qps": round(stats.qps),
        "lost_pct": stats.lost_pct,
        "loop_cpu_us_per_query": round((loop1 - loop0) / done * 1e6, 3),
        "process_cpu_us_per_query": round((proc1 - proc0) / done * 1e6, 3),
        "rows_per_s_during": round(rows_during / elapsed),
        "rows_per_s_until_drained": round(rows / drained),
        "rows": int(rows),
        "dropped": int(server.metric("resolver_store_dropped_total") - drops0),
    }


def measure(
    variant: str, ctx: cb.BenchContext, dsn: str, args: argparse.Namespace
) -> dict[str, Any]:
    server = StoreResolver(ctx)
    server.name = f"resolver-{variant}"
    server.dir = ctx.workdir / server.name
    server.dir.mkdir(parents=True, exist_ok=True)
    server.variant, server.dsn = variant, dsn
    hits = ctx.workdir / "hits.txt"
    opts = cb.DnsperfOptions(args.duration, args.clients, 100, 5)
    try:
        server.start()
        cb.run_dnsperf(server.port, hits, cb.DnsperfOptions(1, 1, 10, 5), loop=False)  # warm
        result = {"max": run(server, hits, opts, 0), "rate": run(server, hits, opts, args.rate)}
    finally:
        server.stop()
    cb.log(f"{variant}: {json.dumps(result)}")
    return result


def median(rounds: list[dict[str, Any]], run_name: str, key: str) -> float:
    return float(statistics.median(r[run_name][key] for r in rounds))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=int, default=8, help="seconds per dnsperf run (8)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every variant (3)")
    ap.add_argument("--clients", type=int, default=8, help="dnsperf clients (8)")
    ap.add_argument("--rate", type=int, default=20_000, help="qps of the fixed-rate run (20000)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    ap.add_argument("--json", help="write the results to this file")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    for tool in ("nsd", "dnsperf"):
        if shutil.which(tool) is None:
            print(f"error: {tool} not installed (apt-get install -y {tool})", file=sys.stderr)
            return 2
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # the PostgreSQL cluster may run as the postgres user
        ctx = cb.BenchContext(workdir=work, upstream_port=0, blocked=[cb.blocked_name(0)])
        nsd = cb.NsdUpstream(ctx, HIT_SET + 10)
        ctx.upstream_port = nsd.port
        (work / "hits.txt").write_text("".join(f"{cb.zone_name(i)} A\n" for i in range(HIT_SET)))
        cluster = None
        results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        try:
            nsd.start()
            if "postgresql" in variants:
                bin_dir = postgres.binaries()
                if bin_dir is None:
                    cb.log("postgresql: skipped (no /usr/lib/postgresql/*/bin)")
                    variants.remove("postgresql")
                else:
                    folder = work / "pg"
                    folder.mkdir()
                    cluster = postgres.Cluster(folder, bin_dir)
                    cluster.start()
            for _ in range(args.rounds):
                for variant in variants:
                    dsn = cluster.dsn if cluster is not None else ""
                    results[variant].append(measure(variant, ctx, dsn, args))
        finally:
            if cluster is not None:
                cluster.stop()
            nsd.stop()
    report(results, args)
    return 0


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    def loop_cpu(variant: str) -> float | None:
        rounds = results.get(variant)
        return median(rounds, "max", "loop_cpu_us_per_query") if rounds else None

    base, jsonl = loop_cpu("off"), loop_cpu("jsonl")
    print(f"\nmedians of {args.rounds} rounds, {args.duration} s runs, cache hits, audit log: all")
    head = ("variant", "qps max", "loop us/q", "vs off", "vs jsonl", "proc us/q", "rows/s max",
            "rows/s drained", "dropped", f"rows/s @{args.rate}", "dropped@rate")  # fmt: skip
    print("  ".join(f"{h:>14}" for h in head))
    for variant, rounds in results.items():
        if not rounds:
            continue
        loop = median(rounds, "max", "loop_cpu_us_per_query")
        delta = f"{(loop / base - 1) * 100:+.1f}%" if base else "-"
        vs_jsonl = f"{(loop / jsonl - 1) * 100:+.1f}%" if jsonl and variant != "off" else "-"
        cells = (variant, f"{median(rounds, 'max', 'qps'):,.0f}", f"{loop:.2f}", delta, vs_jsonl,
                 f"{median(rounds, 'max', 'process_cpu_us_per_query'):.2f}",
                 f"{median(rounds, 'max', 'rows_per_s_during'):,.0f}",
                 f"{median(rounds, 'max', 'rows_per_s_until_drained'):,.0f}",
                 f"{median(rounds, 'max', 'dropped'):,.0f}",
                 f"{median(rounds, 'rate', 'rows_per_s_during'):,.0f}",
                 f"{median(rounds, 'rate', 'dropped'):,.0f}")  # fmt: skip
        print("  ".join(f"{c:>14}" for c in cells))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
