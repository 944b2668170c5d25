"""Reading the config file: YAML to a :class:`~resolver.config.model.Config`, with errors
that name the file, line and field. One function per section; the defaults come from the
dataclasses, so that each is written once.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from ..defaults import STRATEGIES
from ..observe.auditconfig import parse_config as parse_audit
from ..observe.querylog import AuditConfig
from ..observe.storeconfig import StoreConfig, parse_store
from ..upstream.endpoints import Upstream, parse_upstream
from ..yamlload import (
    SourceError,
    Where,
    YMap,
    check_keys,
    empty_map,
    item_where,
    load_file,
    value_where,
)
from .model import (
    ACL_KEYS,
    ADMIN_KEYS,
    CACHE_KEYS,
    DEFAULT_LISTEN,
    INFLIGHT_KEYS,
    LOG_LEVELS,
    MAX_WORKERS,
    METRICS_KEYS,
    RATELIMIT_KEYS,
    REBINDING_KEYS,
    RELOAD_KEYS,
    REMOTE_KEYS,
    TCP_KEYS,
    TOP_KEYS,
    UDP_KEYS,
    UPSTREAM_HEALTH_KEYS,
    AclConfig,
    CacheConfig,
    Config,
    InflightConfig,
    Listen,
    RateLimitConfig,
    RebindingConfig,
    ReloadConfig,
    RemoteConfig,
    TCPConfig,
    UDPConfig,
    UpstreamHealthConfig,
    parse_listen,
    resolv_conf_upstreams,
)


def load_config(path: Path) -> Config:
    """Read a YAML config file; relative paths in it are relative to the file."""
    doc = load_file(path)
    if doc is None:
        doc = empty_map(Where(str(path), 1, 1))
    if not isinstance(doc, YMap):
        raise SourceError(Where(str(path), 1, 1), "", "the config must be a YAML mapping")
    check_keys(doc, TOP_KEYS, "the config")
    base = Config()
    listen = _address_list(doc, "listen", parse_listen)
    admin, admin_token, admin_max, allowed_hosts = _admin(doc)
    metrics = _section(doc, "metrics", METRICS_KEYS)
    return Config(
        listen=listen,
        upstreams=_address_list(doc, "upstreams", parse_upstream),
        blocklists=_path(doc, "blocklists", path) or base.blocklists,
        upstream_timeout=_number(doc, "upstream_timeout", float, 0.05, 30, base.upstream_timeout),
        upstream_deadline=_number(doc, "upstream_deadline", float, 0.1, 60, base.upstream_deadline),
        upstream_strategy=_strategy(doc),
        tls_ca_file=_path(doc, "tls_ca_file", path),
        forward=_forward(doc),
        bootstrap=_address_list(doc, "bootstrap", parse_bootstrap),
        cache=_cache(_section(doc, "cache", CACHE_KEYS)),
        tcp=_tcp(_section(doc, "tcp", TCP_KEYS)),
        udp=UDPConfig(batch=_flag(_section(doc, "udp", UDP_KEYS), "batch", "udp.batch", True)),
        drain_timeout=_number(doc, "drain_timeout", float, 0, 300, base.drain_timeout),
        workers=_number(doc, "workers", int, 1, MAX_WORKERS, base.workers),
        log_level=_log_level(doc),
        groups=_groups(doc),
        state_dir=_path(doc, "state_dir", path) or base.state_dir,
        admin=admin,
        admin_token=admin_token,
        metrics=_one_address(metrics, "listen", "metrics.listen"),
        admin_max_connections=admin_max,
        admin_allowed_hosts=allowed_hosts,
        metrics_max_connections=_number(
            metrics, "max_connections", int, 1, 100_000, base.metrics_max_connections
        ),
        reload=_reload(_section(doc, "reload", RELOAD_KEYS)),
        remote=RemoteConfig(
            _flag(_section(doc, "remote", REMOTE_KEYS), "allow_private", "remote.allow_private")
        ),
        include_roots=_include_roots(doc, path),
        acl=_acl(_section(doc, "acl", ACL_KEYS)),
        ratelimit=_ratelimit(_section(doc, "ratelimit", RATELIMIT_KEYS)),
        rebinding=_rebinding(_section(doc, "rebinding", REBINDING_KEYS)),
        upstream_health=_upstream_health(_section(doc, "upstream_health", UPSTREAM_HEALTH_KEYS)),
        inflight=_inflight(_section(doc, "inflight", INFLIGHT_KEYS)),
        audit=_audit(doc, path),
        store=_store(doc, path),
        source=str(path),
        default_listen=not listen,
    )


def _cache(doc: YMap) -> CacheConfig:
    d = CacheConfig()
    return CacheConfig(
        max_entries=_number(doc, "max_entries", int, 0, 100_000_000, d.max_entries),
        min_ttl=_number(doc, "min_ttl", int, 0, 86_400, d.min_ttl),
        max_ttl=_number(doc, "max_ttl", int, 0, 7 * 86_400, d.max_ttl),
        max_negative_ttl=_number(doc, "max_negative_ttl", int, 0, 86_400, d.max_negative_ttl),
        serve_stale=_number(doc, "serve_stale", float, 0, 30 * 86_400, d.serve_stale),
        stale_timer=_number(doc, "stale_timer", float, 0.05, 30, d.stale_timer),
        prefetch=_flag(doc, "prefetch", "cache.prefetch", d.prefetch),
        max_bytes=_number(doc, "max_bytes", int, 1 << 20, 1 << 40, d.max_bytes),
        memo_max_bytes=_number(doc, "memo_max_bytes", int, 0, 1 << 34, d.memo_max_bytes),
        memo_max_entries=_number(doc, "memo_max_entries", int, 0, 10_000_000, d.memo_max_entries),
    )


def _tcp(doc: YMap) -> TCPConfig:
    d = TCPConfig()
    return TCPConfig(
        idle_timeout=_number(doc, "idle_timeout", float, 0.1, 3600, d.idle_timeout),
        max_connections=_number(doc, "max_connections", int, 1, 1_000_000, d.max_connections),
        max_pipeline=_number(doc, "max_pipeline", int, 1, 65_535, d.max_pipeline),
        max_output=_number(doc, "max_output", int, 4096, 64 * 1024 * 1024, d.max_output),
        max_connections_per_client=_number(
            doc, "max_connections_per_client", int, 0, 1_000_000, d.max_connections_per_client
        ),
    )


def _reload(doc: YMap) -> ReloadConfig:
    d = ReloadConfig()
    return ReloadConfig(
        interval=_number(doc, "interval", float, 0.1, 3600, d.interval),
        debounce=_number(doc, "debounce", float, 0, 60, d.debounce),
        checksum_interval=_number(doc, "checksum_interval", float, 1, 86400, d.checksum_interval),
        allow_empty=_flag(doc, "allow_empty", "reload.allow_empty", d.allow_empty),
        timeout=_number(doc, "timeout", float, 1, 86400, d.timeout),
    )


def _acl(doc: YMap) -> AclConfig:
    d = AclConfig()
    allow = _networks(doc, "allow", "acl.allow") if "allow" in doc else d.allow
    action = doc.get("action", d.action)
    if action not in ("refuse", "drop"):
        raise SourceError(value_where(doc, "action"), "acl.action", "use refuse or drop")
    return AclConfig(allow, action)


def _ratelimit(doc: YMap) -> RateLimitConfig:
    d = RateLimitConfig()
    over = doc.get("over_limit", d.over_limit)
    if over not in ("drop", "truncate"):
        raise SourceError(
            value_where(doc, "over_limit"), "ratelimit.over_limit", "use drop or truncate"
        )
    return RateLimitConfig(
        qps=_number(doc, "qps", float, 0, 1e6, d.qps),
        burst=_number(doc, "burst", float, 0, 1e7, d.burst),
        over_limit=over,
        ipv6_prefix=_number(doc, "ipv6_prefix", int, 32, 128, d.ipv6_prefix),
        max_clients=_number(doc, "max_clients", int, 1, 10_000_000, d.max_clients),
    )


def _rebinding(doc: YMap) -> RebindingConfig:
    enabled = _flag(doc, "enabled", "rebinding.enabled")
    zones = doc.get("allow", [])
    if isinstance(zones, str):
        zones = [zones]
    if not isinstance(zones, list) or not all(isinstance(z, str) for z in zones):
        raise SourceError(
            value_where(doc, "allow"), "rebinding.allow", "expected a list of zone names"
        )
    return RebindingConfig(enabled, tuple(z.strip(".").lower() for z in zones))


def _upstream_health(doc: YMap) -> UpstreamHealthConfig:
    d = UpstreamHealthConfig()
    probe_name = doc.get("probe_name", d.probe_name)
    if not isinstance(probe_name, str) or not _is_domain_name(probe_name):
        raise SourceError(
            value_where(doc, "probe_name"),
            "upstream_health.probe_name",
            "expected a domain name such as '.' or 'example.com'",
        )
    return UpstreamHealthConfig(
        max_fails=_number(doc, "max_fails", int, 1, 100, d.max_fails),
        probe_interval=_number(doc, "probe_interval", float, 0.05, 3600, d.probe_interval),
        probe_max_interval=_number(
            doc, "probe_max_interval", float, 0.05, 3600, d.probe_max_interval
        ),
        probe_name=probe_name,
    )


def _is_domain_name(text: str) -> bool:
    """Whether ``text`` is a name a DNS question can carry: ASCII labels of 1-63 octets,
    255 octets in all in wire form (a lone dot is the root)."""
    name = text.rstrip(".")
    if not text.isascii():
        return False
    if not name:
        return True
    labels = name.split(".")
    return all(0 < len(label) <= 63 for label in labels) and len(name) + 2 <= 255


def _inflight(doc: YMap) -> InflightConfig:
    d = InflightConfig()
    return InflightConfig(
        max=_number(doc, "max", int, 1, 10_000_000, d.max),
        per_client=_number(doc, "per_client", int, 0, 10_000_000, d.per_client),
    )


def _admin(doc: YMap) -> tuple[Listen | None, str | None, int, tuple[str, ...]]:
    """``admin``: its address, token, connection limit and allowed host names."""
    admin = _section(doc, "admin", ADMIN_KEYS)
    token = admin.get("token")
    if token is not None and (not isinstance(token, str) or len(token) < 16):
        raise SourceError(
            value_where(admin, "token"), "admin.token", "expected a secret of 16 characters or more"
        )
    limit = _number(admin, "max_connections", int, 1, 100_000, Config().admin_max_connections)
    return _one_address(admin, "listen", "admin.listen"), token, limit, _host_names(admin)


#: A section's settings type.
_C = TypeVar("_C")


def _parsed(doc: YMap, section: str, parse: Callable[[Any], _C]) -> _C:
    """A section validated by its own parser, whose ``section.key: message`` errors become
    errors at the key's line."""
    section_doc = doc.get(section) or {}
    if not isinstance(section_doc, dict):
        raise SourceError(value_where(doc, section), section, "expected a mapping")
    try:
        return parse(section_doc)
    except ValueError as exc:
        field_name, _, message = str(exc).partition(": ")
        key = field_name.split(".", 1)[-1]
        where = section_doc.key_where.get(key) if isinstance(section_doc, YMap) else None
        raise SourceError(where or value_where(doc, section), field_name, message) from None


