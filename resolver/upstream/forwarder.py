"""Forwarding to upstream resolvers over UDP (TCP when the reply is truncated), TCP, DNS
over TLS (RFC 7858, in :mod:`resolver.dot`) and DNS over HTTPS (RFC 8484, in
:mod:`resolver.doh`).

Spoofing resistance (RFC 5452): each upstream query gets a random ID and its own socket,
connected to the upstream, so the kernel picks a random source port and delivers only
datagrams from the upstream's address and port; a datagram whose ID or question differ is
ignored and the wait goes on. A truncated reply is never final: the question is asked again
over TCP.
"""

from __future__ import annotations

import _socket
import asyncio
import base64
import ipaddress
import logging
import os
import random
import re
import select
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

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
    scan_response,
)
from ..policy.model import dotted

if TYPE_CHECKING:
    from .bootstrap import Bootstrap
    from .tls import EncryptedConnection

log = logging.getLogger("resolver.upstream")

DEFAULT_TIMEOUT: Final = 1.0
DEFAULT_DEADLINE: Final = 2.5
#: Transport failures in a row (timeouts, refused connections, TLS or HTTP failures) that
#: mark an upstream down; the config's ``upstream_max_fails``.
DOWN_AFTER: Final = 3
#: While an upstream is down, it is probed after this many seconds, the wait doubling after
#: each failed probe up to MAX_BACKOFF (``upstream_probe_interval``, ``..._max_interval``).
PROBE_INTERVAL: Final = 0.5
MAX_BACKOFF: Final = 30.0
#: What a probe asks (``upstream_probe_name``): the root's NS records, which every
#: recursive resolver answers from its priming data.
PROBE_NAME: Final = "."
STRATEGIES: Final = ("failover", "random", "fastest", "parallel")
DEFAULT_PORTS: Final = {"udp": 53, "tcp": 53, "tls": 853, "https": 443}
DOH_PATH: Final = "/dns-query"
PIN_PARAM: Final = "pin-sha256"
_MAX_UDP: Final = 65535
_FAILED_RCODES: Final = frozenset({RCODE_SERVFAIL, RCODE_REFUSED, RCODE_FORMERR, RCODE_NOTIMP})


