#!/usr/bin/env python3
"""Core benchmark: this resolver vs. dnsmasq and Unbound, same machine, same run, same load.

One command (issue 8)::

    python3 bench/core_bench.py --json core.json        # ~4-5 min; --quick: ~2 min
    python3 bench/core_bench.py --full --json core.json # ~5 min: adds the 1,000,000-name scale runs

Issue 21's figures (as root for --cpu-quota; the cgroup v1 cpu controller)::

    # workers: two against one, each process held to 0.4 CPU (0.2 where dnsperf, NSD and
    # the rest keep the machine near 100% busy: then the machine, not the quota, binds);
    # 64 clients with 1,000 queries in flight, so that both workers always have queries
    # waiting (bench/README.md: with 200, the window, not the workers, sets the figure)
    python3 bench/core_bench.py --servers resolver,resolver-w2 --workloads blocked,repeated \
        --cpu-quota 0.4 --clients 64 --outstanding 1000 --baselines resolver \
        --latency-duration 0 --scale-sizes '' --startup-runs 0 --rounds 3
    # p99 at a fixed 50,000 qps, the resolver and Unbound in the same run
    python3 bench/core_bench.py --servers resolver,resolver-compiled,unbound \
        --workloads blocked,repeated --baselines unbound --latency-qps 50000 \
        --scale-sizes '' --startup-runs 0 --rounds 3

What it measures
----------------
An NSD instance serves a generated zone ``bench.test.`` (``h<i>.bench.test A``, TTL 3600;
at least 200,000 names, sized so no peer runs out of never-asked names) on
127.0.0.1:<free port>.  Every server under test (a "peer") forwards to that NSD, caches,
and blocks the same 1,000 names ``b<i>.blocked.test`` (NXDOMAIN):

* ``dnsmasq``      -- ``address=/name/`` lines, ``--cache-size``;
* ``unbound``      -- one thread, ``module-config: "iterator"`` (no validation),
  ``forward-zone "."`` to NSD, ``local-zone: "name." always_nxdomain``, no rate limit;
* ``resolver``     -- ``python -m resolver serve`` from this checkout (repo root on
  PYTHONPATH), the names in an included ``format: domains`` file;
* ``resolver-plain`` -- the same with ``udp.batch: false`` (one datagram per system
  call), only when named in ``--servers``;
* ``resolver-compiled`` -- the same with the per-query modules compiled by mypyc
  (setup.py, ``RESOLVER_COMPILE=1``) in a copy of the package; only when named in
  ``--servers`` (needs ``pip install '.[fast,compile]'`` and a C compiler; the build
  takes about 40 s);
* ``resolver-w2``  -- the same with ``--workers 2`` (two processes on the port, with
  SO_REUSEPORT); skipped with a note on a checkout whose ``serve`` has no ``--workers``.
  On a 2-core machine dnsperf takes one core, so two workers cannot show their gain in
  qps there; their CPU per query says what each core does.

Each peer is started, verified (one forwarded and one blocked answer), run through every
workload, and stopped, one peer at a time.  Workloads (dnsperf, A queries):

* ``blocked``  -- cycles through the blocked names (policy hit, no upstream traffic);
* ``repeated`` -- cycles through 100 zone names, warmed first: every query a cache hit;
* ``unique``   -- never-asked zone names, sent once (``-n 1``): every query a miss
  forwarded to NSD;
* ``mix``      -- interleaved: 5% blocked, 80% warmed hits, 15% never-asked misses.

Per workload: a throughput run (``--duration`` s, as fast as dnsperf goes), then a
latency run at a fixed ``--latency-qps`` (5,000; bench/udplat.c, built with the C
compiler, on the last core with the peer on the others unless ``--no-pin``; or
``--latency-tool dnsperf``: ``dnsperf -Q -v``; percentiles of the per-query times, lost
queries counted as infinitely late), then the resident memory of
the server's process tree.  Never-asked names are handed out once per run; when a file
runs out before the run ends the row says "names exhausted" (raise ``--names``).

Policy scale (``--scale-sizes``, default 1,000 and 100,000; ``--full`` adds 1,000,000):
dnsmasq, Unbound and the resolver started with that many blocked names; load time (exec
to the first NXDOMAIN for the *last* blocked name), resident memory, and blocked-query
throughput for ``--scale-duration`` s.  The scale queries are the same shape for every
size: 200,000 distinct names ``q<j>.b<j mod size>.blocked.test`` (subdomains of the
blocked names, which all three servers block), spread over the whole list, so that no
server's answer cache or memo can stand in for the lookup, and the rows differ only in
the size of the list.

Start-up: ``resolver serve`` with the default config and the shipped ``blocklists/``,
exec to the first NXDOMAIN for a shipped name, ``--startup-runs`` times.

How to read the output
----------------------
One table, one row per (workload, server); scale rows are ``blocked@1k`` etc.

``qps``          dnsperf "Queries per second" (completed queries / run time).
``lost%``        queries with no answer within ``--timeout`` seconds.
``CPU us/q``     server CPU (utime+stime of the server process tree, from
                 /proc/<pid>/stat, across the dnsperf run) divided by completed
                 queries, in microseconds.  This is the number that matters on
                 this 2-core box: dnsperf itself needs a core, so qps is partly
                 bounded by the load generator; CPU per query is not.
``sys %``        the kernel's share of that CPU (stime): system calls and the
                 network stack, as against the server's own code.
``p50/p99 ms``   latency at the fixed rate ("lost": over 1% of queries unanswered).
``RSS MiB``      VmRSS summed over the server's process tree after the workload
                 (VmHWM, the peak, is in the JSON).
``load s``       scale rows: exec to the first correct answer.
``host %``       the whole machine's CPU busy during the throughput run, in % of all
                 CPUs (dnsperf, NSD and the server together; steal is in the JSON):
                 near 100, the machine, not the server, set the qps.
``qps x B``      peer qps / B's qps               (>1: peer answers more per second).
``cpu x B``      B's CPU/q / peer's CPU/q         (>1: peer is cheaper per query).
B is each of ``--baselines`` (dnsmasq and unbound).  JSON ``rcode_ok_pct`` is the share
of answers with the expected rcode mix (NXDOMAIN for blocked, NOERROR otherwise, 5/95 for
mix); a row below 99% is flagged WRONG ANSWERS and the exit status is 1, since fast wrong
answers are not a result.  In ``unique`` and ``mix`` NSD also burns CPU on the same
cores; it is recorded (``upstream_cpu_us_per_query``) but not charged to peers.

Safety: all traffic goes to 127.0.0.1, only high free ports are used, every
load run is bounded by ``dnsperf -l`` and a subprocess timeout, and every
process this script starts is stopped by PID (also on Ctrl-C / SIGTERM).

Options: ``--duration`` (10; quick 3), ``--latency-duration`` (5; quick 2; 0 = none),
``--latency-qps`` (5000), ``--quick``, ``--full``, ``--scale-sizes``, ``--scale-servers``,
``--scale-duration`` (5; quick 2), ``--startup-runs`` (3), ``--rounds`` (1; each row the
round with the median CPU per query, peers taking turns; scale sizes N runs each on the
loaded server), ``--servers``, ``--workloads``,
``--baselines``, ``--names``, ``--blocked`` (1000), ``--cache-size`` (1,000,000, every
peer; keep it above the names a peer sees, or ``unique`` measures dnsmasq's cache-full
eviction path), ``--clients/--outstanding/--timeout`` (dnsperf ``-c/-q/-t``, 4/200/1),
``--resolver-args``, ``--cpu-quota Q`` (each server process limited to Q CPUs in a
cgroup v1 group of its own, as root: how workers scale where there is no core for each),
``--keep``, ``--json FILE``.

Adding a peer means subclassing ``Peer`` (``command()``, optionally ``version()``) and
registering it in ``PEERS``; adding a workload means appending to ``WORKLOADS`` (a plan
function; ``fresh_share``/``qps_budget`` when it needs never-asked names).
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
ZONE = "bench.test."
BLOCKED_PARENT = "blocked.test"
# tool -> the Debian package that ships it
REQUIRED_TOOLS = {
    "nsd": "nsd",
    "nsd-checkconf": "nsd",
    "dnsperf": "dnsperf",
    "dnsmasq": "dnsmasq-base",
    "unbound": "unbound",
    "unbound-checkconf": "unbound",
}
APT_HINT = "apt-get install -y " + " ".join(sorted(set(REQUIRED_TOOLS.values())))
APT_LOG = Path("/tmp/apt.log")
CLK_TCK = os.sysconf("SC_CLK_TCK")
REPEATED_SET = 100  # zone names h0..h99: the cache-hit set, warmed before use
# A query to a port nobody has bound yet just goes unanswered (no ICMP error reaches an
# unconnected socket), so this timeout is the resolution of the measured load time.
READY_PROBE_TIMEOUT = 0.03


class BenchError(RuntimeError):
    """A fatal, explained failure of the benchmark or of one peer."""


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def zone_name(i: int) -> str:
    return f"h{i}.bench.test"


def zone_addr(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def blocked_name(i: int) -> str:
    return f"b{i}.{BLOCKED_PARENT}"


def free_port(taken: set[int]) -> int:
    """A high port free for both UDP and TCP on 127.0.0.1 (never 53)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((LOOPBACK, 0))
            port: int = u.getsockname()[1]
            if port < 1024 or port in taken:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((LOOPBACK, port))
                except OSError:
                    continue
        taken.add(port)
        return port
    raise BenchError("could not find a free loopback port")


