#!/usr/bin/env python3
"""User-space instructions per query, counted by Valgrind (callgrind): a steady figure for
comparing two builds of the resolver's hot paths on a noisy machine.

Timing on the shared 2-core VM varies by 20% from one run to the next; instruction counts
of the same build repeat to within about 1%.  This benchmark runs the resolver under
``valgrind --tool=callgrind --instr-atstart=no`` against NSD, and for each workload turns
the counting on, sends a fixed set of queries with dnsperf, turns it off and reads the
total.  The figure is the resolver's own work per query in user space (interpreter,
libraries, system-call wrappers); the time spent inside the kernel is not counted (see
``core_bench.py``'s ``sys`` share for that).

Workloads (each query answered once; the set is sent with ``dnsperf -n 1``):

* ``blocked``   -- one blocked name asked again and again (the answer memo's fast path)
* ``hits``      -- 100 warmed zone names asked again and again (the memo's fast path)
* ``distinct``  -- distinct blocked names (the full path: parse, policy, build)
* ``misses``    -- never-asked zone names (cache miss, forwarded to NSD)

Usage::

    python3 bench/instructions.py                      # 3,000 queries a workload, ~20 s
    python3 bench/instructions.py --queries 1000 --workloads misses
    python3 bench/instructions.py --json /tmp/ir.json
    python3 bench/instructions.py --compiled           # the mypyc build (setup.py)
    python3 bench/instructions.py --python-loop        # without the C loop of UDP batches

The C loop (resolver/_fastudp.c, which answers memo hits in UDP batches) runs when it is
built: ``--compiled`` builds it with the rest; for the interpreted build, build it in place
first (``python3 setup.py build_ext --inplace``; the resolver's log says which loop runs).

Needs ``valgrind``, ``nsd`` and ``dnsperf`` (Debian packages of the same names); prints
what to install and exits 2 when one is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import core_bench as cb

TOOLS = {
    "valgrind": "valgrind",
    "callgrind_control": "valgrind",
    "nsd": "nsd",
    "dnsperf": "dnsperf",
}
WORKLOADS = ("blocked", "hits", "distinct", "misses")
HIT_SET = 100
#: Every name once, one client, 10 s before one counts as lost (and, by default, 50
#: outstanding: see --outstanding).
DNSPERF_FLAGS = ("-n", "1", "-c", "1", "-t", "10")


class CountedResolver(cb.Resolver):
    """The resolver under callgrind, counting nothing until told to."""

    name = "resolver-callgrind"
    ready_timeout = 300.0  # the interpreter runs some 50 times slower under Valgrind

    compiled = False
    #: Without the C loop of UDP batches (RESOLVER_FASTUDP=0): the Python one answers.
    python_loop = False

    def command(self) -> tuple[list[str], Path, dict[str, str] | None]:
        argv, cwd, env = super().command()
        if self.python_loop:
            assert env is not None
            env = dict(env, RESOLVER_FASTUDP="0")
        if self.compiled:
            cwd = cb.compiled_tree(self.dir / "tree")
            assert env is not None
            env = dict(env, PYTHONPATH=str(cwd))
        self.out = self.dir / "callgrind.out"
        valgrind = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={self.out}",
        ]
        # The interpreter itself, not a wrapper script that would exec it out of sight.
        return [*valgrind, sys.executable, *argv[1:]], cwd, env

    def control(self, *args: str) -> None:
        subprocess.run(
            ["callgrind_control", *args, str(self.pid)],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def dumps(self) -> list[Path]:
        return sorted(self.dir.glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))


def dnsperf(port: int, names: list[str], path: Path, outstanding: int = 50) -> int:
    """Send every name once (10 s timeout each, ``outstanding`` at a time); the number
    answered."""
    path.write_text("".join(f"{n} A\n" for n in names))
    out = subprocess.run(
        [
            *("dnsperf", "-s", cb.LOOPBACK, "-p", str(port), "-d", str(path)),
            *(*DNSPERF_FLAGS, "-q", str(outstanding)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    return int(cb._grab(r"Queries completed:\s+(\d+)", out) or 0)


def counted(
    server: CountedResolver,
    names: list[str],
    work: Path,
    keep: Path | None = None,
    outstanding: int = 50,
) -> tuple[float, int]:
    """Instructions per answered query while ``names`` are asked; and how many were. The
    profile is copied to ``keep`` when given."""
    server.control("--instr=on")
    answered = dnsperf(server.port, names, work, outstanding)
    server.control("--instr=off")
    before = len(server.dumps())
    server.control("--dump")
    deadline = time.monotonic() + 60
    while len(server.dumps()) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    dump = server.dumps()[-1]
    if keep is not None:
        shutil.copy2(dump, keep)
    text = dump.read_text()
    m = re.search(r"(?m)^totals:\s+(\d+)", text)
    total = int(m.group(1)) if m else 0
    return total / max(answered, 1), answered


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=3000, help="queries per workload")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--resolver-args", default="", help="extra `resolver serve` flags")
    ap.add_argument(
        "--compiled",
        action="store_true",
        help="the build with setup.py's modules compiled by mypyc (needs "
        "pip install '.[fast,compile]' and a C compiler)",
    )
    ap.add_argument(
        "--python-loop",
        action="store_true",
        help="answer UDP batches with the Python loop, not resolver/_fastudp.c",
    )
    ap.add_argument(
        "--outstanding",
        type=int,
        default=50,
        help="queries dnsperf keeps in flight (1: a quiet server, one query an event)",
    )
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument(
        "--keep",
        metavar="DIR",
        help="keep each workload's callgrind profile here (DIR/WORKLOAD.callgrind), "
        "for callgrind_annotate",
    )
    args = ap.parse_args()
    missing = sorted({pkg for tool, pkg in TOOLS.items() if not shutil.which(tool)})
    if missing:
        print(f"error: install {' '.join(missing)} (apt-get install -y ...)", file=sys.stderr)
        return 2
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    n = args.queries
    with tempfile.TemporaryDirectory(prefix="instructions-") as tmp:
        work = Path(tmp)
        ctx = cb.BenchContext(
            workdir=work,
            upstream_port=0,
            blocked=[cb.blocked_name(i) for i in range(n + 1)],
            resolver_args=args.resolver_args.split(),
        )
        nsd = cb.NsdUpstream(ctx, HIT_SET + 2 * n + 10)
        ctx.upstream_port = nsd.port
        server = CountedResolver(ctx)
        server.compiled = args.compiled
        server.python_loop = args.python_loop
        results: dict[str, dict[str, float]] = {}
        try:
            nsd.start()
            server.start()
            # Warm-up, not counted: the hit set in the cache, some misses, some blocks.
            hits = [cb.zone_name(i) for i in range(HIT_SET)]
            dnsperf(
                server.port,
                hits
                + [cb.zone_name(HIT_SET + n + i) for i in range(n // 10)]
                + ctx.blocked[: n // 10],
                work / "warm.txt",
            )
            plans = {
                "blocked": [ctx.blocked[0]] * n,
                "hits": [hits[i % HIT_SET] for i in range(n)],
                "distinct": ctx.blocked[1 : n + 1],
                "misses": [cb.zone_name(HIT_SET + i) for i in range(n)],
            }
            for name in workloads:
                keep = None
                if args.keep:
                    Path(args.keep).mkdir(parents=True, exist_ok=True)
                    keep = Path(args.keep) / f"{name}.callgrind"
                per_query, answered = counted(
                    server, plans[name], work / f"{name}.txt", keep, args.outstanding
                )
                results[name] = {"instructions_per_query": round(per_query), "answered": answered}
                cb.log(f"{name}: {per_query:,.0f} instructions a query ({answered}/{n} answered)")
        finally:
            server.stop()
            nsd.stop()
    print(f"\n{'workload':<10} {'instructions/query':>19} {'answered':>9}")
    for name, row in results.items():
        print(f"{name:<10} {row['instructions_per_query']:>19,.0f} {row['answered']:>9.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"queries": n, "results": results}, indent=2))
    return 0 if all(r["answered"] == n for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
