"""The query pipeline, in its one declared order.

``Resolver.handle`` takes the bytes of a query and returns the bytes of the answer, None
(stay silent), or an awaitable for the answer when it must come from upstream. Everything
that can be answered without I/O is answered synchronously, with no task created: that is
most of the traffic (blocked names and cache hits) and what keeps the hot path cheap.

The order is written once, as straight-line code in ``handle``: access list and rate
limit, memo, parse, header checks, policy, cache (with answer inspection), admission,
forward; each position commented with why it sits there. A stage is a method that takes
the query's :class:`Context`, writes what it decides into it, and returns an answer or None
(go on). Every answer passes ``fit`` (ANY over UDP cut to one RRset, RFC 8482; TC=1 when
it does not fit) and ``_account`` (counters, audit log). Whether an answer may be
memoised is what its stage declares: ``ctx.until``, until when it stays exactly right
(0, the default: not at all, as for a monitored name, whose every query must be seen);
and the memo keys on the client's group whenever the policy's lists apply to groups.

``handle(data, client, tcp, proto, client_id)``: ``tcp`` says the answer is not cut to a
UDP size (TCP and the encrypted transports); ``proto`` is the transport, one of
stats.PROTOS (-1: UDP or TCP, as ``tcp`` says), the ``proto`` label of the answer's
metrics and audit record; ``client_id`` is the client's id from an encrypted connection
(DoH path, TLS server name): its groups join its address's, and the audit record names it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Final

from ..defaults import DEFAULT_INFLIGHT_MAX, DEFAULT_STALE_TIMER
from ..policy.model import ALL_CLIENTS, Policy, RuleSet
from ..policy.timewindow import NEVER
from ..upstream.forwarder import Forwarder
from . import blockview
from .account import Accounts
from .answers import busy, fit, render, tick
from .cache import Cache, Entry
from .context import Context, new_context
from .ddr import RESOLVER_ARPA, Designation, served
from .guard import DENY_DROP, DROP, REFUSE, TRUNCATE, Guard
from .inspect import ALL_GROUPS, answer_changes, behind, inspects
from .memo import AnswerMemo, Info, memo_key
from .memoview import MemoViews
from .outcome import ALLOWED, BLOCKED, CACHED, ERROR, FORWARDED, LOCAL, MONITORED, REFUSED
from .pending import Pending
from .records import for_client
from .sinkhole import blocked_answer
from .stages import cache_key, unsupported
from .stats import PROTO_TCP, PROTO_UDP, Stats
from .wire import (
    CLASS_ANY,
    CLASS_IN,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    FormatError,
    Scan,
    Unanswerable,
    decode_name,
    error_response,
    formerr_from_header,
    opt_record,
    parse_query,
    truncate,
)

if TYPE_CHECKING:
    from ..core.account import AuditSink

log = logging.getLogger("resolver.chain")

Clock = Callable[[], float]
Result = bytes | Pending | None

_STOPPED: Final = {REFUSE: "acl", DENY_DROP: "acl", DROP: "dropped", TRUNCATE: "truncated"}
#: Where an entry being served comes from (see Resolver._serve).
_CACHED: Final = 0
_FRESH: Final = 1
_STALE: Final = 2


class Resolver(MemoViews):
    """Answers queries: policy, then cache, then upstream. One per server."""

    def __init__(
        self,
        policy: Policy,
        cache: Cache,
        forwarder: Forwarder,
        clock: Clock = time.time,
    ) -> None:
        self._policy = policy
        self.cache = cache
        self.forwarder = forwarder
        self._clock = clock
        #: Fetches on their way upstream, by cache key: the queries waiting for each.
        self._inflight: dict[bytes, list[Context]] = {}
        #: What the forwarder calls back with a reply (bound once, not once a miss).
        self._landed_cb: Callable[[Context, Scan | None], None] = self._landed
        self._stats = Stats()
        #: The answer memo, which the UDP listeners' fast path reads too.
        self.memo = AnswerMemo(self._stats, clock)
        #: The counters and the audit log, as the stages feed them.
        self._accounts = Accounts(self._stats)
        #: Queries waiting for upstreams at once; beyond, SERVFAIL at once.
        self.max_inflight = DEFAULT_INFLIGHT_MAX
        self.waiting = 0
        #: Of those, per client address: one client flooding distinct slow names must not
        #: take the whole budget from the others (SERVFAIL with an EDE beyond it).
        self.max_inflight_per_client = 1024
        self._held: dict[str, int] = {}
        #: Seconds to wait for upstreams before serving a stale answer (RFC 8767's client
        #: response timer), when the cache keeps stale entries.
        self.stale_timer = DEFAULT_STALE_TIMER
        #: DNS rebinding protection: when set, a private address in the answer for a name
        #: outside ``internal_zones`` is blocked with this rule set (see inspect.py).
        self.rebinding: RuleSet | None = None
        self.internal_zones: tuple[str, ...] = ()
        self._guard: Guard | None = None
        #: What resolver.arpa answers (DDR): nothing designated until the config says.
        self._ddr = Designation()
        self._fast_path()

    @property
    def clock(self) -> Clock:
        """The clock the policy and the cache are read at (the memo's too)."""
        return self._clock

    @clock.setter
    def clock(self, clock: Clock) -> None:
        self._clock = self.memo.clock = clock

    @property
    def audit(self) -> AuditSink | None:
        """The audit log, when one is configured."""
        return self._accounts.audit

    @audit.setter
    def audit(self, audit: AuditSink | None) -> None:
        self._accounts.audit = audit
        self._fast_path()

    @property
    def monitor_log_interval(self) -> float:
        """Seconds between two "would block" log lines for one list."""
        return self._accounts.monitor_log_interval

    @monitor_log_interval.setter
    def monitor_log_interval(self, seconds: float) -> None:
        self._accounts.monitor_log_interval = seconds

    @property
    def guard(self) -> Guard | None:
        """The access list and rate limit; None lets everyone in."""
        return self._guard

    @guard.setter
    def guard(self, guard: Guard | None) -> None:
        self._guard = guard
        self._fast_path()

    @property
    def ddr(self) -> Designation:
        """The encrypted endpoints ``_dns.resolver.arpa`` designates (RFC 9462)."""
        return self._ddr

    @ddr.setter
    def ddr(self, ddr: Designation) -> None:
        if ddr != self._ddr:
            self._ddr = ddr
            self.forget_answers()  # memoised answers hold the old designation

    @property
    def policy(self) -> Policy:
        """The policy in force. Replaced whole on reload; each query reads it once."""
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self._policy = policy
        self.forget_answers()
        self._fast_path()

    def _fast_path(self) -> None:
        """Set what the listeners' fast path may answer (blockview.fast_path)."""
        blockview.fast_path(self.memo, self._policy, self._guard, self._accounts.audit)

    async def close(self) -> None:
        """Stop upstream work still going on, prefetches included (at shutdown, after the
        drain)."""
        await self.forwarder.close()

    def forget_answers(self) -> None:
        """Empty the answer memo (after a policy swap or a cache flush)."""
        self.memo.clear()
        self._accounts.forget()

    def handle(
        self, data: bytes, client: str, tcp: bool, proto: int = -1, client_id: str = ""
    ) -> Result:
        """Answer one query: the stages in their order, each position saying why. ``tcp``,
        ``proto`` and ``client_id``: see the module's docstring."""
        started = perf_counter()
        proto = proto if proto >= 0 else (PROTO_TCP if tcp else PROTO_UDP)
        # Access list and rate limit: first of all, the memo included, so that a client
        # they stop costs a dict lookup and is served nothing.
        guard = self._guard
        if guard is not None:
            verdict = guard.check(client, tcp)
            if verdict:
                return self._guarded(verdict, data, proto, client, started, client_id)
        # Memo: before parsing, so that repeats (most traffic) cost a dict lookup. Lists
        # that apply to client groups make the verdict depend on the client: then the key
        # holds its group mask (its address's groups and its id's). One memo per ``tcp``
        # (the encrypted transports share TCP's); a hit is counted under its ``proto``.
        policy = self._policy
        memo = self.memo
        if policy.uses_groups:
            mask = policy.groups.mask_of(client)
            if client_id:
                mask |= policy.groups.mask_of_id(client_id)
            body = mask.to_bytes(8, "little") + data[2:]
        else:
            mask = ALL_CLIENTS
            body = data[2:]
        hit = memo.dicts[tcp].get(body)
        if hit is not None:
            if self._clock() < hit[1]:
                memo.hits += 1
                self._accounts.account(memo.slots[hit[2]], proto, client, started, client_id)
                return data[:2] + hit[0]
            memo.forget(tcp, body)
        # Parse: garbage stops here, so that no later stage ever sees a malformed query.
        try:
            q = parse_query(data)
        except Unanswerable:
            return None
        except FormatError:
            return self._formerr(data, proto, client, started, client_id)
        ctx = new_context(data, q, client, tcp, proto, client_id, started, mask, body)
        # Header checks: what we do not serve gets its rcode before any policy work.
        if q.opcode or q.edns_version or (q.qclass != CLASS_IN and q.qclass != CLASS_ANY):
            return self._error(ctx, unsupported(q))
        # Memo again, for a query that is not plain (header, question, an OPT without
        # options: the length tells), keyed on what its answer is made of (memo_key).
        if len(data) != 12 + len(q.question) + (11 if q.edns else 0) or not data.startswith(
            q.question, 12
        ):
            answer = self._memo_again(ctx)
            if answer is not None:
                return answer
        # Policy: before the cache and the upstream, so that a blocked name is never
        # forwarded (that would leak it) nor served from a cache filled before its ban.
        answer = self._decide(ctx)
        if answer is None:
            # Cache: after the policy, before the upstream: a hit costs no I/O. Its answer
            # is inspected first (CNAME, DNAME, networks, rebinding: _serve).
            ctx.key = cache_key(q)
            entry = self.cache.get(ctx.key, ctx.now)
            if entry is not None:
                answer = self._serve(ctx, entry, _CACHED)
            elif q.key.endswith(RESOLVER_ARPA):
                # resolver.arpa (DDR): never forwarded (RFC 9462 6.1), so before admission;
                # after the policy (a list may block it) and the cache (misses pay the test).
                answer = self._local(ctx)
        if answer is not None:
            # Memo: for as long as the stage that made the answer says it stays right.
            if ctx.until > ctx.now and ctx.info is not None:
                memo.remember(tcp, ctx.body, answer, ctx.until, ctx.now, ctx.info)
            return answer
        # Admission: a bounded number wait for upstreams (per client too); beyond, SERVFAIL.
        answer = self._admit(ctx)
        if answer is not None:
            return answer
        # Forward: last; in-flight sharing, then the forwarder. The reply is cached, then
        # inspected and rendered as a cached one is (_serve, answers.fit).
        return self._forward(ctx)

    def _formerr(
        self, data: bytes, proto: int, client: str, started: float, client_id: str
    ) -> bytes | None:
        """FORMERR for a query whose header is readable but whose body is not."""
        answer = formerr_from_header(data)
        info = Info(self._stats, ERROR, 0, 1)
        self._accounts.account(info, proto, client, started, client_id)
        return answer

    def _memo_again(self, ctx: Context) -> bytes | None:
        """The memo's answer to a query that is not plain, keyed on what decides it."""
        body = memo_key(ctx.data, ctx.q)
        if self._policy.uses_groups:
            body = ctx.mask.to_bytes(8, "little") + body
        ctx.body = body
        memo = self.memo
        hit = memo.dicts[ctx.tcp].get(body)
        if hit is not None:
            if self._clock() < hit[1]:
                memo.hits += 1
                info = memo.slots[hit[2]]
                self._accounts.account(info, ctx.proto, ctx.client, ctx.started, ctx.client_id)
                return ctx.data[:2] + hit[0]
            memo.forget(ctx.tcp, body)
        return None

    def _decide(self, ctx: Context) -> bytes | None:
        """The policy's verdict: the blocked answer, or None with the decision noted."""
        q = ctx.q
        policy = self._policy
        now = ctx.now = self._clock()
        rule, apex, monitored, valid_until = policy.decide(q.key, q.labels, ctx.mask, now)
        if policy.uses_groups and rule is None:
            # The cache is shared by all groups: what enters it must not outlive the next
            # change for any of them, not only for this client's.
            valid_until = min(valid_until, policy.decide(q.key, q.labels, ALL_GROUPS, now)[3])
        ctx.valid_until = valid_until
        if rule is not None:
            answer = fit(blocked_answer(q, rule, apex, now), q, ctx.limit)
            rcode = answer[3] & 0xF
            info = ctx.info = self._accounts.info(q, BLOCKED, rcode, rule, apex)
            self._accounts.account(info, ctx.proto, ctx.client, ctx.started, ctx.client_id)
            if self.memo.fast_blocks is not None:  # the C loop answers the next alike
                self.memo.note_block(blockview.slot_key(rule.index, q.qtype, rcode), info)
            # The TTL is the list's until the window's end comes closer than that TTL.
            ctx.until = min(valid_until, rule.t2 - rule.blocklist.ttl)
            return answer
        if monitored is not None:
            # Would block, once enforced: counted and logged, answered as usual, and never
            # memoised (ctx.until stays 0), so that every such query is seen.
            ctx.decision = MONITORED
            ctx.monitored = monitored
            mask = ctx.mask if policy.uses_groups else policy.groups.mask_of(ctx.client)
            self._accounts.count_would_block(monitored, mask)
            self._accounts.log_would_block(q, ctx.client, monitored)
        elif apex < 0:
            ctx.decision = ALLOWED
        return None

    def _serve(self, ctx: Context, entry: Entry, source: int) -> bytes:
        """The answer from ``entry``: from the cache (_CACHED), just fetched (_FRESH) or
        expired (_STALE). The one place answers are inspected (inspect.py): an answer
        that leads to something blocked is answered as blocked, and no TTL may reach
        past the next policy transition of what it leads to."""
        if inspects(self._policy, self.rebinding, entry):
            now = ctx.now if source == _CACHED else self._clock()
            rule, rname, until = behind(
                self._policy, self.rebinding, self.internal_zones, ctx.q, entry, ctx.mask, now
            )
            if until < ctx.valid_until:
                ctx.valid_until = until
            if rule is not None:
                answer = self._blocked_behind(ctx, rule, rname, now)
                if source == _CACHED:
                    ctx.until = min(ctx.valid_until, rule.t2 - rule.blocklist.ttl, entry.expires)
                return answer
        if source == _CACHED:
            return self._cached(ctx, entry)
        if source == _FRESH:
            # At the instant it was admitted (this same turn of the loop): its TTLs are
            # the ones the reply brought, capped as the cache capped them.
            answer = fit(render(entry, ctx.q, entry.stored), ctx.q, ctx.limit)
            return self._answered(ctx, answer, entry.rcode, entry.upstream)
        return self._stale(ctx, entry)

    def _local(self, ctx: Context) -> bytes | None:
        """The answer for resolver.arpa and the names under it (ddr.py); memoised until the
        policy's next change for the name (the memo empties when the designation does)."""
        q = ctx.q
        if not served(q):
            return None
        answer = fit(self._ddr.answer(q), q, ctx.limit)
        monitored = ctx.monitored
        decision = LOCAL if monitored is None else MONITORED
        info = self._accounts.info(q, decision, answer[3] & 0xF, monitored)
        self._accounts.account(info, ctx.proto, ctx.client, ctx.started, ctx.client_id)
        if monitored is None:
            ctx.info = info
            ctx.until = ctx.valid_until
        return answer

    def _cached(self, ctx: Context, entry: Entry) -> bytes:
        """A cache hit, accounted for, and how long it may stay in the memo."""
        q, now, valid_until = ctx.q, ctx.now, ctx.valid_until
        if self.cache.wants_prefetch(entry, now):
            self._fetch(ctx, False)  # lands in the cache by itself
        # A transition (of this name or one its answer passes through) before the entry's
        # end is one its TTLs do not know of (a reload since): no TTL may reach past it.
        capped = valid_until < entry.expires
        answer = fit(render(entry, q, now, False, valid_until if capped else 0.0), q, ctx.limit)
        monitored = ctx.monitored
        apex = self._policy.named(q.key, q.labels, monitored) if monitored is not None else 0
        info = self._accounts.info(
            q, ctx.decision, entry.rcode, monitored, apex, entry.upstream, from_cache=True
        )
        self._accounts.account(info, ctx.proto, ctx.client, ctx.started, ctx.client_id)
        if monitored is None:
            # Served TTLs change when the entry's age, rounded up, changes: at the next
            # whole second of it (and, capped, when the time left to the cap does).
            stored = entry.stored
            turn = stored + int(now - stored)
            if turn <= now:
                turn = turn + 1.0 if turn < now else tick(turn, now)
            until = min(valid_until, entry.expires, turn)
            if capped:
                until = min(until, tick(valid_until - int(valid_until - now), now))
            ctx.info = info
            ctx.until = until
        return answer

    def _admit(self, ctx: Context) -> bytes | None:
        """SERVFAIL when too many queries wait for upstreams already (counted now, not
        when a task first runs, so a burst that arrives in one read is bounded too);
        otherwise None, with the query counted as waiting."""
        if self.waiting >= self.max_inflight:
            self._stats.stopped["overload"] += 1
            return self._error(ctx, RCODE_SERVFAIL)
        client = ctx.client
        held = self._held.get(client, 0)
        if held >= self.max_inflight_per_client:
            self._stats.stopped["client_inflight"] += 1
            answer = busy(ctx.q)
            self._accounts.account(
                self._accounts.info(ctx.q, ERROR, RCODE_SERVFAIL),
                ctx.proto,
                client,
                ctx.started,
                ctx.client_id,
            )
            return answer
        self._held[client] = held + 1
        self.waiting += 1
        if ctx.decision == CACHED:
            ctx.decision = FORWARDED
        ctx.stale = self.cache.stale(ctx.key, ctx.now) if self.cache.serve_stale else None
        return None

    def _forward(self, ctx: Context) -> Pending:
        """The answer from upstream, checked and accounted for, without a task or a
        future: the forwarder hands the reply back with ``ctx`` (_landed), and the answer
        goes to the listener at once. With ``ctx.stale`` (an expired entry, RFC 8767),
        that one is served when no answer comes within the client response timer, or
        none at all; the fetch goes on and refreshes the cache. (No closure per miss.)"""
        answer = ctx.pending = Pending()
        if ctx.stale is not None:
            ctx.timer = asyncio.get_running_loop().call_later(
                self.stale_timer, self._settle, ctx, None
            )
        self._fetch(ctx, True)
        return answer

    def _settle(self, ctx: Context, entry: Entry | None) -> None:
        """Answer a query handed to _forward, once: from ``entry`` (None: none came)."""
        if ctx.settled:
            return  # the stale answer went out already; the fetch refreshed the cache
        ctx.settled = True
        self.waiting -= 1  # counted by _admit, when the query was handed over
        client = ctx.client
        held = self._held.get(client, 0) - 1
        if held > 0:
            self._held[client] = held
        else:
            self._held.pop(client, None)
        timer = ctx.timer
        if timer is not None:
            timer.cancel()
        answer = ctx.pending
        if answer is None or answer.done():
            return  # cancelled when shutdown ran out of time
        try:
            if entry is not None:
                reply = self._serve(ctx, entry, _FRESH)
            elif ctx.stale is not None:
                reply = self._serve(ctx, ctx.stale, _STALE)
            else:
                reply = self._failed(ctx)
            answer.deliver(reply)
        except Exception as exc:
            answer.fail(exc)

    def _failed(self, ctx: Context) -> bytes:
        """SERVFAIL: no upstream answered."""
        if ctx.monitored is None:
            ctx.decision = ERROR
        # else still "monitored", so that the audit log has the would-block match (with
        # rcode SERVFAIL) however the upstream failed
        answer = error_response(ctx.q, RCODE_SERVFAIL)
        return self._answered(ctx, answer, RCODE_SERVFAIL, None)

    def _answered(self, ctx: Context, answer: bytes, rcode: int, upstream: str | None) -> bytes:
        """``answer``, from upstream or for the lack of one, accounted for."""
        q, monitored = ctx.q, ctx.monitored
        apex = self._policy.named(q.key, q.labels, monitored) if monitored is not None else 0
        info = self._accounts.info(q, ctx.decision, rcode, monitored, apex, upstream)
        self._accounts.account(info, ctx.proto, ctx.client, ctx.started, ctx.client_id)
        return answer

    def _stale(self, ctx: Context, entry: Entry) -> bytes:
        """An expired answer, TTL 30, with Extended DNS Error 3 (Stale Answer); no TTL
        reaches past the next policy transition of a name in it (ctx.valid_until)."""
        q, cap = ctx.q, ctx.valid_until
        answer = render(entry, q, self._clock(), True, cap if cap < NEVER else 0.0)
        self._stats.stale += 1
        decision = CACHED if ctx.decision == FORWARDED else ctx.decision
        info = self._accounts.info(q, decision, entry.rcode, ctx.monitored, 0, entry.upstream)
        self._accounts.account(info, ctx.proto, ctx.client, ctx.started, ctx.client_id)
        return fit(answer, q, ctx.limit)

    def _blocked_behind(self, ctx: Context, rule: RuleSet, rname: str, now: float) -> bytes:
        """The blocked answer for a name whose answer leads to ``rname``, which ``rule``
        blocks."""
        q = ctx.q
        answer = fit(blocked_answer(q, rule, 0, now), q, ctx.limit)
        logged = self._accounts.audit is not None and self._accounts.audit.wants(BLOCKED)
        info = ctx.info = Info(
            self._stats,
            BLOCKED,
            q.qtype,
            answer[3] & 0xF,
            rule.blocklist.id,
            rname,
            rule.reference,
            decode_name(q.qname),
            logged,
        )
        self._accounts.account(info, ctx.proto, ctx.client, ctx.started, ctx.client_id)
        log.info(
            "blocked %s for %s: its answer passes through %s (list %s)",
            decode_name(q.qname),
            ctx.client,
            rname,
            rule.blocklist.id,
        )
        return answer

    def _guarded(
        self, verdict: int, data: bytes, proto: int, client: str, started: float, client_id: str
    ) -> bytes | None:
        """A query the access list or the rate limit stops: REFUSED, silence or TC=1."""
        self._stats.stopped[_STOPPED[verdict]] += 1
        if verdict in (DROP, DENY_DROP):
            return None
        try:
            q = parse_query(data)
        except (Unanswerable, FormatError):
            return None  # not worth an answer to a stranger or a flood
        if verdict == TRUNCATE:
            # Over the limit on UDP: TC=1 sends a real client to TCP, which costs a
            # spoofing flood its source address.
            opt = opt_record(q.do) if q.edns else b""
            return truncate(q, 0, 0, opt)
        answer = error_response(q, RCODE_REFUSED)
        info = self._accounts.info(q, REFUSED, RCODE_REFUSED)
        self._accounts.account(info, proto, client, started, client_id)
        return answer

    def _error(self, ctx: Context, rcode: int) -> bytes:
        q = ctx.q
        answer = error_response(q, rcode, with_question=bool(q.question))
        self._accounts.account(
            self._accounts.info(q, ERROR, rcode), ctx.proto, ctx.client, ctx.started, ctx.client_id
        )
        return answer

    def _fetch(self, ctx: Context, wait: bool) -> None:
        """Fetch the upstream answer for ``ctx.q`` and admit it to the cache, capped at
        ``ctx.valid_until``; then, ``wait``, settle ``ctx`` with the entry (None: no
        answer), in the same turn of the event loop (a prefetch waits for nothing).
        Identical questions already on their way upstream share one fetch."""
        key = ctx.key
        waiters = self._inflight.get(key)
        if waiters is not None:
            if wait:
                waiters.append(ctx)
            return
        self._inflight[key] = [ctx] if wait else []
        ctx.fetch_until = ctx.valid_until
        self.forwarder.begin(ctx.q, self._landed_cb, ctx)

    def _landed(self, ctx: Context, scan: Scan | None) -> None:
        """The reply to the fetch ``ctx`` started (None: none), cached, to its waiters."""
        key = ctx.key
        waiters = self._inflight.pop(key)
        entry = None
        try:
            if scan is not None:
                q = ctx.q
                scan = for_client(scan, q.question, q.qtype, q.do)
                now = self._clock()
                until = ctx.fetch_until
                if scan.chain or (scan.addresses and self._policy.networks):
                    until = min(until, answer_changes(self._policy, scan, now))
                entry = self.cache.admit(key, scan, now, until)
        finally:
            for waiter in waiters:
                self._settle(waiter, entry)


_cache_key = cache_key  # (the name the benchmarks import)
