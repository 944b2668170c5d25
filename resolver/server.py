"""Lifecycle: build everything from the config, bind, serve, reload, drain, stop.

Once-only work (binding sockets) is kept apart from per-reload work (loading the policy), as
in Unbound: a reload never touches the listeners, and a broken policy never stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from .cache import Cache
from .chain import Clock, Resolver
from .config import Config, Listen
from .policy import ClientGroups, LoadOptions, Policy, load_policy, remote
from .transport import Tasks, TCPConnection, TCPConnections, UDPListener, make_socket
from .upstream import Forwarder
from .yamlload import SourceError

log = logging.getLogger("resolver")


class StartupError(Exception):
    """The server cannot start; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Bound:
    """A listener that is up: protocol, address and the port actually bound."""

    proto: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.proto} {host}:{self.port}"


class Server:
    """One resolver instance. ``start`` binds, ``stop`` drains; usable in-process by tests."""

    def __init__(self, config: Config, clock: Clock = time.time) -> None:
        self.config = config
        self.clock = clock
        self.tasks = Tasks()
        self.connections = TCPConnections(
            config.tcp.max_connections, config.tcp.idle_timeout, config.tcp.max_pipeline
        )
        self.bound: list[Bound] = []
        self._udp: list[asyncio.DatagramTransport] = []
        self._udp_listeners: list[UDPListener] = []
        self._tcp: list[asyncio.Server] = []
        self.resolver: Resolver | None = None
        self.stopping = asyncio.Event()
        #: When each remote list was last fetched (or its copy was), and how that went.
        self.fetched: dict[str, float] = {}
        self.fetch_status: dict[str, remote.FetchResult] = {}

    async def start(self) -> None:
        """Load the policy, then bind every listener; raise :class:`StartupError`."""
        config = self.config
        if not config.upstreams:
            raise StartupError(
                "no upstream resolvers: none in /etc/resolv.conf; give --upstream HOST[:PORT] "
                "or 'upstreams:' in the config"
            )
        _refuse_self_forwarding(config)
        policy = await self._load_policy()
        log.info("%s", policy.summary(self.clock()))
        cache = Cache(
            config.cache.max_entries,
            config.cache.min_ttl,
            config.cache.max_ttl,
            config.cache.max_negative_ttl,
        )
        forwarder = Forwarder(
            list(config.upstreams), config.upstream_timeout, config.upstream_deadline
        )
        self.resolver = Resolver(policy, cache, forwarder, self.clock)
        log.info("forwarding to %s", ", ".join(str(u) for u in config.upstreams))
        try:
            for listen in config.listen:
                await self._bind(listen)
        except BaseException:
            self._close_listeners()
            raise
        for bound in self.bound:
            log.info("listening on %s", bound)

    def load_options(self) -> LoadOptions:
        """How this server loads its policy: its client groups and remote-copy folder."""
        return LoadOptions(ClientGroups(dict(self.config.groups)), self.config.state_dir)

    async def _load_policy(self) -> Policy:
        path = self.config.blocklists
        loop = asyncio.get_running_loop()
        try:
            policy = await loop.run_in_executor(None, load_policy, path, self.load_options())
            for warning in policy.warnings:
                log.warning("%s", warning)
            return policy
        except SourceError as exc:
            raise StartupError(f"cannot load the policy: {exc}") from None

    async def reload(self) -> bool:
        """Load the policy again; on error keep serving the last good one. SIGHUP."""
        assert self.resolver is not None
        try:
            policy = await self._load_policy()
        except StartupError as exc:
            log.error("reload failed, keeping policy %s: %s", self.resolver.policy.digest, exc)
            return False
        self.resolver.policy = policy  # one assignment: each query sees one policy or the other
        log.info("reloaded %s", policy.summary(self.clock()))
        return True

    async def _bind(self, listen: Listen) -> None:
        loop = asyncio.get_running_loop()
        assert self.resolver is not None
        handler = self.resolver.handle
        port = listen.port
        for _attempt in range(20 if port == 0 else 1):
            try:
                udp_sock = make_socket(listen.host, port, socket.SOCK_DGRAM, False)
            except OSError as exc:
                if self._skip_missing_ipv6(listen, exc):
                    return
                raise StartupError(_bind_message("udp", listen, exc)) from None
            actual = udp_sock.getsockname()[1]
            try:
                tcp_sock = make_socket(listen.host, actual, socket.SOCK_STREAM, False)
            except OSError as exc:
                udp_sock.close()
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    continue  # the free UDP port is taken for TCP: pick another pair
                raise StartupError(_bind_message("tcp", listen, exc)) from None
            break
        else:
            raise StartupError(f"cannot find a port free for both UDP and TCP on {listen.host}")
        transport, listener = await loop.create_datagram_endpoint(
            lambda: UDPListener(handler, self.tasks), sock=udp_sock
        )
        self._udp_listeners.append(listener)
        self._udp.append(transport)
        server = await loop.create_server(
            lambda: TCPConnection(handler, self.tasks, self.connections),
            sock=tcp_sock,
            backlog=1024,
        )
        self._tcp.append(server)
        self.bound.append(Bound("udp", listen.host, actual))
        self.bound.append(Bound("tcp", listen.host, actual))

    def _skip_missing_ipv6(self, listen: Listen, exc: OSError) -> bool:
        missing = exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
        if self.config.default_listen and ":" in listen.host and missing:
            log.warning("IPv6 is not available here; not listening on %s", listen)
            return True
        return False

    def _close_listeners(self) -> None:
        for transport in self._udp:
            transport.close()
        for server in self._tcp:
            server.close()
        self._udp.clear()
        self._udp_listeners.clear()
        self._tcp.clear()

    async def stop(self) -> None:
        """Stop accepting, let answers in progress finish (bounded), close connections."""
        # UDP sockets stay open while draining (answers leave through them) but take no
        # new queries; TCP stops accepting connections and reading new queries.
        for listener in self._udp_listeners:
            listener.accepting = False
        for server in self._tcp:
            server.close()
        self.connections.stop_reading()
        left = await self.tasks.drain(self.config.drain_timeout)
        if left:
            log.warning(
                "stopped with %d answers unfinished after %.1f s", left, self.config.drain_timeout
            )
        self.connections.close_all()
        self._close_listeners()

    async def refresh_remotes(self) -> None:
        """Keep remote lists fresh: fetch each when due (its ``refresh``), in a thread, and
        reload when one changed. A failed fetch keeps the copy and is logged."""
        assert self.resolver is not None
        loop = asyncio.get_running_loop()
        state_dir = self.config.state_dir
        while not self.stopping.is_set():
            specs = self.resolver.policy.remotes
            now = time.time()
            wake = now + 60
            changed = False
            for spec in specs:
                last = self.fetched.get(spec.url)
                if last is None:
                    copy = await loop.run_in_executor(None, remote.load_copy, spec.url, state_dir)
                    last = copy.fetched_at or 0.0
                if now - last >= spec.refresh:
                    result = await loop.run_in_executor(
                        None, remote.fetch, spec.url, state_dir, spec.timeout, spec.max_size
                    )
                    last = time.time()
                    self.fetch_status[spec.url] = result
                    if result.status == "updated":
                        changed = True
                        log.info("remote list %s (list %s) updated", spec.url, spec.list_id)
                    elif result.status == "failed":
                        log.error(
                            "remote list %s (list %s): %s; keeping the last copy",
                            spec.url,
                            spec.list_id,
                            result.error,
                        )
                self.fetched[spec.url] = last
                wake = min(wake, last + spec.refresh)
            if changed:
                await self.reload()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), max(1.0, wake - time.time()))

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT; SIGHUP reloads the policy."""
        loop = asyncio.get_running_loop()
        refresher = self.tasks.spawn(self.refresh_remotes())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.tasks.spawn(self.reload()))
        try:
            await self.stopping.wait()
            log.info("stopping: no new queries; finishing those in progress")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        refresher.cancel()
        await self.stop()
        log.info("stopped")


def _bind_message(proto: str, listen: Listen, exc: OSError) -> str:
    hint = ""
    if exc.errno == errno.EACCES and listen.port < 1024:
        hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE; or use a port like 5353)"
    elif exc.errno == errno.EADDRINUSE:
        hint = " (another program listens there; stop it or choose another --listen)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        hint = " (no interface of this machine has that address)"
    return f"cannot listen on {proto} {listen}: {exc.strerror or exc}{hint}"


def _refuse_self_forwarding(config: Config) -> None:
    mine = {(listen.host, listen.port) for listen in config.listen}
    for upstream in config.upstreams:
        if (upstream.host, upstream.port) in mine:
            raise StartupError(
                f"upstream {upstream} is this resolver's own listen address: queries would loop"
            )


def install_loop() -> str:
    """Use uvloop when it is installed (about 3x less loop overhead per datagram)."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def run(config: Config) -> int:
    """Serve until stopped; the process exit code."""
    loop_name = install_loop()

    async def main() -> int:
        server = Server(config)
        try:
            await server.start()
        except StartupError as exc:
            log.error("%s", exc)
            return 2
        log.info("ready (%s event loop, config: %s)", loop_name, config.source)
        await server.serve()
        return 0

    result: Any = asyncio.run(main())
    return int(result)
