"""The counters the query path increments: plain dicts and lists keyed by label tuples
computed once per distinct answer, so that counting an answer is a few increments. The
metrics collector (observe/metrics.py) turns them into Prometheus families at scrape; the
query path never touches prometheus_client.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Final

from .outcome import DECISIONS
from .tally import Tally

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
#: Seconds: from 100 us (a memo hit) to 5 s (past the upstream deadline). Typed as a
#: tuple of any length: the compiled build keeps it as one Python object, where a
#: fixed-length tuple of floats would be boxed into a new tuple for each bisect.
#: The transports a query comes over (the ``proto`` label of metrics and the audit log).
#: Resolver.handle takes one; -1 (its default) means UDP or TCP, as its ``tcp`` says.
PROTO_UDP: Final = 0
PROTO_TCP: Final = 1
PROTO_DOT: Final = 2
PROTO_DOH: Final = 3
PROTO_DOQ: Final = 4
PROTOS: Final = ("udp", "tcp", "dot", "doh", "doq")

BUCKETS: Final[tuple[float, ...]] = (
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

    def merged(self, other: Histogram | None) -> Histogram:
        """A new histogram with this one's observations and ``other``'s."""
        out = Histogram()
        out.counts = list(self.counts)
        out.total = self.total
        if other is not None:
            out.counts = [a + b for a, b in zip(out.counts, other.counts, strict=True)]
            out.total += other.total
        return out


class Stats:
    """What the query path counts. ``answers`` is keyed by (proto, qtype, rcode, decision)."""

    def __init__(self) -> None:
        #: (Tallies, not Counters: an increment of a Counter costs twice as much, tally.py.)
        self.answers: Tally[tuple[str, str, str, str]] = Tally()
        self.durations: dict[str, Histogram] = {d: Histogram() for d in DECISIONS}
        self.blocked: Tally[str] = Tally()
        self.would_block: Counter[str] = Counter()
        #: Would-block matches by (list, the client's group mask): the monitor phase's
        #: impact per client group. Bounded: past WOULD_BLOCK_GROUPS_MAX keys, a new
        #: combination is counted under mask 0 (groups unknown).
        self.would_block_groups: Counter[tuple[str, int]] = Counter()
        self.reloads: Counter[str] = Counter()
        self.last_reload_success = 0.0
        self.last_reload_failed = False
        self.last_reload_error: str | None = None
        #: Lists a successful reload dropped (their files deleted or emptied).
        self.lists_removed = 0
        self.policy_loaded_at = 0.0
        #: Answers from the cache, the answer memo's included.
        self.cache_hits = 0
        #: Answers served stale (RFC 8767) because upstreams failed or were too slow.
        self.stale = 0
        #: Queries stopped before any work: acl (refused), dropped, truncated (rate limit).
        self.stopped: Counter[str] = Counter()
