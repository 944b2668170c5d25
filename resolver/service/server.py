"""Lifecycle: build everything from the config, bind, serve, reload, drain, stop.

Once-only work (binding sockets) is kept apart from per-reload work (loading the policy), as
in Unbound: a reload never touches the listeners, and a broken policy never stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hashlib
import ipaddress
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..config import Config, Listen, bootstrap_servers, is_self, name_upstreams
from ..core import wire
from ..core.cache import Cache
from ..core.guard import Guard
from ..core.pipeline import Clock, Resolver
from ..observe.metrics import Counts, counts_of
from ..observe.querylog import AuditLog, AuditSink
from ..policy import ClientGroups, LoadOptions, Policy, remote
from ..policy.isolated import PolicyLoader
from ..policy.loader import fault, list_files
from ..policy.model import synthetic_ruleset
from ..upstream.bootstrap import Bootstrap
from ..upstream.forwarder import Forwarder
from ..yamlload import SourceError
from . import udpbatch
from .admin import admin_routes, metrics_routes
from .http import HTTPServer
from .listeners import Tasks, TCPConnection, TCPConnections, UDPListener, make_socket
from .workers import RelayAudit, Supervisor, WorkerLink

log = logging.getLogger("resolver")


class StartupError(Exception):
    """The server cannot start; the message says why and what to do."""


@dataclass(slots=True)
class _WatchState:
    """What the file watcher has seen: metadata and content digests, and when it last
    hashed the contents."""

    seen: str
    digest: str
    last_sum: float


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
        self.admin_port = 0
        self.metrics_port = 0
        self.tasks = Tasks()
        self.connections = TCPConnections(
            config.tcp.max_connections,
            config.tcp.idle_timeout,
            config.tcp.max_pipeline,
            config.tcp.max_output,
            config.tcp.max_connections_per_client,
        )
        self.bound: list[Bound] = []
        self._udp: list[asyncio.DatagramTransport] = []
        self._udp_listeners: list[UDPListener] = []  # BatchListener is one too
        self._tcp: list[asyncio.Server] = []
        self.resolver: Resolver | None = None
        self.stopping = asyncio.Event()
        #: When each remote list was last fetched (or its copy was), and how that went.
        self.fetched: dict[str, float] = {}
        self.fetch_status: dict[str, remote.FetchResult] = {}
        self._reload_lock = asyncio.Lock()
        #: Loads run in a child process, so that a large one never stalls answering.
        self._policy_loader = PolicyLoader(config.reload.timeout)
        self._baseline = self._baseline_sum = ""
        #: With --workers N: in a child, its channel to the primary; in the primary, the
        #: supervisor of the children (started after the primary has bound), and the
        #: command line of a child given the bound addresses.
        self.link = link
        self.supervisor: Supervisor | None = None
        self._child_command = child_command

    async def start(self) -> None:
        """Load the policy, then bind every listener; raise :class:`StartupError`."""
        config = self.config
        if not config.upstreams:
            raise StartupError(
                "no upstream resolvers: none in /etc/resolv.conf; give --upstream HOST[:PORT] "
                "or 'upstreams:' in the config"
            )
        _refuse_self_forwarding(config)
        # The watcher's baseline: the files as they were before the load, so that an edit
        # made while starting still counts as a change.
        loop = asyncio.get_running_loop()
        before = await loop.run_in_executor(None, self._fingerprint, False, ())
        policy = await self._load_policy()
        log.info("%s", policy.summary(self.clock()))
        if not policy.lists:
            log.warning("no lists in %s: nothing is blocked", config.blocklists)
        cache = Cache(
            config.cache.max_entries,
            config.cache.min_ttl,
            config.cache.max_ttl,
            config.cache.max_negative_ttl,
            config.cache.serve_stale,
            config.cache.prefetch,
            config.cache.max_bytes,
        )
        forwarder = Forwarder(
            list(config.upstreams),
            config.upstream_timeout,
            config.upstream_deadline,
            config.upstream_strategy,
            {zone: list(ups) for zone, ups in config.forward},
            str(config.tls_ca_file) if config.tls_ca_file else None,
            make_bootstrap(config),
        )
        self.resolver = Resolver(policy, cache, forwarder, self.clock)
        self.resolver.guard = make_guard(config)
        self.resolver.stale_timer = config.cache.stale_timer
        self.resolver.memo_max_bytes = config.cache.memo_max_bytes
        self.resolver.memo_max_entries = config.cache.memo_max_entries
        apply_rebinding(self.resolver, config)
        apply_limits(self.resolver, config)
        self._loaded(policy)
        # Now that included files are known, they join the baseline, unless something
        # changed during the load (then the first check reloads). The baseline is taken
        # before that check, so that no edit can slip in between.
        baseline = await loop.run_in_executor(None, self._fingerprint, False)
        baseline_sum = await loop.run_in_executor(None, self._fingerprint, True)
        if await loop.run_in_executor(None, self._fingerprint, False, ()) == before:
            self._baseline, self._baseline_sum = baseline, baseline_sum
        log.info("forwarding to %s", ", ".join(str(u) for u in config.upstreams))
        try:
            for listen in config.listen:
                await self._bind(listen)
            await self._start_http()
        except BaseException:
            self._close_listeners()
            await self._close_http()
            raise
        for bound in self.bound:
            log.info("listening on %s", bound)
        if config.audit.sink != "off":
            audit: AuditSink
            if self.link is not None and self.link.channel is not None:
                audit = RelayAudit(config.audit, self.link.channel)
            else:
                audit = AuditLog(config.audit)
                log.info("audit log: %s (%s)", config.audit.path or "stdout", config.audit.what)
            audit.start()
            self.resolver.audit = audit
        if config.workers > 1 and self.link is None:
            await self._start_workers(config.workers)

    async def _start_workers(self, count: int) -> None:
        command = self._child_command
        if command is None:
            raise StartupError("workers: this server cannot start child workers")
        listens = sorted({b.address for b in self.bound})
        self.supervisor = Supervisor(self, count, lambda: command(listens))
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
        mine = self.connections.count_into(counts_of(self.resolver))
        return mine + self.supervisor.total() if self.supervisor is not None else mine

    async def _start_http(self) -> None:
        config = self.config
        if config.admin is not None:
            if not ipaddress.ip_address(config.admin.host).is_loopback and not config.admin_token:
                raise StartupError(
                    f"the admin API on {config.admin} would be reachable from the network: "
                    "set admin.token in the config (a secret of 16+ characters), or listen on "
                    "127.0.0.1"
                )
            server = HTTPServer(
                admin_routes(self),
                config.admin_token,
                name="admin",
                max_connections=config.admin_max_connections,
                allowed_hosts=config.admin_allowed_hosts,
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
            raise StartupError(_bind_message(f"{what} (http)", where, exc)) from None
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

    def load_options(self) -> LoadOptions:
        """How this server loads its policy: its client groups, remote-copy folder, the
        folders includes may read and whether remote lists may be on private addresses."""
        config = self.config
        return LoadOptions(
            ClientGroups(dict(config.groups)),
            config.state_dir,
            include_roots=config.include_roots,
            allow_private=config.remote.allow_private,
        )

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
                None, self._policy_loader.load, path, self.load_options(), self.resolver is not None
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
            self._apply_config(previous, self.config)
            resolver.policy = policy  # one assignment: each query sees one policy or the other
            stats.reloads["success"] += 1
            stats.lists_removed += removed
            self._loaded(policy)
            log.info("reloaded in %.3f s: %s", took, policy.summary(self.clock()))
            if self.supervisor is not None:
                return await self.supervisor.reload(policy.digest)
            return True

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

    def _apply_config(self, old: Config, new: Config) -> None:
        """Take what can change without a restart; say what cannot."""
        resolver = self.resolver
        assert resolver is not None
        forwarder = resolver.forwarder
        if new.upstreams and list(new.upstreams) != forwarder.upstreams:
            forwarder.upstreams = list(new.upstreams)
            log.info("upstreams now %s", ", ".join(str(u) for u in new.upstreams))
        forwarder.timeout = new.upstream_timeout
        forwarder.deadline = new.upstream_deadline
        forwarder.strategy = new.upstream_strategy
        forwarder.routes = {zone.encode(): list(ups) for zone, ups in new.forward}
        if new.bootstrap != old.bootstrap or (name_upstreams(new) and not forwarder.bootstrap):
            try:
                forwarder.bootstrap = make_bootstrap(new)
            except StartupError as exc:
                log.error("%s; upstreams given by host name fail until then", exc)
            for conn in forwarder.connections.values():
                conn.bootstrap = forwarder.bootstrap
        apply_rebinding(resolver, new)
        apply_limits(resolver, new)
        if (old.acl, old.ratelimit) != (new.acl, new.ratelimit):
            resolver.guard = make_guard(new)
            log.info("access list and rate limit updated")
        cache = resolver.cache
        cache.max_entries = new.cache.max_entries
        cache.min_ttl = new.cache.min_ttl
        cache.max_ttl = new.cache.max_ttl
        cache.max_negative_ttl = new.cache.max_negative_ttl
        cache.serve_stale = new.cache.serve_stale
        cache.prefetch = new.cache.prefetch
        resolver.stale_timer = new.cache.stale_timer
        cache.max_bytes = new.cache.max_bytes
        resolver.memo_max_bytes = new.cache.memo_max_bytes
        resolver.memo_max_entries = new.cache.memo_max_entries
        for name, before, after in (
            ("listen", old.listen, new.listen),
            ("tcp", old.tcp, new.tcp),
            ("udp", old.udp, new.udp),
            (
                "admin",
                (old.admin, old.admin_token, old.admin_max_connections, old.admin_allowed_hosts),
                (new.admin, new.admin_token, new.admin_max_connections, new.admin_allowed_hosts),
            ),
            (
                "metrics",
                (old.metrics, old.metrics_max_connections),
                (new.metrics, new.metrics_max_connections),
            ),
            ("audit", old.audit, new.audit),
            ("workers", old.workers, new.workers),
        ):
            if before != after:
                log.warning(
                    "config: '%s' changed; it takes effect only after a restart "
                    "(keeping the running value)",
                    name,
                )

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
                raise StartupError(_bind_message("udp", listen, exc)) from None
            actual = udp_sock.getsockname()[1]
            try:
                tcp_sock = make_socket(listen.host, actual, socket.SOCK_STREAM, shared)
            except OSError as exc:
                udp_sock.close()
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    continue  # the free UDP port is taken for TCP: pick another pair
                raise StartupError(_bind_message("tcp", listen, exc)) from None
            break
        else:
            raise StartupError(f"cannot find a port free for both UDP and TCP on {listen.host}")
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

    async def stop(self) -> None:
        """Stop accepting, let answers in progress finish (bounded), close connections."""
        if self.supervisor is not None:
            # The children drain while this worker still answers; then this one drains.
            await self.supervisor.stop(self.config.drain_timeout + 3.0)
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
                    # The copy's last successful fetch, until a fetch of ours says more.
                    self.fetch_status.setdefault(spec.url, copy)
                if now - last >= spec.refresh:
                    result = await loop.run_in_executor(
                        None,
                        remote.fetch,
                        spec.url,
                        state_dir,
                        spec.timeout,
                        spec.max_size,
                        self.config.remote.allow_private,
                        self.own_endpoints(),
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

    async def watch_files(self) -> None:
        """Reload when the config file or anything the policy read changes on disk.

        Every ``reload.interval`` the watcher compares the files' metadata (the directory
        walk included, so new and deleted lists count, and a Kubernetes ConfigMap's
        ``..data`` symlink swap shows as new targets); every ``checksum_interval`` it also
        hashes their contents, a backstop for edits that keep size and mtime. A change
        waits ``debounce`` of quiet (an editor's burst of writes), then reloads once.
        """
        state = _WatchState(self._baseline, self._baseline_sum, time.monotonic())
        failed: str | None = None
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.config.reload.interval)
            if self.stopping.is_set():
                return
            # Nothing may end the watcher: a fault in one round is logged (once while it
            # lasts) and the next round tries again, so a later good edit still loads.
            try:
                await self._watch_once(state)
                failed = None
            except Exception as exc:
                why = fault(exc)
                if why != failed:
                    log.error("file watcher: %s; still watching", why)
                failed = why

    async def _watch_once(self, state: _WatchState) -> None:
        """One round of :meth:`watch_files`: look, and reload if something changed."""
        loop = asyncio.get_running_loop()
        settings = self.config.reload
        seen, digest, last_sum = state.seen, state.digest, state.last_sum
        now = await loop.run_in_executor(None, self._fingerprint, False)
        changed = now != seen
        if not changed and time.monotonic() - last_sum >= settings.checksum_interval:
            last_sum = time.monotonic()
            changed = await loop.run_in_executor(None, self._fingerprint, True) != digest
        if not changed:
            state.last_sum = last_sum
            return
        while True:  # debounce: wait until the files stop changing
            await asyncio.sleep(settings.debounce)
            again = await loop.run_in_executor(None, self._fingerprint, False)
            if again == now:
                break
            now = again
        # Remember what is about to be loaded, not what is there after: an edit made
        # during the reload must still count as a change.
        seen = now
        digest = await loop.run_in_executor(None, self._fingerprint, True)
        last_sum = time.monotonic()
        lists = await loop.run_in_executor(None, self._fingerprint, False, ())
        state.seen, state.digest, state.last_sum = seen, digest, last_sum
        log.info("files changed on disk: reloading")
        await self.reload()
        # The reload may have added or dropped included files: they join the baseline,
        # unless the config or the lists changed meanwhile (then the next check
        # reloads). The new baseline is taken before that check, so an edit made
        # between the two is never absorbed into it.
        with_includes = await loop.run_in_executor(None, self._fingerprint, False)
        contents = await loop.run_in_executor(None, self._fingerprint, True)
        if await loop.run_in_executor(None, self._fingerprint, False, ()) == lists:
            seen, digest = with_includes, contents
        state.seen, state.digest, state.last_sum = seen, digest, last_sum

    def _watched(self, included: Sequence[str] | None) -> list[Path]:
        paths: list[Path] = []
        if self.config.source != "embedded default":
            paths.append(Path(self.config.source))
        with contextlib.suppress(SourceError):
            paths.extend(list_files(self.config.blocklists))
        if included is None and self.resolver is not None:
            included = self.resolver.policy.files
        paths.extend(Path(f) for f in included or ())
        return paths

    def _fingerprint(self, contents: bool, included: Sequence[str] | None = None) -> str:
        """Metadata (or, with ``contents``, a hash of the contents) of the watched files:
        the config, the list files, and ``included`` (default: what the policy read)."""
        digest = hashlib.sha256()
        for path in sorted(set(self._watched(included))):
            digest.update(str(path).encode() + b"\0")
            try:
                if contents and path.is_file():  # not a FIFO: reading one would block
                    digest.update(path.read_bytes())
                elif contents:
                    digest.update(b"not a regular file")
                else:
                    st = path.stat()  # follows symlinks: a swapped target is a change
                    digest.update(f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode())
            except (OSError, ValueError):  # ValueError: a NUL byte in a path
                digest.update(b"missing")
        return str(digest.hexdigest())

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


def apply_rebinding(resolver: Resolver, config: Config) -> None:
    """Turn DNS rebinding protection on or off as the config says."""
    resolver.internal_zones = config.rebinding.allow
    resolver.rebinding = (
        synthetic_ruleset(
            "rebinding",
            "DNS rebinding protection",
            "a public name answered with a private address (DNS rebinding protection)",
        )
        if config.rebinding.enabled
        else None
    )


def apply_limits(resolver: Resolver, config: Config) -> None:
    """Upstream health (failures that mark one down, probes) and the in-flight budget."""
    forwarder = resolver.forwarder
    health = config.upstream_health
    forwarder.max_fails = health.max_fails
    forwarder.probe_interval = health.probe_interval
    forwarder.probe_max_interval = max(health.probe_max_interval, health.probe_interval)
    forwarder.probe_name = health.probe_name
    inflight = config.inflight
    resolver.max_inflight = inflight.max
    resolver.max_inflight_per_client = inflight.per_client or max(16, inflight.max // 4)


def make_guard(config: Config) -> Guard:
    """The access list and rate limit the config asks for."""
    limit = config.ratelimit
    return Guard(
        config.acl.allow,
        config.acl.action,
        limit.qps,
        limit.burst,
        limit.over_limit,
        limit.ipv6_prefix,
        limit.max_clients,
    )


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
    for server in config.bootstrap:
        if is_self(server, config.listen):
            raise StartupError(
                f"bootstrap server {server} is this resolver's own listen address: the names "
                "of upstreams must be resolved without this resolver; give other addresses"
            )


def make_bootstrap(config: Config) -> Bootstrap | None:
    """The bootstrap for upstreams given by host name (None when there are none)."""
    named = name_upstreams(config)
    if not named:
        return None
    servers = bootstrap_servers(config)
    if not servers:
        raise StartupError(
            f"upstream {named[0]} is a host name and there is no bootstrap server to resolve "
            "it (none in /etc/resolv.conf that is not this resolver): give 'bootstrap:' "
            "addresses in the config, or the upstream's IP address (tls://IP#name)"
        )
    log.info(
        "upstream host names (%s) resolved through %s",
        ", ".join(sorted({u.host for u in named})),
        ", ".join(str(s) for s in servers),
    )
    return Bootstrap(list(servers), config.upstream_timeout, config.upstream_deadline)


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
