"""The compiled policy: an immutable snapshot that answers "is this name blocked, now?".

Loading builds a new :class:`Policy` off the hot path; swapping it in is one reference
assignment. :meth:`Policy.decide` is pure: no I/O and no clock of its own, so the same
snapshot answers for any instant a caller (a query, ``explain --at``, a test) asks about.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final
from zoneinfo import ZoneInfo

from ..wire import EDE_BLOCKED, ede_option, opt_record
from ..yamlload import Where
from .timewindow import NEVER, Window

ACTIONS: Final = ("nxdomain", "nodata", "refused", "null", "sinkhole")


@dataclass(frozen=True, slots=True)
class Action:
    """How a blocked name is answered. ``a``/``aaaa`` hold packed addresses for sinkhole."""

    kind: str = "nxdomain"
    a: tuple[bytes, ...] = ()
    aaaa: tuple[bytes, ...] = ()

    def describe(self) -> str:
        if self.kind != "sinkhole":
            return self.kind
        addrs = [str(ipaddress.ip_address(raw)) for raw in (*self.a, *self.aaaa)]
        return "sinkhole to " + ", ".join(addrs)


@dataclass(eq=False, slots=True)
class BlockList:
    """One list file: its identity, its basis, its window and how it answers."""

    id: str
    description: str
    reference: str
    timezone: ZoneInfo
    window: Window
    action: Action
    ttl: int
    where: Where
    rule_count: int = 0


@dataclass(eq=False, slots=True)
class Rule:
    """A domain (and its subdomains) blocked by a list within a window.

    ``start``/``end`` are the list's window intersected with the rule's own. The two OPT
    records carrying the Extended DNS Error are built once here, not per query.
    """

    name: str
    wire: bytes
    blocklist: BlockList
    start: float
    end: float
    reference: str
    where: Where
    opt_plain: bytes = field(default=b"", repr=False)
    opt_do: bytes = field(default=b"", repr=False)

    def state(self, now: float) -> str:
        return Window(self.start, self.end).state(now)


def ede_text(blocklist: BlockList, reference: str) -> str:
    """The EXTRA-TEXT of the Blocked EDE: which list, and on what basis."""
    text = f"blocked by list {blocklist.id}"
    return f"{text}: {reference}" if reference else text


class Policy:
    """All lists, compiled: a map from each blocked name (lower-case wire) to its rules."""

    __slots__ = ("_rules", "digest", "lists", "rule_count")

    def __init__(self, lists: Iterable[BlockList], rules: Iterable[Rule]) -> None:
        self.lists: tuple[BlockList, ...] = tuple(lists)
        table: dict[bytes, list[Rule]] = {}
        opts: dict[tuple[str, str], tuple[bytes, bytes]] = {}
        digest = hashlib.sha256()
        count = 0
        for rule in rules:
            key = (rule.blocklist.id, rule.reference)
            built = opts.get(key)
            if built is None:
                option = ede_option(EDE_BLOCKED, ede_text(rule.blocklist, rule.reference))
                built = (opt_record(False, 0, option), opt_record(True, 0, option))
                opts[key] = built
            rule.opt_plain, rule.opt_do = built
            table.setdefault(rule.wire, []).append(rule)
            digest.update(f"{rule.blocklist.id}\0{rule.name}\0{rule.start}\0{rule.end}\n".encode())
            count += 1
        for blocklist in self.lists:
            digest.update(
                f"{blocklist.id}\0{blocklist.action}\0{blocklist.ttl}\0{blocklist.reference}\n".encode()
            )
        self._rules: dict[bytes, tuple[Rule, ...]] = {k: tuple(v) for k, v in table.items()}
        self.rule_count = count
        #: Content hash: two policies with the same digest answer the same way.
        self.digest = digest.hexdigest()[:16]

    def decide(self, key: bytes, labels: tuple[int, ...], now: float) -> tuple[Rule | None, float]:
        """The rule that blocks ``key`` at ``now`` (or None), and until when that holds.

        ``key`` is a lower-case wire name and ``labels`` its label offsets, so every parent
        domain is a slice: the walk costs one hash lookup per label whatever the list size.
        Labels run from the longest name to the shortest, so the first rule in force is the
        longest match, and among rules for the same name the first in list order.

        The second value is the next instant at which any matching rule starts or stops:
        a forwarded answer must not be cached past it, nor a blocked answer outlive it.
        """
        rules_for = self._rules.get
        best: Rule | None = None
        until = NEVER
        for off in labels:
            rules = rules_for(key[off:] if off else key)
            if rules is None:
                continue
            for rule in rules:
                if now < rule.start:
                    if rule.start < until:
                        until = rule.start
                elif now < rule.end:
                    if rule.end < until:
                        until = rule.end
                    if best is None:
                        best = rule
        return best, until

    def matches(self, key: bytes, labels: tuple[int, ...]) -> list[Rule]:
        """Every rule whose name covers ``key``, whatever its window (for explaining)."""
        found: list[Rule] = []
        for off in labels:
            found.extend(self._rules.get(key[off:] if off else key, ()))
        return found

    def summary(self, now: float) -> str:
        """One line for the log: lists, rules, and which lists are in force now."""
        parts = []
        for blocklist in self.lists:
            state = blocklist.window.state(now)
            parts.append(f"{blocklist.id} ({blocklist.rule_count} rules, {state})")
        listed = "; ".join(parts) if parts else "no lists"
        return f"policy {self.digest}: {len(self.lists)} lists, {self.rule_count} rules: {listed}"


EMPTY_POLICY: Final = Policy((), ())
