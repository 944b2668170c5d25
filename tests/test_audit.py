"""``resolver audit``: the report built from logs written by the real AuditLog."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from resolver.cli.audit import Row, main, report
from resolver.observe.querylog import AuditConfig, AuditLog

# 2026-06-01T12:00:00Z
T0 = 1780315200.0
DAY = 86400.0
KEY = "0123456789abcdef0123"

# (offset from T0, client, qname, decision, list): what the fixture log holds.
ENTRIES: list[tuple[float, str, str, str, str | None]] = [
    (0, "10.0.0.1", "chat.deepseek.com.", "blocked", "ai"),
    (60, "10.0.0.1", "chat.deepseek.com.", "blocked", "ai"),
    (120, "10.0.0.1", "api.deepseek.com.", "monitored", "ai"),
    (3600, "10.0.0.1", "api.deepseek.com.", "blocked", "ai"),
    (5, "::ffff:10.0.0.3", "deepseek.com.", "blocked", "ai"),
    (DAY, "10.0.0.2", "deepseek.com.", "monitored", "ai"),
    *((2 * DAY + n, "192.168.1.5", f"n{n}.deepseek.com.", "blocked", "ai") for n in range(7)),
    (10, "10.0.0.2", "casino.example.", "blocked", "gambling"),
    (11, "10.0.0.2", "casino.example.", "blocked", "gambling"),
    (0, "2001:db8::7", "social.example.", "blocked", "social"),
    # Not blocked: left out of every report.
    (1, "10.0.0.9", "example.org.", "allowed", None),
    (2, "10.0.0.9", "example.org.", "forwarded", None),
    (3, "10.0.0.9", "example.org.", "cached", None),
]


def write_log(
    path: Path, entries: list[tuple[float, str, str, str, str | None]], **kw: object
) -> None:
    """Write ``entries`` through AuditLog with its writer thread, as the server does."""
    log = AuditLog(AuditConfig(sink="file", path=path, what="all", **kw))  # type: ignore[arg-type]
    log.start()
    for offset, client, qname, decision, list_id in entries:
        log.record(T0 + offset, client, "udp", qname, "A", "NXDOMAIN", decision, list_id, "rule")
    log.close()
    assert log.dropped == 0


@pytest.fixture
def audit_log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    write_log(path, ENTRIES)
    return path


def summary(rows: list[Row]) -> list[tuple[str, str, int, int]]:
    return [(r.list_id, r.client, r.blocked, r.monitored) for r in rows]


ALL = [
    ("ai", "192.168.1.5", 7, 0),
    ("ai", "10.0.0.1", 3, 1),
    ("ai", "10.0.0.2", 0, 1),
    ("ai", "::ffff:10.0.0.3", 1, 0),
    ("gambling", "10.0.0.2", 2, 0),
    ("social", "2001:db8::7", 1, 0),
]


def test_report_without_filters(audit_log: Path) -> None:
    rows, malformed = report([audit_log], None, None, None, None)
    assert malformed == 0
    assert summary(rows) == ALL
    first = rows[0]
    assert first.names == tuple(f"n{n}.deepseek.com." for n in range(5))
    assert first.more_names == 2
    assert first.names_text().endswith("n4.deepseek.com. +2 more")
    assert (first.first_seen, first.last_seen) == (T0 + 2 * DAY, T0 + 2 * DAY + 6)
    # The most queried name first.
    assert rows[1].names == ("api.deepseek.com.", "chat.deepseek.com.")
    assert rows[1].names_text() == "api.deepseek.com., chat.deepseek.com."


@pytest.mark.parametrize(
    ("since", "until", "list_id", "client", "expected"),
    [
        # A date is UTC midnight; since is inclusive, until exclusive.
        (T0 + 12 * 3600, None, None, None, [ALL[0], ("ai", "10.0.0.2", 0, 1)]),
        (None, T0 + 60, None, None, [("ai", "10.0.0.1", 1, 0), ALL[3], ALL[4], ALL[5]]),
        (T0 + 60, T0 + 3601, "ai", None, [("ai", "10.0.0.1", 2, 1)]),
        (None, None, "gambling", None, [ALL[4]]),
        (None, None, "no-such-list", None, []),
        (None, None, None, "10.0.0.0/24", [ALL[1], ALL[2], ALL[3], ALL[4]]),  # ::ffff:a.b.c.d too
        (None, None, None, "10.0.0.1", [ALL[1]]),
        (None, None, None, "10.0.0.3", [ALL[3]]),
        (None, None, None, "2001:db8::/32", [ALL[5]]),
        (None, None, "ai", "192.168.0.0/16", [ALL[0]]),
    ],
)
def test_report_filters(
    audit_log: Path,
    since: float | None,
    until: float | None,
    list_id: str | None,
    client: str | None,
    expected: list[tuple[str, str, int, int]],
) -> None:
    rows, _ = report([audit_log], since, until, list_id, client)
    assert summary(rows) == expected


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_main_table(audit_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, str(audit_log))
    assert code == 0
    assert err == ""
    lines = out.splitlines()
    assert lines[1] == "Filters: none"
    assert lines[2] == f"Files: {audit_log}"
    header = next(i for i, line in enumerate(lines) if line.startswith("LIST"))
    table = lines[header : header + 1 + len(ALL)]
    # Aligned: every column starts at the same offset on every line.
    client_at = table[0].index("CLIENT")
    first_at = table[0].index("FIRST SEEN")
    names_at = table[0].index("NAMES")
    for line, (list_id, client, _, _) in zip(table[1:], ALL, strict=True):
        assert line.startswith(list_id)
        assert line[client_at:].startswith(client)
        assert line[first_at : first_at + 4] == "2026"
        assert line[names_at - 2 : names_at] == "  " and line[names_at] != " "
    assert table[1].split()[2:6] == ["7", "0", "2026-06-03", "12:00:00Z"]
    assert "n0.deepseek.com., n1.deepseek.com." in table[1] and table[1].endswith("+2 more")
    assert lines[-1] == "6 rows: 14 blocked and 2 monitored queries from 5 clients"


def test_main_filters_in_header(audit_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        str(audit_log),
        "--since",
        "2026-06-01",
        "--until",
        "2026-06-01T13:30:00+01:00",
        "--list",
        "ai",
        "--client",
        "10.0.0.0/8",
    )
    assert code == 0
    assert (
        "Filters: since 2026-06-01, until 2026-06-01T13:30:00+01:00, list ai, client 10.0.0.0/8"
        in out
    )
    rows = [line.split() for line in out.splitlines() if line.startswith("ai ")]
    assert [r[:4] for r in rows] == [
        ["ai", "10.0.0.1", "2", "1"],
        ["ai", "::ffff:10.0.0.3", "1", "0"],
    ]


def test_main_no_match(audit_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(audit_log), "--list", "none-such")
    assert code == 0
    assert out.splitlines()[-1] == "No blocked or monitored queries match."


def test_main_json(audit_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(audit_log), "--json", "--client", "192.168.1.5")
    assert code == 0
    assert json.loads(out) == [
        {
            "list": "ai",
            "client": "192.168.1.5",
            "blocked": 7,
            "monitored": 0,
            "first_seen": "2026-06-03T12:00:00.000Z",
            "last_seen": "2026-06-03T12:00:06.000Z",
            "names": [f"n{n}.deepseek.com." for n in range(5)],
            "more_names": 2,
        }
    ]
    code, out, _ = run(capsys, str(audit_log), "--json")
    assert [(r["list"], r["client"]) for r in json.loads(out)] == [a[:2] for a in ALL]


def test_malformed_lines_are_skipped_and_counted(
    audit_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with audit_log.open("a") as file:
        file.write("not json\n")
        file.write("\n")  # blank: not counted
        file.write("[1, 2]\n")
        file.write(
            '{"time": "yesterday", "client": "10.0.0.1", "qname": "a.", "decision": "blocked"}\n'
        )
        file.write(
            '{"time": "2026-06-01T12:00:00Z", "client": 7, "qname": "a.", "decision": "blocked"}\n'
        )
        file.write('{"time":"2026-06-01T12:00:00.000Z","client":"10.0.0.1","qna')  # cut short
    rows, malformed = report([audit_log], None, None, None, None)
    assert malformed == 5
    assert summary(rows) == ALL
    code, out, err = run(capsys, str(audit_log))
    assert code == 0
    assert err == "5 malformed lines skipped\n"
    code, out, err = run(capsys, str(audit_log), "--json")
    assert json.loads(out) and err == "5 malformed lines skipped\n"


def test_multiple_files_rotated_and_gzip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    # A small max_size, so that the writer itself rotates the log into several files.
    write_log(path, ENTRIES, max_bytes=1000, keep=20)
    files = sorted(tmp_path.iterdir())
    assert len(files) > 3
    # Compress one rotated file, as logrotate would.
    rotated = tmp_path / "audit.jsonl.2"
    gz = tmp_path / "audit.jsonl.2.gz"
    gz.write_bytes(gzip.compress(rotated.read_bytes()))
    rotated.unlink()
    files = sorted(tmp_path.iterdir())
    rows, malformed = report(files, None, None, None, None)
    assert (summary(rows), malformed) == (ALL, 0)
    # A file named twice (audit.jsonl audit.jsonl*) is read once.
    rows, _ = report([path, *files], None, None, None, None)
    assert summary(rows) == ALL
    code, out, _ = run(capsys, *map(str, files), "--json")
    assert code == 0 and len(json.loads(out)) == len(ALL)
    assert any(str(gz) in line for line in run(capsys, *map(str, files))[1].splitlines()[:3])


def test_pseudonymised_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, ENTRIES, pseudonymize_key=KEY)
    rows, _ = report([path], None, None, None, None)
    # Still grouped per client, under pseudonyms.
    # (Equal totals sort by client, so the pseudonyms change the order among those.)
    counts = sorted((r.list_id, r.blocked, r.monitored) for r in rows)
    assert counts == sorted((list_id, b, m) for list_id, _, b, m in ALL)
    assert all(r.client.startswith("anon-") for r in rows)
    # A network cannot match a pseudonym (documented in --help).
    assert report([path], None, None, None, "10.0.0.0/8") == ([], 0)
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "pseudonymize_key" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give audit log files, - for standard input, or --store"),
        (
            ["--since", "last tuesday"],
            "resolver audit: --since: expected a date such as 2026-11-28",
        ),
        (["--until", "2026-13-01"], "resolver audit: --until: expected a date"),
        (
            ["--since", "2026-06-02", "--until", "2026-06-01"],
            "--since (2026-06-02) must be before --until (2026-06-01)",
        ),
        (["--client", "10.0.0.0/33"], "resolver audit: --client: expected an address or a network"),
        (["--client", "anon-0123456789abcdef"], "resolver audit: --client: expected an address"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments(
    audit_log: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    args = [str(audit_log), *argv] if argv else []
    code, out, err = run(capsys, *args)
    assert code == 2
    assert message in err
    assert out == ""


def test_unreadable_files(
    tmp_path: Path, audit_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.jsonl"
    code, out, err = run(capsys, str(audit_log), str(missing))
    assert (code, out) == (2, "")
    assert err == f"resolver audit: cannot read {missing}: No such file or directory\n"

    truncated = tmp_path / "audit.jsonl.1.gz"
    truncated.write_bytes(gzip.compress(audit_log.read_bytes())[:-20])
    code, out, err = run(capsys, str(truncated))
    assert (code, out) == (2, "")
    assert (
        err == f"resolver audit: cannot read {truncated}: compressed data ends early (truncated)\n"
    )

    code, out, err = run(capsys, str(tmp_path))
    assert code == 2 and "cannot read" in err
