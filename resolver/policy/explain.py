"""Explaining the policy: what it does with a name, for a client, at an instant, and why.

One function builds the explanation as data; ``resolver explain`` prints it and the admin
API's ``/v1/explain`` returns it as JSON, so the two can never disagree.
"""

from __future__ import annotations

import ipaddress
import re
import time
from datetime import UTC, datetime
from typing import Any, Final

import dns.message
import dns.rcode
import dns.rdatatype

from ..core.outcome import ALLOWED, BLOCKED, FORWARDED, MONITORED
from ..core.sinkhole import blocked_answer
from ..core.wire import encode_name, label_offsets, parse_query
from .formats import normalize
from .model import Policy, RuleSet
from .timewindow import NEVER, format_instant


def parse_at(text: str | None) -> float:
    """``--at``: a date (midnight UTC) or an ISO datetime (UTC unless it has an offset)."""
    if not text:
        return time.time()
    moment = datetime.fromisoformat(text.strip().replace("z", "Z"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


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
    policy: Policy, name: str, client: str, rdtype: str, now: float, client_id: str = ""
) -> dict[str, Any]:
    """The decision for ``name`` asked by ``client`` (with ``client_id``, from an encrypted
    connection, if any) with type ``rdtype`` at ``now``, and every rule that names it.
    Raises ValueError for a bad name, address, client id or type."""
    name = normalize(name)
    client = str(ipaddress.ip_address(client))
    if client_id and not _CLIENT_ID.match(client_id):
        raise ValueError(f"{client_id!r} is not a client id: one label of letters, digits, '-'")
    qtype = dns.rdatatype.from_text(rdtype)
    groups = policy.groups
    mask = groups.mask_of(client) | (groups.mask_of_id(client_id) if client_id else 0)
    wire = encode_name(name)
    rule, apex, monitored, until = policy.decide(wire, label_offsets(wire), mask, now)
    out: dict[str, Any] = {
        "name": name,
        "type": dns.rdatatype.to_text(qtype),
        "client": client,
    }
    if client_id:
        out["client_id"] = client_id.lower()
    out["groups"] = [group for group, bit in groups.bits.items() if bit & mask]
    out["at"] = format_instant(now)
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
    out["until"] = None if until == NEVER else format_instant(until)
    sources = policy.sources or {}
    rules = []
    for match in policy.matches(name, mask, now):
        rs = match.ruleset
        blocklist = rs.blocklist
        wheres = [str(w) for i, w in sources.get(match.name.encode(), ()) if i == rs.index and w]
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
                "source": wheres or ([str(rs.where)] if rs.where else []),
            }
        )
    out["rules"] = rules
    return out


def render_text(doc: dict[str, Any]) -> str:
    """The explanation as ``resolver explain`` prints it."""
    who = doc["client"] + (f" (client id {doc['client_id']})" if doc.get("client_id") else "")
    lines = [f"{doc['name']} {doc['type']} for {who} at {doc['at']}:"]
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
        lines.append(f"    reference: {rule['reference'] or '(none given)'}")
        if rule["source"]:
            lines.append(f"    source: {', '.join(rule['source'])}")
    return "\n".join(lines)
