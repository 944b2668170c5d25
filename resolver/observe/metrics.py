"""Every metric, defined once: cheap counters on the hot path, Prometheus families at scrape.

The hot path never touches prometheus_client (a labelled ``inc()`` costs about a
microsecond, as much as answering from the memo). Queries are counted into plain dicts
keyed by a label tuple computed once per distinct answer; :class:`ResolverCollector` turns
them, and the state of policy, cache and upstreams, into metric families when Prometheus
scrapes.
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Final, Protocol

from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from .. import __version__
from ..policy.model import ENFORCED, EXPIRED, MONITOR, PENDING
from ..policy.timewindow import ALWAYS, NEVER
from .counts import Counts
from .socketmetrics import tcp_families, udp_families
from .store import StoreCollector

if TYPE_CHECKING:
    from ..core.pipeline import Resolver
    from ..core.stats import Stats
    from ..policy.model import Policy, RemoteSpec
    from ..policy.remote import FetchResult

STATES: Final = (PENDING, MONITOR, ENFORCED, EXPIRED)


def counts_of(resolver: Resolver) -> Counts:
    """A copy of what ``resolver`` has counted so far."""
    stats = resolver.stats
    cache = resolver.cache
    forwarder = resolver.forwarder
    return Counts(
        Counter(stats.answers),
        {k: h.merged(None) for k, h in stats.durations.items()},
        Counter(stats.blocked),
        Counter(stats.would_block),
        Counter(stats.stopped),
        {k: h.merged(None) for k, h in forwarder.durations.items()},
        Counter(forwarder.errors),
        would_block_groups=Counter(stats.would_block_groups),
        cache_hits=stats.cache_hits,
        stale=stats.stale,
        cache_entries=len(cache),
        cache_misses=cache.misses,
        cache_prefetches=cache.prefetches,
        cache_evictions=cache.evictions,
        cache_bytes=cache.bytes,
        memo_entries=resolver.memo_entries,
        memo_bytes=resolver.memo_bytes,
        memo_evictions=resolver.memo_evictions,
        memo_rejections=resolver.memo_rejections,
        ratelimit_clients=resolver.guard.tracked if resolver.guard is not None else 0,
        audit_dropped=resolver.audit.dropped if resolver.audit is not None else 0,
        ratelimit_evictions=resolver.guard.evictions if resolver.guard is not None else 0,
    )


class CollectorSource(Protocol):
    """What :class:`ResolverCollector` reads: the resolver, the counts of every worker and
    the policy clock (the service's server provides them)."""

    @property
    def resolver(self) -> Resolver | None: ...

    def counts(self) -> Counts: ...

    def clock(self) -> float: ...


class ResolverCollector(Collector):
    """Builds every ``resolver_`` metric family about queries, policy, cache and upstreams,
    one method per area."""

    def __init__(self, source: CollectorSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        resolver = self.source.resolver
        if resolver is None:
            return
        counts = self.source.counts()
        yield from self._answers(counts)
        yield from self._lists(resolver.policy, counts)
        yield from self._policy(resolver.policy, resolver.stats)
        yield from self._cache(counts)
        yield from self._upstreams(resolver, counts)
        yield from self._protection(counts)
        yield from tcp_families(counts)
        yield from udp_families(counts)
        build = GaugeMetricFamily(
            "resolver_build_info",
            "Version of the resolver and of Python.",
            labels=["version", "python"],
        )
        build.add_metric([__version__, platform.python_version()], 1.0)
        yield build

    def _answers(self, counts: Counts) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "resolver_requests", "DNS queries received.", labels=["proto", "qtype"]
        )
        by_request: Counter[tuple[str, str]] = Counter()
        responses = CounterMetricFamily(
            "resolver_responses", "DNS responses sent.", labels=["rcode", "decision"]
        )
        by_response: Counter[tuple[str, str]] = Counter()
        for (proto, qtype, rcode, decision), count in counts.answers.items():
            by_request[(proto, qtype)] += count
            by_response[(rcode, decision)] += count
        # Every transport with a listener up has its series from the start (0, not absent),
        # so that a dashboard or an alert by proto sees a transport nobody uses yet.
        seen = {proto for proto, _ in by_request}
        for proto in self._serving() - seen:
            by_request[(proto, "A")] += 0
        for labels, count in sorted(by_request.items()):
            requests.add_metric(list(labels), count)
        for labels, count in sorted(by_response.items()):
            responses.add_metric(list(labels), count)
        yield requests
        yield responses

        duration = HistogramMetricFamily(
            "resolver_request_duration_seconds",
            "Time from receiving a query to having its answer.",
            labels=["decision"],
        )
        for decision, hist in counts.durations.items():
            duration.add_metric([decision], hist.family_buckets(), hist.total)
        yield duration

    def _serving(self) -> set[str]:
        """The transports (udp, tcp, dot, doh, doq) with a listener up: the server's bound
        listeners (a source without them, as in unit tests, serves none)."""
        return {str(getattr(b, "proto", "")) for b in getattr(self.source, "bound", ())} - {""}

    def _lists(self, policy: Policy, counts: Counts) -> Iterator[Metric]:
        blocked = CounterMetricFamily(
            "resolver_blocked", "Queries blocked, by list.", labels=["list"]
        )
        would = CounterMetricFamily(
            "resolver_would_block",
            "Queries that a list in its monitor phase or mode would block, by list.",
            labels=["list"],
        )
        ids = sorted({b.id for b in policy.lists} | set(counts.blocked) | set(counts.would_block))
        for list_id in ids:
            blocked.add_metric([list_id], counts.blocked[list_id])
            would.add_metric([list_id], counts.would_block[list_id])
        yield blocked
        yield would

        now = self.source.clock()
        rules = GaugeMetricFamily("resolver_list_rules", "Rules loaded, by list.", labels=["list"])
        state = GaugeMetricFamily(
            "resolver_list_state",
            "The state of each list now (1 for the current state).",
            labels=["list", "state"],
        )
        activation = GaugeMetricFamily(
            "resolver_list_activation_timestamp_seconds",
            "When the list's enforcement starts (0: always in force).",
            labels=["list"],
        )
        transition = GaugeMetricFamily(
            "resolver_list_next_transition_timestamp_seconds",
            "The list's next state change (0: none).",
            labels=["list"],
        )
        for blocklist in policy.lists:
            rules.add_metric([blocklist.id], blocklist.rule_count)
            current = blocklist.phases.state(now)
            for name in STATES:
                state.add_metric([blocklist.id, name], 1.0 if name == current else 0.0)
            start = blocklist.phases.enforce_from
            activation.add_metric([blocklist.id], 0.0 if start in (ALWAYS, NEVER) else start)
            nxt = blocklist.phases.next_change(now)
            transition.add_metric([blocklist.id], 0.0 if nxt == NEVER else nxt)
        yield rules
        yield state
        yield activation
        yield transition

    def _policy(self, policy: Policy, stats: Stats) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            "resolver_policy_reloads", "Policy reloads, by result.", labels=["result"]
        )
        for result in ("success", "failure"):
            reloads.add_metric([result], stats.reloads[result])
        yield reloads
        yield CounterMetricFamily(
            "resolver_policy_lists_removed",
            "Lists that reloads dropped because their files were deleted or emptied.",
            value=stats.lists_removed,
        )
        yield GaugeMetricFamily(
            "resolver_policy_last_reload_success_timestamp_seconds",
            "When the policy in force was loaded.",
            value=stats.last_reload_success,
        )
        yield GaugeMetricFamily(
            "resolver_policy_last_reload_failed",
            "1 when the latest reload attempt failed (the previous policy still serves).",
            value=1.0 if stats.last_reload_failed else 0.0,
        )
        info = GaugeMetricFamily(
            "resolver_policy_info", "The policy in force (its content hash).", labels=["digest"]
        )
        info.add_metric([policy.digest], 1.0)
        yield info

    def _cache(self, counts: Counts) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "resolver_cache_entries", "Answers in the cache.", value=counts.cache_entries
        )
        # Hits served from the answer memo never reach the cache: counted per answer.
        yield CounterMetricFamily(
            "resolver_cache_hits", "Queries answered from the cache.", value=counts.cache_hits
        )
        yield CounterMetricFamily(
            "resolver_cache_misses", "Cache lookups that found nothing.", value=counts.cache_misses
        )
        yield CounterMetricFamily(
            "resolver_cache_prefetches",
            "Popular entries refreshed before they expired.",
            value=counts.cache_prefetches,
        )
        yield CounterMetricFamily(
            "resolver_cache_stale_answers",
            "Expired answers served because the upstreams failed or were too slow (RFC 8767).",
            value=counts.stale,
        )
        yield CounterMetricFamily(
            "resolver_cache_evictions",
            "Entries evicted to bound the cache.",
            value=counts.cache_evictions,
        )
        yield GaugeMetricFamily(
            "resolver_cache_bytes",
            "Bytes the cache's entries take (bounded by cache.max_bytes).",
            value=counts.cache_bytes,
        )
        yield GaugeMetricFamily(
            "resolver_memo_entries",
            "Answers in the answer memo (repeated queries answered without parsing).",
            value=counts.memo_entries,
        )
        yield GaugeMetricFamily(
            "resolver_memo_bytes",
            "Bytes the answer memo takes (bounded by cache.memo_max_bytes).",
            value=counts.memo_bytes,
        )
        yield CounterMetricFamily(
            "resolver_memo_evictions",
            "Answers evicted from the memo to keep it within its bounds.",
            value=counts.memo_evictions,
        )
        yield CounterMetricFamily(
            "resolver_memo_rejections",
            "Answers not memoised because one would take over a sixteenth of its bytes.",
            value=counts.memo_rejections,
        )

    def _upstreams(self, resolver: Resolver, counts: Counts) -> Iterator[Metric]:
        forwarder = resolver.forwarder
        up_duration = HistogramMetricFamily(
            "resolver_upstream_request_duration_seconds",
            "Time of each exchange with an upstream, by its answer's rcode.",
            labels=["upstream", "rcode"],
        )
        for (upstream, rcode), hist in sorted(counts.upstream_durations.items()):
            up_duration.add_metric([upstream, rcode], hist.family_buckets(), hist.total)
        yield up_duration
        errors = CounterMetricFamily(
            "resolver_upstream_errors",
            "Failed exchanges with upstreams, by kind.",
            labels=["upstream", "kind"],
        )
        for (upstream, kind), count in sorted(counts.upstream_errors.items()):
            errors.add_metric([upstream, kind], count)
        yield errors
        up = GaugeMetricFamily(
            "resolver_upstream_up",
            "1 when the upstream is healthy, 0 when marked down.",
            labels=["upstream"],
        )
        for target in forwarder.upstreams:
            up.add_metric([target.label], 1.0 if forwarder.healthy(target) else 0.0)
        yield up
        probes = CounterMetricFamily(
            "resolver_upstream_probes",
            "Health probes of upstreams marked down, by result (success brings one back).",
            labels=["upstream", "result"],
        )
        for (upstream, result), count in sorted(forwarder.probes.items()):
            probes.add_metric([upstream, result], count)
        yield probes

    def _protection(self, counts: Counts) -> Iterator[Metric]:
        stopped = CounterMetricFamily(
            "resolver_queries_stopped",
            "Queries stopped before any work: access list (acl), rate limit (dropped, "
            "truncated), too many questions already upstream (overload), or from this "
            "client (client_inflight).",
            labels=["reason"],
        )
        for reason in ("acl", "dropped", "truncated", "overload", "client_inflight"):
            stopped.add_metric([reason], counts.stopped[reason])
        yield stopped
        yield GaugeMetricFamily(
            "resolver_ratelimit_clients",
            "Clients (or IPv6 prefixes) with a rate-limit bucket; bounded.",
            value=counts.ratelimit_clients,
        )
        yield CounterMetricFamily(
            "resolver_ratelimit_evictions",
            "Rate-limit buckets dropped, least recently used first, because the table was "
            "full (ratelimit.max_clients).",
            value=counts.ratelimit_evictions,
        )
        yield CounterMetricFamily(
            "resolver_audit_dropped",
            "Audit log entries dropped because the log could not keep up.",
            value=counts.audit_dropped,
        )