def dns_query(port: int, name: str, timeout: float = 1.0) -> dns.message.Message:
    q = dns.message.make_query(name, dns.rdatatype.A)
    return dns.query.udp(q, LOOPBACK, port=port, timeout=timeout)


def answer_addrs(resp: dns.message.Message) -> list[str]:
    return [rd.address for rrset in resp.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset]


def rcode_of(port: int, name: str, timeout: float = 0.5) -> int | None:
    """The rcode of an A query for ``name``, or None when there is no answer."""
    try:
        return dns_query(port, name, timeout=timeout).rcode()
    except (OSError, dns.exception.DNSException):
        return None


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


# --------------------------------------------------------------------------
# Process CPU accounting (/proc/<pid>/stat, whole process tree)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    starttime: int
    ticks: int  # utime + stime
    child_ticks: int  # cutime + cstime (reaped children)
    sys_ticks: int = 0  # stime: in the kernel, on the process's behalf
    child_sys_ticks: int = 0  # cstime


def read_stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces/parens; everything after the last ')'.
    f = raw[raw.rindex(")") + 2 :].split()
    # f[0] is field 3 (state); field n is f[n - 3].
    return ProcStat(
        pid=pid,
        ppid=int(f[1]),
        starttime=int(f[19]),
        ticks=int(f[11]) + int(f[12]),
        child_ticks=int(f[13]) + int(f[14]),
        sys_ticks=int(f[12]),
        child_sys_ticks=int(f[14]),
    )


def all_stats() -> Iterator[ProcStat]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_stat(int(entry))
            if st is not None:
                yield st


