"""DNS over TCP to an upstream (RFC 7766): one connection per question, its answer read
past any reply that is not ours (counted, as over UDP)."""

from __future__ import annotations

import asyncio

from ..core.wire import FormatError, Mismatch, Query, Scan, scan_response
from .base import NETWORK, TIMEOUT, Owner, UpstreamError, query_id, register, upstream_query
from .endpoints import Upstream


class TCPTransport:
    """``tcp://`` upstreams; also what UDP falls back to for a truncated reply."""

    def __init__(self, owner: Owner) -> None:
        self.owner = owner

    async def exchange(self, up: Upstream, q: Query, timeout: float, deadline: float) -> Scan:
        qid = query_id()
        return await self.ask(
            up, upstream_query(qid, q, True), qid, q.key + q.question[-4:], timeout
        )

    async def ask(
        self, up: Upstream, wire: bytes, qid: int, question: bytes, timeout: float
    ) -> Scan:
        """Send ``wire`` over a new connection: the reply to ``question`` with ID ``qid``."""
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
                            self.owner.ignored(up, exc)
                finally:
                    writer.close()
        except TimeoutError:
            raise UpstreamError(TIMEOUT, f"no TCP answer in {timeout:.2f} s") from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise UpstreamError(NETWORK, f"TCP: {exc}") from None

    def close(self) -> None:
        """Nothing outlives its exchange."""


register("tcp", TCPTransport)
