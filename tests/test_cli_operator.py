"""The command line as a new operator meets it (issue 20, section 3): real ``python3 -m
resolver`` processes, their output and exit codes, and the real server where the API is
compared with the command line."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import dns.edns
import pytest
import yaml

from resolver.config import Listen

from .helpers.cli import run_cli
from .helpers.fakeupstream import FakeUpstream
from .helpers.http import TOKEN, check_against_spec, http
from .helpers.realservers import ROOT, ResolverProcess, free_port
from .helpers.server import RunningServer
from .test_audit import write_log

# --- check refuses what serve refuses, and says everything at once ----------------------


def _refused(tmp_path: Path, lists_dir: Path, body: str) -> tuple[str, str]:
    """What ``serve`` and ``check`` say of a config that cannot start."""
    config = tmp_path / "resolver.yaml"
    config.write_text(f"blocklists: {lists_dir}\n{body}")
    serve = run_cli("serve", "--config", str(config), timeout=30)
    check = run_cli("check", "--config", str(config), timeout=30)
    assert serve.returncode == 2, serve.stderr
    assert check.returncode == 1, check.stdout + check.stderr
    return serve.stderr, check.stderr


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            "listen: [127.0.0.1:{port}]\nupstreams: [127.0.0.1:{port}]\n",
            "upstream 127.0.0.1:{port} is this resolver's own listen address",
        ),
        (
            "listen: [0.0.0.0:{port}]\nupstreams: [127.0.0.1:{port}]\n",
            "upstream 127.0.0.1:{port} is this resolver's own listen address",
        ),
        (
            "listen: [127.0.0.1:{port}]\nupstreams: [192.0.2.1]\nadmin: {{listen: '0.0.0.0:{port}'}}\n",
            "would be reachable from the network: set admin.token",
        ),
        (
            "listen: [127.0.0.1:{port}]\nupstreams: [192.0.2.1]\nbootstrap: [127.0.0.1:{port}]\n",
            "bootstrap server 127.0.0.1:{port} is this resolver's own listen address",
        ),
    ],
)
def test_check_refuses_what_serve_refuses_at_start(
    tmp_path: Path, lists_dir: Path, body: str, reason: str
) -> None:
    port = free_port()
    serve, check = _refused(tmp_path, lists_dir, body.format(port=port))
    expected = reason.format(port=port)
    assert expected in serve
    assert expected in check
    assert "Traceback" not in serve + check


def test_check_reports_every_error_of_a_run_with_did_you_mean(
    tmp_path: Path, lists_dir: Path
) -> None:
    (lists_dir / "typo.yaml").write_text("list: typo\ndomian: [x.test]\n")
    (lists_dir / "bad.yaml").write_text("list: bad\ndomains: [bad..name]\n")
    config = tmp_path / "resolver.yaml"
    config.write_text(
        f"blocklists: {lists_dir}\n"
        "upstreams: [192.0.2.1]\n"
        "upstream_timout: 2\n"
        "cache: {max_entires: 5, max_ttl: -1}\n"
        "log_level: loud\n"
        "admin: {listen: '0.0.0.0:8053'}\n"
    )
    result = run_cli("check", "--config", str(config), timeout=30)
    assert result.returncode == 1
    err = result.stderr
    assert (
        f"{config}:3:1: upstream_timout: unknown key in the config; did you mean upstream_timeout?"
        in err
    )
    assert f"{config}:4:9: max_entires: unknown key in cache; did you mean max_entries?" in err
    assert f"{config}:4:34: max_ttl: expected a whole number" in err
    assert f"{config}:5:12: log_level: use one of" in err
    assert "admin API on 0.0.0.0:8053 would be reachable from the network" in err
    assert (
        f"{lists_dir / 'typo.yaml'}:2:1: domian: unknown key in a list; did you mean domains?"
        in err
    )
    assert f"{lists_dir / 'bad.yaml'}:2:11: domains[0]: 'bad..name' is not a domain name" in err
    assert "resolver check: 7 error(s)" in err
    assert "Traceback" not in err


def test_check_passes_a_config_serve_would_start_on(tmp_path: Path, lists_dir: Path) -> None:
    config = tmp_path / "resolver.yaml"
    config.write_text(
        f"blocklists: {lists_dir}\nlisten: [127.0.0.1:{free_port()}]\nupstreams: [192.0.2.1]\n"
        "admin: {listen: '0.0.0.0:8053', token: a-secret-of-more-than-16}\n"
    )
    result = run_cli("check", "--config", str(config), timeout=30)
    assert result.returncode == 0, result.stderr
    assert f"{lists_dir}: ok: policy" in result.stdout


# --- the policy digest: content, not path --------------------------------------------------


def _checked_digest(path: str, cwd: Path | None = None) -> str:
    result = run_cli("check", path, timeout=30) if cwd is None else _run_in(cwd, "check", path)
    assert result.returncode == 0, result.stderr
    return result.stdout.split(": ok: policy ", 1)[1].split(":", 1)[0]


def _run_in(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "resolver", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_status_and_check_give_one_digest_however_the_lists_path_is_spelt(
    make_server: Callable[..., RunningServer], lists_dir: Path, tmp_path: Path
) -> None:
    (lists_dir / "extra.yaml").write_text(
        "list: extra\nreference: test\ninclude:\n  - {file: more.txt, format: domains}\n"
        "domains: [extra.test]\n"
    )
    (lists_dir / "more.txt").write_text("more.test\n")
    running = make_server(admin=Listen("127.0.0.1", 0), admin_token=TOKEN)
    status, doc, _ = http(f"http://127.0.0.1:{running.server.admin_port}/v1/status", token=TOKEN)
    assert status == 200
    served = doc["policy"]["version"]
    link = tmp_path / "linked-lists"
    link.symlink_to(lists_dir, target_is_directory=True)
    assert _checked_digest(str(lists_dir)) == served  # absolute
    assert _checked_digest("blocklists", cwd=tmp_path) == served  # relative
    assert _checked_digest(str(link)) == served  # through a link
    assert _checked_digest("./linked-lists/", cwd=tmp_path) == served
    (lists_dir / "more.txt").write_text("more.test\nother.test\n")
    assert _checked_digest(str(lists_dir)) != served  # the content does count


# --- healthcheck: serve's default address, and in the README ------------------------------


def test_healthcheck_without_arguments_asks_where_serve_listens_by_default(
    upstream: FakeUpstream, lists_dir: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", 5353))
        except OSError as exc:
            pytest.skip(f"port 5353 is taken here: {exc}")
    proc = ResolverProcess("--upstream", upstream.address, "--blocklists", str(lists_dir))
    try:
        assert proc.port == 5353
        result = run_cli("healthcheck", "--timeout", "2", timeout=30)
        assert result.returncode == 0, result.stderr
        assert "healthy: 127.0.0.1:5353 answered" in result.stdout
    finally:
        assert proc.stop() == 0


def test_readme_lists_every_command() -> None:
    usage = run_cli("--help", timeout=30).stdout
    commands = set(usage.split("{", 1)[1].split("}", 1)[0].split(","))
    assert "healthcheck" in commands
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Commands", 1)[1].split("```", 2)[1]
    listed = {line.split()[1] for line in block.splitlines() if line.startswith("resolver ")}
    assert listed == commands


# --- explain --at: time zones, and errors as sentences -------------------------------------


@pytest.mark.parametrize(
    ("at", "shown", "decision"),
    [
        (
            "2025-02-26T00:30 Europe/Brussels",
            "2025-02-26T00:30:00+01:00 (time zone Europe/Brussels)",
            "BLOCKED",
        ),
        (
            "2025-02-25T23:59 Europe/Brussels",
            "2025-02-25T23:59:00+01:00 (time zone Europe/Brussels)",
            "forwarded",
        ),
        ("2025-02-26T00:30+01:00", "2025-02-26T00:30:00+01:00 (time zone +01:00)", "BLOCKED"),
        ("2025-02-26T00:30 +01:00", "2025-02-26T00:30:00+01:00 (time zone +01:00)", "BLOCKED"),
        ("2025-02-25T23:30", "2025-02-25T23:30:00+00:00 (time zone UTC)", "BLOCKED"),
        ("2025-02-25 22:59 UTC", "2025-02-25T22:59:00+00:00 (time zone UTC)", "forwarded"),
        (
            "2025-02-26 Europe/Brussels",
            "2025-02-26T00:00:00+01:00 (time zone Europe/Brussels)",
            "BLOCKED",
        ),
    ],
)
def test_explain_at_takes_a_time_zone_and_says_which(
    lists_dir: Path, at: str, shown: str, decision: str
) -> None:
    result = run_cli("explain", "chat.deepseek.com", "--blocklists", str(lists_dir), "--at", at)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()[:2]
    assert first == f"chat.deepseek.com A for 127.0.0.1 at {shown}:"
    assert second.strip().startswith(decision)


@pytest.mark.parametrize(
    ("at", "says"),
    [
        ("2025-02-30", "--at '2025-02-30' is not a date and time: write a date (2025-02-26)"),
        ("next tuesday", "--at 'next tuesday' is not a date and time: write a date"),
        (
            "2025-02-26T00:30 Europe/Brusels",
            "--at: 'Europe/Brusels' is not a time zone; did you mean Europe/Brussels?",
        ),
        ("2025-02-26T00:30+01:00 Europe/Brussels", "gives both an offset and a time zone"),
        ("2025-02-26 +25:00", "the offset +25:00 is out of range (-23:59 to +23:59)"),
    ],
)
def test_explain_at_errors_are_sentences(lists_dir: Path, at: str, says: str) -> None:
    result = run_cli("explain", "x.test", "--blocklists", str(lists_dir), "--at", at)
    assert result.returncode == 2
    assert result.stderr.startswith("resolver explain: ")
    assert says in result.stderr
    assert "Invalid isoformat" not in result.stderr and "Traceback" not in result.stderr


def test_api_explain_takes_the_same_at_as_the_cli(
    make_server: Callable[..., RunningServer], lists_dir: Path
) -> None:
    running = make_server(admin=Listen("127.0.0.1", 0), admin_token=TOKEN)
    base = f"http://127.0.0.1:{running.server.admin_port}/v1/explain?name=chat.deepseek.com"
    at = urllib.parse.quote("2025-02-26T00:30 Europe/Brussels")
    status, doc, _ = http(f"{base}&at={at}", token=TOKEN)
    assert status == 200
    check_against_spec("/v1/explain", "GET", status, doc)
    assert (doc["at"], doc["zone"], doc["decision"]) == (
        "2025-02-26T00:30:00+01:00",
        "Europe/Brussels",
        "blocked",
    )
    status, doc, _ = http(f"{base}&at=2025-02-30", token=TOKEN)
    assert status == 400
    assert "is not a date and time" in doc["error"]


# --- output into a closed pipe ---------------------------------------------------------------


def _into_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """``resolver ARGS`` writing into a pipe whose reader has gone (as after ``| head -1``
    once head has exited): every write meets a closed pipe, whatever the output's size."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "resolver", *args],
            cwd=ROOT,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)


