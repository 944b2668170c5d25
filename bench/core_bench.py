#!/usr/bin/env python3
"""Core benchmark: this resolver vs. dnsmasq, same machine, same run, same load.

What it measures
----------------
An NSD instance serves a generated zone ``bench.test.`` (N ``A`` records,
``h<i>.bench.test``, TTL 3600) on 127.0.0.1:<free port>.  Every server under
test (a "peer": ``resolver`` = ``python3 -m resolver serve``, ``dnsmasq``)
forwards to that NSD and blocks the same 1,000 names ``b<i>.blocked.test``
(NXDOMAIN).  Each peer is started, verified, loaded with dnsperf for
``--duration`` seconds per workload, and stopped, one peer at a time:

* ``blocked``  -- A queries cycling through the blocked names (policy hit,
  no upstream traffic);
* ``repeated`` -- A queries cycling through 100 zone names, warmed first, so
  every query is a cache hit;
* ``unique``   -- A queries for zone names this peer has never seen (each peer
  gets its own fresh range), so every query is a cache miss forwarded to NSD.
  The data file is sent at most once (``dnsperf -n 1``); if the range runs out
  before ``--duration`` the row is flagged "names exhausted" (qps is still
  measured over the actual run time; raise ``--names`` to avoid it).

How to read the output
----------------------
``qps``          dnsperf "Queries per second" (completed queries / run time).
``lost%``        queries with no answer within ``--timeout`` seconds.
``CPU us/q``     server CPU (utime+stime of the server process tree, from
                 /proc/<pid>/stat, across the dnsperf run) divided by completed
                 queries, in microseconds.  This is the number that matters on
                 this 2-core box: dnsperf itself needs a core, so qps is partly
                 bounded by the load generator; CPU per query is not.
``lat ms``       dnsperf average latency.
``qps x``        peer qps / baseline qps            (>1: peer answers more per second).
``cpu x``        baseline CPU/q / peer CPU/q        (>1: peer is cheaper per query).
The baseline is dnsmasq (``--baseline``).  JSON ``rcode_ok_pct`` is the share of answers
with the expected rcode (NXDOMAIN for blocked, NOERROR otherwise); a row below
99% is flagged, since fast wrong answers are not a result.

In the ``unique`` workload NSD also burns CPU on the same two cores; its CPU is
recorded in the JSON (``upstream_cpu_us_per_query``) but not charged to peers.

Safety: all traffic goes to 127.0.0.1, only high free ports are used, every
load run is bounded by ``dnsperf -l`` and a subprocess timeout, and every
process this script starts is stopped by PID (also on Ctrl-C / SIGTERM).

Usage::

    python3 bench/core_bench.py [--duration 10] [--names N] [--json out.json]
                                [--servers dnsmasq,resolver] [--blocked 1000]
                                [--cache-size 1000000] [--keep]

``--names`` defaults to enough names that no peer's unique run can exhaust its
range below 50k qps (``max(200000, 100 + peers * duration * 50000)``).
``--cache-size`` is given to both peers (dnsmasq ``--cache-size``, resolver
``cache: max_entries``); keep it above the names a peer sees, or ``unique``
measures dnsmasq's cache-full eviction path (much slower) instead of misses.

Adding peers (unbound, ...) means subclassing ``Peer`` and registering it in
``PEERS``; adding workloads means appending to ``WORKLOADS``.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

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


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of the tree rooted at ``root`` (incl. reaped children)."""
    tree = process_tree(root)
    if not tree:
        return 0.0
    ticks = sum(s.ticks for s in tree) + tree[0].child_ticks
    return ticks / CLK_TCK


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


class Server(abc.ABC):
    """A DNS server process bound to 127.0.0.1:<port>."""

    name: str = "?"
    ready_timeout: float = 20.0

    def __init__(self, ctx: BenchContext) -> None:
        self.ctx = ctx
        self.port = free_port(ctx.ports)
        self.dir = ctx.workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: ManagedProcess | None = None

    @classmethod
    def missing(cls) -> str | None:
        """Reason this peer cannot run here, or None."""
        return None

    @abc.abstractmethod
    def command(self) -> tuple[list[str], Path, dict[str, str] | None]:
        """argv, cwd and env to start the server (after writing its config)."""

    def ready_probe_name(self) -> str:
        return zone_name(0)

    def log_says_ready(self, text: str) -> bool:
        return False

    def version(self) -> str:
        return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def answers(self) -> bool:
        try:
            dns_query(self.port, self.ready_probe_name(), timeout=0.5)
            return True
        except Exception:
            return False

    def start(self) -> None:
        assert self.port != 53
        argv, cwd, env = self.command()
        self.proc = ManagedProcess(self.name, argv, cwd, self.dir / "server.log", env)
        proc = self.proc

        def ready() -> bool:
            if not proc.alive():
                raise BenchError(
                    f"{self.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}"
                )
            return self.log_says_ready(proc.log_text()) or self.answers()

        if not wait_until(ready, self.ready_timeout, 0.2):
            raise BenchError(
                f"{self.name} not ready after {self.ready_timeout:.0f}s:\n{proc.log_tail()}"
            )
        # The log line may precede the socket answering by a hair; insist on an answer.
        if not wait_until(self.answers, 5.0, 0.1):
            raise BenchError(f"{self.name} logged ready but does not answer:\n{proc.log_tail()}")
        log(f"{self.name} ready on {LOOPBACK}:{self.port} (pid {self.pid})")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            log(f"stopped {self.name} (pid {self.proc.pid})")
            self.proc = None

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)


