"""The compiled policy: an immutable snapshot that answers "is this name blocked, now?".

Loading builds a new :class:`Policy` off the hot path; swapping it in is one reference
assignment. :meth:`Policy.decide` is pure: no I/O and no clock of its own, so the same
snapshot answers for any instant a caller (a query, ``explain --at``, a test) asks about.

Names live in a :class:`NameTable` (about 24 bytes per name). Each name maps to one or more
:class:`RuleSet` records: what the rules that share a list, a kind, an action, a window and
a reference have in common. A million imported names thus share a handful of rule sets.
"""

from __future__ import annotations

import hashlib
import importlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final
from zoneinfo import ZoneInfo

from ..core.wire import EDE_BLOCKED, ede_option, opt_record
from ..yamlload import Where

# What a rule set covers and does: the bit flags the import formats produce.
from .formats import ALLOW, DOMAIN, EXACT, NODATA, NXDOMAIN, SUBDOMAINS
from .table import NameTable
from .timewindow import ALWAYS, NEVER

__all__ = ["ALLOW", "DOMAIN", "EXACT", "NODATA", "NXDOMAIN", "SUBDOMAINS"]

PENDING: Final = "pending"
MONITOR: Final = "monitor"
ENFORCED: Final = "enforced"
EXPIRED: Final = "expired"

#: The actions a list may name as a word; ``sinkhole`` is written as a mapping (addresses).
PLAIN_ACTIONS: Final = ("nxdomain", "nodata", "refused", "null")
ACTIONS: Final = (*PLAIN_ACTIONS, "sinkhole")
_MULTI: Final = 0x80000000
ALL_CLIENTS: Final = 1  # bit 0: the built-in group "all"


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


@dataclass(frozen=True, slots=True)
class Phases:
    """When rules are watched and when enforced, as instants: monitored from
    ``monitor_from``, enforced from ``enforce_from``, over at ``end`` (exclusive).
    ``monitor_from <= enforce_from <= end`` always holds; an empty phase has equal bounds."""

    monitor_from: float = ALWAYS
    enforce_from: float = ALWAYS
    end: float = NEVER

    def state(self, now: float) -> str:
        if now < self.monitor_from:
            return PENDING
        if now >= self.end:
            return EXPIRED
        if now < self.enforce_from:
            return MONITOR
        return ENFORCED

    def next_change(self, now: float) -> float:
        for instant in (self.monitor_from, self.enforce_from, self.end):
            if now < instant:
                return instant
        return NEVER

    def within(self, other: Phases) -> Phases:
        """These phases cut to a list's: a rule is enforced only when both are."""
        end = min(self.end, other.end)
        enforce = min(max(self.enforce_from, other.enforce_from), end)
        monitor = min(max(self.monitor_from, other.monitor_from), enforce)
        return Phases(monitor, enforce, end)

    def monitor_only(self) -> Phases:
        """These phases in monitor mode: watched over the whole window, never enforced."""
        return Phases(self.monitor_from, self.end, self.end)

    @property
    def closed(self) -> bool:
        """Never monitored nor enforced at any instant."""
        return self.monitor_from >= self.end


@dataclass(eq=False, slots=True)
class BlockList:
    """One list file: its identity, its basis, its phases and how it answers."""

    id: str
    description: str
    reference: str
    timezone: ZoneInfo
    #: In force for rules of this list: ``window`` cut by the mode (monitor never enforces).
    phases: Phases
    mode: str
    action: Action
    ttl: int
    clients: tuple[str, ...]
    mask: int
    where: Where
    rule_count: int = 0
    includes: list[str] = field(default_factory=list)
    #: The list's ``active`` window as written, before its mode applies.
    window: Phases = Phases()


@dataclass(eq=False, slots=True)
class RuleSet:
    """What a group of rules shares. The hot path reads ``t0``/``t1``/``t2`` (the phases
    flattened), ``flags`` and ``mask``; the OPT records with the Blocked EDE are prebuilt."""

    index: int
    blocklist: BlockList
    flags: int
    phases: Phases
    reference: str
    action: Action
    origin: str
    where: Where | None
    t0: float = ALWAYS
    t1: float = ALWAYS
    t2: float = NEVER
    mask: int = ALL_CLIENTS
    opt_plain: bytes = field(default=b"", repr=False)
    opt_do: bytes = field(default=b"", repr=False)

    def state(self, now: float) -> str:
        return self.phases.state(now)

    @property
    def end(self) -> float:
        return self.t2

    @property
    def kind(self) -> str:
        if self.flags & ALLOW:
            return "allow"
        return {EXACT: "exact", SUBDOMAINS: "subdomains", DOMAIN: "domain"}[self.flags & DOMAIN]


