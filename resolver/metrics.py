"""Every metric, defined once: cheap counters on the hot path, Prometheus families at scrape.

The hot path never touches prometheus_client (a labelled ``inc()`` costs about a
microsecond, as much as answering from the memo). Queries are counted into plain dicts
keyed by a label tuple computed once per distinct answer; :class:`ResolverCollector` turns
them, and the state of policy, cache and upstreams, into metric families when Prometheus
scrapes.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import __version__
from .policy.model import ENFORCED, EXPIRED, MONITOR, PENDING
from .policy.timewindow import ALWAYS, NEVER

if TYPE_CHECKING:
    from .server import Server

QTYPE_LABELS: Final = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    64: "SVCB",
    65: "HTTPS",
    255: "ANY",
}
RCODE_LABELS: Final = {
    0: "NOERROR",
    1: "FORMERR",
    2: "SERVFAIL",
    3: "NXDOMAIN",
    4: "NOTIMP",
    5: "REFUSED",
    16: "BADVERS",
}
DECISIONS: Final = ("blocked", "monitored", "allowed", "cached", "forwarded", "refused", "error")
#: Seconds: from 100 us (a memo hit) to 5 s (past the upstream deadline).
BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
STATES: Final = (PENDING, MONITOR, ENFORCED, EXPIRED)


def qtype_label(qtype: int) -> str:
    return QTYPE_LABELS.get(qtype, "other")


def rcode_label(rcode: int) -> str:
    return RCODE_LABELS.get(rcode, "other")


class Histogram:
    """Bucket counts and a sum, without labels: one per label set, kept by the owner."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def family_buckets(self) -> list[tuple[str, float]]:
        out = []
        running = 0
        for bound, count in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class Stats:
    """What the query path counts. ``answers`` is keyed by (proto, qtype, rcode, decision)."""

    def __init__(self) -> None:
        self.answers: Counter[tuple[str, str, str, str]] = Counter()
        self.durations: dict[str, Histogram] = {d: Histogram() for d in DECISIONS}
        self.blocked: Counter[str] = Counter()
        self.would_block: Counter[str] = Counter()
        self.reloads: Counter[str] = Counter()
        self.last_reload_success = 0.0
        self.last_reload_failed = False
        self.last_reload_error: str | None = None
        self.policy_loaded_at = 0.0
        #: Answers from the cache, the answer memo's included.
        self.cache_hits = 0
        #: Answers served stale (RFC 8767) because upstreams failed or were too slow.
        self.stale = 0
        #: Queries stopped before any work: acl (refused), dropped, truncated (rate limit).
        self.stopped: Counter[str] = Counter()


class ResolverCollector(Collector):
    """Builds every ``resolver_`` metric family from a running :class:`Server`."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        resolver = server.resolver
        if resolver is None:
            return
        stats = resolver.stats
        requests = CounterMetricFamily(
            "resolver_requests", "DNS queries received.", labels=["proto", "qtype"]
        )
        by_request: Counter[tuple[str, str]] = Counter()
        responses = CounterMetricFamily(
            "resolver_responses", "DNS responses sent.", labels=["rcode", "decision"]
        )
        by_response: Counter[tuple[str, str]] = Counter()
        for (proto, qtype, rcode, decision), count in list(stats.answers.items()):
            by_request[(proto, qtype)] += count
            by_response[(rcode, decision)] += count
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
        for decision, hist in stats.durations.items():
            duration.add_metric([decision], hist.family_buckets(), hist.total)
        yield duration

        policy = resolver.policy
        blocked = CounterMetricFamily(
            "resolver_blocked", "Queries blocked, by list.", labels=["list"]
        )
        would = CounterMetricFamily(
            "resolver_would_block",
            "Queries that a list in its monitor phase or mode would block, by list.",
            labels=["list"],
        )
        ids = sorted({b.id for b in policy.lists} | set(stats.blocked) | set(stats.would_block))
        for list_id in ids:
            blocked.add_metric([list_id], stats.blocked[list_id])
            would.add_metric([list_id], stats.would_block[list_id])
        yield blocked
        yield would

        now = server.clock()
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

        reloads = CounterMetricFamily(
            "resolver_policy_reloads", "Policy reloads, by result.", labels=["result"]
        )
        for result in ("success", "failure"):
            reloads.add_metric([result], stats.reloads[result])
        yield reloads
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

        cache = resolver.cache
        yield GaugeMetricFamily("resolver_cache_entries", "Answers in the cache.", value=len(cache))
        # Hits served from the answer memo never reach the cache: counted per answer.
        hits = stats.cache_hits
        yield CounterMetricFamily(
            "resolver_cache_hits", "Queries answered from the cache.", value=hits
        )
        yield CounterMetricFamily(
            "resolver_cache_misses", "Cache lookups that found nothing.", value=cache.misses
        )
        yield CounterMetricFamily(
            "resolver_cache_prefetches",
            "Popular entries refreshed before they expired.",
            value=cache.prefetches,
        )
        yield CounterMetricFamily(
            "resolver_cache_stale_answers",
            "Expired answers served because the upstreams failed or were too slow (RFC 8767).",
            value=stats.stale,
        )
        yield CounterMetricFamily(
            "resolver_cache_evictions", "Entries evicted to bound the cache.", value=cache.evictions
        )

        forwarder = resolver.forwarder
        up_duration = HistogramMetricFamily(
            "resolver_upstream_request_duration_seconds",
            "Time of each exchange with an upstream, by its answer's rcode.",
            labels=["upstream", "rcode"],
        )
        for (upstream, rcode), hist in sorted(forwarder.durations.items()):
            up_duration.add_metric([upstream, rcode], hist.family_buckets(), hist.total)
        yield up_duration
        errors = CounterMetricFamily(
            "resolver_upstream_errors",
            "Failed exchanges with upstreams, by kind.",
            labels=["upstream", "kind"],
        )
        for (upstream, kind), count in sorted(forwarder.errors.items()):
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

        stopped = CounterMetricFamily(
            "resolver_queries_stopped",
            "Queries stopped before any work: access list (acl), rate limit (dropped, "
            "truncated), too many questions already upstream (overload).",
            labels=["reason"],
        )
        for reason in ("acl", "dropped", "truncated", "overload"):
            stopped.add_metric([reason], stats.stopped[reason])
        yield stopped
        guard = resolver.guard
        yield GaugeMetricFamily(
            "resolver_ratelimit_clients",
            "Clients (or IPv6 prefixes) with a rate-limit bucket; bounded.",
            value=guard.tracked if guard is not None else 0,
        )

        audit = resolver.audit
        yield CounterMetricFamily(
            "resolver_audit_dropped",
            "Audit log entries dropped because the log could not keep up.",
            value=audit.dropped if audit is not None else 0,
        )
        build = GaugeMetricFamily(
            "resolver_build_info",
            "Version of the resolver and of Python.",
            labels=["version", "python"],
        )
        build.add_metric([__version__, platform.python_version()], 1.0)
        yield build
