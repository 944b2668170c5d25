"""``GET /v1/queries``: the query store's search, on the admin API (behind its token).

Filters: ``client`` (an address, pseudonymised when the store holds pseudonyms, or a
pseudonym), ``client_id`` (an encrypted client's id, likewise), ``name`` (that name and
every name under it), ``list``, ``decision``, ``group``, ``since`` and ``until`` (ISO 8601
or a date), ``limit`` (1 to 1000). Results come newest first; ``next_cursor``, when
present, is passed as ``cursor`` for the next page (keyset pagination: the cursor is the
last row's id, opaque to the caller).
``format=csv`` returns the same page as a CSV attachment when ``limit`` is given, and
without ``limit`` every matching row, newest first, up to :data:`MAX_EXPORT_ROWS`
(``X-Export-Truncated: true`` when there were more). ``GET /v1/queries/clients``
counts per client (total, blocked, would-block, last seen) within ``since``/``until``.

The search runs in a thread on a connection of its own, so that a slow query never stalls
the DNS event loop, and the writer is never held up by a reader (SQLite WAL, PostgreSQL).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import csv
import io
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Final, Protocol, TypeVar

from ..core.outcome import DECISIONS
from ..observe.store import find_store
from ..observe.storedb import COLUMNS, MAX_LIMIT, Search
from .http import Handler, Request, Response, error, json_response

_R = TypeVar("_R")


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
        client_id=query.get("client_id") or None,
        name=query.get("name") or None,
        list_id=query.get("list") or None,
        decision=decision,
        group=query.get("group") or None,
        since=_instant("since", query["since"]) if query.get("since") else None,
        until=_instant("until", query["until"]) if query.get("until") else None,
        limit=int(limit_text),
        before=decode_cursor(cursor) if cursor else None,
    )


#: Rows a CSV export without ``limit`` holds at most (about 8 MB of CSV, built in memory).
MAX_EXPORT_ROWS: Final = 50_000
#: Rows an export reads from the store at once.
EXPORT_PAGE: Final = MAX_LIMIT


def export_rows(store: Any, search: Search) -> tuple[list[dict[str, Any]], bool]:
    """Every row ``search`` matches, page after page (keyset), up to
    :data:`MAX_EXPORT_ROWS`; and whether there were more. Runs in a thread."""
    most = MAX_EXPORT_ROWS
    rows: list[dict[str, Any]] = []
    page_search = replace(search, limit=EXPORT_PAGE)
    while len(rows) < most:
        page = store.search(page_search, False)
        rows += page
        if len(page) < EXPORT_PAGE:
            return rows[:most], False
        page_search = replace(page_search, before=page[-1]["id"])
    more = bool(store.search(replace(page_search, limit=1), False))
    return rows[:most], more or len(rows) > most


#: The CSV export's columns, in order (the JSON rows' keys).
CSV_COLUMNS: Final = ("id", "time", *(c for c in COLUMNS if c not in ("t", "rname")))
#: First characters a spreadsheet reads as a formula (CSV injection): such a field gets a
#: leading apostrophe. A query name is chosen by whoever sends the query.
_FORMULA: Final = ("=", "+", "-", "@", "\t", "\r")


def to_csv(rows: list[dict[str, Any]]) -> bytes:
    """Rows of a search as CSV with a header row (groups separated by spaces)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        fields = []
        for column in CSV_COLUMNS:
            value = row.get(column, "")
            text = " ".join(value) if isinstance(value, list) else str(value)
            fields.append("'" + text if text.startswith(_FORMULA) else text)
        writer.writerow(fields)
    return out.getvalue().encode("utf-8")


def _page(store: Any, search: Search) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = store.search(search, False)
    return rows


def _per_client(store: Any, search: Search) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = store.search(search, True)
    return rows


def query_routes(server: _Served) -> dict[tuple[str, str], Handler]:
    """The query store's routes (answering 404 while no store is configured)."""

    async def run(request: Request, fetch: Callable[[Any, Search], _R]) -> _R | Response:
        """What ``fetch(store, search)`` finds for a request (in a thread), or the error
        response."""
        resolver = server.resolver
        store = find_store(resolver.audit if resolver is not None else None)
        if store is None:
            return error(404, "no query store: configure store.kind (sqlite or postgresql)")
        try:
            search = parse_search(request.query)
        except ValueError as exc:
            return error(400, str(exc))
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, fetch, store, search)
        except Exception as exc:  # the database is away, or the file not made yet
            return error(503, f"the query store cannot be read: {exc}")

    async def queries(request: Request) -> Response:
        form = request.query.get("format") or "json"
        if form not in ("json", "csv"):
            return error(400, f"format: expected json or csv, got {form[:20]!r}")
        if form == "csv" and not request.query.get("limit"):  # every row: an export
            found = await run(request, export_rows)
            if isinstance(found, Response):
                return found
            headers = {"Content-Disposition": 'attachment; filename="queries.csv"'}
            if found[1]:
                headers["X-Export-Truncated"] = "true"
            return Response(200, to_csv(found[0]), "text/csv; charset=utf-8", headers)
        rows = await run(request, _page)
        if isinstance(rows, Response):
            return rows
        if form == "csv":
            headers = {"Content-Disposition": 'attachment; filename="queries.csv"'}
            return Response(200, to_csv(rows), "text/csv; charset=utf-8", headers)
        limit = int(request.query.get("limit") or "100")
        last = rows[-1]["id"] if len(rows) == limit else None
        return json_response(
            200,
            {
                "queries": rows,
                "next_cursor": encode_cursor(last) if last is not None else None,
            },
        )

    async def clients(request: Request) -> Response:
        rows = await run(request, _per_client)
        if isinstance(rows, Response):
            return rows
        return json_response(200, {"clients": rows})

    return {("GET", "/v1/queries"): queries, ("GET", "/v1/queries/clients"): clients}
