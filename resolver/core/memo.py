"""The answer memo: the one place repeats are answered from, by the pipeline and the UDP
listeners alike.

A query whose bytes after the ID equal an earlier one's gets the same answer with its own
ID, for as long as that answer stays exactly right (the policy's verdict, the cache entry,
and the second of its TTLs: the stage that made the answer says until when, see
Context.until). Clients repeat the same bytes for the same question, so blocked names and
cache hits skip parsing.

Those bytes are the key only for a plain query: header, question, and at most an OPT
record without options. Any other query is keyed, once parsed, on what its answer is made
of (:func:`memo_key`): flags, question as sent, and whether it has EDNS, its DO bit and its
UDP size. So EDNS options (padding, cookies) and bytes beyond the records never reach a
key, and a client varying them adds nothing. When the policy's lists apply to client
groups the key starts with the client's group mask (Resolver.handle).

Bounded in bytes (``memo_max_bytes``, each transport half at most) and entries
(``memo_max_entries`` per transport); evictions and rejections are counted. Its values
hold no object the garbage collector tracks (see :data:`Memo`).
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Container
from time import perf_counter
from typing import Final

from ..defaults import DEFAULT_MEMO_MAX_BYTES, DEFAULT_MEMO_MAX_ENTRIES
from .guard import EVERYONE
from .outcome import BLOCKED
from .stats import BUCKETS, PROTO_UDP, Histogram, Stats, qtype_label, rcode_label
from .wire import Query

_MEMO_MAX: Final = DEFAULT_MEMO_MAX_ENTRIES
#: What a memo entry takes beyond the bytes of its key and answer: the dict's slot, the
#: value's tuple, its float and the two bytes objects' headers (measured: about 190),
#: and the 8 bytes of a client group mask a key may hold beyond its answer's length.
MEMO_OVERHEAD: Final = 200
#: Memo entries evicted at once, as a share of the memo (1/16): the oldest in insertion
#: order, in one pass over the start of the dict, which stays cheap and keeps the
#: dict's table from filling with holes at its front. (The C loop evicts alike for the
#: blocked answers it keeps: resolver/_fastudp.c, make_room.)
EVICT_SHARE: Final = 16
#: Info objects that memo entries may refer to (see AnswerMemo.slot) before the memo
#: starts afresh (or four per entry the memo may hold, if more).
_SLOTS_MAX: Final = 4 * _MEMO_MAX
#: Info objects shared by answers alike, at most (see account.Accounts.info).
INFOS_MAX: Final = _MEMO_MAX
#: Kinds of blocked answer the C fast path may count (see AnswerMemo.note_block).
_BLOCK_SLOTS_MAX: Final = 4096
#: Fast-path answers slower than this (the first latency bucket) are counted one by one.
FAST_BOUND: Final = BUCKETS[0]

#: Where in ``AnswerMemo.fast_state`` the C loop (resolver/_fastudp.c, event) finds what
#: it reads of the memo on every readable event: one list read by index, where reading
#: the same eight attributes cost about 2,000 instructions an event (a compiled class
#: has no instance dict, so more there).
S_MEMO: Final = 0
S_CLIENTS: Final = 1
S_COUNTS: Final = 2
S_TIMES: Final = 3
S_BLOCKS: Final = 4
S_MAX_ENTRIES: Final = 5
S_MAX_BYTES: Final = 6
S_CLOCK: Final = 7


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
        #: The answers-counter keys, one per transport, indexed by its code (stats.PROTOS):
        #: a memo entry is counted under the proto of each query it answers. (A tuple of
        #: any length: the compiled build keeps its items as Python tuples, not as fields
        #: that each use boxes anew.)
        rlabel = self.rcode
        self.keys: tuple[tuple[str, str, str, str], ...] = (
            ("udp", qlabel, rlabel, decision),
            ("tcp", qlabel, rlabel, decision),
            ("dot", qlabel, rlabel, decision),
            ("doh", qlabel, rlabel, decision),
            ("doq", qlabel, rlabel, decision),
        )
        self.hist: Histogram = stats.durations[decision]
        # (Would-block matches are counted when decided, before any answer: see
        # Accounts.count_would_block.)
        self.per_list = stats.blocked if decision == BLOCKED and list_id is not None else None
        self.list_id = list_id or ""
        self.rule = rule
        self.reference = reference
        self.qname = qname
        self.qtype = qtype
        self.logged = logged
        #: Its index in AnswerMemo.slots while memo entries refer to it; -1 otherwise.
        self.slot = -1
        #: UDP answers sent by the listeners' fast path (AnswerMemo.fast_answer) and their
        #: summed durations, not yet added to the counters: fold() adds them.
        self.fast = 0
        self.fast_time = 0.0

    def count(self, stats: Stats, proto: int, elapsed: float) -> None:
        """Count one answer of this kind that came over ``proto`` (stats.PROTOS),
        ``elapsed`` seconds after its query came."""
        answers = stats.answers
        key = self.keys[proto]
        answers[key] = answers.get(key, 0) + 1
        self.hist.observe(elapsed)
        if self.from_cache:
            stats.cache_hits += 1
        if self.per_list is not None:
            self.per_list[self.list_id] += 1

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


# memo key -> (answer after the ID, valid until, the slot of what it is). The slot is an
# index into AnswerMemo.slots, not the Info itself: a tuple of bytes, float and int is not
# tracked by the garbage collector, nor is a dict of such tuples, so that a full memo costs
# a full collection nothing (with Info objects in the tuples, 100,000 entries cost every
# full collection about 15 ms).
Memo = dict[bytes, tuple[bytes, float, int]]


class AnswerMemo:
    """The memo of both transports, its bounds and counters, and the fast path's view."""

    def __init__(self, stats: Stats, clock: Callable[[], float]) -> None:
        self.stats = stats
        #: What the C loop reads of this memo, by the S_ indices: the properties below
        #: (clock, the bounds, fast_counts, fast_times, fast_memo, fast_clients,
        #: fast_blocks) keep their values here and nowhere else, so that it never reads a
        #: stale one.
        self.fast_state: list[object] = [None, EVERYONE, None, None, None, 0, 0, clock]
        #: The UDP and the TCP memo (indexed by ``tcp``).
        self.dicts: tuple[Memo, Memo] = ({}, {})
        #: Bytes the UDP and the TCP memo take (keys, answers and MEMO_OVERHEAD each).
        self.sizes = [0, 0]
        #: The bounds (properties): entries per transport, bytes of both together (half
        #: each).
        self.max_entries = DEFAULT_MEMO_MAX_ENTRIES
        self.max_bytes = DEFAULT_MEMO_MAX_BYTES
        #: Entries evicted to keep within those bounds; answers too large to memoise.
        self.evictions = 0
        self.rejections = 0
        #: Answers from the memo through Resolver.handle; and those of the fast path (the
        #: ones under FAST_BOUND once folded in). Kept apart, so that a pause on the fast
        #: path never reads as a query the fast path missed.
        self.hits = 0
        self.fast_hits = 0
        #: Of the fast path's answers, those the C loop decided itself (blocked names not
        #: in the memo yet, core/blockview.py, which it then keeps there): counted in their
        #: Info like the memo's hits, but no memo hits.
        self.fast_decided = 0
        #: The Info objects that memo entries refer to, by slot (see Memo).
        self.slots: list[Info] = []
        #: The Info objects of the UDP memo's entries that the fast path may count (their
        #: fast counts are added to the stats by fold()).
        self.fast_infos: dict[Info, None] = {}
        #: For the C fast path (resolver/_fastudp.c), by slot like ``slots``: the answers
        #: it sent for the entries of each Info (-1 for an Info it must leave to Python:
        #: one the audit log sees), and their summed durations; fold() adds them to the
        #: Info's own fast counts. Plain arrays, which C reads and writes without Python.
        self.fast_counts = array("q")
        self.fast_times = array("d")
        #: The slot of the Info each kind of blocked answer (blockview.slot_key) is
        #: counted in, as Python made them (see fast_blocks).
        self.block_slots: dict[int, int] = {}

    @property
    def clock(self) -> Callable[[], float]:
        """The clock the memo's expiries are read at."""
        return self.fast_state[S_CLOCK]  # type: ignore[return-value]

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.fast_state[S_CLOCK] = clock

    @property
    def fast_counts(self) -> array[int]:
        """Answers the C loop sent, by Info slot (see __init__)."""
        return self.fast_state[S_COUNTS]  # type: ignore[return-value]

    @fast_counts.setter
    def fast_counts(self, counts: array[int]) -> None:
        self.fast_state[S_COUNTS] = counts

    @property
    def fast_times(self) -> array[float]:
        """Their summed durations, by Info slot."""
        return self.fast_state[S_TIMES]  # type: ignore[return-value]

    @fast_times.setter
    def fast_times(self, times: array[float]) -> None:
        self.fast_state[S_TIMES] = times

    @property
    def max_entries(self) -> int:
        """The memo's bound in entries, per transport."""
        return self.fast_state[S_MAX_ENTRIES]  # type: ignore[return-value]

    @max_entries.setter
    def max_entries(self, value: int) -> None:
        self.fast_state[S_MAX_ENTRIES] = value

    @property
    def max_bytes(self) -> int:
        """The memo's bound in bytes, both transports together (half each)."""
        return self.fast_state[S_MAX_BYTES]  # type: ignore[return-value]

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        self.fast_state[S_MAX_BYTES] = value

    @property
    def fast_memo(self) -> Memo | None:
        """For the UDP listeners' fast path (fast_answer): the UDP memo when a memo hit
        needs nothing but the access list to be answered, that is no rate limit and no
        client groups; otherwise None."""
        return self.fast_state[S_MEMO]  # type: ignore[return-value]

    @fast_memo.setter
    def fast_memo(self, memo: Memo | None) -> None:
        self.fast_state[S_MEMO] = memo

    @property
    def fast_clients(self) -> Container[str]:
        """The clients that the access list lets in (EVERYONE without one)."""
        return self.fast_state[S_CLIENTS]  # type: ignore[return-value]

    @fast_clients.setter
    def fast_clients(self, clients: Container[str]) -> None:
        self.fast_state[S_CLIENTS] = clients

    @property
    def fast_blocks(self) -> object:
        """For the C fast path's blocked answers (core/blockview.py): the policy's view
        when it can decide names alone, else None."""
        return self.fast_state[S_BLOCKS]

    @fast_blocks.setter
    def fast_blocks(self, view: object) -> None:
        self.fast_state[S_BLOCKS] = view

    def fast_answer(self, body: bytes) -> bytes | None:
        """The answer (after the ID) to a UDP query whose bytes after the ID are ``body``,
        from the memo, counted; None when the pipeline must answer it. The one lookup of
        both UDP listeners; the caller has checked ``fast_clients``. Its counts go on the
        answer's Info and reach the counters at the next fold(): this is the path of
        blocked names and cache hits under load."""
        state = self.fast_state  # (read directly: a property call a query costs 10%)
        memo: Memo | None = state[S_MEMO]  # type: ignore[assignment]
        if memo is None:
            return None
        hit = memo.get(body)
        if hit is None:
            return None  # (before the clock is read: most misses are new names)
        started = perf_counter()
        info = self.slots[hit[2]]
        clock: Callable[[], float] = state[S_CLOCK]  # type: ignore[assignment]
        if info.logged or clock() >= hit[1]:
            return None
        elapsed = perf_counter() - started
        if elapsed < FAST_BOUND:
            info.fast += 1
            info.fast_time += elapsed
        else:  # (a pause): counted one by one, in its own bucket
            self.fast_hits += 1
            info.count(self.stats, PROTO_UDP, elapsed)
        return hit[0]

    def fold(self) -> None:
        """Add the answers the fast path sent since the last call to the counters."""
        stats = self.stats
        counts, times = self.fast_counts, self.fast_times
        hits = 0
        for info in self.fast_infos:
            slot = info.slot
            if counts[slot] > 0:  # answers of the C fast path (see fast_counts)
                info.fast += counts[slot]
                info.fast_time += times[slot]
                counts[slot] = 0
                times[slot] = 0.0
            hits += info.fold(stats)
        self.fast_hits += hits

    @property
    def entries(self) -> int:
        """Answers in the memo, both transports."""
        return len(self.dicts[0]) + len(self.dicts[1])

    @property
    def size(self) -> int:
        """Bytes the memo takes, as its bound counts them."""
        return self.sizes[0] + self.sizes[1]

    def pin(self) -> None:
        """Track the memo's dicts by the garbage collector, for a gc.freeze() right after
        to move them into the permanent generation, which collections never walk (see
        server.settle_memory). Untracked, as an empty dict is, a dict is tracked again by
        each insert of a fresh tuple (the collector untracks tuples of bytes, float and
        int only later), and every full collection would walk its entries: about 3 ms
        per 50,000. Emptying the memo leaves the dicts tracked."""
        for memo in self.dicts:
            memo[b""] = (b"", 0.0, len(memo))  # (built at run time: a constant is untracked)
            del memo[b""]

    def clear(self) -> None:
        """Forget every answer (the fast path's counts are folded in first)."""
        self.fold()
        for memo in self.dicts:
            memo.clear()
        self.sizes[0] = self.sizes[1] = 0
        self.fast_infos.clear()
        for info in self.slots:
            info.slot = -1
        self.slots.clear()  # in place: the fast path holds this list
        self.block_slots.clear()  # (in place too: the policy's view holds it)
        del self.fast_counts[:]
        del self.fast_times[:]

    def remember(
        self, tcp: bool, body: bytes, answer: bytes, until: float, now: float, info: Info
    ) -> None:
        """Keep ``answer`` for queries keyed ``body`` until ``until`` (if after ``now``)."""
        if until <= now:
            return
        slot = info.slot
        if slot < 0:
            slot = self._slot(info)  # (before the sizes: it may empty the memo)
        memo = self.dicts[tcp]
        # A key is never longer than its answer (which repeats its question and OPT), so
        # twice the answer's bytes count for both (and save a len() per entry). (The C
        # loop counts the blocked answers it keeps alike: resolver/_fastudp.c, remember.)
        size = 2 * len(answer) + MEMO_OVERHEAD
        sizes = self.sizes
        used = sizes[tcp] + size
        # Each transport's memo takes half the bytes at most: TCP's large answers never
        # crowd out the UDP fast path's entries.
        if used * 2 > self.max_bytes or len(memo) >= self.max_entries:
            if not self._make_room(memo, tcp, size):
                return
            used = sizes[tcp] + size
        memo[body] = (answer[2:], until, slot)
        sizes[tcp] = used
        if not tcp and not info.logged:
            self.fast_infos[info] = None

    def note_block(self, key: int, info: Info) -> None:
        """Let the C fast path count its blocked answers of kind ``key``
        (blockview.slot_key) in ``info``, which Python has just made for one."""
        if info.logged:
            return  # every one of those is Python's: the audit log sees it
        slot = info.slot
        if slot < 0:
            slot = self._slot(info)
        self.fast_infos[info] = None
        slots = self.block_slots
        if len(slots) >= _BLOCK_SLOTS_MAX:
            slots.clear()  # (kinds are rule sets x types x rcodes: a backstop)
        slots[key] = slot

    def _slot(self, info: Info) -> int:
        """A slot for ``info``, which memo entries then refer to. Slots are not reused:
        when they run out, the memo starts afresh (slots run out only with the audit log
        on, whose Info objects are one per answer)."""
        slots = self.slots
        if len(slots) >= max(_SLOTS_MAX, 4 * self.max_entries):
            self.clear()
        info.slot = len(slots)
        slots.append(info)
        self.fast_counts.append(-1 if info.logged else 0)
        self.fast_times.append(0.0)
        return info.slot

    def forget(self, tcp: bool, body: bytes) -> None:
        """Drop an expired memo entry."""
        value = self.dicts[tcp].pop(body)
        self.sizes[tcp] -= 2 * len(value[0]) + 4 + MEMO_OVERHEAD

    def _make_room(self, memo: Memo, tcp: bool, size: int) -> bool:
        """Whether an entry of ``size`` bytes may join ``memo`` (the ``tcp`` one), after
        evicting its oldest entries, a share at a time, until it is within its entry cap
        and its half of the bytes. Not when the memo is off, nor when making room would
        take more than that share (counted as a rejection)."""
        half = self.max_bytes // 2
        if self.max_entries <= 0 or half <= 0:
            return False
        if size * EVICT_SHARE > half:
            self.rejections += 1  # it would crowd out too many others
            return False
        sizes = self.sizes
        while memo and (len(memo) >= self.max_entries or sizes[tcp] + size > half):
            count = max(1, len(memo) // EVICT_SHARE)
            doomed: list[bytes] = []
            for key in memo:
                doomed.append(key)
                if len(doomed) >= count:
                    break
            freed = 0
            for key in doomed:
                freed += 2 * len(memo.pop(key)[0]) + 4 + MEMO_OVERHEAD
            sizes[tcp] -= freed
            self.evictions += len(doomed)
        return True


#: Header counts of a plain query (QD, AN, NS, AR), without and with OPT.
_PLAIN_COUNTS: Final = (b"\x00\x01\x00\x00\x00\x00\x00\x00", b"\x00\x01\x00\x00\x00\x00\x00\x01")
_U16: Final = struct.Struct("!H")


def memo_key(data: bytes, q: Query) -> bytes:
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
