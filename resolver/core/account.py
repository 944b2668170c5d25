"""Accounting: every answer counted (core/stats.py) and, when the audit log wants it,
logged; and the "would block" matches of monitored lists, counted and logged sparingly.

What an answer is (its decision, list, rule, labels) is computed once per distinct answer
as an :class:`Info` (memo.py), which the memo keeps, so that counting a repeat is a few
increments.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Callable
from time import perf_counter
from typing import Final, Protocol

import dns.rdatatype

from ..policy.model import RuleSet
from .memo import INFOS_MAX, Info
from .stats import BUCKETS, PROTOS, Stats
from .wire import Query, decode_name

log = logging.getLogger("resolver.chain")

#: Lists whose "would block" log lines are spaced out (a backstop; lists are few).
_MONITOR_LINES_MAX: Final = 10_000
#: (list, group mask) pairs counted apart (Stats.would_block_groups); beyond, mask 0.
WOULD_BLOCK_GROUPS_MAX: Final = 4096


class AuditSink(Protocol):
    """What the query path needs of an audit log (observe/querylog.AuditLog, or a
    worker's relay): declared here, where it is used, so that the core imports no log."""

    @property
    def dropped(self) -> int: ...

    def wants(self, decision: str) -> bool: ...

    #: (when, client, proto, qname, qtype, rcode, decision, list_id, rule, reference,
    #: upstream, duration, client_id): see :meth:`AuditLog.record`.
    @property
    def record(self) -> Callable[..., None]: ...

    def start(self) -> None: ...

    def close(self, timeout: float = 5.0) -> None: ...


class Accounts:
    """The counters and the audit log, as the pipeline's stages feed them."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        #: The audit log, when one is configured (its writer runs in its own thread).
        self.audit: AuditSink | None = None
        #: Info objects shared by answers alike when the audit log does not want them.
        self._infos: dict[tuple[object, ...], Info] = {}
        #: Seconds between two "would block" log lines for one list (the matches in
        #: between are counted in the next line; the audit log has every one).
        self.monitor_log_interval = 10.0
        # list id -> (time of its last "would block" line, matches not logged since)
        self._monitor_lines: dict[str, tuple[float, int]] = {}

    def forget(self) -> None:
        """Drop the shared Info objects (they hold the old policy's rule sets)."""
        self._infos.clear()

    def account(self, info: Info, proto: int, client: str, started: float, client_id: str) -> None:
        """Count one answer that came over ``proto`` (stats.PROTOS) and, when the audit log
        wants it, log it. (Info.count, inlined: this runs for every answer through handle,
        memo hits included.)"""
        elapsed = perf_counter() - started
        answers = self.stats.answers
        key = info.keys[proto]
        answers[key] = answers.get(key, 0) + 1
        hist = info.hist  # (Histogram.observe, inlined: one call less for every answer)
        hist.counts[bisect_left(BUCKETS, elapsed)] += 1
        hist.total += elapsed
        if info.from_cache:
            self.stats.cache_hits += 1
        if info.per_list is not None:
            info.per_list[info.list_id] += 1
        if info.logged and self.audit is not None:
            self.audit.record(
                time.time(),
                client,
                PROTOS[proto],
                info.qname,
                qtype_text(info.qtype),
                info.rcode,
                info.decision,
                info.list_id or None,
                info.rule,
                info.reference,
                info.upstream,
                elapsed,
                client_id or None,
            )

    def log_would_block(self, q: Query, client: str, rule: RuleSet) -> None:
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

    def info(
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
            self.stats,
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
            if len(self._infos) >= INFOS_MAX:
                self._infos.clear()
            self._infos[shared] = info
        return info

    def count_would_block(self, rs: RuleSet, mask: int = 1) -> None:
        """Count a would-block match when it is decided, before the cache or the upstream:
        whatever the upstream then does (a timeout, SERVFAIL), the monitor phase's count
        is complete. Its audit entry is written with the answer, which keeps the decision
        "monitored" whatever the upstream did (see Resolver._failed)."""
        list_id = rs.blocklist.id
        self.stats.would_block[list_id] += 1
        # Per client group too (the groups as a mask, named when read): bounded by the
        # lists and the group combinations seen, with a backstop.
        groups = self.stats.would_block_groups
        key = (list_id, mask)
        if key not in groups and len(groups) >= WOULD_BLOCK_GROUPS_MAX:
            key = (list_id, 0)
        groups[key] += 1


def qtype_text(qtype: int) -> str:
    """A query type as dig writes it (A, AAAA, TYPE666)."""
    return str(dns.rdatatype.to_text(dns.rdatatype.RdataType.make(qtype)))