class HTTPListener(Protocol):
    """What /metrics reads of an HTTP listener (service/http.HTTPServer): its name, its
    connections and their cap, and its refusals by reason (every reason present, from 0)."""

    @property
    def name(self) -> str: ...

    @property
    def connections(self) -> int: ...

    @property
    def max_connections(self) -> int: ...

    @property
    def rejected(self) -> Mapping[str, int]: ...


class ServiceSource(Protocol):
    """What :class:`ServiceCollector` reads: the resolver (for its policy's remote lists),
    how each remote list's latest fetch went, and the HTTP listeners that are up."""

    @property
    def resolver(self) -> Resolver | None: ...

    @property
    def fetch_status(self) -> Mapping[str, FetchResult]: ...

    @property
    def http_servers(self) -> Sequence[HTTPListener]: ...

    @property
    def doh_rejected(self) -> Mapping[str, int]: ...


def register_service_metrics(registry: CollectorRegistry, source: ServiceSource) -> None:
    """Add to ``registry`` what is not about queries: the process (``resolver_process_*``:
    resident memory, CPU seconds, open file descriptors, start time; of the first worker
    only), the freshness of remote lists and the HTTP listeners' limits."""
    ProcessCollector(namespace="resolver", registry=registry)
    registry.register(ServiceCollector(source))
    registry.register(StoreCollector(source))


