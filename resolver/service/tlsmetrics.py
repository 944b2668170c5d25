"""The TLS metrics of the encrypted listeners: handshakes and their failures by transport
and reason, the certificate's expiry and reloads, open DoT connections and their bounds.

Read at scrape from the server's :class:`~.certs.CertStore` (where every encrypted listener
counts its handshakes) and its DoT listeners; nothing here runs per query.
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
    """resolver_tls_* and resolver_dot_* from a server's ``certs`` and ``dot`` (either may
    be None: no certificate configured, no DoT listener)."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        certs = getattr(self.server, "certs", None)
        if certs is None:
            return
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
        failed = dict(certs.handshake_failures)
        for proto in TLS_PROTOS:
            handshakes.add_metric([proto], certs.handshakes[proto])
        for reason in FAILURE_REASONS:  # every reason of DoT from 0
            failed.setdefault(("dot", reason), 0)
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
            "Reloads of the certificate files by result (a failure keeps the old pair).",
            labels=["result"],
        )
        for result in ("success", "failure"):
            reloads.add_metric([result], certs.reloads[result])
        yield reloads
        dot = getattr(self.server, "dot", None)
        if dot is not None:
            yield from _dot(dot)


def _dot(dot: Any) -> Iterator[Metric]:
    table = dot.connections
    yield GaugeMetricFamily(
        "resolver_dot_connections", "Open DNS-over-TLS client connections.", value=len(table.open)
    )
    yield GaugeMetricFamily(
        "resolver_dot_handshakes_in_progress",
        "DNS-over-TLS handshakes in progress (bounded by tcp.max_connections).",
        value=len(dot.handshaking),
    )
    evicted = CounterMetricFamily(
        "resolver_dot_connections_evicted",
        "DNS-over-TLS connections closed to make room (the tcp limits, in a table of its own).",
        labels=["reason"],
    )
    evicted.add_metric(["idle"], table.evicted_idle)
    evicted.add_metric(["busy"], table.evicted_busy)
    evicted.add_metric(["client"], table.evicted_client)
    yield evicted
    aborted = CounterMetricFamily(
        "resolver_dot_connections_aborted",
        "DNS-over-TLS connections aborted: answers not read (stalled) or piling up (output).",
        labels=["reason"],
    )
    aborted.add_metric(["stalled"], table.aborted_stalled)
    aborted.add_metric(["output"], table.aborted_output)
    yield aborted
