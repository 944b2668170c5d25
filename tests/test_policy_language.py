"""The full list language: monitor phase and mode, exact, allow, patterns, client groups,
imports in every format, and the operator tools (check, explain)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from resolver.core.wire import encode_name, label_offsets
from resolver.policy import ClientGroups, LoadOptions, Policy, load_policy

from .helpers.cli import run_cli
from .helpers.fakeupstream import FakeUpstream
from .helpers.policy import utc, write
from .helpers.server import RunningServer


def verdict(policy: Policy, name: str, now: float, client: str = "127.0.0.1") -> str:
    """'block:<list>', 'monitor:<list>' or 'pass'."""
    wire = encode_name(name)
    mask = policy.groups.mask_of(client)
    block, _, monitor, _ = policy.decide(wire, label_offsets(wire), mask, now)
    if block is not None:
        return f"block:{block.blocklist.id}"
    if monitor is not None:
        return f"monitor:{monitor.blocklist.id}"
    return "pass"


PHASED = """\
list: ban
timezone: UTC
active: {monitor_from: 2025-02-12, from: 2025-02-26, until: 2025-03-26}
domains: [deepseek.com]
"""

# (instant, expected verdict for chat.deepseek.com)
PHASE_TABLE = [
    ("2025-02-11T23:59:59", "pass"),
    ("2025-02-12T00:00:00", "monitor:ban"),
    ("2025-02-25T23:59:59", "monitor:ban"),
    ("2025-02-26T00:00:00", "block:ban"),
    ("2025-03-25T23:59:59", "block:ban"),
    ("2025-03-26T00:00:00", "pass"),
]


@pytest.mark.parametrize(("when", "expected"), PHASE_TABLE)
def test_monitor_phase_then_enforcement_then_expiry(
    tmp_path: Path, when: str, expected: str
) -> None:
    write(tmp_path, "ban.yaml", PHASED)
    assert verdict(load_policy(tmp_path), "chat.deepseek.com", utc(when)) == expected


def test_next_change_walks_through_the_phases(tmp_path: Path) -> None:
    write(tmp_path, "ban.yaml", PHASED)
    policy = load_policy(tmp_path)
    wire = encode_name("deepseek.com")
    offsets = label_offsets(wire)
    instants = [utc("2025-02-01T00:00:00")]
    for _ in range(3):
        *_, until = policy.decide(wire, offsets, 1, instants[-1])
        instants.append(until)
    assert instants[1:] == [
        utc("2025-02-12T00:00:00"),
        utc("2025-02-26T00:00:00"),
        utc("2025-03-26T00:00:00"),
    ]


def test_monitor_mode_never_enforces_but_a_rule_can(tmp_path: Path) -> None:
    write(
        tmp_path,
        "watch.yaml",
        ("list: watch\nmode: monitor\ndomains: [dns.google, {name: canary.test, mode: enforce}]\n"),
    )
    policy = load_policy(tmp_path)
    assert verdict(policy, "dns.google", 0) == "monitor:watch"
    assert verdict(policy, "canary.test", 0) == "block:watch"


def test_exact_blocks_only_the_name(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "list: a\nexact: [only.example]\n")
    policy = load_policy(tmp_path)
    assert verdict(policy, "only.example", 0) == "block:a"
    assert verdict(policy, "sub.only.example", 0) == "pass"


def test_allow_beats_block_from_any_list(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "list: a\ndomains: [example.com]\n")
    write(tmp_path, "b.yaml", "list: b\nallow: [docs.example.com]\n")
    policy = load_policy(tmp_path)
    assert verdict(policy, "www.example.com", 0) == "block:a"
    assert verdict(policy, "docs.example.com", 0) == "pass"
    assert verdict(policy, "x.docs.example.com", 0) == "pass"


def test_allow_outside_its_window_does_not_apply(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "list: a\ndomains: [example.com]\n")
    write(
        tmp_path, "b.yaml", "list: b\nactive: {until: '2025-01-01T00:00Z'}\nallow: [example.com]\n"
    )
    policy = load_policy(tmp_path)
    assert verdict(policy, "example.com", utc("2024-12-31T23:59:59")) == "pass"
    assert verdict(policy, "example.com", utc("2025-01-01T00:00:00")) == "block:a"


# (pattern, name, matches?)
PATTERNS = [
    ("deepseek.*", "deepseek.ai", True),
    ("deepseek.*", "deepseek.com", True),
    ("deepseek.*", "x.deepseek.ai", False),
    ("deepseek.*", "deepseek.co.uk", False),  # '*' is one label
    ("api.*.example", "api.eu.example", True),
    ("api.*.example", "api.eu.west.example", False),
    ("*-ai.example", "chat-ai.example", True),
    ("*-ai.example", "chat.example", False),
    ("/^ai[0-9]+\\.example$/", "ai42.example", True),
    ("/^ai[0-9]+\\.example$/", "ai.example", False),
    ("/deepseek/", "my-deepseek-mirror.example", True),
]


@pytest.mark.parametrize(("pattern", "name", "matches"), PATTERNS)
def test_patterns(tmp_path: Path, pattern: str, name: str, matches: bool) -> None:
    write(tmp_path, "p.yaml", f"list: p\npatterns: ['{pattern}']\n")
    assert verdict(load_policy(tmp_path), name, 0) == ("block:p" if matches else "pass")


def test_bad_pattern_is_an_error_with_its_line(tmp_path: Path) -> None:
    from resolver.yamlload import SourceError

    path = write(tmp_path, "p.yaml", "list: p\npatterns:\n  - 'no-wildcard.example'\n  - '/[/'\n")
    with pytest.raises(SourceError, match=rf"{path}:3:5: patterns\[0\]"):
        load_policy(tmp_path)


GROUPS = {"staff": ["10.0.0.0/8", "fd00::/8"], "guests": ["192.168.0.0/16"]}


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ("10.1.2.3", "block:staffonly"),
        ("fd00::5", "block:staffonly"),
        ("::ffff:10.9.9.9", "block:staffonly"),  # IPv4-mapped
        ("192.168.1.1", "pass"),
        ("127.0.0.1", "pass"),
    ],
)
def test_client_groups(tmp_path: Path, client: str, expected: str) -> None:
    write(tmp_path, "s.yaml", "list: staffonly\nclients: [staff]\ndomains: [example.com]\n")
    policy = load_policy(tmp_path, LoadOptions(ClientGroups(GROUPS)))
    assert verdict(policy, "example.com", 0, client) == expected


def test_allow_applies_only_to_its_clients(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "list: a\ndomains: [example.com]\n")
    write(tmp_path, "b.yaml", "list: b\nclients: [guests]\nallow: [example.com]\n")
    policy = load_policy(tmp_path, LoadOptions(ClientGroups(GROUPS)))
    assert verdict(policy, "example.com", 0, "192.168.1.1") == "pass"
    assert verdict(policy, "example.com", 0, "10.0.0.1") == "block:a"


def test_unknown_client_group_is_an_error(tmp_path: Path) -> None:
    from resolver.yamlload import SourceError

    path = write(tmp_path, "s.yaml", "list: s\nclients: [all, stafff]\n")
    with pytest.raises(
        SourceError, match=rf"{path}:2:16: clients\[1\]: unknown client group 'stafff'"
    ):
        load_policy(tmp_path, LoadOptions(ClientGroups(GROUPS)))


IMPORTS = {
    "plain.txt": ("domains", "# comment\nplain.example\n*.wild.example\nhttp://bad/url\n"),
    "hosts.txt": (
        "hosts",
        "0.0.0.0 hosts.example\n127.0.0.1 localhost\n93.184.216.34 redirect.example\n",
    ),
    "adblock.txt": (
        "adblock",
        "! comment\n||ads.example^\n@@||ok.ads.example^\n||x.example/path^\n",
    ),
    "zone.rpz": (
        "rpz",
        (
            "$ORIGIN rpz.local.\n$TTL 60\n@ SOA ns hostmaster 1 3600 600 86400 60\n@ NS ns\n"
            "nx.example CNAME .\n*.nx.example CNAME .\nnodata.example CNAME *.\n"
            "pass.nx.example CNAME rpz-passthru.\nlocal.example A 10.0.0.1\n"
        ),
    ),
}


@pytest.fixture
def imported(tmp_path: Path) -> Policy:
    for name, (_, text) in IMPORTS.items():
        write(tmp_path, f"data/{name}", text)
    includes = "".join(f"  - {{file: data/{n}, format: {f}}}\n" for n, (f, _) in IMPORTS.items())
    write(tmp_path, "imp.yaml", f"list: imp\ninclude:\n{includes}")
    return load_policy(tmp_path / "imp.yaml")


# (name, expected verdict, expected rcode of the action when blocked)
IMPORT_TABLE = [
    ("plain.example", "block:imp"),
    ("sub.plain.example", "block:imp"),
    ("wild.example", "pass"),  # '*.wild.example': subdomains only
    ("a.wild.example", "block:imp"),
    ("hosts.example", "block:imp"),
    ("sub.hosts.example", "pass"),  # hosts entries are exact: never widened
    ("localhost", "pass"),
    ("redirect.example", "pass"),  # a redirection is not supported: reported, not a block
    ("ads.example", "block:imp"),
    ("x.ads.example", "block:imp"),
    ("ok.ads.example", "pass"),  # @@ exception
    ("x.example", "pass"),  # a path rule is not supported: reported, not widened
    ("nx.example", "block:imp"),
    ("a.nx.example", "block:imp"),
    ("pass.nx.example", "pass"),  # rpz-passthru
    ("nodata.example", "block:imp"),
    ("local.example", "pass"),  # local data is not supported: reported
]


@pytest.mark.parametrize(("name", "expected"), IMPORT_TABLE)
def test_imports_in_every_format(imported: Policy, name: str, expected: str) -> None:
    assert verdict(imported, name, 0) == expected


def test_rpz_actions_and_import_problems_are_reported(imported: Policy, tmp_path: Path) -> None:
    wire = encode_name("nodata.example")
    block, *_ = imported.decide(wire, label_offsets(wire), 1, 0)
    assert block is not None and block.action.kind == "nodata"
    wire = encode_name("nx.example")
    block, *_ = imported.decide(wire, label_offsets(wire), 1, 0)
    assert block is not None and block.action.kind == "nxdomain"
    warnings = "\n".join(imported.warnings)
    for file, line in (("plain.txt", 4), ("hosts.txt", 3), ("adblock.txt", 4), ("zone.rpz", 9)):
        assert f"{tmp_path / 'data' / file}:{line}:" in warnings, warnings


def test_imports_share_the_lists_window(tmp_path: Path) -> None:
    write(tmp_path, "data/x.txt", "imported.example\n")
    write(
        tmp_path,
        "l.yaml",
        "list: l\nactive: {from: '2030-01-01T00:00Z'}\ninclude: [{file: data/x.txt, format: domains}]\n",
    )
    policy = load_policy(tmp_path / "l.yaml")
    assert verdict(policy, "imported.example", utc("2029-12-31T00:00:00")) == "pass"
    assert verdict(policy, "imported.example", utc("2030-01-01T00:00:00")) == "block:l"


def test_missing_include_file_is_an_error(tmp_path: Path) -> None:
    from resolver.yamlload import SourceError

    path = write(tmp_path, "l.yaml", "list: l\ninclude: [{file: nope.txt, format: domains}]\n")
    with pytest.raises(SourceError, match=rf"{path}:2:18: include\[0\].file: cannot read"):
        load_policy(tmp_path)


def test_remote_include_without_a_copy_is_a_warning(tmp_path: Path) -> None:
    write(
        tmp_path,
        "l.yaml",
        "list: l\ninclude: [{url: 'http://127.0.0.1:9/x.txt', format: domains}]\n",
    )
    # A list server on loopback is refused unless allowed (tests/test_loading_faults.py).
    options = LoadOptions(state_dir=tmp_path / "state", allow_private=True)
    policy = load_policy(tmp_path, options)
    assert any("no copy of http://127.0.0.1:9/x.txt yet" in w for w in policy.warnings)
    assert [r.url for r in policy.remotes] == ["http://127.0.0.1:9/x.txt"]


# ---------------------------------------------------------------- through the server


def query_from(server: RunningServer, source: str, name: str) -> dns.message.Message:
    """A query whose source address is ``source`` (any 127/8 address reaches loopback)."""
    query = dns.message.make_query(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(3)
        sock.sendto(query.to_wire(), (server.host, server.port))
        return dns.message.from_wire(sock.recv(65535))


def test_server_applies_client_groups_by_source_address(
    make_server: Callable[..., RunningServer], lists_dir: Path
) -> None:
    (lists_dir / "lab.yaml").write_text("list: lab\nclients: [lab]\ndomains: [example.test]\n")
    running = make_server(groups=(("lab", ("127.0.0.2/32",)),))
    for _ in range(2):  # the second time through the answer memo
        assert query_from(running, "127.0.0.2", "example.test").rcode() == dns.rcode.NXDOMAIN
        assert query_from(running, "127.0.0.1", "example.test").rcode() == dns.rcode.NOERROR


def test_server_monitor_answers_normally_and_counts_every_query(
    make_server: Callable[..., RunningServer], lists_dir: Path, upstream: FakeUpstream
) -> None:
    (lists_dir / "watch.yaml").write_text("list: watch\nmode: monitor\ndomains: [example.test]\n")
    running = make_server()
    for _ in range(3):
        reply = running.query("www.example.test", "A")
        assert reply.rcode() == dns.rcode.NOERROR and reply.answer
    assert running.resolver.stats.would_block["watch"] == 3
    assert running.query("deepseek.com", "A").rcode() == dns.rcode.NXDOMAIN
    running.query("deepseek.com", "A")
    assert running.resolver.stats.blocked["deepseek"] == 2


# ---------------------------------------------------------------- operator tools


def test_explain_names_the_rule_its_state_and_its_reference() -> None:
    out = run_cli("explain", "chat.deepseek.com", "--at", "2026-11-28T12:00:00Z").stdout
    assert "BLOCKED by list deepseek: NXDOMAIN" in out
    assert "rule deepseek.com (domain)" in out
    assert "state at that time: enforced; from 2025-02-26T00:00:00+01:00 until never" in out
    assert "reference: Belgian federal ban of DeepSeek" in out
    assert "source: " in out and "blocklists/deepseek.yaml:" in out


def test_explain_before_the_effective_date_and_in_a_monitor_phase() -> None:
    before = run_cli("explain", "deepseek.com", "--at", "2025-02-25T22:59:59Z").stdout
    assert "forwarded (not blocked)" in before
    assert "state at that time: pending" in before
    assert "this holds until 2025-02-25T23:00:00+00:00" in before
    watched = run_cli("explain", "kimi.com", "--at", "2026-12-01").stdout
    assert "WOULD BLOCK by list example-ai-services" in watched
    enforced = run_cli(
        "explain", "kimi.com", "--at", "2027-03-01T00:00:00+01:00", "--type", "AAAA"
    ).stdout
    assert "BLOCKED by list example-ai-services" in enforced


def test_explain_with_a_client_outside_the_lists_groups(tmp_path: Path) -> None:
    config = write(tmp_path, "c.yaml", "groups: {lab: [10.0.0.0/8]}\nblocklists: lists\n")
    write(tmp_path, "lists/l.yaml", "list: l\nclients: [lab]\naction: null\ndomains: [x.example]\n")
    inside = run_cli("explain", "x.example", "--config", str(config), "--client", "10.1.1.1").stdout
    assert "BLOCKED by list l: NOERROR" in inside and "IN A 0.0.0.0" in inside
    outside = run_cli(
        "explain", "x.example", "--config", str(config), "--client", "192.0.2.1"
    ).stdout
    assert "forwarded (not blocked)" in outside and "[not for this client]" in outside


def test_check_warns_about_duplicates_shadowed_rules_and_closed_windows(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "l.yaml",
        (
            "list: l\n"
            "domains:\n"
            "  - example.com\n"
            "  - www.example.com\n"
            "  - example.com\n"
            "  - {name: old.example, active: {until: 2020-01-01}}\n"
        ),
    )
    result = run_cli("check", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"{path}:5:5: warning: example.com is listed twice" in result.stderr
    assert (
        f"{path}:4:5: warning: www.example.com is already covered by example.com" in result.stderr
    )
    assert "has already closed" in result.stderr
    assert "ok: policy" in result.stdout


def test_check_passes_on_the_shipped_policy() -> None:
    result = run_cli("check")
    assert result.returncode == 0, result.stderr
    assert "deepseek (2 rules, enforced)" in result.stdout
    assert "bypass (" in result.stdout and "example-ai-services (5 rules, monitor)" in result.stdout


class ListServer:
    """A tiny HTTP server on loopback serving one list, whose body and status we script."""

    def __init__(self) -> None:
        import http.server
        import threading

        owner = self
        self.body = b"allowed.test\n"
        self.status = 200

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(owner.status)
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                self.wfile.write(owner.body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/list.txt"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_remote_list_is_fetched_refreshed_kept_on_failure_and_used_offline(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    import time

    from .helpers.client import ask
    from .helpers.realservers import ResolverProcess

    lists = write(tmp_path, "lists/r.yaml", "")
    web = ListServer()
    lists.write_text(f"list: r\ninclude: [{{url: '{web.url}', format: domains, refresh: 1s}}]\n")
    config = write(
        tmp_path,
        "c.yaml",
        f"blocklists: lists\nstate_dir: {tmp_path / 'state'}\nremote: {{allow_private: true}}\n",
    )
    args = ("--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address)

    def wait_rcode(proc: ResolverProcess, name: str, rcode: int) -> None:
        deadline = time.monotonic() + 8
        while ask(proc.port, name).rcode() != rcode:
            assert time.monotonic() < deadline, "\n".join(proc.lines)
            time.sleep(0.1)

    try:
        proc = ResolverProcess(*args)
        try:
            wait_rcode(proc, "allowed.test", dns.rcode.NXDOMAIN)  # fetched, then reloaded
            web.body = b"notdeepseek.com\n"
            wait_rcode(proc, "notdeepseek.com", dns.rcode.NXDOMAIN)  # refreshed
            assert ask(proc.port, "allowed.test").rcode() == dns.rcode.NOERROR
            web.status = 500
            proc.wait_for("keeping the last copy", 8)
            assert ask(proc.port, "notdeepseek.com").rcode() == dns.rcode.NXDOMAIN
        finally:
            assert proc.stop() == 0
    finally:
        web.close()
    # The web server is gone: a new start uses the copy on disk, at once.
    offline = ResolverProcess(*args)
    try:
        assert ask(offline.port, "notdeepseek.com").rcode() == dns.rcode.NXDOMAIN
    finally:
        assert offline.stop() == 0
