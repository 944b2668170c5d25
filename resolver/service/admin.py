"""The admin API (health, readiness, status, explain, reload) and the /metrics endpoint.

Both are routes on :class:`HTTPServer`, on the DNS event loop. Handlers only read the
server's state, except reload, which loads the new policy off the loop as every reload does.
"""

from __future__ import annotations

import asyncio
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import dns.exception
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .. import __version__
from ..console.metrics import ConsoleCollector
from ..core.wire import encode_name
from ..observe.metrics import ResolverCollector, register_service_metrics
from ..policy.explain import explain, parse_moment
from ..policy.formats import normalize
from ..policy.timewindow import ALWAYS, NEVER, format_instant
from .assembly import load_options
from .http import Handler, HTTPServer, Request, Response, error, json_response
from .queries import query_routes
from .rules_api import EditCollector, rules_routes
from .tlsmetrics import TLSCollector

if TYPE_CHECKING:
    from ..config import Config
    from ..core.pipeline import Resolver
    from ..observe.counts import Counts
    from ..policy.model import Policy
    from ..policy.remote import FetchResult
    from ..upstream.endpoints import Upstream
    from ..upstream.forwarder import Forwarder
    from .workers import Supervisor


class Served(Protocol):
    """What the admin API and /metrics read of the running service (the server provides
    it): its state, the workers' supervisor, and reload."""

    @property
    def resolver(self) -> Resolver | None: ...

    @property
    def clock(self) -> Callable[[], float]: ...

    @property
    def config(self) -> Config: ...

    @property
    def started_at(self) -> float: ...

    @property
    def bound(self) -> Sequence[object]: ...

    @property
    def supervisor(self) -> Supervisor | None: ...

    @property
    def fetch_status(self) -> Mapping[str, FetchResult]: ...

    @property
    def http_servers(self) -> Sequence[HTTPServer]: ...

    @property
    def doh_rejected(self) -> Mapping[str, int]: ...

    def counts(self) -> Counts: ...

    async def reload(self) -> bool: ...


async def _explain(
    server: Served, policy: Policy, name: str, query: Mapping[str, str]
) -> dict[str, Any]:
    """``/v1/explain``, as ``resolver explain`` prints it; in a thread, because the rules'
    list files are read again for the lines that name them."""
    moment = parse_moment(query.get("at"), server.clock())
    return await asyncio.get_running_loop().run_in_executor(
        None,
        explain,
        policy,
        name,
        query.get("client") or "127.0.0.1",
        query.get("type") or "A",
        moment.instant,
        moment,
        load_options(server.config),
        query.get("client_id") or "",
    )


def _instant(value: float) -> str | None:
    return None if value in (NEVER, ALWAYS) or not value else format_instant(value)


def admin_routes(server: Served) -> dict[tuple[str, str], Handler]:
    """The admin API of ``server``; see resolver/schema/admin.openapi.json."""

    async def healthz(_: Request) -> Response:
        return json_response(200, {"status": "alive"})

    async def readyz(_: Request) -> Response:
        resolver = server.resolver
        checks = {
            "listeners": bool(server.bound),
            "policy": resolver is not None,
            "upstream": resolver is not None
            and any(resolver.forwarder.healthy(u) for u in resolver.forwarder.upstreams),
        }
        ready = all(checks.values())
        return json_response(200 if ready else 503, {"ready": ready, "checks": checks})

    async def status(_: Request) -> Response:
        if server.supervisor is not None:
            await server.supervisor.refresh_counts()
        return json_response(200, status_document(server))

    async def explain_route(request: Request) -> Response:
        resolver = server.resolver
        if resolver is None:
            return error(503, "not started")
        name = request.query.get("name")
        if not name:
            return error(400, "give ?name=")
        try:
            doc = await _explain(server, resolver.policy, name, request.query)
        except (ValueError, dns.exception.DNSException) as exc:
            return error(400, str(exc))
        return json_response(200, doc)

    async def reload(_: Request) -> Response:
        ok = await server.reload()
        stats = server.resolver.stats if server.resolver else None
        return json_response(
            200 if ok else 500,
            {
                "result": "success" if ok else "failure",
                "policy": server.resolver.policy.digest if server.resolver else None,
                "error": stats.last_reload_error if stats and not ok else None,
            },
        )

    async def flush(request: Request) -> Response:
        resolver = server.resolver
        if resolver is None:
            return error(503, "not started")
        name = request.query.get("name")
        try:
            wire = encode_name(normalize(name)).lower() if name else None
        except ValueError as exc:
            return error(400, f"bad name: {exc}")
        removed = resolver.cache.flush(wire)
        resolver.forget_answers()  # the memo holds rendered cache hits too
        if server.supervisor is not None:  # every worker has a cache of its own
            removed += sum(n or 0 for n in await server.supervisor.ask("flush", wire))
        return json_response(200, {"flushed": removed, "name": normalize(name) if name else None})

    return {
        ("POST", "/v1/cache/flush"): flush,
        ("GET", "/healthz"): healthz,
        ("GET", "/readyz"): readyz,
        ("GET", "/v1/status"): status,
        ("GET", "/v1/explain"): explain_route,
        ("POST", "/v1/reload"): reload,
        **query_routes(server),
        **rules_routes(server),
    }


