"""The ``store:`` section of the config file: where the query store keeps audit records.

A query store is one more audit sink beside the JSON-lines log (``audit:``): the same
records (which ones: ``audit.log``), the same pseudonyms (``audit.pseudonymize_key``), in a
database that ``GET /v1/queries`` and ``resolver audit --store`` search. SQLite is the
embedded default; PostgreSQL serves fleets, where many replicas write to one database.

Every error is ``store.<key>: <what is wrong and what to write instead>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

KINDS: Final = ("off", "sqlite", "postgresql")
STORE_KEYS: Final = frozenset({"kind", "path", "dsn", "max_age", "max_rows", "queue_size"})
#: Thirty days: long enough to answer "since the effective date, who tried?" a month on.
DEFAULT_MAX_AGE: Final = 30 * 86_400.0
DEFAULT_MAX_ROWS: Final = 10_000_000
DEFAULT_QUEUE_SIZE: Final = 100_000
#: The SQLite file when ``path`` is not given: in the state directory.
DEFAULT_FILE: Final = "queries.sqlite3"
MAX_QUEUE_SIZE: Final = 10_000_000
_AGE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", re.IGNORECASE)
_AGE_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """The query store's settings (``store:``); ``kind`` off means no store."""

    kind: str = "off"  # "off" | "sqlite" | "postgresql"
    path: Path | None = None  # SQLite: the database file (None: state_dir/queries.sqlite3)
    dsn: str | None = None  # PostgreSQL: a libpq connection string or URI
    max_age: float = DEFAULT_MAX_AGE  # seconds a row is kept
    max_rows: int = DEFAULT_MAX_ROWS  # rows kept at most (the oldest go first)
    queue_size: int = DEFAULT_QUEUE_SIZE  # records waiting for the writer


def parse_age(value: object) -> float:
    """Seconds from a number or a string such as ``30d``, ``12h``, ``90m``, ``2w``."""
    if isinstance(value, bool):
        raise ValueError(f"expected an age such as 30d, 12h or 3600, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _AGE.fullmatch(value)):
        seconds = float(match.group(1)) * _AGE_UNITS[match.group(2).lower()]
    else:
        raise ValueError(
            f"expected an age such as 30d, 12h or 3600 (seconds; units s, m, h, d, w), "
            f"got {value!r}"
        )
    if seconds <= 0:
        raise ValueError(f"must be more than 0 seconds, got {value!r}; e.g. 30d")
    return seconds


def _whole(key: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(
            f"store.{key}: expected a whole number from {low} to {high}, got {value!r}"
        )
    return value


def parse_store(doc: Mapping[str, Any]) -> StoreConfig:
    """Validate the ``store:`` section. Raises ``ValueError("store.<key>: ...")``; a
    relative ``path`` stays relative (the caller resolves it against the config file)."""
    for key in doc:
        if key not in STORE_KEYS:
            raise ValueError(
                f"store.{key}: unknown key; expected one of {', '.join(sorted(STORE_KEYS))}"
            )
    kind = doc.get("kind", "off")
    if kind is False:  # YAML 1.1 reads a bare off as false
        kind = "off"
    if kind not in KINDS:
        raise ValueError(f"store.kind: expected off, sqlite or postgresql, got {kind!r}")
    path = doc.get("path")
    if path is not None and (not isinstance(path, str) or not path.strip()):
        raise ValueError(f"store.path: expected a file name such as queries.sqlite3, got {path!r}")
    dsn = doc.get("dsn")
    if dsn is not None and (not isinstance(dsn, str) or not dsn.strip()):
        raise ValueError(f"store.dsn: expected a connection string, got {dsn!r}")
    if kind == "postgresql" and dsn is None:
        raise ValueError(
            "store.dsn: required with kind: postgresql; "
            "e.g. dsn: postgresql://resolver@db.example/resolver"
        )
    max_age = DEFAULT_MAX_AGE
    if "max_age" in doc:
        try:
            max_age = parse_age(doc["max_age"])
        except ValueError as exc:
            raise ValueError(f"store.max_age: {exc}") from None
    max_rows = DEFAULT_MAX_ROWS
    if "max_rows" in doc:
        max_rows = _whole("max_rows", doc["max_rows"], 1, 10**12)
    queue_size = DEFAULT_QUEUE_SIZE
    if "queue_size" in doc:
        queue_size = _whole("queue_size", doc["queue_size"], 1, MAX_QUEUE_SIZE)
    return StoreConfig(
        kind=str(kind),
        path=Path(path) if path is not None else None,
        dsn=dsn,
        max_age=max_age,
        max_rows=max_rows,
        queue_size=queue_size,
    )
