"""One list file's YAML document, validated key by key, into rule sets in a
:class:`~.builder.Builder`: the list's settings (window, mode, action, ttl, clients), its
names, patterns and networks, and its includes. Every error names file, line and field."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Final

from ..yamlload import SourceError, Where, YMap, check_keys, item_where, value_where
from . import formats, regexcheck
from .builder import Builder, clip
from .includes import add_include
from .model import (
    ALLOW,
    DOMAIN,
    EXACT,
    PLAIN_ACTIONS,
    Action,
    BlockList,
    ClientGroups,
    Pattern,
    Phases,
)
from .timewindow import ALWAYS, NEVER, TimeValueError, parse_instant, zone

LIST_KEYS: Final = frozenset(
    {
        "list",
        "description",
        "reference",
        "timezone",
        "active",
        "mode",
        "action",
        "ttl",
        "clients",
        "domains",
        "exact",
        "patterns",
        "allow",
        "include",
        "networks",
    }
)
RULE_KEYS: Final = frozenset({"name", "active", "reference", "mode"})
PATTERN_KEYS: Final = frozenset({"pattern", "active", "reference", "mode"})
WINDOW_KEYS: Final = frozenset({"monitor_from", "from", "until"})
SINKHOLE_KEYS: Final = frozenset({"a", "aaaa"})
MODES: Final = ("enforce", "monitor")

_LIST_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_WILDCARD_LABEL = re.compile(r"^[a-z0-9_*-]{1,63}$")
DEFAULT_TTL: Final = 60
MAX_TTL: Final = 86400


def normalize_name(text: Any, where: Where | None, field_name: str) -> str:
    """A rule's domain in canonical form, or a :class:`SourceError` saying why not."""
    if not isinstance(text, str):
        raise SourceError(where, field_name, f"expected a domain name, got {text!r}")
    if text.strip().rstrip(".") == "":
        raise SourceError(where, field_name, "the root cannot be blocked")
    try:
        name: str = formats.normalize(text.strip())
        return name
    except ValueError as exc:
        raise SourceError(where, field_name, f"{text!r} is not a domain name: {exc}") from None


def _require_str(doc: YMap, key: str, default: str | None = None) -> str:
    value = doc.get(key, default)
    if value is None:
        raise SourceError(doc.where, key, "required key is missing")
    if not isinstance(value, str):
        raise SourceError(value_where(doc, key), key, f"expected text, got {value!r}")
    return value


def parse_phases(value: Any, where: Where | None, field_name: str, tz: Any) -> Phases:
    """Read an ``active:`` mapping (monitor_from, from, until) into :class:`Phases`."""
    if value is None:
        phases = Phases()
    else:
        if not isinstance(value, YMap):
            raise SourceError(
                where, field_name, "expected a mapping with from / until / monitor_from"
            )
        check_keys(value, WINDOW_KEYS, field_name)
        bounds: dict[str, float] = {}
        for key in ("monitor_from", "from", "until"):
            if key in value:
                try:
                    bounds[key] = parse_instant(value[key], tz)
                except TimeValueError as exc:
                    raise SourceError(
                        value_where(value, key), f"{field_name}.{key}", str(exc)
                    ) from None
        start = bounds.get("from", ALWAYS)
        end = bounds.get("until", NEVER)
        monitor = bounds.get("monitor_from", start)
        if start >= end:
            raise SourceError(
                value_where(value, "until"), f"{field_name}.until", "'until' is not after 'from'"
            )
        if monitor > start:
            raise SourceError(
                value_where(value, "monitor_from"),
                f"{field_name}.monitor_from",
                "'monitor_from' is after 'from': the monitor phase comes before enforcement",
            )
        phases = Phases(monitor, start, end)
    return phases


