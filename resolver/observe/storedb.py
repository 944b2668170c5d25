"""The query store's two databases, SQLite and PostgreSQL, behind one small interface.

One table, ``queries``, one row per audit record. ``id`` grows with insertion and is the
order of search results (newest first) and the key of the pagination cursor: keyset
pagination (``id < cursor``) costs the same on page 1000 as on page 1. The indexes serve
the searches of ``GET /v1/queries``: by client, list and decision (each with ``id``, so
that the newest rows of one client come off the index in order), by time (retention and
``since``/``until``), and by ``rname``, the name with its labels reversed
(``com.deepseek.chat.``), so that "this name and every name under it" is one range scan.

The SQL is written once with ``?`` placeholders; PostgreSQL's driver gets ``%s``.
"""

from __future__ import annotations

import functools
import importlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

#: The columns a record becomes, in insertion order (``id`` is the database's).
COLUMNS: Final = (
    "t",
    "client",
    "groups",
    "proto",
    "qname",
    "rname",
    "qtype",
    "rcode",
    "decision",
    "list",
    "rule",
    "reference",
    "upstream",
    "duration_ms",
    "client_id",
)
_SQLITE_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS queries (
        id INTEGER PRIMARY KEY AUTOINCREMENT, t REAL NOT NULL, client TEXT NOT NULL,
        groups TEXT NOT NULL, proto TEXT NOT NULL, qname TEXT NOT NULL, rname TEXT NOT NULL,
        qtype TEXT NOT NULL, rcode TEXT NOT NULL, decision TEXT NOT NULL, list TEXT,
        rule TEXT, reference TEXT, upstream TEXT, duration_ms REAL, client_id TEXT)""",
)
_PG_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS queries (
        id BIGSERIAL PRIMARY KEY, t DOUBLE PRECISION NOT NULL, client TEXT NOT NULL,
        groups TEXT NOT NULL, proto TEXT NOT NULL, qname TEXT NOT NULL,
        rname TEXT COLLATE "C" NOT NULL, qtype TEXT NOT NULL, rcode TEXT NOT NULL,
        decision TEXT NOT NULL, list TEXT, rule TEXT, reference TEXT, upstream TEXT,
        duration_ms DOUBLE PRECISION, client_id TEXT)""",
    # Version 2 added client_id: a table made by version 1 gets it (NULL in old rows).
    "ALTER TABLE queries ADD COLUMN IF NOT EXISTS client_id TEXT",
)
_INDEXES: Final = (
    "CREATE INDEX IF NOT EXISTS queries_t ON queries (t)",
    "CREATE INDEX IF NOT EXISTS queries_client ON queries (client, id)",
    "CREATE INDEX IF NOT EXISTS queries_list ON queries (list, id)",
    "CREATE INDEX IF NOT EXISTS queries_decision ON queries (decision, id)",
    "CREATE INDEX IF NOT EXISTS queries_rname ON queries (rname)",
    "CREATE INDEX IF NOT EXISTS queries_client_id ON queries (client_id, id)",
)
#: The SQLite file's schema version (PRAGMA user_version): 1 had no client_id column.
SQLITE_VERSION: Final = 2
#: Rows in one SQLite INSERT (times 15 columns, under SQLite's 32,766 parameters).
_ROWS_PER_INSERT: Final = 2000
#: Rows a search returns at most, whatever ``limit`` asks.
MAX_LIMIT: Final = 1000


class StoreError(Exception):
    """The store cannot be opened or read (the message says why)."""


def reversed_name(qname: str) -> str:
    """``chat.deepseek.com.`` -> ``com.deepseek.chat.`` (lower case; the root is ``""``)."""
    labels = qname.rstrip(".").lower().split(".")
    return ".".join(reversed(labels)) + "." if labels != [""] else ""


@dataclass(frozen=True, slots=True)
class Search:
    """The filters of one search; None means any. ``before``: rows with a smaller id."""

    client: str | None = None
    client_id: str | None = None
    name: str | None = None
    list_id: str | None = None
    decision: str | None = None
    group: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100
    before: int | None = None


def where(search: Search) -> tuple[str, list[Any]]:
    """The WHERE clause (with ``?``) and its parameters."""
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("client", search.client),
        ("client_id", search.client_id),
        ("list", search.list_id),
        ("decision", search.decision),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if search.name is not None:
        key = reversed_name(search.name)
        # The name and every name under it: "com.deepseek." up to "com.deepseek/" ('/'
        # follows '.'), one range on the rname index.
        clauses.append("rname >= ? AND rname < ?")
        params += [key, key[:-1] + "/"]
    if search.group is not None:
        clauses.append("groups LIKE ?")
        params.append(f"%,{search.group},%")
    if search.since is not None:
        clauses.append("t >= ?")
        params.append(search.since)
    if search.until is not None:
        clauses.append("t < ?")
        params.append(search.until)
    if search.before is not None:
        clauses.append("id < ?")
        params.append(search.before)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


