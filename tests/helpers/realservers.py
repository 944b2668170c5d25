"""Real programs for the tests: NSD as an authoritative upstream, and the resolver itself as
a subprocess started the way an operator starts it."""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dns.message
import dns.query

ROOT = Path(__file__).resolve().parents[2]


def _port_range() -> range:
    """Where free_port picks: below the kernel's ephemeral range (32768 and up on Linux),
    so that no port the kernel hands out for port 0 can take a picked port before the
    test binds it; ``RESOLVER_TEST_PORTS=LOW-HIGH`` gives a pass its own slice (.ci/run
    runs two passes side by side)."""
    low, _, high = os.environ.get("RESOLVER_TEST_PORTS", "20000-32000").partition("-")
    return range(int(low), int(high))


_turn = itertools.count(random.randrange(1 << 30))


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (at the time of asking).

    Ports are tried in turn from a random start, so one process never hands out the same
    port twice until it has gone round its whole range: two ports asked for by one test
    (an admin and a metrics listener, say) cannot be the same one, as two random picks
    could be."""
    ports = _port_range()
    for _ in range(200):
        port = ports[next(_turn) % len(ports)]
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        ):
            try:
                udp.bind(("127.0.0.1", port))
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def wait_for_dns(host: str, port: int, name: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            dns.query.udp(dns.message.make_query(name, "SOA"), host, port=port, timeout=0.3)
            return
        except (dns.exception.Timeout, OSError):
            if time.monotonic() > deadline:
                raise


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class NSD:
    """NSD serving one generated zone on 127.0.0.1:<free port>, stopped by its PID."""

    def __init__(self, workdir: Path, zone: str, records: list[str]) -> None:
        self.port = free_port()
        self.dir = workdir
        self.zone = zone
        zonefile = workdir / f"{zone}.zone"
        zonefile.write_text(
            f"$ORIGIN {zone}.\n$TTL 3600\n"
            f"@ IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 300\n"
            f"@ IN NS ns.{zone}.\nns IN A 127.0.0.1\n" + "\n".join(records) + "\n"
        )
        conf = workdir / "nsd.conf"
        conf.write_text(
            "server:\n"
            f"  ip-address: 127.0.0.1@{self.port}\n"
            f"  port: {self.port}\n"
            '  username: ""\n'
            '  chroot: ""\n'
            f'  zonesdir: "{workdir}"\n'
            f'  pidfile: "{workdir}/nsd.pid"\n'
            f'  xfrdfile: "{workdir}/xfrd.state"\n'
            f'  zonelistfile: "{workdir}/zone.list"\n'
            f'  database: ""\n'
            f'  logfile: "{workdir}/nsd.log"\n'
            "  server-count: 1\n"
            "  verbosity: 1\n"
            "remote-control:\n  control-enable: no\n"
            f"zone:\n  name: {zone}\n  zonefile: {zonefile.name}\n"
        )
        binary = shutil.which("nsd") or "/usr/sbin/nsd"
        self.proc = subprocess.Popen(
            [binary, "-d", "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for_dns("127.0.0.1", self.port, zone)
        except BaseException:
            self.stop()
            log = (workdir / "nsd.log").read_text() if (workdir / "nsd.log").exists() else ""
            raise RuntimeError(f"NSD did not start: {log}") from None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)


def nsd_available() -> bool:
    return bool(shutil.which("nsd") or os.path.exists("/usr/sbin/nsd"))


class ResolverProcess:
    """``python -m resolver serve ...`` as a child process, with its log lines."""

    LISTEN = re.compile(r"listening on (udp|tcp) (\S+):(\d+)$")

    def __init__(
        self,
        *args: str,
        ready: bool = True,
        timeout: float = 15.0,
        ready_text: str = "ready (",
        launcher: tuple[str, ...] = ("-m", "resolver"),
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *launcher, "serve", *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0
        if ready:
            try:
                self.wait_for(ready_text, timeout)
            except BaseException:
                self.stop()  # never leave a half-started server behind
                raise
            for line in self.lines:
                match = self.LISTEN.search(line)
                if match and match.group(1) == "udp" and not self.port:
                    self.port = int(match.group(3))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 15.0, since: int = 0) -> str:
        """Wait for a log line containing ``text`` (from line ``since`` on); fail on exit
        or timeout."""
        deadline = time.monotonic() + timeout
        seen = since
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if text in line:
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (not self._reader.is_alive() and seen == len(self.lines)):
                    break
                self._changed.wait(min(left, 0.2))
        raise AssertionError(f"no log line with {text!r}; log:\n" + "\n".join(self.lines))

    def finish(self, timeout: float = 10.0) -> int:
        """Wait for exit and for the rest of the log; the exit code."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.finish()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)
