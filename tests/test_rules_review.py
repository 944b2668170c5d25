"""Rule edits as an attacker and a demanding operator would try them (issue 20 review):
names (trailing dot, case, IDN, wildcard, a TLD, the root), references that would break
YAML, a symbolic link where the file is, a link planted where its temporary file goes,
an undo after another edit, and the CLI --offline racing the API on the same file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dns.rcode
import pytest

from resolver.config import Listen
from resolver.policy import editinput, edits, load_policy

from .helpers.admin import call
from .helpers.cli import run_cli
from .helpers.http import TOKEN
from .helpers.realservers import ROOT
from .helpers.server import RunningServer

LOOPBACK = Listen("127.0.0.1", 0)
ADD = {"name": "example.test", "reference": "Decree 7/2026", "operator": "ana"}


@pytest.fixture
def edited(make_server: Callable[..., RunningServer], tmp_path: Path) -> RunningServer:
    return make_server(
        admin=LOOPBACK, admin_token=TOKEN, metrics=LOOPBACK, state_dir=tmp_path / "state"
    )


def _settings(lists_dir: Path, tmp_path: Path) -> edits.Settings:
    return edits.resolve(lists_dir, tmp_path, None, "local", None)


def _rule(**fields: object) -> edits.Rule:
    return editinput.parse_rule({**ADD, **fields}, time.time())


def test_names_are_canonical_idn_is_punycode_and_a_wildcard_says_what_to_give() -> None:
    assert _rule(name="Chat.Example.TEST.").name == "chat.example.test"
    assert _rule(name="bücher.example").name == "xn--bcher-kva.example"
    assert _rule(name="xn--bcher-kva.example").name == "xn--bcher-kva.example"
    # IDNA 2003 (the loader's) would block someone else's name: fass.de for faß.de
    # (xn--fa-hia.de under IDNA 2008), example.com for a name with a zero-width space.
    for typed, read in (("faß.de", "fass.de"), ("ex\u200bample.test", "example.test")):
        with pytest.raises(edits.EditError, match=f"would be blocked as {read}, not as typed"):
            _rule(name=typed)
    assert _rule(name="xn--fa-hia.de").name == "xn--fa-hia.de"  # the A-label meant
    with pytest.raises(edits.EditError, match=r"give 'example\.test', not a wildcard"):
        _rule(name="*.example.test")
    for root in (".", " . ", ""):
        with pytest.raises(edits.EditError) as caught:
            _rule(name=root, allow_tld=True)  # the root: never, whatever the flag
        assert caught.value.field == "name"


def test_a_top_level_domain_needs_allow_tld_and_is_warned(
    edited: RunningServer, lists_dir: Path, tmp_path: Path
) -> None:
    port = int(edited.server.admin_port)
    status, doc = call(port, "POST", "/v1/rules", {**ADD, "name": "test"}, check=False)
    assert status == 400 and doc["field"] == "name" and "allow_tld" in doc["error"]
    assert not (lists_dir / "local-edits.yaml").exists()
    bad = call(port, "POST", "/v1/rules", {**ADD, "name": "test", "allow_tld": "yes"}, check=False)
    assert bad[0] == 400 and bad[1]["field"] == "allow_tld"
    # An exact rule for a TLD blocks that one name only: no flag needed.
    status, doc = call(port, "POST", "/v1/rules", {**ADD, "name": "test", "kind": "exact"})
    assert status == 201 and "warning" not in doc["change"]
    call(port, "POST", "/v1/rules/remove", ADD | {"name": "test"})
    status, doc = call(port, "POST", "/v1/rules", {**ADD, "name": "test", "allow_tld": True})
    assert status == 201 and "top-level domain test" in doc["change"]["warning"]
    assert edited.query("anything.test").rcode() == dns.rcode.NXDOMAIN
    config = tmp_path / "offline.yaml"
    config.write_text(f"blocklists: {lists_dir}\nstate_dir: {tmp_path / 'state'}\n")
    offline = ["--offline", "--config", str(config), "--reference", "R", "--operator", "o"]
    refused = run_cli("rules", "add", "invalid", *offline)
    assert refused.returncode == 1 and "--allow-tld" in refused.stderr
    done = run_cli("rules", "add", "invalid", "--allow-tld", *offline)
    assert done.returncode == 0, done.stderr
    assert "warning: every name under the top-level domain invalid" in done.stderr


def test_a_reference_that_would_break_yaml_stays_one_line_and_loads(
    tmp_path: Path, lists_dir: Path
) -> None:
    settings = _settings(lists_dir, tmp_path)
    nasty = (
        "a: \"b\" # c {d} [e], & *f ! |g >h %i @j `k\\ 'l' --- ... "
        '\u00e9\u4e2d # edit: {"operator": "eve"}'
    )
    edits.add(settings, _rule(reference=nasty))
    edits.add(settings, _rule(name="b.test", reference="plain"))
    lines = settings.file.read_text().splitlines()
    assert len([line for line in lines if "example.test" in line]) == 1
    rules = {rule.name: rule for rule in edits.rules(settings)}
    assert rules["example.test"].reference == nasty
    assert rules["example.test"].operator == "ana"  # not the fake "# edit:" in the text
    policy = load_policy(lists_dir)  # the loader reads it as YAML
    assert any(b.id == "local" for b in policy.lists)
    # Read back as YAML too (a file edited by hand loses the fast path).
    settings.file.write_text(settings.file.read_text().replace("# Rule edits", "# hand", 1))
    assert edits.rules(settings)[1].reference == nasty
    for newline in ("a\nb", "a\rb", "a\u2028b", "a\u0085b", "a\u202eb"):
        with pytest.raises(edits.EditError, match="non-printable"):
            _rule(reference=newline)


def test_a_symlinked_edits_file_is_refused_and_its_target_untouched(
    tmp_path: Path, lists_dir: Path
) -> None:
    outside = tmp_path / "outside.yaml"
    outside.write_text("list: other\ndomains: [kept.test]\n")
    (lists_dir / "local-edits.yaml").symlink_to(outside)
    with pytest.raises(edits.EditError, match="symbolic link") as caught:
        edits.add(_settings(lists_dir, tmp_path), _rule())
    assert caught.value.field == "edits.file" and caught.value.status == 409
    assert (lists_dir / "local-edits.yaml").is_symlink()
    assert outside.read_text() == "list: other\ndomains: [kept.test]\n"


def test_a_link_planted_where_the_temporary_file_goes_is_not_followed(
    tmp_path: Path, lists_dir: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    settings = _settings(lists_dir, tmp_path)
    (lists_dir / f".local-edits.yaml.tmp-{os.getpid()}").symlink_to(victim)
    (lists_dir / ".local-edits.yaml.lock").symlink_to(tmp_path / "lock-elsewhere")
    with pytest.raises(edits.EditError, match="lock file"):
        edits.add(settings, _rule())
    (lists_dir / ".local-edits.yaml.lock").unlink()
    edits.add(settings, _rule())
    assert victim.read_text() == "precious\n"
    assert not settings.file.is_symlink() and "example.test" in settings.file.read_text()
    assert not (tmp_path / "lock-elsewhere").exists()


def test_undo_after_another_edit_keeps_the_other_edit(tmp_path: Path, lists_dir: Path) -> None:
    settings = _settings(lists_dir, tmp_path)
    mine = edits.add(settings, _rule(name="mine.test"))
    edits.add(settings, _rule(name="theirs.test"))  # another process, meanwhile
    edits.restore(settings, mine)  # my reload failed: undo mine only
    assert [r.name for r in edits.rules(settings)] == ["theirs.test"]
    gone = edits.remove(settings, "theirs.test", "lifted", "ben")
    edits.add(settings, _rule(name="third.test"))
    edits.restore(settings, gone)
    assert [r.name for r in edits.rules(settings)] == ["theirs.test", "third.test"]
    # With nothing in between, the file is put back byte for byte (or removed).
    last = edits.add(settings, _rule(name="zz.test"))
    edits.restore(settings, last)
    assert settings.file.read_bytes() == last.before


def test_offline_cli_and_api_edits_of_one_file_at_once_keep_every_edit(
    edited: RunningServer, lists_dir: Path, tmp_path: Path
) -> None:
    port = int(edited.server.admin_port)
    config = tmp_path / "offline.yaml"
    config.write_text(f"blocklists: {lists_dir}\nstate_dir: {tmp_path / 'state'}\n")
    statuses: list[int] = []

    def api(index: int) -> None:
        body = {**ADD, "name": f"api{index}.example.test"}
        statuses.append(call(port, "POST", "/v1/rules", body, check=False)[0])

    threads = [threading.Thread(target=api, args=(i,)) for i in range(4)]

    def cli(index: int) -> list[str]:
        name = f"cli{index}.example.test"
        add = ["rules", "add", name, "--reference", "R", "--operator", "cli"]
        return [sys.executable, "-m", "resolver", *add, "--offline", "--config", str(config)]

    pipe = subprocess.PIPE
    clis = [
        subprocess.Popen(cli(i), cwd=ROOT, stdout=pipe, stderr=pipe, text=True) for i in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    outs = [cli.communicate(timeout=60) for cli in clis]
    assert [cli.returncode for cli in clis] == [0, 0, 0], outs
    assert statuses == [201] * 4
    names = {rule.name for rule in edits.rules(_settings(lists_dir, tmp_path))}
    want = {f"api{i}.example.test" for i in range(4)} | {f"cli{i}.example.test" for i in range(3)}
    assert names == want
    log = [json.loads(line) for line in (tmp_path / "state" / "changes.jsonl").open()]
    assert {entry["name"] for entry in log} == want


def _check(config: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("check", "--config", str(config))


def test_check_reports_edits_settings_that_cannot_work(tmp_path: Path, lists_dir: Path) -> None:
    base = f"blocklists: {lists_dir}\nstate_dir: {tmp_path / 'state'}\nupstreams: [192.0.2.1]\n"
    config = tmp_path / "resolver.yaml"
    # The list id of another list file: every edit would fail its reload.
    config.write_text(base + "edits:\n  list: deepseek\n")
    done = _check(config)
    assert done.returncode == 1
    assert "rule edits: edits.list: list id 'deepseek' is already used by" in done.stderr
    assert "1 error(s)" in done.stderr
    # A folder that does not exist, and a local list that edits cannot read.
    config.write_text(base + f"edits:\n  file: {lists_dir / 'gone' / 'local.yaml'}\n")
    done = _check(config)
    assert done.returncode == 1 and f"the folder {lists_dir / 'gone'} does not exist" in done.stderr
    (lists_dir / "mine.yaml").write_text("list: local\nsomething: else\ndomains: []\n")
    config.write_text(base + f"edits:\n  file: {lists_dir / 'mine.yaml'}\n")
    done = _check(config)
    assert done.returncode == 1 and "cannot be kept by rule edits" in done.stderr
    (lists_dir / "mine.yaml").unlink()
    # Not set in the config: the same findings are warnings, and check passes.
    (lists_dir / "other.yaml").write_text("list: local\ndomains: [x.test]\n")
    config.write_text(base)
    done = _check(config)
    assert done.returncode == 0, done.stderr
    assert "warning: " in done.stderr and "list id 'local' is already used by" in done.stderr
    (lists_dir / "other.yaml").unlink()
    clean = _check(config)
    assert clean.returncode == 0 and "rule edits" not in clean.stderr, clean.stderr
    if os.geteuid() != 0:  # root writes anywhere (but on a read-only mount: EROFS)
        lists_dir.chmod(0o555)
        try:
            config.write_text(base + "edits:\n  list: mine\n")
            done = _check(config)
            assert done.returncode == 1 and "is not writable" in done.stderr
        finally:
            lists_dir.chmod(0o755)


def test_a_body_nested_too_deep_is_a_400_not_a_traceback(edited: RunningServer) -> None:
    port = int(edited.server.admin_port)
    for body in (b"[" * 60_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000):
        status, doc = call(port, "POST", "/v1/rules", raw=body, check=False)
        assert status == 400 and "not JSON" in doc["error"], (status, doc)