def _audit(doc: YMap, path: Path) -> AuditConfig:
    audit = _parsed(doc, "audit", parse_audit)
    if audit.path is not None and not audit.path.is_absolute():
        audit = replace(audit, path=path.parent / audit.path)
    return audit


def _store(doc: YMap, path: Path) -> StoreConfig:
    store = _parsed(doc, "store", parse_store)
    if store.path is not None and not store.path.is_absolute():
        store = replace(store, path=path.parent / store.path)
    return store


def _log_level(doc: YMap) -> str:
    level = doc.get("log_level", Config().log_level)
    if level not in LOG_LEVELS:
        raise SourceError(value_where(doc, "log_level"), "log_level", f"use one of {LOG_LEVELS}")
    return str(level)


def _strategy(doc: YMap) -> str:
    strategy = doc.get("upstream_strategy", Config().upstream_strategy)
    if strategy not in STRATEGIES:
        raise SourceError(
            value_where(doc, "upstream_strategy"),
            "upstream_strategy",
            f"use one of {', '.join(STRATEGIES)}",
        )
    return str(strategy)


def _path(doc: YMap, key: str, config_file: Path) -> Path | None:
    """A path setting, relative to the config file; None when not given (or empty)."""
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise SourceError(value_where(doc, key), key, "expected a path")
    return config_file.parent / value if value else None


