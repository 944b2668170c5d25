"""Encrypted DNS for clients: this resolver against Unbound, in the same run (issue 19).

dnsperf ``-m dot`` (and ``-m doh`` when both serve DoH) with connection reuse, for blocked
names and cache hits: queries per second and server CPU per query (from /proc, the whole
process tree), and their ratios; then new TLS handshakes per second (``openssl s_time
-new``, bounded in time) and server CPU per handshake. Both servers get the same
certificate (a test CA made here), the same blocked names and the same upstream (a third,
plain Unbound serving the zone), and run one thread/process each.

    python3 bench/encrypted.py                        # ~2 min
    python3 bench/encrypted.py --duration 10 --rounds 3 --json /tmp/enc.json

The target of issue 19: CPU per query at least 0.8x Unbound's efficiency on DoT and DoH,
that is at most 1.25 times its CPU per query (the "cost ratio" column, resolver/Unbound).
Needs unbound, dnsperf and openssl; exits 2 without them.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dns.message
import dns.query
import dns.rcode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_bench import (
    REPO_ROOT,
    BenchError,
    ManagedProcess,
    _grab,
    free_port,
    log,
    resolver_env,
    tree_cpu_seconds,
    wait_until,
)

LOOPBACK = "127.0.0.1"
ZONE = "bench.test"
HIT_NAMES = 100


def make_pair(folder: Path) -> tuple[Path, Path]:
    """A CA and a server certificate for 127.0.0.1 and dot.bench.test (ECDSA P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dot.bench.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=10))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("dot.bench.test"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert, key_path = folder / "cert.pem", folder / "key.pem"
    pem = serialization.Encoding.PEM
    cert.write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key_path


def unbound_conf(folder: Path, lines: list[str]) -> Path:
    conf = folder / "unbound.conf"
    base = [
        "server:",
        "    do-ip6: no",
        "    num-threads: 1",
        '    username: ""',
        '    chroot: ""',
        f'    directory: "{folder}"',
        f'    pidfile: "{folder}/unbound.pid"',
        "    use-syslog: no",
        '    logfile: ""',
        "    verbosity: 0",
        '    module-config: "iterator"',
        "    do-not-query-localhost: no",
        "    qname-minimisation: no",
        "    access-control: 127.0.0.0/8 allow",
        "    ratelimit: 0",
        "    ip-ratelimit: 0",
        '    local-zone: "test." nodefault',
    ]
    conf.write_text("\n".join(base + lines) + "\n")
    return conf


@dataclass
class Peer:
    name: str
    proc: ManagedProcess
    plain: int
    dot: int
    doh: int = 0  # 0: no DoH listener


@dataclass
class Run:
    peer: str
    mode: str
    workload: str
    qps: float
    completed: int
    lost_pct: float
    cpu_us_per_query: float


@dataclass
class Handshakes:
    peer: str
    per_second: float
    connections: int
    cpu_us_per_handshake: float


@dataclass
class Report:
    runs: list[Run] = field(default_factory=list)
    handshakes: list[Handshakes] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def has_doh_listener() -> bool:
    """This checkout's resolver serves DoH (helper H's resolver/service/doh.py)."""
    return (REPO_ROOT / "resolver" / "service" / "doh.py").exists()


def start_upstream(folder: Path, taken: set[int]) -> tuple[ManagedProcess, int]:
    port = free_port(taken)
    data = [f'    local-data: "n{i}.{ZONE}. 300 IN A 192.0.2.{i % 250 + 1}"' for i in range(200)]
    conf = unbound_conf(
        folder, [f"    interface: {LOOPBACK}@{port}", f'    local-zone: "{ZONE}." static', *data]
    )
    proc = ManagedProcess("upstream", ["unbound", "-d", "-c", str(conf)], folder, folder / "log")
    return proc, port


def start_unbound(
    folder: Path, taken: set[int], upstream: int, blocked: list[str], cert: Path, key: Path
) -> Peer:
    plain, dot, doh = free_port(taken), free_port(taken), free_port(taken)
    lines = [
        f"    interface: {LOOPBACK}@{plain}",
        f"    interface: {LOOPBACK}@{dot}",
        f"    interface: {LOOPBACK}@{doh}",
        f"    tls-port: {dot}",
        f"    https-port: {doh}",
        '    http-endpoint: "/dns-query"',
        "    http-notls-downstream: no",
        f"    tls-service-key: {key}",
        f"    tls-service-pem: {cert}",
        "    incoming-num-tcp: 1000",
        *(f'    local-zone: "{n}." always_nxdomain' for n in blocked),
        "remote-control:",
        "    control-enable: no",
        "forward-zone:",
        '    name: "."',
        f"    forward-addr: {LOOPBACK}@{upstream}",
    ]
    conf = unbound_conf(folder, lines)
    check = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True)
    if check.returncode != 0:
        raise BenchError(f"unbound-checkconf: {check.stdout}{check.stderr}")
    proc = ManagedProcess("unbound", ["unbound", "-d", "-c", str(conf)], folder, folder / "log")
    return Peer("unbound", proc, plain, dot, doh)


