"""Who may query, and how fast: the access list and per-client rate limiting.

Both run first on every query, before the answer memo, so they cost a dictionary lookup
for a known client. State is bounded: the per-address cache is cleared when it reaches
its cap (it only remembers what the access list says, so a scan of many addresses costs a
rebuild, never unbounded memory). The token buckets are evicted least recently used first
(two generations, see Guard.check): clearing them all at once would let a flood of spoofed
source addresses reset an abuser's bucket to a full burst.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence
from typing import Final

from ..defaults import DEFAULT_ALLOW, DEFAULT_RATELIMIT_IPV6_PREFIX, DEFAULT_RATELIMIT_MAX_CLIENTS

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


PASS: Final = 0
REFUSE: Final = 1
DROP: Final = 2
TRUNCATE: Final = 3
DENY_DROP: Final = 4  # dropped by the access list (not the rate limit)


class _Everyone:
    """Every client: the memo fast path's access list when there is no guard."""

    def __contains__(self, client: object) -> bool:
        return True


EVERYONE: Final = _Everyone()


class Guard:
    """The access list and the token buckets, keyed by client address."""

    def __init__(
        self,
        allow: Sequence[str] = DEFAULT_ALLOW,
        denied: str = "refuse",
        rate: float = 0.0,
        burst: float = 0.0,
        over_limit: str = "drop",
        ipv6_prefix: int = DEFAULT_RATELIMIT_IPV6_PREFIX,
        max_clients: int = DEFAULT_RATELIMIT_MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.networks: list[Network] = [ipaddress.ip_network(n, strict=False) for n in allow]
        self.denied = REFUSE if denied == "refuse" else DENY_DROP
        self.rate = rate
        self.burst = max(burst, rate)
        self.over_limit = TRUNCATE if over_limit == "truncate" else DROP
        self.ipv6_prefix = ipv6_prefix
        self.max_clients = max_clients
        self.clock = clock
        # client address -> (allowed, rate-limit key)
        self._clients: dict[str, tuple[bool, str]] = {}
        #: The clients of ``_clients`` that the access list lets in (the UDP fast path
        #: asks only this; see Resolver.fast_memo).
        self.allowed: set[str] = set()
        # rate-limit key -> [tokens, last refill], in two generations: the buckets used
        # since the last rotation, and those used only before it (see check()).
        self._buckets: dict[str, list[float]] = {}
        self._old: dict[str, list[float]] = {}
        self._generation = max(1, max_clients // 2)
        #: Buckets dropped because the table was full (their clients sent nothing for a
        #: whole generation of new clients).
        self.evictions = 0

    def _classify(self, client: str) -> tuple[bool, str]:
        try:
            addr = ipaddress.ip_address(client.split("%", 1)[0])
        except ValueError:
            return False, client
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        allowed = any(addr.version == net.version and addr in net for net in self.networks)
        if addr.version == 6:
            # One subscriber usually holds a whole /56: limit the prefix, not each address.
            key = str(ipaddress.ip_network(f"{addr}/{self.ipv6_prefix}", strict=False))
        else:
            key = str(addr)
        return allowed, key

    def check(self, client: str, tcp: bool) -> int:
        """PASS, or what to do with a query from ``client``: REFUSE or DENY_DROP (access
        list), DROP or TRUNCATE (rate limit)."""
        known = self._clients.get(client)
        if known is None:
            if len(self._clients) >= self.max_clients:
                self._clients.clear()
                self.allowed.clear()
            known = self._clients[client] = self._classify(client)
            if known[0]:
                self.allowed.add(client)
        if not known[0]:
            return self.denied
        if not self.rate or tcp:
            return PASS  # TCP has its own bounds; a client sent there by TC=1 must get in
        now = self.clock()
        bucket = self._buckets.get(known[1])
        if bucket is None:
            # Least recently used goes first, cheaply: a bucket used since the last rotation
            # lives in the young generation; one found only in the old generation moves back
            # with its state; when the young one is full it becomes the old one, and what
            # the old one held (used by nobody for a whole generation) is dropped. A busy
            # client's bucket therefore survives any number of new (spoofed) sources.
            bucket = self._old.pop(known[1], None)
            if len(self._buckets) >= self._generation:
                self.evictions += len(self._old)
                self._old = self._buckets
                self._buckets = {}
            if bucket is None:
                self._buckets[known[1]] = [self.burst - 1.0, now]
                return PASS
            self._buckets[known[1]] = bucket
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return self.over_limit
        bucket[0] = tokens - 1.0
        return PASS

    @property
    def tracked(self) -> int:
        """Rate-limit buckets held (bounded by max_clients, at least 2)."""
        return len(self._buckets) + len(self._old)