class Database:
    """What the store's writer and searches need of a database, and what SQLite and
    PostgreSQL do alike; they differ in placeholders, transactions, cursors and inserts."""

    conn: Any
    #: The driver's placeholder (the SQL here is written with ``?``).
    mark = "?"
    #: The columns searches select: an old file read as it is (read-only) lacks client_id.
    selected: tuple[str, ...] = COLUMNS

    def _tx(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert ``rows`` (in the order of COLUMNS) in one transaction."""
        raise NotImplementedError

    def _cursor(self) -> Any:
        return self.conn.cursor()

    def _sql(self, text: str) -> str:
        return text if self.mark == "?" else text.replace("?", self.mark)

    def prune(self, max_age: float, max_rows: int, now: float) -> int:
        """Delete the rows older than ``max_age`` seconds, then the oldest beyond ``max_rows``."""
        with self._tx():
            aged = self.conn.execute(self._sql("DELETE FROM queries WHERE t < ?"), (now - max_age,))
            sized = self.conn.execute(
                self._sql(
                    "DELETE FROM queries WHERE id <= "
                    "(SELECT id FROM queries ORDER BY id DESC LIMIT 1 OFFSET ?)"
                ),
                (max_rows,),
            )
        return int(max(aged.rowcount, 0) + max(sized.rowcount, 0))

    def search(self, search: Search) -> list[dict[str, Any]]:
        """The rows ``search`` selects, newest first."""
        clause, params = where(search)
        columns = ",".join(c if c in self.selected else f"NULL AS {c}" for c in COLUMNS)
        sql = f"SELECT id,{columns} FROM queries{clause} ORDER BY id DESC LIMIT ?"
        with self._tx():
            rows = self.conn.execute(self._sql(sql), (*params, search.limit)).fetchall()
        return [_row(values) for values in rows]

    def clients(self, search: Search) -> list[dict[str, Any]]:
        """Per client (as stored) within ``search``'s filters: total rows, blocked and
        would-block (monitored) rows and the last time seen, busiest first."""
        clause, params = where(search)
        sql = (
            "SELECT client, COUNT(*), "
            "SUM(CASE WHEN decision = 'blocked' THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN decision = 'monitored' THEN 1 ELSE 0 END), MAX(t) "
            f"FROM queries{clause} GROUP BY client ORDER BY COUNT(*) DESC, client LIMIT ?"
        )
        with self._tx():
            rows = self.conn.execute(self._sql(sql), (*params, search.limit)).fetchall()
        return [
            {
                "client": client,
                "total": int(total),
                "blocked": int(blocked or 0),
                "would_block": int(monitored or 0),
                "last_seen": format_instant(last),
            }
            for client, total, blocked, monitored, last in rows
        ]

    def entries(
        self,
        decisions: Sequence[str],
        since: float | None,
        until: float | None,
        list_id: str | None,
    ) -> Iterator[tuple[float, str, str, str, str, str]]:
        """(time, client, qname, decision, list, client id) of the rows with these
        decisions, oldest first, fetched a chunk at a time."""
        sql, params = _entries_sql(decisions, since, until, list_id, "client_id" in self.selected)
        with self._tx(), closing(self._cursor()) as cursor:
            cursor.execute(self._sql(sql), params)
            while rows := cursor.fetchmany(10_000):
                yield from rows

    def close(self) -> None:
        self.conn.close()


class SqliteDB(Database):
    """A SQLite file in WAL mode: searches read while the writer writes."""

    def __init__(self, path: str, readonly: bool = False) -> None:
        if readonly:
            uri = Path(path).absolute().as_uri() + "?mode=ro"
            self.conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        else:
            self.conn = sqlite3.connect(path, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            # WAL with NORMAL: a crash of the host may lose the last batches, never corrupt.
            self.conn.execute("PRAGMA synchronous=NORMAL")
            with self.conn:
                for statement in _SQLITE_SCHEMA:
                    self.conn.execute(statement)
                self._migrate()
                for statement in _INDEXES:
                    self.conn.execute(statement)
        self.conn.execute("PRAGMA busy_timeout=5000")
        if readonly:
            found = {row[1] for row in self.conn.execute("PRAGMA table_info(queries)")}
            self.selected = tuple(c for c in COLUMNS if c in found)

    def _migrate(self) -> None:
        """Bring a file made by an older version up to :data:`SQLITE_VERSION` (in the
        transaction that creates the schema: all or nothing)."""
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version >= SQLITE_VERSION:
            return
        found = {row[1] for row in self.conn.execute("PRAGMA table_info(queries)")}
        if "client_id" not in found:
            self.conn.execute("ALTER TABLE queries ADD COLUMN client_id TEXT")
        self.conn.execute(f"PRAGMA user_version={SQLITE_VERSION}")

    def _tx(self) -> AbstractContextManager[Any]:
        return self.conn  # type: ignore[no-any-return]

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """One transaction for the batch, ``_ROWS_PER_INSERT`` rows per statement.

        Not executemany: sqlite3 releases the GIL around every step, so a row at a time
        the writer asked for the GIL back once per row, and each time the event loop had
        to hand it over (a forced switch on the query path); a few steps per batch
        leave the loop alone."""
        with self.conn:
            for start in range(0, len(rows), _ROWS_PER_INSERT):
                chunk = rows[start : start + _ROWS_PER_INSERT]
                self.conn.execute(_insert_sql(len(chunk)), [v for row in chunk for v in row])


class PostgresDB(Database):
    """A PostgreSQL database shared by many replicas (psycopg 3; COPY for the inserts)."""

    mark = "%s"

    def __init__(self, dsn: str, readonly: bool = False, timeout: float = 5.0) -> None:
        # Optional (the "postgres" extra), and imported by name: the compiled build
        # type-checks this module where psycopg is not installed.
        psycopg: Any = importlib.import_module("psycopg")
        self.conn = psycopg.connect(dsn, connect_timeout=max(1, int(timeout)), autocommit=False)
        if not readonly:
            with self.conn.transaction():
                # Replicas starting together would race on CREATE TABLE IF NOT EXISTS.
                self.conn.execute("SELECT pg_advisory_xact_lock(4242020)")
                for statement in (*_PG_SCHEMA, *_INDEXES):
                    self.conn.execute(statement)
        else:
            rows = self.conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'queries'"
            ).fetchall()
            self.selected = tuple(c for c in COLUMNS if c in {row[0] for row in rows})
        self.conn.commit()

    def _tx(self) -> AbstractContextManager[Any]:
        return self.conn.transaction()  # type: ignore[no-any-return]

    def _cursor(self) -> Any:
        return self.conn.cursor(name="entries")  # server-side: rows come a chunk at a time

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """One COPY for the batch: several times faster than INSERTs."""
        sql = f"COPY queries ({','.join(COLUMNS)}) FROM STDIN"
        with self.conn.transaction(), self.conn.cursor() as cur, cur.copy(sql) as copy:
            for row in rows:
                copy.write_row(row)


@functools.lru_cache(maxsize=4)
def _insert_sql(rows: int) -> str:
    marks = "(" + ",".join("?" * len(COLUMNS)) + ")"
    return f"INSERT INTO queries ({','.join(COLUMNS)}) VALUES " + ",".join([marks] * rows)


def _entries_sql(
    decisions: Sequence[str],
    since: float | None,
    until: float | None,
    list_id: str | None,
    with_id: bool = True,
) -> tuple[str, list[Any]]:
    clause, params = where(Search(list_id=list_id, since=since, until=until))
    marks = ",".join("?" * len(decisions))
    clause += (" AND " if clause else " WHERE ") + f"decision IN ({marks})"
    client_id = "COALESCE(client_id, '')" if with_id else "''"
    sql = (
        f"SELECT t, client, qname, decision, COALESCE(list, '-'), {client_id} "
        f"FROM queries{clause} ORDER BY id"
    )
    return sql, [*params, *decisions]


def is_postgres(target: str) -> bool:
    """Whether a ``--store`` argument names PostgreSQL (a URI or a key=value string)."""
    return target.startswith(("postgresql://", "postgres://")) or "=" in target


def open_database(target: str, readonly: bool = False) -> Database:
    """A SQLite file or a PostgreSQL DSN, as :func:`is_postgres` tells. Raises
    :class:`StoreError` when it cannot be opened (a file that is not there, the database
    away, psycopg not installed)."""
    try:
        if is_postgres(target):
            return PostgresDB(target, readonly)
        if readonly and not Path(target).is_file():
            raise StoreError(f"{target}: no such file")
        return SqliteDB(target, readonly)
    except ImportError:
        hint = "pip install 'dns-filtering-resolver[postgres]'"
        raise StoreError(f"PostgreSQL needs psycopg: {hint}") from None
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(str(exc)) from exc
    except Exception as exc:  # psycopg.Error, without importing psycopg here
        if type(exc).__module__.startswith("psycopg"):
            raise StoreError(str(exc).strip()) from exc
        raise


def _row(values: Sequence[Any]) -> dict[str, Any]:
    doc = dict(zip(("id", *COLUMNS), values, strict=True))
    doc["time"] = format_instant(doc.pop("t"))
    doc["groups"] = [g for g in doc["groups"].split(",") if g]
    del doc["rname"]
    return {key: value for key, value in doc.items() if value is not None}


def format_instant(when: float) -> str:
    """UTC ISO 8601 with milliseconds and ``Z``, as the JSON-lines log writes it."""
    second, ms = divmod(round(when * 1_000_000) // 1000, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + f".{ms:03d}Z"
