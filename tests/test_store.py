"""The query store: audit records into real SQLite files and a real PostgreSQL cluster,
through the real server (queries on loopback), searched through the admin API and read by
``resolver audit``; retention, an outage of the database, and a mixed log on stdin."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest

from resolver.cli.audit import main as audit_main
from resolver.config import Listen, load_config
from resolver.observe.querylog import AuditConfig
from resolver.observe.store import QueryStore, find_store
from resolver.observe.storeconfig import StoreConfig
from resolver.observe.storedb import Search
from resolver.yamlload import SourceError

from .helpers import postgres
from .helpers.client import ask
from .helpers.fakeupstream import FakeUpstream
from .helpers.http import TOKEN, check_against_spec, http, urls
from .helpers.realservers import ResolverProcess, free_port
from .helpers.server import RunningServer
from .helpers.wait import wait_for

LOOPBACK = Listen("127.0.0.1", 0)
KEY = "0123456789abcdef-key"
#: Two client groups (the tests query from 127.0.0.1: office), the admin API, /metrics.
WATCHED: dict[str, Any] = {
    "groups": (("office", ("127.0.0.0/8",)), ("lab", ("10.0.0.0/8",))),
    "admin": LOOPBACK,
    "admin_token": TOKEN,
    "metrics": LOOPBACK,
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[postgres.Cluster]:
    """A throwaway PostgreSQL cluster, started for this module's tests and stopped after."""
    bin_dir = postgres.binaries()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL binaries absent (/usr/lib/postgresql/*/bin: apt install postgresql)"
        )
    pytest.importorskip("psycopg", reason="psycopg absent: pip install 'psycopg[binary]'")
    # Not under pytest's temporary folder: that is private to root, and the cluster may
    # run as the postgres user.
    folder = Path(tempfile.mkdtemp(prefix="resolver-pg-"))
    try:
        running = postgres.Cluster(folder, bin_dir)
        running.start()
        try:
            yield running
        finally:
            running.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _search(running: RunningServer, **params: Any) -> tuple[int, Any]:
    query = urllib.parse.urlencode(params)
    url = f"http://127.0.0.1:{running.server.admin_port}/v1/queries?{query}"
    status, doc, _ = http(url, token=TOKEN)
    check_against_spec("/v1/queries", "GET", status, doc)
    return status, doc


def _wait_rows(running: RunningServer, count: int, **params: Any) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        status, doc = _search(running, limit=1000, **params)
        rows = doc["queries"] if status == 200 else []
        if len(rows) >= count:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"{len(rows)} rows in the store, expected {count}")


def _metric(running: RunningServer, name: str) -> float:
    _, text, _ = http(f"http://127.0.0.1:{running.server.metrics_port}/metrics")
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _exercise(running: RunningServer) -> None:
    """Six queries: two blocked (a name and a name under it), four forwarded."""
    assert running.query("deepseek.com").rcode() == dns.rcode.NXDOMAIN
    assert running.query("chat.deepseek.com").rcode() == dns.rcode.NXDOMAIN
    for name in ("example.test", "www.example.test", "allowed.test", "notdeepseek.com"):
        assert running.query(name).rcode() == dns.rcode.NOERROR


def _check_searches(running: RunningServer) -> None:
    rows = _wait_rows(running, 6)
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
    blocked = _search(running, name="deepseek.com")[1]["queries"]
    assert sorted(r["qname"] for r in blocked) == ["chat.deepseek.com.", "deepseek.com."]
    assert {(r["decision"], r["list"]) for r in blocked} == {("blocked", "deepseek")}
    assert len(_search(running, decision="blocked")[1]["queries"]) == 2
    assert len(_search(running, list="deepseek")[1]["queries"]) == 2
    assert len(_search(running, client="127.0.0.1")[1]["queries"]) == 6
    assert _search(running, client="10.9.9.9")[1]["queries"] == []
    assert len(_search(running, group="office")[1]["queries"]) == 6
    assert _search(running, group="lab")[1]["queries"] == []
    assert _search(running, since="2999-01-01")[1]["queries"] == []
    assert len(_search(running, until="2999-01-01", since="2020-01-01")[1]["queries"]) == 6
    # Keyset pagination: pages of 4 then 2, no row twice, the last page has no cursor.
    first = _search(running, limit=4)[1]
    assert len(first["queries"]) == 4 and first["next_cursor"]
    second = _search(running, limit=4, cursor=first["next_cursor"])[1]
    assert len(second["queries"]) == 2 and second["next_cursor"] is None
    ids = [r["id"] for r in first["queries"] + second["queries"]]
    assert ids == sorted(set(ids), reverse=True)
    assert _search(running, cursor="garbage!")[0] == 400
    assert _search(running, decision="maybe")[0] == 400
    url = f"http://127.0.0.1:{running.server.admin_port}/v1/queries"
    assert http(url)[0] == 401  # behind the admin token


def test_sqlite_store_through_the_server_and_the_admin_api(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    path = tmp_path / "store" / "queries.sqlite3"
    running = make_server(
        audit=AuditConfig(sink="file", path=tmp_path / "audit.jsonl", what="all"),
        store=StoreConfig(kind="sqlite", path=path),
        **WATCHED,
    )
    _exercise(running)
    _check_searches(running)
    assert _metric(running, "resolver_store_rows_total") >= 6
    assert _metric(running, "resolver_store_up") == 1
    running.stop()
    # The JSON-lines log, kept beside the store, has the same records.
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 6
    # resolver audit reads the store: the two blocked queries, one row.
    out = io.StringIO()
    code = _audit_cli(["--store", str(path), "--json"], out)
    rows = json.loads(out.getvalue())
    assert code == 0 and [(r["list"], r["blocked"]) for r in rows] == [("deepseek", 2)]


def test_store_only_with_pseudonyms(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    running = make_server(
        audit=AuditConfig(what="blocked", pseudonymize_key=KEY),
        store=StoreConfig(kind="sqlite", path=tmp_path / "q.sqlite3"),
        admin=LOOPBACK,
        admin_token=TOKEN,
    )
    _exercise(running)
    rows = _wait_rows(running, 2)
    assert len(rows) == 2  # log: blocked
    assert all(r["client"].startswith("anon-") for r in rows)
    # An address given to the search is pseudonymised as the stored clients are.
    assert len(_search(running, client="127.0.0.1")[1]["queries"]) == 2
    assert len(_search(running, client=rows[0]["client"])[1]["queries"]) == 2


def test_no_store_is_a_404(make_server: Callable[..., RunningServer]) -> None:
    running = make_server(admin=LOOPBACK, admin_token=TOKEN)
    assert _search(running)[0] == 404


def _record(store: QueryStore, when: float, name: str, decision: str = "blocked") -> None:
    store.record(
        when, "192.0.2.1", "udp", name, "A", "NXDOMAIN", decision, "l", "x", None, None, 0.001
    )


def test_retention_by_age_and_by_rows(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    now = time.time()
    store = QueryStore(
        StoreConfig(kind="sqlite", max_age=3600, max_rows=5), AuditConfig(what="all"), str(path)
    )
    for i in range(3):
        _record(store, now - 7200, f"old{i}.test.")  # older than max_age
    for i in range(8):
        _record(store, now - 10 + i, f"new{i}.test.")
    store.close()  # never started: writes and prunes on this thread
    rows = store.search(Search(limit=100))
    assert [r["qname"] for r in rows] == [f"new{i}.test." for i in range(7, 2, -1)]
    assert store.rows == 11 and store.pruned == 6


def test_store_on_postgresql_survives_an_outage(
    make_server: Callable[..., RunningServer], cluster: postgres.Cluster
) -> None:
    running = make_server(
        audit=AuditConfig(what="all"),
        store=StoreConfig(kind="postgresql", dsn=cluster.dsn, queue_size=50),
        **WATCHED,
    )
    _exercise(running)
    _check_searches(running)
    before = len(_search(running, limit=1000)[1]["queries"])
    cluster.stop()
    try:
        # Answering goes on while the database is away; the queue (50) fills, the rest
        # is dropped and counted.
        for i in range(120):
            assert running.query(f"outage{i}.example.test").rcode() in (0, 2, 3)
        assert find_store(running.resolver.audit) is not None
        deadline = time.monotonic() + 5
        while _metric(running, 'resolver_store_dropped_total{reason="full"}') < 1:
            assert time.monotonic() < deadline, "no drop counted while the database was away"
            time.sleep(0.1)
        assert _metric(running, "resolver_store_up") == 0
        assert _search(running)[0] == 503
    finally:
        cluster.start()
    # The writer reconnects (backoff at most 10 s) and writes what it queued.
    deadline = time.monotonic() + 20
    while _metric(running, "resolver_store_up") != 1 or _metric(running, "resolver_store_queue"):
        assert time.monotonic() < deadline, "the store did not reconnect"
        time.sleep(0.2)
    for i in range(5):
        running.query(f"after{i}.example.test")
    deadline = time.monotonic() + 20
    while True:
        status, doc = _search(running, limit=1000)
        rows = doc["queries"] if status == 200 else []
        names = {r["qname"] for r in rows}
        if all(f"after{i}.example.test." in names for i in range(5)):
            break
        assert time.monotonic() < deadline, "rows after the restart did not arrive"
        time.sleep(0.2)
    dropped = _metric(running, 'resolver_store_dropped_total{reason="full"}')
    outage = [n for n in names if n.startswith("outage")]
    # What was queued within the bound was written when the database came back.
    assert len(outage) >= 40 and len(outage) + dropped >= 120
    assert len(rows) >= before + len(outage) + 5


JOURNAL = """\
-- Logs begin at Mon 2026-12-07 10:00:00 UTC. --
Dec 07 10:00:01 host resolver[812]: resolver: listening on 127.0.0.1:53 (udp)
Dec 07 10:00:02 host resolver[812]: {"time":"2026-12-07T10:00:02.000Z","client":"10.1.2.3","proto":"udp","qname":"chat.deepseek.com.","qtype":"A","rcode":"NXDOMAIN","decision":"blocked","list":"deepseek"}
Dec 07 10:00:03 host resolver[812]: audit log: something { not json
Dec 07 10:00:04 host resolver[812]: {"time":"2026-12-07T10:00:04.000Z","client":"10.1.2.4","proto":"udp","qname":"deepseek.com.","qtype":"A","rcode":"NOERROR","decision":"monitored","list":"deepseek"}
{"time":"2026-12-07T10:00:05.000Z","client":"10.1.2.3","proto":"udp","qname":"x.deepseek.com.","qtype":"A","rcode":"NXDOMAIN","decision":"blocked","list":"deepseek"}
Dec 07 10:00:06 host systemd[1]: Stopping resolver...
"""


def _audit_cli(argv: list[str], out: io.StringIO, stdin: str = "") -> int:
    saved = sys.stdout, sys.stdin
    sys.stdout = out
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode()))
    try:
        return audit_main(argv)
    finally:
        sys.stdout, sys.stdin = saved


def test_audit_reads_a_mixed_journal_from_stdin(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    code = _audit_cli(["-", "--json"], out, JOURNAL)
    rows = {(r["client"], r["blocked"], r["monitored"]) for r in json.loads(out.getvalue())}
    assert code == 0
    assert rows == {("10.1.2.3", 2, 0), ("10.1.2.4", 0, 1)}
    assert "malformed" not in capsys.readouterr().err  # quietly, in a mixed log


def test_audit_needs_a_source_and_a_readable_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _audit_cli([], io.StringIO()) == 2
    assert "--store" in capsys.readouterr().err
    assert _audit_cli(["--store", str(tmp_path / "absent.sqlite3")], io.StringIO()) == 2
    assert "cannot read the query store" in capsys.readouterr().err


def test_children_records_reach_the_primarys_store(tmp_path: Path, upstream: FakeUpstream) -> None:
    """--workers 2 with the store alone (no JSON log): the children relay their records."""
    path = tmp_path / "q.sqlite3"
    config = tmp_path / "resolver.yaml"
    config.write_text(
        f"admin: {{listen: '127.0.0.1:{free_port()}', token: {TOKEN}}}\n"
        f"metrics: {{listen: '127.0.0.1:{free_port()}'}}\n"
        "audit: {log: blocked}\n"
        f"store: {{kind: sqlite, path: {path}}}\n"
    )
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "ban.yaml").write_text("list: ban\ndomains: [deepseek.com]\n")
    proc = ResolverProcess(
        *("--config", str(config), "--blocklists", str(lists), "--listen", "127.0.0.1:0"),
        *("--upstream", upstream.address, "--workers", "2"),
        ready_text="workers answering on the same addresses",
    )
    try:
        names = [f"q{i}.deepseek.com" for i in range(40)]
        assert {ask(proc.port, name).rcode() for name in names} == {dns.rcode.NXDOMAIN}
        admin, _ = urls(proc)

        def stored() -> set[str]:
            status, doc, _ = http(f"{admin}/v1/queries?limit=1000", token=TOKEN)
            assert status in (200, 503), doc  # 503: the file is not made yet
            return {row["qname"] for row in doc["queries"]} if status == 200 else set()

        wait_for(lambda: stored() == {name + "." for name in names})
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("{kind: postgresql}", ":2:8: store.dsn: required with kind: postgresql"),
        ("{kind: mysql}", "store.kind: expected off, sqlite or postgresql"),
        ("{kind: sqlite, max_age: 30 days}", "store.max_age: expected an age such as 30d"),
        ("{kind: sqlite, max_rows: 0}", "store.max_rows: expected a whole number from 1"),
        ("{kind: sqlite, dns: x}", "store.dns: unknown key"),
    ],
)
def test_store_config_errors_name_the_key(tmp_path: Path, section: str, message: str) -> None:
    config = tmp_path / "resolver.yaml"
    config.write_text(f"listen: ['127.0.0.1:5399']\nstore: {section}\n")
    with pytest.raises(SourceError, match=re.escape(message)):
        load_config(config)


def test_store_config_defaults_and_relative_path(tmp_path: Path) -> None:
    config = tmp_path / "resolver.yaml"
    config.write_text("store: {kind: sqlite, path: q.sqlite3, max_age: 2w, queue_size: 10}\n")
    store = load_config(config).store
    assert store == StoreConfig(
        kind="sqlite", path=tmp_path / "q.sqlite3", max_age=14 * 86400.0, queue_size=10
    )
    assert load_config_text(tmp_path, "store: {kind: off}\n").store == StoreConfig()


def load_config_text(folder: Path, text: str) -> Any:
    path = folder / "other.yaml"
    path.write_text(text)
    return load_config(path)


def test_a_postgresql_table_of_version_1_gets_the_client_id_column(
    cluster: postgres.Cluster,
) -> None:
    psycopg = pytest.importorskip("psycopg")
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS queries")
        conn.execute(
            "CREATE TABLE queries (id BIGSERIAL PRIMARY KEY, t DOUBLE PRECISION NOT NULL, "
            "client TEXT NOT NULL, groups TEXT NOT NULL, proto TEXT NOT NULL, "
            'qname TEXT NOT NULL, rname TEXT COLLATE "C" NOT NULL, qtype TEXT NOT NULL, '
            "rcode TEXT NOT NULL, decision TEXT NOT NULL, list TEXT, rule TEXT, "
            "reference TEXT, upstream TEXT, duration_ms DOUBLE PRECISION)"
        )
        conn.execute(
            "INSERT INTO queries (t, client, groups, proto, qname, rname, qtype, rcode, "
            "decision) VALUES (%s, 'c', ',', 'udp', 'a.test.', 'test.a.', 'A', 'NOERROR', "
            "'forwarded')",
            (time.time() - 60,),
        )
    # Read as it is (read-only): the old row.
    assert [r["qname"] for r in QueryStore(
        StoreConfig(kind="postgresql"), AuditConfig(what="all"), cluster.dsn
    ).search(Search(limit=5))] == ["a.test."]  # fmt: skip
    store = QueryStore(StoreConfig(kind="postgresql"), AuditConfig(what="all"), cluster.dsn)
    store.record(time.time(), "c", "doh", "b.test.", "A", "NOERROR", "forwarded", None, None,
                 None, None, 0.001, "phone-2")  # fmt: skip
    store.close()
    rows = store.search(Search(limit=5))
    assert [(r["qname"], r.get("client_id")) for r in rows] == [
        ("b.test.", "phone-2"),
        ("a.test.", None),
    ]
    assert [r["qname"] for r in store.search(Search(client_id="phone-2"))] == ["b.test."]
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE queries")  # the other tests start from an empty database