@dataclass(frozen=True, slots=True)
class Pattern:
    """A wildcard or regular-expression rule, matched against the whole name."""

    text: str
    regex: re.Pattern[bytes]
    ruleset: RuleSet


@dataclass(frozen=True, slots=True)
class RemoteSpec:
    """A remote list to keep fresh: fetched outside the load path, read from its copy."""

    url: str
    refresh: float
    timeout: float
    max_size: int
    list_id: str


@dataclass(frozen=True, slots=True)
class Match:
    """One rule that covers a name (for explaining): its set, the name it names, the state."""

    ruleset: RuleSet
    name: str
    state: str


class ClientGroups:
    """Named client groups from the config: networks, and client ids (from encrypted
    connections); bit 0 is ``all``, then one bit per group."""

    def __init__(
        self,
        groups: dict[str, Sequence[str]] | None = None,
        ids: dict[str, Sequence[str]] | None = None,
    ) -> None:
        self.bits: dict[str, int] = {"all": ALL_CLIENTS}
        self.networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int]] = []
        #: Client id (lower case) -> the groups that name it, as a bit mask.
        self.ids: dict[str, int] = {}
        names = list(groups or {})
        names += [name for name in ids or {} if name not in names]
        for index, name in enumerate(names):
            bit = 1 << (index + 1)
            self.bits[name] = bit
            for net in (groups or {}).get(name, ()):
                self.networks.append((_unmapped(ipaddress.ip_network(net, strict=False)), bit))
            for client_id in (ids or {}).get(name, ()):
                key = client_id.lower()
                self.ids[key] = self.ids.get(key, 0) | bit
        self._cache: dict[str, int] = {}

    def mask_of_id(self, client_id: str) -> int:
        """The groups that name a client id, as a bit mask (0: none; ids are not case
        sensitive, as the TLS server names they may come from are not)."""
        mask = self.ids.get(client_id)
        if mask is None:
            mask = self.ids.get(client_id.lower(), 0)
        return mask

    def mask_of(self, host: str) -> int:
        """The groups a client address belongs to, as a bit mask (cached per address)."""
        mask = self._cache.get(host)
        if mask is None:
            mask = ALL_CLIENTS
            try:
                addr = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                addr = None
            if addr is not None:
                if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                    addr = addr.ipv4_mapped
                for net, bit in self.networks:
                    if addr.version == net.version and addr in net:
                        mask |= bit
            if len(self._cache) >= 65536:
                self._cache.clear()  # bounded: a scan of many addresses must not grow it
            self._cache[host] = mask
        return mask


