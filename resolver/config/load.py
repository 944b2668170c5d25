"""Reading the config file: YAML to a :class:`~resolver.config.model.Config`, with errors
that name the file, line and field. One function per section; the defaults come from the
dataclasses, so that each is written once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from ..defaults import DEFAULT_DOH_PATH, MAX_UDP_RECEIVE_BUFFER, STRATEGIES
from ..observe.auditconfig import parse_size
from ..upstream.endpoints import Upstream, parse_upstream
from ..yamlload import (
    SourceError,
    SourceErrors,
    Where,
    YMap,
    check_keys,
    empty_map,
    item_where,
    load_file,
    raise_all,
    value_where,
)
from .fields import (
    read_addresses,
    read_flag,
    read_host_names,
    read_networks,
    read_number,
    read_one_address,
    read_path,
    read_section,
)
from .model import (
    ACL_KEYS,
    ADMIN_KEYS,
    CACHE_KEYS,
    DDR_KEYS,
    DEFAULT_LISTEN,
    DOH_KEYS,
    DOQ_KEYS,
    DOT_KEYS,
    INFLIGHT_KEYS,
    LOG_LEVELS,
    MAX_WORKERS,
    METRICS_KEYS,
    RATELIMIT_KEYS,
    REBINDING_KEYS,
    RELOAD_KEYS,
    REMOTE_KEYS,
    TCP_KEYS,
    TLS_KEYS,
    TOP_KEYS,
    UDP_KEYS,
    UPSTREAM_HEALTH_KEYS,
    AclConfig,
    CacheConfig,
    Config,
    DDRConfig,
    DoHConfig,
    DoQConfig,
    DoTConfig,
    InflightConfig,
    RateLimitConfig,
    RebindingConfig,
    ReloadConfig,
    RemoteConfig,
    TCPConfig,
    TLSConfig,
    UDPConfig,
    UpstreamHealthConfig,
    parse_listen,
    resolv_conf_upstreams,
)
from .sinks import audit_section as _audit
from .sinks import edits_section as _edits
from .sinks import store_section as _store


def load_config(path: Path) -> Config:
    """Read a YAML config file; relative paths in it are relative to the file. Raise
    :class:`SourceError` naming every error found (:class:`SourceErrors` for several)."""
    config, errors = read_config(path)
    raise_all(errors)
    return config


def read_config(path: Path) -> tuple[Config, list[SourceError]]:
    """The config in ``path`` and every error found in it. Each setting (each section) is
    read on its own, so that one error does not hide the next; a setting in error keeps
    its default in the config returned. A file that is no YAML mapping is one error."""
    doc = load_file(path)
    if doc is None:
        doc = empty_map(Where(str(path), 1, 1))
    if not isinstance(doc, YMap):
        raise SourceError(Where(str(path), 1, 1), "", "the config must be a YAML mapping")
    errors: list[SourceError] = []
    check_keys(doc, TOP_KEYS, "the config", errors)
    base = Config()
    collect = _Collect(doc, errors)
    get, section = collect.get, collect.section
    listen = get(lambda: read_addresses(doc, "listen", parse_listen), ())
    admin, metrics = section("admin", ADMIN_KEYS), section("metrics", METRICS_KEYS)
    groups, group_ids = get(lambda: _groups(doc), ((), ()))
    config = Config(
        listen=listen,
        upstreams=get(lambda: read_addresses(doc, "upstreams", parse_upstream), ()),
        blocklists=get(lambda: read_path(doc, "blocklists", path), None) or base.blocklists,
        upstream_timeout=get(
            lambda: read_number(doc, "upstream_timeout", float, 0.05, 30, base.upstream_timeout),
            base.upstream_timeout,
        ),
        upstream_deadline=get(
            lambda: read_number(doc, "upstream_deadline", float, 0.1, 60, base.upstream_deadline),
            base.upstream_deadline,
        ),
        upstream_strategy=get(lambda: _strategy(doc), base.upstream_strategy),
        tls_ca_file=get(lambda: read_path(doc, "tls_ca_file", path), None),
        forward=get(lambda: _forward(doc), ()),
        bootstrap=get(lambda: read_addresses(doc, "bootstrap", parse_bootstrap), ()),
        cache=get(lambda: _cache(section("cache", CACHE_KEYS)), base.cache),
        tcp=get(lambda: _tcp(section("tcp", TCP_KEYS)), base.tcp),
        udp=get(lambda: _udp(section("udp", UDP_KEYS)), base.udp),
        drain_timeout=get(
            lambda: read_number(doc, "drain_timeout", float, 0, 300, base.drain_timeout),
            base.drain_timeout,
        ),
        workers=get(
            lambda: read_number(doc, "workers", int, 1, MAX_WORKERS, base.workers), base.workers
        ),
        log_level=get(lambda: _log_level(doc), base.log_level),
        groups=groups,
        group_ids=group_ids,
        state_dir=get(lambda: read_path(doc, "state_dir", path), None) or base.state_dir,
        **_http_settings(collect, admin, metrics),
        reload=get(lambda: _reload(section("reload", RELOAD_KEYS)), base.reload),
        remote=get(
            lambda: RemoteConfig(
                read_flag(section("remote", REMOTE_KEYS), "allow_private", "remote.allow_private")
            ),
            base.remote,
        ),
        include_roots=get(lambda: _include_roots(doc, path), ()),
        acl=get(lambda: _acl(section("acl", ACL_KEYS)), base.acl),
        ratelimit=get(lambda: _ratelimit(section("ratelimit", RATELIMIT_KEYS)), base.ratelimit),
        rebinding=get(lambda: _rebinding(section("rebinding", REBINDING_KEYS)), base.rebinding),
        upstream_health=get(
            lambda: _upstream_health(section("upstream_health", UPSTREAM_HEALTH_KEYS)),
            base.upstream_health,
        ),
        inflight=get(lambda: _inflight(section("inflight", INFLIGHT_KEYS)), base.inflight),
        audit=get(lambda: _audit(doc, path), base.audit),
        store=get(lambda: _store(doc, path), base.store),
        edits=get(lambda: _edits(doc, path), base.edits),
        **_encrypted_settings(collect, doc, path),
        source=str(path),
        default_listen=not listen,
    )
    return config, errors


def _encrypted_settings(collect: _Collect, doc: YMap, path: Path) -> dict[str, Any]:
    """The encrypted listeners, their certificate and DDR, as Config's keyword arguments."""
    base = Config()
    tls, dot, doh, doq = collect.get(
        lambda: _encrypted(doc, path), (base.tls, base.dot, base.doh, base.doq)
    )
    ddr = collect.get(
        lambda: DDRConfig(
            read_flag(collect.section("ddr", DDR_KEYS), "enabled", "ddr.enabled", True)
        ),
        base.ddr,
    )
    return {"tls": tls, "dot": dot, "doh": doh, "doq": doq, "ddr": ddr}