def parse_action(doc: YMap) -> Action:
    value = doc.get("action", "nxdomain")
    where = value_where(doc, "action")
    if value is None:
        value = "null"  # `action: null` reads as YAML's null: it means the null action
    if isinstance(value, str):
        if value not in PLAIN_ACTIONS:
            raise SourceError(
                where,
                "action",
                f"unknown action {value!r}: use {', '.join(PLAIN_ACTIONS)}, "
                "or {sinkhole: {a: [...], aaaa: [...]}}",
            )
        return Action(value)
    if isinstance(value, YMap) and list(value) == ["sinkhole"]:
        spec = value["sinkhole"]
        if not isinstance(spec, YMap):
            raise SourceError(where, "action.sinkhole", "expected a mapping with a and/or aaaa")
        check_keys(spec, SINKHOLE_KEYS, "action.sinkhole")
        packed: dict[str, tuple[bytes, ...]] = {}
        for key, version in (("a", 4), ("aaaa", 6)):
            addrs = spec.get(key, [])
            if isinstance(addrs, str):
                addrs = [addrs]
            if not isinstance(addrs, list):
                where_addrs = value_where(spec, key)
                raise SourceError(where_addrs, f"action.sinkhole.{key}", "expected a list")
            out = []
            for index, text in enumerate(addrs):
                try:
                    addr = ipaddress.ip_address(str(text))
                except ValueError:
                    addr = None
                if addr is None or addr.version != version:
                    raise SourceError(
                        item_where(addrs, index) or value_where(spec, key),
                        f"action.sinkhole.{key}",
                        f"{text!r} is not an IPv{version} address",
                    )
                out.append(addr.packed)
            packed[key] = tuple(out)
        if not packed["a"] and not packed["aaaa"]:
            raise SourceError(where, "action.sinkhole", "give at least one address in a or aaaa")
        return Action("sinkhole", packed["a"], packed["aaaa"])
    raise SourceError(
        where, "action", "expected an action name or {sinkhole: {a: [...], aaaa: [...]}}"
    )


def _parse_clients(doc: YMap, groups: ClientGroups) -> tuple[tuple[str, ...], int]:
    value = doc.get("clients", ["all"])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise SourceError(value_where(doc, "clients"), "clients", "expected a list of group names")
    mask = 0
    for index, name in enumerate(value):
        bit = groups.bits.get(name) if isinstance(name, str) else None
        if bit is None:
            known = ", ".join(sorted(groups.bits))
            raise SourceError(
                item_where(value, index) or value_where(doc, "clients"),
                f"clients[{index}]",
                f"unknown client group {name!r} (defined in the config: {known})",
            )
        mask |= bit
    return tuple(value), mask


def _items(doc: YMap, key: str) -> list[Any]:
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise SourceError(value_where(doc, key), key, f"expected a list under {key!r}")
    return value


def parse_list(doc: Any, file: Path, builder: Builder) -> BlockList:
    """Validate one list document and add its rules to ``builder``."""
    name = str(file)
    if not isinstance(doc, YMap):
        raise SourceError(Where(name, 1, 1), "", "a list file must be a YAML mapping")
    check_keys(doc, LIST_KEYS, "a list")
    list_id = _require_str(doc, "list")
    if not _LIST_ID.match(list_id):
        raise SourceError(
            value_where(doc, "list"),
            "list",
            f"{list_id!r}: a list id is 1-63 lower-case letters, digits, '-' or '_'",
        )
    tz_name = _require_str(doc, "timezone", "UTC")
    try:
        tz = zone(tz_name)
    except TimeValueError as exc:
        raise SourceError(value_where(doc, "timezone"), "timezone", str(exc)) from None
    mode = _parse_mode(doc, "mode", "enforce")
    ttl = doc.get("ttl", DEFAULT_TTL)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl <= MAX_TTL:
        raise SourceError(value_where(doc, "ttl"), "ttl", f"expected seconds from 0 to {MAX_TTL}")
    clients, mask = _parse_clients(doc, builder.options.groups)
    blocklist = BlockList(
        id=list_id,
        description=_require_str(doc, "description", ""),
        reference=_require_str(doc, "reference", ""),
        timezone=tz,
        phases=Phases(),
        mode=mode,
        action=parse_action(doc),
        ttl=ttl,
        clients=clients,
        mask=mask,
        where=doc.where,
        window=parse_phases(doc.get("active"), value_where(doc, "active"), "active", tz),
    )
    blocklist.phases = blocklist.window.monitor_only() if mode == "monitor" else blocklist.window
    count = 0
    for key, flags in (("domains", DOMAIN), ("exact", EXACT), ("allow", DOMAIN | ALLOW)):
        count += _add_names(doc, key, flags, blocklist, builder, tz)
    count += _add_patterns(doc, blocklist, builder, tz)
    count += _add_networks(doc, blocklist, builder)
    for index, item in enumerate(_items(doc, "include")):
        count += add_include(item, index, doc, file, blocklist, builder)
    blocklist.rule_count = count
    return blocklist


def _parse_mode(doc: YMap, field_name: str, default: str) -> str:
    mode = _require_str(doc, "mode", default)
    if mode not in MODES:
        raise SourceError(
            value_where(doc, "mode"), field_name, f"unknown mode {mode!r}: use enforce or monitor"
        )
    return mode


def _entry_settings(
    item: YMap, field_name: str, blocklist: BlockList, tz: Any
) -> tuple[Phases, str]:
    """A rule's own phases (its window within the list's, then its mode or the list's)
    and its reference."""
    phases = blocklist.window
    if "active" in item:
        own = parse_phases(item["active"], value_where(item, "active"), f"{field_name}.active", tz)
        phases = own.within(blocklist.window)
    if _parse_mode(item, f"{field_name}.mode", blocklist.mode) == "monitor":
        phases = phases.monitor_only()
    reference = _require_str(item, "reference") if "reference" in item else blocklist.reference
    return phases, reference