def _unmapped(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4-mapped network (``::ffff:127.0.0.3/128``) as the IPv4 network it stands
    for: :meth:`ClientGroups.mask_of` matches mapped clients by their IPv4 address, so the
    mapped form would never match anyone."""
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


def reference_id(reference: str) -> str:
    """A short, stable id of a reference text (the first 8 hex digits of its SHA-256):
    what the EDE carries of it; ``explain`` gives both, so either leads to the other."""
    return hashlib.sha256(reference.encode("utf-8")).hexdigest()[:8]


def ede_text(blocklist: BlockList, reference: str) -> str:
    """The EXTRA-TEXT of the Blocked EDE (RFC 8914): which list, and the id of the
    reference it enforces (``blocked by list deepseek (reference 1a2b3c4d)``). Never the
    reference itself: a legal text and its URL do not fit the few bytes an answer should
    carry, and cut short they would end mid-word or mid-URL. ``explain`` and
    ``/v1/explain`` give the full reference with its id."""
    text = f"blocked by list {blocklist.id}"
    return f"{text} (reference {reference_id(reference)})" if reference else text


def _dotted(key: bytes, labels: tuple[int, ...]) -> bytes:
    """The dotted lower-case form of a wire name, label offsets unchanged.

    A label's length byte becomes the dot before it, so label ``i`` starts at ``labels[i]``
    in both forms. A dot inside a label (legal on the wire) becomes 0xFF so that the
    single label ``deepseek.com`` never reads as two.
    """
    # (The root's key is one byte: its slice is empty. Spelled out, because mypyc's compiled
    # slice of a one-byte bytes from 1 to -1 raises SystemError instead.)
    text = key[1:-1] if len(key) > 1 else b""
    if len(labels) <= 1 and 46 not in text:
        return text
    buf = bytearray(text.replace(b".", b"\xff"))
    for off in labels[1:]:
        buf[off - 1] = 46
    return bytes(buf)


def _native_dotted() -> Callable[[bytes, tuple[int, ...]], bytes]:
    """The C copy of :func:`_dotted` (resolver/_fastudp.c, where it was built), made on
    every query the policy decides: 2,000 to 4,500 instructions fewer a distinct name
    (bench/instructions.py). The Python one without it (no compiler, not Linux)."""
    try:
        native: Callable[[bytes, tuple[int, ...]], bytes] = importlib.import_module(
            "resolver._fastudp"
        ).dotted
    except (ImportError, AttributeError):
        return _dotted
    return native


#: The dotted lower-case form of a wire name, label offsets unchanged (see :func:`_dotted`).
dotted: Final = _native_dotted()


Decision = tuple[RuleSet | None, int, RuleSet | None, float]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
NO_MATCH: Final[Decision] = (None, 0, None, NEVER)


class Policy:
    """All lists, compiled."""

    __slots__ = (
        "digest",
        "files",
        "groups",
        "lists",
        "multi",
        "name_count",
        "networks",
        "patterns",
        "remotes",
        "rulesets",
        "sources",
        "table",
        "uses_groups",
        "warnings",
    )

    def __init__(
        self,
        lists: Iterable[BlockList],
        rulesets: Sequence[RuleSet],
        table: NameTable,
        multi: Sequence[tuple[RuleSet, ...]],
        patterns: Sequence[Pattern] = (),
        groups: ClientGroups | None = None,
        digest: str = "",
        warnings: Sequence[str] = (),
        sources: dict[bytes, list[tuple[int, Where | None]]] | None = None,
        remotes: Sequence[RemoteSpec] = (),
        files: Sequence[str] = (),
        networks: Sequence[tuple[Network, RuleSet]] = (),
    ) -> None:
        self.lists: tuple[BlockList, ...] = tuple(lists)
        self.rulesets = tuple(rulesets)
        self.table = table
        self.multi = tuple(multi)
        self.patterns = tuple(patterns)
        self.groups = groups or ClientGroups()
        self.uses_groups = any(b.mask != ALL_CLIENTS for b in self.lists)
        #: Content hash of every file read: two policies with the same digest answer alike.
        self.digest = digest
        self.warnings = tuple(warnings)
        self.name_count = len(table)
        #: name -> (rule set index, where) for explain/check; only when asked for at load.
        self.sources = sources
        #: Remote lists this policy includes, for the refresher to keep fresh.
        self.remotes = tuple(remotes)
        #: Every local file read (lists and included files), for the reload watcher.
        self.files = tuple(files)
        #: Answer-address rules: an upstream answer with an address inside is blocked.
        self.networks = tuple(networks)
        opts: dict[tuple[str, str], tuple[bytes, bytes]] = {}
        for rs in self.rulesets:
            key = (rs.blocklist.id, rs.reference)
            built = opts.get(key)
            if built is None:
                option = ede_option(EDE_BLOCKED, ede_text(rs.blocklist, rs.reference))
                built = (opt_record(False, 0, option), opt_record(True, 0, option))
                opts[key] = built
            rs.opt_plain, rs.opt_do = built
            rs.t0, rs.t1, rs.t2 = rs.phases.monitor_from, rs.phases.enforce_from, rs.phases.end
            rs.mask = rs.blocklist.mask

    @property
    def rule_count(self) -> int:
        return sum(b.rule_count for b in self.lists)

    def _sets(self, value: int) -> tuple[RuleSet, ...]:
        if value & _MULTI:
            return self.multi[value & ~_MULTI]
        return (self.rulesets[value],)

    def decide(self, key: bytes, labels: tuple[int, ...], mask: int, now: float) -> Decision:
        """What the policy does with ``key`` for a client in groups ``mask`` at ``now``.

        Returns (the rule set that blocks, the label offset of the name it matched (-1 when
        an allow rule decided), a rule set that would block in its monitor phase, the next
        instant at which any of this changes). ``key`` is a lower-case wire name and
        ``labels`` its label offsets.

        Precedence: an allow in force wins over every block; among blocks the longest
        name wins, then list order; exact and domain rules come before patterns.
        """
        text = dotted(key, labels)
        get = self.table.get
        depths = self.table.depths
        block: RuleSet | None = None
        where = 0
        monitor: RuleSet | None = None
        allowed = False
        until = NEVER
        need = EXACT
        depth = len(labels)
        for off in labels:
            # Only names as long as some rule's are looked up.
            value = get(text[off:] if off else text) if depths >> depth & 1 else None
            depth -= 1
            if value is not None:
                for rs in self._sets(value):
                    if not rs.flags & need or not rs.mask & mask:
                        continue
                    if now < rs.t0:
                        if rs.t0 < until:
                            until = rs.t0
                    elif now >= rs.t2:
                        continue
                    elif now < rs.t1:
                        if rs.t1 < until:
                            until = rs.t1
                        if monitor is None and not rs.flags & ALLOW:
                            monitor = rs
                    else:
                        if rs.t2 < until:
                            until = rs.t2
                        if rs.flags & ALLOW:
                            allowed = True
                        elif block is None:
                            block, where = rs, off
            need = SUBDOMAINS
        if self.patterns:
            for pattern in self.patterns:
                rs = pattern.ruleset
                if not rs.mask & mask or now >= rs.t2 or not pattern.regex.search(text):
                    continue
                if now < rs.t0:
                    until = min(until, rs.t0)
                elif now < rs.t1:
                    until = min(until, rs.t1)
                    if monitor is None and not rs.flags & ALLOW:
                        monitor = rs
                else:
                    until = min(until, rs.t2)
                    if rs.flags & ALLOW:
                        allowed = True
                    elif block is None:
                        block, where = rs, 0
        if allowed:
            return None, -1, None, until  # -1: an allow rule decided
        if block is None and monitor is None and until == NEVER:
            return NO_MATCH
        return block, where, monitor, until

    def named(self, key: bytes, labels: tuple[int, ...], rs: RuleSet) -> int:
        """The label offset of the longest name in ``key`` that ``rs`` names (for logs:
        which rule decided); 0 when it was a pattern."""
        text = dotted(key, labels)
        for off in labels:
            value = self.table.get(text[off:] if off else text)
            if value is not None and rs in self._sets(value):
                return off
        return 0

    def match_address(
        self, packed: bytes, mask: int, now: float
    ) -> tuple[RuleSet | None, str, float]:
        """A network rule in force that contains the answer address ``packed``, the
        network as text, and the next change of any network rule that contains it."""
        addr = ipaddress.ip_address(packed)
        until = NEVER
        for net, rs in self.networks:
            if addr.version != net.version or addr not in net or not rs.mask & mask:
                continue
            state = rs.phases.state(now)
            change = rs.phases.next_change(now)
            until = min(until, change)
            if state == ENFORCED:
                return rs, str(net), until
        return None, "", until

    def matches(self, name: str, mask: int, now: float) -> list[Match]:
        """Every rule that names ``name`` or a parent of it, whatever its window or its
        clients, in precedence order (for ``explain``)."""
        text = name.rstrip(".").lower().encode()
        labels = [0] + [i + 1 for i, ch in enumerate(text) if ch == 46]
        found: list[Match] = []
        need = EXACT
        for off in labels:
            suffix = text[off:]
            value = self.table.get(suffix)
            if value is not None:
                for rs in self._sets(value):
                    if rs.flags & need:
                        found.append(Match(rs, suffix.decode(), rs.state(now)))
            need = SUBDOMAINS
        for pattern in self.patterns:
            if pattern.regex.search(text):
                found.append(Match(pattern.ruleset, pattern.text, pattern.ruleset.state(now)))
        return found

    def summary(self, now: float) -> str:
        """One line for the log: lists, rules, and which lists are in force now."""
        parts = []
        for blocklist in self.lists:
            state = blocklist.phases.state(now)
            parts.append(f"{blocklist.id} ({blocklist.rule_count} rules, {state})")
        listed = "; ".join(parts) if parts else "no lists"
        return f"policy {self.digest}: {len(self.lists)} lists, {self.rule_count} rules: {listed}"


EMPTY_POLICY: Final = Policy((), (), NameTable(), ())


def synthetic_ruleset(list_id: str, description: str, reference: str, ttl: int = 60) -> RuleSet:
    """A rule set that no file names, for blocks the resolver decides itself (DNS
    rebinding protection): compiled like the others, with its EDE prebuilt."""
    blocklist = BlockList(
        list_id,
        description,
        reference,
        ZoneInfo("UTC"),
        Phases(),
        "enforce",
        Action(),
        ttl,
        ("all",),
        ALL_CLIENTS,
        Where("(built in)", 1, 1),
        1,
    )
    rs = RuleSet(0, blocklist, DOMAIN, Phases(), reference, Action(), "built in", None)
    Policy([blocklist], [rs], NameTable(), ())  # compiles the rule set's fields
    return rs