class NsdUpstream(Server):
    """Authoritative NSD serving the generated zone; the upstream of every peer."""

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

    @classmethod
    def missing(cls) -> str | None:
        return None if shutil.which("dnsmasq") else f"dnsmasq not installed ({APT_HINT})"

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


class Resolver(Peer):
    """This project: ``python3 -m resolver serve`` from the repo root."""

    name = "resolver"

    @classmethod
    def missing(cls) -> str | None:
        if not (REPO_ROOT / "resolver" / "__main__.py").exists():
            return f"{REPO_ROOT / 'resolver' / '__main__.py'} does not exist yet"
        return None

    def command(self) -> tuple[list[str], Path, dict[str, str] | None]:
        lists = self.dir / "blocklists"
        lists.mkdir(exist_ok=True)
        with open(lists / "bench.yaml", "w") as f:
            f.write("list: bench\naction: nxdomain\ndomains:\n")
            f.writelines(f"  - {n}\n" for n in self.ctx.blocked)
        # Same cache capacity as dnsmasq's --cache-size; flags below override the rest.
        conf = self.dir / "resolver.yaml"
        conf.write_text(f"cache:\n  max_entries: {self.ctx.cache_size}\n")
        argv = [
            sys.executable,
            "-m",
            "resolver",
            "serve",
            "--config",
            str(conf),
            "--listen",
            f"{LOOPBACK}:{self.port}",
            "--upstream",
            f"{LOOPBACK}:{self.ctx.upstream_port}",
            "--blocklists",
            str(lists),
            *self.ctx.resolver_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return argv, REPO_ROOT, env

    def log_says_ready(self, text: str) -> bool:
        return f"listening on udp {LOOPBACK}:{self.port}" in text

    def version(self) -> str:
        init = (REPO_ROOT / "resolver" / "__init__.py").read_text()
        m = re.search(r"__version__\s*=\s*[\"']([^\"']+)", init)
        return (
            f"resolver {m.group(1) if m else '?'} on python {platform.python_version()} "
            f"(cache max_entries {self.ctx.cache_size})"
        )


class Unbound(Peer):
    """Unbound, one thread, iterator only (no validation), forwarding everything to NSD."""

    name = "unbound"

    @classmethod
    def missing(cls) -> str | None:
        return None if shutil.which("unbound") else f"unbound not installed ({APT_HINT})"

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


PEERS: dict[str, type[Peer]] = {"dnsmasq": Dnsmasq, "unbound": Unbound, "resolver": Resolver}


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadPlan:
    names: list[str]
    warm: bool  # query every name once before measuring
    loop: bool  # False: send the data file at most once (dnsperf -n 1)


@dataclass(frozen=True)
class Workload:
    name: str
    expected_rcode: str
    description: str
    # (ctx, peer index, peer count, zone size) -> plan
    plan: Callable[[BenchContext, int, int, int], WorkloadPlan]


REPEATED_SET = 100
UNIQUE_QPS_BUDGET = 50_000  # fresh names reserved per peer per second of the unique run


def _blocked_plan(ctx: BenchContext, k: int, n_peers: int, n_names: int) -> WorkloadPlan:
    return WorkloadPlan(ctx.blocked, warm=False, loop=True)


def _repeated_plan(ctx: BenchContext, k: int, n_peers: int, n_names: int) -> WorkloadPlan:
    return WorkloadPlan([zone_name(i) for i in range(REPEATED_SET)], warm=True, loop=True)


def _unique_plan(ctx: BenchContext, k: int, n_peers: int, n_names: int) -> WorkloadPlan:
    # Names [REPEATED_SET, n_names) are split into one fresh range per peer.
    span = (n_names - REPEATED_SET) // n_peers
    lo = REPEATED_SET + k * span
    return WorkloadPlan([zone_name(i) for i in range(lo, lo + span)], warm=False, loop=False)


WORKLOADS: list[Workload] = [
    Workload("blocked", "NXDOMAIN", "blocked names (policy hit)", _blocked_plan),
    Workload(
        "repeated", "NOERROR", f"{REPEATED_SET} warmed zone names (cache hit)", _repeated_plan
    ),
    Workload("unique", "NOERROR", "never-seen zone names (cache miss -> NSD)", _unique_plan),
]


# --------------------------------------------------------------------------
# dnsperf
# --------------------------------------------------------------------------


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
    rcodes: dict[str, int]
    expected_rcode: str
    rcode_ok_pct: float
    data_names: int
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
class DnsperfStats:
    sent: int
    completed: int
    lost: int
    lost_pct: float
    qps: float
    run_time_s: float
    avg_latency_ms: float
    rcodes: dict[str, int]


def run_dnsperf(port: int, datafile: Path, opts: DnsperfOptions, loop: bool) -> DnsperfStats:
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
        raise BenchError(f"dnsperf exited {proc.returncode}:\n{out}")
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
    )


