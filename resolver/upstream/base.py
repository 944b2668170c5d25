"""What every upstream transport shares: the :class:`Transport` protocol and the registry of
one transport per scheme, :class:`UpstreamError` and its kinds, and the query we send.

The transports (:mod:`.udp`, :mod:`.tcp`, :mod:`.tls`, :mod:`.https`) import this module
and :mod:`.endpoints`, never the forwarder: what they need of it is the :class:`Owner`
protocol. The protocols are structural, never subclassed, so that the interpreted DoT and
DoH transports never subclass a class of this (compiled) module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Final, Protocol

from ..core.wire import FLAG_AD, FLAG_CD, FLAG_RD, OPT_DO, OPT_PLAIN, Query, Scan, header
from .endpoints import Upstream

#: The kinds of :class:`UpstreamError` (bounded: they are metric labels). Transport
#: failures, which count against an upstream's health:
TIMEOUT: Final = "timeout"
NETWORK: Final = "network"
TRUNCATED: Final = "truncated"  # truncated over TCP too, or no time left for TCP
BOOTSTRAP: Final = "bootstrap"  # its host name could not be resolved
#: Replies that are no answer (counted, no mark against health): an rcode that says
#: nothing about the name (or an HTTP status), a reply that is not ours or not DNS.
RCODE: Final = "rcode"
MALFORMED: Final = "malformed"
MISMATCH: Final = "mismatch"


class UpstreamError(Exception):
    """One exchange with one upstream failed; ``kind`` is a bounded label for metrics."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class Lookup(Protocol):
    """Resolves the host names of tls and https upstreams (:mod:`.bootstrap`)."""

    #: name -> (monotonic expiry, addresses), for status.
    known: dict[str, tuple[float, list[str]]]

    async def lookup(self, name: str) -> list[str]: ...

    def forget(self, name: str) -> None: ...


class Connection(Protocol):
    """One reused encrypted connection to one upstream (DoT, DoH)."""

    bootstrap: Lookup | None
    #: Connections set up so far (for status).
    connects: int

    async def query(self, wire: bytes, qid: int, question: bytes, timeout: float) -> Scan: ...


class Owner(Protocol):
    """What a transport reads from the forwarder it serves."""

    #: Resolves upstream host names (None: none configured); it may change on reload.
    bootstrap: Lookup | None
    #: The reused connection of each tls and https upstream.
    connections: dict[Upstream, Connection]
    #: A CA file to verify encrypted upstreams against (None: the system's trust store).
    tls_ca_file: str | None

    def ignored(self, up: Upstream, exc: Exception) -> None:
        """A reply from ``up`` that is not the answer to our question: counted, ignored."""


class Transport(Protocol):
    """One way to ask an upstream (one per scheme, one instance per forwarder)."""

    async def exchange(self, up: Upstream, q: Query, timeout: float, deadline: float) -> Scan:
        """The reply of ``up`` to ``q`` within ``timeout`` (``deadline``, on the loop's
        clock, bounds any follow-up such as TCP after a truncated reply); any failure is
        an :class:`UpstreamError`."""
        ...

    def close(self) -> None:
        """At shutdown: let go of what still waits."""


#: The registry: scheme (as :data:`.endpoints.DEFAULT_PORTS` names them) -> how to make
#: its transport for a forwarder. Each transport module registers its own.
REGISTRY: dict[str, Callable[[Owner], Transport]] = {}


def register(scheme: str, factory: Callable[[Owner], Transport]) -> None:
    """Make ``factory`` the transport of ``scheme``."""
    REGISTRY[scheme] = factory


_ids: Iterator[int] = iter(())


def query_id() -> int:
    """A random 16-bit query ID (RFC 5452), from the kernel's CSPRNG read 4096 IDs at a
    time: secrets.randbits makes a getrandom() system call per ID, a few percent of the
    CPU of a forwarded query."""
    global _ids
    for qid in _ids:
        return qid
    _ids = iter(memoryview(os.urandom(8192)).cast("H"))
    return next(_ids)


def upstream_query(qid: int, q: Query, edns: bool) -> bytes:
    """The query we send upstream for ``q``: its question in lower case, RD set, CD and AD
    as the client asked, our own OPT (1232 bytes, the client's DO) and none of its options."""
    flags = FLAG_RD | (q.flags & (FLAG_CD | FLAG_AD))
    question = q.key + q.question[-4:]
    if edns:
        return header(qid, flags, 1, 0, 0, 1) + question + (OPT_DO if q.do else OPT_PLAIN)
    return header(qid, flags, 1, 0, 0, 0) + question
