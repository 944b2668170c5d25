"""Rule edits through the admin API and ``resolver rules``, on the real server (queries on
loopback with dnspython): a name added is blocked over DNS at once, a name removed resolves
again, every edit is in the change log, bad input is refused naming its field with the file
unchanged, a failed reload puts the file back, edits are serialised, and every bound holds."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.rcode
import pytest

from resolver.config import Listen
from resolver.config.model import EditsConfig
from resolver.policy import changelog, editinput, edits

from .helpers.admin import call
from .helpers.cli import run_cli
from .helpers.client import ask
from .helpers.http import TOKEN, scrape, urls
from .helpers.realservers import ResolverProcess, free_port
from .helpers.server import RunningServer
from .helpers.wait import wait_for

LOOPBACK = Listen("127.0.0.1", 0)
ADD = {
    "name": "example.test",
    "reference": "Decree 7/2026 https://law.example/7",
    "operator": "ana",
}


@pytest.fixture
def edited(make_server: Callable[..., RunningServer], tmp_path: Path) -> RunningServer:
    return make_server(
        admin=LOOPBACK, admin_token=TOKEN, metrics=LOOPBACK, state_dir=tmp_path / "state"
    )


def _port(running: RunningServer) -> int:
    return int(running.server.admin_port)


def _rcode(running: RunningServer, name: str) -> int:
    return int(running.query(name).rcode())


def test_add_blocks_over_dns_then_remove_resolves_again(
    edited: RunningServer, lists_dir: Path, tmp_path: Path
) -> None:
    assert _rcode(edited, "www.example.test") == dns.rcode.NOERROR  # cached before the ban
    status, doc = call(_port(edited), "POST", "/v1/rules", ADD)
    assert status == 201, doc
    assert doc["change"]["action"] == "add" and doc["change"]["operator"] == "ana"
    assert doc["policy"] == doc["change"]["policy_after"] != doc["change"]["policy_before"]
    took = wait_for(lambda: _rcode(edited, "www.example.test") == dns.rcode.NXDOMAIN, 2.0)
    assert took < 2.0
    assert _rcode(edited, "example.test") == dns.rcode.NXDOMAIN
    text = (lists_dir / "local-edits.yaml").read_text()
    assert text.startswith("# Rule edits made by operators")
    assert '  - {"name": "example.test", "reference": "Decree 7/2026' in text
    log = (tmp_path / "state" / "changes.jsonl").read_text().splitlines()
    assert [json.loads(line)["action"] for line in log] == ["add"]
    status, listed = call(_port(edited), "GET", "/v1/rules")
    assert status == 200 and listed["list"] == "local" and listed["count"] == 1
    assert listed["rules"][0]["name"] == "example.test"
    assert listed["rules"][0]["operator"] == "ana" and listed["rules"][0]["added_at"]

    removal = {"name": "example.test", "reference": "lifted by Decree 8", "operator": "ben"}
    status, doc = call(_port(edited), "POST", "/v1/rules/remove", removal)
    assert status == 200 and doc["change"]["action"] == "remove"
    wait_for(lambda: _rcode(edited, "example.test") == dns.rcode.NOERROR, 2.0)
    status, changes = call(_port(edited), "GET", "/v1/changes?limit=10")
    assert [c["action"] for c in changes["changes"]] == ["remove", "add"]  # newest first
    assert changes["changes"][0]["reference"] == "lifted by Decree 8"
    # Removing it again: not in the list. A name another list blocks: said so.
    status, doc = call(_port(edited), "POST", "/v1/rules/remove", removal)
    assert status == 404 and doc["field"] == "name"
    call(_port(edited), "POST", "/v1/rules", {**ADD, "name": "parent.test"})
    status, doc = call(
        _port(edited), "POST", "/v1/rules/remove", {**removal, "name": "a.parent.test"}
    )
    assert status == 404 and "the rule for parent.test in this list covers it" in doc["error"]
    gone = {**removal, "name": "chat.deepseek.com"}
    status, doc = call(_port(edited), "POST", "/v1/rules/remove", gone)
    assert status == 404 and "list deepseek" in doc["error"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"reference": ""}, "reference"),
        ({"operator": None}, "operator"),
        ({"name": "bad..name"}, "name"),
        ({"name": ""}, "name"),
        ({"from": "2025-02-30"}, "from"),
        ({"from": "2026-01-01", "until": "2025-01-01"}, "until"),
        ({"timezone": "Europe/Nowhere", "from": "2026-01-01"}, "timezone"),
        ({"mode": "sometimes"}, "mode"),
        ({"kind": "regex"}, "kind"),
        ({"colour": "red"}, "colour"),
        ({"reference": "x" * 1001}, "reference"),
        ({"operator": "o" * 101}, "operator"),
        ({"operator": "ana\nroot"}, "operator"),
        ({"name": "a" * 64 + ".test"}, "name"),
        ({"from": "2" * 41}, "from"),
    ],
)
def test_bad_input_is_refused_naming_the_field_and_the_file_is_unchanged(
    edited: RunningServer, lists_dir: Path, change: dict[str, Any], field: str
) -> None:
    assert call(_port(edited), "POST", "/v1/rules", {**ADD, "name": "first.test"})[0] == 201
    before = (lists_dir / "local-edits.yaml").read_bytes()
    body = {key: value for key, value in {**ADD, **change}.items() if value is not None}
    status, doc = call(_port(edited), "POST", "/v1/rules", body)
    assert status == 400, doc
    assert doc["field"] == field and doc["error"].startswith(f"{field}:")
    assert (lists_dir / "local-edits.yaml").read_bytes() == before


def test_malformed_bodies_and_the_token(edited: RunningServer) -> None:
    port = _port(edited)
    before = scrape(edited.server.metrics_port)[1]
    assert call(port, "POST", "/v1/rules", raw=b"{not json")[0] == 400
    assert call(port, "POST", "/v1/rules", raw=b"[1, 2]")[0] == 400
    assert call(port, "POST", "/v1/rules", ADD, token=None)[0] == 401
    assert call(port, "GET", "/v1/timeline", token="wrong")[0] == 401
    big = {**ADD, "reference": "x" * 70_000}
    assert call(port, "POST", "/v1/rules", big, check=False)[0] == 413
    assert call(port, "GET", "/v1/changes?limit=0")[0] == 400
    assert call(port, "POST", "/v1/rules", ADD)[0] == 201
    status, doc = call(port, "POST", "/v1/rules", {**ADD, "kind": "exact"})
    assert status == 409 and "already in list local" in doc["error"]
    text, after = scrape(edited.server.metrics_port)
    for result, more in (("applied", 1), ("refused", 3), ("undone", 0)):
        series = f'resolver_rule_edits_total{{action="add",result="{result}"}}'
        assert after[series] - before[series] == more
    assert "resolver_rule_changelog_rotations_total" in after
    if shutil.which("promtool"):
        checked = subprocess.run(
            ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert "rule_edits" not in checked.stdout + checked.stderr


def test_a_failed_reload_puts_the_file_back(edited: RunningServer, lists_dir: Path) -> None:
    assert call(_port(edited), "POST", "/v1/rules", {**ADD, "name": "first.test"})[0] == 201
    before = (lists_dir / "local-edits.yaml").read_bytes()
    # Another list file breaks: the whole policy does not load with the edit.
    (lists_dir / "zz-broken.yaml").write_text("list: broken\ndomains: [bad..name]\n")
    status, doc = call(_port(edited), "POST", "/v1/rules", ADD)
    assert status == 422 and "zz-broken.yaml" in doc["error"] and "undone" in doc["error"]
    assert (lists_dir / "local-edits.yaml").read_bytes() == before
    assert _rcode(edited, "example.test") == dns.rcode.NOERROR
    assert _rcode(edited, "first.test") == dns.rcode.NXDOMAIN  # the last good policy


def test_a_list_that_takes_the_local_id_is_named(edited: RunningServer, lists_dir: Path) -> None:
    (lists_dir / "zz-other.yaml").write_text("list: local\ndomains: [other.test]\n")
    assert call(_port(edited), "POST", "/v1/reload")[0] == 200
    status, doc = call(_port(edited), "POST", "/v1/rules", ADD)
    assert status == 409 and doc["field"] == "edits.list" and "zz-other.yaml" in doc["error"]
    assert not (lists_dir / "local-edits.yaml").exists()


def test_concurrent_edits_are_serialised(edited: RunningServer, lists_dir: Path) -> None:
    results: list[int] = []

    def add(index: int) -> None:
        body = {**ADD, "name": f"n{index}.example.test"}
        results.append(call(_port(edited), "POST", "/v1/rules", body, check=False)[0])

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [201] * 8
    rules = call(_port(edited), "GET", "/v1/rules")[1]["rules"]
    assert [r["name"] for r in rules] == [f"n{i}.example.test" for i in range(8)]
    changes = call(_port(edited), "GET", "/v1/changes")[1]["changes"]
    assert len(changes) == 8
    digests = [(c["policy_before"], c["policy_after"]) for c in reversed(changes)]
    # Each edit starts from the policy the one before it left: one at a time.
    assert all(a[1] == b[0] for a, b in itertools.pairwise(digests))


def test_the_list_bound_and_many_rules(
    edited: RunningServer, lists_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edits, "MAX_RULES", 30)
    for index in range(30):
        body = {**ADD, "name": f"r{index:02d}.test", "reference": "r" * 1000}
        assert call(_port(edited), "POST", "/v1/rules", body, check=False)[0] == 201
    status, doc = call(_port(edited), "POST", "/v1/rules", {**ADD, "name": "over.test"})
    assert status == 409 and "30 rules" in doc["error"]
    lines = [line for line in (lists_dir / "local-edits.yaml").read_text().splitlines()]
    assert sum(line.startswith("  - {") for line in lines) == 30
    assert edits.read_local(edits.resolve(lists_dir, lists_dir, None, "local", None))[1].fast
    assert _rcode(edited, "r29.test") == dns.rcode.NXDOMAIN


def test_windows_modes_and_time_zones(
    make_server: Callable[..., RunningServer], clock: Any, tmp_path: Path
) -> None:
    clock.now = 1_780_315_200.0  # 2026-06-01T12:00Z
    running = make_server(admin=LOOPBACK, admin_token=TOKEN, state_dir=tmp_path / "s")
    port = _port(running)
    later = {**ADD, "name": "later.test", "from": "2026-07-01", "timezone": "Europe/Brussels"}
    watched = {**ADD, "name": "watched.test", "mode": "monitor"}
    exact = {**ADD, "name": "only.example.test", "kind": "exact"}
    for body in (later, watched, exact):
        assert call(port, "POST", "/v1/rules", body)[0] == 201
    rules = {r["name"]: r for r in call(port, "GET", "/v1/rules")[1]["rules"]}
    assert rules["later.test"]["from"] == "2026-07-01T00:00:00+02:00"
    assert rules["later.test"]["timezone"] == "Europe/Brussels"
    assert rules["watched.test"]["mode"] == "monitor"
    assert rules["only.example.test"]["kind"] == "exact"
    timeline = call(port, "GET", "/v1/timeline")[1]
    own = {r["name"]: r for r in timeline["rules"] if r["list"] == "local"}
    assert own["later.test"]["state"] == "pending"
    assert own["later.test"]["next_transition"] == "2026-06-30T22:00:00+00:00"
    assert own["later.test"]["seconds_to_next"] == 29 * 86400 + 10 * 3600
    assert own["watched.test"]["state"] == "monitor" and own["watched.test"]["mode"] == "monitor"


def test_cli_through_the_api_and_offline(
    edited: RunningServer, lists_dir: Path, tmp_path: Path
) -> None:
    admin = f"http://127.0.0.1:{_port(edited)}"
    env_token = ["--token", TOKEN]
    done = run_cli(
        "rules", "add", "example.test", "--reference", "Decree 9", "--operator", "cli",
        "--admin", admin, *env_token,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "add example.test in list local by cli" in done.stdout
    assert _rcode(edited, "example.test") == dns.rcode.NXDOMAIN
    listed = run_cli("rules", "list", "--json", "--admin", admin, *env_token)
    assert json.loads(listed.stdout)["rules"][0]["reference"] == "Decree 9"
    again = run_cli(
        "rules", "add", "example.test", "--reference", "R", "--operator", "cli",
        "--admin", admin, *env_token,
    )  # fmt: skip
    assert again.returncode == 1 and "already in list local" in again.stderr
    assert "Traceback" not in again.stderr and len(again.stderr.splitlines()) == 1
    no_token = run_cli("rules", "list", "--admin", admin)
    assert no_token.returncode == 1 and "RESOLVER_ADMIN_TOKEN" in no_token.stderr
    away = run_cli("rules", "list", "--admin", "http://127.0.0.1:9")
    assert away.returncode == 2 and "cannot reach the admin API" in away.stderr

    # Offline: the same edit in the file, with the config; the server's watcher reloads.
    config = tmp_path / "offline.yaml"
    config.write_text(f"blocklists: {lists_dir}\nstate_dir: {tmp_path / 'state'}\n")
    removed = run_cli(
        "rules", "remove", "example.test", "--reference", "lifted", "--operator", "off",
        "--offline", "--config", str(config),
    )  # fmt: skip
    assert removed.returncode == 0, removed.stderr
    assert "example.test" not in (lists_dir / "local-edits.yaml").read_text()
    offline_list = run_cli("rules", "list", "--offline", "--config", str(config))
    assert offline_list.returncode == 0 and "0 rules" in offline_list.stdout
    bad = run_cli(
        "rules", "add", "bad..name", "--reference", "R", "--operator", "o",
        "--offline", "--config", str(config),
    )  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.startswith("resolver rules: name:")
    changes = call(_port(edited), "GET", "/v1/changes")[1]["changes"]
    assert changes[0]["action"] == "remove" and changes[0]["offline"] is True


def test_edits_settings_refuse_a_file_outside_the_lists(tmp_path: Path, lists_dir: Path) -> None:
    with pytest.raises(edits.EditError, match="not inside the blocklists"):
        edits.resolve(lists_dir, tmp_path, tmp_path / "elsewhere.yaml", "local", None)
    with pytest.raises(edits.EditError, match="not a directory"):
        edits.resolve(lists_dir / "deepseek.yaml", tmp_path, None, "local", None)
    settings = edits.resolve(lists_dir, tmp_path, None, "local", None)
    assert settings.file == lists_dir / "local-edits.yaml"
    assert settings.changelog == tmp_path / "changes.jsonl"
    assert EditsConfig().list == "local"


def test_the_change_log_is_rotated_at_its_bound(
    tmp_path: Path, lists_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(changelog, "CHANGELOG_MAX_BYTES", 2000)
    settings = edits.resolve(lists_dir, tmp_path, None, "local", None)
    before = changelog.rotations
    for index in range(40):
        changelog.record(settings, {"index": index, "reference": "x" * 100})
    assert changelog.rotations > before
    assert os.path.getsize(settings.changelog) <= 2000
    assert (tmp_path / "changes.jsonl.1").exists()
    found = changelog.changes(settings, 20)
    assert [c["index"] for c in found] == list(range(39, 19, -1))


def test_a_hand_edited_file_is_kept_and_rendered_the_same(tmp_path: Path, lists_dir: Path) -> None:
    settings = edits.resolve(lists_dir, tmp_path, None, "local", None)
    settings.file.write_text(
        "list: local\nreference: agency rules\ndomains:\n  - b.test\n  - a.test  # why\n"
        "exact:\n  - {name: c.test, mode: monitor}\n"
    )
    edits.add(settings, editinput.parse_rule({**ADD, "name": "d.test"}, time.time()))
    text = settings.file.read_text()
    assert text.index('"a.test"') < text.index('"b.test"') < text.index('"d.test"')
    assert 'reference: "agency rules"' in text and '"mode": "monitor"' in text
    assert edits.read_local(settings)[1].fast  # written by the resolver: read as JSON
    again = edits.render(edits.read_local(settings)[1])
    assert again == settings.file.read_bytes()  # deterministic


def test_a_change_log_that_cannot_be_written_is_a_sentence(tmp_path: Path, lists_dir: Path) -> None:
    (tmp_path / "changes.jsonl").mkdir()  # a folder where the log should be
    settings = edits.resolve(lists_dir, tmp_path, None, "local", None)
    with pytest.raises(edits.EditError, match="cannot write") as caught:
        changelog.record(settings, {"action": "add"})
    assert caught.value.status == 500


def test_with_workers_every_process_takes_the_edit(tmp_path: Path, upstream: Any) -> None:
    """--workers 2: a name added is blocked by every worker (SO_REUSEPORT spreads the
    queries), and the timeline adds up the workers' would-block matches per group."""
    config = tmp_path / "resolver.yaml"
    config.write_text(
        f"admin: {{listen: '127.0.0.1:{free_port()}', token: {TOKEN}}}\n"
        f"metrics: {{listen: '127.0.0.1:{free_port()}'}}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "groups: {office: [127.0.0.0/8]}\n"
    )
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "watch.yaml").write_text("list: watch\nmode: monitor\ndomains: [example.test]\n")
    proc = ResolverProcess(
        *("--config", str(config), "--blocklists", str(lists), "--listen", "127.0.0.1:0"),
        *("--upstream", upstream.address, "--workers", "2"),
        ready_text="workers answering on the same addresses",
    )
    try:
        admin, _ = urls(proc)
        port = int(admin.rsplit(":", 1)[1])
        assert call(port, "POST", "/v1/rules", {**ADD, "name": "banned.test"})[0] == 201
        names = [f"q{i}.banned.test" for i in range(40)]
        wait_for(lambda: {ask(proc.port, n).rcode() for n in names} == {dns.rcode.NXDOMAIN}, 5)
        for _ in range(20):
            ask(proc.port, "www.example.test")
        lists_seen = {e["id"]: e for e in call(port, "GET", "/v1/timeline")[1]["lists"]}
        assert lists_seen["watch"]["would_block"] == 20
        assert lists_seen["watch"]["would_block_by_group"] == {"office": 20}
        assert lists_seen["local"]["state"] == "enforced"
    finally:
        proc.stop()


