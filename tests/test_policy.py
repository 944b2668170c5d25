"""The list loader and the compiled matcher: windows on both sides of every boundary, time
zones and DST, precedence, and errors that name file, line, column and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from resolver.core.wire import encode_name, label_offsets
from resolver.policy import Policy, load_policy
from resolver.policy.timewindow import TimeValueError, parse_instant, zone
from resolver.yamlload import SourceError

from .helpers.policy import utc, write

BRUSSELS = zone("Europe/Brussels")

INSTANTS = [
    # (value, zone, the same instant in UTC)
    ("2025-02-26", "Europe/Brussels", "2025-02-25T23:00:00"),  # CET, UTC+1
    ("2025-07-01", "Europe/Brussels", "2025-06-30T22:00:00"),  # CEST, UTC+2
    ("2025-02-26", "UTC", "2025-02-26T00:00:00"),
    ("2025-02-26", "America/New_York", "2025-02-26T05:00:00"),
    ("2025-02-26", "Asia/Shanghai", "2025-02-25T16:00:00"),
    ("2025-02-26T08:30", "Europe/Brussels", "2025-02-26T07:30:00"),
    ("2025-02-26T08:30:00+05:00", "Europe/Brussels", "2025-02-26T03:30:00"),
    ("2025-02-26T08:30:00Z", "Europe/Brussels", "2025-02-26T08:30:00"),
    ("2025-03-30T03:00", "Europe/Brussels", "2025-03-30T01:00:00"),  # just after the gap
]


@pytest.mark.parametrize(("value", "tz", "expected"), INSTANTS)
def test_policy_times_land_on_the_right_instant(value: str, tz: str, expected: str) -> None:
    assert parse_instant(value, zone(tz)) == utc(expected)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2025-03-30T02:30", "does not exist in Europe/Brussels"),  # spring forward
        ("2025-10-26T02:30", "happens twice in Europe/Brussels"),  # fall back
        ("2025-02-30", "is not a valid date"),
        ("26/02/2025", "is not a valid date"),
        ("tomorrow", "is not a valid date"),
        ("2025-02-26T25:00", "is not a valid date"),
    ],
)
def test_bad_times_are_errors_not_guesses(value: str, message: str) -> None:
    with pytest.raises(TimeValueError, match=message):
        parse_instant(value, BRUSSELS)


def decide(policy: Policy, name: str, now: float, mask: int = 1) -> tuple[str | None, float]:
    wire = encode_name(name)
    rule, _apex, _monitor, until = policy.decide(wire, label_offsets(wire), mask, now)
    return (rule.blocklist.id if rule else None), until


BAN = """\
list: ban
timezone: Europe/Brussels
active: {from: 2025-02-26, until: 2025-03-01}
domains:
  - deepseek.com
  - {name: late.example, active: {from: 2025-02-27}}
