"""The configuration: typed, with defaults, loaded from YAML with errors that name a line.

Precedence: command-line flags, then the config file, then the embedded default (listen on
127.0.0.1:5353 and [::1]:5353, forward to the nameservers of /etc/resolv.conf, enforce the
shipped ``blocklists/``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from .core.cache import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_NEGATIVE_TTL,
    DEFAULT_MAX_TTL,
)
from .core.guard import DEFAULT_ALLOW
from .core.wire import encode_name
from .observe.auditconfig import parse_config as parse_audit
from .observe.querylog import AuditConfig
from .service.http import DEFAULT_MAX_CONNECTIONS as DEFAULT_HTTP_MAX_CONNECTIONS
from .service.listeners import (
    DEFAULT_TCP_IDLE,
    DEFAULT_TCP_MAX_CONNECTIONS,
    DEFAULT_TCP_MAX_OUTPUT,
    DEFAULT_TCP_MAX_PER_CLIENT,
    DEFAULT_TCP_MAX_PIPELINE,
)
from .upstream.forwarder import (
    DEFAULT_DEADLINE,
    DEFAULT_TIMEOUT,
    DOWN_AFTER,
    MAX_BACKOFF,
    PROBE_INTERVAL,
    PROBE_NAME,
    STRATEGIES,
    Upstream,
    parse_upstream,
    split_host_port,
)
from .yamlload import (
    SourceError,
    Where,
    YMap,
    check_keys,
    empty_map,
    item_where,
    load_file,
    value_where,
)

DEFAULT_PORT: Final = 5353
RESOLV_CONF: Final = Path("/etc/resolv.conf")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def shipped_blocklists() -> Path:
    """The ``blocklists/`` directory shipped beside the package (a checkout or the image)."""
    env = os.environ.get("RESOLVER_BLOCKLISTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "blocklists"


def default_state_dir() -> Path:
    """$RESOLVER_STATE_DIR, else $XDG_CACHE_HOME/resolver, else ~/.cache/resolver."""
    env = os.environ.get("RESOLVER_STATE_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "resolver"


@dataclass(frozen=True, slots=True)
class Listen:
    """An address to listen on, UDP and TCP."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str) -> Listen:
    """Read ``HOST:PORT`` or ``[V6]:PORT`` (port 53 when omitted; 0 picks a free port)."""
    host, port = split_host_port(str(text), 53)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: a listen address must be an IP address") from None
    return Listen(host, port)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    max_entries: int = DEFAULT_MAX_ENTRIES
    min_ttl: int = 0
    max_ttl: int = DEFAULT_MAX_TTL
    max_negative_ttl: int = DEFAULT_MAX_NEGATIVE_TTL
    serve_stale: float = 0.0  # seconds past expiry an answer may still serve (0: off)
    stale_timer: float = 1.8  # seconds to wait for upstreams before serving stale
    prefetch: bool = False  # refresh popular entries in the last tenth of their life
    max_bytes: int = DEFAULT_MAX_BYTES  # bytes the entries take; LRU evicted beyond
    memo_max_bytes: int = 16 * 1024 * 1024  # the answer memo's bytes (UDP and TCP)
    memo_max_entries: int = 50_000  # the answer memo's entries per transport


@dataclass(frozen=True, slots=True)
class TCPConfig:
    idle_timeout: float = DEFAULT_TCP_IDLE
    max_connections: int = DEFAULT_TCP_MAX_CONNECTIONS
    max_pipeline: int = DEFAULT_TCP_MAX_PIPELINE
    max_output: int = DEFAULT_TCP_MAX_OUTPUT  # bytes of answers not yet read; then pause
    max_connections_per_client: int = DEFAULT_TCP_MAX_PER_CLIENT  # 0: no per-client limit


@dataclass(frozen=True, slots=True)
class UDPConfig:
    batch: bool = True  # recvmmsg/sendmmsg where the system has them (udpbatch.py)


@dataclass(frozen=True, slots=True)
class AclConfig:
    allow: tuple[str, ...] = DEFAULT_ALLOW  # networks allowed to query
    action: str = "refuse"  # refuse (REFUSED) | drop (silence) for everyone else


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    qps: float = 0.0  # queries per second per client over UDP; 0 = off
    burst: float = 0.0  # bucket size (at least qps)
    over_limit: str = "drop"  # drop | truncate (TC=1: real clients retry over TCP)
    ipv6_prefix: int = 56  # IPv6 clients share a bucket per prefix
    max_clients: int = 100_000  # buckets kept; beyond, least recently used go first