class UpstreamError(Exception):
    """One exchange with one upstream failed; ``kind`` is a bounded label for metrics."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Upstream:
    """An upstream resolver address, as configured."""

    #: An IP address; for tls and https also a host name, resolved through the bootstrap
    #: servers and then the name the certificate must carry.
    host: str
    port: int = 53
    #: udp (with TCP for truncated replies), tcp, tls (DNS over TLS, RFC 7858) or https
    #: (DNS over HTTPS, RFC 8484).
    transport: str = "udp"
    #: For tls and https to an IP address: the name the certificate must carry (default:
    #: the address).
    tls_name: str | None = None
    #: For https: the path of the DoH endpoint.
    path: str = ""
    #: SHA-256 hashes (base64) of SubjectPublicKeyInfos, one of which the server's
    #: certificate must carry, on top of its verification (RFC 7858 4.2, RFC 7469).
    pins: tuple[str, ...] = ()
    #: Computed once (the query path reads them for every miss): the address family, and
    #: the label of metrics, logs and status.
    family: socket.AddressFamily = field(init=False, compare=False, repr=False)
    label: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        v6 = ":" in self.host
        object.__setattr__(self, "family", socket.AF_INET6 if v6 else socket.AF_INET)
        hostport = f"[{self.host}]:{self.port}" if v6 else f"{self.host}:{self.port}"
        if self.transport == "udp":
            label = hostport
        else:
            name = f"#{self.tls_name}" if self.tls_name else ""
            label = f"{self.transport}://{hostport}{self.path}{name}"
        object.__setattr__(self, "label", label)

    @property
    def is_address(self) -> bool:
        """False for a host name (it needs the bootstrap servers)."""
        return is_ip(self.host)

    @property
    def server_name(self) -> str:
        """The name the certificate is verified against (SNI, HTTP authority)."""
        return self.tls_name or self.host

    def __str__(self) -> str:
        return self.label


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_HOSTNAME_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: missing ']'")
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':port' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        return text, default_port  # a name, an IPv4 address or a bare IPv6 address
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


def parse_upstream(text: str) -> Upstream:
    """Read an upstream: ``[udp://]IP[:port]``, ``tcp://IP[:port]``,
    ``tls://HOST[:port][?pin-sha256=B64][#name]`` (DNS over TLS, port 853) or
    ``https://HOST[:port][/path][?pin-sha256=B64][#name]`` (DNS over HTTPS, port 443, path
    /dns-query). For tls and https, HOST is an IP address (the certificate checked against
    ``name``, else the address) or a host name (resolved through the bootstrap servers and
    checked against that name); ``pin-sha256`` (repeatable) pins the server's key."""
    raw = text.strip()
    transport = "udp"
    if "://" in raw:
        transport, raw = raw.split("://", 1)
        transport = transport.lower()
        if transport not in DEFAULT_PORTS:
            raise ValueError(
                f"{text!r}: upstream scheme {transport!r} is not supported (udp, tcp, tls, https)"
            )
    encrypted = transport in ("tls", "https")
    raw, _, tls_name = raw.partition("#")
    if "?" in tls_name:
        raise ValueError(f"{text!r}: put '?{PIN_PARAM}=...' before '#name'")
    raw, has_query, query = raw.partition("?")
    if (tls_name or has_query) and not encrypted:
        raise ValueError(f"{text!r}: '#name' and '?{PIN_PARAM}=' are for tls:// and https://")
    pins = _pins(text, query) if has_query else ()
    path = ""
    if transport == "https":
        raw, slash, rest = raw.partition("/")
        path = "/" + rest if slash and rest else DOH_PATH
    elif "/" in raw:
        raise ValueError(f"{text!r}: only https:// upstreams have a path")
    host, port = split_host_port(raw, DEFAULT_PORTS[transport])
    if port == 0:
        raise ValueError(f"{text!r}: port 0 is no upstream port")
    if is_ip(host):
        return Upstream(host, port, transport, tls_name or None, path, pins)
    if not encrypted:
        raise ValueError(
            f"{text!r}: a plain upstream must be an IP address (host names are for tls:// "
            "and https:// upstreams, resolved through 'bootstrap')"
        )
    name = host.lower().rstrip(".")
    if len(name) > 253 or not all(_HOSTNAME_LABEL.match(x) for x in name.split(".")):
        raise ValueError(f"{text!r}: {host!r} is neither an IP address nor a host name")
    if tls_name:
        raise ValueError(f"{text!r}: '#name' is for an IP address; a host name is checked itself")
    return Upstream(name, port, transport, None, path, pins)


def _pins(text: str, query: str) -> tuple[str, ...]:
    pins = []
    for param in query.split("&"):
        key, _, value = param.partition("=")
        if key != PIN_PARAM:
            raise ValueError(f"{text!r}: unknown parameter {key!r} (known: {PIN_PARAM})")
        try:
            ok = len(base64.b64decode(value, validate=True)) == 32
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{text!r}: {PIN_PARAM} must be the base64 SHA-256 of the server key's "
                "SubjectPublicKeyInfo (44 characters)"
            )
        pins.append(value)
    return tuple(pins)


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


class Exchange:
    """One UDP question to one upstream from a socket of its own, until its reply or its
    timeout; then ``finish(scan, failure, detail)`` is called once."""

    __slots__ = (
        "expires",
        "fd",
        "finish",
        "forwarder",
        "qid",
        "question",
        "sock",
        "timeout",
        "timer",
        "up",
        "watch",
    )

    def __init__(
        self,
        forwarder: Forwarder,
        up: Upstream,
        sock: _socket.socket,
        qid: int,
        question: bytes,
        timeout: float,
        finish: Callable[[Scan | None, str, str], None],
    ) -> None:
        self.forwarder = forwarder
        self.up = up
        self.sock = sock
        self.fd = sock.fileno()
        self.qid = qid
        self.question = question
        self.timeout = timeout
        self.finish = finish
        self.expires = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.watch: ReadWatch | None = None

    def readable(self) -> None:
        sock = self.sock
        while True:
            try:
                data = sock.recv(_MAX_UDP)
            except BlockingIOError:
                return
            except OSError as exc:  # ICMP port unreachable and friends
                self.end(None, "network", str(exc))
                return
            try:
                scan = scan_response(data, self.qid, self.question)
            except (Mismatch, FormatError) as exc:
                self.forwarder._ignored(self.up, exc)
                continue
            self.end(scan, "", "")
            return

    def expire(self) -> None:
        self.end(None, "timeout", f"no answer in {self.timeout:.2f} s")

    def end(self, scan: Scan | None, failure: str, detail: str) -> None:
        watch = self.watch
        if watch is None:
            return  # ended already
        watch.forget(self)
        self.sock.close()  # which takes it out of the epoll set too
        self.finish(scan, failure, detail)