def _http_settings(collect: _Collect, admin: YMap, metrics: YMap) -> dict[str, Any]:
    """The admin API's and /metrics' settings, by their Config field."""
    get, base = collect.get, Config()
    return dict(
        admin=get(lambda: read_one_address(admin, "listen", "admin.listen"), None),
        admin_token=get(lambda: _token(admin), None),
        metrics=get(lambda: read_one_address(metrics, "listen", "metrics.listen"), None),
        admin_max_connections=get(
            lambda: read_number(
                admin, "max_connections", int, 1, 100_000, base.admin_max_connections
            ),
            base.admin_max_connections,
        ),
        admin_allowed_hosts=get(lambda: read_host_names(admin), ()),
        metrics_max_connections=get(
            lambda: read_number(
                metrics, "max_connections", int, 1, 100_000, base.metrics_max_connections
            ),
            base.metrics_max_connections,
        ),
    )


class _Collect:
    """Reads one setting or section at a time, keeping each error in ``errors`` and going
    on with the setting's default, so that a config's errors are all reported at once."""

    def __init__(self, doc: YMap, errors: list[SourceError]) -> None:
        self.doc = doc
        self.errors = errors

    def get(self, parse: Callable[[], Any], default: Any) -> Any:
        """What ``parse`` reads, or ``default`` when it finds an error (kept)."""
        try:
            return parse()
        except SourceErrors as exc:
            self.errors.extend(exc.errors)
        except SourceError as exc:
            self.errors.append(exc)
        return default

    def section(self, key: str, keys: frozenset[str]) -> YMap:
        """The section ``key`` (empty when it is no mapping); its unknown keys are kept
        as errors and the keys it knows are still read."""
        section: YMap = self.get(
            lambda: read_section(self.doc, key, keys, self.errors), empty_map(self.doc.where)
        )
        return section