def measure(
    peer: Peer, nsd: NsdUpstream, wl: Workload, plan: WorkloadPlan, opts: DnsperfOptions
) -> RunResult:
    datafile = peer.dir / f"{wl.name}.txt"
    datafile.write_text("".join(f"{n} A\n" for n in plan.names))
    if plan.warm:
        for n in plan.names:
            dns_query(peer.port, n, timeout=2.0)
    time.sleep(0.3)  # let the server go idle before the CPU snapshot
    cpu0, up0 = peer.cpu_seconds(), nsd.cpu_seconds()
    stats = run_dnsperf(peer.port, datafile, opts, plan.loop)
    cpu1, up1 = peer.cpu_seconds(), nsd.cpu_seconds()
    if not peer.proc or not peer.proc.alive():
        raise BenchError(f"{peer.name} died during {wl.name}")
    completed = stats.completed

    def per_query_us(cpu_s: float) -> float:
        return cpu_s * 1e6 / completed if completed else float("nan")

    ok = 100.0 * stats.rcodes.get(wl.expected_rcode, 0) / completed if completed else 0.0
    notes: list[str] = []
    if not plan.loop and stats.sent >= len(plan.names):
        notes.append(
            f"names exhausted after {stats.run_time_s:.1f}s "
            f"({len(plan.names)} names; raise --names)"
        )
    if ok < 99.0:
        notes.append(f"WRONG ANSWERS: only {ok:.1f}% {wl.expected_rcode}, got {stats.rcodes}")
    return RunResult(
        workload=wl.name,
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
        rcodes=stats.rcodes,
        expected_rcode=wl.expected_rcode,
        rcode_ok_pct=ok,
        data_names=len(plan.names),
        notes=notes,
    )


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


