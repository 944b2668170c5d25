"""The one map from the config to the components: :func:`build` makes them from a config,
:func:`reconfigure` takes a running set from the old config to the new (a reload).

Each setting that a reload can change is applied by one ``_configure_*`` function, which
both paths call, so a new config key is mapped in one place. What only a restart can
change (sockets, HTTP listeners, the audit log, the workers) is built once by the server
and named in :data:`RESTART_ONLY`, so that a reload that changes it says so.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from cryptography import x509

from ..config import (
    CacheConfig,
    Config,
    TCPConfig,
    bootstrap_servers,
    is_self,
    name_upstreams,
)
from ..core.account import AuditSink
from ..core.cache import Cache
from ..core.ddr import Designation, Endpoint
from ..core.guard import Guard
from ..core.pipeline import Clock, Resolver
from ..observe.querylog import AuditLog
from ..observe.store import AuditTee, QueryStore
from ..observe.storeconfig import DEFAULT_FILE
from ..policy import ClientGroups, LoadOptions, Policy
from ..policy.model import synthetic_ruleset
from ..upstream.bootstrap import Bootstrap
from ..upstream.forwarder import Forwarder
from .listeners import TCPConnections
from .workers import Channel, RelayAudit

log = logging.getLogger("resolver")


class StartupError(Exception):
    """The server cannot start; the message says why and what to do."""


def build(config: Config, policy: Policy, clock: Clock) -> Resolver:
    """The resolver and its components (cache, forwarder, guard) for ``config`` (which
    :func:`check` passed); raise :class:`StartupError` for a host-name upstream with no
    bootstrap server."""
    # The shard count follows max_entries at construction; the rest is configured below.
    cache = Cache(config.cache.max_entries)
    forwarder = Forwarder(
        list(config.upstreams),
        tls_ca_file=str(config.tls_ca_file) if config.tls_ca_file else None,
        bootstrap=make_bootstrap(config),
    )
    resolver = Resolver(policy, cache, forwarder, clock)
    resolver.guard = make_guard(config)
    _configure_cache(resolver, config.cache)
    _configure_forwarding(forwarder, config)
    _configure_limits(resolver, config)
    _configure_rebinding(resolver, config)
    resolver.ddr = make_designation(config)
    return resolver


def reconfigure(resolver: Resolver, old: Config, new: Config) -> None:
    """Take what can change without a restart from ``new``; say what cannot."""
    forwarder = resolver.forwarder
    if new.upstreams and list(new.upstreams) != forwarder.upstreams:
        forwarder.upstreams = list(new.upstreams)
        log.info("upstreams now %s", ", ".join(str(u) for u in new.upstreams))
    if new.bootstrap != old.bootstrap or (name_upstreams(new) and not forwarder.bootstrap):
        try:
            forwarder.bootstrap = make_bootstrap(new)
        except StartupError as exc:
            log.error("%s; upstreams given by host name fail until then", exc)
        for conn in forwarder.connections.values():
            conn.bootstrap = forwarder.bootstrap
    if (old.acl, old.ratelimit) != (new.acl, new.ratelimit):
        # A new guard starts with empty buckets: made only when its settings change.
        resolver.guard = make_guard(new)
        log.info("access list and rate limit updated")
    _configure_cache(resolver, new.cache)
    _configure_forwarding(forwarder, new)
    _configure_limits(resolver, new)
    _configure_rebinding(resolver, new)
    # The listeners are the running ones (a restart changes them): only the certificate's
    # name and ddr.enabled come from the new config.
    resolver.ddr = make_designation(replace(new, dot=old.dot, doh=old.doh, doq=old.doq))
    for name, pick in RESTART_ONLY:
        if pick(old) != pick(new):
            log.warning(
                "config: '%s' changed; it takes effect only after a restart "
                "(keeping the running value)",
                name,
            )


#: What a reload cannot change (the server builds it once), by the name the log gives it.
RESTART_ONLY: Final[tuple[tuple[str, Callable[[Config], Any]], ...]] = (
    ("listen", lambda c: c.listen),
    ("tcp", lambda c: c.tcp),
    ("udp", lambda c: c.udp),
    (
        "admin",
        # admin_token: a new one takes effect at once (Server._new_admin_token).
        lambda c: (c.admin, c.admin_max_connections, c.admin_allowed_hosts),
    ),
    ("metrics", lambda c: (c.metrics, c.metrics_max_connections)),
    ("audit", lambda c: c.audit),
    ("store", lambda c: c.store),
    ("workers", lambda c: c.workers),
)


def _configure_cache(resolver: Resolver, config: CacheConfig) -> None:
    cache = resolver.cache
    cache.max_entries = config.max_entries
    cache.min_ttl = config.min_ttl
    cache.max_ttl = config.max_ttl
    cache.max_negative_ttl = config.max_negative_ttl
    cache.serve_stale = config.serve_stale
    cache.prefetch = config.prefetch
    cache.max_bytes = config.max_bytes
    resolver.stale_timer = config.stale_timer
    resolver.memo_max_bytes = config.memo_max_bytes
    resolver.memo_max_entries = config.memo_max_entries


def _configure_forwarding(forwarder: Forwarder, config: Config) -> None:
    """Timeouts, strategy, conditional forwarding and upstream health."""
    forwarder.timeout = config.upstream_timeout
    forwarder.deadline = config.upstream_deadline
    forwarder.strategy = config.upstream_strategy
    forwarder.routes = {zone.strip(".").lower().encode(): list(ups) for zone, ups in config.forward}
    health = config.upstream_health
    forwarder.max_fails = health.max_fails
    forwarder.probe_interval = health.probe_interval
    forwarder.probe_max_interval = max(health.probe_max_interval, health.probe_interval)
    forwarder.probe_name = health.probe_name


def _configure_limits(resolver: Resolver, config: Config) -> None:
    """The in-flight budget: queries waiting for upstreams, in all and per client."""
    inflight = config.inflight
    resolver.max_inflight = inflight.max
    resolver.max_inflight_per_client = inflight.per_client or max(16, inflight.max // 4)


def _configure_rebinding(resolver: Resolver, config: Config) -> None:
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


def make_designation(config: Config) -> Designation:
    """What ``_dns.resolver.arpa`` designates (RFC 9462): the encrypted listeners, one
    SVCB record per kind and port, named by the certificate's first DNS name. Nothing when
    ``ddr.enabled`` is off, without encrypted listeners, or without a DNS name to name
    them by (RFC 9462 4: the TargetName of a resolver.arpa answer may not be ".")."""
    if not config.ddr.enabled:
        return Designation()
    doh = () if config.doh.plain else config.doh.listen  # (the proxy's port is unknown)
    kinds = (
        (("dot",), config.dot.listen, ""),
        (("h2", "http/1.1"), doh, config.doh.path + "{?dns}"),
        (("doq",), config.doq.listen, ""),
    )
    endpoints = []
    for alpn, listens, dohpath in kinds:
        for port in dict.fromkeys(listen.port for listen in listens if listen.port):
            hints = [
                listen.host
                for listen in listens
                if listen.port == port and not ipaddress.ip_address(listen.host).is_unspecified
            ]
            endpoints.append(Endpoint(alpn, port, hints, dohpath))
    if not endpoints or config.tls.cert is None:
        return Designation()
    target = certificate_name(config.tls.cert)
    if not target:
        log.warning(
            "ddr: %s has no DNS name (only wildcards or addresses): _dns.resolver.arpa "
            "designates nothing (RFC 9462 needs a name to designate the encrypted listeners by)",
            config.tls.cert,
        )
        return Designation()
    return Designation(target, endpoints)


def certificate_name(path: Path) -> str:
    """The first DNS name (not a wildcard) of the certificate in ``path``; "" when it has
    none or cannot be read (the listeners say why)."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return ""
    for name in names.get_values_for_type(x509.DNSName):
        if not name.startswith("*"):
            return name.rstrip(".").lower()
    return ""


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


