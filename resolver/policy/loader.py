"""Load list files (one YAML file per list) into a compiled :class:`Policy`.

Everything is validated before anything is used: an unknown key, a bad date, a name that is
no domain, all stop the load with ``file:line:column: field: message``, so that a caller can
keep serving its last good policy.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Final

from ..wire import encode_name
from ..yamlload import SourceError, Where, YMap, check_keys, item_where, load_file, value_where
from .model import ACTIONS, Action, BlockList, Policy, Rule
from .timewindow import TimeValueError, Window, parse_instant, zone

LIST_KEYS: Final = frozenset(
    {"list", "description", "reference", "timezone", "active", "action", "ttl", "domains"}
)
RULE_KEYS: Final = frozenset({"name", "active", "reference"})
WINDOW_KEYS: Final = frozenset({"from", "until"})
SINKHOLE_KEYS: Final = frozenset({"a", "aaaa"})

_LIST_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?$")
DEFAULT_TTL: Final = 60
MAX_TTL: Final = 86400


def list_files(path: Path) -> list[Path]:
    """The list files under ``path`` (a file or a directory, searched recursively), sorted.

    Hidden entries are skipped: a Kubernetes ConfigMap volume holds each file twice, once
    behind a ``..data`` symlink, and editors leave dot-files behind.
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SourceError(Where(str(path), 1, 1), "blocklists", "no such file or directory")
    found = []
    for candidate in sorted(path.rglob("*")):
        rel = candidate.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
            found.append(candidate)
    return found


def load_policy(path: Path) -> Policy:
    """Read and compile every list under ``path``; raise :class:`SourceError` on the first
    error."""
    lists: list[BlockList] = []
    rules: list[Rule] = []
    seen: dict[str, Where] = {}
    for file in list_files(path):
        doc = load_file(file)
        if doc is None:
            continue  # an empty file is no list (an editor's new file, a commented-out list)
        blocklist, list_rules = parse_list(doc, str(file))
        if blocklist.id in seen:
            raise SourceError(
                blocklist.where,
                "list",
                f"list id {blocklist.id!r} is already used by {seen[blocklist.id]}",
            )
        seen[blocklist.id] = blocklist.where
        lists.append(blocklist)
        rules.extend(list_rules)
    return Policy(lists, rules)


def _require_str(doc: YMap, key: str, default: str | None = None) -> str:
    value = doc.get(key, default)
    if value is None:
        raise SourceError(doc.where, key, "required key is missing")
    if not isinstance(value, str):
        raise SourceError(value_where(doc, key), key, f"expected text, got {value!r}")
    return value


def parse_window(value: Any, where: Where | None, field: str, tz: Any) -> Window:
    """Read an ``active:`` mapping into a :class:`Window`."""
    if value is None:
        return Window()
    if not isinstance(value, YMap):
        raise SourceError(where, field, "expected a mapping with 'from' and/or 'until'")
    check_keys(value, WINDOW_KEYS, field)
    window = Window()
    bounds: dict[str, float] = {}
    for key in ("from", "until"):
        if key in value:
            try:
                bounds[key] = parse_instant(value[key], tz)
            except TimeValueError as exc:
                raise SourceError(value_where(value, key), f"{field}.{key}", str(exc)) from None
    window = Window(bounds.get("from", window.start), bounds.get("until", window.end))
    if window.empty:
        raise SourceError(
            value_where(value, "until"), f"{field}.until", "'until' is not after 'from'"
        )
    return window


def parse_action(doc: YMap) -> Action:
    value = doc.get("action", "nxdomain")
    where = value_where(doc, "action")
    if isinstance(value, str):
        if value not in ACTIONS or value == "sinkhole":
            raise SourceError(
                where,
                "action",
                f"unknown action {value!r}: use nxdomain, nodata, refused, null, "
                "or {sinkhole: {a: [...], aaaa: [...]}}",
            )
        return Action(value)
    if (
        isinstance(value, YMap)
        and list(value) == ["sinkhole"]
        and isinstance(value["sinkhole"], YMap)
    ):
        spec = value["sinkhole"]
        check_keys(spec, SINKHOLE_KEYS, "action.sinkhole")
        packed: dict[str, tuple[bytes, ...]] = {}
        for key, version in (("a", 4), ("aaaa", 6)):
            addrs = spec.get(key, [])
            if isinstance(addrs, str):
                addrs = [addrs]
            if not isinstance(addrs, list):
                raise SourceError(
                    value_where(spec, key), f"action.sinkhole.{key}", "expected a list"
                )
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


def domain_wire(text: Any, where: Where | None, field: str) -> tuple[str, bytes]:
    """Normalise a domain (case, trailing dot, IDNA) to (presentation form, wire form)."""
    if not isinstance(text, str) or not text.strip():
        raise SourceError(where, field, f"expected a domain name, got {text!r}")
    name = text.strip().rstrip(".").lower()
    if not name:
        raise SourceError(where, field, "the root cannot be blocked")
    try:
        name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        raise SourceError(where, field, f"{text!r} is not a valid internationalised name") from None
    for label in name.split("."):
        if not _LABEL.match(label) or len(label) > 63:
            raise SourceError(
                where,
                field,
                f"{text!r} is not a domain name (label {label!r}: letters, digits, '-' and '_', "
                "1 to 63 characters)",
            )
    try:
        return name, encode_name(name)
    except ValueError as exc:
        raise SourceError(where, field, str(exc)) from None


def parse_list(doc: Any, file: str) -> tuple[BlockList, list[Rule]]:
    """Validate one list document and build its :class:`BlockList` and rules."""
    if not isinstance(doc, YMap):
        raise SourceError(Where(file, 1, 1), "", "a list file must be a YAML mapping")
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
    ttl = doc.get("ttl", DEFAULT_TTL)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl <= MAX_TTL:
        raise SourceError(value_where(doc, "ttl"), "ttl", f"expected seconds from 0 to {MAX_TTL}")
    blocklist = BlockList(
        id=list_id,
        description=_require_str(doc, "description", ""),
        reference=_require_str(doc, "reference", ""),
        timezone=tz,
        window=parse_window(doc.get("active"), value_where(doc, "active"), "active", tz),
        action=parse_action(doc),
        ttl=ttl,
        where=doc.where,
    )
    domains = doc.get("domains", [])
    if domains is None:
        domains = []
    if not isinstance(domains, list):
        raise SourceError(value_where(doc, "domains"), "domains", "expected a list of domains")
    rules: list[Rule] = []
    for index, item in enumerate(domains):
        where = item_where(domains, index) or doc.where
        field = f"domains[{index}]"
        window = blocklist.window
        reference = blocklist.reference
        if isinstance(item, YMap):
            check_keys(item, RULE_KEYS, field)
            name_value = item.get("name")
            where = value_where(item, "name") or where
            own = parse_window(
                item.get("active"), value_where(item, "active"), f"{field}.active", tz
            )
            window = window.intersect(own)
            if "reference" in item:
                reference = _require_str(item, "reference")
        else:
            name_value = item
        name, wire = domain_wire(name_value, where, field)
        rules.append(Rule(name, wire, blocklist, window.start, window.end, reference, where))
    blocklist.rule_count = len(rules)
    return blocklist, rules
