"""What one process has counted (:class:`Counts`): plain picklable data, which workers
send to the primary and /metrics (metrics.py) turns into families at scrape."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, Final, TypeVar

from ..core.stats import Histogram

K = TypeVar("K")


def _merge_hists(mine: dict[K, Histogram], theirs: dict[K, Histogram]) -> dict[K, Histogram]:
    return {k: h.merged(theirs.get(k)) for k, h in mine.items()} | {
        k: h.merged(None) for k, h in theirs.items() if k not in mine
    }


@dataclass
class Counts:
    """Everything one process has counted, as plain picklable data.

    With ``--workers N`` each worker sends its Counts to the first one, which adds them up
    for /metrics; a single process just reads its own.
    """

    answers: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    durations: dict[str, Histogram] = field(default_factory=dict)
    blocked: Counter[str] = field(default_factory=Counter)
    would_block: Counter[str] = field(default_factory=Counter)
    stopped: Counter[str] = field(default_factory=Counter)
    upstream_durations: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    upstream_errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    cache_hits: int = 0
    stale: int = 0
    cache_entries: int = 0
    cache_misses: int = 0
    cache_prefetches: int = 0
    cache_evictions: int = 0
    cache_bytes: int = 0
    memo_entries: int = 0
    memo_bytes: int = 0
    memo_evictions: int = 0
    memo_rejections: int = 0
    ratelimit_clients: int = 0
    audit_dropped: int = 0
    ratelimit_evictions: int = 0
    # TCP listeners (service.listeners.TCPConnections.count_into).
    tcp_connections: int = 0
    tcp_evicted_idle: int = 0
    tcp_evicted_busy: int = 0
    tcp_evicted_client: int = 0
    tcp_aborted_stalled: int = 0
    tcp_aborted_output: int = 0
    tcp_paused_output: int = 0
    tcp_paused_pipeline: int = 0
    # Encrypted listeners (service.encrypted.Encrypted.count_into): every worker serves DoT
    # and DoH, so their counts are relayed as the queries' are. (DoQ: the primary only.)
    tls_handshakes: Counter[str] = field(default_factory=Counter)
    tls_handshake_failures: Counter[tuple[str, str]] = field(default_factory=Counter)
    doh_rejected: Counter[str] = field(default_factory=Counter)
    dot_evicted: Counter[str] = field(default_factory=Counter)
    dot_aborted: Counter[str] = field(default_factory=Counter)
    dot_connections: int = 0
    dot_handshaking: int = 0
    doh_connections: int = 0
    #: Would-block matches by (list, client group mask), for /v1/timeline.
    would_block_groups: Counter[tuple[str, int]] = field(default_factory=Counter)
    # UDP listening sockets by address (udpbatch.count_into), from the kernel: datagrams
    # dropped with the receive queue full (a counter), and the queue's bytes now and its
    # bound (gauges); summed over the workers' sockets. And answers dropped because the
    # send buffer stayed full with udpbatch.MAX_QUEUED already waiting.
    udp_receive_drops: Counter[str] = field(default_factory=Counter)
    udp_receive_queued: Counter[str] = field(default_factory=Counter)
    udp_receive_buffer: Counter[str] = field(default_factory=Counter)
    udp_answers_dropped: int = 0

    @property
    def answered(self) -> int:
        """Queries answered (every response sent)."""
        return sum(self.answers.values())

    def __add__(self, other: Counts) -> Counts:
        out = Counts(
            self.answers + other.answers,
            _merge_hists(self.durations, other.durations),
            self.blocked + other.blocked,
            self.would_block + other.would_block,
            self.stopped + other.stopped,
            _merge_hists(self.upstream_durations, other.upstream_durations),
            self.upstream_errors + other.upstream_errors,
        )
        for name in SCALARS:
            setattr(out, name, getattr(self, name) + getattr(other, name))
        for name in TALLIES:  # update, not +: a reason at 0 stays (every reason from 0)
            tally: Counter[Any] = Counter(getattr(self, name))
            tally.update(getattr(other, name))
            setattr(out, name, tally)
        return out


#: The int fields. (The type is the string "int" in the interpreted build, where
#: annotations are postponed, and the class ``int`` in the build mypyc compiles: with "int"
#: alone, the compiled build added up no scalar at all across workers.)
SCALARS: Final = tuple(f.name for f in fields(Counts) if f.type in ("int", int))
#: The encrypted listeners' counters by label, added up across workers.
TALLIES: Final = ("tls_handshakes", "tls_handshake_failures", "doh_rejected", "dot_evicted",
                  "dot_aborted", "would_block_groups", "udp_receive_drops",
                  "udp_receive_queued", "udp_receive_buffer")  # fmt: skip
