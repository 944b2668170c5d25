"""The query pipeline, in its one declared order.

``Resolver.handle`` takes the bytes of a query and returns the bytes of the answer, None
(stay silent), or an awaitable for the answer when it must come from upstream. Everything
that can be answered without I/O is answered synchronously, with no task created: that is
most of the traffic (blocked names and cache hits) and what keeps the hot path cheap.

The order, and why each step sits where it does:

1. parse      - reads header, question and OPT from the bytes; garbage stops here, so no
                later step ever sees a malformed query. Non-QUERY opcodes get NOTIMP,
                EDNS versions above 0 get BADVERS (RFC 6891) and classes other than IN
                (and ANY) get REFUSED before any policy work.
2. policy     - before the cache and the upstream: a blocked name is never forwarded (that
                would leak the lookup) and never answered from a cache filled before its
                ban took force. The policy also says until when its verdict holds, which
                caps cache lifetimes below.
3. cache      - after policy, before upstream: a hit costs no I/O.
4. upstream   - last: in-flight deduplication, then the forwarder; the reply is admitted to
                the cache with its lifetime capped at the policy's next transition, and,
                for a client without DO, without the DNSSEC records an upstream may send
                anyway (RFC 3225 3; cache entries are kept per DO bit).

Each step's answer passes through ``_fit``, which cuts an answer to ANY over UDP down to
one RRset of the real answer (RFC 8482 4.1: no amplification, and the rcode, the aliases
and the signatures stay true) and truncates (TC=1) what does not fit the client's UDP size.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import struct
import time
from collections.abc import Callable, Container
from time import perf_counter
from typing import TYPE_CHECKING, Final

import dns.rdatatype

from ..policy.model import ALL_CLIENTS, Policy, RuleSet
from ..policy.timewindow import NEVER
from ..upstream.forwarder import Forwarder
from .cache import STALE_TTL, Cache, Entry, age_of
from .guard import DENY_DROP, DROP, EVERYONE, REFUSE, TRUNCATE, Guard
from .outcome import ALLOWED, BLOCKED, CACHED, ERROR, FORWARDED, MONITORED, REFUSED
from .pending import Pending
from .sinkhole import blocked_answer
from .stats import Stats, qtype_label, rcode_label

if TYPE_CHECKING:
    from ..observe.querylog import AuditSink

from .wire import (
    CLASS_ANY,
    CLASS_IN,
    EDE_STALE,
    FLAG_AD,
    OPT_DO,
    OPT_PLAIN,
    RCODE_BADVERS,
    RCODE_NOTIMP,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    TYPE_ANY,
    FormatError,
    Query,
    Scan,
    Unanswerable,
    decode_name,
    ede_option,
    error_response,
    for_client,
    formerr_from_header,
    header,
    label_offsets,
    minimal_any,
    opt_record,
    pack_u32_into,
    parse_query,
    response_flags,
    truncate,
    without_extras,
)

log = logging.getLogger("resolver.chain")

Clock = Callable[[], float]
Result = bytes | Pending | None

#: Lists whose "would block" log lines are spaced out (a backstop; lists are few).
_MONITOR_LINES_MAX: Final = 10_000
_TCP_MAX: Final = 65535
_STOPPED: Final = {REFUSE: "acl", DENY_DROP: "acl", DROP: "dropped", TRUNCATE: "truncated"}
ALL_GROUPS: Final = (1 << 64) - 1
_STALE_OPTION: Final = ede_option(EDE_STALE, "")
_STALE_PLAIN: Final = opt_record(False, 0, _STALE_OPTION)
_STALE_DO: Final = opt_record(True, 0, _STALE_OPTION)
# Our OPT record by (stale, DO).
_OPTS: Final = {
    (False, False): OPT_PLAIN,
    (False, True): OPT_DO,
    (True, False): _STALE_PLAIN,
    (True, True): _STALE_DO,
}
_MEMO_MAX: Final = 50_000
# SERVFAIL for a client over its share of the in-flight budget, saying why (RFC 8914
# Extended DNS Error 0, Other: none of the registered codes says "busy").
_BUSY_OPTION: Final = ede_option(
    0, "too many queries from this client already waiting for upstreams"
)
_BUSY_OPTS: Final = (opt_record(False, 0, _BUSY_OPTION), opt_record(True, 0, _BUSY_OPTION))
#: Default bounds of the answer memo: entries per transport, and bytes of both together
#: (each transport's memo takes half at most).
DEFAULT_MEMO_MAX_ENTRIES: Final = _MEMO_MAX
DEFAULT_MEMO_MAX_BYTES: Final = 16 * 1024 * 1024
#: What a memo entry takes beyond the bytes of its key and answer: the dict's slot, the
#: value's tuple, its float and the two bytes objects' headers (measured: about 190),
#: and the 8 bytes of a client group mask a key may hold beyond its answer's length.
_MEMO_OVERHEAD: Final = 200
#: Memo entries evicted at once, as a share of the memo (1/16): the oldest in insertion
#: order, in one pass over the start of the dict, which stays cheap and keeps the
#: dict's table from filling with holes at its front.
_EVICT_SHARE: Final = 16
#: Info objects that memo entries may refer to (see Resolver._slot) before the memo
#: starts afresh (or four per entry the memo may hold, if more).
_SLOTS_MAX: Final = 4 * _MEMO_MAX


class Info:
    """What an answer is, for metrics and the audit log; computed once per distinct
    answer and kept in the memo, so that counting a memo hit is a few increments."""

    __slots__ = (
        "decision",
        "fast",
        "fast_time",
        "from_cache",
        "hist",
        "keys",
        "list_id",
        "logged",
        "per_list",
        "qname",
        "qtype",
        "rcode",
        "reference",
        "rule",
        "slot",
        "upstream",
    )

    def __init__(
        self,
        stats: Stats,
        decision: str,
        qtype: int,
        rcode: int,
        list_id: str | None = None,
        rule: str | None = None,
        reference: str | None = None,
        qname: str = "",
        logged: bool = False,
        upstream: str | None = None,
        from_cache: bool = False,
    ) -> None:
        self.decision = decision
        self.upstream = upstream
        #: Answered from the cache (or the memo of a cache hit): a cache hit for metrics.
        self.from_cache = from_cache
        qlabel = qtype_label(qtype)
        self.rcode = rcode_label(rcode)
        #: The answers-counter keys for UDP and for TCP. (A tuple of any length: the compiled
        #: build keeps its items as Python tuples, not as fields that each use boxes anew.)
        self.keys: tuple[tuple[str, str, str, str], ...] = (
            ("udp", qlabel, self.rcode, decision),
            ("tcp", qlabel, self.rcode, decision),
        )
        self.hist = stats.durations[decision]
        # (Would-block matches are counted when decided, before any answer: see
        # Resolver._count_would_block.)
        self.per_list = stats.blocked if decision == BLOCKED and list_id is not None else None
        self.list_id = list_id or ""
        self.rule = rule
        self.reference = reference
        self.qname = qname
        self.qtype = qtype
        self.logged = logged
        #: Its index in Resolver._slots while memo entries refer to it; -1 otherwise.
        self.slot = -1
        #: UDP answers sent by the listener's fast path (see UDPListener) and their summed
        #: durations, not yet added to the counters: Resolver.fold() adds them.
        self.fast = 0
        self.fast_time = 0.0

    def fold(self, stats: Stats) -> int:
        """Add the fast path's answers to the counters; return how many there were."""
        fast = self.fast
        if fast:
            key = self.keys[0]
            stats.answers[key] = stats.answers.get(key, 0) + fast
            self.hist.counts[0] += fast  # the fast path takes answers under BUCKETS[0]
            self.hist.total += self.fast_time
            if self.from_cache:
                stats.cache_hits += fast
            if self.per_list is not None:
                self.per_list[self.list_id] += fast
            self.fast = 0
            self.fast_time = 0.0
        return fast


