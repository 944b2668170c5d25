"""The resolver as an operator runs it: a child process, its log, its exit codes, signals,
real clients (dig, kdig) and a real authoritative upstream (NSD)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from .helpers.cli import run_cli
from .helpers.client import ask
from .helpers.fakeupstream import Behaviour, FakeUpstream
from .helpers.realservers import NSD, ROOT, ResolverProcess, free_port, nsd_available


@pytest.fixture
def resolver(upstream: FakeUpstream, lists_dir: Path) -> Iterator[ResolverProcess]:
    proc = ResolverProcess(
        "--listen", "127.0.0.1:0", "--upstream", upstream.address, "--blocklists", str(lists_dir)
    )
    yield proc
    proc.stop()


def test_startup_logs_listeners_and_policy(resolver: ResolverProcess) -> None:
    log = "\n".join(resolver.lines)
    assert f"listening on udp 127.0.0.1:{resolver.port}" in log
    assert f"listening on tcp 127.0.0.1:{resolver.port}" in log
    assert "1 lists, 2 rules: deepseek (2 rules, enforced)" in log
    assert ask(resolver.port, "deepseek.com").rcode() == dns.rcode.NXDOMAIN
    assert ask(resolver.port, "example.test", tcp=True).rcode() == dns.rcode.NOERROR


def test_sigterm_finishes_queries_in_progress_then_exits_0(
    resolver: ResolverProcess, upstream: FakeUpstream
) -> None:
    upstream.behaviours["example.test"] = Behaviour(delay=0.3)
    replies: list[dns.message.Message] = []
    client = threading.Thread(target=lambda: replies.append(ask(resolver.port, "example.test")))
    client.start()
    time.sleep(0.1)
    resolver.proc.send_signal(signal.SIGTERM)
    client.join()
    assert replies and replies[0].rcode() == dns.rcode.NOERROR
    assert resolver.finish() == 0
    assert any("stopped" in line for line in resolver.lines)


def test_sigint_exits_0(resolver: ResolverProcess) -> None:
    resolver.proc.send_signal(signal.SIGINT)
    assert resolver.finish() == 0


def test_cannot_bind_exits_non_zero_with_a_clear_message(
    upstream: FakeUpstream, lists_dir: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        proc = ResolverProcess(
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            upstream.address,
            "--blocklists",
            str(lists_dir),
            ready=False,
        )
        assert proc.finish() == 2
    log = "\n".join(proc.lines)
    assert f"cannot listen on udp 127.0.0.1:{port}: Address already in use" in log


def test_broken_policy_stops_startup_with_file_and_line(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("list: bad\nactive:\n  from: 2025-02-30\ndomains: [x.test]\n")
    proc = ResolverProcess(
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream.address,
        "--blocklists",
        str(bad),
        ready=False,
    )
    assert proc.finish() == 2
    assert f"{bad}:3:9: active.from: '2025-02-30' is not a valid date" in "\n".join(proc.lines)


def test_unknown_config_key_is_an_error_with_its_line(tmp_path: Path) -> None:
    config = tmp_path / "resolver.yaml"
    config.write_text("listen: [127.0.0.1:0]\nupstream: [127.0.0.1]\n")
    result = run_cli("serve", "--config", str(config), timeout=30)
    assert result.returncode == 2
    assert f"{config}:2:1: upstream: unknown key in the config" in result.stderr


def test_shipped_example_config_is_valid(upstream: FakeUpstream) -> None:
    proc = ResolverProcess(
        "--config",
        "deploy/resolver.yaml",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream.address,
    )
    try:
        assert ask(proc.port, "chat.deepseek.com").rcode() == dns.rcode.NXDOMAIN
    finally:
        assert proc.stop() == 0


def test_embedded_default_listens_on_5353_with_the_shipped_lists(upstream: FakeUpstream) -> None:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((host, 5353))
            except OSError as exc:
                if family == socket.AF_INET:
                    pytest.skip(f"port 5353 is taken here: {exc}")
    proc = ResolverProcess("--upstream", upstream.address)
    try:
        log = "\n".join(proc.lines)
        assert "listening on udp 127.0.0.1:5353" in log
        assert "deepseek" in log and "enforced" in log
        assert ask(5353, "api.deepseek.com").rcode() == dns.rcode.NXDOMAIN
        assert ask(5353, "example.test").rcode() == dns.rcode.NOERROR
    finally:
        assert proc.stop() == 0


def test_check_reports_errors_as_file_line_column(tmp_path: Path) -> None:
    bad = tmp_path / "lists"
    bad.mkdir()
    (bad / "a.yaml").write_text("list: a\ndomains:\n  - good.test\n  - bad..name\n")
    result = run_cli("check", str(bad), timeout=30)
    assert result.returncode == 1
    assert f"{bad / 'a.yaml'}:4:5: domains[1]: 'bad..name' is not a domain name" in result.stderr
    good = run_cli("check", timeout=30)
    assert good.returncode == 0 and "deepseek" in good.stdout


@pytest.mark.skipif(not shutil.which("dig"), reason="dig is not installed")
def test_dig_sees_the_block_and_its_reason(resolver: ResolverProcess) -> None:
    out = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(resolver.port), "chat.deepseek.com", "A"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    assert "status: NXDOMAIN" in out
    assert "EDE: 15 (Blocked)" in out and "blocked by list deepseek" in out
    tcp = subprocess.run(
        ["dig", "+tcp", "@127.0.0.1", "-p", str(resolver.port), "example.test", "A"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    assert "status: NOERROR" in tcp and "192.0.2.1" in tcp


@pytest.mark.skipif(not shutil.which("kdig"), reason="kdig is not installed")
def test_kdig_over_udp_and_tcp(resolver: ResolverProcess) -> None:
    for transport in ("+notcp", "+tcp"):
        out = subprocess.run(
            ["kdig", transport, "@127.0.0.1", "-p", str(resolver.port), "www.example.test", "A"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        assert "status: NOERROR" in out and "192.0.2.2" in out
    blocked = subprocess.run(
        ["kdig", "@127.0.0.1", "-p", str(resolver.port), "deepseeksvc.com", "AAAA"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    assert "status: NXDOMAIN" in blocked


@pytest.mark.skipif(not nsd_available(), reason="nsd is not installed (.ci/run installs it)")
def test_forwarding_to_a_real_authoritative_server(tmp_path: Path, lists_dir: Path) -> None:
    records = [f"h{i} IN A 192.0.2.{i}" for i in range(1, 50)]
    records += [f'big IN TXT "{i:02d}{"y" * 200}"' for i in range(12)]
    records += ["alias IN CNAME h1", "v6 IN AAAA 2001:db8::6"]
    nsd = NSD(tmp_path, "nsd.test", records)
    try:
        proc = ResolverProcess(
            "--listen", "127.0.0.1:0", "--upstream", nsd.address, "--blocklists", str(lists_dir)
        )
        try:
            port = proc.port
            reply = ask(port, "h7.nsd.test")
            assert [rd.to_text() for rd in reply.answer[0]] == ["192.0.2.7"]
            assert reply.answer[0].ttl == 3600
            cname = ask(port, "alias.nsd.test")
            assert [rrset.rdtype for rrset in cname.answer] == [5, 1]
            nx = ask(port, "missing.nsd.test")
            assert nx.rcode() == dns.rcode.NXDOMAIN and nx.authority[0].ttl == 300
            nodata = ask(port, "h1.nsd.test", "AAAA")
            assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
            # 12 x 200-byte TXT: NSD truncates over UDP, the resolver asks again over TCP.
            big = ask(port, "big.nsd.test", "TXT", tcp=True)
            assert len(big.answer[0]) == 12
            small = ask(port, "big.nsd.test", "TXT", use_edns=0, payload=1232)
            assert small.flags & 0x0200 and not small.answer  # TC to our client, never oversized
            assert ask(port, "v6.nsd.test", "AAAA").answer[0][0].to_text() == "2001:db8::6"
        finally:
            assert proc.stop() == 0
    finally:
        nsd.stop()


def test_a_window_opening_while_serving_changes_the_answer_at_that_instant(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    opens = time.time() + 3
    stamp = datetime.fromtimestamp(opens, UTC).isoformat()
    (lists / "soon.yaml").write_text(
        f"list: soon\nactive: {{from: '{stamp}'}}\ndomains: [soon.test]\n"
    )
    proc = ResolverProcess(
        "--listen", "127.0.0.1:0", "--upstream", upstream.address, "--blocklists", str(lists)
    )
    try:
        assert "soon (1 rules, pending)" in "\n".join(proc.lines)
        before = ask(proc.port, "soon.test")
        assert before.rcode() == dns.rcode.NOERROR
        assert before.answer[0].ttl <= 3  # capped at the time left before the ban
        seen = []
        while time.time() < opens + 1.5:
            reply = ask(proc.port, "soon.test")
            seen.append((time.time(), reply.rcode()))
            time.sleep(0.05)
        flips = [t for t, rcode in seen if rcode == dns.rcode.NXDOMAIN]
        assert flips, "the ban never took force"
        assert all(rcode == dns.rcode.NOERROR for t, rcode in seen if t < opens - 0.05)
        assert all(rcode == dns.rcode.NXDOMAIN for t, rcode in seen if t >= opens + 0.05)
        # Cached until the instant (its lifetime was capped there), never forwarded after it.
        assert upstream.count("soon.test", "A") == 1
    finally:
        assert proc.stop() == 0


def test_healthcheck_asks_the_resolver_itself(
    resolver: ResolverProcess, upstream: FakeUpstream
) -> None:
    upstream.default = Behaviour("drop")  # upstreams down: the resolver itself still answers
    ok = run_cli("healthcheck", "--server", f"127.0.0.1:{resolver.port}", timeout=30)
    assert ok.returncode == 0 and "healthy" in ok.stdout
    down = subprocess.run(
        [
            sys.executable,
            "-m",
            "resolver",
            "healthcheck",
            "--server",
            f"127.0.0.1:{free_port()}",
            "--timeout",
            "0.5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode == 1 and "unhealthy" in down.stderr
