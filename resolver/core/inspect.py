"""Answer inspection: what an answer leads to, checked against the policy.

Every answer that comes from the cache or an upstream, fresh, cached or stale, passes
:func:`behind` in one place (Resolver._serve) before it is served: a name its CNAME or
DNAME chain passes through (an alias must not lead around a ban), an address inside a
list's ``networks``, and a private address for a public name (DNS rebinding protection).
"""

from __future__ import annotations

import ipaddress
from typing import Final

from ..policy.model import ALL_CLIENTS, Policy, RuleSet
from ..policy.timewindow import NEVER
from .cache import Entry
from .wire import Query, Scan, decode_name, label_offsets

#: Every client group, for what all of them share (the cache).
ALL_GROUPS: Final = (1 << 64) - 1


def internal(q: Query, zones: tuple[str, ...]) -> bool:
    """Whether ``q`` asks for a name inside one of the internal ``zones``."""
    text = decode_name(q.key).rstrip(".")
    return any(text == zone or text.endswith("." + zone) for zone in zones)


def inspects(policy: Policy, rebinding: RuleSet | None, entry: Entry) -> bool:
    """Whether ``entry`` holds anything to inspect (most answers do not: one look)."""
    return bool(entry.chain or (entry.addresses and (policy.networks or rebinding is not None)))


def behind(
    policy: Policy,
    rebinding: RuleSet | None,
    zones: tuple[str, ...],
    q: Query,
    entry: Entry,
    mask: int,
    now: float,
) -> tuple[RuleSet | None, str, float]:
    """A rule that blocks what an answer leads to (see the module docstring), the name or
    network it matched, and until when that verdict holds. ``rebinding``: the rule set
    that blocks a private address for a name outside the internal ``zones`` (None: off)."""
    until = NEVER
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
        if rebinding is not None and private(packed) and not internal(q, zones):
            return rebinding, "a private address", until
    return None, "", until


def answer_changes(policy: Policy, scan: Scan, now: float) -> float:
    """The next policy transition, for any client group, of any name the answer passes
    through (CNAME and DNAME owners and targets) or address it holds: the cache entry, and
    so every TTL in it, must not outlive it (the question's own transition is the
    caller's)."""
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


def private(packed: bytes) -> bool:
    """An address a public name must not resolve to (RFC 1918, loopback, link-local,
    unique local, shared address space, unspecified), IPv4-mapped included."""
    addr = ipaddress.ip_address(packed)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in _PRIVATE)
