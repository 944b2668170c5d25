#!/usr/bin/env python3
"""A hostile client against the metrics (or admin) HTTP listener: how much memory it makes
the resolver hold (issue 17, item 5).

Starts ``python -m resolver serve`` with /metrics and the admin API on loopback, opens
``--connections`` connections to the metrics port, and on each sends what the attack of the
issue sent: header lines of 8000 bytes (``--header-bytes`` in all), a Content-Length of
1 MiB and ``--body-bytes`` of that body, then waits, never finishing the request. It
reports the server's resident memory (VmRSS of /proc/PID/status) before, at its peak and
after, how many connections the server had closed by the end, and whether a normal scrape
still works meanwhile. The resolver is imported from ``PYTHONPATH`` (default: this
checkout), so the same script measures another branch:

    python3 bench/hostile_http.py                              # this checkout
    PYTHONPATH=/work/main python3 bench/hostile_http.py        # main, the version before
    python3 bench/hostile_http.py --connections 200 --json out.json

Every loop is bounded: ``--connections`` sockets, ``--seconds`` of sending, loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def payload(port: int, header_bytes: int, body_bytes: int, slow: bool = False) -> bytes:
    lines = [f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()]
    if slow:  # one header line, never finished: the server can only wait or give up
        return lines[0] + b"X-Pad: " + b"a" * header_bytes
    size = 0
    index = 0
    while size < header_bytes:
        line = f"X-Pad-{index}: ".encode() + b"a" * 7980 + b"\r\n"
        lines.append(line)
        size += len(line)
        index += 1
    lines.append(b"Content-Length: 1048576\r\n\r\n")
    lines.append(b"b" * body_bytes)
    return b"".join(lines)


def scrape(port: int, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            r.read()
            return int(r.status)
    except OSError as exc:
        code = getattr(exc, "code", None)
        return int(code) if code else 0


def attack(pid: int, port: int, connections: int, data: bytes, seconds: float) -> dict[str, Any]:
    """Open the connections, push ``data`` on each while the server takes it; sample RSS."""
    selector = selectors.DefaultSelector()
    sent: dict[socket.socket, int] = {}
    total = 0
    closed = 0
    refused = 0
    peak = rss_kib(pid)
    last_sample = time.monotonic()
    deadline = time.monotonic() + seconds

    def close(sock: socket.socket) -> None:
        nonlocal closed
        closed += 1
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(sock)
        sent.pop(sock, None)
        sock.close()

    def sample() -> None:
        nonlocal peak, last_sample
        if time.monotonic() - last_sample >= 0.1:
            peak = max(peak, rss_kib(pid))
            last_sample = time.monotonic()

    def pump(timeout: float) -> None:
        nonlocal total
        for key, events in selector.select(timeout):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            if sock not in sent:
                continue
            if events & selectors.EVENT_READ:
                try:
                    if not sock.recv(65536):
                        close(sock)
                        continue
                except OSError:
                    close(sock)
                    continue
            if events & selectors.EVENT_WRITE and sent[sock] < len(data):
                try:
                    n = sock.send(data[sent[sock] : sent[sock] + 65536])
                    sent[sock] += n
                    total += n
                except BlockingIOError:
                    pass
                except OSError:
                    close(sock)
                    continue
                if sent[sock] >= len(data):
                    selector.modify(sock, selectors.EVENT_READ)

    opened = 0
    for _ in range(connections):
        if time.monotonic() > deadline:
            break
        sock = socket.socket()
        sock.settimeout(2.0)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            refused += 1
            sock.close()
            continue
        opened += 1
        sock.setblocking(False)
        sent[sock] = 0
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        pump(0)
        sample()
    # Keep pushing until every open connection has sent everything or the time is up.
    while time.monotonic() < deadline and any(n < len(data) for n in sent.values()):
        pump(0.05)
        sample()
    settle = time.monotonic() + 1.0
    while time.monotonic() < settle:
        pump(0.05)
        sample()
    peak = max(peak, rss_kib(pid))
    during = scrape(port)
    result = {
        "opened": opened,
        "refused_at_connect": refused,
        "closed_by_server": closed,
        "still_open": len(sent),
        "bytes_sent": total,
        "scrape_status_during": during,
        "peak_rss_kib": peak,
    }
    for sock in list(sent):
        sock.close()
    selector.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--header-bytes", type=int, default=780_000)
    parser.add_argument("--body-bytes", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=60.0, help="time limit for sending")
    parser.add_argument(
        "--slow",
        action="store_true",
        help="send one header line of --header-bytes without its end, and wait (slowloris)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    metrics, admin = free_port(), free_port()
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(ROOT))
    with tempfile.TemporaryDirectory() as state:
        env["XDG_CACHE_HOME"] = state
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "resolver",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "127.0.0.1:9",
                "--metrics",
                f"127.0.0.1:{metrics}",
                "--admin",
                f"127.0.0.1:{admin}",
                "--log-level",
                "error",
            ],
            env=env,
            cwd=state,  # python -m puts the working directory first on sys.path
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            started = time.monotonic()
            while scrape(metrics, 1.0) != 200:
                if proc.poll() is not None or time.monotonic() - started > 30:
                    print("the resolver did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            before = rss_kib(proc.pid)
            data = payload(metrics, args.header_bytes, args.body_bytes, args.slow)
            result = attack(proc.pid, metrics, args.connections, data, args.seconds)
            time.sleep(1.0)
            result["scrape_status_after"] = scrape(metrics)
            result["rss_before_kib"] = before
            result["rss_after_kib"] = rss_kib(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    result["resolver"] = env["PYTHONPATH"]
    result["connections"] = args.connections
    result["mode"] = "slow" if args.slow else "full"
    result["bytes_per_connection"] = len(data)
    growth = (result["peak_rss_kib"] - result["rss_before_kib"]) / 1024
    print(
        f"resolver from {env['PYTHONPATH']}, {result['mode']} attack: {args.connections} "
        "connections x "
        f"{len(data) / 1e6:.2f} MB each\n"
        f"  RSS before {result['rss_before_kib'] / 1024:.1f} MiB, peak "
        f"{result['peak_rss_kib'] / 1024:.1f} MiB (growth {growth:.1f} MiB), after "
        f"{result['rss_after_kib'] / 1024:.1f} MiB\n"
        f"  connections: {result['opened']} opened, {result['refused_at_connect']} refused at "
        f"connect, {result['closed_by_server']} closed by the server, "
        f"{result['still_open']} still open at the end; "
        f"{result['bytes_sent'] / 1e6:.1f} MB sent (taken by the kernel or the server)\n"
        f"  a normal scrape during the attack: HTTP {result['scrape_status_during']}, "
        f"after: HTTP {result['scrape_status_after']}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
