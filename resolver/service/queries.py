"""``GET /v1/queries``: the query store's search, on the admin API (behind its token).

Filters: ``client`` (an address, pseudonymised when the store holds pseudonyms, or a
pseudonym), ``name`` (that name and every name under it), ``list``, ``decision``,
``group``, ``since`` and ``until`` (ISO 8601 or a date), ``limit`` (1 to 1000). Results
come newest first; ``next_cursor``, when present, is passed as ``cursor`` for the next
page (keyset pagination: the cursor is the last row's id, opaque to the caller).

The search runs in a thread on a connection of its own, so that a slow query never stalls
the DNS event loop, and the writer is never held up by a reader (SQLite WAL, PostgreSQL).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from datetime import UTC, datetime
from typing import Any, Protocol

from ..core.outcome import DECISIONS
from ..observe.store import find_store
from ..observe.storedb import MAX_LIMIT, Search
from .http import Handler, Request, Response, error, json_response


class _Served(Protocol):
    @property
    def resolver(self) -> Any: ...


def encode_cursor(row_id: int) -> str:
    """An opaque cursor for the rows before ``row_id``."""
    return base64.urlsafe_b64encode(f"q1:{row_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The row id of a cursor; ValueError when it is not one this server gave."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, number = text.partition(":")
        if prefix != "q1":
            raise ValueError
        return int(number)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValueError("cursor: not a cursor from a previous page; leave it out") from None


def _instant(key: str, text: str) -> float:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{key}: expected a date such as 2025-02-26 or a time such as "
            f"2025-02-26T00:30:00Z, got {text!r}"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def parse_search(query: dict[str, str]) -> Search:
    """The search a request's query string asks for; ValueError says what is wrong."""
    decision = query.get("decision") or None
    if decision is not None and decision not in DECISIONS:
        raise ValueError(f"decision: expected one of {', '.join(DECISIONS)}, got {decision!r}")
    limit_text = query.get("limit") or "100"
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
        raise ValueError(f"limit: expected a whole number from 1 to {MAX_LIMIT}")
    cursor = query.get("cursor")
    return Search(
        client=query.get("client") or None,
        name=query.get("name") or None,
        list_id=query.get("list") or None,
        decision=decision,
        group=query.get("group") or None,
        since=_instant("since", query["since"]) if query.get("since") else None,
        until=_instant("until", query["until"]) if query.get("until") else None,
        limit=int(limit_text),
        before=decode_cursor(cursor) if cursor else None,
    )


def query_routes(server: _Served) -> dict[tuple[str, str], Handler]:
    """The query store's routes (answering 404 while no store is configured)."""

    async def queries(request: Request) -> Response:
        resolver = server.resolver
        store = find_store(resolver.audit if resolver is not None else None)
        if store is None:
            return error(404, "no query store: configure store.kind (sqlite or postgresql)")
        try:
            search = parse_search(request.query)
        except ValueError as exc:
            return error(400, str(exc))
        try:
            rows = await asyncio.get_running_loop().run_in_executor(None, store.search, search)
        except Exception as exc:  # the database is away, or the file not made yet
            return error(503, f"the query store cannot be read: {exc}")
        last = rows[-1]["id"] if len(rows) == search.limit else None
        return json_response(
            200,
            {
                "queries": rows,
                "next_cursor": encode_cursor(last) if last is not None else None,
            },
        )

    return {("GET", "/v1/queries"): queries}