def status_document(server: Served) -> dict[str, Any]:
    """What ``GET /v1/status`` returns."""
    resolver = server.resolver
    now = server.clock()
    doc: dict[str, Any] = {
        "version": __version__,
        "python": platform.python_version(),
        "started_at": format_instant(server.started_at),
        "uptime_seconds": round(time.time() - server.started_at, 3),
        "listeners": [str(b) for b in server.bound],
        "endpoints": [_endpoint(b) for b in server.bound],
    }
    certs = getattr(server, "certs", None)  # the encrypted listeners' (service/certs.py)
    if certs is not None:
        doc["certificate"] = certs.status(time.time())
    if resolver is None:
        return doc
    forwarder = resolver.forwarder
    doc["upstreams"] = [_upstream_status(forwarder, u) for u in forwarder.upstreams]
    policy = resolver.policy
    stats = resolver.stats
    doc["policy"] = {
        "version": policy.digest,
        "loaded_at": _instant(stats.policy_loaded_at),
        "rules": policy.rule_count,
        "names": policy.name_count,
        "last_reload_failed": stats.last_reload_failed,
        "last_reload_error": stats.last_reload_error,
        "warnings": len(policy.warnings),
    }
    doc["lists"] = [
        {
            "id": b.id,
            "description": b.description,
            "reference": b.reference,
            "mode": b.mode,
            "state": b.phases.state(now),
            "rules": b.rule_count,
            "clients": list(b.clients),
            "enforced_from": _instant(b.phases.enforce_from),
            "next_transition": _instant(b.phases.next_change(now)),
            "blocked": stats.blocked[b.id],
            "would_block": stats.would_block[b.id],
        }
        for b in policy.lists
    ]
    doc["remote_lists"] = [
        {
            "url": spec.url,
            "list": spec.list_id,
            "status": (r := server.fetch_status.get(spec.url)) and r.status,
            "error": r.error if r else None,
            "fetched_at": _instant(r.fetched_at or 0) if r else None,
        }
        for spec in policy.remotes
    ]
    cache = resolver.cache
    doc["cache"] = {"entries": len(cache), "max_entries": cache.max_entries}
    audit = resolver.audit
    doc["audit"] = {"dropped": audit.dropped if audit else 0, "enabled": audit is not None}
    supervisor = server.supervisor
    doc["workers"] = [
        {
            "index": 0,
            "pid": os.getpid(),
            "alive": True,
            "ready": True,
            "restarts": 0,
            "answers": sum(stats.answers.values()),
            "policy": policy.digest,
            "last_reload_error": stats.last_reload_error,
        },
        *(child.status() for child in (supervisor.children if supervisor else ())),
    ]
    return doc


def metrics_routes(server: Served) -> dict[tuple[str, str], Handler]:
    """``GET /metrics`` in the Prometheus text format, from a registry of our own."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ResolverCollector(server))
    registry.register(TLSCollector(server))
    registry.register(ConsoleCollector(server))
    registry.register(EditCollector())
    register_service_metrics(registry, server)

    async def metrics(_: Request) -> Response:
        if server.supervisor is not None:
            await server.supervisor.refresh_counts()
        return Response(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    return {("GET", "/metrics"): metrics}


def _endpoint(bound: object) -> dict[str, Any]:
    return {
        "proto": getattr(bound, "proto", ""),
        "address": getattr(bound, "host", ""),
        "port": getattr(bound, "port", 0),
    }


def _upstream_status(forwarder: Forwarder, up: Upstream) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "address": up.label,
        "transport": up.transport,
        "healthy": forwarder.healthy(up),
        "consecutive_failures": forwarder.failures[up.label],
    }
    conn = forwarder.connections.get(up)
    if conn is not None:
        doc["connections_opened"] = conn.connects
    if not up.is_address and forwarder.bootstrap is not None:
        known = forwarder.bootstrap.known.get(up.host)
        doc["bootstrap_addresses"] = known[1] if known else []
    return doc