class ServiceCollector(Collector):
    """Remote-list freshness and the HTTP listeners' counters, at scrape time."""

    def __init__(self, source: ServiceSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        source = self.source
        if source.resolver is not None:
            yield from self._remote_lists(source.resolver.policy.remotes, source.fetch_status)
        connections = GaugeMetricFamily(
            "resolver_http_connections",
            "HTTP connections open now, by listener (admin, metrics).",
            labels=["server"],
        )
        limit = GaugeMetricFamily(
            "resolver_http_max_connections",
            "The most HTTP connections a listener keeps open (max_connections).",
            labels=["server"],
        )
        rejected = CounterMetricFamily(
            "resolver_http_rejected",
            "HTTP connections and requests refused, by listener and reason: connection_limit "
            "(every slot busy), evicted (a slow request closed to make room), timeout, "
            "too_large, malformed, host (DNS rebinding), origin (a web page), unauthorized, "
            "csrf (a page's change without its session's CSRF token).",
            labels=["server", "reason"],
        )
        for http in source.http_servers:
            connections.add_metric([http.name], http.connections)
            limit.add_metric([http.name], http.max_connections)
            for reason, count in http.rejected.items():  # every reason, from 0
                rejected.add_metric([http.name, reason], count)
        yield connections
        yield limit
        yield rejected
        doh = CounterMetricFamily(
            "resolver_doh_rejected",
            "DNS-over-HTTPS connections and requests refused, by reason (service/doh.py).",
            labels=["reason"],
        )
        for reason, count in source.doh_rejected.items():
            doh.add_metric([reason], count)
        yield doh

    def _remote_lists(
        self, remotes: Sequence[RemoteSpec], fetch_status: Mapping[str, FetchResult]
    ) -> Iterator[Metric]:
        # Per list, its stalest subscription (the largest age in refresh intervals): one
        # series per list, however many URLs it includes (URLs are no labels: they can
        # hold credentials).
        now = time.time()  # fetched_at is wall-clock time, whatever the policy clock says
        stalest: dict[str, tuple[float, float, float]] = {}
        for spec in remotes:
            result = fetch_status.get(spec.url)
            last = (result.fetched_at or 0.0) if result is not None else 0.0
            lateness = (now - last) / spec.refresh if last else float("inf")
            seen = stalest.get(spec.list_id)
            if seen is None or lateness > seen[0]:
                stalest[spec.list_id] = (lateness, last, spec.refresh)
        success = GaugeMetricFamily(
            "resolver_remote_list_last_success_timestamp_seconds",
            "When the list's remote source was last fetched successfully (a 304 counts; the "
            "stalest source of the list; 0: never).",
            labels=["list"],
        )
        age = GaugeMetricFamily(
            "resolver_remote_list_age_seconds",
            "Seconds since that successful fetch (absent while there was none).",
            labels=["list"],
        )
        refresh = GaugeMetricFamily(
            "resolver_remote_list_refresh_interval_seconds",
            "How often the list's remote source is fetched (its refresh).",
            labels=["list"],
        )
        for list_id, (_, last, every) in sorted(stalest.items()):
            success.add_metric([list_id], last)
            if last:
                age.add_metric([list_id], max(0.0, now - last))
            refresh.add_metric([list_id], every)
        yield success
        yield age
        yield refresh
