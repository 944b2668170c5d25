"""Bootstrap: the host names of encrypted upstreams (``tls://dns.example``,
``https://dns.example/dns-query``) resolved through plain upstreams given by address.

Never through this resolver itself: its answers would depend on the very upstreams being
looked up. A and AAAA are asked at once; the addresses are kept for their TTL (clamped to
30 s .. 1 day), looked up again when it runs out or when no address could be connected to.
A failed lookup is remembered for a few seconds, so that a burst of queries makes one
lookup and one log line, not one each.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Final

from ..core.wire import FLAG_RD, TYPE_A, TYPE_AAAA, encode_name, header, parse_query
from .base import UpstreamError
from .endpoints import Upstream
from .forwarder import Forwarder

log = logging.getLogger("resolver.bootstrap")

MIN_TTL: Final = 30
MAX_TTL: Final = 86_400
#: Seconds a failed lookup is remembered before the next try.
RETRY_AFTER: Final = 5.0


class Bootstrap:
    """Looks up upstream host names through ``servers`` (plain DNS, by address)."""

    def __init__(
        self, servers: list[Upstream], timeout: float = 1.0, deadline: float = 2.5
    ) -> None:
        self.servers = servers
        self.forwarder = Forwarder(servers, timeout, deadline) if servers else None
        #: name -> (monotonic expiry, addresses)
        self.known: dict[str, tuple[float, list[str]]] = {}
        #: name -> (monotonic time of the next try, why the last one failed)
        self.failed: dict[str, tuple[float, str]] = {}
        self._lookups: dict[str, asyncio.Future[list[str]]] = {}

    async def lookup(self, name: str) -> list[str]:
        """The addresses of ``name``; :class:`UpstreamError` (kind ``bootstrap``) when it
        cannot be resolved."""
        now = time.monotonic()
        known = self.known.get(name)
        if known is not None and now < known[0]:
            return known[1]
        failed = self.failed.get(name)
        if failed is not None and now < failed[0]:
            raise UpstreamError("bootstrap", failed[1])
        task = self._lookups.get(name)
        if task is None:  # one lookup for everyone who needs the name now
            task = self._lookups[name] = asyncio.ensure_future(self._resolve(name))
            task.add_done_callback(lambda _: self._lookups.pop(name, None))
        # Shielded: a caller that gives up does not cancel the lookup for the others.
        return await asyncio.shield(task)

    def forget(self, name: str) -> None:
        """Look ``name`` up again next time (its addresses did not answer)."""
        self.known.pop(name, None)

    async def _resolve(self, name: str) -> list[str]:
        if self.forwarder is None:
            why = "no bootstrap servers (give 'bootstrap:' in the config)"
            addresses: list[str] = []
            ttl = 0
        else:
            answers = await asyncio.gather(self._ask(name, TYPE_A), self._ask(name, TYPE_AAAA))
            addresses = [a for found, _ in answers for a in found]
            ttl = min((t for found, t in answers if found), default=0)
            servers = ", ".join(str(s) for s in self.servers)
            why = f"no A or AAAA record from bootstrap servers {servers}"
        if not addresses:
            reason = f"cannot resolve upstream host {name}: {why}"
            log.warning("%s", reason)
            self.failed[name] = (time.monotonic() + RETRY_AFTER, reason)
            raise UpstreamError("bootstrap", reason)
        self.failed.pop(name, None)
        ttl = max(MIN_TTL, min(MAX_TTL, ttl))
        if self.known.get(name, (0.0, []))[1] != addresses:
            log.info("upstream host %s is %s (bootstrap, for %d s)", name, addresses, ttl)
        self.known[name] = (time.monotonic() + ttl, addresses)
        return addresses

    async def _ask(self, name: str, rtype: int) -> tuple[list[str], int]:
        """The addresses of one type and their smallest TTL (none when nothing came)."""
        assert self.forwarder is not None
        wire = header(0, FLAG_RD, 1, 0, 0, 0) + encode_name(name) + rtype.to_bytes(2, "big")
        scan = await self.forwarder.resolve(parse_query(wire + b"\x00\x01"))
        if scan is None or scan.rcode:
            return [], 0
        family = socket.AF_INET if rtype == TYPE_A else socket.AF_INET6
        size = 4 if rtype == TYPE_A else 16
        found = [socket.inet_ntop(family, a) for a in scan.addresses if len(a) == size]
        return found, scan.min_answer_ttl or 0