class ReadWatch:
    """The exchanges waiting for a reply: their sockets are watched for reading through
    one epoll set, which the event loop watches (adding a socket is one cheap system call,
    where the loop's own add_reader costs about 25 us a socket under uvloop, a poll handle
    each made and torn down; without epoll, not Linux, add_reader it is). Their timeouts
    are one timer for them all: exchanges expire in the order they started when their
    timeouts are alike, the usual case, which spares a loop timer made and cancelled per
    query (2 us). One whose deadline comes before an earlier one's gets its own timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiting: dict[int, Exchange] = {}  # by descriptor
        #: Exchanges in the order of their deadlines (a dict as an ordered set).
        self.queue: dict[Exchange, None] = {}
        self._last = 0.0  # the latest deadline in the queue so far
        self._timer: asyncio.TimerHandle | None = None
        #: Questions to send at the end of this turn of the loop, with their exchanges.
        self._sends: list[tuple[Exchange, bytes]] = []
        self.epoll = select.epoll() if hasattr(select, "epoll") else None
        if self.epoll is not None:
            loop.add_reader(self.epoll.fileno(), self._ready)

    def add(self, exchange: Exchange, wire: bytes) -> None:
        """Watch ``exchange`` and send its question, ``wire``, at the end of this turn of
        the loop, with the other questions of the same turn: sent together, they wake
        the upstream's reader once, not once each (which cost the sender a few us of
        kernel time per query, as answers sent to clients one by one did)."""
        self._sends.append((exchange, wire))
        loop = self.loop
        if len(self._sends) == 1:
            loop.call_soon(self._send_all)
        expires = exchange.expires = loop.time() + exchange.timeout
        exchange.watch = self
        fd = exchange.fd
        if self.epoll is None:
            loop.add_reader(fd, exchange.readable)
        else:
            self.epoll.register(fd, select.EPOLLIN)
        self.waiting[fd] = exchange
        if expires >= self._last:
            self._last = expires
            self.queue[exchange] = None
            if self._timer is None:
                self._timer = loop.call_at(expires, self._expire)
        else:
            exchange.timer = loop.call_at(expires, exchange.expire)

    def forget(self, exchange: Exchange) -> None:
        """Stop watching ``exchange``, whose socket the caller closes at once."""
        exchange.watch = None
        fd = exchange.fd
        if self.waiting.pop(fd, None) is not None and self.epoll is None:
            self.loop.remove_reader(fd)
        if exchange.timer is not None:
            exchange.timer.cancel()
            exchange.timer = None
        else:
            self.queue.pop(exchange, None)

    def close(self) -> None:
        """At shutdown: close what still waits (nobody waits for its answer any more)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for exchange in list(self.waiting.values()):
            self.forget(exchange)
            exchange.sock.close()
        if self.epoll is not None and not self.epoll.closed:
            self.loop.remove_reader(self.epoll.fileno())
            self.epoll.close()

    def _expire(self) -> None:
        self._timer = None
        now = self.loop.time()
        queue = self.queue
        while queue:
            exchange = next(iter(queue))
            if exchange.expires > now:
                self._timer = self.loop.call_at(exchange.expires, self._expire)
                return
            exchange.expire()  # which takes it out of the queue

    def _send_all(self) -> None:
        sends, self._sends = self._sends, []
        for exchange, wire in sends:
            if exchange.watch is None:
                continue  # ended before it was sent (shutdown)
            try:
                exchange.sock.send(wire)
            except OSError as exc:
                exchange.end(None, "network", str(exc))

    def _ready(self) -> None:
        assert self.epoll is not None
        waiting = self.waiting
        for fd, _ in self.epoll.poll(0):
            exchange = waiting.get(fd)
            if exchange is not None:  # None: ended by an earlier one of this batch
                exchange.readable()


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
        bootstrap: Bootstrap | None = None,
    ) -> None:
        if not upstreams:
            raise ValueError("at least one upstream is needed")
        self.upstreams = upstreams
        self.timeout = timeout
        self.deadline = deadline
        #: Failed exchanges by (upstream, kind): timeout, network, truncated, rcode; and
        #: ignored replies: mismatch (ID or question), malformed.
        self.errors: Counter[tuple[str, str]] = Counter()
        #: Exchange durations by (upstream, rcode).
        self.durations: dict[tuple[str, str], Histogram] = {}
        #: Consecutive transport failures by upstream: at ``max_fails`` it is marked down.
        #: An answer of any rcode is a working transport and resets it: the rcode of one
        #: client's question says nothing about the upstream's health.
        self.failures: Counter[str] = Counter()
        #: Health, as CoreDNS's forward and Unbound's infra cache keep it: the labels of the
        #: upstreams marked down. A down upstream is asked only when no other can answer,
        #: and active probes (``_probe``) find out when it is back.
        self.down: set[str] = set()
        self.max_fails = DOWN_AFTER
        self.probe_interval = PROBE_INTERVAL
        self.probe_max_interval = MAX_BACKOFF
        self.probe_name = PROBE_NAME
        #: Probes sent, by (upstream, result): success or failure.
        self.probes: Counter[tuple[str, str]] = Counter()
        #: The probe loop of each upstream that is down.
        self._probing: dict[str, asyncio.Task[None]] = {}
        #: Datagrams ignored because ID, question or format did not match (RFC 5452).
        self.ignored = 0
        #: failover (in order), random, fastest (by measured latency), parallel (two at once).
        self.strategy = strategy
        #: Conditional forwarding: zone (lower-case, no trailing dot) -> its upstreams.
        self.routes: dict[bytes, list[Upstream]] = {
            zone.strip(".").lower().encode(): ups for zone, ups in (routes or {}).items()
        }
        self.latency: dict[str, float] = {}
        self._background: set[asyncio.Task[Scan | None]] = set()
        #: The reused connection of each tls and https upstream.
        self.connections: dict[Upstream, EncryptedConnection] = {}
        from .tls import tls_context  # dot builds on this module

        self.tls_context = tls_context(tls_ca_file)
        self.https_context = tls_context(tls_ca_file, alpn="h2")
        #: Resolves the host names of tls and https upstreams.
        self.bootstrap = bootstrap
        self._watch: ReadWatch | None = None
        #: The loop begin() last ran on (see there).
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Labels of the upstreams whose latest exchange failed (empty: all is well).
        self.troubled: set[str] = set()

    async def close(self) -> None:
        """Stop what is still running in the background (at shutdown, after the drain)."""
        pending: list[asyncio.Task[Scan | None]] = list(self._background)
        probes = list(self._probing.values())
        for task in pending:
            task.cancel()
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*pending, *probes, return_exceptions=True)
        if self._watch is not None:
            self._watch.close()

    def upstreams_for(self, q: Query) -> list[Upstream]:
        """The upstreams for ``q``: those of the longest forwarding zone that contains its
        name (conditional forwarding), else the default ones."""
        if self.routes:
            text = dotted(q.key, q.labels)
            for off in q.labels:
                zone = text[off:]
                ups = self.routes.get(zone)
                if ups is not None:
                    return ups
        return self.upstreams

    def _order(self, ups: list[Upstream]) -> tuple[list[Upstream], list[Upstream]]:
        """The upstreams to try, by strategy, and those resting (marked down, waiting for a
        probe to succeed), which are tried only when the others fail."""
        if not self.troubled and self.strategy in ("failover", "parallel"):
            return ups, []  # the common case: every upstream answering, order as given
        down = self.down
        usable = [u for u in ups if u.label not in down]
        resting = [u for u in ups if u.label in down]
        if self.strategy == "random":
            usable = random.sample(usable, len(usable))
        elif self.strategy == "fastest":
            usable.sort(key=lambda u: self.latency.get(u.label, 0.0))
        return usable, resting

    def begin(self, q: Query, done: Callable[[Scan | None], None]) -> None:
        """Resolve ``q``, then call ``done`` with what :meth:`resolve` would return.

        The common case costs no task and no coroutine: one UDP exchange with the first
        upstream, driven by callbacks (a task and its coroutines cost more CPU than the
        exchange itself). Anything else (another strategy or transport, an upstream in
        trouble, a timeout, a truncated or EDNS-refusing reply) goes on in a task running
        :meth:`resolve`, within the same deadline.
        """
        loop = self._loop
        if loop is None or not loop.is_running():
            # (asyncio.get_running_loop() makes a getpid() system call each time.)
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline
        up = self.upstreams_for(q)[0]
        # (A later upstream that failed once stays "troubled" until it is asked again;
        # that must not send every query down the slow path.)
        if self.strategy != "failover" or up.transport != "udp" or up.label in self.troubled:
            self._go_on(q, deadline, 0, done)
            return
        started = time.perf_counter()

        def finish(scan: Scan | None, failure: str, _detail: str) -> None:
            if scan is None:
                self._failed(up, failure)
                self._go_on(q, deadline, 1, done)
            elif scan.flags & FLAG_TC or scan.rcode in (RCODE_FORMERR, RCODE_NOTIMP):
                self._go_on(q, deadline, 0, done, scan)  # on to TCP, or to plain DNS
            else:
                good = self._accept(up, scan, started)
                if good is None:
                    self._go_on(q, deadline, 1, done)
                else:
                    done(good)

        qid = query_id()
        question = q.key + q.question[-4:]
        wire = upstream_query(qid, q, True)
        self._udp_exchange(loop, up, wire, qid, question, min(self.timeout, self.deadline), finish)

    def _udp_exchange(
        self,
        loop: asyncio.AbstractEventLoop,
        up: Upstream,
        wire: bytes,
        qid: int,
        question: bytes,
        timeout: float,
        finish: Callable[[Scan | None, str, str], None],
    ) -> None:
        """Send ``wire`` from a fresh socket (a new random port, RFC 5452) and call
        ``finish`` once: with the reply, or with None, the error kind and its detail.
        Replies with another ID or question are ignored (counted), not taken."""
        try:
            # The C socket type, non-blocking from the start: socket.socket's Python-level
            # __init__ and close bookkeeping cost about 3 us per query, for nothing used.
            sock = _socket.socket(up.family, _socket.SOCK_DGRAM | _socket.SOCK_NONBLOCK)
        except OSError as exc:  # out of file descriptors, say: a failed exchange
            finish(None, "network", str(exc))
            return
        try:
            sock.connect((up.host, up.port))
        except OSError as exc:
            sock.close()
            finish(None, "network", str(exc))
            return
        self._read_watch(loop).add(Exchange(self, up, sock, qid, question, timeout, finish), wire)

    def _read_watch(self, loop: asyncio.AbstractEventLoop) -> ReadWatch:
        watch = self._watch
        if watch is None or watch.loop is not loop:
            watch = self._watch = ReadWatch(loop)
        return watch

    def _go_on(
        self,
        q: Query,
        deadline: float,
        first: int,
        done: Callable[[Scan | None], None],
        reply: Scan | None = None,
    ) -> None:
        task = asyncio.ensure_future(self.resolve(q, deadline, first, reply))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(
            lambda t: done(None if t.cancelled() or t.exception() else t.result())
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
        if self.strategy == "parallel" and len(usable) > 1 and not first:
            scan = await self._parallel(q, usable[:2], deadline)
            if scan is not None:
                return scan
            ups = usable[2:] + resting or ups
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
            scan = await self._exchange(up, q, timeout, deadline, reply)
        except UpstreamError as exc:
            self._failed(up, exc.kind)
            log.debug("upstream %s failed: %s", up, exc)
            return None
        return self._accept(up, scan, started)

    def _accept(self, up: Upstream, scan: Scan, started: float) -> Scan | None:
        """Account for a reply from ``up``: the reply when it is an answer, else None."""
        took = time.perf_counter() - started
        label = up.label
        key = (label, rcode_label(scan.rcode))
        hist = self.durations.get(key)
        if hist is None:
            hist = self.durations[key] = Histogram()
        hist.observe(took)
        if label in self.troubled:
            self._alive(up)  # a reply, whatever its rcode: the transport works
        if scan.rcode in _FAILED_RCODES:
            # Not an answer about the name: another upstream may do better, and the
            # client is told SERVFAIL rather than an error about a query it never sent.
            # Counted, but no mark against the upstream's health: one broken domain must
            # not take a working upstream out of service (nor /readyz with it).
            self.errors[(label, "rcode")] += 1
            log.debug("upstream %s answered rcode %d", up, scan.rcode)
            return None
        previous = self.latency.get(label)
        self.latency[label] = took if previous is None else 0.8 * previous + 0.2 * took
        scan.source = label
        return scan

    def _alive(self, up: Upstream) -> None:
        """``up`` answered (a query or a probe): its transport works."""
        label = up.label
        self.failures[label] = 0
        self.troubled.discard(label)
        if label in self.down:
            self.down.discard(label)
            log.warning("upstream %s is up again", up)

    def _ignored(self, up: Upstream, exc: Exception) -> None:
        # Not the answer to our question (RFC 5452): ignored, and counted by kind.
        self.ignored += 1
        kind = "mismatch" if isinstance(exc, Mismatch) else "malformed"
        self.errors[(up.label, kind)] += 1
        log.debug("ignored a reply from %s: %s", up, exc)

    def _failed(self, up: Upstream, kind: str) -> None:
        """A transport failure of one exchange with ``up`` (timeout, network, TLS, HTTP,
        truncated over TCP too): ``max_fails`` in a row mark it down, and probes start."""
        label = up.label
        self.errors[(label, kind)] += 1
        self.failures[label] += 1
        self.troubled.add(label)
        if self.failures[label] >= self.max_fails and label not in self.down:
            self.down.add(label)
            log.warning(
                "upstream %s is down after %d failures in a row (last: %s); probing it",
                up,
                self.failures[label],
                kind,
            )
            self._start_probing(up)

    def _start_probing(self, up: Upstream) -> None:
        if up.label in self._probing:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._probe(up))
        except RuntimeError:  # no loop (a synchronous caller): the next query tries it
            return
        self._probing[up.label] = task

    async def _probe(self, up: Upstream) -> None:
        """While ``up`` is down: ask it ``probe_name`` NS after ``probe_interval`` seconds,
        doubling the wait after each failure up to ``probe_max_interval`` (as CoreDNS's
        forward does its health checks); any reply brings it back."""
        label = up.label
        wait = self.probe_interval
        try:
            while label in self.down:
                await asyncio.sleep(wait)
                if label not in self.down:
                    break  # a client's query got an answer meanwhile
                if not self._configured(up):
                    self.down.discard(label)  # gone from the config: forget it
                    self.troubled.discard(label)
                    break
                try:
                    q = self._probe_query()
                    timeout = self.timeout
                    deadline = asyncio.get_running_loop().time() + max(timeout, self.deadline)
                    await self._exchange(up, q, timeout, deadline)
                except UpstreamError as exc:
                    self.probes[(label, "failure")] += 1
                    log.debug("probe of upstream %s failed: %s", up, exc)
                    wait = min(wait * 2, self.probe_max_interval)
                    continue
                except (ValueError, FormatError) as exc:  # a bad probe name in the config
                    self.probes[(label, "failure")] += 1
                    log.error("cannot probe upstream %s: %s", up, exc)
                    wait = self.probe_max_interval
                    continue
                self.probes[(label, "success")] += 1
                self._alive(up)
        finally:
            if self._probing.get(label) is asyncio.current_task():
                del self._probing[label]

    def _probe_query(self) -> Query:
        """The probe's question, as a parsed query (``probe_name`` may change on reload)."""
        name = encode_name(self.probe_name)
        return parse_query(header(0, FLAG_RD, 1, 0, 0, 0) + name + b"\x00\x02\x00\x01")

    def _configured(self, up: Upstream) -> bool:
        return up in self.upstreams or any(up in ups for ups in self.routes.values())

    def healthy(self, up: Upstream) -> bool:
        """False from ``max_fails`` transport failures in a row until it answers again (a
        probe, or a query it was asked because no other upstream could answer)."""
        return up.label not in self.down

    def error_count(self, kind: str) -> int:
        """Failed exchanges of one kind, over all upstreams."""
        return sum(n for (_, k), n in self.errors.items() if k == kind)

    async def _exchange(
        self, up: Upstream, q: Query, timeout: float, deadline: float, reply: Scan | None = None
    ) -> Scan:
        """One exchange with ``up``: its answer, or UpstreamError. ``reply``: the UDP reply
        it already sent (to :meth:`begin`)."""
        question = q.key + q.question[-4:]
        qid = query_id()
        if up.transport in ("tls", "https"):
            conn = self.connections.get(up)
            if conn is None:
                conn = self.connections[up] = self._connection(up)
            if up.transport == "https":
                qid = 0  # RFC 8484 4.1 (cache friendliness): replies are matched by stream
            return await conn.query(upstream_query(qid, q, True), qid, question, timeout)
        if up.transport == "tcp":
            return await self._tcp(up, upstream_query(qid, q, True), qid, question, timeout)
        if reply is None:
            scan = await self._udp(up, upstream_query(qid, q, True), qid, question, timeout)
        else:
            scan = reply
        if scan.rcode in (RCODE_FORMERR, RCODE_NOTIMP):
            # An old server that does not speak EDNS: ask again without it (RFC 6891 7).
            qid = query_id()
            scan = await self._udp(up, upstream_query(qid, q, False), qid, question, timeout)
        if scan.flags & FLAG_TC:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise UpstreamError("truncated", "no time left for TCP")
            qid = query_id()
            scan = await self._tcp(up, upstream_query(qid, q, True), qid, question, left)
            if scan.flags & FLAG_TC:
                raise UpstreamError("truncated", "truncated over TCP too")
        return scan

    def _connection(self, up: Upstream) -> EncryptedConnection:
        conn: EncryptedConnection
        if up.transport == "https":
            from .https import HTTPSConnection  # doh builds on this module

            conn = HTTPSConnection(up, self.https_context, bootstrap=self.bootstrap)
        else:
            from .tls import TLSConnection

            conn = TLSConnection(up, self.tls_context, bootstrap=self.bootstrap)
        conn.ignored = lambda exc: self._ignored(up, exc)
        return conn

    async def _udp(
        self, up: Upstream, wire: bytes, qid: int, question: bytes, timeout: float
    ) -> Scan:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Scan] = loop.create_future()

        def finish(scan: Scan | None, failure: str, detail: str) -> None:
            if done.done():
                return  # the caller gave up (cancelled)
            if scan is None:
                done.set_exception(UpstreamError(failure, detail))
            else:
                done.set_result(scan)

        self._udp_exchange(loop, up, wire, qid, question, timeout, finish)
        return await done

    async def _tcp(
        self, up: Upstream, wire: bytes, qid: int, question: bytes, timeout: float
    ) -> Scan:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(up.host, up.port)
                try:
                    writer.write(len(wire).to_bytes(2, "big") + wire)
                    while True:
                        size = int.from_bytes(await reader.readexactly(2), "big")
                        data = await reader.readexactly(size)
                        try:
                            return scan_response(data, qid, question)
                        except (Mismatch, FormatError) as exc:
                            self._ignored(up, exc)
                finally:
                    writer.close()
        except TimeoutError:
            raise UpstreamError("timeout", f"no TCP answer in {timeout:.2f} s") from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise UpstreamError("network", f"TCP: {exc}") from None