def test_the_real_bounds_of_the_list_and_its_file(tmp_path: Path, lists_dir: Path) -> None:
    settings = edits.resolve(lists_dir, tmp_path, None, "local", None)
    now = time.time()
    full = edits.LocalList("local", {}, {})
    for index in range(edits.MAX_RULES):
        rule = editinput.parse_rule({**ADD, "name": f"n{index}.example"}, now)
        full.rules[rule.name] = rule
    settings.file.write_bytes(edits.render(full))
    started = time.monotonic()
    with pytest.raises(edits.EditError, match=f"holds {edits.MAX_RULES} rules"):
        edits.add(settings, editinput.parse_rule({**ADD, "name": "one-more.example"}, now))
    assert time.monotonic() - started < 5  # read line by line, not through YAML
    edits.remove(settings, "n0.example", "R", "o")  # below the bound again: one fits
    edits.add(settings, editinput.parse_rule({**ADD, "name": "one-more.example"}, now))
    with open(settings.file, "r+b") as out:  # a file past its bound (sparse: cheap)
        out.truncate(edits.MAX_FILE_BYTES + 1)
    with pytest.raises(edits.EditError, match="over 67108864 bytes"):
        edits.rules(settings)


def test_edits_refused_when_the_lists_are_one_file(
    make_server: Callable[..., RunningServer], lists_dir: Path, tmp_path: Path
) -> None:
    running = make_server(
        blocklists=lists_dir / "deepseek.yaml", admin=LOOPBACK, admin_token=TOKEN,
        state_dir=tmp_path / "state",
    )  # fmt: skip
    status, doc = call(running.server.admin_port, "GET", "/v1/rules")
    assert status == 409 and doc["field"] == "edits.file" and "not a directory" in doc["error"]
    status, doc = call(running.server.admin_port, "POST", "/v1/rules", ADD)
    assert status == 409 and doc["field"] == "edits.file"
    assert call(running.server.admin_port, "GET", "/v1/timeline")[0] == 200  # still served
