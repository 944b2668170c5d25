"""Operations against a real server process: hot reload (edits, bad edits, a ConfigMap-style
symlink swap, SIGHUP), the admin API checked against its OpenAPI description, /metrics
checked by promtool, and the audit log with its report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dns.rcode
import pytest

from .helpers.cli import run_cli
from .helpers.client import ask
from .helpers.fakeupstream import FakeUpstream
from .helpers.http import SPEC, TOKEN, check_against_spec, http, urls
from .helpers.realservers import ResolverProcess, free_port
from .helpers.wait import wait_for


@pytest.fixture
def served(tmp_path: Path, upstream: FakeUpstream) -> Iterator[tuple[ResolverProcess, Path, Path]]:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "deepseek.yaml").write_text(
        "list: deepseek\nreference: test\ndomains: [deepseek.com]\n"
    )
    audit = tmp_path / "audit" / "queries.jsonl"
    config = tmp_path / "resolver.yaml"
    config.write_text(
        f"blocklists: lists\n"
        f"admin: {{listen: '127.0.0.1:{free_port()}', token: {TOKEN}}}\n"
        f"metrics: {{listen: '127.0.0.1:{free_port()}'}}\n"
        f"reload: {{interval: 0.2, debounce: 0.2, checksum_interval: 1}}\n"
        f"audit: {{sink: file, path: {audit}, log: blocked}}\n"
    )
    proc = ResolverProcess(
        "--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address
    )
    yield proc, lists, config
    proc.stop()


def test_edit_takes_effect_without_restart_and_bad_edits_keep_the_last_good_policy(
    served: tuple[ResolverProcess, Path, Path],
) -> None:
    proc, lists, _ = served
    port = proc.port
    assert ask(port, "example.test").rcode() == dns.rcode.NOERROR
    (lists / "more.yaml").write_text("list: more\ndomains: [example.test]\n")
    took = wait_for(lambda: ask(port, "example.test").rcode() == dns.rcode.NXDOMAIN)
    assert took < 2.0
    # A broken edit: reported with file, line and field; the last good policy serves.
    (lists / "more.yaml").write_text("list: more\nactive: {from: 2025-13-01}\ndomains: [x]\n")
    proc.wait_for("reload failed, keeping policy", 5)
    assert any(f"{lists / 'more.yaml'}:2:16: active.from" in line for line in proc.lines)
    assert ask(port, "example.test").rcode() == dns.rcode.NXDOMAIN
    admin, _ = urls(proc)
    _status, doc, _ = http(f"{admin}/v1/status", token=TOKEN)
    assert doc["policy"]["last_reload_failed"] is True
    assert "2025-13-01" in doc["policy"]["last_reload_error"]
    # Fixing it applies it; deleting a list removes its rules.
    (lists / "more.yaml").unlink()
    wait_for(lambda: ask(port, "example.test").rcode() == dns.rcode.NOERROR)


def test_sighup_reloads(served: tuple[ResolverProcess, Path, Path]) -> None:
    proc, lists, _config = served
    # Stop the watcher from seeing the edit first: make the file look unchanged to it by
    # editing then asking at once; either path must end with the new policy.
    (lists / "hup.yaml").write_text("list: hup\ndomains: [www.example.test]\n")
    proc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: ask(proc.port, "www.example.test").rcode() == dns.rcode.NXDOMAIN)
    assert any("reloaded in " in line for line in proc.lines)


def test_configmap_style_symlink_swap_is_seen(tmp_path: Path, upstream: FakeUpstream) -> None:
    # Kubernetes mounts a ConfigMap as files that are symlinks through ..data, itself a
    # symlink to a timestamped folder; an update swaps ..data atomically.
    mount = tmp_path / "mount"
    mount.mkdir()
    first = mount / "..2026_01_01"
    first.mkdir()
    (first / "ban.yaml").write_text("list: ban\ndomains: [deepseek.com]\n")
    (mount / "..data").symlink_to(first.name)
    (mount / "ban.yaml").symlink_to("..data/ban.yaml")
    config = tmp_path / "c.yaml"
    config.write_text(f"blocklists: {mount}\nreload: {{interval: 0.2, debounce: 0.2}}\n")
    proc = ResolverProcess(
        "--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address
    )
    try:
        assert ask(proc.port, "example.test").rcode() == dns.rcode.NOERROR
        second = mount / "..2026_01_02"
        second.mkdir()
        (second / "ban.yaml").write_text("list: ban\ndomains: [deepseek.com, example.test]\n")
        tmp_link = mount / "..data_tmp"
        tmp_link.symlink_to(second.name)
        os.replace(tmp_link, mount / "..data")  # the atomic swap
        shutil.rmtree(first)
        took = wait_for(lambda: ask(proc.port, "example.test").rcode() == dns.rcode.NXDOMAIN)
        assert took < 2.0
    finally:
        assert proc.stop() == 0


def test_config_changes_apply_or_say_they_need_a_restart(
    served: tuple[ResolverProcess, Path, Path], upstream: FakeUpstream
) -> None:
    proc, _, config = served
    text = config.read_text()
    config.write_text(text + "groups: {lab: [10.0.0.0/8]}\ntcp: {idle_timeout: 3}\n")
    proc.wait_for("'tcp' changed; it takes effect only after a restart", 5)
    proc.wait_for("reloaded in ", 5)
    config.write_text(text + "upstream_timeout: nope\n")
    proc.wait_for("cannot load the config", 5)
    assert any("upstream_timeout: expected a number" in line for line in proc.lines)
    assert ask(proc.port, "deepseek.com").rcode() == dns.rcode.NXDOMAIN


ADMIN_CALLS = [
    ("/healthz", "GET", "", None),
    ("/readyz", "GET", "", None),
    ("/v1/status", "GET", "", TOKEN),
    ("/v1/explain", "GET", "?name=chat.deepseek.com&client=10.0.0.1&type=AAAA", TOKEN),
    ("/v1/explain", "GET", "?name=example.test&at=2020-01-01", TOKEN),
    ("/v1/explain", "GET", "?name=bad..name", TOKEN),
    ("/v1/explain", "GET", "", TOKEN),
    ("/v1/status", "GET", "", None),
    ("/v1/status", "GET", "", "wrong-token-wrong-token"),
    ("/v1/reload", "POST", "", TOKEN),
    ("/v1/cache/flush", "POST", "?name=example.test", TOKEN),
    ("/v1/cache/flush", "POST", "?name=bad..name", TOKEN),
    ("/v1/cache/flush", "POST", "", TOKEN),
]


def test_admin_api_matches_its_openapi_description(
    served: tuple[ResolverProcess, Path, Path],
) -> None:
    proc, _, _ = served
    admin, _ = urls(proc)
    routes = {(m.upper(), p) for p, ops in SPEC["paths"].items() for m in ops}
    from resolver.console.routes import Console
    from resolver.service.admin import admin_routes

    served_routes = set(admin_routes(None)) | set(Console(None).routes())  # type: ignore[arg-type]
    # The console's assets are described once, as a templated path.
    assets = {r for r in served_routes if r[1].startswith("/console/static/")}
    assert assets and {("GET", "/console/static/{file}")} <= routes
    assert served_routes - assets == routes - {("GET", "/console/static/{file}")}
    seen = {}
    for path, method, query, token in ADMIN_CALLS:
        status, document, ctype = http(f"{admin}{path}{query}", method, token)
        assert ctype.startswith("application/json")
        check_against_spec(path, method, status, document)
        seen[(path, query, token)] = (status, document)
    assert seen[("/readyz", "", None)][0] == 200
    status, doc = seen[("/v1/explain", "?name=chat.deepseek.com&client=10.0.0.1&type=AAAA", TOKEN)]
    assert (
        status == 200 and doc["decision"] == "blocked" and doc["rules"][0]["rule"] == "deepseek.com"
    )
    assert seen[("/v1/explain", "?name=bad..name", TOKEN)][0] == 400
    assert seen[("/v1/status", "", None)][0] == 401
    assert seen[("/v1/status", "", "wrong-token-wrong-token")][0] == 401
    assert seen[("/v1/reload", "", TOKEN)][1]["result"] == "success"
    assert seen[("/v1/cache/flush", "?name=example.test", TOKEN)][1]["name"] == "example.test"
    assert seen[("/v1/cache/flush", "?name=bad..name", TOKEN)][0] == 400
    status, doc = seen[("/v1/status", "", TOKEN)]
    assert [entry["id"] for entry in doc["lists"]] == ["deepseek"]
    assert doc["lists"][0]["state"] == "enforced"
    assert http(f"{admin}/nope")[0] == 404
    assert http(f"{admin}/v1/reload", "GET", TOKEN)[0] == 405


def test_admin_refuses_the_network_without_a_token(tmp_path: Path, upstream: FakeUpstream) -> None:
    proc = ResolverProcess(
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream.address,
        "--admin",
        "0.0.0.0:0",
        ready=False,
    )
    assert proc.finish() == 2
    assert any("set admin.token" in line for line in proc.lines)


def test_metrics_count_queries_and_pass_promtool(
    served: tuple[ResolverProcess, Path, Path],
) -> None:
    proc, _, _ = served
    _, metrics = urls(proc)
    for _ in range(3):
        ask(proc.port, "chat.deepseek.com")
    ask(proc.port, "example.test")
    ask(proc.port, "example.test", tcp=True)
    status, text, ctype = http(f"{metrics}/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples['resolver_blocked_total{list="deepseek"}'] == 3
    assert samples['resolver_responses_total{decision="blocked",rcode="NXDOMAIN"}'] == 3
    assert samples['resolver_requests_total{proto="tcp",qtype="A"}'] == 1
    assert samples['resolver_list_state{list="deepseek",state="enforced"}'] == 1
    assert samples['resolver_list_state{list="deepseek",state="pending"}'] == 0
    assert samples["resolver_cache_hits_total"] == 1
    assert samples['resolver_request_duration_seconds_count{decision="blocked"}'] == 3
    ups = [v for k, v in samples.items() if k.startswith("resolver_upstream_up{")]
    assert ups == [1.0]
    if shutil.which("promtool"):
        result = subprocess.run(
            ["promtool", "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_audit_log_records_blocked_queries_and_the_report_finds_them(
    served: tuple[ResolverProcess, Path, Path], tmp_path: Path
) -> None:
    proc, _, _ = served
    for _ in range(2):
        ask(proc.port, "chat.deepseek.com", "AAAA")
    ask(proc.port, "example.test")
    assert proc.stop() == 0  # close flushes the log
    path = tmp_path / "audit" / "queries.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(entries) == 2  # log: blocked -> only the blocked queries
    first = entries[0]
    assert first["client"] == "127.0.0.1" and first["proto"] == "udp"
    assert first["qname"] == "chat.deepseek.com." and first["qtype"] == "AAAA"
    assert first["decision"] == "blocked" and first["rcode"] == "NXDOMAIN"
    assert first["list"] == "deepseek" and first["rule"] == "deepseek.com"
    assert first["reference"] == "test" and first["time"].endswith("Z")
    assert "upstream" not in first  # blocked: never forwarded
    report = run_cli("audit", str(path), "--list", "deepseek", timeout=30)
    assert report.returncode == 0, report.stderr
    assert "127.0.0.1" in report.stdout and "deepseek" in report.stdout


def test_audit_names_the_rule_that_matched_a_monitored_subdomain(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "w.yaml").write_text("list: w\nmode: monitor\ndomains: [example.test]\n")
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "c.yaml"
    config.write_text(f"blocklists: lists\naudit: {{sink: file, path: {audit}}}\n")
    proc = ResolverProcess(
        "--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address
    )
    ask(proc.port, "www.example.test")
    assert proc.stop() == 0
    (entry,) = [json.loads(line) for line in audit.read_text().splitlines()]
    assert entry["decision"] == "monitored" and entry["rule"] == "example.test"
    assert entry["qname"] == "www.example.test." and entry["upstream"] == upstream.address


def test_adding_an_include_reloads_once_and_watches_the_included_file(
    served: tuple[ResolverProcess, Path, Path],
) -> None:
    proc, lists, _ = served
    (lists / "data.txt").write_text("www.example.test\n")
    before = len(proc.lines)
    (lists / "inc.yaml").write_text("list: inc\ninclude: [{file: data.txt, format: domains}]\n")
    wait_for(lambda: ask(proc.port, "www.example.test").rcode() == dns.rcode.NXDOMAIN)
    time.sleep(1.0)  # several watcher rounds: no second reload for the same edit
    assert sum("files changed on disk" in line for line in proc.lines[before:]) == 1
    (lists / "data.txt").write_text("www.example.test\nexample.test\n")  # the included file
    wait_for(lambda: ask(proc.port, "example.test").rcode() == dns.rcode.NXDOMAIN)