def start_resolver(
    folder: Path, taken: set[int], upstream: int, blocked: list[str], cert: Path, key: Path
) -> Peer:
    plain, dot = free_port(taken), free_port(taken)
    doh = free_port(taken) if has_doh_listener() else 0
    lists = folder / "blocklists"
    lists.mkdir()
    (lists / "bench.txt").write_text("".join(f"{n}\n" for n in blocked))
    (lists / "bench.yaml").write_text(
        "list: bench\naction: nxdomain\ninclude: [{file: bench.txt, format: domains}]\n"
    )
    doh_conf = f"doh:\n  listen: ['{LOOPBACK}:{doh}']\n" if doh else ""
    conf = folder / "resolver.yaml"
    conf.write_text(
        f"listen: ['{LOOPBACK}:{plain}']\nupstreams: ['{LOOPBACK}:{upstream}']\n"
        f"blocklists: {lists}\ntls:\n  cert: {cert}\n  key: {key}\n"
        f"dot:\n  listen: ['{LOOPBACK}:{dot}']\n{doh_conf}"
        "tcp:\n  max_connections: 2000\n"
    )
    argv = [sys.executable, "-m", "resolver", "serve", "--config", str(conf)]
    proc = ManagedProcess("resolver", argv, REPO_ROOT, folder / "log", resolver_env())
    return Peer("resolver", proc, plain, dot, doh)


def answers(port: int, name: str) -> int | None:
    try:
        reply = dns.query.udp(dns.message.make_query(name, "A"), LOOPBACK, port=port, timeout=1)
    except Exception:
        return None
    return reply.rcode()


def dnsperf(peer: Peer, mode: str, datafile: Path, args: argparse.Namespace) -> Run:
    port = peer.dot if mode == "dot" else peer.doh
    argv = ["dnsperf", "-m", mode, "-s", LOOPBACK, "-p", str(port), "-d", str(datafile)]
    argv += ["-l", str(args.duration), "-c", str(args.clients), "-q", str(args.outstanding)]
    argv += ["-t", "2"]
    if mode == "doh":
        argv += ["-O", f"doh-uri=https://{LOOPBACK}:{port}/dns-query", "-O", "doh-method=POST"]
    before = tree_cpu_seconds(peer.proc.pid)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=args.duration + 60)
    cpu = tree_cpu_seconds(peer.proc.pid) - before
    if out.returncode != 0:
        raise BenchError(f"dnsperf {mode} against {peer.name}: {out.stdout[-2000:]}{out.stderr}")
    text = out.stdout
    completed = int(_grab(r"Queries completed:\s+(\d+)", text))
    return Run(
        peer=peer.name,
        mode=mode,
        workload=datafile.stem,
        qps=float(_grab(r"Queries per second:\s+([\d.]+)", text)),
        completed=completed,
        lost_pct=float(_grab(r"Queries lost:\s+\d+ \(([\d.]+)%\)", text)),
        cpu_us_per_query=cpu / completed * 1e6 if completed else float("nan"),
    )


def handshakes(peer: Peer, seconds: int) -> Handshakes:
    """New TLS connections (a full handshake each) for ``seconds``: openssl s_time -new."""
    argv = ["openssl", "s_time", "-connect", f"{LOOPBACK}:{peer.dot}", "-new"]
    argv += ["-time", str(seconds)]
    before = tree_cpu_seconds(peer.proc.pid)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    cpu = tree_cpu_seconds(peer.proc.pid) - before
    # "N connections in T.TTs; R connections/user sec": the -new pass (the first line).
    found = re.search(r"(\d+) connections in ([\d.]+)s", out.stdout)
    if found is None:
        raise BenchError(f"openssl s_time against {peer.name}: {out.stdout}{out.stderr}")
    count, real = int(found.group(1)), float(found.group(2))
    return Handshakes(
        peer=peer.name,
        per_second=count / real if real else 0.0,
        connections=count,
        cpu_us_per_handshake=cpu / count * 1e6 if count else float("nan"),
    )


