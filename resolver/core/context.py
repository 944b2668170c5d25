"""One query on its way through the pipeline.

The stages (Resolver.handle and the methods it calls) read what the query is from a
Context and write what they decide into it, where they once passed nine to eleven values
from call to call. A plain class with annotated attributes: the compiled build keeps each
as a native field. (No __slots__: its class defaults spare new_context half its stores,
which the interpreted build pays for on every query that passes the memo.)
"""

from __future__ import annotations

import asyncio
from typing import Final

from ..policy.model import RuleSet
from ..policy.timewindow import NEVER
from .cache import Entry
from .memo import Info
from .outcome import CACHED
from .pending import Pending
from .wire import Query

#: The largest answer over TCP (and the limit that tells answers.fit a query came over TCP).
TCP_MAX: Final = 65535


class Context:
    """A parsed query, who asked it and how, and what the stages decided so far."""

    data: bytes
    q: Query
    client: str
    tcp: bool
    #: The transport (stats.PROTOS) and the client's id ("" when none): for the accounts.
    proto: int
    client_id: str
    #: perf_counter() when the query came: answers are timed from there.
    started: float
    #: The client's group mask (ALL_CLIENTS when lists apply to no group).
    mask: int
    #: Its memo key (see memo.py).
    body: bytes
    #: The largest answer the client takes: TCP_MAX over TCP, its UDP size otherwise.
    limit: int
    #: The instant the policy is decided at.
    now: float = 0.0
    #: Until when the policy's verdict holds, for this name and, once inspected, the names
    #: and addresses its answer leads to: no TTL served or cached may reach past it.
    valid_until: float = NEVER
    #: The decision so far (outcome.py): "cached" until the policy or the upstream says
    #: otherwise.
    decision: str = CACHED
    #: The rule set that would block the name once enforced (monitor mode), if any.
    monitored: RuleSet | None = None
    #: The cache key (see pipeline.cache_key).
    key: bytes = b""
    #: An expired entry the cache may serve when upstreams fail (RFC 8767), if any.
    stale: Entry | None = None
    #: What the answer is (for the memo), and until when it stays exactly right: what the
    #: stage that made it declares. 0 (the default): not memoised.
    info: Info | None = None
    until: float = 0.0
    #: A query that goes upstream (Resolver._forward): its answer to come, the timer that
    #: serves ``stale`` when upstreams are slow, whether it was answered already, and the
    #: ``valid_until`` its fetch caps the cache entry at. (Here rather than in closures:
    #: the context is the one object the upstream's reply is handed back with.)
    pending: Pending | None = None
    timer: asyncio.TimerHandle | None = None
    settled: bool = False
    fetch_until: float = NEVER


def new_context(
    data: bytes,
    q: Query,
    client: str,
    tcp: bool,
    proto: int,
    client_id: str,
    started: float,
    mask: int,
    body: bytes,
) -> Context:
    """A Context for a parsed query; its other fields start at their class defaults.

    (A function rather than ``__init__``: the interpreted build calls a class's
    ``__init__`` through the type's slot, a frame of its own that costs about 700
    instructions a query more than this, bench/instructions.py.)"""
    ctx = Context()
    ctx.data = data
    ctx.q = q
    ctx.client = client
    ctx.tcp = tcp
    ctx.proto = proto
    ctx.client_id = client_id
    ctx.started = started
    ctx.mask = mask
    ctx.body = body
    ctx.limit = TCP_MAX if tcp else q.udp_size
    return ctx