def _cache(doc: YMap) -> CacheConfig:
    d = CacheConfig()
    return CacheConfig(
        max_entries=read_number(doc, "max_entries", int, 0, 100_000_000, d.max_entries),
        min_ttl=read_number(doc, "min_ttl", int, 0, 86_400, d.min_ttl),
        max_ttl=read_number(doc, "max_ttl", int, 0, 7 * 86_400, d.max_ttl),
        max_negative_ttl=read_number(doc, "max_negative_ttl", int, 0, 86_400, d.max_negative_ttl),
        serve_stale=read_number(doc, "serve_stale", float, 0, 30 * 86_400, d.serve_stale),
        stale_timer=read_number(doc, "stale_timer", float, 0.05, 30, d.stale_timer),
        prefetch=read_flag(doc, "prefetch", "cache.prefetch", d.prefetch),
        max_bytes=read_number(doc, "max_bytes", int, 1 << 20, 1 << 40, d.max_bytes),
        memo_max_bytes=read_number(doc, "memo_max_bytes", int, 0, 1 << 34, d.memo_max_bytes),
        memo_max_entries=read_number(
            doc, "memo_max_entries", int, 0, 10_000_000, d.memo_max_entries
        ),
    )


def _tcp(doc: YMap) -> TCPConfig:
    d = TCPConfig()
    return TCPConfig(
        idle_timeout=read_number(doc, "idle_timeout", float, 0.1, 3600, d.idle_timeout),
        max_connections=read_number(doc, "max_connections", int, 1, 1_000_000, d.max_connections),
        max_pipeline=read_number(doc, "max_pipeline", int, 1, 65_535, d.max_pipeline),
        max_output=read_number(doc, "max_output", int, 4096, 64 * 1024 * 1024, d.max_output),
        max_connections_per_client=read_number(
            doc, "max_connections_per_client", int, 0, 1_000_000, d.max_connections_per_client
        ),
    )


def _udp(doc: YMap) -> UDPConfig:
    value = doc.get("receive_buffer")
    buffer: int | None = None
    if value is not None:
        where = value_where(doc, "receive_buffer")
        try:
            if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
                if value < 0:
                    raise ValueError(f"0 (the system's own) or a size such as 4MiB, got {value}")
                buffer = 0
            else:
                buffer = parse_size(value)
        except ValueError as exc:
            raise SourceError(where, "udp.receive_buffer", str(exc)) from None
        if buffer > MAX_UDP_RECEIVE_BUFFER:
            limit = f"at most {MAX_UDP_RECEIVE_BUFFER >> 20} MiB, got {value!r}"
            raise SourceError(where, "udp.receive_buffer", limit)
    return UDPConfig(read_flag(doc, "batch", "udp.batch", True), buffer)


def _reload(doc: YMap) -> ReloadConfig:
    d = ReloadConfig()
    return ReloadConfig(
        interval=read_number(doc, "interval", float, 0.1, 3600, d.interval),
        debounce=read_number(doc, "debounce", float, 0, 60, d.debounce),
        checksum_interval=read_number(
            doc, "checksum_interval", float, 1, 86400, d.checksum_interval
        ),
        allow_empty=read_flag(doc, "allow_empty", "reload.allow_empty", d.allow_empty),
        timeout=read_number(doc, "timeout", float, 1, 86400, d.timeout),
    )


def _acl(doc: YMap) -> AclConfig:
    d = AclConfig()
    allow = read_networks(doc, "allow", "acl.allow") if "allow" in doc else d.allow
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
        qps=read_number(doc, "qps", float, 0, 1e6, d.qps),
        burst=read_number(doc, "burst", float, 0, 1e7, d.burst),
        over_limit=over,
        ipv6_prefix=read_number(doc, "ipv6_prefix", int, 32, 128, d.ipv6_prefix),
        max_clients=read_number(doc, "max_clients", int, 1, 10_000_000, d.max_clients),
    )


def _rebinding(doc: YMap) -> RebindingConfig:
    enabled = read_flag(doc, "enabled", "rebinding.enabled")
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
        max_fails=read_number(doc, "max_fails", int, 1, 100, d.max_fails),
        probe_interval=read_number(doc, "probe_interval", float, 0.05, 3600, d.probe_interval),
        probe_max_interval=read_number(
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
        max=read_number(doc, "max", int, 1, 10_000_000, d.max),
        per_client=read_number(doc, "per_client", int, 0, 10_000_000, d.per_client),
    )


def _token(admin: YMap) -> str | None:
    """``admin.token``: a secret of 16 characters or more, or None."""
    token = admin.get("token")
    if token is not None and (not isinstance(token, str) or len(token) < 16):
        raise SourceError(
            value_where(admin, "token"), "admin.token", "expected a secret of 16 characters or more"
        )
    return token


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


_GROUP_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: The keys of a group written as a mapping (``{networks: [...], ids: [...]}``).
_GROUP_KEYS: Final = frozenset({"networks", "ids"})
_Named = tuple[tuple[str, tuple[str, ...]], ...]


