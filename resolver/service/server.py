"""Lifecycle: start (load the policy, bind), serve, reload, drain, stop.

Once-only work (binding sockets) is kept apart from per-reload work (loading the policy), as
in Unbound: a reload never touches the listeners, and a broken policy never stops the server.
What the components are and how the config sets them is :mod:`.assembly`; what makes the
server reload by itself (files on disk, remote lists) is :mod:`.watch`.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..config import Config, Listen
from ..console import Console
from ..core import wire
from ..core.account import AuditSink
from ..core.pipeline import Clock, Resolver
from ..observe.counts import Counts
from ..observe.metrics import counts_of
from ..policy import Policy, remote
from ..policy.isolated import PolicyLoader
from ..policy.loader import fault
from ..yamlload import SourceError
from . import assembly, udpbatch
from .admin import admin_routes, metrics_routes
from .assembly import StartupError, check, load_options, make_audit, make_connections, reconfigure
from .certs import CertStore
from .doh import DoHListener
from .doq import DoQListeners
from .dot import DoTListeners
from .encrypted import Encrypted
from .http import HTTPServer
from .listeners import Tasks, TCPConnection, UDPListener, bind_message, make_socket
from .sockopts import size_receive_queue
from .watch import FileWatcher, RemoteRefresher
from .workers import RelayAudit, Supervisor, WorkerLink, spread_datagrams

__all__ = ["Bound", "Server", "StartupError", "build", "run", "settle_memory"]

log = logging.getLogger("resolver")


@dataclass(frozen=True, slots=True)
class Bound:
    """A listener that is up: protocol, address and the port actually bound."""

    proto: str
    host: str
    port: int

    @property
    def address(self) -> str:
        """``HOST:PORT``, with brackets around an IPv6 host (as --listen takes it)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.proto} {self.address}"


