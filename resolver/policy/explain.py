"""Explaining the policy: what it does with a name, for a client, at an instant, and why.

One function builds the explanation as data; ``resolver explain`` prints it and the admin
API's ``/v1/explain`` returns it as JSON, so the two can never disagree.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import dns.message
import dns.rcode
import dns.rdatatype

from ..core.outcome import ALLOWED, BLOCKED, FORWARDED, MONITORED
from ..core.sinkhole import blocked_answer
from ..core.wire import encode_name, label_offsets, parse_query
from ..yamlload import SourceError, did_you_mean
from .builder import LoadOptions
from .formats import normalize
from .loader import load_policy
from .model import Policy, RuleSet, reference_id
from .timewindow import NEVER, format_instant

_AT_FORMS: Final = (
    "write a date (2025-02-26) or a date and time (2025-02-26T00:30), then optionally a "
    "time zone (2025-02-26T00:30 Europe/Brussels) or an offset (2025-02-26T00:30+01:00); "
    "without either it is UTC"
)
_OFFSET: Final = re.compile(r"^[+-]\d{2}:?\d{2}$")


@dataclass(frozen=True, slots=True)
class Moment:
    """An instant given to explain, with the time zone it was given in (to show it there)."""

    instant: float
    tz: tzinfo
    #: The zone as the explanation names it: an IANA name, an offset, or UTC.
    zone: str

    def shown(self, instant: float | None = None) -> str:
        """``instant`` (default this one) in this zone, ISO 8601 with the offset."""
        when = self.instant if instant is None else instant
        return datetime.fromtimestamp(when, self.tz).isoformat(timespec="seconds")


def parse_moment(text: str | None, now: float | None = None) -> Moment:
    """``--at`` (and ``/v1/explain?at=``): a date (midnight) or an ISO date and time, then
    optionally a time zone name or an offset, either after a space
    (``2025-02-26T00:30 Europe/Brussels``) or, for an offset, written on
    (``2025-02-26T00:30+01:00``); UTC without either. ``now`` (default the clock) when
    ``text`` is empty. Raise ValueError with a sentence that says what to write."""
    if not text or not text.strip():
        return Moment(time.time() if now is None else now, UTC, "UTC")
    words = text.split()
    zone_text = words.pop() if len(words) > 1 and not _is_time(words[-1]) else None
    given = " ".join(words).replace("z", "Z")
    try:
        moment = datetime.fromisoformat(given)
    except ValueError:
        raise ValueError(f"--at {text.strip()!r} is not a date and time: {_AT_FORMS}") from None
    if zone_text is not None and moment.tzinfo is not None:
        raise ValueError(
            f"--at {text.strip()!r} gives both an offset and a time zone: give one of them"
        )
    if zone_text is not None:
        tz, zone = _zone(zone_text)
        moment = moment.replace(tzinfo=tz)
    elif moment.tzinfo is not None:
        tz = moment.tzinfo
        zone = _offset_text(moment.utcoffset() or timedelta(0))
    else:
        tz, zone = UTC, "UTC"
        moment = moment.replace(tzinfo=UTC)
    return Moment(moment.timestamp(), tz, zone)


def _is_time(word: str) -> bool:
    """Whether ``word`` is the time part of ``2025-02-26 00:30`` rather than a zone."""
    return word[:1].isdigit() and ":" in word and not _OFFSET.match(word)


def _zone(text: str) -> tuple[tzinfo, str]:
    """A time zone given by IANA name (Europe/Brussels), UTC/Z, or offset (+01:00)."""
    if text.upper() in ("UTC", "Z"):
        return UTC, "UTC"
    if _OFFSET.match(text):
        digits = text[1:].replace(":", "")
        offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        if offset >= timedelta(hours=24):
            raise ValueError(f"--at: the offset {text} is out of range (-23:59 to +23:59)")
        offset = -offset if text[0] == "-" else offset
        return timezone(offset), _offset_text(offset)
    try:
        return ZoneInfo(text), text
    except (ZoneInfoNotFoundError, ValueError):
        hint = did_you_mean(text, available_timezones())
        raise ValueError(
            f"--at: {text!r} is not a time zone; {hint}write an IANA name such as "
            "Europe/Brussels or an offset such as +01:00"
        ) from None


def _offset_text(offset: timedelta) -> str:
    """``+01:00`` for an offset of an hour, ``UTC`` for none."""
    if not offset:
        return "UTC"
    minutes = int(abs(offset).total_seconds()) // 60
    return f"{'-' if offset < timedelta(0) else '+'}{minutes // 60:02d}:{minutes % 60:02d}"


def _window(rs: RuleSet) -> dict[str, str | None]:
    tz = rs.blocklist.timezone
    phases = rs.phases

    def when(instant: float) -> str | None:
        return None if instant in (NEVER, -NEVER) else format_instant(instant, tz)

    return {
        "monitor_from": when(phases.monitor_from)
        if phases.monitor_from < phases.enforce_from
        else None,
        "from": when(phases.enforce_from) if phases.enforce_from < phases.end else None,
        "until": when(phases.end),
    }


_CLIENT_ID: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def explain(
    policy: Policy,
    name: str,
    client: str,
    rdtype: str,
    now: float,
    moment: Moment | None = None,
    reread: LoadOptions | None = None,
    client_id: str = "",
) -> dict[str, Any]:
    """The decision for ``name`` asked by ``client`` (with ``client_id``, from an encrypted
    connection, if any) with type ``rdtype`` at ``now``, and every rule that names it;
    ``at`` is shown in the zone of ``moment`` when given (the ``--at`` it was parsed from),
    else in UTC, and ``zone`` names that zone. Raises ValueError for a bad name, address,
    client id or type.

    A rule's ``source`` is the line that names it. A policy loaded to serve keeps no line
    per name (that costs memory per name); given ``reread`` (the options it was loaded
    with), the list files of the rules found are read again for their lines, as
    ``resolver explain`` reads them, so that both name the same line."""
    name = normalize(name)
    qtype = dns.rdatatype.from_text(rdtype)
    out, mask = _who(policy, client, client_id)
    wire = encode_name(name)
    rule, apex, monitored, until = policy.decide(wire, label_offsets(wire), mask, now)
    out = {"name": name, "type": dns.rdatatype.to_text(qtype), **out}
    out["at"] = moment.shown() if moment is not None else format_instant(now)
    out["zone"] = moment.zone if moment is not None else "UTC"
    out["policy"] = policy.digest
    if rule is not None:
        q = parse_query(dns.message.make_query(name, qtype, use_edns=0).to_wire())
        answer = dns.message.from_wire(blocked_answer(q, rule, apex, now))
        out["decision"] = BLOCKED
        out["list"] = rule.blocklist.id
        out["answer"] = {
            "rcode": dns.rcode.to_text(answer.rcode()),
            "records": [str(rr) for section in (answer.answer, answer.authority) for rr in section],
        }
    elif monitored is not None:
        out["decision"] = MONITORED
        out["list"] = monitored.blocklist.id
    else:
        out["decision"] = ALLOWED if apex < 0 else FORWARDED
    shown = moment.shown if moment is not None else format_instant
    out["until"] = None if until == NEVER else shown(until)
    sources = policy.sources or {}
    again = _Reread(reread) if policy.sources is None and reread is not None else None
    rules = []
    for match in policy.matches(name, mask, now):
        rs = match.ruleset
        blocklist = rs.blocklist
        wheres = [str(w) for i, w in sources.get(match.name.encode(), ()) if i == rs.index and w]
        if again is not None:
            wheres = again.lines(rs, match.name)
        rules.append(
            {
                "rule": match.name,
                "kind": rs.kind,
                "list": blocklist.id,
                "description": blocklist.description,
                "state": match.state,
                "mode": blocklist.mode,
                "window": _window(rs),
                "action": "allow" if rs.kind == "allow" else rs.action.describe(),
                "ttl": blocklist.ttl,
                "clients": list(blocklist.clients),
                "applies_to_client": bool(blocklist.mask & mask),
                "reference": rs.reference,
                "reference_id": reference_id(rs.reference) if rs.reference else None,
                "source": wheres or ([str(rs.where)] if rs.where else []),
            }
        )
    out["rules"] = rules
    return out


def _who(policy: Policy, client: str, client_id: str) -> tuple[dict[str, Any], int]:
    """The client (address, id, groups) as explain shows it, and its group mask."""
    client = str(ipaddress.ip_address(client))
    if client_id and not _CLIENT_ID.match(client_id):
        raise ValueError(f"{client_id!r} is not a client id: one label of letters, digits, '-'")
    groups = policy.groups
    mask = groups.mask_of(client) | (groups.mask_of_id(client_id) if client_id else 0)
    who: dict[str, Any] = {"client": client}
    if client_id:
        who["client_id"] = client_id.lower()
    who["groups"] = [group for group, bit in groups.bits.items() if bit & mask]
    return who, mask


class _Reread:
    """The list files of a served policy read again, each once, with a line per name."""

    def __init__(self, options: LoadOptions) -> None:
        self.options = replace(options, keep_sources=True)
        self.loaded: dict[str, Policy | None] = {}

    def lines(self, rs: RuleSet, name: str) -> list[str]:
        """The lines of ``rs``'s list file that name ``name`` for a rule set like ``rs``
        (same list, origin, kind and own settings); none when the file no longer loads."""
        file = rs.blocklist.where.file
        if file not in self.loaded:
            try:
                self.loaded[file] = load_policy(Path(file), self.options)
            except SourceError:
                self.loaded[file] = None  # changed since, or broken: the reload says why
        again = self.loaded[file]
        if again is None or again.sources is None:
            return []
        out = []
        for index, where in again.sources.get(name.encode(), ()):
            other = again.rulesets[index]
            same = (other.blocklist.id, other.origin, other.flags, other.where)
            if where and same == (rs.blocklist.id, rs.origin, rs.flags, rs.where):
                out.append(str(where))
        return out


def render_text(doc: dict[str, Any]) -> str:
    """The explanation as ``resolver explain`` prints it."""
    who = doc["client"] + (f" (client id {doc['client_id']})" if doc.get("client_id") else "")
    zone = f" (time zone {doc['zone']})" if doc.get("zone") else ""
    lines = [f"{doc['name']} {doc['type']} for {who} at {doc['at']}{zone}:"]
    groups = [g for g in doc.get("groups", ()) if g != "all"]
    if groups:
        lines.append(f"  client groups: {', '.join(groups)}")
    decision = doc["decision"]
    if decision == BLOCKED:
        lines.append(f"  BLOCKED by list {doc['list']}: {doc['answer']['rcode']}")
        lines += [f"    {record}" for record in doc["answer"]["records"]]
    elif decision == MONITORED:
        lines.append(f"  forwarded, and logged as WOULD BLOCK by list {doc['list']} (monitor)")
    elif decision == ALLOWED:
        lines.append("  forwarded: an allow rule (exception) decides")
    else:
        lines.append("  forwarded (not blocked)")
    if doc["until"]:
        lines.append(f"  this holds until {doc['until']}")
    if not doc["rules"]:
        lines.append("  no rule names it")
    for rule in doc["rules"]:
        mark = "" if rule["applies_to_client"] else "  [not for this client]"
        lines.append(f"  rule {rule['rule']} ({rule['kind']}){mark}")
        title = f"list {rule['list']}"
        lines.append(
            f"    {title} ({rule['description']})" if rule["description"] else f"    {title}"
        )
        window = rule["window"]
        parts = []
        if window["monitor_from"]:
            parts.append(f"monitor from {window['monitor_from']}")
        if rule["mode"] == "monitor":
            parts.append("monitor only")
        parts.append(f"from {window['from'] or 'always'} until {window['until'] or 'never'}")
        lines.append(f"    state at that time: {rule['state']}; {', '.join(parts)}")
        lines.append(f"    action: {rule['action']}, ttl {rule['ttl']}")
        lines.append(f"    clients: {', '.join(rule['clients'])}")
        ref_id = f" (id {rule['reference_id']})" if rule.get("reference_id") else ""
        lines.append(f"    reference: {rule['reference'] or '(none given)'}{ref_id}")
        if rule["source"]:
            lines.append(f"    source: {', '.join(rule['source'])}")
    return "\n".join(lines)