def make_connections(config: TCPConfig) -> TCPConnections:
    """The TCP listeners' shared connection table and its bounds."""
    return TCPConnections(
        config.max_connections,
        config.idle_timeout,
        config.max_pipeline,
        config.max_output,
        config.max_connections_per_client,
    )


def make_audit(config: Config, channel: Channel | None) -> AuditSink | None:
    """The audit sinks: the JSON-lines log, the query store, both, or None when both are
    off; in a child worker, a relay to the primary's sinks."""
    storing = config.store.kind != "off"
    if config.audit.sink == "off" and not storing:
        return None
    if channel is not None:
        # The relay sends whatever the primary's sinks want ("relay": not off).
        return RelayAudit(replace(config.audit, sink="relay"), channel)
    store = open_store(config) if storing else None
    if config.audit.sink == "off":
        return store
    log.info("audit log: %s (%s)", config.audit.path or "stdout", config.audit.what)
    audit = AuditLog(config.audit)
    return AuditTee(audit, store) if store is not None else audit


def open_store(config: Config) -> QueryStore:
    """The query store of ``config`` (its writer connects when started)."""
    store = config.store
    target = store.dsn if store.kind == "postgresql" else None
    if target is None:
        target = str(store.path or config.state_dir / DEFAULT_FILE)
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    log.info("query store: %s (%s)", store.kind, config.audit.what)
    return QueryStore(store, config.audit, target, dict(config.groups))


