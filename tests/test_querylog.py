"""The audit log writer: line format, filtering, pseudonyms, rotation, drops, errors, config."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from resolver.observe.auditconfig import parse_config
from resolver.observe.querylog import AuditConfig, AuditLog

# 2026-06-01T12:00:00Z
T0 = 1780315200.0
KEY = "0123456789abcdef0123"
KEYS = [
    "time",
    "client",
    "proto",
    "qname",
    "qtype",
    "rcode",
    "decision",
    "list",
    "rule",
    "reference",
    "upstream",
    "duration_ms",
]


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of ``path`` as a JSON object; fails on a line that is not one."""
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "the file ends in the middle of a line"
    return [json.loads(line) for line in text.splitlines()]


def wait_for(condition: Callable[[], bool], deadline: float = 3.0) -> None:
    """Poll until ``condition`` holds (the writer thread works asynchronously)."""
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, "timed out waiting for the audit writer"
        time.sleep(0.002)


def counter_reaches(log: AuditLog, counter: str, value: int) -> Callable[[], bool]:
    """A condition for :func:`wait_for`: ``log.<counter>`` has reached ``value``."""
    return lambda: bool(getattr(log, counter) >= value)


def blocked(log: AuditLog, n: int, client: str = "10.0.0.1") -> None:
    log.record(T0 + n, client, "udp", f"n{n}.deepseek.com.", "A", "NXDOMAIN", "blocked", "ai")