def _groups(doc: YMap) -> tuple[_Named, _Named]:
    """``groups``: name -> networks, or name -> {networks: [...], ids: [...]}; returns the
    networks and the client ids of each group."""
    value = doc.get("groups")
    if value is None:
        return (), ()
    if not isinstance(value, YMap):
        raise SourceError(
            value_where(doc, "groups"), "groups", "expected a mapping of group name to networks"
        )
    nets_out, ids_out = [], []
    for name, entry in value.items():
        field_name = f"groups.{name}"
        if not _GROUP_NAME.match(name) or name == "all":
            raise SourceError(
                value.key_where.get(name),
                field_name,
                "a group name is 1-63 lower-case letters, digits, '-' or '_', and not 'all'",
            )
        if not isinstance(entry, YMap):
            if not entry:
                raise SourceError(value_where(value, name), field_name, "expected networks (CIDR)")
            nets_out.append((name, read_networks(value, name, field_name)))
            continue
        check_keys(entry, _GROUP_KEYS, field_name)
        has = "networks" in entry
        nets = read_networks(entry, "networks", f"{field_name}.networks") if has else ()
        ids = _client_ids(entry, f"{field_name}.ids") if "ids" in entry else ()
        if not nets and not ids:
            raise SourceError(value_where(value, name), field_name, "expected networks or ids")
        nets_out.append((name, nets))
        ids_out += [(name, ids)] if ids else []
    return tuple(nets_out), tuple(ids_out)


_CLIENT_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _client_ids(doc: YMap, field_name: str) -> tuple[str, ...]:
    """Client ids: one DNS label each (letters, digits, hyphens), compared in lower case."""
    value = doc.get("ids")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise SourceError(value_where(doc, "ids"), field_name, "expected a list of client ids")
    out = []
    for index, item in enumerate(value):
        text = str(item).lower()
        if not isinstance(item, str) or not _CLIENT_ID.match(text):
            raise SourceError(
                item_where(value, index) or value_where(doc, "ids"),
                f"{field_name}[{index}]",
                f"{item!r} is not a client id: one DNS label of letters, digits and '-' "
                "(e.g. laptop-7)",
            )
        out.append(text)
    return tuple(out)


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
        ups = read_addresses(value, zone, parse_upstream)
        if not ups:
            raise SourceError(value_where(value, zone), f"forward.{zone}", "give upstreams")
        out.append((name, ups))
    return tuple(out)


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


def _encrypted(doc: YMap, path: Path) -> tuple[TLSConfig, DoTConfig, DoHConfig, DoQConfig]:
    """The encrypted listeners and their certificate: a listener that speaks TLS needs
    ``tls.cert`` and ``tls.key`` (reading them is the server's, which names the file)."""
    section = read_section(doc, "tls", TLS_KEYS)
    domain = section.get("client_id_domain", "")
    if not isinstance(domain, str) or " " in domain:
        raise SourceError(
            value_where(section, "client_id_domain"), "tls.client_id_domain", "expected a name"
        )
    tls = TLSConfig(
        cert=read_path(section, "cert", path),
        key=read_path(section, "key", path),
        client_id_domain=domain.strip().strip(".").lower(),
    )
    dot_doc = read_section(doc, "dot", DOT_KEYS)
    doh_doc = read_section(doc, "doh", DOH_KEYS)
    doq_doc = read_section(doc, "doq", DOQ_KEYS)
    dot = DoTConfig(read_addresses(dot_doc, "listen", parse_listen))
    doq = DoQConfig(read_addresses(doq_doc, "listen", parse_listen))
    doh_path = doh_doc.get("path", DEFAULT_DOH_PATH)
    if not isinstance(doh_path, str) or not doh_path.startswith("/") or "?" in doh_path:
        raise SourceError(
            value_where(doh_doc, "path"), "doh.path", "expected a path such as /dns-query"
        )
    doh = DoHConfig(
        listen=read_addresses(doh_doc, "listen", parse_listen),
        path=doh_path.rstrip("/") or DEFAULT_DOH_PATH,
        plain=read_flag(doh_doc, "plain", "doh.plain"),
        trusted_proxies=read_networks(doh_doc, "trusted_proxies", "doh.trusted_proxies")
        if doh_doc.get("trusted_proxies") is not None
        else (),
        proxy_protocol=read_flag(doh_doc, "proxy_protocol", "doh.proxy_protocol"),
    )
    needs_tls = [
        (name, sub)
        for name, sub, listen in (
            ("dot", dot_doc, dot.listen),
            ("doq", doq_doc, doq.listen),
            ("doh", doh_doc, () if doh.plain else doh.listen),
        )
        if listen
    ]
    if needs_tls and (tls.cert is None or tls.key is None):
        name, sub = needs_tls[0]
        raise SourceError(
            value_where(sub, "listen"),
            f"{name}.listen",
            "an encrypted listener needs a certificate: set tls.cert and tls.key",
        )
    return tls, dot, doh, doq