@dataclass(frozen=True, slots=True)
class RebindingConfig:
    enabled: bool = False  # block public names that answer with private addresses
    allow: tuple[str, ...] = ()  # internal zones whose names may answer privately


@dataclass(frozen=True, slots=True)
class ReloadConfig:
    interval: float = 1.0  # seconds between checks of the files' metadata
    debounce: float = 0.5  # quiet time after a change before reloading (bursts of edits)
    checksum_interval: float = 60.0  # seconds between content checksums (the backstop)
    #: Whether a reload may leave no lists where the last good policy had some (a folder
    #: emptied by mistake, a volume not mounted): off, so that it fails loudly instead.
    allow_empty: bool = False
    #: Seconds a policy load may take before it is given up (a list on a stalled network
    #: mount, a FIFO nobody writes): the load fails, the last good policy keeps serving.
    timeout: float = 300.0


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    #: Whether include.url may fetch from loopback, link-local or unspecified addresses.
    allow_private: bool = False


@dataclass(frozen=True, slots=True)
class UpstreamHealthConfig:
    max_fails: int = DOWN_AFTER  # transport failures in a row that mark an upstream down
    probe_interval: float = PROBE_INTERVAL  # first wait before probing a down upstream
    probe_max_interval: float = MAX_BACKOFF  # the wait doubles per failed probe up to this
    probe_name: str = PROBE_NAME  # probes ask this name's NS records


@dataclass(frozen=True, slots=True)
class InflightConfig:
    max: int = 4096  # queries waiting for upstreams at once; beyond, SERVFAIL
    per_client: int = 0  # of those, per client address; 0: a quarter of max, at least 16


#: More workers than this would only contend for the same cores.
MAX_WORKERS: Final = 256


@dataclass(frozen=True, slots=True)
class Config:
    """Everything ``resolver serve`` needs. ``upstreams`` empty means /etc/resolv.conf."""

    listen: tuple[Listen, ...] = ()
    upstreams: tuple[Upstream, ...] = ()
    blocklists: Path = field(default_factory=shipped_blocklists)
    upstream_timeout: float = DEFAULT_TIMEOUT
    upstream_deadline: float = DEFAULT_DEADLINE
    upstream_strategy: str = "failover"
    #: CA file to verify DNS-over-TLS upstreams with (default: the system trust store).
    tls_ca_file: Path | None = None
    #: Conditional forwarding: zone -> its upstreams (longest matching zone wins).
    forward: tuple[tuple[str, tuple[Upstream, ...]], ...] = ()
    #: Plain upstreams (by address) that resolve the host names of tls and https
    #: upstreams; empty means the nameservers of /etc/resolv.conf that are not this resolver.
    bootstrap: tuple[Upstream, ...] = ()
    cache: CacheConfig = CacheConfig()
    tcp: TCPConfig = TCPConfig()
    udp: UDPConfig = UDPConfig()
    drain_timeout: float = 5.0
    #: Processes answering on the same addresses (SO_REUSEPORT); see resolver/service/workers.py.
    workers: int = 1
    log_level: str = "info"
    #: Client groups by name -> networks (CIDR); lists name the groups they apply to.
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: Where copies of remote lists are kept (so that a start needs no network).
    state_dir: Path = field(default_factory=default_state_dir)
    #: The admin API's address (off when None) and its bearer token.
    admin: Listen | None = None
    admin_token: str | None = None
    #: The /metrics address (off when None).
    metrics: Listen | None = None
    #: HTTP connections open at once on each listener, and the names (beyond loopback and
    #: its own addresses) the admin API answers to (DNS rebinding): resolver/service/http.py.
    admin_max_connections: int = DEFAULT_HTTP_MAX_CONNECTIONS
    admin_allowed_hosts: tuple[str, ...] = ()
    metrics_max_connections: int = DEFAULT_HTTP_MAX_CONNECTIONS
    reload: ReloadConfig = ReloadConfig()
    remote: RemoteConfig = RemoteConfig()
    #: Folders besides the lists' own tree that ``include: {file: ...}`` may read.
    include_roots: tuple[Path, ...] = ()
    acl: AclConfig = AclConfig()
    ratelimit: RateLimitConfig = RateLimitConfig()
    rebinding: RebindingConfig = RebindingConfig()
    upstream_health: UpstreamHealthConfig = UpstreamHealthConfig()
    inflight: InflightConfig = InflightConfig()
    audit: AuditConfig = field(default_factory=AuditConfig)
    source: str = "embedded default"
    #: True when ``listen`` was not given anywhere: [::1] is then skipped if IPv6 is absent.
    default_listen: bool = True