def render_table(results: list[RunResult], baseline: str) -> str:
    rx = ratios(results, baseline)
    head = (
        "workload",
        "server",
        "qps",
        "lost%",
        "CPU us/q",
        "lat ms",
        f"qps x (peer/{baseline})",
        f"cpu x ({baseline}/peer)",
    )
    rows: list[tuple[str, ...]] = []
    for r in results:
        q, c = rx.get((r.workload, r.server), (None, None))
        rows.append(
            (
                r.workload,
                r.server,
                f"{r.qps:,.0f}",
                f"{r.lost_pct:.2f}",
                f"{r.cpu_us_per_query:.1f}",
                f"{r.avg_latency_ms:.3f}",
                "-" if q is None else f"{q:.2f}",
                "-" if c is None else f"{c:.2f}",
            )
        )
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [line(head), line(tuple("-" * w for w in widths)), *map(line, rows)]
    notes = [f"  * {r.workload}/{r.server}: {n}" for r in results for n in r.notes]
    if notes:
        out += ["", "notes:", *notes]
    out += [
        "",
        f"qps x > 1: peer answers more queries/s than {baseline}; "
        f"cpu x > 1: peer uses less server CPU per query than {baseline}.",
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds per dnsperf run")
    p.add_argument(
        "--names",
        type=int,
        default=0,
        help="names in the NSD zone (default: enough fresh names for every "
        f"peer's unique run at {UNIQUE_QPS_BUDGET:,} qps, min 200000)",
    )
    p.add_argument("--blocked", type=int, default=1000, help="blocked names")
    p.add_argument(
        "--cache-size",
        type=int,
        default=1_000_000,
        help="dnsmasq --cache-size (keep it above the names a peer sees, or "
        "the unique run measures dnsmasq's cache-full eviction path)",
    )
    p.add_argument(
        "--servers",
        default="dnsmasq,resolver",
        help=f"comma-separated peers, from {','.join(PEERS)}",
    )
    p.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    p.add_argument("--baseline", default="dnsmasq", help="peer the ratios are relative to")
    p.add_argument("--clients", type=int, default=4, help="dnsperf -c")
    p.add_argument("--outstanding", type=int, default=200, help="dnsperf -q")
    p.add_argument("--timeout", type=int, default=1, help="dnsperf -t (loss timeout, s)")
    p.add_argument("--resolver-args", default="", help="extra args for 'resolver serve'")
    p.add_argument("--apt-wait", type=float, default=300, help="max wait for apt install, s")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--json", type=Path, help="write results as JSON here")
    a = p.parse_args(argv)
    a.servers = [s for s in a.servers.split(",") if s]
    a.workloads = [w for w in a.workloads.split(",") if w]
    unknown = [s for s in a.servers if s not in PEERS]
    unknown += [w for w in a.workloads if w not in {x.name for x in WORKLOADS}]
    if unknown:
        p.error(f"unknown server/workload: {unknown}")
    if not (1 <= a.duration <= 3600):
        p.error("--duration must be 1..3600")
    if a.names == 0:
        a.names = max(200_000, REPEATED_SET + len(a.servers) * a.duration * UNIQUE_QPS_BUDGET)
    if a.names < REPEATED_SET + 1000 * len(a.servers) or a.names > 16_000_000:
        p.error("--names too small or above 16M")
    if not (1 <= a.blocked <= 10_000_000):
        p.error("--blocked must be 1..10M")
    return a


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_tools(args.apt_wait)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)

    workloads = [w for w in WORKLOADS if w.name in args.workloads]
    opts = DnsperfOptions(args.duration, args.clients, args.outstanding, args.timeout)
    workdir = Path(tempfile.mkdtemp(prefix="core_bench."))
    ctx = BenchContext(
        workdir=workdir,
        upstream_port=0,
        blocked=[blocked_name(i) for i in range(args.blocked)],
        cache_size=args.cache_size,
        resolver_args=shlex.split(args.resolver_args),
    )
    results: list[RunResult] = []
    errors: dict[str, str] = {}
    versions: dict[str, str] = {}
    running: list[Server] = []
    try:
        nsd = NsdUpstream(ctx, args.names)
        ctx.upstream_port = nsd.port
        log(f"workdir {workdir}; generating {args.names} names and starting nsd")
        running.append(nsd)
        nsd.start()
        nsd.verify()
        versions["nsd"] = nsd.version()

        for k, name in enumerate(args.servers):
            cls = PEERS[name]
            why = cls.missing()
            if why:
                errors[name] = f"skipped: {why}"
                log(f"{name}: {errors[name]}")
                continue
            peer = cls(ctx)
            running.append(peer)
            try:
                peer.start()
                peer.verify()
                versions[name] = peer.version()
                for wl in workloads:
                    plan = wl.plan(ctx, k, len(args.servers), args.names)
                    log(f"{name}: {wl.name} ({wl.description}), {args.duration}s")
                    r = measure(peer, nsd, wl, plan, opts)
                    log(
                        f"  {r.qps:,.0f} qps, {r.cpu_us_per_query:.1f} us CPU/q, "
                        f"lost {r.lost_pct:.2f}%"
                    )
                    results.append(r)
            except BenchError as e:
                errors[name] = str(e)
                log(f"{name} FAILED: {e}")
            finally:
                peer.stop()
                running.remove(peer)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except BenchError as e:
        log(f"FAILED: {e}")
        return 1
    finally:
        for srv in reversed(running):
            srv.stop()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(
        f"core_bench: {args.duration}s/run, dnsperf -c {args.clients} -q {args.outstanding}, "
        f"{args.names} zone names, {args.blocked} blocked, dnsmasq cache {args.cache_size}, "
        f"{os.cpu_count()} CPUs"
    )
    for name, ver in versions.items():
        print(f"  {name}: {ver}")
    print()
    print(render_table(results, args.baseline))
    for name, err in errors.items():
        print(f"\n{name}: {err}")

    if args.json:
        doc = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "host": {
                "cpus": os.cpu_count(),
                "clk_tck": CLK_TCK,
                "kernel": platform.release(),
                "python": platform.python_version(),
            },
            "versions": versions,
            "results": [asdict(r) for r in results],
            "ratios": [
                {
                    "workload": w,
                    "server": s,
                    "qps_ratio": q,
                    "cpu_ratio": c,
                    "qps_ratio_is": f"server/{args.baseline}",
                    "cpu_ratio_is": f"{args.baseline}/server (>1: server cheaper)",
                }
                for (w, s), (q, c) in ratios(results, args.baseline).items()
            ],
            "errors": errors,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {args.json}")
    bad = any("WRONG ANSWERS" in n for r in results for n in r.notes)
    return 1 if errors or bad else 0


if __name__ == "__main__":
    sys.exit(main())
