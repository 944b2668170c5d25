"""The query store's additions for the console: the client id column (and its migration
from a SQLite file an older version made), the ``client_id`` filter, the CSV export and the
per-client counts, through the real server and real SQLite files."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import ssl
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest

from resolver.cli.audit import main as audit_main
from resolver.config import DoTConfig, Listen, TLSConfig
from resolver.observe.querylog import AuditConfig
from resolver.observe.store import QueryStore
from resolver.observe.storeconfig import StoreConfig
from resolver.observe.storedb import SQLITE_VERSION, Search
from resolver.service import queries

from .helpers.http import TOKEN, check_against_spec, http
from .helpers.server import RunningServer
from .helpers.testca import TestCA
from .helpers.wait import wait_for

LOOPBACK = Listen("127.0.0.1", 0)
#: The table as version 1 of the store made it (no client_id), with one row.
OLD_SCHEMA = """
CREATE TABLE queries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, t REAL NOT NULL, client TEXT NOT NULL,
    groups TEXT NOT NULL, proto TEXT NOT NULL, qname TEXT NOT NULL, rname TEXT NOT NULL,
    qtype TEXT NOT NULL, rcode TEXT NOT NULL, decision TEXT NOT NULL, list TEXT,
    rule TEXT, reference TEXT, upstream TEXT, duration_ms REAL);
INSERT INTO queries (t, client, groups, proto, qname, rname, qtype, rcode, decision, list)
VALUES (1780315200.0, '192.0.2.9', ',', 'udp', 'deepseek.com.', 'com.deepseek.', 'A',
        'NXDOMAIN', 'blocked', 'deepseek');
