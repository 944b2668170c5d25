"""The configuration: typed, with defaults (the settings' meaning is documented on each
field and in docs/configuration.md).

Precedence: command-line flags, then the config file, then the embedded default (listen on
127.0.0.1:5353 and [::1]:5353, forward to the nameservers of /etc/resolv.conf, enforce the
shipped ``blocklists/``). Reading the file is :mod:`resolver.config.load`.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ..defaults import (
    DEFAULT_ALLOW,
    DEFAULT_CACHE_MAX_BYTES,
    DEFAULT_CACHE_MAX_ENTRIES,
    DEFAULT_CACHE_MAX_NEGATIVE_TTL,
    DEFAULT_CACHE_MAX_TTL,
    DEFAULT_DOH_PATH,
    DEFAULT_DOWN_AFTER,
    DEFAULT_HTTP_MAX_CONNECTIONS,
    DEFAULT_INFLIGHT_MAX,
    DEFAULT_MAX_BACKOFF,
    DEFAULT_MEMO_MAX_BYTES,
    DEFAULT_MEMO_MAX_ENTRIES,
    DEFAULT_PROBE_INTERVAL,
    DEFAULT_PROBE_NAME,
    DEFAULT_RATELIMIT_IPV6_PREFIX,
    DEFAULT_RATELIMIT_MAX_CLIENTS,
    DEFAULT_STALE_TIMER,
    DEFAULT_TCP_IDLE,
    DEFAULT_TCP_MAX_CONNECTIONS,
    DEFAULT_TCP_MAX_OUTPUT,
    DEFAULT_TCP_MAX_PER_CLIENT,
    DEFAULT_TCP_MAX_PIPELINE,
    DEFAULT_UPSTREAM_DEADLINE,
    DEFAULT_UPSTREAM_TIMEOUT,
)
from ..observe.querylog import AuditConfig
from ..observe.storeconfig import STORE_KEYS as STORE_KEYS
from ..observe.storeconfig import StoreConfig
from ..upstream.endpoints import Upstream, parse_upstream, split_host_port

DEFAULT_PORT: Final = 5353
RESOLV_CONF: Final = Path("/etc/resolv.conf")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def shipped_blocklists() -> Path:
    """The ``blocklists/`` directory shipped beside the package (a checkout or the image)."""
    env = os.environ.get("RESOLVER_BLOCKLISTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "blocklists"


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
    max_entries: int = DEFAULT_CACHE_MAX_ENTRIES
    min_ttl: int = 0
    max_ttl: int = DEFAULT_CACHE_MAX_TTL
    max_negative_ttl: int = DEFAULT_CACHE_MAX_NEGATIVE_TTL
    serve_stale: float = 0.0  # seconds past expiry an answer may still serve (0: off)
    stale_timer: float = DEFAULT_STALE_TIMER  # seconds to wait for upstreams before serving stale
    prefetch: bool = False  # refresh popular entries in the last tenth of their life
    max_bytes: int = DEFAULT_CACHE_MAX_BYTES  # bytes the entries take; LRU evicted beyond
    memo_max_bytes: int = DEFAULT_MEMO_MAX_BYTES  # the answer memo's bytes (UDP and TCP)
    memo_max_entries: int = DEFAULT_MEMO_MAX_ENTRIES  # the answer memo's entries per transport


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
    #: Bytes the kernel may queue for each UDP listening socket (SO_RCVBUF); None: the
    #: default (DEFAULT_UDP_RECEIVE_BUFFER, quietly capped by the system); 0: the
    #: system's own.
    receive_buffer: int | None = None


@dataclass(frozen=True, slots=True)
class AclConfig:
    allow: tuple[str, ...] = DEFAULT_ALLOW  # networks allowed to query
    action: str = "refuse"  # refuse (REFUSED) | drop (silence) for everyone else


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    qps: float = 0.0  # queries per second per client over UDP; 0 = off
    burst: float = 0.0  # bucket size (at least qps)
    over_limit: str = "drop"  # drop | truncate (TC=1: real clients retry over TCP)
    #: IPv6 clients share a bucket per prefix.
    ipv6_prefix: int = DEFAULT_RATELIMIT_IPV6_PREFIX
    #: Buckets kept; beyond, least recently used go first.
    max_clients: int = DEFAULT_RATELIMIT_MAX_CLIENTS


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
class EditsConfig:
    """Where rule edits made by operators go (``edits:``; resolver/policy/edits.py). None:
    the default (``local-edits.yaml`` in the blocklists folder, ``changes.jsonl`` in
    ``state_dir``)."""

    file: Path | None = None
    list: str = "local"
    changelog: Path | None = None


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    #: Whether include.url may fetch from loopback, link-local or unspecified addresses.
    allow_private: bool = False


@dataclass(frozen=True, slots=True)
class UpstreamHealthConfig:
    max_fails: int = DEFAULT_DOWN_AFTER  # transport failures in a row that mark an upstream down
    probe_interval: float = DEFAULT_PROBE_INTERVAL  # first wait before probing a down upstream
    probe_max_interval: float = DEFAULT_MAX_BACKOFF  # the wait doubles per failed probe up to this
    probe_name: str = DEFAULT_PROBE_NAME  # probes ask this name's NS records


@dataclass(frozen=True, slots=True)
class InflightConfig:
    max: int = DEFAULT_INFLIGHT_MAX  # queries waiting for upstreams at once; beyond, SERVFAIL
    per_client: int = 0  # of those, per client address; 0: a quarter of max, at least 16


#: More workers than this would only contend for the same cores.
MAX_WORKERS: Final = 256


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """The certificate the encrypted listeners (DoT, DoH, DoQ) present; reloaded when its
    files change (service/certs.py)."""

    cert: Path | None = None  # PEM: the certificate, then its chain
    key: Path | None = None  # PEM: its private key
    #: ``{id}.{client_id_domain}`` as the TLS server name names the client ``id`` (AdGuard
    #: Home's convention); empty: client ids come from the DoH path only.
    client_id_domain: str = ""


@dataclass(frozen=True, slots=True)
class DoTConfig:
    """DNS over TLS for clients (RFC 7858): TCP framing in TLS, port 853."""

    listen: tuple[Listen, ...] = ()


@dataclass(frozen=True, slots=True)
class DoHConfig:
    """DNS over HTTPS for clients (RFC 8484): HTTP/2 and HTTP/1.1, port 443."""

    listen: tuple[Listen, ...] = ()
    path: str = DEFAULT_DOH_PATH  # and {path}/{client id}
    #: Plain HTTP, for a TLS-terminating proxy in front (then listen on loopback).
    plain: bool = False
    #: Networks whose X-Forwarded-For header (or PROXY protocol header) names the client.
    trusted_proxies: tuple[str, ...] = ()
    #: Connections from trusted proxies start with a PROXY protocol (v1 or v2) header.
    proxy_protocol: bool = False


@dataclass(frozen=True, slots=True)
class DoQConfig:
    """DNS over QUIC for clients (RFC 9250), port 853 over UDP; needs the ``quic`` extra."""

    listen: tuple[Listen, ...] = ()


@dataclass(frozen=True, slots=True)
class DDRConfig:
    """Discovery of Designated Resolvers (RFC 9462): ``_dns.resolver.arpa`` SVCB answers
    that name the encrypted listeners, so that clients upgrade by themselves."""

    enabled: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    """Everything ``resolver serve`` needs. ``upstreams`` empty means /etc/resolv.conf."""

    listen: tuple[Listen, ...] = ()
    upstreams: tuple[Upstream, ...] = ()
    blocklists: Path = field(default_factory=shipped_blocklists)
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    upstream_deadline: float = DEFAULT_UPSTREAM_DEADLINE
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
    #: The client ids (lower case) of the groups that name some, by group name.
    group_ids: tuple[tuple[str, tuple[str, ...]], ...] = ()
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
    #: The query store (observe/store.py), an audit sink beside the JSON-lines log.
    store: StoreConfig = field(default_factory=StoreConfig)
    #: Rule edits by operators (the API's /v1/rules, ``resolver rules``).
    edits: EditsConfig = EditsConfig()
    source: str = "embedded default"
    tls: TLSConfig = field(default_factory=TLSConfig)
    dot: DoTConfig = field(default_factory=DoTConfig)
    doh: DoHConfig = field(default_factory=DoHConfig)
    doq: DoQConfig = field(default_factory=DoQConfig)
    ddr: DDRConfig = field(default_factory=DDRConfig)
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
        "store",
        "edits",
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
        "tls",
        "dot",
        "doh",
        "doq",
        "ddr",
    }
)
REBINDING_KEYS: Final = frozenset(RebindingConfig.__dataclass_fields__)
ACL_KEYS: Final = frozenset(AclConfig.__dataclass_fields__)
RATELIMIT_KEYS: Final = frozenset(RateLimitConfig.__dataclass_fields__)
EDITS_KEYS: Final = frozenset(EditsConfig.__dataclass_fields__)
ADMIN_KEYS: Final = frozenset({"listen", "token", "max_connections", "allowed_hosts"})
METRICS_KEYS: Final = frozenset({"listen", "max_connections"})
RELOAD_KEYS: Final = frozenset(ReloadConfig.__dataclass_fields__)
REMOTE_KEYS: Final = frozenset(RemoteConfig.__dataclass_fields__)
CACHE_KEYS: Final = frozenset(CacheConfig.__dataclass_fields__)
TCP_KEYS: Final = frozenset(TCPConfig.__dataclass_fields__)
UDP_KEYS: Final = frozenset(UDPConfig.__dataclass_fields__)
UPSTREAM_HEALTH_KEYS: Final = frozenset(UpstreamHealthConfig.__dataclass_fields__)
INFLIGHT_KEYS: Final = frozenset(InflightConfig.__dataclass_fields__)
TLS_KEYS: Final = frozenset(TLSConfig.__dataclass_fields__)
DOT_KEYS: Final = frozenset(DoTConfig.__dataclass_fields__)
DOH_KEYS: Final = frozenset(DoHConfig.__dataclass_fields__)
DOQ_KEYS: Final = frozenset(DoQConfig.__dataclass_fields__)
DDR_KEYS: Final = frozenset(DDRConfig.__dataclass_fields__)

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
