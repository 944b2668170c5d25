"""What became of a query: the one list of decisions.

Metrics label answers with it (``resolver_answers_total{decision=...}`` and the latency
histograms), the audit log writes it, ``explain`` answers with the part of it the policy
alone decides (:data:`POLICY_OUTCOMES`), and the admin API's OpenAPI description lists that
part (a test holds the two equal). A new outcome is one line here.

A ``StrEnum``: each member is its label, so counters keyed by it and the audit log's JSON
read as before. The module-level names are what the query path uses (a compiled module
reads them as constants, where ``Outcome.BLOCKED`` would be an attribute lookup).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class Outcome(StrEnum):
    """The decision an answer stands for."""

    #: Answered locally: a list blocks the name (or what its answer leads to).
    BLOCKED = "blocked"
    #: Would be blocked, once enforced (monitor mode or phase): answered as usual.
    MONITORED = "monitored"
    #: An allow rule matched: forwarded or answered from the cache whatever blocks it.
    ALLOWED = "allowed"
    #: Answered from the cache (or the memo of a cache hit).
    CACHED = "cached"
    #: Answered by an upstream.
    FORWARDED = "forwarded"
    #: Refused by the access list.
    REFUSED = "refused"
    #: An error answer: malformed, unsupported, overloaded or no upstream answer.
    ERROR = "error"
    #: Answered by the resolver about itself, never forwarded: ``resolver.arpa`` (DDR).
    LOCAL = "local"


BLOCKED: Final[str] = Outcome.BLOCKED.value
MONITORED: Final[str] = Outcome.MONITORED.value
ALLOWED: Final[str] = Outcome.ALLOWED.value
CACHED: Final[str] = Outcome.CACHED.value
FORWARDED: Final[str] = Outcome.FORWARDED.value
REFUSED: Final[str] = Outcome.REFUSED.value
ERROR: Final[str] = Outcome.ERROR.value
LOCAL: Final[str] = Outcome.LOCAL.value

#: Every label, in declaration order (metrics, the audit log's ``log: all``).
DECISIONS: Final[tuple[str, ...]] = tuple(o.value for o in Outcome)
#: What the policy alone decides, before any cache or upstream: what ``explain`` returns.
POLICY_OUTCOMES: Final[tuple[str, ...]] = (
    BLOCKED,
    MONITORED,
    ALLOWED,
    FORWARDED,
)
#: What ``log: blocked`` keeps: queries the policy stopped, and those it would have stopped.
BLOCKED_OUTCOMES: Final = frozenset({BLOCKED, MONITORED})