def _include_roots(doc: YMap, config_file: Path) -> tuple[Path, ...]:
    roots = doc.get("include_roots", [])
    if isinstance(roots, str):
        roots = [roots]
    if not isinstance(roots, list) or not all(isinstance(r, str) and r for r in roots):
        raise SourceError(
            value_where(doc, "include_roots"), "include_roots", "expected a list of folders"
        )
    return tuple(config_file.parent / r for r in roots)


def parse_bootstrap(text: str) -> Upstream:
    """A bootstrap server: a plain upstream given by IP address (``[udp://]IP[:port]`` or
    ``tcp://IP[:port]``)."""
    up = parse_upstream(text)
    if up.transport not in ("udp", "tcp"):
        raise ValueError(
            f"{text!r}: a bootstrap server is a plain IP[:port] (it resolves the names of the "
            "encrypted upstreams, so it cannot be one)"
        )
    return up


def _number(doc: YMap, key: str, kind: type, low: float, high: float, default: Any) -> Any:
    value = doc.get(key, default)
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or not low <= value <= high:
        noun = "a number" if kind is float else "a whole number"
        raise SourceError(value_where(doc, key), key, f"expected {noun} from {low:g} to {high:g}")
    return kind(value)


def _section(doc: YMap, key: str, keys: frozenset[str]) -> YMap:
    value = doc.get(key)
    if value is None:
        return empty_map(doc.where)
    if not isinstance(value, YMap):
        raise SourceError(value_where(doc, key), key, "expected a mapping")
    check_keys(value, keys, key)
    return value


