"""The RPZ format: Response Policy Zone master files, QNAME triggers only."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from .names import (
    ALLOW,
    EXACT,
    LABEL,
    MAX_TEXT,
    NODATA,
    NXDOMAIN,
    SUBDOMAINS,
    Entry,
    Problem,
    check_name,
    split_lines,
)

# "owner [ttl] [IN] CNAME target" with a relative owner, the one record shape of big feeds.
# The last label must start with a letter: that keeps IP-like names out of the fast path.
_TOP: Final = r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?"
_FAST_CORE: Final = rf"((?:{LABEL}\.)*{_TOP})"
_FAST_RPZ: Final = re.compile(
    rf"(\*\.)?{_FAST_CORE}[ \t]+(?:[0-9]+[ \t]+)?(?:in[ \t]+)?cname[ \t]+"
    r"(\.|\*\.|rpz-passthru\.)[ \t]*(?:;.*)?\r?"
).fullmatch
_FAST_ACTION: Final = {".": NXDOMAIN, "*.": NODATA, "rpz-passthru.": ALLOW}
_TOKEN: Final = re.compile(r'"(?:[^"\\]|\\.)*"?|[()]|;.*|(?:[^\s"();\\]|\\.)+')
_TTL: Final = re.compile(r"[0-9]+|(?:[0-9]+[smhdw])+", re.IGNORECASE)
_CLASSES: Final = frozenset({"in", "ch", "chaos", "hs", "hesiod", "cs", "none", "any"})
_IP_TRIGGERS: Final = {
    "rpz-ip": "response IP address (rpz-ip)",
    "rpz-nsdname": "name server name (rpz-nsdname)",
    "rpz-nsip": "name server IP address (rpz-nsip)",
    "rpz-client-ip": "client IP address (rpz-client-ip)",
}

_Token = tuple[str, int]


@dataclass(slots=True)
class _Zone:
    """What an RPZ file has said so far: the origin for relative names and the apex."""

    origin: str | None = None  # absolute, with trailing dot
    apex: str | None = None  # absolute, with trailing dot; stripped from owners
    apex_from_soa: bool = False
    owner: str | None = None  # the previous record's owner, for blank-owner lines


def parse_rpz(text: str, problems: list[Problem]) -> Iterator[Entry]:
    fast = _FAST_RPZ
    zone = _Zone()
    # The fast path reads a relative owner as the trigger itself, true while origin == apex.
    fast_ok = True
    fast_owner: str | None = None  # owner of the last fast-path record (relative)
    original = split_lines(text)
    pending: list[_Token] = []  # tokens of a record still inside parentheses
    pending_line = 0
    pending_blank = False
    depth = 0
    for number, line in enumerate(text.lower().split("\n"), 1):
        if fast_ok and depth == 0:
            match = fast(line)
            if match is not None and "rpz-" not in match[2] and len(match[2]) <= MAX_TEXT:
                wild = match[1] is not None
                fast_owner = "*." + match[2] if wild else match[2]
                scope = SUBDOMAINS if wild else EXACT
                yield (match[2], scope | _FAST_ACTION[match[3]], number)
                continue
        raw = original[number - 1]
        tokens = [(m[0], m.start() + 1) for m in _TOKEN.finditer(raw)]
        if depth == 0:
            pending_line, pending_blank = number, raw[:1] in (" ", "\t")
        for token in tokens:
            if token[0][0] == ";":
                break
            if token[0] == "(":
                depth += 1
            elif token[0] == ")":
                depth -= 1
            else:
                pending.append(token)
        if depth > 0:
            continue
        if depth < 0:
            problems.append(
                Problem(number, 1, "a ')' closes no '('; check the record's parentheses.")
            )
            depth = 0
            pending = []
            continue
        record, pending = pending, []
        if not record:
            continue
        if fast_owner is not None:
            zone.owner = _absolute(fast_owner, zone.origin)
            fast_owner = None
        entry = _rpz_record(record, pending_line, pending_blank, zone, problems)
        fast_ok = zone.origin == zone.apex
        if entry is not None:
            yield entry
    if depth > 0:
        problems.append(
            Problem(pending_line, 1, "a '(' is never closed; the record is not imported.")
        )


# The owner "@" in a file that never says its origin: the apex of a zone of unknown name.
_UNNAMED_APEX: Final = "@"


def _absolute(token: str, origin: str | None) -> str:
    """An owner or target in absolute form (trailing dot). With no origin known, a relative
    name is taken as absolute, and "@" stays :data:`_UNNAMED_APEX`."""
    name = token.lower()
    if name == "@":
        return _UNNAMED_APEX if origin is None else origin
    if name.endswith("."):
        return name
    if origin is None or origin == ".":
        return name + "."
    return name + "." + origin


def _rpz_record(
    record: list[_Token], number: int, blank: bool, zone: _Zone, problems: list[Problem]
) -> Entry | None:
    """Interpret one logical record (or directive) of an RPZ file."""
    first, column = record[0]
    if not blank and first.startswith("$"):
        _rpz_directive(record, number, zone, problems)
        return None
    if blank:
        if zone.owner is None:
            problems.append(
                Problem(number, 1, "the record has no owner name and none precedes it.")
            )
            return None
        owner, rest = zone.owner, record
    else:
        owner, rest = _absolute(first, zone.origin), record[1:]
        zone.owner = owner
    while rest and (_TTL.fullmatch(rest[0][0]) or rest[0][0].lower() in _CLASSES):
        if rest[0][0].lower() in _CLASSES and rest[0][0].lower() != "in":
            problems.append(
                Problem(
                    number,
                    rest[0][1],
                    f"the class {rest[0][0]} is not supported; RPZ records are class IN.",
                )
            )
            return None
        rest = rest[1:]
    if not rest:
        problems.append(Problem(number, column, "the record has no type; fix the line."))
        return None
    rtype, type_column = rest[0][0].upper(), rest[0][1]
    rdata = rest[1:]
    at_apex = owner == _UNNAMED_APEX or owner == zone.apex
    if rtype == "SOA":
        if owner != _UNNAMED_APEX and not zone.apex_from_soa:
            # The SOA names the zone: its owner is the suffix stripped from every trigger.
            zone.apex, zone.apex_from_soa = owner, True
            if zone.origin is None:
                zone.origin = owner
            return None
        if at_apex:
            return None
        problems.append(
            Problem(number, type_column, "a second SOA record is not supported; remove it.")
        )
        return None
    if at_apex:
        if rtype == "NS":
            return None
        problems.append(
            Problem(
                number,
                type_column,
                f"the {rtype} record at the zone apex is not a policy rule; remove it "
                "(only SOA and NS belong there).",
            )
        )
        return None
    trigger_or_problem = _trigger(owner, zone.apex)
    if isinstance(trigger_or_problem, str):
        problems.append(Problem(number, column, trigger_or_problem))
        return None
    name, scope = trigger_or_problem
    action = _rpz_action(rtype, rdata, name, scope, zone.origin)
    if isinstance(action, str):
        # A refused target is shown at the target; refused local data at its type.
        column = rdata[0][1] if rtype == "CNAME" and rdata else type_column
        problems.append(Problem(number, column, action))
        return None
    return (name, scope | action, number)


def _rpz_directive(record: list[_Token], number: int, zone: _Zone, problems: list[Problem]) -> None:
    directive, column = record[0][0].upper(), record[0][1]
    args = [token for token, _ in record[1:]]
    if directive == "$ORIGIN" and len(args) == 1:
        zone.origin = _absolute(args[0], zone.origin)
        if zone.apex is None:
            # Until an SOA says otherwise, the first origin is taken as the zone's name.
            zone.apex = zone.origin
        return
    if directive == "$TTL" and len(args) == 1 and _TTL.fullmatch(args[0]):
        return  # TTLs of policy records do not matter: the list's own ttl is used
    if directive in ("$ORIGIN", "$TTL"):
        message = f"{directive} takes one {'name' if directive == '$ORIGIN' else 'TTL'}."
    elif directive == "$INCLUDE":
        message = (
            "$INCLUDE is not supported; import the other file as a list of its own or copy "
            "its records into this one."
        )
    elif directive == "$GENERATE":
        message = "$GENERATE is not supported; write the generated records out."
    else:
        message = f"the directive {directive} is unknown; remove it."
    problems.append(Problem(number, column, message))


def _trigger(owner: str, apex: str | None) -> tuple[str, int] | str:
    """The trigger name and scope of an owner name, or why there is none."""
    if apex is None or apex == ".":
        relative = owner[:-1]
    elif owner.endswith("." + apex):
        relative = owner[: -len(apex) - 1]
    else:
        return f"the owner {owner} is outside the zone {apex}; remove the record."
    last = relative.rpartition(".")[2]
    if last in _IP_TRIGGERS:
        return (
            f"{_IP_TRIGGERS[last]} triggers are not supported, only QNAME triggers (names); "
            "remove the record."
        )
    scope = EXACT
    if relative.startswith("*."):
        scope, relative = SUBDOMAINS, relative[2:]
    elif relative == "*":
        return (
            "a wildcard at the zone apex would match every name; it is not supported, "
            "so the record is not imported."
        )
    if "*" in relative:
        return (
            f"the wildcard in {owner} is not supported; only a leading '*.' label is; "
            "remove the record."
        )
    try:
        return (check_name(relative), scope)
    except ValueError as exc:
        return f"{exc}; fix or remove the record."


def _rpz_action(
    rtype: str, rdata: list[_Token], name: str, scope: int, origin: str | None
) -> int | str:
    """The flags for a policy record's action, or why it is not supported."""
    if rtype != "CNAME":
        return (
            f"{rtype} records are local data (they answer with records of their own), which is "
            "not supported; use CNAME . (NXDOMAIN), CNAME *. (NODATA) or CNAME rpz-passthru."
        )
    if len(rdata) != 1:
        return "a CNAME record takes exactly one target name; fix the line."
    target = _absolute(rdata[0][0], origin)
    if target == ".":
        return NXDOMAIN
    if target == "*.":
        return NODATA
    if target == "rpz-passthru.":
        return ALLOW
    if scope == EXACT and target == name + ".":
        return ALLOW  # the older, deprecated PASSTHRU form: a CNAME to the name itself
    if target in ("rpz-drop.", "rpz-tcp-only."):
        return (
            f"the {target[:-1]} action is not supported; use CNAME . (NXDOMAIN) or "
            "CNAME *. (NODATA)."
        )
    return (
        f"a CNAME to {target} is local data (it rewrites the answer), which is not supported; "
        "use CNAME . (NXDOMAIN), CNAME *. (NODATA) or CNAME rpz-passthru."
    )