def _entry(
    items: list[Any],
    index: int,
    doc: YMap,
    section: str,
    main: str,
    keys: frozenset[str],
    blocklist: BlockList,
    tz: Any,
) -> tuple[Any, Where | None, Phases, str, bool]:
    """One item of a rule section: a plain value, or a mapping with its own window,
    reference and mode. Returns (value, where, phases, reference, has its own settings)."""
    item = items[index]
    where = item_where(items, index) or doc.where
    field_name = f"{section}[{index}]"
    if not isinstance(item, YMap):
        return item, where, blocklist.phases, blocklist.reference, False
    check_keys(item, keys, field_name)
    if main not in item:
        raise SourceError(where, f"{field_name}.{main}", "required key is missing")
    phases, reference = _entry_settings(item, field_name, blocklist, tz)
    return item[main], value_where(item, main) or where, phases, reference, True


def _add_names(
    doc: YMap, key: str, flags: int, blocklist: BlockList, builder: Builder, tz: Any
) -> int:
    items = _items(doc, key)
    for index in range(len(items)):
        value, where, phases, reference, own = _entry(
            items, index, doc, key, "name", RULE_KEYS, blocklist, tz
        )
        name = normalize_name(value, where, f"{key}[{index}]")
        rs = builder.ruleset(
            blocklist,
            flags,
            phases,
            reference,
            blocklist.action,
            key,
            where if own else doc.where,
        )
        builder.add(name, rs, where)
    return len(items)


def pattern_regex(text: str) -> re.Pattern[bytes]:
    """Compile a pattern rule: ``/regex/`` as written, searched for in the lower-case name
    without its trailing dot (anchor it with ``^`` and ``$`` to match the whole name), or
    labels where ``*`` stands for any run of characters within one label (``deepseek.*``,
    ``*-ai.example``, ``api.*.deepseek.com``), which match the whole name."""
    if len(text) >= 2 and text.startswith("/") and text.endswith("/"):
        # Python's re backtracks: a pattern that can take exponential (or high polynomial)
        # time on a crafted name would freeze every answer. Such patterns are refused here,
        # by their structure, the same way whatever engine is installed (regexcheck.py).
        regexcheck.check(text[1:-1])
        return re.compile(text[1:-1].encode(), re.IGNORECASE)
    name = text.strip().rstrip(".").lower()
    labels = name.split(".")
    if "*" not in name or not all(_WILDCARD_LABEL.match(label) for label in labels):
        raise ValueError(
            "a pattern is /regex/ or a name whose labels may hold '*' (one label each), "
            "e.g. deepseek.* or api.*.example.com"
        )
    # A '*' stays within one label, which is at most 63 characters long.
    parts = [re.escape(label).replace(r"\*", "[^.]{0,63}") for label in labels]
    return re.compile(("^" + r"\.".join(parts) + "$").encode())


def _add_patterns(doc: YMap, blocklist: BlockList, builder: Builder, tz: Any) -> int:
    items = _items(doc, "patterns")
    for index in range(len(items)):
        text, where, phases, reference, _ = _entry(
            items, index, doc, "patterns", "pattern", PATTERN_KEYS, blocklist, tz
        )
        field_name = f"patterns[{index}]"
        if not isinstance(text, str):
            raise SourceError(where, field_name, f"expected a pattern, got {text!r}")
        try:
            regex = pattern_regex(text)
        except (ValueError, re.error, regexcheck.UnsafePattern) as exc:
            raise SourceError(where, field_name, f"{clip(repr(text), 120)}: {exc}") from None
        rs = builder.ruleset(
            blocklist, EXACT, phases, reference, blocklist.action, "patterns", where
        )
        builder.patterns.append(Pattern(text, regex, rs))
    return len(items)


def _add_networks(doc: YMap, blocklist: BlockList, builder: Builder) -> int:
    """``networks:``: upstream answers with an address inside one are blocked (rpz-ip)."""
    items = _items(doc, "networks")
    for index, item in enumerate(items):
        where = item_where(items, index) or doc.where
        try:
            net = ipaddress.ip_network(str(item), strict=False)
        except ValueError:
            raise SourceError(
                where, f"networks[{index}]", f"{item!r} is not a network (e.g. 203.0.113.0/24)"
            ) from None
        rs = builder.ruleset(
            blocklist,
            EXACT,
            blocklist.phases,
            blocklist.reference,
            blocklist.action,
            "networks",
            where,
        )
        builder.networks.append((net, rs))
    return len(items)
