"""Issue 17, item 25: reloading a large list under load loses no query.

The server (a real process) holds 200,000 imported names; a client sends a steady stream of
UDP queries while the list is rewritten and reloaded. Every query must be answered, with an
answer of the old or the new policy, and the answers must switch to the new policy. The load
must have run in a child of the policy builder, not in the server (whose GIL it would hold).
The 1,000,000-name figures come from ``bench/reload_under_load.py --names 1000000``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode

from .helpers.fakeupstream import FakeUpstream
from .helpers.realservers import ResolverProcess, free_port

NAMES = 200_000
QPS = 300
KEPT = "host7.big7.example"  # blocked before and after
DROPPED = "host3.big3.example"  # blocked before, gone from the new list
ADDED = "added5.example"  # in the new list only
ALLOWED = "ok.example.test"  # never listed


def big_list(path: Path, first: bool) -> None:
    with path.open("w") as out:
        for n in range(NAMES):
            if first or n % 10 != 3:
                out.write(f"host{n}.big{n % 1000}.example\n")
        if not first:
            out.write("".join(f"added{n}.example\n" for n in range(1000)))


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def reaped_cpu_ticks(pid: int) -> int:
    """CPU time of the children ``pid`` has waited for (cutime + cstime, clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[13]) + int(fields[14])


class Client(threading.Thread):
    """A bounded, steady stream of queries; each needs an answer within 2 s that either
    policy could give."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.sent = self.answered = self.lost = 0
        self.wrong: list[str] = []

    def run(self) -> None:
        names = [KEPT, ALLOWED, DROPPED, ADDED] + [
            f"host{n}.big{n % 1000}.example" for n in range(0, NAMES, 997) if n % 10 != 3
        ]
        either = (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
        expect = {KEPT: (dns.rcode.NXDOMAIN,), ALLOWED: (dns.rcode.NOERROR,)}
        pending: dict[int, tuple[float, str]] = {}
        started = time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            index = 0
            while not self.stop.is_set() and time.monotonic() - started < 60:
                name = names[index % len(names)]
                query = dns.message.make_query(name, "A")
                query.id = index % 65536
                sock.sendto(query.to_wire(), ("127.0.0.1", self.port))
                pending[query.id] = (time.monotonic(), name)
                self.sent += 1
                index += 1
                self._receive(sock, pending, expect, either)
                time.sleep(1 / QPS)
            deadline = time.monotonic() + 2
            while pending and time.monotonic() < deadline:
                self._receive(sock, pending, expect, either)
                time.sleep(0.01)
        self.lost += len(pending)

    def _receive(
        self,
        sock: socket.socket,
        pending: dict[int, tuple[float, str]],
        expect: dict[str, tuple[int, ...]],
        either: tuple[int, ...],
    ) -> None:
        try:
            while True:
                reply = dns.message.from_wire(sock.recv(4096))
                _, name = pending.pop(reply.id, (0.0, ""))
                if name:
                    self.answered += 1
                    if reply.rcode() not in expect.get(name, either):
                        self.wrong.append(f"{name}: {dns.rcode.to_text(reply.rcode())}")
        except BlockingIOError:
            pass
        now = time.monotonic()
        for qid, (sent_at, _) in list(pending.items()):
            if now - sent_at > 2:
                del pending[qid]
                self.lost += 1


def rcode(port: int, name: str) -> int:
    reply = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=2)
    return int(reply.rcode())


def test_reload_of_200k_names_under_load_loses_no_query(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    (lists / "data").mkdir(parents=True)
    big_list(lists / "data" / "big.txt", first=True)
    (lists / "big.yaml").write_text("list: big\ninclude: [{file: data/big.txt, format: domains}]\n")
    config = tmp_path / "resolver.yaml"
    config.write_text("blocklists: lists\nreload: {interval: 0.2, debounce: 0.2}\n")
    upstream = FakeUpstream(
        records={
            (ALLOWED, "A"): ["192.0.2.81"],
            (DROPPED, "A"): ["192.0.2.82"],
            (ADDED, "A"): ["192.0.2.83"],
        }
    )
    resolver = ResolverProcess(
        "--config",
        str(config),
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--upstream",
        upstream.address,
        timeout=60,
    )
    client = Client(resolver.port)
    try:
        builders = children(resolver.proc.pid)
        assert len(builders) == 1, "the policy builder process runs beside the server"
        assert rcode(resolver.port, DROPPED) == dns.rcode.NXDOMAIN
        assert rcode(resolver.port, ADDED) == dns.rcode.NOERROR
        ticks = reaped_cpu_ticks(builders[0])
        client.start()
        time.sleep(0.5)
        before = len(resolver.lines)
        big_list(lists / "data" / "big.txt", first=False)
        resolver.wait_for("reloaded in", 40, since=before)
        deadline = time.monotonic() + 10
        while rcode(resolver.port, ADDED) != dns.rcode.NXDOMAIN and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # some queries answered by the new policy
        client.stop.set()
        client.join(10)
        assert rcode(resolver.port, ADDED) == dns.rcode.NXDOMAIN
        assert rcode(resolver.port, DROPPED) == dns.rcode.NOERROR
        assert rcode(resolver.port, KEPT) == dns.rcode.NXDOMAIN
        # The load's CPU was spent in a child of the builder, which the builder waited for.
        assert reaped_cpu_ticks(builders[0]) > ticks
    finally:
        client.stop.set()
        resolver.stop()
        upstream.close()
    assert client.sent > 0
    assert client.lost == 0, f"{client.lost} of {client.sent} queries lost"
    assert client.answered == client.sent
    assert client.wrong == []
    assert not running(builders[0]), "the builder ends with the server"


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