"""


def _record(store: QueryStore, name: str, client_id: str | None, decision: str = "blocked") -> None:
    store.record(
        time.time(), "192.0.2.1", "dot", name, "A", "NXDOMAIN", decision, "l", "x", None,
        None, 0.001, client_id,
    )  # fmt: skip


def _audit(argv: list[str]) -> tuple[int, str]:
    out, saved = io.StringIO(), sys.stdout
    sys.stdout = out
    try:
        return audit_main(argv), out.getvalue()
    finally:
        sys.stdout = saved


def test_an_old_sqlite_file_gets_the_client_id_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
    # Read as it is (resolver audit --store, read-only): the old row, no client id.
    code, out = _audit(["--store", str(path), "--json"])
    assert code == 0 and json.loads(out)[0]["client"] == "192.0.2.9"
    keep = StoreConfig(kind="sqlite", max_age=20 * 365 * 86400.0)  # the old row stays
    store = QueryStore(keep, AuditConfig(what="all"), str(path))
    _record(store, "chat.deepseek.com.", "laptop-7")
    _record(store, "other.test.", None, "forwarded")
    store.close()  # never started: writes on this thread
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SQLITE_VERSION
        names = [row[1] for row in conn.execute("PRAGMA table_info(queries)")]
    assert names[-1] == "client_id"
    rows = store.search(Search(limit=10))
    assert [r.get("client_id") for r in rows] == [None, "laptop-7", None]
    assert [r["qname"] for r in store.search(Search(client_id="laptop-7"))] == [
        "chat.deepseek.com."
    ]
    code, out = _audit(["--store", str(path), "--json", "--client-id", "laptop-7"])
    assert code == 0 and [r["client_id"] for r in json.loads(out)] == ["laptop-7"]
    # Opened again: already at the current version, nothing changes.
    QueryStore(keep, AuditConfig(what="all"), str(path)).close()
    assert len(store.search(Search(limit=10))) == 3


def test_client_ids_are_pseudonymised_and_searched_as_such(tmp_path: Path) -> None:
    audit = AuditConfig(what="all", pseudonymize_key="0123456789abcdef-key")
    store = QueryStore(StoreConfig(kind="sqlite"), audit, str(tmp_path / "q.sqlite3"))
    _record(store, "deepseek.com.", "laptop-7")
    store.close()
    row = store.search(Search(client_id="laptop-7"))[0]
    assert row["client_id"].startswith("anon-") and row["client_id"] != "laptop-7"
    assert store.search(Search(client_id=row["client_id"])) == [row]


def _rows(url: str) -> int:
    """Rows a search finds (0 while the store's file is not made yet: 503)."""
    status, doc, _ = http(url, token=TOKEN)
    return len(doc["queries"]) if status == 200 else 0


def _get(running: RunningServer, path: str, **params: Any) -> tuple[int, Any, str, Any]:
    url = f"http://127.0.0.1:{running.server.admin_port}{path}?{urllib.parse.urlencode(params)}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read().decode()
        return response.status, body, response.headers.get("Content-Type"), response.headers


def test_csv_export_without_limit_holds_every_row_up_to_its_bound(
    make_server: Callable[..., RunningServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console's export link is every matching row, not the page on screen (100 by
    default): paged through the store by keyset, bounded, and saying when it was cut."""
    running = make_server(
        audit=AuditConfig(what="all"),
        store=StoreConfig(kind="sqlite", path=tmp_path / "q.sqlite3"),
        admin=LOOPBACK,
        admin_token=TOKEN,
    )
    for index in range(7):
        running.query(f"n{index}.example.test")
    url = f"http://127.0.0.1:{running.server.admin_port}/v1/queries?limit=1000"
    wait_for(lambda: _rows(url) >= 7, 10)
    monkeypatch.setattr(queries, "EXPORT_PAGE", 2)  # pages of 2 rows
    _, body, _, headers = _get(running, "/v1/queries", format="csv", name="example.test")
    table = list(csv.reader(io.StringIO(body)))
    qname = table[0].index("qname")
    assert [row[qname] for row in table[1:]] == [f"n{i}.example.test." for i in range(6, -1, -1)]
    assert headers.get("X-Export-Truncated") is None
    monkeypatch.setattr(queries, "MAX_EXPORT_ROWS", 5)
    _, body, _, headers = _get(running, "/v1/queries", format="csv", name="example.test")
    assert len(list(csv.reader(io.StringIO(body)))) == 1 + 5
    assert headers["X-Export-Truncated"] == "true"
    # With a limit, the page it names, as before.
    _, body, _, headers = _get(running, "/v1/queries", format="csv", limit=3)
    assert len(list(csv.reader(io.StringIO(body)))) == 1 + 3 and "X-Export-Truncated" not in headers


def test_csv_export_and_per_client_counts(
    make_server: Callable[..., RunningServer], tmp_path: Path, lists_dir: Path
) -> None:
    (lists_dir / "watch.yaml").write_text(
        "list: watch\nreference: R\nmode: monitor\ndomains: [example.test]\n"
    )
    running = make_server(
        audit=AuditConfig(what="all"),
        store=StoreConfig(kind="sqlite", path=tmp_path / "q.sqlite3"),
        admin=LOOPBACK,
        admin_token=TOKEN,
    )
    assert running.query("deepseek.com").rcode() == dns.rcode.NXDOMAIN
    assert running.query("=cmd|calc.test").rcode() is not None  # a hostile name
    for _ in range(2):
        assert running.query("example.test").rcode() == dns.rcode.NOERROR  # would block
    url = f"http://127.0.0.1:{running.server.admin_port}/v1/queries?limit=1000"
    wait_for(lambda: _rows(url) >= 4, 10)

    status, body, ctype, headers = _get(running, "/v1/queries", format="csv", limit=1000)
    assert status == 200 and ctype.startswith("text/csv")
    assert headers["Content-Disposition"] == 'attachment; filename="queries.csv"'
    table = list(csv.reader(io.StringIO(body)))
    assert table[0][:4] == ["id", "time", "client", "groups"] and "client_id" in table[0]
    names = [row[table[0].index("qname")] for row in table[1:]]
    assert "deepseek.com." in names and "'=cmd|calc.test." in names  # no formula
    assert len(table) == 5
    status, body, _, _ = _get(running, "/v1/queries", format="csv", decision="blocked")
    assert len(list(csv.reader(io.StringIO(body)))) == 2  # the same filters
    assert http(url.replace("limit=1000", "format=xml"), token=TOKEN)[0] == 400

    status, doc, _ = http(url.replace("/v1/queries?", "/v1/queries/clients?"), token=TOKEN)
    check_against_spec("/v1/queries/clients", "GET", status, doc)
    (entry,) = doc["clients"]
    assert entry["client"] == "127.0.0.1" and entry["total"] == 4
    assert entry["blocked"] == 1 and entry["would_block"] == 2 and entry["last_seen"]
    since = http(url.replace("/v1/queries?", "/v1/queries/clients?") + "&since=2999-01-01",
                 token=TOKEN)[1]  # fmt: skip
    assert since == {"clients": []}
    assert http(url.replace("/v1/queries?limit=1000", "/v1/queries/clients?limit=0"),
                token=TOKEN)[0] == 400  # fmt: skip


def test_the_client_id_of_a_dot_client_reaches_the_store(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    ca = TestCA(tmp_path)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    ca.issue(cert, key, names=("dns.example.test", "*.dns.example.test", "127.0.0.1"))
    running = make_server(
        tls=TLSConfig(cert=cert, key=key, client_id_domain="dns.example.test"),
        dot=DoTConfig(listen=(Listen("127.0.0.1", 0),)),
        audit=AuditConfig(what="all"),
        store=StoreConfig(kind="sqlite", path=tmp_path / "q.sqlite3"),
        admin=LOOPBACK,
        admin_token=TOKEN,
    )
    dot = next(b.port for b in running.server.bound if b.proto == "dot")
    context = ssl.create_default_context(cafile=str(ca.path))
    query = dns.message.make_query("example.test", "A")
    reply = dns.query.tls(query, "127.0.0.1", port=dot, timeout=5, ssl_context=context,
                          server_hostname="laptop-7.dns.example.test")  # fmt: skip
    assert reply.rcode() == dns.rcode.NOERROR
    assert running.query("www.example.test").rcode() == dns.rcode.NOERROR  # no id
    base = f"http://127.0.0.1:{running.server.admin_port}/v1/queries"
    wait_for(lambda: _rows(f"{base}?limit=10") >= 2, 10)
    status, doc, _ = http(f"{base}?client_id=laptop-7", token=TOKEN)
    check_against_spec("/v1/queries", "GET", status, doc)
    assert [(r["qname"], r["client_id"], r["proto"]) for r in doc["queries"]] == [
        ("example.test.", "laptop-7", "dot")
    ]
    _, body, _, _ = _get(running, "/v1/queries", format="csv", client_id="laptop-7")
    table = list(csv.reader(io.StringIO(body)))
    assert table[1][table[0].index("client_id")] == "laptop-7"