def test_line_content_and_key_order(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "audit.jsonl"  # parents are created
    log = AuditLog(AuditConfig(sink="file", path=path, what="all"))
    log.start()
    log.record(
        T0 + 0.123,
        "10.1.2.3",
        "udp",
        "chat.deepseek.com.",
        "A",
        "NXDOMAIN",
        "blocked",
        list_id="ai-services",
        rule="deepseek.com",
        reference="Directive 2026-07",
        upstream="9.9.9.9:53",
        duration=0.000412,
    )
    log.record(T0 + 1.5, "::1", "tcp", 'odd"name\u00e9.', "AAAA", "NOERROR", "forwarded")
    log.close()

    text = path.read_text()
    assert text.isascii()  # non-ASCII is escaped, so any tool can read the log
    first, second = (json.loads(line) for line in text.splitlines())
    assert list(first) == KEYS
    assert first == {
        "time": "2026-06-01T12:00:00.123Z",
        "client": "10.1.2.3",
        "proto": "udp",
        "qname": "chat.deepseek.com.",
        "qtype": "A",
        "rcode": "NXDOMAIN",
        "decision": "blocked",
        "list": "ai-services",
        "rule": "deepseek.com",
        "reference": "Directive 2026-07",
        "upstream": "9.9.9.9:53",
        "duration_ms": 0.412,
    }
    assert '"duration_ms":0.412}' in text.splitlines()[0]
    # Keys whose value is None are left out, the others keep their order.
    assert list(second) == ["time", "client", "proto", "qname", "qtype", "rcode", "decision"]
    assert second["qname"] == 'odd"name\u00e9.'
    assert second["time"] == "2026-06-01T12:00:01.500Z"
    assert log.written == 2
    assert log.dropped == 0


@pytest.mark.parametrize(
    ("when", "text"),
    [
        (T0, "2026-06-01T12:00:00.000Z"),
        (T0 + 0.0005, "2026-06-01T12:00:00.000Z"),  # truncated to the millisecond
        (T0 + 0.9999, "2026-06-01T12:00:00.999Z"),
        (T0 + 59.999, "2026-06-01T12:00:59.999Z"),
        (0.0, "1970-01-01T00:00:00.000Z"),
    ],
)
def test_time_format(when: float, text: str) -> None:
    out = io.StringIO()
    log = AuditLog(AuditConfig(sink="stdout"), stream=out)
    log.record(when, "10.0.0.1", "udp", "a.", "A", "NXDOMAIN", "blocked")
    log.close()
    assert json.loads(out.getvalue())["time"] == text


def test_nan_duration_is_left_out() -> None:
    out = io.StringIO()
    log = AuditLog(AuditConfig(sink="stdout"), stream=out)
    log.record(T0, "10.0.0.1", "udp", "a.", "A", "NXDOMAIN", "blocked", duration=float("nan"))
    log.close()
    assert "duration_ms" not in json.loads(out.getvalue())


DECISIONS = ["blocked", "monitored", "allowed", "cached", "forwarded", "refused", "error"]


@pytest.mark.parametrize(
    ("sink", "what", "wanted"),
    [
        ("stdout", "all", set(DECISIONS)),
        ("stdout", "blocked", {"blocked", "monitored"}),
        ("off", "all", set()),
        ("off", "blocked", set()),
    ],
)
def test_wants_and_what_filtering(sink: str, what: str, wanted: set[str]) -> None:
    out = io.StringIO()
    log = AuditLog(AuditConfig(sink=sink, what=what), stream=out)
    assert {d for d in DECISIONS if log.wants(d)} == wanted
    assert not log.wants("no-such-decision")
    log.start()
    for decision in DECISIONS:
        # record() applies the same filter, for a caller that did not ask wants() first.
        log.record(T0, "10.0.0.1", "udp", "a.", "A", "NOERROR", decision)
    log.close()
    assert {json.loads(line)["decision"] for line in out.getvalue().splitlines()} == wanted
    assert log.written == len(wanted)


def test_default_stream_is_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    log = AuditLog(AuditConfig(sink="stdout"))
    log.start()
    blocked(log, 1)
    log.close()
    assert json.loads(capsys.readouterr().out)["qname"] == "n1.deepseek.com."


def pseudonymised(key: str, clients: list[str]) -> list[str]:
    out = io.StringIO()
    log = AuditLog(AuditConfig(sink="stdout", pseudonymize_key=key), stream=out)
    for n, client in enumerate(clients):
        blocked(log, n, client)
    log.close()
    return [json.loads(line)["client"] for line in out.getvalue().splitlines()]


def test_pseudonyms_are_stable_and_keyed() -> None:
    clients = ["10.0.0.1", "10.0.0.2", "10.0.0.1", "2001:db8::1"]
    first = pseudonymised(KEY, clients)
    assert all(re.fullmatch(r"anon-[0-9a-f]{16}", p) for p in first)
    expected = hmac.new(KEY.encode(), b"10.0.0.1", hashlib.sha256).hexdigest()[:16]
    assert first[0] == "anon-" + expected
    assert first[0] == first[2]  # same address, same pseudonym: reports still group
    assert len(set(first)) == 3
    assert pseudonymised(KEY, clients) == first  # stable across runs with the same key
    other = pseudonymised("another-key-of-16-chars", clients)
    assert not set(other) & set(first)  # another key, unlinkable pseudonyms


def test_pseudonymised_file_holds_no_address(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditConfig(sink="file", path=path, pseudonymize_key=KEY))
    log.start()
    blocked(log, 1, "192.0.2.77")
    log.close()
    assert "192.0.2.77" not in path.read_text()


def line_length() -> int:
    """The length of the lines ``blocked(log, n)`` writes for two-digit ``n``."""
    out = io.StringIO()
    log = AuditLog(AuditConfig(sink="stdout"), stream=out)
    blocked(log, 10)
    log.close()
    return len(out.getvalue())


def numbered(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


@pytest.mark.parametrize("batched", [False, True])
def test_rotation_keeps_whole_lines_and_deletes_beyond_keep(tmp_path: Path, batched: bool) -> None:
    path = tmp_path / "audit.jsonl"
    # Left over from a run with a larger keep: removed at the first rotation.
    numbered(path, 5).write_text("old\n")
    line_size = line_length()  # every line below has the same length
    config = AuditConfig(sink="file", path=path, max_bytes=3 * line_size + 10, keep=2)
    log = AuditLog(config)
    if batched:
        log.start()
    for n in range(20):
        blocked(log, n + 10)
        if batched and n % 4 == 3:
            # Let the writer take these four as a batch, so rotation also happens between
            # batches and not only within one.
            wait_for(counter_reaches(log, "written", n + 1))
    log.close()

    assert path.exists() and numbered(path, 1).exists() and numbered(path, 2).exists()
    assert not numbered(path, 3).exists()
    assert not numbered(path, 5).exists()
    files = [numbered(path, 2), numbered(path, 1), path]  # oldest first
    entries = [entry for file in files for entry in read_lines(file)]
    assert {len(line) for f in files for line in f.read_bytes().splitlines(True)} == {line_size}
    for file in files:
        assert 0 < file.stat().st_size <= config.max_bytes
    # The kept files hold the newest entries, in order, with none missing in between.
    names = [entry["qname"] for entry in entries]
    assert names == [f"n{n}.deepseek.com." for n in range(30 - len(names), 30)]
    assert len(names) > 3 * 2  # path.1 and path.2 are full (3 lines each)
    assert log.written == 20 and log.dropped == 0


def test_rotation_loses_nothing_with_enough_keep(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("")  # an existing empty file is appended to
    log = AuditLog(AuditConfig(sink="file", path=path, max_bytes=1000, keep=50))
    log.start()
    for n in range(200):
        blocked(log, n)
    log.close()
    files = sorted(tmp_path.iterdir(), key=lambda p: -int(p.suffix[1:]) if p != path else 0)
    entries = [entry for file in files for entry in read_lines(file)]
    assert [e["qname"] for e in entries] == [f"n{n}.deepseek.com." for n in range(200)]
    assert all(f.stat().st_size <= 1000 for f in files)


def test_rotation_counts_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("x" * 900 + "\n")
    log = AuditLog(AuditConfig(sink="file", path=path, max_bytes=1000))
    blocked(log, 1)
    log.close()
    assert numbered(path, 1).read_text() == "x" * 900 + "\n"
    assert [e["qname"] for e in read_lines(path)] == ["n1.deepseek.com."]


def test_line_longer_than_max_bytes_gets_its_own_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditConfig(sink="file", path=path, max_bytes=50, keep=5))
    for n in range(3):
        blocked(log, n)
    log.close()
    assert [len(read_lines(p)) for p in (path, numbered(path, 1), numbered(path, 2))] == [1, 1, 1]


class StalledStream(io.StringIO):
    """A stdout whose write() blocks until released: a writer that cannot keep up."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        self.release.wait(5)
        return super().write(text)


def test_full_queue_drops_and_counts_without_blocking() -> None:
    stream = StalledStream()
    log = AuditLog(AuditConfig(sink="stdout", queue_size=100), stream=stream)
    log.start()
    blocked(log, 0)
    assert stream.entered.wait(3)  # the writer holds entry 0 and is stuck in write()
    try:
        start = time.perf_counter()
        for n in range(1, 10_001):
            blocked(log, n)
        elapsed = time.perf_counter() - start
        # Generous: about 0.5 us a call is typical; a blocking put would hang for 5 s.
        assert elapsed < 0.5, f"record() took {elapsed / 10_000 * 1e6:.1f} us a call"
        assert log.dropped == 10_000 - 100  # the queue holds 100, the rest are counted
    finally:
        stream.release.set()
    log.close()
    assert log.written == 101
    names = [json.loads(line)["qname"] for line in stream.getvalue().splitlines()]
    assert names == [f"n{n}.deepseek.com." for n in range(101)]


def test_close_flushes_what_is_queued(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditConfig(sink="file", path=path))
    log.start()
    for n in range(1000):
        blocked(log, n)
    log.close()
    assert len(read_lines(path)) == 1000
    assert log.written == 1000
    # After close nothing more is written; a late entry is counted as lost.
    blocked(log, 1000)
    assert log.dropped == 1
    log.close()  # twice is harmless


def test_close_without_start_writes_the_queue(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditConfig(sink="file", path=path))
    blocked(log, 1)
    log.close()
    assert len(read_lines(path)) == 1


def test_sink_off_writes_nothing(tmp_path: Path) -> None:
    log = AuditLog(AuditConfig(sink="off", path=tmp_path / "audit.jsonl"))
    log.start()
    blocked(log, 1)
    log.close()
    assert not (tmp_path / "audit.jsonl").exists()
    assert (log.written, log.dropped) == (0, 0)


def test_unwritable_path_counts_drops_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A regular file where the parent directory should be: unwritable even for root.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    log = AuditLog(AuditConfig(sink="file", path=blocker / "audit.jsonl"))
    with caplog.at_level(logging.INFO, logger="resolver.audit"):
        log.start()
        for batch in range(3):
            for n in range(5):
                blocked(log, batch * 5 + n)
            wait_for(counter_reaches(log, "dropped", (batch + 1) * 5))
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1
        assert errors[0].name == "resolver.audit"
        assert "not-a-dir" in errors[0].getMessage()
        assert log.written == 0

        # The thread survived and reopens on the next batch once the path works.
        blocker.unlink()
        blocker.mkdir()
        blocked(log, 99)
        log.close()
    assert [e["qname"] for e in read_lines(blocker / "audit.jsonl")] == ["n99.deepseek.com."]
    assert (log.written, log.dropped) == (1, 15)
    assert any("writing again; 15 entries were lost" in r.getMessage() for r in caplog.records)


def test_bad_entry_is_dropped_and_the_writer_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()
    log = AuditLog(AuditConfig(sink="stdout"), stream=out)
    log.start()
    log.record(T0, "10.0.0.1", "udp", None, "A", "NXDOMAIN", "blocked")  # type: ignore[arg-type]
    log.record(T0, "10.0.0.1", "udp", b"a.", "A", "NXDOMAIN", "blocked")  # type: ignore[arg-type]
    blocked(log, 1)
    log.close()
    assert (log.written, log.dropped) == (1, 2)
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_constructor_rejects_inconsistent_config() -> None:
    with pytest.raises(ValueError, match="needs a path"):
        AuditLog(AuditConfig(sink="file"))
    with pytest.raises(ValueError, match="sink"):
        AuditLog(AuditConfig(sink="syslog"))


# parse_config: the ``audit:`` section of the YAML config.


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({}, AuditConfig()),
        ({"sink": "stdout"}, AuditConfig(sink="stdout")),
        ({"sink": False}, AuditConfig()),  # YAML 1.1 reads a bare `off` as false
        ({"sink": "off", "path": "a.jsonl"}, AuditConfig(path=Path("a.jsonl"))),
        (
            {"sink": "file", "path": "logs/audit.jsonl"},
            AuditConfig(sink="file", path=Path("logs/audit.jsonl")),  # relative stays relative
        ),
        ({"sink": "stdout", "log": "all"}, AuditConfig(sink="stdout", what="all")),
        ({"max_size": 1000}, AuditConfig(max_bytes=1000)),
        ({"max_size": "64MiB"}, AuditConfig(max_bytes=64 * 2**20)),
        ({"max_size": "100MB"}, AuditConfig(max_bytes=100_000_000)),
        ({"max_size": "512 kib"}, AuditConfig(max_bytes=512 * 1024)),
        ({"max_size": "1.5GiB"}, AuditConfig(max_bytes=3 * 2**29)),
        ({"max_size": "2048"}, AuditConfig(max_bytes=2048)),
        ({"keep": 0}, AuditConfig(keep=0)),
        ({"keep": 30}, AuditConfig(keep=30)),
        ({"pseudonymize_key": KEY}, AuditConfig(pseudonymize_key=KEY)),
        ({"queue_size": 1}, AuditConfig(queue_size=1)),
    ],
)
def test_parse_config_accepts(doc: dict[str, Any], expected: AuditConfig) -> None:
    assert parse_config(doc) == expected


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {"max_bytes": 5},
            "audit.max_bytes: unknown key; did you mean max_size? expected one of sink, path, log, max_size, keep, pseudonymize_key, queue_size",
        ),
        ({"what": "all"}, "audit.what: unknown key; did you mean log? expected one of"),
        ({"colour": 1}, "audit.colour: unknown key; expected one of"),
        ({"pseudonymize": "x"}, "audit.pseudonymize: unknown key; did you mean pseudonymize_key?"),
        ({"sink": "syslog"}, "audit.sink: expected off, stdout or file, got 'syslog'"),
        ({"sink": True}, "audit.sink: expected off, stdout or file, got True"),
        (
            {"sink": "file"},
            "audit.path: required with sink: file; e.g. path: /var/log/resolver/audit.jsonl",
        ),
        (
            {"path": "audit.jsonl"},
            "audit.sink: missing; write sink: file to log to the path, or sink: off",
        ),
        (
            {"sink": "file", "path": ""},
            "audit.path: expected a file name such as /var/log/resolver/audit.jsonl, got ''",
        ),
        ({"sink": "file", "path": 5}, "audit.path: expected a file name"),
        (
            {"log": "everything"},
            "audit.log: expected all (every query) or blocked (blocked and monitored queries), got 'everything'",
        ),
        (
            {"max_size": "64M"},
            "audit.max_size: unknown unit 'M' in '64M'; write B, KB, MB, GB (powers of 1000) or KiB, MiB, GiB (powers of 1024), e.g. 64MiB",
        ),
        (
            {"max_size": "lots"},
            "audit.max_size: expected a size such as 64MiB or 100MB, got 'lots'",
        ),
        ({"max_size": 0}, "audit.max_size: must be more than 0 bytes, got 0; e.g. 64MiB"),
        ({"max_size": -5}, "audit.max_size: must be more than 0 bytes"),
        ({"max_size": True}, "audit.max_size: expected a size such as 64MiB or 100MB, got True"),
        ({"keep": -1}, "audit.keep: must be between 0 and 1000, got -1; e.g. keep: 7"),
        ({"keep": "7"}, "audit.keep: expected a whole number, got '7'; e.g. keep: 7"),
        ({"keep": True}, "audit.keep: expected a whole number, got True"),
        (
            {"pseudonymize_key": "abc123"},
            "audit.pseudonymize_key: too short (6 characters); use at least 16 random characters, e.g. the output of openssl rand -hex 16",
        ),
        (
            {"pseudonymize_key": 1234567890123456789},
            "audit.pseudonymize_key: expected a string, got int; quote it",
        ),
        (
            {"queue_size": 0},
            "audit.queue_size: must be between 1 and 10000000, got 0; e.g. queue_size: 10000",
        ),
        ({"queue_size": 2.5}, "audit.queue_size: expected a whole number, got 2.5"),
    ],
)
def test_parse_config_rejects(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_config(doc)
    assert str(info.value).startswith(message)
    if "pseudonymize_key" in doc:
        # The secret never appears in an error message (it may end up in a log).
        assert str(doc["pseudonymize_key"]) not in str(info.value)


def test_close_gives_up_on_a_stalled_writer(caplog: pytest.LogCaptureFixture) -> None:
    stream = StalledStream()
    log = AuditLog(AuditConfig(sink="stdout"), stream=stream)
    log.start()
    blocked(log, 0)
    assert stream.entered.wait(3)
    blocked(log, 1)
    try:
        log.close(timeout=0.05)  # returns although the writer is stuck
        assert "did not finish" in caplog.text
    finally:
        stream.release.set()
