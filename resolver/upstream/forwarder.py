"""Forwarding to upstream resolvers: which upstreams a query goes to (conditional
forwarding by zone), in which order (:mod:`.strategies`, skipping those :mod:`.health`
marks down), retried within a deadline, each exchange through the transport of the
upstream's scheme (the registry of :mod:`.base`: :mod:`.udp`, :mod:`.tcp`, :mod:`.tls`,
:mod:`.https`), and counted for metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

from ..core.stats import Histogram, rcode_label
from ..core.wire import (
    FLAG_AD,
    FLAG_CD,
    FLAG_RD,
    FLAG_TC,
    OPT_DO,
    OPT_PLAIN,
    RCODE_FORMERR,
    RCODE_NOTIMP,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    FormatError,
    Mismatch,
    Query,
    Scan,
    encode_name,
    header,
    parse_query,
)
from ..defaults import DEFAULT_PROBE_NAME as PROBE_NAME
from ..defaults import DEFAULT_UPSTREAM_DEADLINE as DEFAULT_DEADLINE
from ..defaults import DEFAULT_UPSTREAM_TIMEOUT as DEFAULT_TIMEOUT
from ..policy.model import dotted
from . import https, tcp, tls  # noqa: F401  (each registers its transport)
from .base import (
    MALFORMED,
    MISMATCH,
    RCODE,
    REGISTRY,
    Connection,
    Lookup,
    Transport,
    UpstreamError,
    query_id,
)
from .endpoints import Upstream
from .health import Health
from .strategies import Strategy, strategy_named
from .udp import Exchange, Finish, UDPTransport

log = logging.getLogger("resolver.upstream")

_FAILED_RCODES: Final = frozenset({RCODE_SERVFAIL, RCODE_REFUSED, RCODE_FORMERR, RCODE_NOTIMP})


class Forwarder:
    """Asks upstreams (by strategy, skipping those marked down) until one answers, within
    a bounded time; conditional forwarding picks the upstreams by zone."""

    def __init__(
        self,
        upstreams: list[Upstream],
        timeout: float = DEFAULT_TIMEOUT,
        deadline: float = DEFAULT_DEADLINE,
        strategy: str = "failover",
        routes: dict[str, list[Upstream]] | None = None,
        tls_ca_file: str | None = None,
        bootstrap: Lookup | None = None,
    ) -> None:
        if not upstreams:
            raise ValueError("at least one upstream is needed")
        self._upstreams = upstreams
        #: Conditional forwarding: zone (lower-case, no trailing dot) -> its upstreams.
        self._routes: dict[bytes, list[Upstream]] = {
            zone.strip(".").lower().encode(): ups for zone, ups in (routes or {}).items()
        }
        self.timeout = timeout
        self.deadline = deadline
        self._strategy = Strategy()
        #: The strategy lets begin() ask the first upstream alone, in the configured order.
        self._simple = True
        self.strategy = strategy
        #: Failures, transport health, probes and latency by upstream.
        self.health = Health(self._probe_once)
        self.health.adjust(self._configured())
        self.probe_name = PROBE_NAME
        #: Failed exchanges by (upstream, kind): timeout, network, truncated, rcode; and
        #: ignored replies: mismatch (ID or question), malformed.
        self.errors: Counter[tuple[str, str]] = Counter()
        #: Exchange durations by (upstream, rcode).
        self.durations: dict[tuple[str, str], Histogram] = {}
        self._background: set[asyncio.Task[Scan | None]] = set()
        #: What the transports read from us (base.Owner): the reused connection of each
        #: tls and https upstream, their CA file, and what resolves upstream host names.
        self.connections: dict[Upstream, Connection] = {}
        self.tls_ca_file = tls_ca_file
        self.bootstrap = bootstrap
        #: One transport per scheme, from the registry; UDP's is also at hand for begin().
        self.udp = UDPTransport(self)
        self.transports: dict[str, Transport] = {"udp": self.udp}
        for scheme, make in REGISTRY.items():
            if scheme != "udp":
                self.transports[scheme] = make(self)
        #: How begin()'s exchanges end (bound once, not once a query).
        self._udp_done_cb: Finish = self._udp_done
        #: The loop begin() last ran on (see there).
        self._loop: asyncio.AbstractEventLoop | None = None

    # The configuration, which may change on reload: health adjusts to it.

    @property
    def upstreams(self) -> list[Upstream]:
        """The default upstreams."""
        return self._upstreams

    @upstreams.setter
    def upstreams(self, ups: list[Upstream]) -> None:
        self._upstreams = ups
        self.health.adjust(self._configured())

    @property
    def routes(self) -> dict[bytes, list[Upstream]]:
        """Conditional forwarding: zone (lower-case, no trailing dot) -> its upstreams."""
        return self._routes

    @routes.setter
    def routes(self, routes: dict[bytes, list[Upstream]]) -> None:
        self._routes = routes
        self.health.adjust(self._configured())

    def _configured(self) -> list[Upstream]:
        return self._upstreams + [up for ups in self._routes.values() for up in ups]

    @property
    def strategy(self) -> str:
        """failover (in order), random, fastest (by measured latency), parallel (two at
        once): see :mod:`.strategies`."""
        return self._strategy.name

    @strategy.setter
    def strategy(self, name: str) -> None:
        chosen = self._strategy = strategy_named(name)
        self._simple = chosen.keeps_order and chosen.fanout == 1

    @property
    def max_fails(self) -> int:
        """Transport failures in a row that mark an upstream down."""
        return self.health.max_fails

    @max_fails.setter
    def max_fails(self, value: int) -> None:
        self.health.max_fails = value

    @property
    def probe_interval(self) -> float:
        """The first wait before probing an upstream marked down."""
        return self.health.probe_interval

    @probe_interval.setter
    def probe_interval(self, value: float) -> None:
        self.health.probe_interval = value

    @property
    def probe_max_interval(self) -> float:
        """The longest wait between probes (it doubles after each failure)."""
        return self.health.probe_max_interval

    @probe_max_interval.setter
    def probe_max_interval(self, value: float) -> None:
        self.health.probe_max_interval = value

    @property
    def failures(self) -> Counter[str]:
        """Transport failures in a row, by upstream label (for status)."""
        return Counter({label: e.failures for label, e in self.health.entries.items()})

    @property
    def probes(self) -> Counter[tuple[str, str]]:
        """Probes sent, by (upstream, result): success or failure."""
        return self.health.probes

    def healthy(self, up: Upstream) -> bool:
        """False from ``max_fails`` transport failures in a row until it answers again (a
        probe, or a query it was asked because no other upstream could answer)."""
        return self.health.healthy(up)

    def error_count(self, kind: str) -> int:
        """Failed exchanges of one kind, over all upstreams."""
        return sum(n for (_, k), n in self.errors.items() if k == kind)

    async def close(self) -> None:
        """Stop what is still running in the background (at shutdown, after the drain)."""
        pending: list[asyncio.Task[Scan | None]] = list(self._background)
        probes = self.health.probing()
        for task in pending:
            task.cancel()
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*pending, *probes, return_exceptions=True)
        for transport in self.transports.values():
            transport.close()

    # Routing and order.

    def upstreams_for(self, q: Query) -> list[Upstream]:
        """The upstreams for ``q``: those of the longest forwarding zone that contains its
        name (conditional forwarding), else the default ones."""
        routes = self._routes
        if routes:
            text = dotted(q.key, q.labels)
            for off in q.labels:
                zone = text[off:]
                ups = routes.get(zone)
                if ups is not None:
                    return ups
        return self._upstreams

    def _order(self, ups: list[Upstream]) -> tuple[list[Upstream], list[Upstream]]:
        """The upstreams to try, by strategy, and those resting (marked down, waiting for a
        probe to succeed), which are tried only when the others fail."""
        chosen = self._strategy
        health = self.health
        if not health.troubled and chosen.keeps_order:
            return ups, []  # the common case: every upstream answering, order as given
        usable, resting = health.split(ups)
        return chosen.order(usable, health), resting

    # Resolution: the callback fast path, then retries within the deadline.

    def begin(self, q: Query, done: Callable[[Any, Scan | None], None], arg: Any) -> None:
        """Resolve ``q``, then call ``done(arg, scan)`` with what :meth:`resolve` would
        return.

        The common case costs no task and no coroutine: one UDP exchange with the first
        upstream, driven by callbacks (a task and its coroutines cost more CPU than the
        exchange itself), with no closure either: the exchange carries what its end
        needs (see :meth:`_udp_done`). Anything else (another strategy or transport, an
        upstream in trouble, a timeout, a truncated or EDNS-refusing reply) goes on in a
        task running :meth:`resolve`, within the same deadline.
        """
        loop = self._loop
        if loop is None or not loop.is_running():
            # (asyncio.get_running_loop() makes a getpid() system call each time.)
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline
        up = self.upstreams_for(q)[0]
        # (A later upstream that failed once stays "troubled" until it is asked again;
        # that must not send every query down the slow path.)
        if not self._simple or up.transport != "udp" or up.label in self.health.troubled:
            self._go_on(q, deadline, 0, done, arg)
            return
        qid = query_id()
        # (upstream_query, inline: the question is needed on its own too.)
        question = q.key + q.question[-4:]
        flags = FLAG_RD | (q.flags & (FLAG_CD | FLAG_AD))
        wire = header(qid, flags, 1, 0, 0, 1) + question + (OPT_DO if q.do else OPT_PLAIN)
        exchange = Exchange(
            self, up, qid, question, min(self.timeout, self.deadline), self._udp_done_cb
        )
        exchange.q = q
        exchange.deadline = deadline
        exchange.done = done
        exchange.arg = arg
        exchange.started = time.perf_counter()
        self.udp.start(loop, exchange, wire)

    def _udp_done(self, exchange: Exchange, scan: Scan | None, failure: str, _detail: str) -> None:
        """The end of begin()'s exchange: the answer to ``done``, or on to resolve()."""
        up, q, done, arg = exchange.up, exchange.q, exchange.done, exchange.arg
        assert q is not None and done is not None  # (begin() sets both)
        if scan is None:
            self._failed(up, failure)
            self._go_on(q, exchange.deadline, 1, done, arg)
        elif scan.flags & FLAG_TC or scan.rcode in (RCODE_FORMERR, RCODE_NOTIMP):
            self._go_on(q, exchange.deadline, 0, done, arg, scan)  # on to TCP, or plain DNS
        else:
            good = self._accept(up, scan, exchange.started)
            if good is None:
                self._go_on(q, exchange.deadline, 1, done, arg)
            else:
                done(arg, good)

    def _go_on(
        self,
        q: Query,
        deadline: float,
        first: int,
        done: Callable[[Any, Scan | None], None],
        arg: Any,
        reply: Scan | None = None,
    ) -> None:
        task = asyncio.ensure_future(self.resolve(q, deadline, first, reply))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(
            lambda t: done(arg, None if t.cancelled() or t.exception() else t.result())
        )

    async def resolve(
        self, q: Query, deadline: float | None = None, first: int = 0, reply: Scan | None = None
    ) -> Scan | None:
        """The first good reply for ``q``; None when every upstream failed in time.

        From :meth:`begin`: ``first`` attempts were already made within ``deadline``, or
        the first upstream's UDP ``reply`` needs more work (truncated, or EDNS refused)."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.deadline
        usable, resting = self._order(self.upstreams_for(q))
        ups = usable + resting
        fanout = self._strategy.fanout
        if fanout > 1 and len(usable) > 1 and not first:
            scan = await self._parallel(q, usable[:fanout], deadline)
            if scan is not None:
                return scan
            ups = usable[fanout:] + resting or ups
        # With a single upstream, a lost datagram deserves a second try.
        for attempt in range(first, max(2, len(ups))):
            left = deadline - loop.time()
            if left <= 0:
                break
            scan = await self._attempt(
                ups[attempt % len(ups)], q, min(self.timeout, left), deadline, reply
            )
            reply = None
            if scan is not None:
                return scan
        return None

    async def _parallel(self, q: Query, ups: list[Upstream], deadline: float) -> Scan | None:
        """Ask several upstreams at once; the first good answer wins."""
        loop = asyncio.get_running_loop()
        timeout = min(self.timeout, deadline - loop.time())
        tasks = [asyncio.ensure_future(self._attempt(u, q, timeout, deadline)) for u in ups]
        # The slower attempts run on (bounded by their timeout) so that their outcome
        # still counts for health and latency; they are kept referenced until done.
        for task in tasks:
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        for next_done in asyncio.as_completed(tasks):
            scan = await next_done
            if scan is not None:
                return scan
        return None

    async def _attempt(
        self, up: Upstream, q: Query, timeout: float, deadline: float, reply: Scan | None = None
    ) -> Scan | None:
        """One exchange with one upstream, accounted for; None when it failed."""
        started = time.perf_counter()
        try:
            if reply is None:
                scan = await self.transports[up.transport].exchange(up, q, timeout, deadline)
            else:  # the first UDP reply, from begin()
                scan = await self.udp.exchange(up, q, timeout, deadline, reply)
        except UpstreamError as exc:
            self._failed(up, exc.kind)
            log.debug("upstream %s failed: %s", up, exc)
            return None
        return self._accept(up, scan, started)

    # Accounting: metrics and health.

    def _accept(self, up: Upstream, scan: Scan, started: float) -> Scan | None:
        """Account for a reply from ``up``: the reply when it is an answer, else None."""
        took = time.perf_counter() - started
        label = up.label
        key = (label, rcode_label(scan.rcode))
        hist = self.durations.get(key)
        if hist is None:
            hist = self.durations[key] = Histogram()
        hist.observe(took)
        health = self.health
        if label in health.troubled:
            health.alive(up)  # a reply, whatever its rcode: the transport works
        if scan.rcode in _FAILED_RCODES:
            # Not an answer about the name: another upstream may do better, and the
            # client is told SERVFAIL rather than an error about a query it never sent.
            # Counted, but no mark against the upstream's health: one broken domain must
            # not take a working upstream out of service (nor /readyz with it).
            self.errors[(label, RCODE)] += 1
            log.debug("upstream %s answered rcode %d", up, scan.rcode)
            return None
        health.answered(label, took)
        scan.source = label
        return scan

    def ignored(self, up: Upstream, exc: Exception) -> None:
        """A reply from ``up`` that is not the answer to our question (RFC 5452): ignored,
        and counted by kind."""
        kind = MISMATCH if isinstance(exc, Mismatch) else MALFORMED
        self.errors[(up.label, kind)] += 1
        log.debug("ignored a reply from %s: %s", up, exc)

    def _failed(self, up: Upstream, kind: str) -> None:
        """A transport failure of one exchange with ``up``: counted, and told to health."""
        self.errors[(up.label, kind)] += 1
        self.health.failed(up, kind)

    async def _probe_once(self, up: Upstream) -> None:
        """One probe of ``up``, for health: ``probe_name`` NS (it may change on reload)."""
        try:
            name = encode_name(self.probe_name)
            q = parse_query(header(0, FLAG_RD, 1, 0, 0, 0) + name + b"\x00\x02\x00\x01")
        except FormatError as exc:
            raise ValueError(str(exc)) from None
        timeout = self.timeout
        deadline = asyncio.get_running_loop().time() + max(timeout, self.deadline)
        await self.transports[up.transport].exchange(up, q, timeout, deadline)
