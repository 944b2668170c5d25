"""Rule edits, the change log and the policy timeline on the admin API (behind its token).

``GET /v1/rules``, ``POST /v1/rules`` (add), ``POST /v1/rules/remove``, ``GET
/v1/changes`` and ``GET /v1/timeline``; resolver/schema/admin.openapi.json describes them.

An edit is one at a time (an asyncio lock here, a file lock in :mod:`..policy.edits`
across processes). Its file work and validation run in a thread, never on the DNS event
loop. An edit takes effect through the server's own reload; when that reload fails, the
file's previous content is put back and the answer is 422 with the reload's error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ..policy import changelog, editinput, edits
from ..policy.model import ALL_CLIENTS, ENFORCED
from ..policy.timewindow import ALWAYS, NEVER, format_instant
from ..yamlload import load_text
from .assembly import load_options
from .http import Handler, Request, Response, error, json_response

if TYPE_CHECKING:
    from ..config import Config
    from ..observe.counts import Counts
    from ..policy.model import BlockList, Policy, RuleSet
    from ..yamlload import Where
    from .workers import Supervisor

log = logging.getLogger("resolver.rules")

#: Rules with their own window or mode that /v1/timeline lists at most.
TIMELINE_RULES: Final = 500
#: Rules GET /v1/rules returns at most (``limit``).
MAX_RULES_LISTED: Final = edits.MAX_RULES
#: The first http(s) URL of a reference text, for a link.
_URL: Final = re.compile(r"https?://[^\s\"'<>]+")
#: The group name under which clients in no named group are counted.
NO_GROUP: Final = ""

_T = TypeVar("_T")
#: How edits ended, by (action, result): applied, refused (bad input, a bound, a
#: conflict: nothing written), undone (written, the reload failed, put back).
EDIT_RESULTS: Final = ("applied", "refused", "undone")
edit_counts: Counter[tuple[str, str]] = Counter(
    {(action, result): 0 for action in ("add", "remove") for result in EDIT_RESULTS}
)


class EditCollector(Collector):
    """``resolver_rule_edits_total{action,result}`` and
    ``resolver_rule_changelog_rotations_total`` (this process: edits go to the first)."""

    def collect(self) -> Iterator[Metric]:
        edits_family = CounterMetricFamily(
            "resolver_rule_edits",
            "Rule edits through the admin API, by action and how they ended (applied, "
            "refused with nothing written, undone because the reload failed).",
            labels=["action", "result"],
        )
        for (action, result), count in sorted(edit_counts.items()):
            edits_family.add_metric([action, result], count)
        yield edits_family
        yield CounterMetricFamily(
            "resolver_rule_changelog_rotations",
            "Times the change log of rule edits was rotated (past 8 MiB; one old file kept).",
            value=changelog.rotations,
        )


class EditServed(Protocol):
    """What these routes read of the running service."""

    @property
    def resolver(self) -> Any: ...

    @property
    def config(self) -> Config: ...

    @property
    def clock(self) -> Callable[[], float]: ...

    @property
    def supervisor(self) -> Supervisor | None: ...

    def counts(self) -> Counts: ...

    async def reload(self) -> bool: ...


def settings_of(config: Config) -> edits.Settings:
    """The edit settings of ``config`` (EditError when edits cannot work with it)."""
    return edits.resolve(
        config.blocklists,
        config.state_dir,
        config.edits.file,
        config.edits.list,
        config.edits.changelog,
        load_options(config),
    )


def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(request.body or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError):  # [[[[... nested too deep
        raise edits.EditError("", "the body is not JSON; send a JSON object") from None
    if not isinstance(body, dict):
        raise edits.EditError("", "the body must be a JSON object")
    return body


def _refusal(exc: edits.EditError) -> Response:
    return json_response(exc.status, {"error": str(exc), "field": exc.field or None})


def other_lists(policy: Policy, name: str, list_id: str, now: float) -> str:
    """The lists other than ``list_id`` with a rule that names ``name`` or a parent of it,
    as text ("list deepseek"), for a refusal or a note."""
    every = sum(policy.groups.bits.values()) | ALL_CLIENTS
    found = sorted({m.ruleset.blocklist.id for m in policy.matches(name, every, now)} - {list_id})
    return ", ".join(f"list {found_id}" for found_id in found[:5])


def reference_url(reference: str) -> str | None:
    """The first http(s) URL in a reference text, for a link."""
    match = _URL.search(reference)
    return match.group(0).rstrip(".,;)") if match else None


def rules_routes(server: EditServed) -> dict[tuple[str, str], Handler]:
    """The rule edit, change log and timeline routes of ``server``."""
    lock = asyncio.Lock()

    async def list_rules(request: Request) -> Response:
        try:
            settings = settings_of(server.config)
            limit = _limit(request, MAX_RULES_LISTED, MAX_RULES_LISTED)
            found = await _in_thread(partial(edits.rules, settings))
        except edits.EditError as exc:
            return _refusal(exc)
        return json_response(
            200,
            {
                "list": settings.list_id,
                "file": str(settings.file),
                "count": len(found),
                "truncated": len(found) > limit,
                "rules": [rule.document() for rule in found[:limit]],
            },
        )

    async def add(request: Request) -> Response:
        return await _edit(server, lock, "add", request)

    async def remove(request: Request) -> Response:
        return await _edit(server, lock, "remove", request)

    async def changes(request: Request) -> Response:
        try:
            settings = settings_of(server.config)
            limit = _limit(request, 100, changelog.MAX_CHANGES)
        except edits.EditError as exc:
            return _refusal(exc)
        found = await _in_thread(partial(changelog.changes, settings, limit))
        return json_response(200, {"changes": found})

    async def timeline(_: Request) -> Response:
        resolver = server.resolver
        if resolver is None:
            return error(503, "not started")
        if server.supervisor is not None:
            await server.supervisor.refresh_counts()
        doc = await _in_thread(
            partial(timeline_document, resolver.policy, server.counts(), server.clock())
        )
        return json_response(200, doc)

    return {
        ("GET", "/v1/rules"): list_rules,
        ("POST", "/v1/rules"): add,
        ("POST", "/v1/rules/remove"): remove,
        ("GET", "/v1/changes"): changes,
        ("GET", "/v1/timeline"): timeline,
    }


async def _in_thread(call: Callable[[], _T]) -> _T:
    return await asyncio.get_running_loop().run_in_executor(None, call)


async def _edit(server: EditServed, lock: asyncio.Lock, action: str, request: Request) -> Response:
    """One add or remove: validated, written, reloaded (undone when the reload fails),
    then logged."""
    resolver = server.resolver
    if resolver is None:
        return error(503, "not started")
    try:
        settings = settings_of(server.config)
        body = _body(request)
        now = server.clock()
        edits.check_id([(b.id, b.where.file) for b in resolver.policy.lists], settings)
        if action == "add":
            rule = editinput.parse_rule(body, now)
            apply = partial(
                edits.add,
                settings,
                rule,
                other_lists(resolver.policy, rule.name, settings.list_id, now),
            )
        else:
            name, reference, operator = editinput.parse_removal(body)
            elsewhere = other_lists(resolver.policy, name, settings.list_id, now)
            apply = partial(edits.remove, settings, name, reference, operator, elsewhere)
    except edits.EditError as exc:
        edit_counts[(action, "refused")] += 1
        return _refusal(exc)
    async with lock:
        before = server.resolver.policy.digest
        try:
            applied = await _in_thread(apply)
        except edits.EditError as exc:
            edit_counts[(action, "refused")] += 1
            return _refusal(exc)
        if not await server.reload():
            edit_counts[(action, "undone")] += 1
            why = server.resolver.stats.last_reload_error or "the reload failed"
            await _in_thread(partial(edits.restore, settings, applied))
            # Workers: the first may have taken the edit while a child refused it. Loading
            # the restored file puts every process back on the policy before the edit.
            if server.resolver.policy.digest != before:
                await server.reload()
            log.warning("rule edit undone (%s %s): %s", action, applied.change["name"], why)
            return error(422, f"the edit was undone: the policy did not load with it: {why}")
        edit_counts[(action, "applied")] += 1
        after = server.resolver.policy.digest
        change = changelog.with_digests(applied.change, before, after)
        try:
            await _in_thread(partial(changelog.record, settings, change))
        except edits.EditError as exc:  # the edit holds; say that its log line is missing
            log.error("rule edit applied, but the change log failed: %s", exc)
            change["changelog_error"] = str(exc)
    log.info(
        "rule edit: %s %s in list %s by %s",
        action,
        change["name"],
        settings.list_id,
        change["operator"],
    )
    return json_response(201 if action == "add" else 200, {"change": change, "policy": after})


def _limit(request: Request, default: int, most: int) -> int:
    text = request.query.get("limit") or str(default)
    if not text.isdigit() or not 1 <= int(text) <= most:
        raise edits.EditError("limit", f"expected a whole number from 1 to {most}")
    return int(text)


def _instant(value: float, blocklist: BlockList | None = None) -> str | None:
    if value in (NEVER, ALWAYS):
        return None
    return format_instant(value, blocklist.timezone if blocklist is not None else None)


def _state_fields(phases: Any, now: float, blocklist: BlockList) -> dict[str, Any]:
    state = phases.state(now)
    change = phases.next_change(now)
    return {
        "state": state,
        "monitor_from": _instant(phases.monitor_from, blocklist)
        if phases.monitor_from < phases.enforce_from
        else None,
        "enforced_from": _instant(phases.enforce_from, blocklist)
        if phases.enforce_from < phases.end
        else None,
        "until": _instant(phases.end, blocklist),
        "next_transition": _instant(change, blocklist),
        "seconds_to_next": None if change == NEVER else round(change - now, 3),
    }


def by_group(policy: Policy, counts: Counts, list_id: str) -> dict[str, int]:
    """Would-block matches of ``list_id`` per client group ("" for clients in no named
    group; a client in two groups counts in both)."""
    names = [(name, bit) for name, bit in policy.groups.bits.items() if bit != ALL_CLIENTS]
    out: dict[str, int] = {}
    for (found_id, mask), count in counts.would_block_groups.items():
        if found_id != list_id:
            continue
        named = [name for name, bit in names if mask & bit]
        for name in named or [NO_GROUP]:
            out[name] = out.get(name, 0) + count
    return dict(sorted(out.items()))


def timeline_document(policy: Policy, counts: Counts, now: float) -> dict[str, Any]:
    """What ``GET /v1/timeline`` returns: every list with its phases, its countdown and
    what its monitor phase has seen, and the rules that carry a window or a mode of their
    own (one entry per distinct setting, at most :data:`TIMELINE_RULES`)."""
    lists = []
    for blocklist in policy.lists:
        lists.append(
            {
                "id": blocklist.id,
                "description": blocklist.description,
                "reference": blocklist.reference,
                "reference_url": reference_url(blocklist.reference),
                "mode": blocklist.mode,
                "timezone": blocklist.timezone.key,
                **_state_fields(blocklist.phases, now, blocklist),
                "rules": blocklist.rule_count,
                "blocked": counts.blocked[blocklist.id],
                "would_block": counts.would_block[blocklist.id],
                "would_block_by_group": by_group(policy, counts, blocklist.id),
            }
        )
    own = [rs for rs in policy.rulesets if _own_settings(rs)]
    shown = own[:TIMELINE_RULES]
    lines = _lines_at([rs.where for rs in shown if rs.where is not None])
    rules = [_rule_entry(rs, now, lines) for rs in shown]
    return {
        "now": format_instant(now),
        "policy": policy.digest,
        "lists": lists,
        "rules": rules,
        "rules_truncated": len(own) > TIMELINE_RULES,
    }


def _own_settings(rs: RuleSet) -> bool:
    """A rule set of rules with a window, a mode or a reference of their own."""
    return rs.where is not None and (
        rs.phases != rs.blocklist.phases or rs.reference != rs.blocklist.reference
    )


def _rule_entry(rs: RuleSet, now: float, lines: dict[tuple[str, int], str]) -> dict[str, Any]:
    blocklist = rs.blocklist
    state = rs.phases.state(now)
    return {
        "list": blocklist.id,
        "name": _name_at(rs, lines),
        "section": rs.origin,
        "where": str(rs.where),
        "reference": rs.reference,
        "reference_url": reference_url(rs.reference),
        "mode": "monitor" if rs.phases.enforce_from >= rs.phases.end else "enforce",
        **_state_fields(rs.phases, now, blocklist),
        "enforced": state == ENFORCED,
    }


def _lines_at(places: list[Where]) -> dict[tuple[str, int], str]:
    """The text of the lines at ``places``, each file read once and only as far as its
    last line wanted (a list of a million names with one dated rule near the top costs a
    few lines, not the whole file)."""
    wanted: dict[str, set[int]] = {}
    for where in places:
        wanted.setdefault(where.file, set()).add(where.line)
    found: dict[tuple[str, int], str] = {}
    for file, numbers in wanted.items():
        last = max(numbers)
        try:
            with open(file, encoding="utf-8", errors="replace") as source:
                for number, line in enumerate(source, 1):
                    if number in numbers:
                        found[(file, number)] = line[:4096]
                    if number >= last:
                        break
        except OSError:
            continue
    return found


def _name_at(rs: RuleSet, lines: dict[tuple[str, int], str]) -> str | None:
    """The name (or pattern) written at the rule set's first line (None when unknown)."""
    where = rs.where
    text = lines.get((where.file, where.line)) if where is not None else None
    if text is None:
        return None
    try:
        item = load_text(text.strip().removeprefix("- "), where.file if where else "")
    except Exception:
        return None
    if isinstance(item, dict):
        item = item.get("name", item.get("pattern"))
    return str(item) if isinstance(item, str) else None