# query key (see Resolver.handle) -> (answer after the ID, valid until, the slot of what
# it is). The slot is an index into Resolver._slots, not the Info itself: a tuple of bytes,
# float and int is not tracked by the garbage collector, nor is a dict of such tuples,
# so that a full memo costs a full collection nothing (with Info objects in the tuples,
# 100,000 entries cost every full collection about 15 ms).
Memo = dict[bytes, tuple[bytes, float, int]]


class Resolver:
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
        self.clock = clock
        self._inflight: dict[bytes, list[Callable[[Entry | None], None]]] = {}
        # Answers by query bytes (all but the ID), per transport: see handle().
        self._memo: tuple[Memo, Memo] = ({}, {})
        #: Bytes the UDP and the TCP memo take (keys, answers and _MEMO_OVERHEAD each).
        self._memo_size = [0, 0]
        #: The memo's bounds: entries per transport, bytes of both together (half each).
        self.memo_max_entries = DEFAULT_MEMO_MAX_ENTRIES
        self.memo_max_bytes = DEFAULT_MEMO_MAX_BYTES
        #: Entries evicted to keep within those bounds; answers too large to memoise.
        self.memo_evictions = 0
        self.memo_rejections = 0
        #: The Info objects that memo entries refer to, by slot (see Memo).
        self._slots: list[Info] = []
        #: Info objects shared by answers alike when the audit log does not want them.
        self._infos: dict[tuple[object, ...], Info] = {}
        self._memo_hits = 0
        self._stats = Stats()
        #: The Info objects of the UDP memo's entries that the listener's fast path may
        #: count (their fast counts are added to the stats by fold()).
        self._fast_infos: dict[Info, None] = {}
        #: The audit log, when one is configured (its writer runs in its own thread).
        self.audit: AuditSink | None = None
        #: Queries waiting for upstreams at once; beyond, SERVFAIL at once.
        self.max_inflight = 4096
        self.waiting = 0
        #: Of those, per client address: one client flooding distinct slow names must not
        #: take the whole budget from the others (SERVFAIL with an EDE beyond it).
        self.max_inflight_per_client = 1024
        self._held: dict[str, int] = {}
        #: Seconds to wait for upstreams before serving a stale answer (RFC 8767's client
        #: response timer), when the cache keeps stale entries.
        self.stale_timer = 1.8
        #: Seconds between two "would block" log lines for one list (the matches in
        #: between are counted in the next line; the audit log has every one).
        self.monitor_log_interval = 10.0
        # list id -> (time of its last "would block" line, matches not logged since)
        self._monitor_lines: dict[str, tuple[float, int]] = {}
        #: DNS rebinding protection: when set, a private address in the answer for a name
        #: outside ``internal_zones`` is blocked with this rule set.
        self.rebinding: RuleSet | None = None
        self.internal_zones: tuple[str, ...] = ()
        self._guard: Guard | None = None
        #: For the UDP listener's fast path (UDPListener.datagram_received): the UDP
        #: memo when a memo hit needs nothing but the access list to be answered, that is
        #: no rate limit and no client groups; otherwise None. And the clients that the
        #: access list lets in.
        self.fast_memo: Memo | None = None
        #: What the fast path's memo entries are, by slot (the same list throughout).
        self.fast_infos: list[Info] = self._slots
        self.fast_clients: Container[str] = EVERYONE
        self._fast_path()

    @property
    def guard(self) -> Guard | None:
        """The access list and rate limit; None lets everyone in."""
        return self._guard

    @guard.setter
    def guard(self, guard: Guard | None) -> None:
        self._guard = guard
        self._fast_path()

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
        guard = self._guard
        plain = not self._policy.uses_groups and (guard is None or not guard.rate)
        self.fast_memo = self._memo[False] if plain else None
        self.fast_clients = EVERYONE if guard is None else guard.allowed

    @property
    def stats(self) -> Stats:
        """The counters, the fast path's answers included."""
        self.fold()
        return self._stats

    @property
    def memo_hits(self) -> int:
        """Answers from the memo, the fast path's included."""
        self.fold()
        return self._memo_hits

    def fold(self) -> None:
        """Add the answers the UDP fast path sent since the last call to the counters."""
        stats = self._stats
        hits = 0
        for info in self._fast_infos:
            hits += info.fold(stats)
        self._memo_hits += hits

    async def close(self) -> None:
        """Stop upstream work still going on, prefetches included (at shutdown, after the
        drain)."""
        await self.forwarder.close()

    def forget_answers(self) -> None:
        """Empty the answer memo (after a policy swap or a cache flush)."""
        self._clear_memo()
        self._infos.clear()  # they hold the old policy's rule sets

    @property
    def memo_entries(self) -> int:
        """Answers in the memo, both transports."""
        return len(self._memo[0]) + len(self._memo[1])

    @property
    def memo_bytes(self) -> int:
        """Bytes the memo takes, as its bound counts them."""
        return self._memo_size[0] + self._memo_size[1]

    def pin_memo(self) -> None:
        """Track the memo's dicts by the garbage collector, for a gc.freeze() right after
        to move them into the permanent generation, which collections never walk (see
        server.settle_memory). Untracked, as an empty dict is, a dict is tracked again by
        each insert of a fresh tuple (the collector untracks tuples of bytes, float and
        int only later), and every full collection would walk its entries: about 3 ms
        per 50,000. Emptying the memo leaves the dicts tracked."""
        for memo in self._memo:
            memo[b""] = (b"", 0.0, len(memo))  # (built at run time: a constant is untracked)
            del memo[b""]

    def _clear_memo(self) -> None:
        self.fold()
        for memo in self._memo:
            memo.clear()
        self._memo_size[0] = self._memo_size[1] = 0
        self._fast_infos.clear()
        for info in self._slots:
            info.slot = -1
        self._slots.clear()  # in place: the fast path holds this list

    def handle(self, data: bytes, client: str, tcp: bool) -> Result:
        """Answer one query; see the module docstring for the order of the steps.

        Step 0, the answer memo: a query whose bytes after the ID equal an earlier one's gets
        the same answer with its own ID, for as long as that answer stays exactly right (the
        policy's verdict, the cache entry, and the second of its TTLs). Clients repeat the
        same bytes for the same question, so blocked names and cache hits skip parsing.

        Those bytes are the key only for a plain query: header, question, and at most an
        OPT record without options. Any other query is keyed, once parsed, on
        what its answer is made of (_memo_key): flags, question as sent, and whether it has
        EDNS, its DO bit and its UDP size. So EDNS options (padding, cookies) and bytes
        beyond the records never reach a key, and a client varying them adds nothing.
        """
        started = perf_counter()
        guard = self._guard
        if guard is not None:
            verdict = guard.check(client, tcp)
            if verdict:
                return self._guarded(verdict, data, tcp, client, started)
        policy = self._policy
        memo = self._memo[tcp]
        if policy.uses_groups:
            # Lists apply to client groups: the same bytes may deserve another answer.
            mask = policy.groups.mask_of(client)
            body = mask.to_bytes(8, "little") + data[2:]
        else:
            mask = ALL_CLIENTS
            body = data[2:]
        hit = memo.get(body)
        if hit is not None:
            if self.clock() < hit[1]:
                self._memo_hits += 1
                self._account(self._slots[hit[2]], tcp, client, started)
                return data[:2] + hit[0]
            self._forget(memo, body, tcp)
        try:
            q = parse_query(data)
        except Unanswerable:
            return None
        except FormatError:
            answer = formerr_from_header(data)
            self._account(Info(self._stats, ERROR, 0, 1), tcp, client, started)
            return answer
        if q.opcode:
            return self._error(q, RCODE_NOTIMP, tcp, client, started)
        if q.edns_version:
            return self._error(q, RCODE_BADVERS, tcp, client, started)
        if q.qclass != CLASS_IN and q.qclass != CLASS_ANY:
            # CHAOS, Hesiod and unassigned classes: the upstreams and the lists are about
            # the Internet class only. REFUSED says so (RFC 1035 4.1.1: refused for policy
            # reasons) where SERVFAIL would read as a failure; Unbound does the same. QCLASS
            # ANY (RFC 1035 3.2.5) is forwarded, as Unbound forwards it.
            return self._error(q, RCODE_REFUSED, tcp, client, started)
        # A plain query is a header, its question uncompressed, and at most an OPT record
        # without options: nothing in its bytes is free for a client to vary without
        # changing the answer. Every record takes 11 bytes or more and parsing found the
        # question and the OPT, so the length says there is nothing else; the question
        # compares equal only uncompressed (a pointer's first byte is no label length).
        if len(data) != 12 + len(q.question) + (11 if q.edns else 0) or not data.startswith(
            q.question, 12
        ):
            # Not plain: keyed on what its answer is made of, never on bytes a client may
            # vary.
            body = _memo_key(data, q)
            if policy.uses_groups:
                body = mask.to_bytes(8, "little") + body
            hit = memo.get(body)
            if hit is not None:
                if self.clock() < hit[1]:
                    self._memo_hits += 1
                    self._account(self._slots[hit[2]], tcp, client, started)
                    return data[:2] + hit[0]
                self._forget(memo, body, tcp)
        limit = _TCP_MAX if tcp else q.udp_size

        now = self.clock()
        rule, apex, monitored, valid_until = policy.decide(q.key, q.labels, mask, now)
        if policy.uses_groups and rule is None:
            # The cache is shared by all groups: what enters it must not outlive the next
            # change for any of them, not only for this client's.
            valid_until = min(valid_until, policy.decide(q.key, q.labels, ALL_GROUPS, now)[3])
        if rule is not None:
            answer = _fit(blocked_answer(q, rule, apex, now), q, limit)
            info = self._info(q, BLOCKED, answer[3] & 0xF, rule, apex)
            self._account(info, tcp, client, started)
            # The TTL is the list's until the window's end comes closer than that TTL.
            until = min(valid_until, rule.t2 - rule.blocklist.ttl)
            self._remember(memo, tcp, body, answer, until, now, info)
            return answer
        decision = CACHED
        if monitored is not None:
            # Would block, once enforced: counted and logged, answered as usual, and never
            # memoised, so that every such query is seen.
            decision = MONITORED
            self._count_would_block(monitored)
            self._log_would_block(q, client, monitored)
        elif apex < 0:
            decision = ALLOWED

        key = _cache_key(q)
        entry = self.cache.get(key, now)
        if entry is not None:
            if self._inspects(entry):
                rule, rname, behind_until = self._behind(q, entry, mask, now)
                valid_until = min(valid_until, behind_until)
                if rule is not None:
                    answer, info = self._blocked_behind(
                        q, rule, rname, now, limit, tcp, client, started
                    )
                    until = min(valid_until, rule.t2 - rule.blocklist.ttl, entry.expires)
                    self._remember(memo, tcp, body, answer, until, now, info)
                    return answer
            if self.cache.wants_prefetch(entry, now):
                self._fetch(q, key, valid_until)  # lands in the cache by itself
            # A transition (of this name or one its answer passes through) before the
            # entry's end is one its TTLs do not know of (a reload since): no TTL may
            # reach past it.
            capped = valid_until < entry.expires
            answer = _fit(render(entry, q, now, False, valid_until if capped else 0.0), q, limit)
            apex = policy.named(q.key, q.labels, monitored) if monitored is not None else 0
            info = self._info(
                q,
                decision,
                entry.rcode,
                monitored,
                apex,
                entry.upstream,
                from_cache=True,
            )
            self._account(info, tcp, client, started)
            if monitored is None:
                # Served TTLs change when the entry's age, rounded up, changes: at the next
                # whole second of it (and, capped, when the time left to the cap does).
                stored = entry.stored
                tick = stored + int(now - stored)
                if tick <= now:
                    tick = tick + 1.0 if tick < now else _tick(tick, now)
                until = min(valid_until, entry.expires, tick)
                if capped:
                    until = min(until, _tick(valid_until - int(valid_until - now), now))
                self._remember(memo, tcp, body, answer, until, now, info)
            return answer
        if self.waiting >= self.max_inflight:
            # Too many queries already waiting for upstreams: refuse more work rather
            # than queue it (counted now, not when the task first runs, so a burst that
            # arrives in one read is bounded too).
            self._stats.stopped["overload"] += 1
            return self._error(q, RCODE_SERVFAIL, tcp, client, started)
        held = self._held.get(client, 0)
        if held >= self.max_inflight_per_client:
            self._stats.stopped["client_inflight"] += 1
            answer = _busy(q)
            self._account(self._info(q, ERROR, RCODE_SERVFAIL), tcp, client, started)
            return answer
        self._held[client] = held + 1
        self.waiting += 1
        forwarded = FORWARDED if decision == CACHED else decision
        stale = self.cache.stale(key, now) if self.cache.serve_stale else None
        return self._forward(
            q, key, valid_until, limit, forwarded, monitored, tcp, client, started, mask, stale
        )

    def _log_would_block(self, q: Query, client: str, rule: RuleSet) -> None:
        """Log a would-block match: at most one line per list per ``monitor_log_interval``
        seconds, saying how many matches went unlogged since the last one. A flood of
        monitored names must not flood the log; each match is counted in
        resolver_would_block_total and recorded in the audit log."""
        list_id = rule.blocklist.id
        now = time.monotonic()
        last = self._monitor_lines.get(list_id)
        if last is not None and now - last[0] < self.monitor_log_interval:
            self._monitor_lines[list_id] = (last[0], last[1] + 1)
            return
        if last is None and len(self._monitor_lines) >= _MONITOR_LINES_MAX:
            self._monitor_lines.clear()  # bounded by the lists loaded; this is a backstop
        self._monitor_lines[list_id] = (now, 0)
        unlogged = last[1] if last is not None else 0
        log.info(
            "would block %s for %s: list %s (%s)%s",
            decode_name(q.qname),
            client,
            list_id,
            "monitor mode" if rule.blocklist.mode == "monitor" else "monitor phase",
            f"; {unlogged} more matches of this list since the last such line (see the audit log)"
            if unlogged
            else "",
        )

    def _info(
        self,
        q: Query,
        decision: str,
        rcode: int,
        rule: RuleSet | None = None,
        apex: int = 0,
        upstream: str | None = None,
        from_cache: bool = False,
    ) -> Info:
        """The labels and audit fields of one answer, computed once (then memoised).
        The names in text are for the audit log only: without them, answers alike share
        one Info."""
        audit = self.audit
        logged = audit is not None and audit.wants(decision)
        shared = None if logged else (decision, q.qtype, rcode, rule, upstream, from_cache)
        if shared is not None:
            info = self._infos.get(shared)
            if info is not None:
                return info
        info = Info(
            self._stats,
            decision,
            q.qtype,
            rcode,
            rule.blocklist.id if rule is not None else None,
            decode_name(q.key[apex:]).rstrip(".")
            if logged and rule is not None and apex >= 0
            else None,
            rule.reference if rule is not None else None,
            decode_name(q.qname) if logged else "",
            logged,
            upstream,
            from_cache,
        )
        if shared is not None:
            if len(self._infos) >= _MEMO_MAX:
                self._infos.clear()
            self._infos[shared] = info
        return info

    def _count_would_block(self, rs: RuleSet) -> None:
        """Count a would-block match when it is decided, before the cache or the upstream:
        whatever the upstream then does (a timeout, SERVFAIL), the monitor phase's count
        is complete. Its audit entry is written with the answer, which keeps the decision
        "monitored" whatever the upstream did (see _answered)."""
        self._stats.would_block[rs.blocklist.id] += 1

    def _remember(
        self,
        memo: Memo,
        tcp: bool,
        body: bytes,
        answer: bytes,
        until: float,
        now: float,
        info: Info,
    ) -> None:
        if until <= now:
            return
        slot = info.slot
        if slot < 0:
            slot = self._slot(info)  # (before the sizes: it may empty the memo)
        # A key is never longer than its answer (which repeats its question and OPT), so
        # twice the answer's bytes count for both (and save a len() per entry).
        size = 2 * len(answer) + _MEMO_OVERHEAD
        sizes = self._memo_size
        used = sizes[tcp] + size
        # Each transport's memo takes half the bytes at most: TCP's large answers never
        # crowd out the UDP fast path's entries.
        if used * 2 > self.memo_max_bytes or len(memo) >= self.memo_max_entries:
            if not self._make_room(memo, tcp, size):
                return
            used = sizes[tcp] + size
        memo[body] = (answer[2:], until, slot)
        sizes[tcp] = used
        if not tcp and not info.logged:
            self._fast_infos[info] = None

    def _slot(self, info: Info) -> int:
        """A slot for ``info``, which memo entries then refer to. Slots are not reused:
        when they run out, the memo starts afresh (slots run out only with the audit log
        on, whose Info objects are one per answer)."""
        slots = self._slots
        if len(slots) >= max(_SLOTS_MAX, 4 * self.memo_max_entries):
            self._clear_memo()
        info.slot = len(slots)
        slots.append(info)
        return info.slot

    def _forget(self, memo: Memo, body: bytes, tcp: bool) -> None:
        """Drop an expired memo entry."""
        value = memo.pop(body)
        self._memo_size[tcp] -= 2 * len(value[0]) + 4 + _MEMO_OVERHEAD

    def _make_room(self, memo: Memo, tcp: bool, size: int) -> bool:
        """Whether an entry of ``size`` bytes may join ``memo`` (the ``tcp`` one), after
        evicting its oldest entries, a share at a time, until it is within its entry cap
        and its half of the bytes. Not when the memo is off, nor when making room would
        take more than that share (counted as a rejection)."""
        half = self.memo_max_bytes // 2
        if self.memo_max_entries <= 0 or half <= 0:
            return False
        if size * _EVICT_SHARE > half:
            self.memo_rejections += 1  # it would crowd out too many others
            return False
        sizes = self._memo_size
        while memo and (len(memo) >= self.memo_max_entries or sizes[tcp] + size > half):
            count = max(1, len(memo) // _EVICT_SHARE)
            doomed: list[bytes] = []
            for key in memo:
                doomed.append(key)
                if len(doomed) >= count:
                    break
            freed = 0
            for key in doomed:
                freed += 2 * len(memo.pop(key)[0]) + 4 + _MEMO_OVERHEAD
            sizes[tcp] -= freed
            self.memo_evictions += len(doomed)
        return True

    def memo_answered(self, info: Info, client: str, started: float) -> None:
        """Count a UDP memo answer that the fast path took too long over to count itself."""
        self._memo_hits += 1
        self._account(info, False, client, started)

    def _account(self, info: Info, tcp: bool, client: str, started: float) -> None:
        """Count one answer and, when the audit log wants it, log it."""
        elapsed = perf_counter() - started
        answers = self._stats.answers
        key = info.keys[tcp]
        answers[key] = answers.get(key, 0) + 1
        info.hist.observe(elapsed)
        if info.from_cache:
            self._stats.cache_hits += 1
        if info.per_list is not None:
            info.per_list[info.list_id] += 1
        if info.logged and self.audit is not None:
            self.audit.record(
                time.time(),
                client,
                "tcp" if tcp else "udp",
                info.qname,
                qtype_text(info.qtype),
                info.rcode,
                info.decision,
                info.list_id or None,
                info.rule,
                info.reference,
                info.upstream,
                elapsed,
            )

    def _behind(
        self, q: Query, entry: Entry, mask: int, now: float
    ) -> tuple[RuleSet | None, str, float]:
        """A rule that blocks what an answer leads to: a name its CNAME or DNAME chain
        passes through (the alias must not lead around the ban), an address inside a
        list's ``networks``, or a private address for a public name (rebinding). Also
        until when that verdict holds."""
        until = NEVER
        policy = self._policy
        for name in entry.chain:
            if name == q.key:
                continue
            rule, apex, _, changes = policy.decide(name, label_offsets(name), mask, now)
            if changes < until:
                until = changes
            if rule is not None:
                return rule, decode_name(name[apex:]).rstrip("."), until
        for packed in entry.addresses:
            if policy.networks:
                rule, net, changes = policy.match_address(packed, mask, now)
                until = min(until, changes)
                if rule is not None:
                    return rule, net, until
            if self.rebinding is not None and _private(packed) and not self._internal(q):
                return self.rebinding, "a private address", until
        return None, "", until

    def _answer_changes(self, scan: Scan, now: float) -> float:
        """The next policy transition, for any client group, of any name the answer
        passes through (CNAME and DNAME owners and targets) or address it holds: the
        cache entry, and so every TTL in it, must not outlive it (the question's own
        transition is the caller's)."""
        policy = self._policy
        mask = ALL_GROUPS if policy.uses_groups else ALL_CLIENTS
        until = NEVER
        for name in scan.chain:
            changes = policy.decide(name, label_offsets(name), mask, now)[3]
            if changes < until:
                until = changes
        if policy.networks:
            for packed in scan.addresses:
                changes = policy.match_address(packed, mask, now)[2]
                if changes < until:
                    until = changes
        return until

    def _internal(self, q: Query) -> bool:
        text = decode_name(q.key).rstrip(".")
        return any(text == zone or text.endswith("." + zone) for zone in self.internal_zones)

    def _inspects(self, entry: Entry) -> bool:
        return bool(
            entry.chain
            or (entry.addresses and (self._policy.networks or self.rebinding is not None))
        )

    def _blocked_behind(
        self,
        q: Query,
        rule: RuleSet,
        rname: str,
        now: float,
        limit: int,
        tcp: bool,
        client: str,
        started: float,
    ) -> tuple[bytes, Info]:
        answer = _fit(blocked_answer(q, rule, 0, now), q, limit)
        logged = self.audit is not None and self.audit.wants(BLOCKED)
        info = Info(
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
        self._account(info, tcp, client, started)
        log.info(
            "blocked %s for %s: its answer passes through %s (list %s)",
            decode_name(q.qname),
            client,
            rname,
            rule.blocklist.id,
        )
        return answer, info

    def _guarded(
        self, verdict: int, data: bytes, tcp: bool, client: str, started: float
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
        self._account(self._info(q, REFUSED, RCODE_REFUSED), tcp, client, started)
        return answer

    def _error(self, q: Query, rcode: int, tcp: bool, client: str, started: float) -> bytes:
        answer = error_response(q, rcode, with_question=bool(q.question))
        self._account(self._info(q, ERROR, rcode), tcp, client, started)
        return answer

    def _fetch(
        self,
        q: Query,
        key: bytes,
        valid_until: float,
        then: Callable[[Entry | None], None] | None = None,
    ) -> None:
        """Fetch the upstream answer for ``q`` and admit it to the cache; then call
        ``then`` with the entry (None: no answer), in the same turn of the event loop.
        Identical questions already on their way upstream share one fetch."""
        waiters = self._inflight.get(key)
        if waiters is not None:
            if then is not None:
                waiters.append(then)
            return
        waiters = self._inflight[key] = [then] if then is not None else []

        def done(scan: Scan | None) -> None:
            del self._inflight[key]
            entry = None
            try:
                if scan is not None:
                    scan = for_client(scan, q.question, q.qtype, q.do)
                    now = self.clock()
                    until = valid_until
                    if scan.chain or (scan.addresses and self._policy.networks):
                        until = min(until, self._answer_changes(scan, now))
                    entry = self.cache.admit(key, scan, now, until)
            finally:
                for waiter in waiters:
                    waiter(entry)

        self.forwarder.begin(q, done)

    def _stale(
        self,
        q: Query,
        entry: Entry,
        limit: int,
        decision: str,
        monitored: RuleSet | None,
        tcp: bool,
        client: str,
        started: float,
        cap: float,
    ) -> bytes:
        """An expired answer, TTL 30, with Extended DNS Error 3 (Stale Answer); no TTL
        reaches past ``cap`` (the next policy transition of a name in it)."""
        answer = render(entry, q, self.clock(), True, cap if cap < NEVER else 0.0)
        self._stats.stale += 1
        decision = CACHED if decision == FORWARDED else decision
        info = self._info(q, decision, entry.rcode, monitored, 0, entry.upstream)
        self._account(info, tcp, client, started)
        return _fit(answer, q, limit)

    def _blocked_if_behind(
        self,
        q: Query,
        entry: Entry,
        mask: int,
        limit: int,
        tcp: bool,
        client: str,
        started: float,
    ) -> bytes | None:
        """The blocked answer when what ``entry`` leads to is blocked (see _behind)."""
        if not self._inspects(entry):
            return None
        now = self.clock()
        rule, rname, _ = self._behind(q, entry, mask, now)
        if rule is None:
            return None
        return self._blocked_behind(q, rule, rname, now, limit, tcp, client, started)[0]

    def _forward(
        self,
        q: Query,
        key: bytes,
        valid_until: float,
        limit: int,
        decision: str,
        monitored: RuleSet | None,
        tcp: bool,
        client: str,
        started: float,
        mask: int,
        stale: Entry | None,
    ) -> Pending:
        """The answer from upstream, checked and accounted for, without a task or a
        future: the forwarder calls back with the reply, and the answer goes to the
        listener at once. With ``stale`` (an expired entry, RFC 8767), that one is served
        when no answer comes within the client response timer, or none at all; the fetch
        goes on meanwhile and refreshes the cache when it lands."""
        answer = Pending()
        timer: asyncio.TimerHandle | None = None
        settled = False

        def settle(entry: Entry | None) -> None:
            nonlocal settled
            if settled:
                return  # the stale answer went out already; the fetch refreshed the cache
            settled = True
            self.waiting -= 1  # counted in handle(), when the query was handed over
            held = self._held.get(client, 0) - 1
            if held > 0:
                self._held[client] = held
            else:
                self._held.pop(client, None)
            if timer is not None:
                timer.cancel()
            if answer.done():
                return  # cancelled when shutdown ran out of time
            try:
                if entry is None and stale is not None:
                    # A stale answer gets the same checks as a fresh one, and its TTLs the
                    # same cap at the next transition of the names in it.
                    reply = self._blocked_if_behind(q, stale, mask, limit, tcp, client, started)
                    if reply is None:
                        now = self.clock()
                        cap = min(valid_until, self._behind(q, stale, mask, now)[2])
                        reply = self._stale(
                            q, stale, limit, decision, monitored, tcp, client, started, cap
                        )
                else:
                    reply = self._answered(
                        q, entry, limit, decision, monitored, tcp, client, started, mask
                    )
                answer.deliver(reply)
            except Exception as exc:
                answer.fail(exc)

        if stale is not None:
            timer = asyncio.get_running_loop().call_later(self.stale_timer, settle, None)
        self._fetch(q, key, valid_until, settle)
        return answer

    def _answered(
        self,
        q: Query,
        entry: Entry | None,
        limit: int,
        decision: str,
        monitored: RuleSet | None,
        tcp: bool,
        client: str,
        started: float,
        mask: int,
    ) -> bytes:
        """The answer to ``q`` from a fetched entry (SERVFAIL for None), checked and
        accounted for."""
        upstream = None
        if entry is not None:
            blocked = self._blocked_if_behind(q, entry, mask, limit, tcp, client, started)
            if blocked is not None:
                return blocked
        if entry is None:
            answer = error_response(q, RCODE_SERVFAIL)
            rcode = RCODE_SERVFAIL
            if monitored is None:
                decision = ERROR
            # else still "monitored", so that the audit log has the would-block match
            # (with rcode SERVFAIL) however the upstream failed
        else:
            # At the instant it was admitted (this same turn of the loop): its TTLs are
            # the ones the reply brought, capped as the cache capped them.
            answer = _fit(render(entry, q, entry.stored), q, limit)
            rcode, upstream = entry.rcode, entry.upstream
        apex = self._policy.named(q.key, q.labels, monitored) if monitored is not None else 0
        info = self._info(q, decision, rcode, monitored, apex, upstream)
        self._account(info, tcp, client, started)
        return answer


_PRIVATE: Final = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "::/128",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
)


def _private(packed: bytes) -> bool:
    """An address a public name must not resolve to (RFC 1918, loopback, link-local,
    unique local, shared address space, unspecified), IPv4-mapped included."""
    addr = ipaddress.ip_address(packed)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in _PRIVATE)


def qtype_text(qtype: int) -> str:
    """A query type as dig writes it (A, AAAA, TYPE666)."""
    return str(dns.rdatatype.to_text(dns.rdatatype.RdataType.make(qtype)))


#: Header counts of a plain query (QD, AN, NS, AR), without and with OPT.
_PLAIN_COUNTS: Final = (b"\x00\x01\x00\x00\x00\x00\x00\x00", b"\x00\x01\x00\x00\x00\x00\x00\x01")
_U16: Final = struct.Struct("!H")


def _memo_key(data: bytes, q: Query) -> bytes:
    """The memo key of a query that is not plain: the bytes of the plain query that gets
    the same answer. Answers echo the flags (RD, CD, AD) and the question as sent, and
    depend on EDNS being there, on DO and on the UDP size (as clamped); they echo no
    option, nor anything else of the query."""
    if not q.edns:
        return data[2:4] + _PLAIN_COUNTS[0] + q.question
    return (
        data[2:4]
        + _PLAIN_COUNTS[1]
        + q.question
        + b"\x00\x00\x29"
        + _U16.pack(q.udp_size)
        + (b"\x00\x00\x80\x00" if q.do else b"\x00\x00\x00\x00")
        + b"\x00\x00"
    )


def _cache_key(q: Query) -> bytes:
    # The name in lower case, type and class as sent, and the DO and CD bits: an answer
    # with DNSSEC records or unchecked data must not reach a client that did not ask.
    return q.key + q.question[-4:] + bytes((q.do, (q.flags >> 4) & 1))


def render(entry: Entry, q: Query, now: float, stale: bool = False, cap: float = 0.0) -> bytes:
    """A cached reply as the answer to ``q``: its ID, its question's case, its flags; or,
    ``stale``, as RFC 8767 serves an expired one (TTL 30, Extended DNS Error 3). With
    ``cap`` (an instant before the entry's end; 0: none), no TTL reaches past it."""
    flags = response_flags(q, entry.rcode)
    if q.do or q.flags & FLAG_AD:
        flags |= entry.flags & FLAG_AD  # RFC 6840 5.8: AD only for clients that ask
    if cap:
        records = _capped_records(entry, now, stale, cap)
    elif stale:
        records = entry.stale_records()
    else:
        records = entry.records(now)
    if q.edns:
        opt = _OPTS[stale, q.do]
        head = header(q.id, flags, 1, entry.an, entry.ns, entry.ar + 1)
        return head + q.question + records + opt
    return header(q.id, flags, 1, entry.an, entry.ns, entry.ar) + q.question + records


def _capped_records(entry: Entry, now: float, stale: bool, cap: float) -> bytes:
    """The entry's records with their TTLs as served at ``now`` (stale: 30 s), none of
    them beyond the floor of the seconds left until ``cap``."""
    left = cap - now
    most = int(left) if left > 0 else 0
    age = age_of(now, entry.stored)
    buf = bytearray(entry.body)
    for off, ttl in zip(entry.ttl_offsets, entry.ttls, strict=True):
        served = STALE_TTL if stale else ttl - age if ttl > age else 0
        pack_u32_into(buf, off, served if served < most else most)
    return bytes(buf)


def _tick(change: float, now: float) -> float:
    """Until when an answer whose TTLs next change at ``change`` stays right: at ``now``
    only, when they change right after it (a TTL that is whole seconds from its end is
    one less an instant later)."""
    return change if change > now else math.nextafter(now, math.inf)


def _busy(q: Query) -> bytes:
    """SERVFAIL, Extended DNS Error 0 saying why: the client's share of the queries
    waiting for upstreams is used up."""
    flags = response_flags(q, RCODE_SERVFAIL)
    if q.edns:
        return header(q.id, flags, 1, 0, 0, 1) + q.question + _BUSY_OPTS[q.do]
    return header(q.id, flags, 1, 0, 0, 0) + q.question


def _fit(answer: bytes, q: Query, limit: int) -> bytes:
    if q.qtype == TYPE_ANY and limit < _TCP_MAX:
        answer = minimal_any(answer)  # over UDP (TCP answers get the largest limit)
    if len(answer) <= limit:
        return answer
    # Leave out what may be left out (additional records, the NS RRset beside an answer)
    # before setting TC (RFC 2181 9); only oversized answers pay for this.
    answer = without_extras(answer)
    if len(answer) <= limit:
        return answer
    rcode = answer[3] & 0xF
    opt = opt_record(q.do) if q.edns else b""
    return truncate(q, rcode, answer[3] & FLAG_AD, opt)
