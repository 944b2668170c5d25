"""``resolver audit``: which clients tried to reach blocked services, from the audit log.

Reads audit log files written by :mod:`resolver.observe.querylog` (current, rotated,
gzip-compressed), keeps the blocked and monitored (would-block) queries that match the
filters, and prints one row per (list, client): how many queries were blocked, how many were
only monitored, when the client was first and last seen, and the names it asked for.

Lines that are not audit entries are skipped and counted rather than stopping the report: a
log may end in a line cut short by a crash, and the rest of it is still evidence.
"""

from __future__ import annotations

import argparse
import gzip
import ipaddress
import json
import sys
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

from ..observe.storedb import StoreError, open_database

# The decisions the report is about: queries stopped, and queries a list in monitor mode
# would have stopped.
REPORTED: Final = ("blocked", "monitored")
# Names shown per row; the rest are counted as "+N more".
NAMES_SHOWN: Final = 5
# The list column when an entry names none (it should not happen, but the row still counts).
NO_LIST: Final = "-"
_GZIP_MAGIC: Final = b"\x1f\x8b"
#: The file name that means standard input.
STDIN: Final = "-"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Row:
    """One (list, client) pair of the report."""

    list_id: str
    client: str
    blocked: int
    monitored: int
    first_seen: float  # Unix time
    last_seen: float
    names: tuple[str, ...]  # the most queried distinct names, at most NAMES_SHOWN
    more_names: int  # distinct names beyond ``names``
    #: The client id of an encrypted connection ("" when none): rows are per (list,
    #: client, client id).
    client_id: str = ""

    @property
    def total(self) -> int:
        """Blocked and monitored queries together."""
        return self.blocked + self.monitored

    def names_text(self) -> str:
        """The names as the table shows them: ``a.example., b.example. +3 more``."""
        text = ", ".join(self.names)
        return f"{text} +{self.more_names} more" if self.more_names else text

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON object (times in the log's own ISO 8601 form)."""
        return {
            "list": self.list_id,
            "client": self.client,
            **({"client_id": self.client_id} if self.client_id else {}),
            "blocked": self.blocked,
            "monitored": self.monitored,
            "first_seen": format_time(self.first_seen),
            "last_seen": format_time(self.last_seen),
            "names": list(self.names),
            "more_names": self.more_names,
        }


@dataclass(slots=True)
class _Tally:
    """A row while the files are read."""

    blocked: int = 0
    monitored: int = 0
    first_seen: float = float("inf")
    last_seen: float = float("-inf")
    names: Counter[str] = field(default_factory=Counter)


def format_time(when: float) -> str:
    """UTC ISO 8601 with milliseconds and ``Z``, as in the log."""
    moment = datetime.fromtimestamp(when, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> float:
    """A date ``YYYY-MM-DD`` (UTC midnight) or an ISO datetime (UTC unless it has an offset).

    Raises ValueError with a message that says what to write.
    """
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"expected a date such as 2026-11-28 or an ISO datetime such as "
            f"2026-11-28T21:30:00Z or 2026-11-28T22:30+01:00, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_client(text: str) -> Network:
    """A network from a CIDR (``10.0.0.0/8``) or a single address (``10.1.2.3``, ``::1``).

    Host bits are allowed (``10.1.2.3/8`` means ``10.0.0.0/8``): people paste addresses.
    """
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"expected an address or a network such as 10.1.2.3, 10.0.0.0/8 or 2001:db8::/32, "
            f"got {text!r}"
        ) from None


def _lines(path: Path) -> Iterator[bytes]:
    """The file's lines, decompressed when it is gzip (told by content: rotated names vary).

    Raises OSError; damaged or truncated gzip data becomes an OSError naming the file.
    """
    with open(path, "rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        if not compressed:
            yield from raw
            return
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                yield from unzipped
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            reason = "ends early (truncated)" if isinstance(exc, EOFError) else f"damaged ({exc})"
            raise OSError(f"{path}: compressed data {reason}") from exc


class _ClientMatcher:
    """Whether a logged client lies in a network; addresses are parsed once each."""

    def __init__(self, network: Network) -> None:
        self.network = network
        self._seen: dict[str, bool] = {}

    def __call__(self, client: str) -> bool:
        hit = self._seen.get(client)
        if hit is None:
            hit = self._seen[client] = self._match(client)
        return hit

    def _match(self, client: str) -> bool:
        try:
            address: Address = ipaddress.ip_address(client)
        except ValueError:
            # A pseudonym ("anon-...") or garbage: it cannot be placed in a network.
            return False
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        if mapped is not None and self.network.version == 4:
            # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d.
            address = mapped
        return address.version == self.network.version and address in self.network


def report(
    paths: list[Path],
    since: float | None,
    until: float | None,
    list_id: str | None,
    client: str | None,
    client_id: str | None = None,
    store: str | None = None,
) -> tuple[list[Row], int]:
    """The report rows and the number of malformed lines skipped.

    ``paths`` may hold ``-``, standard input: a mixed log (``journalctl ... |``), whose
    lines that are not audit records are skipped quietly. ``store`` is a query store to
    read as well: a SQLite file or a PostgreSQL connection string.

    Keeps blocked and monitored entries with ``since <= time < until``, of list ``list_id``,
    from a client in ``client`` (a CIDR or an address), with ``client_id``. Rows are sorted
    by list, then by total count (most first), then by client. Raises OSError when a file
    cannot be read (also for damaged gzip data), ValueError for a bad ``client``.
    """
    matcher = _ClientMatcher(parse_client(client)) if client is not None else None
    tallies: dict[tuple[str, str, str], _Tally] = {}
    wanted_id = client_id.lower() if client_id is not None else None
    malformed = 0
    for entry in _sources(paths, store, since, until, list_id):
        if entry is None:
            malformed += 1
            continue
        when, who, qname, decision, listed, cid = entry
        if decision not in REPORTED:
            continue
        if since is not None and when < since:
            continue
        if until is not None and when >= until:
            continue
        if list_id is not None and listed != list_id:
            continue
        if matcher is not None and not matcher(who):
            continue
        if wanted_id is not None and cid != wanted_id:
            continue
        tally = tallies.get((listed, who, cid))
        if tally is None:
            tally = tallies[(listed, who, cid)] = _Tally()
        if decision == "blocked":
            tally.blocked += 1
        else:
            tally.monitored += 1
        tally.first_seen = min(tally.first_seen, when)
        tally.last_seen = max(tally.last_seen, when)
        tally.names[qname] += 1
    rows = [_row(listed, who, cid, tally) for (listed, who, cid), tally in tallies.items()]
    rows.sort(key=lambda row: (row.list_id, -row.total, row.client, row.first_seen))
    return rows, malformed


def _sources(
    paths: list[Path],
    store: str | None,
    since: float | None,
    until: float | None,
    list_id: str | None,
) -> Iterator[tuple[float, str, str, str, str, str] | None]:
    """The entries of every file, of standard input and of the store; None for a line of
    a file that is not an entry (a line of standard input that is not one is skipped)."""
    for path in _unique(paths):
        quiet = str(path) == STDIN
        for line in sys.stdin.buffer if quiet else _lines(path):
            if not line.strip():
                continue  # blank lines carry nothing and are not damage
            entry = _entry(line)
            if entry is not None or not quiet:
                yield entry
    if store is not None:
        db = open_database(store, readonly=True)
        try:
            yield from db.entries(REPORTED, since, until, list_id)
        finally:
            db.close()


def _unique(paths: list[Path]) -> list[Path]:
    """``paths`` without repeats, so that ``audit.jsonl audit.jsonl*`` counts nothing twice."""
    seen: set[Path] = set()
    out = []
    for path in paths:
        key = path if str(path) == STDIN else path.resolve()
        if key not in seen:
            seen.add(key)
            out.append(path)
    return out


def _entry(line: bytes) -> tuple[float, str, str, str, str, str] | None:
    """(time, client, qname, decision, list, client id) of a log line, or None when it is
    not an entry.

    The entry may follow a prefix (journalctl's time, host and unit): it starts at the
    line's first ``{``."""
    start = line.find(b"{")
    if start < 0:
        return None
    try:
        doc = json.loads(line[start:])
    except ValueError:  # also UnicodeDecodeError: the writer only ever writes ASCII
        return None
    if not isinstance(doc, dict):
        return None
    stamp = doc.get("time")
    who = doc.get("client")
    qname = doc.get("qname")
    decision = doc.get("decision")
    listed = doc.get("list", NO_LIST)
    if not (
        isinstance(stamp, str)
        and isinstance(who, str)
        and isinstance(qname, str)
        and isinstance(decision, str)
        and isinstance(listed, str)
    ):
        return None
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None  # the writer always writes Z; a naive time is not one of its lines
    cid = doc.get("client_id", "")
    return moment.timestamp(), who, qname, decision, listed, cid if isinstance(cid, str) else ""


def _row(list_id: str, client: str, client_id: str, tally: _Tally) -> Row:
    # Most queried first; equal counts by name, so the output is the same on every run.
    ranked = sorted(tally.names.items(), key=lambda item: (-item[1], item[0]))
    names = tuple(name for name, _ in ranked[:NAMES_SHOWN])
    return Row(
        list_id=list_id,
        client=client,
        blocked=tally.blocked,
        monitored=tally.monitored,
        first_seen=tally.first_seen,
        last_seen=tally.last_seen,
        names=names,
        more_names=len(ranked) - len(names),
        client_id=client_id,
    )


# The command line.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resolver audit",
        description=(
            "Report which clients sent blocked or monitored (would-block) queries, per list, "
            "from audit log files. Rotated files and .gz files can be given too, e.g. "
            "resolver audit /var/log/resolver/audit.jsonl*"
        ),
    )
    parser.add_argument(
        "files",
        nargs="*",
        type=Path,
        metavar="FILE",
        help="audit log files; - reads standard input (e.g. journalctl -u resolver | "
        "resolver audit -), skipping lines that are not audit records",
    )
    parser.add_argument(
        "--store",
        metavar="PATH_OR_DSN",
        help="read the query store too: a SQLite file, or a PostgreSQL connection string "
        "such as postgresql://resolver@db.example/resolver",
    )
    parser.add_argument(
        "--since",
        metavar="T",
        help="only queries at or after T: a date YYYY-MM-DD (UTC midnight) or an ISO datetime "
        "(UTC unless it has an offset)",
    )
    parser.add_argument(
        "--until", metavar="T", help="only queries before T (same forms as --since)"
    )
    parser.add_argument("--list", metavar="L", help="only this list (its id, as in the log)")
    parser.add_argument(
        "--client",
        metavar="CIDR",
        help="only clients in this network or with this address, e.g. 10.0.0.0/8; "
        "cannot match a log written with pseudonymize_key, whose clients are anon-... hashes",
    )
    parser.add_argument(
        "--client-id",
        metavar="ID",
        help="only queries with this client id (from an encrypted connection)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON array of rows")
    return parser


def main(argv: list[str]) -> int:
    """``resolver audit FILE...``; returns 0, or 2 for bad arguments or an unreadable file."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on bad usage (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        since = parse_time(args.since) if args.since is not None else None
    except ValueError as exc:
        return _usage(f"--since: {exc}")
    try:
        until = parse_time(args.until) if args.until is not None else None
    except ValueError as exc:
        return _usage(f"--until: {exc}")
    if since is not None and until is not None and since >= until:
        return _usage(f"--since ({args.since}) must be before --until ({args.until})")
    if args.client is not None:
        try:
            parse_client(args.client)
        except ValueError as exc:
            return _usage(f"--client: {exc}")
    paths: list[Path] = args.files
    if not paths and args.store is None:
        return _usage("give audit log files, - for standard input, or --store")
    try:
        rows, malformed = report(
            paths, since, until, args.list, args.client, args.client_id, args.store
        )
    except StoreError as exc:
        return _usage(f"cannot read the query store {args.store}: {exc}")
    except OSError as exc:
        if exc.filename is not None and exc.strerror:
            return _usage(f"cannot read {exc.filename}: {exc.strerror}")
        return _usage(f"cannot read {exc}")
    out = sys.stdout
    if args.json:
        json.dump([row.to_json() for row in rows], out, indent=2)
        out.write("\n")
    else:
        _print_table(out, rows, args, paths)
    if malformed:
        noun = "line" if malformed == 1 else "lines"
        print(f"{malformed} malformed {noun} skipped", file=sys.stderr)
    return 0


def _usage(message: str) -> int:
    print(f"resolver audit: {message}", file=sys.stderr)
    return 2


def _print_table(out: TextIO, rows: list[Row], args: argparse.Namespace, paths: list[Path]) -> None:
    filters = []
    if args.since is not None:
        filters.append(f"since {args.since}")
    if args.until is not None:
        filters.append(f"until {args.until}")
    if args.list is not None:
        filters.append(f"list {args.list}")
    if args.client is not None:
        filters.append(f"client {args.client}")
    if args.client_id is not None:
        filters.append(f"client id {args.client_id}")
    out.write("Blocked and monitored queries by list and client\n")
    out.write(f"Filters: {', '.join(filters) if filters else 'none'}\n")
    sources = [str(path) for path in paths]
    if args.store is not None:
        sources.append("query store")
    out.write(f"Files: {', '.join(sources)}\n\n")
    if not rows:
        out.write("No blocked or monitored queries match.\n")
        return
    header = ("LIST", "CLIENT", "BLOCKED", "MONITORED", "FIRST SEEN", "LAST SEEN", "NAMES")
    table = [
        (
            row.list_id,
            f"{row.client} [{row.client_id}]" if row.client_id else row.client,
            str(row.blocked),
            str(row.monitored),
            _short_time(row.first_seen),
            _short_time(row.last_seen),
            row.names_text(),
        )
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in (header, *table)) for i in range(len(header) - 1)]
    numeric = {2, 3}  # counts line up on the right
    for cells in (header, *table):
        parts = [
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=False))
        ]
        parts.append(cells[-1])  # the names, last and unpadded: they vary most in width
        out.write("  ".join(parts).rstrip() + "\n")
    clients = len({row.client for row in rows})
    blocked = sum(row.blocked for row in rows)
    monitored = sum(row.monitored for row in rows)
    out.write(
        f"\n{len(rows)} rows: {blocked} blocked and {monitored} monitored queries "
        f"from {clients} clients\n"
    )


def _short_time(when: float) -> str:
    """Seconds are enough in a table read by people; the JSON output keeps milliseconds."""
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
