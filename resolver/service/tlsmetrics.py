"""The TLS metrics of the encrypted listeners: handshakes and their failures by transport
and reason, the certificate's expiry and reloads, open DoT, DoH and DoQ connections and
the bounds they hit.

Read at scrape from the server's :class:`~.certs.CertStore` (where every encrypted listener
counts its handshakes) and its DoT, DoH and DoQ listeners; nothing here runs per query.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .dot import FAILURE_REASONS

#: The transports with a TLS handshake of their own (the ``proto`` label).
TLS_PROTOS: Final = ("dot", "doh", "doq")


class TLSCollector(Collector):
    """resolver_tls_*, resolver_dot_*, resolver_doh_connections and resolver_doq_* from a
    server: its ``counts()`` (every worker's DoT and DoH counts added up), ``certs`` (None
    without a certificate), and which listeners are up (``dot``, ``doh``, ``doq``)."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        if getattr(server, "resolver", None) is None:
            return
        counts = server.counts()
        certs = getattr(server, "certs", None)
        if certs is not None:
            yield from _tls(counts, certs, _serving(server))
        if getattr(server, "dot", None) is not None:
            yield from _dot(counts)
        if getattr(server, "doh", None) is not None:
            yield GaugeMetricFamily(
                "resolver_doh_connections",
                "Open DNS-over-HTTPS client connections (bounded by tcp.max_connections).",
                value=counts.doh_connections,
            )
        doq = getattr(server, "doq", None)
        if doq is not None:
            yield from _doq(doq.limits)


def _tls(counts: Any, certs: Any, serving: list[str]) -> Iterator[Metric]:
    handshakes = CounterMetricFamily(
        "resolver_tls_handshakes",
        "TLS handshakes completed by the encrypted listeners.",
        labels=["proto"],
    )
    failures = CounterMetricFamily(
        "resolver_tls_handshake_failures",
        "TLS handshakes that failed: timeout (not done within the bound), protocol (not "
        "TLS, or TLS gone wrong), version (below TLS 1.2), closed (the client left), busy "
        "(too many handshakes at once).",
        labels=["proto", "reason"],
    )
    failed = dict(counts.tls_handshake_failures)
    for proto in TLS_PROTOS:
        handshakes.add_metric([proto], counts.tls_handshakes[proto])
    for proto in serving:  # every reason of a listener up, from 0
        for reason in FAILURE_REASONS:
            failed.setdefault((proto, reason), 0)
    for (proto, reason), count in sorted(failed.items()):
        failures.add_metric([proto, reason], count)
    yield handshakes
    yield failures
    yield GaugeMetricFamily(
        "resolver_tls_certificate_expiry_timestamp_seconds",
        "When the certificate the encrypted listeners present expires (Unix time).",
        value=certs.not_after,
    )
    reloads = CounterMetricFamily(
        "resolver_tls_certificate_reloads",
        "Reloads of the certificate files by result (a failure keeps the old pair; the "
        "first worker's: every worker reloads the same files).",
        labels=["result"],
    )
    for result in ("success", "failure"):
        reloads.add_metric([result], certs.reloads[result])
    yield reloads


def _serving(server: Any) -> list[str]:
    """The TLS transports with a listener up (DoH behind a proxy, doh.plain, has no TLS)."""
    protos = [p for p in ("dot", "doq") if getattr(server, p, None) is not None]
    doh = getattr(server, "doh", None)
    if doh is not None and doh.context is not None:
        protos.append("doh")
    return protos


#: resolver_doq_rejected_total's reasons -> the DoQCounts field (service/doqconn.py).
DOQ_REJECTED: Final = (
    ("connection_limit", "connections_refused"),
    ("handshake_timeout", "handshakes_timed_out"),
    ("stream_limit", "streams_refused"),
    ("protocol", "protocol_errors"),
    ("buffer", "buffer_overflows"),
    ("slow_stream", "slow_streams"),
)


def _doq(limits: Any) -> Iterator[Metric]:
    counts = limits.counts
    yield GaugeMetricFamily(
        "resolver_doq_connections",
        "Open DNS-over-QUIC client connections (bounded by tcp.max_connections).",
        value=limits.live,
    )
    yield CounterMetricFamily(
        "resolver_doq_connections_accepted",
        "DNS-over-QUIC connections accepted.",
        value=counts.connections,
    )
    rejected = CounterMetricFamily(
        "resolver_doq_rejected",
        "DNS-over-QUIC bounds hit, by reason: connection_limit (a new connection's Initial "
        "packet dropped over tcp.max_connections), handshake_timeout, stream_limit (a query "
        "over tcp.max_pipeline streams reset), protocol (a malformed stream: the connection "
        "closed), buffer (too many bytes of unfinished queries: closed), slow_stream (a query "
        "not complete within tcp.idle_timeout: cancelled).",
        labels=["reason"],
    )
    for reason, name in DOQ_REJECTED:
        rejected.add_metric([reason], getattr(counts, name))
    yield rejected


def _dot(counts: Any) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "resolver_dot_connections",
        "Open DNS-over-TLS client connections.",
        value=counts.dot_connections,
    )
    yield GaugeMetricFamily(
        "resolver_dot_handshakes_in_progress",
        "DNS-over-TLS handshakes in progress (bounded by tcp.max_connections).",
        value=counts.dot_handshaking,
    )
    evicted = CounterMetricFamily(
        "resolver_dot_connections_evicted",
        "DNS-over-TLS connections closed to make room (the tcp limits, in a table of its own).",
        labels=["reason"],
    )
    for reason in ("idle", "busy", "client"):
        evicted.add_metric([reason], counts.dot_evicted[reason])
    yield evicted
    aborted = CounterMetricFamily(
        "resolver_dot_connections_aborted",
        "DNS-over-TLS connections aborted: answers not read (stalled) or piling up (output).",
        labels=["reason"],
    )
    for reason in ("stalled", "output"):
        aborted.add_metric([reason], counts.dot_aborted[reason])
    yield aborted
