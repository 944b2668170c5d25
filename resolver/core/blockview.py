"""The policy as the C loop reads it to answer blocked names itself (resolver/_fastblock.c).

A name the answer memo does not hold yet goes to the pipeline: parse, policy, blocked
answer, accounting; some 28,000 instructions in the compiled build (bench/instructions.py,
``distinct``), where a memo hit takes under 2,000. Distinct blocked names (a client trying
``<random>.deepseek.com``, or a list's many names each asked once) are that path. So the C
loop decides them too: it looks the name up in the policy's own name table (its arrays, as
they are: the hash is the interpreter's), weighs the rule sets found as Policy.decide does,
and assembles the answer as sinkhole.blocked_answer does, from the parts this view holds.

The view exists only for a policy the C loop can decide alone: no patterns (regular
expressions and wildcards are matched in Python), no client groups. The C loop leaves to
Python whatever it is not sure of (see _fastblock.c), and counts what it answers in the
Info that Python made for the first answer of the same kind (rule set, type, rcode): the
memo's ``block_slots`` map that kind to the Info's slot, which Python fills as it answers
(AnswerMemo.note_block). So the counters and the latency histogram stay whole, and an
answer the audit log must see is never made in C (its Info has no slot there). What it
answers it keeps in the memo, as the pipeline would, evicting the oldest entries as
AnswerMemo does when the memo is full (resolver/_fastudp.c, make_room), so that a repeat
is a memo hit.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Final

from ..policy.formats import ALLOW, EXACT, SUBDOMAINS
from ..policy.model import ALL_CLIENTS, Policy
from .guard import EVERYONE, Guard
from .memo import EVICT_SHARE, MEMO_OVERHEAD, AnswerMemo
from .outcome import BLOCKED
from .sinkhole import soa_prefix

if TYPE_CHECKING:
    from .account import AuditSink

#: The kinds of answer, as _fastblock.c numbers them (any other: NODATA, as in Python).
KINDS: Final = {"nxdomain": 0, "nodata": 1, "refused": 2, "null": 3, "sinkhole": 4}

#: (table hashes 'Q', table values 'I', label depths as 32 bytes little-endian, windows
#: 'd' (t0, t1, t2 a rule set), flags 'q' (flags, applies to "all" a rule set), multi
#: (rule set indices a multi value), answers (kind, TTL, SOA RDATA less its minimum, A
#: addresses, AAAA addresses, OPT, OPT with DO a rule set), block slots, (EXACT,
#: SUBDOMAINS, ALLOW, a memo entry's overhead, the memo's eviction share), the memo's sizes).
View = tuple[
    "array[int]",
    "array[int]",
    bytes,
    "array[float]",
    "array[int]",
    tuple[tuple[int, ...], ...],
    tuple[tuple[int, int, bytes, bytes, bytes, bytes, bytes], ...],
    dict[int, int],
    tuple[int, int, int, int, int],
    list[int],
]


def fast_path(
    memo: AnswerMemo, policy: Policy, guard: Guard | None, audit: AuditSink | None
) -> None:
    """Set what the listeners' fast path may answer: the memo hit of a query that needs
    nothing but the access list (AnswerMemo.fast_memo), so only with no rate limit and no
    client groups; and then, unless the audit log wants them (each must go through
    Python to it), blocked names not in the memo, decided in C (this module's view)."""
    plain = not policy.uses_groups and (guard is None or not guard.rate)
    memo.fast_memo = memo.dicts[False] if plain else None
    memo.fast_clients = EVERYONE if guard is None else guard.allowed
    logged = audit is not None and audit.wants(BLOCKED)
    memo.fast_blocks = build(policy, memo) if plain and not logged else None


def build(policy: Policy, memo: AnswerMemo) -> View | None:
    """The view of ``policy`` (None when the C loop cannot decide its names alone); it
    shares ``memo``'s ``block_slots`` and ``sizes``: the C loop keeps its answers in the
    memo within AnswerMemo.remember's bounds, so that their repeats are memo hits."""
    if policy.patterns or policy.uses_groups:
        return None
    index: dict[int, int] = {}
    windows: array[float] = array("d")
    flags: array[int] = array("q")
    answers: list[tuple[int, int, bytes, bytes, bytes, bytes, bytes]] = []
    for position, rs in enumerate(policy.rulesets):
        if rs.index != position:
            return None  # (the table's values are these positions: never otherwise)
        index[id(rs)] = position
        windows.extend((rs.t0, rs.t1, rs.t2))
        flags.extend((rs.flags, 1 if rs.mask & ALL_CLIENTS else 0))
        action = rs.action
        answers.append(
            (
                KINDS.get(action.kind, 1),
                rs.blocklist.ttl,
                soa_prefix(rs.blocklist.id),
                b"".join(action.a),
                b"".join(action.aaaa),
                rs.opt_plain,
                rs.opt_do,
            )
        )
    multi = tuple(tuple(index[id(rs)] for rs in sets) for sets in policy.multi)
    keys, values = policy.table.arrays()
    depths = policy.table.depths.to_bytes(32, "little")
    return (
        keys,
        values,
        depths,
        windows,
        flags,
        multi,
        tuple(answers),
        memo.block_slots,
        (EXACT, SUBDOMAINS, ALLOW, MEMO_OVERHEAD, EVICT_SHARE),
        memo.sizes,
    )


def slot_key(index: int, qtype: int, rcode: int) -> int:
    """The key of ``block_slots`` for an answer of rule set ``index``, type and rcode."""
    return index << 20 | qtype << 4 | rcode