"""
START = utc("2025-02-25T23:00:00")
END = utc("2025-02-28T23:00:00")
LATE = utc("2025-02-26T23:00:00")

# (name, instant, expected list or None, expected next change)
WINDOW_TABLE = [
    ("deepseek.com", START - 0.001, None, START),
    ("deepseek.com", START, "ban", END),
    ("chat.deepseek.com", START + 1, "ban", END),
    ("deepseek.com", END - 0.001, "ban", END),
    ("deepseek.com", END, None, float("inf")),
    ("notdeepseek.com", START + 1, None, float("inf")),
    ("late.example", START + 1, None, LATE),  # rule window starts later than the list's
    ("late.example", LATE, "ban", END),
    ("x.late.example", END, None, float("inf")),
]


@pytest.mark.parametrize(("name", "now", "blocked_by", "until"), WINDOW_TABLE)
def test_windows_on_both_sides_of_each_boundary(
    tmp_path: Path, name: str, now: float, blocked_by: str | None, until: float
) -> None:
    write(tmp_path, "ban.yaml", BAN)
    policy = load_policy(tmp_path)
    assert decide(policy, name, now) == (blocked_by, until)


def test_longest_match_wins_then_list_order(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "list: a\ndomains: [example.com]\n")
    write(tmp_path, "b.yaml", "list: b\ndomains: [chat.example.com, example.com]\n")
    policy = load_policy(tmp_path)
    assert decide(policy, "chat.example.com", 0)[0] == "b"
    assert decide(policy, "x.chat.example.com", 0)[0] == "b"
    assert decide(policy, "www.example.com", 0)[0] == "a"  # a.yaml sorts first


def test_a_pending_longer_rule_bounds_the_verdict_of_a_shorter_one(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "list: a\ndomains: [example.com]\n")
    write(
        tmp_path,
        "b.yaml",
        "list: b\nactive: {from: '2030-01-01T00:00Z'}\ndomains: [x.example.com]\n",
    )
    policy = load_policy(tmp_path)
    assert decide(policy, "x.example.com", 0) == ("a", utc("2030-01-01T00:00:00"))


def test_subfolders_are_read_and_hidden_entries_skipped(tmp_path: Path) -> None:
    write(tmp_path, "gov/ai/deepseek.yaml", "list: deepseek\ndomains: [deepseek.com]\n")
    write(tmp_path, "..2025_01_01/deepseek.yaml", "list: deepseek\ndomains: [deepseek.com]\n")
    write(tmp_path, ".swap.yaml", "not: [valid")
    write(tmp_path, "empty.yaml", "# nothing yet\n")
    write(tmp_path, "notes.txt", "ignored")
    policy = load_policy(tmp_path)
    assert [b.id for b in policy.lists] == ["deepseek"]


def test_names_are_normalised(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "list: a\ndomains: [WWW.Example.COM., bücher.example]\n")
    policy = load_policy(tmp_path)
    assert decide(policy, "www.example.com", 0)[0] == "a"
    assert decide(policy, "xn--bcher-kva.example", 0)[0] == "a"


def test_digest_changes_with_content_only(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "list: a\ndomains: [example.com]\n")
    first = load_policy(tmp_path).digest
    assert load_policy(tmp_path).digest == first
    write(tmp_path, "a.yaml", "list: a\ndomains: [example.org]\n")
    assert load_policy(tmp_path).digest != first


# (file text, expected "line:column: field: message" fragment)
ERRORS = [
    ("list: a\ndomain: [x.com]\n", "2:1: domain: unknown key in a list"),
    (
        "list: a\ndomains: [x.com]\ndomains: [y.com]\n",
        "3:1: domains: key repeated (first at line 2)",
    ),
    ("domains: [x.com]\n", "1:1: list: required key is missing"),
    ("list: A B\n", "1:7: list: 'A B': a list id is"),
    ("list: a\ntimezone: Europe/Brusels\n", "2:11: timezone: unknown IANA time zone"),
    (
        "list: a\nactive: {from: 2025-02-30}\n",
        "2:16: active.from: '2025-02-30' is not a valid date",
    ),
    ("list: a\nactive: {form: 2025-02-26}\n", "2:10: form: unknown key in active"),
    (
        "list: a\nactive: {from: 2025-03-01, until: 2025-02-01}\n",
        "2:35: active.until: 'until' is not after 'from'",
    ),
    ("list: a\naction: block\n", "2:9: action: unknown action 'block'"),
    ("list: a\naction: {sinkhole: {a: ['::1']}}\n", "action.sinkhole.a: '::1' is not an IPv4"),
    ("list: a\naction: {sinkhole: {}}\n", "action.sinkhole: give at least one address"),
    ("list: a\nttl: -1\n", "2:6: ttl: expected seconds from 0 to 86400"),
    ("list: a\ndomains:\n  - ok.com\n  - 'bad name.com'\n", "4:5: domains[1]: 'bad name.com'"),
    ("list: a\ndomains:\n  - {name: x.com, from: 2025}\n", "3:19: from: unknown key in domains[0]"),
    ("list: a\ndomains: [.]\n", "2:11: domains[0]: the root cannot be blocked"),
    ("list: a\ndomains: [" + "a" * 64 + ".com]\n", "2:11: domains[0]"),
    ("list: a\ndomains: x.com\n", "2:10: domains: expected a list under 'domains'"),
    ("list: a\n  bad indent: [\n", "YAML syntax error"),
    ("- just\n- a list\n", "1:1: a list file must be a YAML mapping"),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS)
def test_errors_name_file_line_column_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "list.yaml", text)
    with pytest.raises(SourceError) as caught:
        load_policy(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{path}:")
    assert expected in message


def test_duplicate_list_ids_across_files(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "list: same\n")
    second = write(tmp_path, "b.yaml", "\nlist: same\n")
    with pytest.raises(SourceError, match=rf"{second}:2:1: list: list id 'same' is already used"):
        load_policy(tmp_path)


def test_shipped_policy_loads_and_bans_deepseek_from_its_date() -> None:
    policy = load_policy(Path(__file__).resolve().parent.parent / "blocklists")
    effective = utc("2025-02-25T23:00:00")  # 2025-02-26 00:00 Europe/Brussels
    assert decide(policy, "chat.deepseek.com", effective - 1)[0] is None
    assert decide(policy, "chat.deepseek.com", effective)[0] == "deepseek"
    assert decide(policy, "api.deepseek.com", utc("2026-11-28T12:00:00"))[0] == "deepseek"
    (deepseek,) = [b for b in policy.lists if b.id == "deepseek"]
    assert deepseek.reference and deepseek.timezone.key == "Europe/Brussels"