def load_options(config: Config) -> LoadOptions:
    """How the policy is loaded: the client groups, the remote-copy folder, the folders
    includes may read and whether remote lists may be on private addresses."""
    return LoadOptions(
        ClientGroups(dict(config.groups), dict(config.group_ids)),
        config.state_dir,
        include_roots=config.include_roots,
        allow_private=config.remote.allow_private,
    )


def check(config: Config) -> None:
    """Raise :class:`StartupError` for the first of :func:`problems` (checked before the
    policy loads)."""
    found = problems(config)
    if found:
        raise StartupError(found[0])


def problems(config: Config) -> list[str]:
    """Why the config cannot work, every reason found (``resolver check`` says them all,
    ``serve`` refuses to start on the first): no upstreams, an upstream or bootstrap server
    that is this resolver, an upstream host name with nothing to resolve it, an admin API
    reachable from the network without a token."""
    out = []
    if not config.upstreams:
        out.append(
            "no upstream resolvers: none in /etc/resolv.conf; give --upstream HOST[:PORT] "
            "or 'upstreams:' in the config"
        )
    every = [*config.upstreams, *(u for _, ups in config.forward for u in ups)]
    for upstream in every:
        if upstream.is_address and is_self(upstream, config.listen):
            out.append(
                f"upstream {upstream} is this resolver's own listen address: queries would loop"
            )
    for server in config.bootstrap:
        if is_self(server, config.listen):
            out.append(
                f"bootstrap server {server} is this resolver's own listen address: the names "
                "of upstreams must be resolved without this resolver; give other addresses"
            )
    if not any(s.startswith("bootstrap server") for s in out):
        try:
            make_bootstrap(config, quiet=True)
        except StartupError as exc:
            out.append(str(exc))
    admin = config.admin
    open_admin = admin is not None and not ipaddress.ip_address(admin.host).is_loopback
    if open_admin and not config.admin_token:
        out.append(
            f"the admin API on {admin} would be reachable from the network: set "
            "admin.token in the config (a secret of 16+ characters), or listen on 127.0.0.1"
        )
    return out


def make_bootstrap(config: Config, quiet: bool = False) -> Bootstrap | None:
    """The bootstrap for upstreams given by host name (None when there are none); not
    logged when ``quiet``."""
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
    if quiet:
        return None
    log.info(
        "upstream host names (%s) resolved through %s",
        ", ".join(sorted({u.host for u in named})),
        ", ".join(str(s) for s in servers),
    )
    return Bootstrap(list(servers), config.upstream_timeout, config.upstream_deadline)
