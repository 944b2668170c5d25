"""The /metrics families of the DNS listening sockets, UDP and TCP: what the kernel and
the listeners count about them (drops, queues, evictions), as opposed to the queries."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .counts import Counts


def tcp_families(counts: Counts) -> Iterator[Metric]:
    """The TCP listeners' connections, their evictions, aborts and read pauses."""
    yield GaugeMetricFamily(
        "resolver_tcp_connections", "Open TCP client connections.", value=counts.tcp_connections
    )
    yield by_reason(
        "resolver_tcp_connections_evicted",
        "TCP connections closed to make room for a new one: the oldest idle (idle), the "
        "oldest busy when none was idle (busy), the client's own oldest over "
        "tcp.max_connections_per_client (client_limit).",
        (
            ("idle", counts.tcp_evicted_idle),
            ("busy", counts.tcp_evicted_busy),
            ("client_limit", counts.tcp_evicted_client),
        ),
    )
    yield by_reason(
        "resolver_tcp_connections_aborted",
        "TCP connections aborted because the client did not read its answers: not "
        "drained within tcp.idle_timeout (stalled), or past 4 x tcp.max_output (output).",
        (("stalled", counts.tcp_aborted_stalled), ("output", counts.tcp_aborted_output)),
    )
    yield by_reason(
        "resolver_tcp_read_pauses",
        "Times a TCP connection stopped reading: pending output over tcp.max_output "
        "(output), or tcp.max_pipeline queries in flight (pipeline).",
        (("output", counts.tcp_paused_output), ("pipeline", counts.tcp_paused_pipeline)),
    )


def udp_families(counts: Counts) -> Iterator[Metric]:
    """The UDP listening sockets' receive queues (from the kernel) and dropped answers."""
    drops = CounterMetricFamily(
        "resolver_udp_receive_drops",
        "Queries the kernel dropped before the resolver read them, by listening address: "
        "the socket's receive queue was full (see udp.receive_buffer). Summed over the "
        "workers' sockets.",
        labels=["listen"],
    )
    queued = GaugeMetricFamily(
        "resolver_udp_receive_queue_bytes",
        "Bytes of queries waiting in the kernel for the resolver to read them now, by "
        "listening address.",
        labels=["listen"],
    )
    bound = GaugeMetricFamily(
        "resolver_udp_receive_buffer_bytes",
        "The most bytes the kernel queues for a listening address before it drops "
        "(twice udp.receive_buffer where the system granted it).",
        labels=["listen"],
    )
    for listen in sorted(set(counts.udp_receive_buffer) | set(counts.udp_receive_drops)):
        drops.add_metric([listen], counts.udp_receive_drops[listen])
        queued.add_metric([listen], counts.udp_receive_queued[listen])
        bound.add_metric([listen], counts.udp_receive_buffer[listen])
    yield drops
    yield queued
    yield bound
    yield CounterMetricFamily(
        "resolver_udp_answers_dropped",
        "UDP answers dropped because the socket's send buffer stayed full while "
        "4,096 others already waited for room.",
        value=counts.udp_answers_dropped,
    )


def by_reason(name: str, doc: str, values: tuple[tuple[str, int], ...]) -> CounterMetricFamily:
    """A counter family with one sample per ``reason``."""
    family = CounterMetricFamily(name, doc, labels=["reason"])
    for reason, value in values:
        family.add_metric([reason], value)
    return family
