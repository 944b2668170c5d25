"""The real server under test, in-process: :class:`RunningServer` runs
:class:`resolver.service.server.Server`, bound to loopback, on its own event loop in a thread so
that tests can use a blocking DNS client (dnspython) against it, with time from a
:class:`Clock` the test controls."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import dns.message
import dns.query

from resolver.config import Config
from resolver.service.server import Server

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