def table(report: Report) -> str:
    lines = ["| mode | workload | server | qps | lost % | CPU us/query | cost ratio |"]
    lines.append("|---|---|---|---|---|---|---|")
    for mode in sorted({r.mode for r in report.runs}):
        for workload in sorted({r.workload for r in report.runs}):
            rows = [r for r in report.runs if r.mode == mode and r.workload == workload]
            med = {
                peer: (
                    statistics.median(r.qps for r in rows if r.peer == peer),
                    statistics.median(r.lost_pct for r in rows if r.peer == peer),
                    statistics.median(r.cpu_us_per_query for r in rows if r.peer == peer),
                )
                for peer in sorted({r.peer for r in rows})
            }
            base = med.get("unbound", (0, 0, 0))[2]
            for peer, (qps, lost, cpu) in med.items():
                ratio = f"{cpu / base:.2f}" if base else "-"
                lines.append(
                    f"| {mode} | {workload} | {peer} | {qps:,.0f} | {lost:.2f} | {cpu:.1f} | "
                    f"{ratio} |"
                )
    lines += ["", "| server | new handshakes/s | CPU us/handshake |", "|---|---|---|"]
    for h in report.handshakes:
        lines.append(f"| {h.peer} | {h.per_second:,.0f} | {h.cpu_us_per_handshake:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per dnsperf run")
    parser.add_argument("--rounds", type=int, default=1, help="runs per row (median shown)")
    parser.add_argument("--clients", type=int, default=8, help="dnsperf -c (connections)")
    parser.add_argument("--outstanding", type=int, default=100, help="dnsperf -q")
    parser.add_argument("--blocked", type=int, default=1000, help="blocked names")
    parser.add_argument("--handshake-seconds", type=int, default=5, help="openssl s_time -time")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep configs and logs")
    args = parser.parse_args()
    missing = [
        t for t in ("unbound", "unbound-checkconf", "dnsperf", "openssl") if not shutil.which(t)
    ]
    if missing:
        print(f"missing: {', '.join(missing)} (apt-get install unbound dnsperf openssl)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-encrypted-"))
    taken: set[int] = set()
    procs: list[ManagedProcess] = []
    report = Report()
    try:
        cert, key = make_pair(work)
        blocked = [f"b{i}.blocked.test" for i in range(args.blocked)]
        for sub in ("upstream", "unbound", "resolver"):
            (work / sub).mkdir()
        upstream, up_port = start_upstream(work / "upstream", taken)
        procs.append(upstream)
        if not wait_until(lambda: answers(up_port, f"n1.{ZONE}") == 0, 10):
            raise BenchError(f"the upstream does not answer: {upstream.log_tail()}")
        peers = [
            start_unbound(work / "unbound", taken, up_port, blocked, cert, key),
            start_resolver(work / "resolver", taken, up_port, blocked, cert, key),
        ]
        procs += [p.proc for p in peers]
        for peer in peers:
            if not wait_until(lambda p=peer: answers(p.plain, f"n1.{ZONE}") == 0, 30):  # type: ignore[misc]
                raise BenchError(f"{peer.name} does not answer: {peer.proc.log_tail()}")
            for i in range(HIT_NAMES):  # warm the caches: the hits workload asks these
                answers(peer.plain, f"n{i}.{ZONE}")
            if answers(peer.plain, blocked[0]) != dns.rcode.NXDOMAIN:
                raise BenchError(f"{peer.name} does not block {blocked[0]}")
        files = {
            "blocked": work / "blocked.txt",
            "hits": work / "hits.txt",
        }
        files["blocked"].write_text("".join(f"{n} A\n" for n in blocked))
        files["hits"].write_text("".join(f"n{i}.{ZONE} A\n" for i in range(HIT_NAMES)))
        if not all(p.doh for p in peers):
            report.notes.append(
                "DoH: this checkout's resolver has no DoH listener; Unbound's DoH alone"
            )
        for _ in range(args.rounds):
            for mode in ("dot", "doh"):
                for workload, datafile in files.items():
                    for peer in peers:  # taking turns, in the same run
                        if mode == "doh" and not peer.doh:
                            continue
                        run = dnsperf(peer, mode, datafile, args)
                        log(
                            f"{mode} {workload} {peer.name}: {run.qps:,.0f} qps, "
                            f"{run.cpu_us_per_query:.1f} us/query, lost {run.lost_pct}%"
                        )
                        report.runs.append(run)
        for peer in peers:
            report.handshakes.append(handshakes(peer, args.handshake_seconds))
        print(table(report))
        for note in report.notes:
            print(f"note: {note}")
        if args.json:
            args.json.write_text(json.dumps(asdict(report), indent=2))
        return 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in procs:
            proc.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept: {work}")


if __name__ == "__main__":
    sys.exit(main())