TOP_KEYS: Final = frozenset(
    {
        "listen",
        "upstreams",
        "blocklists",
        "upstream_timeout",
        "upstream_deadline",
        "cache",
        "tcp",
        "udp",
        "drain_timeout",
        "workers",
        "log_level",
        "groups",
        "state_dir",
        "admin",
        "metrics",
        "reload",
        "audit",
        "acl",
        "ratelimit",
        "rebinding",
        "upstream_strategy",
        "forward",
        "tls_ca_file",
        "bootstrap",
        "upstream_health",
        "inflight",
        "remote",
        "include_roots",
    }
)
REBINDING_KEYS: Final = frozenset(RebindingConfig.__dataclass_fields__)
ACL_KEYS: Final = frozenset(AclConfig.__dataclass_fields__)
RATELIMIT_KEYS: Final = frozenset(RateLimitConfig.__dataclass_fields__)
ADMIN_KEYS: Final = frozenset({"listen", "token", "max_connections", "allowed_hosts"})
METRICS_KEYS: Final = frozenset({"listen", "max_connections"})
RELOAD_KEYS: Final = frozenset(ReloadConfig.__dataclass_fields__)
REMOTE_KEYS: Final = frozenset(RemoteConfig.__dataclass_fields__)
CACHE_KEYS: Final = frozenset(CacheConfig.__dataclass_fields__)
TCP_KEYS: Final = frozenset(TCPConfig.__dataclass_fields__)
UDP_KEYS: Final = frozenset(UDPConfig.__dataclass_fields__)
UPSTREAM_HEALTH_KEYS: Final = frozenset(UpstreamHealthConfig.__dataclass_fields__)
INFLIGHT_KEYS: Final = frozenset(InflightConfig.__dataclass_fields__)

DEFAULT_LISTEN: Final = (Listen("127.0.0.1", DEFAULT_PORT), Listen("::1", DEFAULT_PORT))


def resolv_conf_upstreams(path: Path = RESOLV_CONF) -> tuple[Upstream, ...]:
    """The ``nameserver`` lines of resolv.conf that are IP addresses."""
    found = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ()
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                found.append(parse_upstream(parts[1].split("%")[0]))
            except ValueError:
                continue
    return tuple(found)


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


def is_self(up: Upstream, listen: tuple[Listen, ...]) -> bool:
    """Whether ``up`` is one of this resolver's own listen addresses (a wildcard listen
    address counts as loopback)."""
    for own in listen:
        if own.port != up.port:
            continue
        if own.host == up.host:
            return True
        wildcard = ipaddress.ip_address(own.host).is_unspecified
        if wildcard and ipaddress.ip_address(up.host).is_loopback:
            return True
    return False


def bootstrap_servers(config: Config) -> tuple[Upstream, ...]:
    """The configured bootstrap servers, else the nameservers of /etc/resolv.conf that are
    not this resolver itself."""
    if config.bootstrap:
        return config.bootstrap
    return tuple(u for u in resolv_conf_upstreams() if not is_self(u, config.listen))


def name_upstreams(config: Config) -> list[Upstream]:
    """The upstreams (default and conditional) given by host name: they need bootstrap."""
    every = list(config.upstreams) + [u for _, ups in config.forward for u in ups]
    return [u for u in every if not u.is_address]


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