def process_tree(root: int) -> list[ProcStat]:
    """``root`` and all its live descendants."""
    stats = {s.pid: s for s in all_stats()}
    if root not in stats:
        return []
    children: dict[int, list[int]] = {}
    for s in stats.values():
        children.setdefault(s.ppid, []).append(s.pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(stats[pid])
        todo.extend(children.get(pid, []))
    return out


def tree_memory_kib(root: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) summed over the live tree rooted at ``root``, in KiB.

    Summing counts pages shared between worker processes once per process: an upper bound.
    """
    rss = hwm = 0
    for st in process_tree(root):
        try:
            status = Path(f"/proc/{st.pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key == "VmRSS":
                rss += int(value.split()[0])
            elif key == "VmHWM":
                hwm += int(value.split()[0])
    return rss, hwm


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of the tree rooted at ``root`` (incl. reaped children)."""
    return tree_cpu_split(root)[0]


def tree_cpu_split(root: int) -> tuple[float, float]:
    """(all, kernel) CPU seconds of the tree rooted at ``root`` (incl. reaped children)."""
    tree = process_tree(root)
    if not tree:
        return 0.0, 0.0
    ticks = sum(s.ticks for s in tree) + tree[0].child_ticks
    sys_ticks = sum(s.sys_ticks for s in tree) + tree[0].child_sys_ticks
    return ticks / CLK_TCK, sys_ticks / CLK_TCK


# --------------------------------------------------------------------------
# Managed processes and servers
# --------------------------------------------------------------------------


class ManagedProcess:
    """A child process we started; stopped by PID (plus its own descendants)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        cwd: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        log(f"start {name}: {shlex.join(self.argv)}")
        # The child keeps its own copy of the log fd; ours is closed right away.
        with open(log_path, "wb") as out:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        # Remember descendants (pid, starttime) so survivors can be killed by
        # PID without hitting a recycled PID.
        descendants = [(s.pid, s.starttime) for s in process_tree(self.pid)[1:]]
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=grace)
        deadline = time.monotonic() + grace
        for pid, start in descendants:
            while time.monotonic() < deadline:
                st = read_stat(pid)
                if st is None or st.starttime != start:
                    break
                time.sleep(0.05)
            st = read_stat(pid)
            if st is not None and st.starttime == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@dataclass
class BenchContext:
    """Everything a peer needs to configure itself identically to the others."""

    workdir: Path
    upstream_port: int
    blocked: list[str]
    cache_size: int = 1_000_000
    ports: set[int] = field(default_factory=set)
    resolver_args: list[str] = field(default_factory=list)
    zone_names: int = 0
    #: CPUs each process of a peer may use (a cgroup of its own; None: no limit).
    cpu_quota: float | None = None
    #: The latency runs' load generator: bench/udplat.c built here (None: dnsperf -Q -v).
    udplat: Path | None = None
    #: Latency runs with udplat on a core of its own and the peer on the others.
    pin: bool = False
    # Zone names below REPEATED_SET are the cache-hit set; fresh ones are handed out once.
    next_fresh: int = REPEATED_SET

    def fresh(self, count: int) -> list[str]:
        """Up to ``count`` zone names no peer was asked for yet (a miss in every cache)."""
        lo = self.next_fresh
        hi = min(lo + count, self.zone_names)
        self.next_fresh = hi
        return [zone_name(i) for i in range(lo, hi)]


#: The cgroup v1 cpu controller, where --cpu-quota makes a cgroup per server process.
CPU_CGROUPS = Path("/sys/fs/cgroup/cpu")
#: The quota's period. Short, so that a process that used its quota pauses for a few ms:
#: with the default 100 ms a paused worker held its queries for up to 60 ms, dnsperf's
#: window of outstanding queries filled with them, and the other worker went short.
CFS_PERIOD_US = 10_000


def cpu_quota_problem() -> str | None:
    """Why --cpu-quota cannot work here, or None."""
    if not (CPU_CGROUPS / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {CPU_CGROUPS} (cgroup v2 is not supported)"
    if not os.access(CPU_CGROUPS, os.W_OK):
        return f"{CPU_CGROUPS} is not writable (run as root)"
    return None


#: The least quota the kernel takes is 1 ms a period.
MIN_CPU_QUOTA = 1000 / CFS_PERIOD_US


def confine(pids: Sequence[int], quota: float, label: str, made: list[Path]) -> None:
    """Put each process in a cgroup of its own that may use ``quota`` CPUs: as if each
    had a CPU of that speed to itself. Each cgroup is added to ``made`` as soon as it
    exists (to :func:`release` even when a later step fails)."""
    for pid in pids:
        group = CPU_CGROUPS / f"core_bench.{label}.{pid}"
        try:
            group.mkdir(exist_ok=True)
            made.append(group)
            (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(round(quota * CFS_PERIOD_US)))
            (group / "cgroup.procs").write_text(str(pid))
        except ProcessLookupError:
            # Gone already (the policy builder's short-lived child of one load): nothing
            # left to limit.
            group.rmdir()
            made.remove(group)
        except OSError as e:
            raise BenchError(f"cannot limit pid {pid} to {quota:g} CPU in {group}: {e}") from e


def unconfined(pids: Sequence[int]) -> list[int]:
    """Those of ``pids`` not in a cgroup of their own made by :func:`confine` (a worker
    that was restarted inherits its parent's cgroup, and so would share its quota)."""
    out = []
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            continue  # gone
        cpu = [line.split(":", 2)[2] for line in lines if "cpu" in line.split(":")[1].split(",")]
        if not any(g.startswith("/core_bench.") and g.endswith(f".{pid}") for g in cpu):
            out.append(pid)
    return out


def release(groups: Sequence[Path]) -> None:
    """Remove cgroups made by :func:`confine` once their processes have exited (a killed
    process may take a moment to leave; a cgroup still busy after 2 s is reported)."""
    for group in groups:
        deadline = time.monotonic() + 2.0
        while group.exists():
            try:
                group.rmdir()
            except OSError as e:
                if time.monotonic() > deadline:
                    log(f"could not remove {group}: {e}")
                    break
                time.sleep(0.05)


class Server(abc.ABC):
    """A DNS server process bound to 127.0.0.1:<port>."""

    name: str = "?"
    ready_timeout: float = 20.0
    binary: str | None = None  # an executable this server needs on PATH
    #: Processes that answer queries (--cpu-quota waits for them all, then confines each).
    workers: int = 1
    #: Subject to --cpu-quota (the upstream is not: it stands for the network).
    quota_applies: bool = True

    def __init__(self, ctx: BenchContext) -> None:
        self.ctx = ctx
        self.port = free_port(ctx.ports)
        self.dir = ctx.workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: ManagedProcess | None = None
        self.cgroups: list[Path] = []

    @classmethod
    def missing(cls) -> str | None:
        """Reason this peer cannot run here, or None."""
        if cls.binary and not shutil.which(cls.binary):
            return f"{cls.binary} not installed ({APT_HINT})"
        return None

    @abc.abstractmethod
    def command(self) -> tuple[list[str], Path, dict[str, str] | None]:
        """argv, cwd and env to start the server (after writing its config)."""

    def ready(self) -> bool:
        """Does the server give its first correct answer (by default: any answer)?"""
        return rcode_of(self.port, zone_name(0)) is not None

    def version(self) -> str:
        return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> float:
        """Start the server; return the seconds from exec to its first correct answer."""
        assert self.port != 53
        argv, cwd, env = self.command()
        self.proc = ManagedProcess(self.name, argv, cwd, self.dir / "server.log", env)
        proc = self.proc
        started = time.monotonic()

        def ready() -> bool:
            if not proc.alive():
                raise BenchError(
                    f"{self.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}"
                )
            return self.ready()

        if not wait_until(ready, self.ready_timeout, 0.02):
            raise BenchError(
                f"{self.name} not ready after {self.ready_timeout:.0f}s:\n{proc.log_tail()}"
            )
        load_s = time.monotonic() - started
        log(f"{self.name} ready on {LOOPBACK}:{self.port} (pid {self.pid}) in {load_s:.2f}s")
        quota = self.ctx.cpu_quota
        if quota is not None and self.quota_applies:
            want = self.processes()
            if not wait_until(lambda: len(process_tree(self.pid)) >= want, 30):
                raise BenchError(f"{self.name}: fewer than {want} processes")
            pids = [p.pid for p in process_tree(self.pid)]
            confine(pids, quota, self.name, self.cgroups)
            log(f"{self.name}: {len(pids)} processes, each limited to {quota:g} CPU")
        return load_s

    def processes(self) -> int:
        """The processes it runs once started (--cpu-quota confines them all at once)."""
        return self.workers

    def check_confined(self) -> None:
        """With --cpu-quota: fail if a process (a restarted worker) escaped its quota."""
        if self.cgroups:
            loose = unconfined([p.pid for p in process_tree(self.pid)])
            if loose:
                raise BenchError(f"{self.name}: pids {loose} have no cpu quota of their own")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            log(f"stopped {self.name} (pid {self.proc.pid})")
            self.proc = None
        release(self.cgroups)
        self.cgroups = []

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def cpu_split(self) -> tuple[float, float]:
        """(all, kernel) CPU seconds so far."""
        return tree_cpu_split(self.pid)

    def memory_kib(self) -> tuple[int, int]:
        return tree_memory_kib(self.pid)


class NsdUpstream(Server):
    """Authoritative NSD serving the generated zone; the upstream of every peer."""

    quota_applies = False

    name = "nsd"
    ready_timeout = 120.0

    def __init__(self, ctx: BenchContext, names: int) -> None:
        super().__init__(ctx)
        self.names = names

    def _write_zone(self) -> None:
        with open(self.dir / "bench.test.zone", "w") as f:
            f.write(
                f"$ORIGIN {ZONE}\n$TTL 3600\n"
                "@ IN SOA ns hostmaster 1 3600 600 86400 3600\n"
                "@ IN NS ns\nns IN A 127.0.0.1\n"
            )
            f.writelines(f"h{i} IN A {zone_addr(i)}\n" for i in range(self.names))

    def _conf(self, rrl: bool) -> str:
        d = self.dir
        return "\n".join(
            [
                "server:",
                f"    ip-address: {LOOPBACK}@{self.port}",
                "    do-ip6: no",
                '    username: ""',
                '    chroot: ""',
                '    database: ""',
                f'    zonesdir: "{d}"',
                f'    pidfile: "{d}/nsd.pid"',
                f'    zonelistfile: "{d}/zone.list"',
                f'    xfrdfile: "{d}/xfrd.state"',
                f'    xfrdir: "{d}"',
                "    zonefiles-write: 0",
                "    server-count: 1",
                "    verbosity: 0",
                "    hide-version: yes",
                *(["    rrl-ratelimit: 0"] if rrl else []),
                "remote-control:",
                "    control-enable: no",
                "zone:",
                f"    name: {ZONE}",
                '    zonefile: "bench.test.zone"',
                "",
            ]
        )

    def _rrl_supported(self) -> bool:
        probe = self.dir / "probe.conf"
        probe.write_text(self._conf(rrl=True))
        res = subprocess.run(["nsd-checkconf", str(probe)], capture_output=True, timeout=30)
        return res.returncode == 0

    def command(self) -> tuple[list[str], Path, dict[str, str] | None]:
        self._write_zone()
        rrl = self._rrl_supported()
        if not rrl:
            log("nsd build has no RRL; running without rrl-ratelimit")
        conf = self.dir / "nsd.conf"
        conf.write_text(self._conf(rrl=rrl))
        check = subprocess.run(
            ["nsd-checkconf", str(conf)], capture_output=True, text=True, timeout=30
        )
        if check.returncode != 0:
            raise BenchError(f"nsd-checkconf failed: {check.stderr or check.stdout}")
        return ["nsd", "-d", "-c", str(conf)], self.dir, None

    def verify(self) -> None:
        for i in (0, self.names - 1):
            resp = dns_query(self.port, zone_name(i))
            if resp.rcode() != dns.rcode.NOERROR or answer_addrs(resp) != [zone_addr(i)]:
                raise BenchError(f"NSD gave a wrong answer for {zone_name(i)}: {resp}")
        log(f"nsd verified: {self.names} names in {ZONE}")

    def version(self) -> str:
        out = subprocess.run(["nsd", "-v"], capture_output=True, text=True, timeout=10)
        return (out.stderr or out.stdout).splitlines()[0].strip()


class Peer(Server):
    """A server under test: forwards to NSD, blocks ``ctx.blocked`` with NXDOMAIN."""

    ready_timeout = 300.0  # a million blocked names take a while to load

    def ready(self) -> bool:
        # The last blocked name: the whole list is loaded, not just the socket bound.
        return rcode_of(self.port, self.ctx.blocked[-1], READY_PROBE_TIMEOUT) == dns.rcode.NXDOMAIN

    def verify(self) -> None:
        resp = dns_query(self.port, zone_name(0), timeout=2.0)
        if resp.rcode() != dns.rcode.NOERROR or answer_addrs(resp) != [zone_addr(0)]:
            raise BenchError(f"{self.name}: wrong answer for {zone_name(0)}:\n{resp}")
        resp = dns_query(self.port, self.ctx.blocked[0], timeout=2.0)
        if resp.rcode() != dns.rcode.NXDOMAIN:
            raise BenchError(f"{self.name}: {self.ctx.blocked[0]} not blocked:\n{resp}")
        log(f"{self.name} verified (forwarding + blocking)")


class Dnsmasq(Peer):
    name = "dnsmasq"
    binary = "dnsmasq"

    def command(self) -> tuple[list[str], Path, dict[str, str] | None]:
        conf = self.dir / "block.conf"
        conf.write_text("".join(f"address=/{n}/\n" for n in self.ctx.blocked))
        try:
            import pwd

            user = pwd.getpwuid(os.getuid()).pw_name
        except (KeyError, ImportError):
            user = "root"
        argv = [
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            f"--server={LOOPBACK}#{self.ctx.upstream_port}",
            f"--listen-address={LOOPBACK}",
            f"--port={self.port}",
            "--bind-interfaces",
            f"--cache-size={self.ctx.cache_size}",
            "--dns-forward-max=1000",
            f"--conf-file={conf}",
            f"--user={user}",
            "--pid-file=",
            f"--log-facility={self.dir / 'dnsmasq.log'}",
        ]
        return argv, self.dir, None

    def version(self) -> str:
        out = subprocess.run(["dnsmasq", "--version"], capture_output=True, text=True, timeout=10)
        head = out.stdout.splitlines()[0] if out.stdout else ""
        m = re.search(r"cachesize (\d+)", self._log_text())
        return head.split("  Copyright")[0] + (f" (cachesize {m.group(1)})" if m else "")

    def _log_text(self) -> str:
        try:
            return (self.dir / "dnsmasq.log").read_text(errors="replace")
        except OSError:
            return ""


def resolver_env() -> dict[str, str]:
    """An environment running ``python -m resolver`` from this checkout, whatever is installed."""
    path = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(path))


def resolver_command(
    port: int, upstream_port: int, *extra: str
) -> tuple[list[str], Path, dict[str, str] | None]:
    """``resolver serve`` on 127.0.0.1:``port`` forwarding to NSD, plus ``extra`` flags."""
    argv = [
        sys.executable,
        "-m",
        "resolver",
        "serve",
        "--listen",
        f"{LOOPBACK}:{port}",
        "--upstream",
        f"{LOOPBACK}:{upstream_port}",
        *extra,
    ]
    return argv, REPO_ROOT, resolver_env()


class Resolver(Peer):
    """This project: ``python3 -m resolver serve`` from the repo root."""

    name = "resolver"
    udp_batch = True

    @classmethod
    def missing(cls) -> str | None:
        if not (REPO_ROOT / "resolver" / "__main__.py").exists():
            return f"{REPO_ROOT / 'resolver' / '__main__.py'} does not exist yet"
        return None

    def command(self) -> tuple[list[str], Path, dict[str, str] | None]:
        # The names go in a plain domains file that the YAML list includes: the format
        # made for large imported lists, as dnsmasq and Unbound get their native ones.
        lists = self.dir / "blocklists"
        (lists / "data").mkdir(parents=True, exist_ok=True)
        (lists / "data" / "bench.txt").write_text("".join(f"{n}\n" for n in self.ctx.blocked))
        (lists / "bench.yaml").write_text(
            "list: bench\naction: nxdomain\ninclude: [{file: data/bench.txt, format: domains}]\n"
        )
        # Same cache capacity as dnsmasq's --cache-size; flags below override the rest.
        conf = self.dir / "resolver.yaml"
        batch = "" if self.udp_batch else "udp:\n  batch: false\n"
        conf.write_text(f"cache:\n  max_entries: {self.ctx.cache_size}\n{batch}")
        workers = ["--workers", str(self.workers)] if self.workers > 1 else []
        return resolver_command(
            self.port,
            self.ctx.upstream_port,
            "--config",
            str(conf),
            "--blocklists",
            str(lists),
            *workers,
            *self.ctx.resolver_args,
        )

    def processes(self) -> int:
        # Each worker forks its policy builder (policy/isolated.py) at its first load: a
        # worker's builder that came after the confining was once taken for a restarted
        # worker, and the whole row failed.
        return 2 * self.workers

    def version(self) -> str:
        init = (REPO_ROOT / "resolver" / "__init__.py").read_text()
        m = re.search(r"__version__\s*=\s*[\"']([^\"']+)", init)
        return (
            f"resolver {m.group(1) if m else '?'} on python {platform.python_version()} "
            f"(cache max_entries {self.ctx.cache_size}, workers {self.workers})"
        )


class ResolverPlain(Resolver):
    """The resolver reading and answering UDP one datagram at a time (``udp.batch:
    false``): the peer that shows what batches (resolver/service/udpbatch.py) gain."""

    name = "resolver-plain"
    udp_batch = False


class ResolverCompiled(Resolver):
    """The resolver with its per-query modules compiled by mypyc (setup.py,
    ``RESOLVER_COMPILE=1``): the same source, built into a copy of the package in the
    peer's directory, so that the checkout itself never holds compiled modules."""

    name = "resolver-compiled"
    ready_timeout = 600.0  # the build comes first: about 40 s

    @classmethod
    def missing(cls) -> str | None:
        why = super().missing()
        if why:
            return why
        if importlib.util.find_spec("mypyc") is None:
            return "mypyc not installed (python3 -m pip install '.[fast,compile]')"
        if not (shutil.which("cc") or shutil.which("gcc")):
            return "no C compiler (apt-get install -y gcc)"
        return None

    def command(self) -> tuple[list[str], Path, dict[str, str] | None]:
        argv, _, env = super().command()
        log(f"{self.name}: compiling the per-query modules (setup.py build_ext --inplace)")
        tree = compiled_tree(self.dir / "tree")
        assert env is not None
        return argv, tree, dict(env, PYTHONPATH=str(tree))


def compiled_tree(tree: Path) -> Path:
    """A copy of the package at ``tree`` with setup.py's modules compiled by mypyc in
    place (``RESOLVER_COMPILE=1``), so that the checkout itself never holds compiled
    modules; ``tree`` goes first on PYTHONPATH."""
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, tree / name)
    shutil.copytree(
        REPO_ROOT / "resolver", tree / "resolver", ignore=shutil.ignore_patterns("__pycache__")
    )
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tree,
        env=dict(os.environ, RESOLVER_COMPILE="1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    built = sorted(p.name for p in (tree / "resolver").rglob("*.so"))
    if build.returncode != 0 or not built:
        raise BenchError(f"the compiled build failed:\n{build.stderr[-3000:]}")
    log(f"compiled {len(built)} modules in {tree}")
    return tree


class ResolverW2(Resolver):
    """The resolver with two SO_REUSEPORT worker processes (``serve --workers 2``)."""

    name = "resolver-w2"
    workers = 2

    @classmethod
    def missing(cls) -> str | None:
        why = super().missing()
        if why:
            return why
        out = subprocess.run(
            [sys.executable, "-m", "resolver", "serve", "--help"],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            env=resolver_env(),
            timeout=60,
        )
        return None if "--workers" in out.stdout else "'resolver serve' has no --workers yet"


class ShippedResolver(Server):
    """The resolver as shipped: default config and ``blocklists/``, only its start-up timed."""

    name = "resolver-shipped"

    def command(self) -> tuple[list[str], Path, dict[str, str] | None]:
        return resolver_command(self.port, self.ctx.upstream_port)

    def ready(self) -> bool:
        return rcode_of(self.port, shipped_probe_name(), READY_PROBE_TIMEOUT) == dns.rcode.NXDOMAIN


def shipped_probe_name() -> str:
    """The first domain of the shipped DeepSeek list (enforced since 2025-02-26)."""
    text = (REPO_ROOT / "blocklists" / "deepseek.yaml").read_text()
    m = re.search(r"^  - ([A-Za-z0-9.-]+)\s*$", text, re.MULTILINE)
    if m is None:
        raise BenchError("no domain found in blocklists/deepseek.yaml")
    return m.group(1)


class Unbound(Peer):
    """Unbound, one thread, iterator only (no validation), forwarding everything to NSD."""

    name = "unbound"
    binary = "unbound"

    def command(self) -> tuple[list[str], Path, dict[str, str] | None]:
        blocks = self.dir / "block.conf"
        blocks.write_text(
            "".join(f'local-zone: "{n}." always_nxdomain\n' for n in self.ctx.blocked)
        )
        # Unbound sizes its caches in bytes; ~256 B per message and ~512 B per RRset entry
        # keeps ctx.cache_size answers without eviction, as for the other peers.
        conf = self.dir / "unbound.conf"
        conf.write_text(
            "\n".join(
                [
                    "server:",
                    f"    interface: {LOOPBACK}",
                    f"    port: {self.port}",
                    "    do-ip6: no",
                    "    num-threads: 1",
                    '    username: ""',
                    '    chroot: ""',
                    f'    directory: "{self.dir}"',
                    f'    pidfile: "{self.dir}/unbound.pid"',
                    "    use-syslog: no",
                    '    logfile: ""',
                    "    verbosity: 0",
                    '    module-config: "iterator"',
                    "    do-not-query-localhost: no",
                    "    qname-minimisation: no",
                    "    access-control: 127.0.0.0/8 allow",
                    "    ratelimit: 0",
                    "    ip-ratelimit: 0",
                    f"    msg-cache-size: {self.ctx.cache_size * 256}",
                    f"    rrset-cache-size: {self.ctx.cache_size * 512}",
                    # test. is one of Unbound's default (NXDOMAIN) zones; bench.test is in it.
                    '    local-zone: "test." nodefault',
                    f'    include: "{blocks}"',
                    "remote-control:",
                    "    control-enable: no",
                    "forward-zone:",
                    '    name: "."',
                    f"    forward-addr: {LOOPBACK}@{self.ctx.upstream_port}",
                    "",
                ]
            )
        )
        check = subprocess.run(
            ["unbound-checkconf", str(conf)], capture_output=True, text=True, timeout=120
        )
        if check.returncode != 0:
            raise BenchError(f"unbound-checkconf failed: {check.stderr or check.stdout}")
        return ["unbound", "-d", "-c", str(conf)], self.dir, None

    def version(self) -> str:
        out = subprocess.run(["unbound", "-V"], capture_output=True, text=True, timeout=10)
        return f"unbound {out.stdout.split()[1]} (1 thread, iterator only)"


PEERS: dict[str, type[Peer]] = {
    "dnsmasq": Dnsmasq,
    "unbound": Unbound,
    "resolver": Resolver,
    "resolver-w2": ResolverW2,
    "resolver-plain": ResolverPlain,
    "resolver-compiled": ResolverCompiled,
}
#: The peers of a default run (resolver-plain on request: --servers).
DEFAULT_SERVERS = ("dnsmasq", "unbound", "resolver", "resolver-w2")


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadPlan:
    names: list[str]  # the dnsperf data file, in order
    warm: list[str]  # asked once before measuring, so that they are cache hits
    loop: bool  # False: send the data file at most once (dnsperf -n 1)


@dataclass(frozen=True)
class Workload:
    name: str
    expected: dict[str, float]  # rcode -> share of the answers
    description: str
    # (ctx, the most queries the run can send) -> plan
    plan: Callable[[BenchContext, int], WorkloadPlan]
    fresh_share: float = 0.0  # share of the queries that need never-asked names
    qps_budget: int = 0  # rate the fresh names of a throughput run are sized for


UNIQUE_QPS_BUDGET = 50_000
MIX_QPS_BUDGET = 120_000
MIX_CYCLE = 20  # one cycle: 1 blocked (5%), 3 misses (15%), 16 cache hits (80%)
MIX_MISS_SLOTS = frozenset({5, 11, 17})


def _repeated_names() -> list[str]:
    return [zone_name(i) for i in range(REPEATED_SET)]


def _blocked_plan(ctx: BenchContext, queries: int) -> WorkloadPlan:
    return WorkloadPlan(ctx.blocked, warm=[], loop=True)


def _repeated_plan(ctx: BenchContext, queries: int) -> WorkloadPlan:
    return WorkloadPlan(_repeated_names(), warm=_repeated_names(), loop=True)


def _unique_plan(ctx: BenchContext, queries: int) -> WorkloadPlan:
    return WorkloadPlan(ctx.fresh(queries), warm=[], loop=False)


def _mix_plan(ctx: BenchContext, queries: int) -> WorkloadPlan:
    hits = _repeated_names()
    misses = iter(ctx.fresh(-(-queries * len(MIX_MISS_SLOTS) // MIX_CYCLE)))
    names: list[str] = []
    for j in range(queries):
        slot = j % MIX_CYCLE
        if slot == 0:
            names.append(ctx.blocked[(j // MIX_CYCLE) % len(ctx.blocked)])
        elif slot in MIX_MISS_SLOTS:
            miss = next(misses, None)
            if miss is None:  # the zone ran out of fresh names: a shorter file
                break
            names.append(miss)
        else:
            names.append(hits[j % REPEATED_SET])
    return WorkloadPlan(names, warm=hits, loop=False)


MIX_BLOCKED = 1 / MIX_CYCLE
WORKLOADS: list[Workload] = [
    Workload("blocked", {"NXDOMAIN": 1.0}, "blocked names (policy hit)", _blocked_plan),
    Workload(
        "repeated",
        {"NOERROR": 1.0},
        f"{REPEATED_SET} warmed zone names (cache hit)",
        _repeated_plan,
    ),
    Workload(
        "unique",
        {"NOERROR": 1.0},
        "never-asked zone names (cache miss -> NSD)",
        _unique_plan,
        fresh_share=1.0,
        qps_budget=UNIQUE_QPS_BUDGET,
    ),
    Workload(
        "mix",
        {"NXDOMAIN": MIX_BLOCKED, "NOERROR": 1 - MIX_BLOCKED},
        "5% blocked, 80% warmed hits, 15% never-asked misses, interleaved",
        _mix_plan,
        fresh_share=len(MIX_MISS_SLOTS) / MIX_CYCLE,
        qps_budget=MIX_QPS_BUDGET,
    ),
]


def zone_size(peers: int, workloads: Sequence[Workload], duration: int, lat: LatencyOptions) -> int:
    """Zone names enough for every peer's fresh names at the workloads' rate budgets."""
    per_peer = sum(
        w.fresh_share * (duration * w.qps_budget + lat.duration * lat.qps) + MIX_CYCLE
        for w in workloads
    )
    return max(200_000, REPEATED_SET + int(peers * per_peer))


# --------------------------------------------------------------------------
# dnsperf
# --------------------------------------------------------------------------


@dataclass
class Latency:
    """Per-query latency at a fixed offered rate (dnsperf -Q, per-query times from -v)."""

    qps: int
    sent: int
    lost: int
    p50_ms: float
    p99_ms: float  # inf when over 1% of the queries were lost
    max_ms: float
    rcode_ok_pct: float


@dataclass
class RunResult:
    workload: str
    server: str
    qps: float
    sent: int
    completed: int
    lost: int
    lost_pct: float
    run_time_s: float
    avg_latency_ms: float
    cpu_s: float
    cpu_us_per_query: float
    upstream_cpu_us_per_query: float
    #: The kernel's share of the server's CPU in the run (system calls, the network stack).
    sys_pct: float
    rcodes: dict[str, int]
    expected_rcodes: dict[str, float]
    rcode_ok_pct: float
    data_names: int
    rss_kib: int = 0  # VmRSS of the server's process tree after the workload
    hwm_kib: int = 0  # VmHWM (peak resident), likewise
    load_s: float | None = None  # policy scale rows: exec to first correct answer
    #: The whole machine's CPU across the run, in % of all its CPUs (busy = not idle, not
    #: iowait; steal: taken by the hypervisor): how much room the load generator left.
    host_busy_pct: float = math.nan
    host_steal_pct: float = math.nan
    latency: Latency | None = None
    notes: list[str] = field(default_factory=list)


def _grab(pattern: str, text: str) -> str:
    m = re.search(pattern, text, re.MULTILINE)
    if not m:
        raise BenchError(f"cannot parse dnsperf output ({pattern!r}):\n{text}")
    return m.group(1)


@dataclass
class DnsperfOptions:
    duration: int
    clients: int
    outstanding: int
    timeout: int


@dataclass
class LatencyOptions:
    duration: int  # 0: no latency runs
    qps: int


@dataclass
class DnsperfStats:
    sent: int
    completed: int
    lost: int
    lost_pct: float
    qps: float
    run_time_s: float
    avg_latency_ms: float
    rcodes: dict[str, int]
    latencies_s: list[float]  # one per answered query, only with a fixed rate (-v)


def run_dnsperf(
    port: int, datafile: Path, opts: DnsperfOptions, loop: bool, rate: int = 0
) -> DnsperfStats:
    """One bounded dnsperf run; with ``rate``, at that fixed rate, timing every query."""
    argv = [
        "dnsperf",
        "-s",
        LOOPBACK,
        "-p",
        str(port),
        "-d",
        str(datafile),
        "-l",
        str(opts.duration),
        "-c",
        str(opts.clients),
        "-q",
        str(opts.outstanding),
        "-t",
        str(opts.timeout),
    ]
    if not loop:
        argv += ["-n", "1"]
    if rate:
        # dnsperf 2.10 has no latency histogram: -v prints each answer with its latency.
        argv += ["-Q", str(rate), "-v"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL
    )
    try:
        out, _ = proc.communicate(timeout=opts.duration + opts.timeout + 30)
    finally:
        if proc.poll() is None:  # timeout or Ctrl-C: stop our dnsperf by PID
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"dnsperf exited {proc.returncode}:\n{out[-3000:]}")
    rcodes = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"([A-Z]+) (\d+) \(", _grab(r"Response codes:\s+(.*)$", out))
    }
    return DnsperfStats(
        sent=int(_grab(r"Queries sent:\s+(\d+)", out)),
        completed=int(_grab(r"Queries completed:\s+(\d+)", out)),
        lost=int(_grab(r"Queries lost:\s+(\d+)", out)),
        lost_pct=float(_grab(r"Queries lost:\s+\d+ \(([\d.]+)%\)", out)),
        qps=float(_grab(r"Queries per second:\s+([\d.]+)", out)),
        run_time_s=float(_grab(r"Run time \(s\):\s+([\d.]+)", out)),
        avg_latency_ms=float(_grab(r"Average Latency \(s\):\s+([\d.]+)", out)) * 1000,
        rcodes=rcodes,
        latencies_s=[float(m) for m in re.findall(r"^> \S+ .* ([\d.]+)$", out, re.MULTILINE)],
    )


def rcode_ok_pct(expected: dict[str, float], rcodes: dict[str, int], completed: int) -> float:
    """Share of the answers that match the expected rcode mix, in percent."""
    if not completed:
        return 0.0
    ok = sum(min(rcodes.get(rc, 0), share * completed) for rc, share in expected.items())
    return 100.0 * ok / completed


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of an ascending sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _prepare(peer: Peer, name: str, plan: WorkloadPlan) -> Path:
    """Write the data file and warm the plan's names; return the data file."""
    if not plan.names:
        raise BenchError(f"{name}: the zone has no fresh names left; raise --names")
    datafile = peer.dir / f"{name}.txt"
    with open(datafile, "w") as f:
        f.writelines(f"{n} A\n" for n in plan.names)
    for n in plan.warm:
        dns_query(peer.port, n, timeout=2.0)
    return datafile


def _check_alive(peer: Peer, what: str) -> None:
    if not peer.proc or not peer.proc.alive():
        raise BenchError(f"{peer.name} died during {what}")


def _wrong_answers(expected: dict[str, float], ok: float, rcodes: dict[str, int]) -> list[str]:
    return [] if ok >= 99.0 else [f"WRONG ANSWERS: only {ok:.1f}% as {expected}, got {rcodes}"]


def host_jiffies() -> tuple[int, int, int]:
    """(total, idle + iowait, steal) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    return sum(fields[:8]), fields[3] + fields[4], fields[7] if len(fields) > 7 else 0


def host_use(before: tuple[int, int, int], after: tuple[int, int, int]) -> tuple[float, float]:
    """Busy and steal time between two host_jiffies() readings, in % of all CPUs."""
    total = after[0] - before[0]
    if total <= 0:
        return math.nan, math.nan
    idle = after[1] - before[1]
    return 100.0 * (total - idle) / total, 100.0 * (after[2] - before[2]) / total


def measure(
    peer: Peer,
    nsd: NsdUpstream,
    wl: Workload,
    plan: WorkloadPlan,
    opts: DnsperfOptions,
    label: str = "",
) -> RunResult:
    """Throughput and server CPU per query, dnsperf as fast as it goes."""
    label = label or wl.name
    datafile = _prepare(peer, label, plan)
    time.sleep(0.3)  # let the server go idle before the CPU snapshot
    (cpu0, sys0), up0, host0 = peer.cpu_split(), nsd.cpu_seconds(), host_jiffies()
    stats = run_dnsperf(peer.port, datafile, opts, plan.loop)
    (cpu1, sys1), up1, host1 = peer.cpu_split(), nsd.cpu_seconds(), host_jiffies()
    busy, steal = host_use(host0, host1)
    _check_alive(peer, label)
    completed = stats.completed

    def per_query_us(cpu_s: float) -> float:
        return cpu_s * 1e6 / completed if completed else float("nan")

    ok = rcode_ok_pct(wl.expected, stats.rcodes, completed)
    notes: list[str] = []
    if not plan.loop and stats.sent >= len(plan.names):
        notes.append(
            f"names exhausted after {stats.run_time_s:.1f}s "
            f"({len(plan.names)} queries; raise --names)"
        )
    rss, hwm = peer.memory_kib()
    return RunResult(
        workload=label,
        server=peer.name,
        qps=stats.qps,
        sent=stats.sent,
        completed=completed,
        lost=stats.lost,
        lost_pct=stats.lost_pct,
        run_time_s=stats.run_time_s,
        avg_latency_ms=stats.avg_latency_ms,
        cpu_s=cpu1 - cpu0,
        cpu_us_per_query=per_query_us(cpu1 - cpu0),
        upstream_cpu_us_per_query=per_query_us(up1 - up0),
        sys_pct=100 * (sys1 - sys0) / (cpu1 - cpu0) if cpu1 > cpu0 else math.nan,
        rcodes=stats.rcodes,
        expected_rcodes=wl.expected,
        rcode_ok_pct=ok,
        data_names=len(plan.names),
        rss_kib=rss,
        hwm_kib=hwm,
        host_busy_pct=busy,
        host_steal_pct=steal,
        notes=notes + _wrong_answers(wl.expected, ok, stats.rcodes),
    )


def measure_latency(
    peer: Peer, wl: Workload, plan: WorkloadPlan, opts: DnsperfOptions, rate: int
) -> tuple[Latency, list[str]]:
    """p50/p99 latency at a fixed offered rate; lost queries count as infinitely late."""
    datafile = _prepare(peer, f"{wl.name}-latency", plan)
    notes: list[str] = []
    if peer.ctx.udplat is not None:
        stats = run_udplat(peer, datafile, opts, plan.loop, rate)
        lat = Latency(
            qps=rate,
            sent=stats["sent"],
            lost=stats["lost"],
            p50_ms=math.inf if stats["p50_ms"] < 0 else stats["p50_ms"],
            p99_ms=math.inf if stats["p99_ms"] < 0 else stats["p99_ms"],
            max_ms=stats["max_ms"],
            rcode_ok_pct=rcode_ok_pct(wl.expected, stats["rcodes"], stats["answered"]),
        )
        rcodes: dict[str, int] = stats["rcodes"]
        answered_qps = stats["answered"] / max(opts.duration, 1)
        if stats["stalls"]:
            stalled = f"udplat itself was held up {stats['stalls']} times over 100 us"
            notes.append(f"at {rate} qps: {stalled}, {stats['stalled_ms']:.1f} ms in all")
    else:
        run = run_dnsperf(peer.port, datafile, opts, plan.loop, rate)
        times = sorted(t * 1000 for t in run.latencies_s)
        times += [math.inf] * run.lost
        lat = Latency(
            qps=rate,
            sent=run.sent,
            lost=run.lost,
            p50_ms=percentile(times, 0.50),
            p99_ms=percentile(times, 0.99),
            max_ms=max(times, default=math.nan),
            rcode_ok_pct=rcode_ok_pct(wl.expected, run.rcodes, run.completed),
        )
        rcodes = run.rcodes
        answered_qps = run.qps
    _check_alive(peer, f"{wl.name} at {rate} qps")
    notes += [f"at {rate} qps: {n}" for n in _wrong_answers(wl.expected, lat.rcode_ok_pct, rcodes)]
    if answered_qps < 0.95 * rate:
        notes.append(f"at {rate} qps: only {answered_qps:,.0f} qps were answered")
    return lat, notes


def build_udplat(workdir: Path) -> Path | None:
    """bench/udplat.c compiled into ``workdir``, or None (no C compiler: dnsperf instead)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    binary = workdir / "udplat"
    source = Path(__file__).resolve().parent / "udplat.c"
    done = subprocess.run(
        [compiler, "-O2", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise BenchError(f"udplat did not build:\n{done.stderr[-2000:]}")
    return binary


@contextlib.contextmanager
def pinned(peer: Peer, cores: set[int]) -> Iterator[None]:
    """Every thread of the peer's processes held to ``cores`` for the block."""
    tids = [
        int(task.name)
        for proc in process_tree(peer.pid)
        for task in Path(f"/proc/{proc.pid}/task").iterdir()
    ]
    every = set(range(os.cpu_count() or 1))
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, cores)
    try:
        yield
    finally:
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, every)


def run_udplat(
    peer: Peer, datafile: Path, opts: DnsperfOptions, loop: bool, rate: int
) -> dict[str, Any]:
    """One bounded udplat run at ``rate`` (see bench/udplat.c); with ``ctx.pin``, udplat on
    the last core and the peer on the others, so that neither waits for the other's turn."""
    assert peer.ctx.udplat is not None
    argv = [str(peer.ctx.udplat), LOOPBACK, str(peer.port), str(datafile), str(rate)]
    argv += [str(opts.duration), str(opts.clients), "1" if loop else "0"]
    last = (os.cpu_count() or 1) - 1
    pin = peer.ctx.pin and last > 0
    with pinned(peer, set(range(last))) if pin else contextlib.nullcontext():
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=opts.duration + 30,
            preexec_fn=(lambda: os.sched_setaffinity(0, {last})) if pin else None,
        )
    if done.returncode != 0:
        raise BenchError(f"udplat exited {done.returncode}: {done.stderr[-2000:]}")
    stats: dict[str, Any] = json.loads(done.stdout)
    return stats


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def ratios(results: list[RunResult], baseline: str) -> dict[tuple[str, str], tuple[float, float]]:
    """(workload, server) -> (qps peer/baseline, cpu baseline/peer)."""
    base = {r.workload: r for r in results if r.server == baseline}
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for r in results:
        b = base.get(r.workload)
        if b is None or r.server == baseline:
            continue
        qx = r.qps / b.qps if b.qps else float("nan")
        cx = b.cpu_us_per_query / r.cpu_us_per_query if r.cpu_us_per_query else float("nan")
        out[(r.workload, r.server)] = (qx, cx)
    return out


def _ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return "lost" if math.isinf(value) else f"{value:.3f}"


def render_table(results: list[RunResult], baselines: Sequence[str]) -> str:
    servers = {r.server for r in results}
    baselines = [b for b in baselines if b in servers]
    rx = {b: ratios(results, b) for b in baselines}
    head = [
        "workload",
        "server",
        "qps",
        "lost%",
        "CPU us/q",
        "sys %",
        "p50 ms",
        "p99 ms",
        "RSS MiB",
        "load s",
        "host %",
    ]
    for b in baselines:
        head += [f"qps x {b}", f"cpu x {b}"]
    rows: list[list[str]] = []
    for r in results:
        lat = r.latency
        row = [
            r.workload,
            r.server,
            f"{r.qps:,.0f}",
            f"{r.lost_pct:.2f}",
            f"{r.cpu_us_per_query:.1f}",
            "-" if math.isnan(r.sys_pct) else f"{r.sys_pct:.0f}",
            _ms(lat.p50_ms if lat else None),
            _ms(lat.p99_ms if lat else None),
            f"{r.rss_kib / 1024:.0f}",
            "-" if r.load_s is None else f"{r.load_s:.2f}",
            "-" if math.isnan(r.host_busy_pct) else f"{r.host_busy_pct:.0f}",
        ]
        for b in baselines:
            pair = rx[b].get((r.workload, r.server))
            row += ["-", "-"] if pair is None else [f"{pair[0]:.2f}", f"{pair[1]:.2f}"]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [line(head), line(["-" * w for w in widths]), *map(line, rows)]
    notes = [f"  * {r.workload}/{r.server}: {n}" for r in results for n in r.notes]
    if notes:
        out += ["", "notes:", *notes]
    out += [
        "",
        "qps x B = server qps / B's (>1: more answers per second); "
        "cpu x B = B's CPU per query / server's (>1: cheaper per query).",
        "p50/p99: latency at a fixed offered rate; RSS: VmRSS of the process tree after the "
        "run; load s: exec to first correct answer; host %: the machine's CPU busy during the "
        "run (all CPUs = 100; dnsperf, NSD and the server together).",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def ensure_tools(apt_wait: float) -> None:
    """Make the tools present: wait for a running apt install, else install them (root)."""

    def missing() -> list[str]:
        return [t for t in REQUIRED_TOOLS if shutil.which(t) is None]

    if not missing():
        return
    if APT_LOG.exists():
        log(
            f"missing {missing()}; waiting up to {apt_wait:.0f}s for the apt install "
            f"({APT_LOG} gets a 'done' line)"
        )

        def apt_done() -> bool:
            try:
                lines = APT_LOG.read_text().splitlines()
                return any(ln.strip() == "done" for ln in lines)
            except OSError:
                return True

        wait_until(lambda: apt_done() or not missing(), apt_wait, 5.0)
    if missing() and os.geteuid() == 0 and shutil.which("apt-get"):
        packages = sorted({REQUIRED_TOOLS[t] for t in missing()})
        log(f"installing {packages} from Debian (apt-get, up to {apt_wait:.0f}s)")
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                ["apt-get", "install", "-y", "--no-install-recommends", *packages],
                env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                timeout=apt_wait,
            )
    if missing():
        print(f"error: missing {', '.join(missing())}; run: {APT_HINT}", file=sys.stderr)
        sys.exit(2)


SCALE_FULL = 1_000_000


def _names(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=int, help="seconds per dnsperf run (default 10, quick 3)")
    p.add_argument(
        "--latency-duration",
        type=int,
        help="seconds per fixed-rate latency run (default 5, quick 2; 0: none)",
    )
    p.add_argument("--latency-qps", type=int, default=5000, help="rate of the latency runs")
    p.add_argument(
        "--latency-tool",
        choices=("udplat", "dnsperf"),
        default="udplat",
        help="the latency runs' load: bench/udplat.c (built with the C compiler; default), "
        "or dnsperf -Q -v (the per-query lines it prints weigh on what it measures)",
    )
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="latency runs with udplat and the peer sharing every core (by default udplat "
        "has the last core and the peer the others)",
    )
    p.add_argument("--quick", action="store_true", help="short runs (3 s, latency 2 s, scale 2 s)")
    p.add_argument(
        "--names",
        type=int,
        default=0,
        help="names in the NSD zone (default: enough fresh names for every peer's unique "
        f"run at {UNIQUE_QPS_BUDGET:,} qps and mix at {MIX_QPS_BUDGET:,} qps, min 200000)",
    )
    p.add_argument("--blocked", type=int, default=1000, help="blocked names in the workloads")
    p.add_argument(
        "--cache-size",
        type=int,
        default=1_000_000,
        help="cache entries of every peer (keep it above the names a peer sees, or the "
        "unique run measures dnsmasq's cache-full eviction path)",
    )
    p.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        help=f"comma-separated peers, from {','.join(PEERS)}",
    )
    p.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    p.add_argument(
        "--baselines", default="dnsmasq,unbound", help="peers the ratios are relative to"
    )
    p.add_argument(
        "--scale-sizes",
        default="1000,100000",
        help="blocked-name counts of the policy scale runs ('' for none)",
    )
    p.add_argument("--full", action="store_true", help=f"add {SCALE_FULL:,} to --scale-sizes")
    p.add_argument(
        "--scale-servers",
        default="dnsmasq,unbound,resolver",
        help="peers of the policy scale runs",
    )
    p.add_argument(
        "--scale-duration", type=int, help="seconds per scale throughput run (default 5, quick 2)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every peer's workloads this many times, peers taking turns, and each scale "
        "size as many times on its loaded server; each row is then the run with the median "
        "CPU per query (the others in its notes)",
    )
    p.add_argument(
        "--startup-runs",
        type=int,
        default=3,
        help="starts of the resolver with the shipped policy and default config (0: none)",
    )
    p.add_argument("--clients", type=int, default=4, help="dnsperf -c")
    p.add_argument("--outstanding", type=int, default=200, help="dnsperf -q")
    p.add_argument("--timeout", type=int, default=1, help="dnsperf -t (loss timeout, s)")
    p.add_argument("--resolver-args", default="", help="extra args for 'resolver serve'")
    p.add_argument(
        "--cpu-quota",
        type=float,
        help="limit each process of each peer (each worker of resolver-w2) to this many "
        "CPUs, in a cgroup of its own: on a machine with too few cores for the workers and "
        "the load generator, this measures how workers scale (root, cgroup v1)",
    )
    p.add_argument("--apt-wait", type=float, default=300, help="max wait for apt install, s")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--json", type=Path, help="write results as JSON here")
    a = p.parse_args(argv)

    def default(value: int | None, normal: int, quick: int) -> int:
        return value if value is not None else (quick if a.quick else normal)

    a.duration = default(a.duration, 10, 3)
    a.latency_duration = default(a.latency_duration, 5, 2)
    a.scale_duration = default(a.scale_duration, 5, 2)
    a.servers = _names(a.servers)
    a.scale_servers = _names(a.scale_servers)
    a.workloads = _names(a.workloads)
    a.baselines = _names(a.baselines)
    a.scale_sizes = [int(n) for n in _names(a.scale_sizes)]
    if a.full and SCALE_FULL not in a.scale_sizes:
        a.scale_sizes.append(SCALE_FULL)
    unknown = [s for s in a.servers + a.scale_servers if s not in PEERS]
    unknown += [w for w in a.workloads if w not in {x.name for x in WORKLOADS}]
    if unknown:
        p.error(f"unknown server/workload: {unknown}")
    for opt in ("duration", "scale_duration"):
        if not (1 <= getattr(a, opt) <= 3600):
            p.error(f"--{opt.replace('_', '-')} must be 1..3600")
    if not (0 <= a.latency_duration <= 3600) or not (1 <= a.latency_qps <= 100_000):
        p.error("--latency-duration must be 0..3600 and --latency-qps 1..100000")
    if a.names and (a.names < REPEATED_SET + 1000 or a.names > 16_000_000):
        p.error("--names too small or above 16M")
    if not all(1 <= n <= 10_000_000 for n in [a.blocked, *a.scale_sizes]):
        p.error("--blocked and --scale-sizes must be 1..10M")
    if a.cpu_quota is not None:
        if not (MIN_CPU_QUOTA <= a.cpu_quota <= 64):
            p.error(f"--cpu-quota must be {MIN_CPU_QUOTA:g}..64")
        why = cpu_quota_problem()
        if why:
            p.error(f"--cpu-quota: {why}")
    return a


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def serving(server: Server) -> Iterator[float]:
    """Start ``server`` (yielding its start-up seconds) and always stop it by PID."""
    try:
        yield server.start()
    finally:
        server.stop()


def _scale_label(size: int) -> str:
    for unit, div in (("M", 1_000_000), ("k", 1000)):
        if size >= div and size % div == 0:
            return f"blocked@{size // div}{unit}"
    return f"blocked@{size}"


@dataclass
class Report:
    results: list[RunResult] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    startup_s: list[float] = field(default_factory=list)


def median_rounds(rounds: list[list[RunResult]]) -> list[RunResult]:
    """One row per (workload, server): the round with the median CPU per query, with the
    other rounds' qps and CPU in its notes. On a shared 2-core machine a single run can be
    off by 15%; the median of a few rounds, peers taking turns, is steadier."""
    if len(rounds) == 1:
        return rounds[0]
    rows: dict[tuple[str, str], list[RunResult]] = {}
    for results in rounds:
        for r in results:
            rows.setdefault((r.workload, r.server), []).append(r)
    out = []
    for runs in rows.values():
        ranked = sorted(runs, key=lambda r: r.cpu_us_per_query)
        chosen = ranked[len(ranked) // 2]
        spread = ", ".join(f"{r.qps:,.0f} qps/{r.cpu_us_per_query:.1f} us" for r in runs)
        chosen.notes.append(f"median of {len(runs)} rounds ({spread})")
        out.append(chosen)
    return out


def note_worker_headroom(results: list[RunResult]) -> None:
    """On each resolver-w2 row: how much more the machine had room for, judged by how busy
    it was with one worker (dnsperf and NSD share the same CPUs), against what two got.
    A rough bound: CPU per query falls a little as load rises (larger batches per wake)."""
    one = {r.workload: r for r in results if r.server == "resolver"}
    for r in results:
        base = one.get(r.workload)
        if r.server != "resolver-w2" or base is None or not base.host_busy_pct > 0:
            continue
        room = 100.0 / base.host_busy_pct
        r.notes.append(
            f"one worker left the machine {base.host_busy_pct:.0f}% busy: room for about "
            f"{room:.2f}x at the same CPU per query; two gained {r.qps / base.qps:.2f}x "
            f"(machine {r.host_busy_pct:.0f}% busy)"
        )


def run_peer(
    cls: type[Peer],
    ctx: BenchContext,
    nsd: NsdUpstream,
    workloads: Sequence[Workload],
    opts: DnsperfOptions,
    lat: LatencyOptions,
    report: Report,
) -> None:
    """All workloads on one peer: throughput, then latency at a fixed rate, then memory."""
    peer = cls(ctx)
    with serving(peer):
        peer.verify()
        report.versions[peer.name] = peer.version()
        for wl in workloads:
            peer.check_confined()
            log(f"{peer.name}: {wl.name} ({wl.description}), {opts.duration}s")
            r = measure(peer, nsd, wl, wl.plan(ctx, opts.duration * wl.qps_budget), opts)
            if lat.duration:
                lat_opts = replace(opts, duration=lat.duration)
                plan = wl.plan(ctx, lat.duration * lat.qps + MIX_CYCLE)
                r.latency, notes = measure_latency(peer, wl, plan, lat_opts, lat.qps)
                r.notes += notes
                r.rss_kib, r.hwm_kib = peer.memory_kib()
            log(
                f"  {r.qps:,.0f} qps, {r.cpu_us_per_query:.1f} us CPU/q, lost {r.lost_pct:.2f}%"
                + (f", p99 {_ms(r.latency.p99_ms)} ms" if r.latency else "")
            )
            report.results.append(r)


#: Distinct names of the policy scale runs (more than any answer memo keeps).
SCALE_QUERIES = 200_000


def run_scale(
    cls: type[Peer],
    ctx: BenchContext,
    nsd: NsdUpstream,
    size: int,
    opts: DnsperfOptions,
    report: Report,
    rounds: int = 1,
) -> None:
    """Policy scale: ``size`` blocked names; load time, memory, blocked-query throughput
    (with ``rounds`` > 1: that many throughput runs back to back on the one loaded server,
    the median by CPU per query reported)."""
    sctx = replace(
        ctx, workdir=ctx.workdir / f"scale-{size}", blocked=[blocked_name(i) for i in range(size)]
    )
    peer = cls(sctx)
    with serving(peer) as load_s:
        peer.verify()
        wl = WORKLOADS[0]
        names = [f"q{j}.{blocked_name(j % size)}" for j in range(SCALE_QUERIES)]
        plan = WorkloadPlan(names, warm=[], loop=True)
        runs = [measure(peer, nsd, wl, plan, opts, label=_scale_label(size)) for _ in range(rounds)]
        r = median_rounds([[run] for run in runs])[0]
        r.load_s = load_s
        log(f"  {r.workload} {peer.name}: load {load_s:.2f}s, {r.qps:,.0f} qps")
        report.results.append(r)


def run_startup(ctx: BenchContext, runs: int, report: Report) -> None:
    """Start-up of ``resolver serve`` with the default config and the shipped policy."""
    for _ in range(runs):
        with serving(ShippedResolver(ctx)) as load_s:
            report.startup_s.append(load_s)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_tools(args.apt_wait)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)

    workloads = [w for w in WORKLOADS if w.name in args.workloads]
    opts = DnsperfOptions(args.duration, args.clients, args.outstanding, args.timeout)
    lat = LatencyOptions(args.latency_duration, args.latency_qps)
    peers: list[type[Peer]] = []
    report = Report()
    for name in args.servers:
        why = PEERS[name].missing()
        if why:
            report.errors[name] = f"skipped: {why}"
            log(f"{name}: {report.errors[name]}")
        else:
            peers.append(PEERS[name])
    names = args.names or zone_size(len(peers) * args.rounds, workloads, args.duration, lat)
    workdir = Path(tempfile.mkdtemp(prefix="core_bench."))
    ctx = BenchContext(
        workdir=workdir,
        upstream_port=0,
        blocked=[blocked_name(i) for i in range(args.blocked)],
        cache_size=args.cache_size,
        resolver_args=shlex.split(args.resolver_args),
        zone_names=names,
        cpu_quota=args.cpu_quota,
        pin=not args.no_pin,
    )
    started = time.monotonic()
    try:
        if args.latency_tool == "udplat" and args.latency_duration:
            ctx.udplat = build_udplat(workdir)
            if ctx.udplat is None:
                log("no C compiler for bench/udplat.c: latency runs with dnsperf -Q -v")
        nsd = NsdUpstream(ctx, names)
        ctx.upstream_port = nsd.port
        log(f"workdir {workdir}; generating {names} names and starting nsd")
        with serving(nsd):
            nsd.verify()
            report.versions["nsd"] = nsd.version()
            rounds: list[Report] = []
            for round_no in range(args.rounds):
                if args.rounds > 1:
                    log(f"round {round_no + 1} of {args.rounds}")
                rounds.append(Report())
                for cls in peers:
                    try:
                        run_peer(cls, ctx, nsd, workloads, opts, lat, rounds[-1])
                    except BenchError as e:
                        report.errors[cls.name] = str(e)
                        log(f"{cls.name} FAILED: {e}")
            report.results += median_rounds([r.results for r in rounds])
            note_worker_headroom(report.results)
            for r in rounds:
                report.versions.update(r.versions)
            scale_opts = replace(opts, duration=args.scale_duration)
            for size in args.scale_sizes:
                for name in args.scale_servers:
                    try:
                        run_scale(PEERS[name], ctx, nsd, size, scale_opts, report, args.rounds)
                    except BenchError as e:
                        report.errors[f"{name}@{size}"] = str(e)
                        log(f"{name} with {size} blocked names FAILED: {e}")
            if args.startup_runs and not Resolver.missing():
                run_startup(ctx, args.startup_runs, report)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except BenchError as e:
        log(f"FAILED: {e}")
        return 1
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started

    print()
    print(
        f"core_bench: {args.duration}s/run, latency at {args.latency_qps} qps for "
        f"{args.latency_duration}s, dnsperf -c {args.clients} -q {args.outstanding}, "
        f"{names} zone names, {args.blocked} blocked, cache {args.cache_size}, "
        f"{os.cpu_count()} CPUs, {elapsed:.0f}s in all"
        + (f", each server process limited to {args.cpu_quota:g} CPU" if args.cpu_quota else "")
    )
    for name, ver in report.versions.items():
        print(f"  {name}: {ver}")
    print()
    order = {w.name: i for i, w in enumerate(workloads)}
    rank = {name: i for i, name in enumerate(PEERS)}
    report.results.sort(key=lambda r: (order.get(r.workload, len(order)), rank[r.server]))
    print(render_table(report.results, args.baselines))
    if report.startup_s:
        print(
            f"\nstart-up with the shipped policy (default config, exec to first NXDOMAIN): "
            f"median {statistics.median(report.startup_s):.2f}s over {len(report.startup_s)} "
            f"runs ({', '.join(f'{s:.2f}' for s in report.startup_s)})"
        )
    for name, err in report.errors.items():
        print(f"\n{name}: {err}")

    if args.json:
        write_json(args, names, report)
    bad = any("WRONG ANSWERS" in n for r in report.results for n in r.notes)
    failed = any(not e.startswith("skipped:") for e in report.errors.values())
    return 1 if failed or bad else 0


def write_json(args: argparse.Namespace, names: int, report: Report) -> None:
    doc = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "zone_names": names,
        "host": {
            "cpus": os.cpu_count(),
            "clk_tck": CLK_TCK,
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "versions": report.versions,
        "results": [asdict(r) for r in report.results],
        "ratios": [
            {
                "workload": w,
                "server": s,
                "baseline": b,
                "qps_ratio": q,
                "cpu_ratio": c,
                "qps_ratio_is": f"server/{b}",
                "cpu_ratio_is": f"{b}/server (>1: server cheaper)",
            }
            for b in args.baselines
            for (w, s), (q, c) in ratios(report.results, b).items()
        ],
        "startup_shipped_policy_s": report.startup_s,
        "errors": report.errors,
    }
    # inf (all lost) is not JSON; null says "no figure".
    text = json.dumps(doc, indent=2, default=str).replace("Infinity", "null")
    args.json.write_text(text + "\n")
    log(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
