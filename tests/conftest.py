"""Shared fixtures: a fake upstream, list files, and the real server on loopback.

The server under test is the real :class:`resolver.server.Server`, bound to port 0 on
127.0.0.1 (and ::1), running its own event loop in a thread so that tests can use a
blocking DNS client (dnspython) against it. Time comes from a clock the test controls.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest

from resolver.config import Config, Listen, UDPConfig, parse_listen
from resolver.service.server import Server
from resolver.upstream.endpoints import parse_upstream

from .helpers.fakeupstream import FakeUpstream

# 2026-06-01T12:00:00Z: a fixed "now" for tests that freeze time.
FROZEN_NOW = 1780315200.0


class Clock:
    """A settable clock; ``None`` follows real time."""

    def __init__(self, now: float | None = None) -> None:
        self.now = now

    def __call__(self) -> float:
        return time.time() if self.now is None else self.now

    def advance(self, seconds: float) -> None:
        assert self.now is not None
        self.now += seconds


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


class RunningServer:
    """A :class:`Server` running in a background thread with its own event loop."""

    def __init__(self, config: Config, clock: Clock) -> None:
        self.clock = clock
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = Server(config, clock)
        self.call(self.server.start())
        udp = [b for b in self.server.bound if b.proto == "udp"]
        self.host = udp[0].host
        self.port = udp[0].port

    def call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def resolver(self) -> Any:
        return self.server.resolver

    def query(
        self,
        name: str,
        rtype: str = "A",
        *,
        tcp: bool = False,
        timeout: float = 3.0,
        host: str | None = None,
        **make: Any,
    ) -> dns.message.Message:
        message = dns.message.make_query(name, rtype, **make)
        return self.send(message, tcp=tcp, timeout=timeout, host=host)

    def send(
        self,
        message: dns.message.Message,
        *,
        tcp: bool = False,
        timeout: float = 3.0,
        host: str | None = None,
    ) -> dns.message.Message:
        where = host or self.host
        if tcp:
            return dns.query.tcp(message, where, port=self.port, timeout=timeout)
        return dns.query.udp(message, where, port=self.port, timeout=timeout, ignore_trailing=True)

    def raw(self, data: bytes, timeout: float = 1.0) -> bytes | None:
        """Send raw bytes over UDP; the raw reply, or None when the server stays silent."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.sendto(data, (self.host, self.port))
            try:
                return sock.recv(65535)
            except TimeoutError:
                return None

    def stop(self) -> None:
        if self.loop.is_closed():
            return  # stopped by the test already
        try:
            self.call(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
            self.loop.close()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream(
        records={
            ("example.test", "A"): ["192.0.2.1"],
            ("example.test", "AAAA"): ["2001:db8::1"],
            ("www.example.test", "A"): ["192.0.2.2"],
            ("notdeepseek.com", "A"): ["192.0.2.3"],
            ("allowed.test", "A"): ["192.0.2.4"],
            ("big.test", "TXT"): [f'"{i}{"x" * 200}"' for i in range(10)],
            ("mixed.case.test", "A"): ["192.0.2.5"],
            ("soon.test", "A"): ["192.0.2.6"],
        }
    )
    yield fake
    fake.close()


DEEPSEEK_LIST = """\
list: deepseek
description: DeepSeek AI services
reference: "test ban, effective 2025-02-26"
timezone: Europe/Brussels
active:
  from: 2025-02-26
action: nxdomain
ttl: 60
domains:
  - deepseek.com
  - Deepseeksvc.COM.
"""


@pytest.fixture
def lists_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "blocklists"
    folder.mkdir()
    (folder / "deepseek.yaml").write_text(DEEPSEEK_LIST)
    return folder


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_server(
    upstream: FakeUpstream, lists_dir: Path, clock: Clock
) -> Iterator[Callable[..., RunningServer]]:
    started: list[RunningServer] = []

    def start(**overrides: Any) -> RunningServer:
        listen = overrides.pop("listen", ["127.0.0.1:0"])
        use_clock = overrides.pop("clock", clock)
        config = Config(
            listen=tuple(parse_listen(x) if isinstance(x, str) else x for x in listen),
            upstreams=(parse_upstream(upstream.address),),
            blocklists=lists_dir,
            upstream_timeout=0.4,
            upstream_deadline=1.5,
            drain_timeout=2.0,
        )
        config = replace(config, **overrides)
        running = RunningServer(config, use_clock)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def server(make_server: Callable[..., RunningServer]) -> RunningServer:
    return make_server()


@pytest.fixture(params=[True, False], ids=["udp-batch", "udp-single"])
def udp(request: pytest.FixtureRequest) -> UDPConfig:
    """Both UDP listeners: batched (udpbatch.py, where the system has recvmmsg) and one
    datagram at a time (transport.UDPListener)."""
    return UDPConfig(batch=request.param)


__all__ = ["FROZEN_NOW", "Clock", "Listen", "RunningServer", "has_ipv6"]