def load_config(path: Path) -> Config:
    """Read a YAML config file; relative paths in it are relative to the file."""
    doc = load_file(path)
    if doc is None:
        doc = empty_map(Where(str(path), 1, 1))
    if not isinstance(doc, YMap):
        raise SourceError(Where(str(path), 1, 1), "", "the config must be a YAML mapping")
    check_keys(doc, TOP_KEYS, "the config")
    cache = _section(doc, "cache", CACHE_KEYS)
    tcp = _section(doc, "tcp", TCP_KEYS)
    udp = _section(doc, "udp", UDP_KEYS)
    level = doc.get("log_level", "info")
    if level not in LOG_LEVELS:
        raise SourceError(value_where(doc, "log_level"), "log_level", f"use one of {LOG_LEVELS}")
    listen = _address_list(doc, "listen", parse_listen)
    blocklists = doc.get("blocklists")
    if blocklists is not None and not isinstance(blocklists, str):
        raise SourceError(value_where(doc, "blocklists"), "blocklists", "expected a path")
    base = Config()
    admin = _section(doc, "admin", ADMIN_KEYS)
    metrics = _section(doc, "metrics", METRICS_KEYS)
    reload = _section(doc, "reload", RELOAD_KEYS)
    remote = _section(doc, "remote", REMOTE_KEYS)
    roots = doc.get("include_roots", [])
    if isinstance(roots, str):
        roots = [roots]
    if not isinstance(roots, list) or not all(isinstance(r, str) and r for r in roots):
        raise SourceError(
            value_where(doc, "include_roots"), "include_roots", "expected a list of folders"
        )
    token = admin.get("token")
    if token is not None and (not isinstance(token, str) or len(token) < 16):
        raise SourceError(
            value_where(admin, "token"), "admin.token", "expected a secret of 16 characters or more"
        )
    audit_doc = doc.get("audit") or {}
    if not isinstance(audit_doc, dict):
        raise SourceError(value_where(doc, "audit"), "audit", "expected a mapping")
    try:
        audit = parse_audit(audit_doc)
    except ValueError as exc:
        field_name, _, message = str(exc).partition(": ")
        key = field_name.split(".", 1)[-1]
        where = audit_doc.key_where.get(key) if isinstance(audit_doc, YMap) else None
        raise SourceError(where or value_where(doc, "audit"), field_name, message) from None
    if audit.path is not None and not audit.path.is_absolute():
        audit = replace(audit, path=path.parent / audit.path)
    acl = _section(doc, "acl", ACL_KEYS)
    allow = _networks(acl, "allow", "acl.allow") if "allow" in acl else DEFAULT_ALLOW
    acl_action = acl.get("action", "refuse")
    if acl_action not in ("refuse", "drop"):
        raise SourceError(value_where(acl, "action"), "acl.action", "use refuse or drop")
    limit = _section(doc, "ratelimit", RATELIMIT_KEYS)
    over = limit.get("over_limit", "drop")
    if over not in ("drop", "truncate"):
        raise SourceError(
            value_where(limit, "over_limit"), "ratelimit.over_limit", "use drop or truncate"
        )
    rebinding = _section(doc, "rebinding", REBINDING_KEYS)
    enabled = rebinding.get("enabled", False)
    if not isinstance(enabled, bool):
        raise SourceError(
            value_where(rebinding, "enabled"), "rebinding.enabled", "use true or false"
        )
    zones = rebinding.get("allow", [])
    if isinstance(zones, str):
        zones = [zones]
    if not isinstance(zones, list) or not all(isinstance(z, str) for z in zones):
        raise SourceError(
            value_where(rebinding, "allow"), "rebinding.allow", "expected a list of zone names"
        )
    strategy = doc.get("upstream_strategy", "failover")
    if strategy not in STRATEGIES:
        raise SourceError(
            value_where(doc, "upstream_strategy"),
            "upstream_strategy",
            f"use one of {', '.join(STRATEGIES)}",
        )
    health = _section(doc, "upstream_health", UPSTREAM_HEALTH_KEYS)
    probe_name = health.get("probe_name", PROBE_NAME)
    try:
        encode_name(probe_name if isinstance(probe_name, str) else "")
    except (ValueError, UnicodeError):
        probe_name = None
    if not isinstance(probe_name, str) or not probe_name.isascii():
        raise SourceError(
            value_where(health, "probe_name"),
            "upstream_health.probe_name",
            "expected a domain name such as '.' or 'example.com'",
        )
    inflight = _section(doc, "inflight", INFLIGHT_KEYS)
    ca_file = doc.get("tls_ca_file")
    if ca_file is not None and not isinstance(ca_file, str):
        raise SourceError(value_where(doc, "tls_ca_file"), "tls_ca_file", "expected a path")
    state_dir = doc.get("state_dir")
    if state_dir is not None and not isinstance(state_dir, str):
        raise SourceError(value_where(doc, "state_dir"), "state_dir", "expected a path")
    return Config(
        listen=listen,
        upstreams=_address_list(doc, "upstreams", parse_upstream),
        blocklists=(path.parent / blocklists) if blocklists else base.blocklists,
        upstream_timeout=_number(doc, "upstream_timeout", float, 0.05, 30, DEFAULT_TIMEOUT),
        upstream_deadline=_number(doc, "upstream_deadline", float, 0.1, 60, DEFAULT_DEADLINE),
        cache=CacheConfig(
            max_entries=_number(cache, "max_entries", int, 0, 100_000_000, DEFAULT_MAX_ENTRIES),
            min_ttl=_number(cache, "min_ttl", int, 0, 86_400, 0),
            max_ttl=_number(cache, "max_ttl", int, 0, 7 * 86_400, DEFAULT_MAX_TTL),
            max_negative_ttl=_number(
                cache, "max_negative_ttl", int, 0, 86_400, DEFAULT_MAX_NEGATIVE_TTL
            ),
            serve_stale=_number(cache, "serve_stale", float, 0, 30 * 86_400, 0.0),
            stale_timer=_number(cache, "stale_timer", float, 0.05, 30, 1.8),
            prefetch=_flag(cache, "prefetch", "cache.prefetch"),
            max_bytes=_number(cache, "max_bytes", int, 1 << 20, 1 << 40, DEFAULT_MAX_BYTES),
            memo_max_bytes=_number(cache, "memo_max_bytes", int, 0, 1 << 34, 16 * 1024 * 1024),
            memo_max_entries=_number(cache, "memo_max_entries", int, 0, 10_000_000, 50_000),
        ),
        tcp=TCPConfig(
            idle_timeout=_number(tcp, "idle_timeout", float, 0.1, 3600, DEFAULT_TCP_IDLE),
            max_connections=_number(
                tcp, "max_connections", int, 1, 1_000_000, DEFAULT_TCP_MAX_CONNECTIONS
            ),
            max_pipeline=_number(tcp, "max_pipeline", int, 1, 65_535, DEFAULT_TCP_MAX_PIPELINE),
            max_output=_number(
                tcp, "max_output", int, 4096, 64 * 1024 * 1024, DEFAULT_TCP_MAX_OUTPUT
            ),
            max_connections_per_client=_number(
                tcp, "max_connections_per_client", int, 0, 1_000_000, DEFAULT_TCP_MAX_PER_CLIENT
            ),
        ),
        udp=UDPConfig(batch=_flag(udp, "batch", "udp.batch", True)),
        drain_timeout=_number(doc, "drain_timeout", float, 0, 300, 5.0),
        workers=_number(doc, "workers", int, 1, MAX_WORKERS, 1),
        log_level=level,
        groups=_groups(doc),
        admin=_one_address(admin, "listen", "admin.listen"),
        admin_token=token,
        metrics=_one_address(metrics, "listen", "metrics.listen"),
        admin_max_connections=_number(
            admin, "max_connections", int, 1, 100_000, DEFAULT_HTTP_MAX_CONNECTIONS
        ),
        admin_allowed_hosts=_host_names(admin),
        metrics_max_connections=_number(
            metrics, "max_connections", int, 1, 100_000, DEFAULT_HTTP_MAX_CONNECTIONS
        ),
        reload=ReloadConfig(
            interval=_number(reload, "interval", float, 0.1, 3600, 1.0),
            debounce=_number(reload, "debounce", float, 0, 60, 0.5),
            checksum_interval=_number(reload, "checksum_interval", float, 1, 86400, 60.0),
            allow_empty=_flag(reload, "allow_empty", "reload.allow_empty"),
            timeout=_number(reload, "timeout", float, 1, 86400, 300.0),
        ),
        remote=RemoteConfig(_flag(remote, "allow_private", "remote.allow_private")),
        include_roots=tuple(path.parent / r for r in roots),
        audit=audit,
        upstream_strategy=strategy,
        tls_ca_file=(path.parent / ca_file) if ca_file else None,
        forward=_forward(doc),
        bootstrap=_address_list(doc, "bootstrap", parse_bootstrap),
        upstream_health=UpstreamHealthConfig(
            max_fails=_number(health, "max_fails", int, 1, 100, DOWN_AFTER),
            probe_interval=_number(health, "probe_interval", float, 0.05, 3600, PROBE_INTERVAL),
            probe_max_interval=_number(
                health, "probe_max_interval", float, 0.05, 3600, MAX_BACKOFF
            ),
            probe_name=probe_name,
        ),
        inflight=InflightConfig(
            max=_number(inflight, "max", int, 1, 10_000_000, 4096),
            per_client=_number(inflight, "per_client", int, 0, 10_000_000, 0),
        ),
        acl=AclConfig(allow, acl_action),
        rebinding=RebindingConfig(enabled, tuple(z.strip(".").lower() for z in zones)),
        ratelimit=RateLimitConfig(
            qps=_number(limit, "qps", float, 0, 1e6, 0.0),
            burst=_number(limit, "burst", float, 0, 1e7, 0.0),
            over_limit=over,
            ipv6_prefix=_number(limit, "ipv6_prefix", int, 32, 128, 56),
            max_clients=_number(limit, "max_clients", int, 1, 10_000_000, 100_000),
        ),
        state_dir=(path.parent / state_dir) if state_dir else base.state_dir,
        source=str(path),
        default_listen=not listen,
    )


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
