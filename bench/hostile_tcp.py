#!/usr/bin/env python3
"""A TCP client that pipelines queries and never reads: how much does the server grow?

Issue 17, item 1. Starts the resolver (a real process, ``python -m resolver serve`` from
``--root``, default this checkout) with a loopback upstream that serves a large TXT answer
(``--answer-kb``) and a list that blocks one name. For each attack (``--attacks``):
``large`` asks for the (cached) large answer, ``blocked`` for the blocked name, both
answered at once without an upstream. One client connects with a small receive buffer,
sends pipelined queries in small writes (``--batch`` per write) and reads nothing, for at
most ``--seconds`` or ``--max-kib`` sent, stopping early when the server has grown by
``--rss-cap-mib`` (the machine is shared). Then the client stays connected without reading
for ``--idle-timeout`` (the server's ``tcp.idle_timeout``) plus 2 s, then closes.

Prints per attack: KiB sent, the server's resident memory (VmRSS from /proc) growth at
its peak, after the idle timeout, and after the client left; and whether the server had
closed the connection by then. A fresh server for each attack.

Run: ``python3 bench/hostile_tcp.py`` (this checkout) and
``python3 bench/hostile_tcp.py --root /work/main`` (another checkout, e.g. before a fix).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import dns.message
import dns.query

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.fakeupstream import FakeUpstream  # noqa: E402
from tests.helpers.realservers import free_port  # noqa: E402

LIST = """\
list: hostile
action: nxdomain
domains:
  - blocked.test
"""

KiB = 1024
MiB = 1024 * 1024


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    return 0


class Server:
    """The resolver from ``root`` as a child process, on a free port of 127.0.0.1."""

    def __init__(self, root: Path, upstream: str, folder: Path, idle_timeout: float) -> None:
        self.port = free_port()
        config = folder / "resolver.yaml"
        config.write_text(
            f"listen: ['127.0.0.1:{self.port}']\n"
            f"upstreams: ['{upstream}']\n"
            f"blocklists: {folder / 'lists'}\n"
            f"upstream_timeout: 2.0\n"
            f"tcp:\n  idle_timeout: {idle_timeout}\n"
        )
        env = dict(os.environ, PYTHONPATH=str(root))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resolver", "serve", "--config", str(config)],
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(30):
            self.stop()
            raise SystemExit("the resolver did not start:\n" + "\n".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if "ready (" in line:
                self._ready.set()

    def rss(self) -> int:
        return rss(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed or reset the connection (reading what is there)."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def attack(server: Server, name: str, rtype: str, args: argparse.Namespace) -> dict[str, object]:
    query = dns.message.make_query(name, rtype).to_wire()
    chunk = (struct.pack("!H", len(query)) + query) * args.batch
    before = server.rss()
    peak = before
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", server.port))
    client.setblocking(False)
    sent = 0
    started = time.monotonic()
    sampled = started
    view = memoryview(chunk)
    offset = 0
    stopped_by = "volume"
    while sent < args.max_kib * KiB:
        now = time.monotonic()
        if now - started >= args.seconds:
            stopped_by = "time"
            break
        if now - sampled >= 0.1:
            sampled = now
            peak = max(peak, server.rss())
            if peak - before >= args.rss_cap_mib * MiB:
                stopped_by = "rss cap"
                break
        try:
            n = client.send(view[offset:])
        except BlockingIOError:
            time.sleep(0.01)  # the server is not reading: its buffers are full
            continue
        except OSError:
            stopped_by = "closed by the server"
            break
        sent += n
        offset = (offset + n) % len(chunk)
        time.sleep(0.001)
    sending = time.monotonic() - started
    # Quiet, still connected, still not reading, for the idle timeout and a margin.
    end = time.monotonic() + args.idle_timeout + 2.0
    while time.monotonic() < end:
        peak = max(peak, server.rss())
        time.sleep(0.1)
    after_idle = server.rss()
    server_closed = closed_by_server(client)
    client.close()
    time.sleep(1.0)
    after_close = server.rss()
    return {
        "attack": f"{name} {rtype}",
        "sent_kib": round(sent / KiB, 1),
        "seconds_sending": round(sending, 2),
        "stopped_by": stopped_by,
        "rss_before_mib": round(before / MiB, 1),
        "peak_growth_mib": round((peak - before) / MiB, 1),
        "growth_after_idle_mib": round((after_idle - before) / MiB, 1),
        "growth_after_close_mib": round((after_close - before) / MiB, 1),
        "closed_by_server_after_idle": server_closed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose resolver runs")
    parser.add_argument("--attacks", default="large,blocked", help="large, blocked (comma list)")
    parser.add_argument("--seconds", type=float, default=9.0, help="at most this long sending")
    parser.add_argument("--max-kib", type=float, default=640.0, help="at most this much sent")
    parser.add_argument("--rss-cap-mib", type=float, default=1024.0, help="stop when grown by")
    parser.add_argument("--answer-kb", type=int, default=32, help="size of the large answer")
    parser.add_argument("--batch", type=int, default=25, help="queries per write")
    parser.add_argument("--idle-timeout", type=float, default=3.0, help="tcp.idle_timeout")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    strings = max(1, args.answer_kb * 1000 // 250)
    upstream = FakeUpstream(
        records={("large.test", "TXT"): [f'"{i:04d}{"z" * 240}"' for i in range(strings)]}
    )
    results = []
    try:
        for kind in args.attacks.split(","):
            name, rtype = {"large": ("large.test", "TXT"), "blocked": ("blocked.test", "A")}[kind]
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                (folder / "lists").mkdir()
                (folder / "lists" / "hostile.yaml").write_text(LIST)
                server = Server(args.root, upstream.address, folder, args.idle_timeout)
                try:
                    warm = dns.query.tcp(
                        dns.message.make_query(name, rtype),
                        "127.0.0.1",
                        port=server.port,
                        timeout=5,
                    )
                    size = len(warm.to_wire())
                    time.sleep(0.5)
                    result = attack(server, name, rtype, args)
                    result["answer_bytes"] = size
                    results.append(result)
                finally:
                    server.stop()
    finally:
        upstream.close()

    print(f"resolver from {args.root}")
    for result in results:
        print(
            f"{result['attack']:>16}: {result['answer_bytes']} B answers; sent "
            f"{result['sent_kib']} KiB in {result['seconds_sending']} s ({result['stopped_by']}); "
            f"RSS {result['rss_before_mib']} MiB, grew {result['peak_growth_mib']} MiB at peak, "
            f"{result['growth_after_idle_mib']} MiB after the idle timeout "
            f"(closed by the server: {result['closed_by_server_after_idle']}), "
            f"{result['growth_after_close_mib']} MiB after the client left"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
