#!/usr/bin/env python3
"""Hot reload under load: no query fails while a large policy is reloaded again and again.

Starts the resolver (a real process) with a 100,000-name policy (``--names``) and a small
list that the benchmark edits, and a loopback upstream. A client thread sends a bounded,
steady stream of UDP queries (``--qps`` for at most ``--seconds``), each waiting up to 1 s
for its answer. Meanwhile the benchmark edits the small list ``--reloads`` times: good edits
alternately block and unblock one name (and time how long until a separate probe sees the
answer flip), every fourth edit is a broken one (bad YAML, then a bad date) that must be
reported and change nothing. Prints: queries sent, answered, lost (no answer within 1 s),
wrong (an unexpected rcode), the p50, p99 and worst latency over the whole run and over the
reload windows alone (from an edit until the probe sees its effect, or the failure is
logged), the flip times, and the resolver's own reload times from its log.

Run: ``python3 bench/reload_under_load.py [--names 100000] [--reloads 20] [--qps 2000]``.
With ``--names 1000000`` a reload takes seconds: ``--wait`` bounds each (60 s by default).
``--checkout DIR`` runs the resolver of another checkout (e.g. main, for a before/after).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import realservers  # noqa: E402
from tests.helpers.fakeupstream import FakeUpstream  # noqa: E402
from tests.helpers.realservers import NSD, ResolverProcess, free_port  # noqa: E402

FLIP = "flip.example.test"


class Client(threading.Thread):
    """Steady UDP load: one query every 1/qps s, each answered within 1 s or failed."""

    def __init__(self, port: int, names: list[str], qps: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.port, self.names, self.qps, self.seconds = port, names, qps, seconds
        self.latencies: list[float] = []
        #: (sent at, latency) of every answered query, to look at the reload windows.
        self.timed: list[tuple[float, float]] = []
        self.failures: list[str] = []
        self.lost = 0
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        pending: dict[int, tuple[float, str]] = {}
        interval = 1.0 / self.qps
        started = time.monotonic()
        next_send = started
        rng = random.Random(1)
        while not self.stop.is_set() and time.monotonic() - started < self.seconds:
            now = time.monotonic()
            if now >= next_send:
                name = rng.choice(self.names)
                query = dns.message.make_query(name, "A")
                while query.id in pending:
                    query.id = rng.randrange(65536)
                sock.sendto(query.to_wire(), ("127.0.0.1", self.port))
                pending[query.id] = (now, name)
                self.sent += 1
                next_send += interval
            try:
                while True:
                    data = sock.recv(4096)
                    reply = dns.message.from_wire(data)
                    sent_at, name = pending.pop(reply.id, (None, ""))
                    if sent_at is None:
                        continue
                    self.latencies.append(time.monotonic() - sent_at)
                    self.timed.append((sent_at, self.latencies[-1]))
                    if reply.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                        self.failures.append(f"{name}: {dns.rcode.to_text(reply.rcode())}")
            except BlockingIOError:
                pass
            for qid, (sent_at, name) in list(pending.items()):
                if time.monotonic() - sent_at > 1.0:
                    del pending[qid]
                    self.lost += 1
                    self.failures.append(f"{name}: no answer within 1 s")
            time.sleep(min(max(next_send - time.monotonic(), 0), 0.0005))
        deadline = time.monotonic() + 1.0
        while pending and time.monotonic() < deadline:
            try:
                reply = dns.message.from_wire(sock.recv(4096))
                sent_at, _ = pending.pop(reply.id, (None, ""))
                if sent_at is not None:
                    self.latencies.append(time.monotonic() - sent_at)
                    self.timed.append((sent_at, self.latencies[-1]))
            except BlockingIOError:
                time.sleep(0.001)
        self.lost += len(pending)
        self.failures += [f"{name}: no answer within 1 s" for _, name in pending.values()]
        sock.close()


def memory_of(pid: int) -> dict[str, float]:
    """Resident and proportional (shared pages split) memory, MiB, of the server and of
    its child processes (the policy builder)."""

    def kib(path: str, key: str) -> int:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    kids = [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and _parent(int(entry)) == pid
    ]
    return {
        "server_rss_mib": kib(f"/proc/{pid}/status", "VmRSS") / 1024,
        "server_pss_mib": kib(f"/proc/{pid}/smaps_rollup", "Pss") / 1024,
        "children": len(kids),
        "children_pss_mib": sum(kib(f"/proc/{k}/smaps_rollup", "Pss") for k in kids) / 1024,
    }


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", type=int, default=100_000)
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--qps", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=120.0, help="upper bound of the load")
    parser.add_argument("--wait", type=float, default=60.0, help="bound of one reload (s)")
    parser.add_argument("--checkout", type=Path, help="run the resolver of this checkout")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.checkout:
        realservers.ROOT = args.checkout.resolve()  # the resolver runs from its root

    upstream = FakeUpstream(
        records={(FLIP, "A"): ["192.0.2.80"], ("ok.example.test", "A"): ["192.0.2.81"]}
    )
    with tempfile.TemporaryDirectory(prefix="reload-bench-") as tmp:
        folder = Path(tmp)
        lists = folder / "lists"
        (lists / "data").mkdir(parents=True)
        with (lists / "data" / "big.txt").open("w") as out:
            for n in range(args.names):
                out.write(f"host{n}.big{n % 1000}.example\n")
        (lists / "big.yaml").write_text(
            "list: big\ninclude: [{file: data/big.txt, format: domains}]\n"
        )
        edited = lists / "edited.yaml"
        edited.write_text("list: edited\ndomains: [unrelated.example]\n")
        config = folder / "resolver.yaml"
        config.write_text("blocklists: lists\nreload: {interval: 0.2, debounce: 0.2}\n")
        resolver = ResolverProcess(
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--upstream",
            upstream.address,
            timeout=max(60, args.wait),
        )
        names = [
            f"host{n}.big{n % 1000}.example"
            for n in range(0, args.names, max(1, args.names // 500))
        ]
        names += [FLIP, "ok.example.test"] * 50
        client = Client(resolver.port, names, args.qps, args.seconds)
        client.start()
        flips: list[float] = []
        windows: list[tuple[float, float]] = []
        bad_reported = 0
        probe_timeouts = 0
        try:
            blocked = False
            for index in range(args.reloads):
                time.sleep(1.0)
                if index % 4 == 3:
                    broken = (
                        "list: edited\ndomains: ["
                        if index % 8 == 3
                        else ("list: edited\nactive: {from: 2025-02-30}\ndomains: [x.example]\n")
                    )
                    before = len(resolver.lines)
                    wrote = time.monotonic()
                    edited.write_text(broken)
                    resolver.wait_for("reload failed, keeping policy", args.wait, since=before)
                    windows.append((wrote, time.monotonic()))
                    bad_reported += 1
                    continue
                blocked = not blocked
                domains = f"[{FLIP}]" if blocked else "[unrelated.example]"
                wrote = time.monotonic()
                edited.write_text(f"list: edited\ndomains: {domains}\n")
                want = dns.rcode.NXDOMAIN if blocked else dns.rcode.NOERROR
                while True:
                    probe = dns.message.make_query(FLIP, "A")
                    try:
                        reply = dns.query.udp(probe, "127.0.0.1", port=resolver.port, timeout=2)
                    except dns.exception.Timeout:
                        probe_timeouts += 1
                        continue
                    if reply.rcode() == want:
                        flips.append(time.monotonic() - wrote)
                        break
                    if time.monotonic() - wrote > args.wait:
                        flips.append(float("inf"))
                        break
                    time.sleep(0.02)
                windows.append((wrote, time.monotonic()))
            memory = memory_of(resolver.proc.pid)
        finally:
            client.stop.set()
            client.join()
            resolver.stop()
            if isinstance(upstream, NSD):
                upstream.stop()
            else:
                upstream.close()
        reload_times = [
            float(m.group(1))
            for line in resolver.lines
            if (m := re.search(r"reloaded in ([0-9.]+) s", line))
        ]
    lat = sorted(client.latencies)
    during = sorted(
        latency
        for sent_at, latency in client.timed
        if any(start <= sent_at <= end for start, end in windows)
    )

    def ms(values: list[float], q: float) -> float | None:
        return 1000 * values[min(len(values) - 1, int(len(values) * q))] if values else None

    result = {
        "names": args.names,
        "checkout": str(realservers.ROOT),
        "reloads": args.reloads,
        "good_reloads_seen": len(reload_times),
        "bad_edits_reported": bad_reported,
        "queries_sent": client.sent,
        "answered": len(lat),
        "failed": len(client.failures),
        "lost": client.lost,
        "wrong": len(client.failures) - client.lost,
        "failures": client.failures[:10],
        "latency_p50_ms": ms(lat, 0.5),
        "latency_p99_ms": ms(lat, 0.99),
        "latency_p999_ms": ms(lat, 0.999),
        "latency_max_ms": 1000 * lat[-1] if lat else None,
        "reload_window_seconds": round(sum(end - start for start, end in windows), 1),
        "reload_window_answered": len(during),
        "reload_window_p99_ms": ms(during, 0.99),
        "reload_window_max_ms": 1000 * during[-1] if during else None,
        "flip_seconds_max": max(flips) if flips else None,
        "memory_after": memory,
        "probe_timeouts": probe_timeouts,
        "flip_seconds": [round(f, 3) for f in flips],
        "reload_seconds_mean": statistics.mean(reload_times) if reload_times else None,
        "reload_seconds_max": max(reload_times) if reload_times else None,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    ok = result["failed"] == 0 and flips and max(flips) <= args.wait
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