class Server:
    """One resolver instance. ``start`` binds, ``stop`` drains; usable in-process by tests."""

    def __init__(
        self,
        config: Config,
        clock: Clock = time.time,
        reread: Callable[[], Config] | None = None,
        link: WorkerLink | None = None,
        child_command: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        #: Reads the config again (file and command-line flags) on reload, when there is one.
        self.reread = reread
        self.started_at = time.time()
        self._http: list[HTTPServer] = []
        self.console: Console | None = None  # the admin listener's web console
        self.admin_port = 0
        self.metrics_port = 0
        self.tasks = Tasks()
        self.connections = make_connections(config.tcp)
        self.bound: list[Bound] = []
        self._udp: list[asyncio.DatagramTransport] = []
        self._udp_listeners: list[UDPListener] = []  # BatchListener is one too
        self._tcp: list[asyncio.Server] = []
        self.resolver: Resolver | None = None
        self.stopping = asyncio.Event()
        # DoT, DoH and DoQ for clients, and the certificate they share (service/encrypted.py).
        self.encrypted = Encrypted()
        self.watcher = FileWatcher(
            lambda: self.config, self._policy_files, self.reload, self.stopping
        )
        self.remotes = RemoteRefresher(
            lambda: self.config,
            lambda: self.resolver.policy.remotes if self.resolver is not None else (),
            self.own_endpoints,
            self.reload,
            self.stopping,
        )
        self._reload_lock = asyncio.Lock()
        #: Loads run in a child process, so that a large one never stalls answering.
        self._policy_loader = PolicyLoader(config.reload.timeout)
        #: With --workers N: in a child, its channel to the primary; in the primary, the
        #: supervisor of the children (started after the primary has bound), and the
        #: command line of a child given the bound addresses.
        self.link = link
        self.supervisor: Supervisor | None = None
        self._child_command = child_command

    async def start(self) -> None:
        """Load the policy, then bind every listener; raise :class:`StartupError`."""
        config = self.config
        check(config)
        # The watcher's baseline: the files as they were before the load, so that an edit
        # made while starting still counts as a change.
        before = await self.watcher.lists()
        policy = await self._load_policy()
        log.info("%s", policy.summary(self.clock()))
        if not policy.lists:
            log.warning("no lists in %s: nothing is blocked", config.blocklists)
        self.resolver = assembly.build(config, policy, self.clock)
        self._loaded(policy)
        await self.watcher.set_baseline(before)
        log.info("forwarding to %s", ", ".join(str(u) for u in config.upstreams))
        try:
            for listen in config.listen:
                await self._bind(listen)
            shared = config.workers > 1 or self.link is not None
            encrypted = await self.encrypted.start(
                config, self.resolver.handle, self.tasks, shared, self.link is None
            )
            self.bound += [Bound(*b) for b in encrypted]
            await self._start_http()
        except BaseException:
            self._close_listeners()
            await self._close_http()
            raise
        for bound in self.bound:
            log.info("listening on %s", bound)
        audit = make_audit(config, self.link.channel if self.link is not None else None)
        if audit is not None:
            audit.start()
            self.resolver.audit = audit
        if config.workers > 1 and self.link is None:
            await self._start_workers(config.workers)

    async def _start_workers(self, count: int) -> None:
        command = self._child_command
        if command is None:
            raise StartupError("workers: this server cannot start child workers")
        # Plain DNS only: a child binds the encrypted listeners from the config itself.
        listens = sorted({b.address for b in self.bound if b.proto in ("udp", "tcp")})
        self.supervisor = Supervisor(count, lambda: command(listens), self._audit)
        try:
            await self.supervisor.start()
        except (RuntimeError, OSError) as exc:
            await self.supervisor.stop(1.0)
            self._close_listeners()
            await self._close_http()
            raise StartupError(str(exc)) from None
        log.info("%d workers answering on the same addresses", count)

    @property
    def http_servers(self) -> list[HTTPServer]:
        """The admin API and /metrics listeners that are up (for their metrics)."""
        return self._http

    def counts(self) -> Counts:
        """What this server has counted, all workers included (as of their last report)."""
        assert self.resolver is not None
        mine = self.encrypted.count_into(self.connections.count_into(counts_of(self.resolver)))
        mine = udpbatch.count_into(self._udp_listeners, mine)
        return mine + self.supervisor.total() if self.supervisor is not None else mine

    async def _start_http(self) -> None:
        config = self.config
        if config.admin is not None:  # off loopback with a token only (assembly.check)
            console = self.console = Console(config.admin_token)  # resolver/console/
            server = HTTPServer(
                {**admin_routes(self), **console.routes()},
                config.admin_token,
                name="admin",
                max_connections=config.admin_max_connections,
                allowed_hosts=config.admin_allowed_hosts,
                sessions=console.sessions,
            )
            self.admin_port = await self._listen_http(server, config.admin, "admin API")
        if config.metrics is not None:
            # No Host check: Prometheus may scrape through any Service or DNS name, and
            # /metrics only reads. Its only route is /metrics: /v1/* is never served here.
            server = HTTPServer(
                metrics_routes(self), name="metrics", max_connections=config.metrics_max_connections
            )
            self.metrics_port = await self._listen_http(server, config.metrics, "metrics")

    async def _listen_http(self, server: HTTPServer, where: Listen, what: str) -> int:
        try:
            port = await server.start(where.host, where.port)
        except OSError as exc:
            raise StartupError(bind_message(f"{what} (http)", where, exc)) from None
        self._http.append(server)
        host = f"[{where.host}]" if ":" in where.host else where.host
        log.info("%s on http://%s:%d/", what, host, port)
        return port

    async def _close_http(self) -> None:
        for server in self._http:
            await server.close()
        self._http.clear()

    def _loaded(self, policy: Policy) -> None:
        assert self.resolver is not None
        stats = self.resolver.stats
        stats.policy_loaded_at = stats.last_reload_success = time.time()
        stats.last_reload_failed = False
        stats.last_reload_error = None

    @property
    def doh_rejected(self) -> Mapping[str, int]:
        """DNS-over-HTTPS connections and requests refused, by reason (service/doh.py), all
        workers included (as of their last report)."""
        if self.resolver is None or self.supervisor is None:
            return self.encrypted.doh_rejected
        return self.counts().doh_rejected

    # The encrypted listeners and their certificate, as the admin API and tests read them.
    @property
    def certs(self) -> CertStore | None:
        return self.encrypted.certs

    @property
    def dot(self) -> DoTListeners | None:
        return self.encrypted.dot

    @property
    def doh(self) -> DoHListener | None:
        return self.encrypted.doh

    @property
    def doq(self) -> DoQListeners | None:
        return self.encrypted.doq

    @property
    def fetch_status(self) -> dict[str, remote.FetchResult]:
        """How the latest fetch of each remote list went (by URL)."""
        return self.remotes.status

    def _policy_files(self) -> Sequence[str] | None:
        return self.resolver.policy.files if self.resolver is not None else None

    def _audit(self) -> AuditSink | None:
        return self.resolver.audit if self.resolver is not None else None

    def own_endpoints(self) -> tuple[tuple[str, int], ...]:
        """The admin API's and /metrics' addresses as bound: never a list's source."""
        own = []
        if self.config.admin is not None and self.admin_port:
            own.append((self.config.admin.host, self.admin_port))
        if self.config.metrics is not None and self.metrics_port:
            own.append((self.config.metrics.host, self.metrics_port))
        return tuple(own)

    async def _load_policy(self) -> Policy:
        path = self.config.blocklists
        loop = asyncio.get_running_loop()
        # The load runs in a thread but needs the GIL most of the time; a short switch
        # interval lets the event loop take it back within a millisecond, so queries keep
        # being answered while a large policy loads.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, 0.0005))
        # Forked at the first load, while this process is small (see policy/isolated.py).
        self._policy_loader.start()
        try:
            policy = await loop.run_in_executor(
                None,
                self._policy_loader.load,
                path,
                load_options(self.config),
                self.resolver is not None,
            )
            for warning in policy.warnings:
                log.warning("%s", warning)
            return policy
        except SourceError as exc:
            raise StartupError(f"cannot load the policy: {exc}") from None
        except Exception as exc:  # load_policy turns faults into SourceError; belt and braces
            raise StartupError(f"cannot load the policy: {fault(exc)}") from None
        finally:
            sys.setswitchinterval(interval)

    async def reload(self) -> bool:
        """Read the config and the policy again and swap them in; on any error keep serving
        the last good ones. SIGHUP, the file watcher and POST /v1/reload all come here.

        Never raises (but for cancellation): every fault is a failed reload, counted, logged
        once with its cause and kept in ``last_reload_error``, so that no caller (a signal
        handler's task, the watcher's loop, an HTTP handler) can die of it."""
        resolver = self.resolver
        assert resolver is not None
        async with self._reload_lock:
            self.encrypted.reload()  # SIGHUP, POST /v1/reload: the certificate too
            stats = resolver.stats
            previous = self.config
            try:
                if self.reread is not None:
                    try:
                        self.config = self.reread()
                    except (SourceError, ValueError) as exc:
                        raise StartupError(f"cannot load the config: {exc}") from None
                    except Exception as exc:
                        raise StartupError(f"cannot load the config: {fault(exc)}") from None
                began = time.perf_counter()
                policy = await self._load_policy()
                took = time.perf_counter() - began
                removed = self._lost_lists(resolver.policy, policy)
            except Exception as exc:
                self.config = previous
                stats.reloads["failure"] += 1
                stats.last_reload_failed = True
                why = str(exc) if isinstance(exc, StartupError) else fault(exc)
                stats.last_reload_error = why
                log.error("reload failed, keeping policy %s: %s", resolver.policy.digest, why)
                return False
            reconfigure(resolver, previous, self.config)
            self._new_admin_token(self.config.admin_token)
            resolver.policy = policy  # one assignment: each query sees one policy or the other
            stats.reloads["success"] += 1
            stats.lists_removed += removed
            self._loaded(policy)
            log.info("reloaded in %.3f s: %s", took, policy.summary(self.clock()))
            if self.supervisor is not None:
                return await self.supervisor.reload(policy.digest)
            return True

    def _new_admin_token(self, token: str | None) -> None:
        """A reload's admin token: another token takes effect at once and ends every
        console session; removing it waits for a restart (the API could be open)."""
        console = self.console
        if console is None or token == console.token:
            return
        if token is None:
            log.warning("config: admin.token removed; that takes effect after a restart only")
            return
        console.rotate(token)
        for http in self._http:
            if http.sessions is console.sessions:
                http.token = token
        log.info("admin token changed: the new one is in force, every console session ended")

    def _lost_lists(self, old: Policy, new: Policy) -> int:
        """How many lists ``new`` drops; raise :class:`StartupError` if it drops them all.

        A list file deleted is how an operator removes a list: the reload goes ahead, with a
        warning naming the lists and a count (resolver_policy_lists_removed_total). A lists
        folder that became empty is far more often a mistake (a volume not mounted, a
        ConfigMap emptied, a bad sync) and would silently unblock everything, so it fails
        unless reload.allow_empty is set. A list file that became a dangling link or
        unreadable already fails the load itself."""
        gone = sorted({b.id for b in old.lists} - {b.id for b in new.lists})
        if not gone:
            return 0
        if not new.lists and not self.config.reload.allow_empty:
            raise StartupError(
                f"cannot load the policy: {self.config.blocklists} now holds no lists where "
                f"policy {old.digest} had {len(old.lists)} ({', '.join(gone[:10])}); nothing "
                "would be blocked. Restore the lists, or set reload.allow_empty: true in the "
                "config to allow an empty policy"
            )
        log.warning(
            "reload removes %d list(s) whose files are gone or empty: %s",
            len(gone),
            ", ".join(gone),
        )
        return len(gone)

    async def _bind(self, listen: Listen) -> None:
        loop = asyncio.get_running_loop()
        assert self.resolver is not None
        resolver = self.resolver
        handler = resolver.handle
        port = listen.port
        # Workers share each address: the kernel spreads queries across their sockets.
        shared = self.config.workers > 1 or self.link is not None
        for _attempt in range(20 if port == 0 else 1):
            try:
                udp_sock = make_socket(listen.host, port, socket.SOCK_DGRAM, shared)
            except OSError as exc:
                if self._skip_missing_ipv6(listen, exc):
                    return
                raise StartupError(bind_message("udp", listen, exc)) from None
            if self.link is None:
                spread_datagrams(udp_sock, self.config.workers)
            actual = udp_sock.getsockname()[1]
            try:
                tcp_sock = make_socket(listen.host, actual, socket.SOCK_STREAM, shared)
            except OSError as exc:
                udp_sock.close()
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    continue  # the free UDP port is taken for TCP: pick another pair
                raise StartupError(bind_message("tcp", listen, exc)) from None
            break
        else:
            raise StartupError(f"cannot find a port free for both UDP and TCP on {listen.host}")
        size_receive_queue(udp_sock, self.config.udp.receive_buffer)
        if self.config.udp.batch and udpbatch.available():
            batched = udpbatch.BatchListener(udp_sock, handler, self.tasks, resolver)
            self._udp_listeners.append(batched)
        else:
            transport, listener = await loop.create_datagram_endpoint(
                lambda: UDPListener(handler, self.tasks, resolver), sock=udp_sock
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
        for listener in self._udp_listeners:
            if isinstance(listener, udpbatch.BatchListener):
                listener.close()
        for server in self._tcp:
            server.close()
        self._udp.clear()
        self._udp_listeners.clear()
        self._tcp.clear()
        self.encrypted.close()  # after the drain, so that answers went out

    async def stop(self) -> None:
        """Stop accepting, let answers in progress finish (bounded), close connections."""
        if self.supervisor is not None:
            # The children drain while this worker still answers; then this one drains.
            await self.supervisor.stop(self.config.drain_timeout + 3.0)
        # UDP sockets stay open while draining (answers leave through them) but take no
        # new queries; TCP stops accepting connections and reading new queries.
        for listener in self._udp_listeners:
            listener.stop_accepting()
        for server in self._tcp:
            server.close()
        self.connections.stop_reading()
        self.encrypted.stop_reading()
        left = await self.tasks.drain(self.config.drain_timeout)
        if left:
            log.warning(
                "stopped with %d answers unfinished after %.1f s", left, self.config.drain_timeout
            )
        self.connections.close_all()
        self._close_listeners()
        await self._close_http()
        self._policy_loader.close()
        if self.resolver is not None:
            await self.resolver.close()
        audit = self.resolver.audit if self.resolver is not None else None
        if isinstance(audit, RelayAudit):
            audit.close()  # sends what is left to the primary, on this loop
        elif audit is not None:
            await asyncio.get_running_loop().run_in_executor(None, audit.close)

    async def refresh_remotes(self) -> None:
        """Keep remote lists fresh until stopped (see :class:`RemoteRefresher`)."""
        await self.remotes.run()

    async def watch_files(self) -> None:
        """Reload on changes on disk until stopped (see :class:`FileWatcher`)."""
        await self.watcher.run()

    def install_signals(self) -> None:
        """SIGTERM and SIGINT stop, SIGHUP reloads. Installed before anything slow, so
        that a signal during start-up is never the default action (death for SIGHUP)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._hangup)

    def _hangup(self) -> None:
        if self.resolver is None:
            log.info("SIGHUP during start-up: the policy being loaded is already fresh")
            return
        self.tasks.spawn(self.reload())

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT (see install_signals)."""
        loop = asyncio.get_running_loop()
        if self.link is not None:
            # A child worker: the primary watches, fetches and tells it when to reload.
            refresher = self.tasks.spawn(self.link.serve(self))
            watcher = refresher
        else:
            refresher = self.tasks.spawn(self.refresh_remotes())
            watcher = self.tasks.spawn(self.watch_files())
        self.encrypted.watch(self.tasks, lambda: self.config.reload.interval, self.stopping)
        try:
            await self.stopping.wait()
            log.info("stopping: no new queries; finishing those in progress")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        refresher.cancel()
        watcher.cancel()
        await self.stop()
        log.info("stopped")


#: Allocations between young-generation collections (Python's default: 700). A query
#: allocates a few dozen objects, nearly all freed by reference counting; collecting
#: every few queries cost about 9% of the CPU of a cache miss.
GC_YOUNG: Final = 20_000


def settle_memory(resolver: Resolver | None = None) -> None:
    """Once started: move what start-up built (policy, modules, config) and the
    resolver's answer memo (Resolver.pin_memo) out of the collector's sight, and collect
    the young generation less often."""
    gc.collect()
    if resolver is not None:
        resolver.pin_memo()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, older, oldest)


def install_loop() -> str:
    """Use uvloop when it is installed (about 3x less loop overhead per datagram)."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def build() -> str:
    """Which build runs: the per-query modules compiled by mypyc (setup.py,
    RESOLVER_COMPILE=1) load as C extensions; otherwise they are the Python source."""
    return "interpreted" if wire.__file__.endswith(".py") else "compiled modules"


def run(
    config: Config,
    reread: Callable[[], Config] | None = None,
    link: WorkerLink | None = None,
    child_command: Callable[[list[str]], list[str]] | None = None,
) -> int:
    """Serve until stopped; the process exit code. ``reread`` reads the config again.

    With ``config.workers`` above 1, ``child_command`` gives the command line of a child
    worker for the bound addresses; ``link`` is given in such a child."""
    loop_name = install_loop()

    async def main() -> int:
        server = Server(config, reread=reread, link=link, child_command=child_command)
        server.install_signals()
        try:
            if link is not None:
                await link.open()
            await server.start()
        except StartupError as exc:
            log.error("%s", exc)
            return 2
        if server.stopping.is_set():
            await server.stop()
            return 0
        settle_memory(server.resolver)
        log.info("ready (%s event loop, %s, config: %s)", loop_name, build(), config.source)
        await server.serve()
        return 0

    result: Any = asyncio.run(main())
    return int(result)