def _big_audit_log(path: Path) -> Path:
    write_log(
        path,
        [
            (n, f"10.0.{n // 250}.{n % 250}", "chat.deepseek.com.", "blocked", "ai")
            for n in range(4000)
        ],
    )
    return path


def test_no_traceback_into_a_closed_pipe(lists_dir: Path, tmp_path: Path) -> None:
    log = _big_audit_log(tmp_path / "audit.jsonl")
    for args in (
        ("explain", "chat.deepseek.com", "--blocklists", str(lists_dir)),
        ("explain", "chat.deepseek.com", "--blocklists", str(lists_dir), "--json"),
        ("check", str(lists_dir)),
        ("audit", str(log)),
        ("audit", str(log), "--json"),
    ):
        result = _into_closed_pipe(*args)
        assert result.stderr == "", (args, result.stderr)
        assert result.returncode == 141, args  # 128 + SIGPIPE, as other Unix tools end
    assert _into_closed_pipe("--help").stderr == ""  # argparse stays quiet on its own


def test_piping_into_head_prints_the_first_line_only(lists_dir: Path, tmp_path: Path) -> None:
    log = _big_audit_log(tmp_path / "audit.jsonl")
    for command in (
        f"{sys.executable} -m resolver audit {log} | head -1",
        f"{sys.executable} -m resolver explain chat.deepseek.com --blocklists {lists_dir} | head -1",
    ):
        result = subprocess.run(
            ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0
        assert len(result.stdout.splitlines()) == 1
        assert result.stderr == "", result.stderr


# --- /v1/explain and the CLI name the same line -------------------------------------------


def test_api_and_cli_explain_name_the_same_source_line(
    make_server: Callable[..., RunningServer], lists_dir: Path
) -> None:
    (lists_dir / "mixed.yaml").write_text(
        "list: mixed\n"
        "reference: test\n"
        "domains:\n"
        "  - plain.test\n"
        "  - {name: dated.test, active: {from: 2025-01-01}}\n"
        "include:\n"
        "  - {file: hosts.txt, format: hosts}\n"
    )
    (lists_dir / "hosts.txt").write_text("# hosts\n0.0.0.0 first.test\n0.0.0.0 hosted.test\n")
    running = make_server(admin=Listen("127.0.0.1", 0), admin_token=TOKEN)
    base = f"http://127.0.0.1:{running.server.admin_port}/v1/explain"
    expected = {
        "chat.deepseek.com": f"{lists_dir / 'deepseek.yaml'}:10:5",
        "plain.test": f"{lists_dir / 'mixed.yaml'}:4:5",
        "dated.test": f"{lists_dir / 'mixed.yaml'}:5:12",
        "hosted.test": f"{lists_dir / 'hosts.txt'}:3",
    }
    for name, line in expected.items():
        status, api, _ = http(f"{base}?name={name}&at=2026-01-01", token=TOKEN)
        assert status == 200
        cli = run_cli(
            "explain", name, "--json", "--blocklists", str(lists_dir), "--at", "2026-01-01"
        )
        assert cli.returncode == 0, cli.stderr
        printed = json.loads(cli.stdout)
        api_sources = [rule["source"] for rule in api["rules"]]
        assert api_sources == [rule["source"] for rule in printed["rules"]], name
        assert api_sources[0][0].startswith(line), (name, api_sources)
        assert (
            f"source: {api_sources[0][0]}"
            in run_cli("explain", name, "--blocklists", str(lists_dir), "--at", "2026-01-01").stdout
        )


# --- the EDE text: list and reference id, the full reference in explain -------------------

LONG_REFERENCE = (
    "Royal decree of 26 February 2025 on the use of artificial intelligence services by "
    "federal public administrations, article 3, paragraph 2, as amended; see "
    "https://www.ejustice.just.fgov.be/cgi_loi/article.pl?language=fr&sum_date=2025-02-26"
    "&pd_search=2025-02-26&numac_search=2025000000&page=1&lg_txt=F&caller=list"
)


def test_ede_text_names_list_and_reference_id_never_a_cut_text(
    make_server: Callable[..., RunningServer], lists_dir: Path
) -> None:
    (lists_dir / "decree.yaml").write_text(
        f"list: decree\nreference: {json.dumps(LONG_REFERENCE)}\ndomains: [long.test]\n"
    )
    running = make_server(admin=Listen("127.0.0.1", 0), admin_token=TOKEN)
    base = f"http://127.0.0.1:{running.server.admin_port}/v1/explain"
    for name, list_id in (("long.test", "decree"), ("chat.deepseek.com", "deepseek")):
        reply = running.query(name, "A", use_edns=0)
        (ede,) = [o for o in reply.options if o.otype == dns.edns.OptionType.EDE]
        status, doc, _ = http(f"{base}?name={name}", token=TOKEN)
        assert status == 200
        (rule,) = doc["rules"]
        assert ede.text == f"blocked by list {list_id} (reference {rule['reference_id']})"
        assert len(ede.text.encode()) < 200  # whole, never cut
        printed = run_cli("explain", name, "--blocklists", str(lists_dir)).stdout
        assert f"reference: {rule['reference']} (id {rule['reference_id']})" in printed
    assert rule["reference"].startswith("test ban")
    status, doc, _ = http(f"{base}?name=long.test", token=TOKEN)
    assert doc["rules"][0]["reference"] == LONG_REFERENCE  # in full, URL and all


# --- the shipped deepseek list: its reference and its header agree on dates -----------------

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def test_shipped_deepseek_reference_agrees_with_its_header_on_dates() -> None:
    path = ROOT / "blocklists" / "deepseek.yaml"
    text = path.read_text()
    header = " ".join(
        line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")
    )
    doc = yaml.safe_load(text)
    reference = doc["reference"]
    effective = str(doc["active"]["from"])
    # The date the list takes force is the policy brief's, as the header says, and the
    # reference says whose date it is.
    assert f"enforced from {effective} per our policy brief" in reference
    # Every date the reference gives is one the header gives, for the same measure.
    dates = re.findall(r"\b(\d{4})-(\d{2})-(\d{2})\b", reference)
    assert len(dates) >= 2
    for year, month, day in dates:
        spelt = f"{int(day)} {MONTHS[int(month) - 1]} {year}"
        assert spelt in header, f"the reference's {year}-{month}-{day} is not in the header"
    assert "circular above took effect on 1 December 2025" in header
    assert re.search(r"circular of Min\. V\. Matz[^;]*, effective 2025-12-01", reference)
    assert (
        "the federal Parliament blocked DeepSeek on its own networks in February 2025"
        in (reference)
        and "February 2025 the Belgian federal PARLIAMENT" in header
    )
    explained = run_cli("explain", "chat.deepseek.com", "--at", "2025-02-26 Europe/Brussels")
    assert "BLOCKED by list deepseek" in explained.stdout
    assert f"reference: {reference} (id " in explained.stdout