def _address_list(doc: YMap, key: str, parse: Any) -> tuple[Any, ...]:
    value = doc.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise SourceError(value_where(doc, key), key, "expected a list of addresses")
    out = []
    for index, item in enumerate(value):
        try:
            out.append(parse(str(item)))
        except ValueError as exc:
            raise SourceError(
                item_where(value, index) or value_where(doc, key), f"{key}[{index}]", str(exc)
            ) from None
    return tuple(out)


_GROUP_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _groups(doc: YMap) -> tuple[tuple[str, tuple[str, ...]], ...]:
    value = doc.get("groups")
    if value is None:
        return ()
    if not isinstance(value, YMap):
        raise SourceError(
            value_where(doc, "groups"), "groups", "expected a mapping of group name to networks"
        )
    out = []
    for name, nets in value.items():
        field_name = f"groups.{name}"
        if not _GROUP_NAME.match(name) or name == "all":
            raise SourceError(
                value.key_where.get(name),
                field_name,
                "a group name is 1-63 lower-case letters, digits, '-' or '_', and not 'all'",
            )
        if not nets:
            raise SourceError(
                value_where(value, name), field_name, "expected a list of networks (CIDR)"
            )
        out.append((name, _networks(value, name, field_name)))
    return tuple(out)


def _flag(doc: YMap, key: str, field_name: str, default: bool = False) -> bool:
    value = doc.get(key, default)
    if not isinstance(value, bool):
        raise SourceError(value_where(doc, key), field_name, "use true or false")
    return value


def _forward(doc: YMap) -> tuple[tuple[str, tuple[Upstream, ...]], ...]:
    value = doc.get("forward")
    if value is None:
        return ()
    if not isinstance(value, YMap):
        raise SourceError(
            value_where(doc, "forward"), "forward", "expected a mapping of zone to upstreams"
        )
    out = []
    for zone in value:
        name = zone.strip().rstrip(".").lower()
        if not name or " " in name:
            raise SourceError(value.key_where.get(zone), f"forward.{zone}", "expected a zone name")
        ups = _address_list(value, zone, parse_upstream)
        if not ups:
            raise SourceError(value_where(value, zone), f"forward.{zone}", "give upstreams")
        out.append((name, ups))
    return tuple(out)


def _networks(doc: YMap, key: str, field_name: str) -> tuple[str, ...]:
    value = doc.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise SourceError(value_where(doc, key), field_name, "expected a list of networks (CIDR)")
    out = []
    for index, net in enumerate(value):
        try:
            parsed = ipaddress.ip_network(str(net), strict=False)
        except ValueError:
            raise SourceError(
                item_where(value, index) or value_where(doc, key),
                f"{field_name}[{index}]",
                f"{net!r} is not a network (e.g. 10.0.0.0/8 or 2001:db8::/32)",
            ) from None
        # An IPv4-mapped network (::ffff:127.0.0.3/128) is kept in its IPv4 form: clients
        # are matched by their IPv4 address, so the mapped form would never match.
        unmapped = unmap_network(parsed)
        out.append(str(unmapped) if unmapped is not parsed else str(net))
    return tuple(out)


def unmap_network(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``net`` with an IPv4-mapped IPv6 network (``::ffff:0:0/96`` or inside it) given as
    the IPv4 network it stands for; any other network unchanged."""
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


def _one_address(doc: YMap, key: str, field_name: str) -> Listen | None:
    value = doc.get(key)
    if value is None:
        return None
    try:
        return parse_listen(str(value))
    except ValueError as exc:
        raise SourceError(value_where(doc, key), field_name, str(exc)) from None


def _host_names(admin: YMap) -> tuple[str, ...]:
    """``admin.allowed_hosts``: host names or addresses, without port."""
    value = admin.get("allowed_hosts", [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(
        isinstance(v, str) and v.strip() and not any(c in v for c in " /@") for v in value
    ):
        raise SourceError(
            value_where(admin, "allowed_hosts"),
            "admin.allowed_hosts",
            "expected a list of host names or addresses (like resolver.example.org)",
        )
    return tuple(v.strip().lower().rstrip(".") for v in value)


def finish(
    config: Config,
    listen: list[str] | None = None,
    upstreams: list[str] | None = None,
    blocklists: str | None = None,
    admin: str | None = None,
    metrics: str | None = None,
    workers: int | None = None,
) -> Config:
    """Apply command-line overrides and fill in the embedded defaults."""
    if workers is not None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"--workers must be from 1 to {MAX_WORKERS}, not {workers}")
        config = replace(config, workers=workers)
    if admin:
        config = replace(config, admin=parse_listen(admin))
    if metrics:
        config = replace(config, metrics=parse_listen(metrics))
    if listen:
        config = replace(
            config, listen=tuple(parse_listen(x) for x in listen), default_listen=False
        )
    if upstreams:
        config = replace(config, upstreams=tuple(parse_upstream(x) for x in upstreams))
    if blocklists:
        config = replace(config, blocklists=Path(blocklists))
    if not config.listen:
        config = replace(config, listen=DEFAULT_LISTEN, default_listen=True)
    if not config.upstreams:
        config = replace(config, upstreams=resolv_conf_upstreams())
    return config
