"""Loading under attack and by mistake (issue 17, items 4, 9, 10, 11, 14, 15, 16).

Every fault while loading is a failed reload with its cause, counted, and the last good
policy keeps serving; the watcher never dies; files are read only inside the allowed roots;
regular expressions that backtrack catastrophically are refused; a reload that loses every
list is refused; IPv4-mapped client groups match; remote lists cannot point at loopback.
The real server runs in-process (conftest.py); ``check`` and ``serve`` run as subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest

from resolver.config import Listen, ReloadConfig, RemoteConfig, load_config
from resolver.observe.metrics import ResolverCollector
from resolver.policy import LoadOptions, load_policy, remote
from resolver.policy.loader import list_files
from resolver.policy.regexcheck import UnsafePattern, check
from resolver.yamlload import SourceError

from .helpers.cli import run_cli
from .helpers.fakeupstream import FakeUpstream
from .helpers.realservers import ResolverProcess
from .helpers.server import RunningServer
from .helpers.wait import wait_for

FAST_RELOAD = ReloadConfig(interval=0.1, debounce=0.05, checksum_interval=1.0)
NESTED = "list: deep\ndomains: " + "[" * 20_000 + "\n"
NUL_INCLUDE = 'list: nul\ninclude:\n  - {file: "names\\0.txt", format: domains}\n'


def rcode(server: RunningServer, name: str, **kwargs: Any) -> str:
    return str(dns.rcode.to_text(server.query(name, **kwargs).rcode()))


@pytest.fixture
def watched(make_server: Callable[..., RunningServer]) -> Iterator[RunningServer]:
    """A server whose file watcher runs, polling every 0.1 s."""
    running = make_server(reload=FAST_RELOAD)
    future = asyncio.run_coroutine_threadsafe(running.server.watch_files(), running.loop)
    yield running
    running.loop.call_soon_threadsafe(running.server.stopping.set)
    future.result(5)  # the watcher ends by itself, without an exception


# --- 4: any exception while loading -----------------------------------------------------------


def test_every_fault_is_a_failed_reload_and_the_watcher_keeps_going(
    watched: RunningServer, lists_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stats = watched.resolver.stats
    good_digest = watched.resolver.policy.digest
    broken = lists_dir / "broken.yaml"

    def reload_fails_with(content: str, *words: str) -> None:
        failures = stats.reloads["failure"]
        broken.write_text(content)
        wait_for(lambda: stats.reloads["failure"] > failures, 8.0)
        error = stats.last_reload_error
        assert str(broken) in error, error
        for word in words:
            assert word in error, error
        assert watched.resolver.policy.digest == good_digest
        assert rcode(watched, "deepseek.com") == "NXDOMAIN"  # the last good policy

    reload_fails_with(NUL_INCLUDE, "NUL")
    reload_fails_with(NESTED, "nests too deeply")
    # An exception nobody foresaw, raised by an import parser: still a failed load, with
    # the file named. (Loads run in a builder process forked when the server started, out
    # of reach of a monkeypatch, so this one is driven in this process.)
    from resolver.policy import formats

    def explode(*_: Any) -> Any:
        raise RuntimeError("parser bug")

    monkeypatch.setattr(formats, "parse", explode)
    elsewhere = lists_dir.parent / "boom"
    elsewhere.mkdir()
    (elsewhere / "names.txt").write_text("x.test\n")
    (elsewhere / "boom.yaml").write_text(
        "list: boom\ninclude: [{file: names.txt, format: domains}]\n"
    )
    with pytest.raises(SourceError) as raised:
        load_policy(elsewhere, LoadOptions())
    assert "boom.yaml" in str(raised.value) and "RuntimeError: parser bug" in str(raised.value)
    monkeypatch.undo()
    # The watcher is alive: a later good edit loads, and its ban takes effect.
    successes = stats.reloads["success"]
    broken.write_text("list: later\ndomains: [example.test]\n")
    wait_for(lambda: stats.reloads["success"] > successes, 8.0)
    assert rcode(watched, "example.test") == "NXDOMAIN"
    assert not stats.last_reload_failed
    families = {f.name: f for f in ResolverCollector(watched.server).collect()}
    failures = families["resolver_policy_reloads"].samples
    assert any(s.labels == {"result": "failure"} and s.value >= 2 for s in failures)


def test_the_reload_api_answers_a_failure_document(
    make_server: Callable[..., RunningServer], lists_dir: Path
) -> None:
    running = make_server(admin=Listen("127.0.0.1", 0))
    (lists_dir / "deep.yaml").write_text(NESTED)
    request = urllib.request.Request(
        f"http://127.0.0.1:{running.server.admin_port}/v1/reload", method="POST", data=b""
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 500
    document = json.loads(caught.value.read())
    assert document["result"] == "failure"
    assert "deep.yaml" in document["error"] and "nests too deeply" in document["error"]
    assert "Traceback" not in document["error"]
    assert rcode(running, "deepseek.com") == "NXDOMAIN"


@pytest.mark.parametrize(
    ("content", "words"), [(NUL_INCLUDE, "NUL byte"), (NESTED, "nests too deeply")]
)
def test_check_and_serve_print_a_sentence_not_a_traceback(
    tmp_path: Path, upstream: FakeUpstream, content: str, words: str
) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "bad.yaml").write_text(content)
    checked = run_cli("check", str(lists))
    assert checked.returncode == 1
    assert "bad.yaml" in checked.stderr and words in checked.stderr
    assert "Traceback" not in checked.stderr
    served = ResolverProcess(
        "--blocklists",
        str(lists),
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream.address,
        ready=False,
    )
    assert served.finish(30) == 2
    log = "\n".join(served.lines)
    assert "bad.yaml" in log and words in log and "Traceback" not in log


def test_sighup_with_a_broken_list_logs_the_failure(tmp_path: Path, upstream: FakeUpstream) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "ban.yaml").write_text("list: ban\ndomains: [deepseek.com]\n")
    config = tmp_path / "resolver.yaml"
    # The watcher is slowed down so that the signal, not the watcher, does the reload.
    config.write_text("blocklists: lists\nreload: {interval: 3600}\n")
    proc = ResolverProcess(
        "--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address
    )
    try:
        (lists / "deep.yaml").write_text(NESTED)
        proc.proc.send_signal(signal.SIGHUP)
        line = proc.wait_for("reload failed")
        assert "deep.yaml" in line and "nests too deeply" in line
        reply = dns.query.udp(
            dns.message.make_query("deepseek.com", "A"), "127.0.0.1", port=proc.port, timeout=3
        )
        assert reply.rcode() == dns.rcode.NXDOMAIN
    finally:
        proc.stop()
    log = "\n".join(proc.lines)
    assert "never retrieved" not in log and "Traceback" not in log


# --- 9: lists in a symlinked folder -----------------------------------------------------------


def test_lists_in_a_linked_folder_are_loaded_once_despite_a_loop(
    make_server: Callable[..., RunningServer], lists_dir: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "team.yaml").write_text("list: team\ndomains: [example.test]\n")
    (shared / "loop").symlink_to(shared)  # a link loop must end the walk, not hang it
    (lists_dir / "team").symlink_to(shared)
    (lists_dir / "again").symlink_to(shared)  # the same folder linked twice: read once
    files = list_files(lists_dir)
    assert sum(f.name == "team.yaml" for f in files) == 1
    running = make_server()
    assert rcode(running, "example.test") == "NXDOMAIN"
    assert rcode(running, "deepseek.com") == "NXDOMAIN"


# --- 10: include.file stays inside the lists' tree --------------------------------------------

SECRET = "admin_token: TOPSECRET-" + "x" * 200


def test_includes_outside_the_lists_folder_are_refused(
    make_server: Callable[..., RunningServer], lists_dir: Path, tmp_path: Path
) -> None:
    secrets = tmp_path / "etc"
    secrets.mkdir()
    (secrets / "resolver.yaml").write_text(SECRET + "\n")
    (lists_dir / "link.txt").symlink_to(secrets / "resolver.yaml")
    running = make_server()
    for target in ("../etc/resolver.yaml", str(secrets / "resolver.yaml"), "link.txt"):
        (lists_dir / "steal.yaml").write_text(
            f"list: steal\ninclude: [{{file: '{target}', format: domains}}]\n"
        )
        checked = run_cli("check", str(lists_dir))
        assert checked.returncode == 1, checked.stderr
        assert "outside the folders lists may include from" in checked.stderr
        assert "include_roots" in checked.stderr
        assert "TOPSECRET" not in checked.stderr + checked.stdout
        assert running.call(running.server.reload()) is False
        assert "outside" in running.resolver.stats.last_reload_error
        assert rcode(running, "deepseek.com") == "NXDOMAIN"
    # An operator who means it names the folder in include_roots; even then a warning
    # quotes at most 80 characters of an offending line.
    config = tmp_path / "resolver.yaml"
    config.write_text(f"blocklists: {lists_dir}\ninclude_roots: [etc]\n")
    checked = run_cli("check", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "TOPSECRET-xxxx" in checked.stderr
    assert "x" * 81 not in checked.stderr


# --- 11: patterns that backtrack catastrophically ---------------------------------------------

CRAFTED = [
    "(a+)+$",
    "(a|a)*$",
    "(a|ab)*c",
    "(a*)*$",
    r"(\.?[a-z]+)*$",
    r"\w*\w*\w*z",
    ".*a.*a.*z",
    r"(\w+)\1",
]
REASONABLE = [
    "deepseek",
    r"^ads?[0-9]*\.",
    ".*track.*",
    r"(\.|^)doubleclick\.net$",
    r"^ad([sxv]?[0-9]*|system)[_.-]([^.[:space:]]+\.){1,}|[_.-]ad([sxv]?[0-9]*|system)[_.-]",
    r"([a-z0-9-]+\.)*ads\.com$",
    r"^(www\.)?example\.(com|org)$",
    r"^[a-z0-9]{32}\.example$",
    r"(^|\.)tiktok(cdn|v)?\.com$",
    r"^.*\.ads\..*$",
    r"^(.+\.)?ads\.example$",
]


@pytest.mark.parametrize("pattern", CRAFTED)
def test_crafted_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(UnsafePattern):
        check(pattern)


def test_reasonable_patterns_are_accepted(tmp_path: Path) -> None:
    items = "".join(f"  - '/{p}/'\n" for p in REASONABLE)
    (tmp_path / "p.yaml").write_text(f"list: p\npatterns:\n{items}  - api.*.example.com\n")
    policy = load_policy(tmp_path)
    assert len(policy.patterns) == len(REASONABLE) + 1


def test_a_crafted_pattern_is_refused_by_check_and_by_reload(
    make_server: Callable[..., RunningServer], lists_dir: Path
) -> None:
    running = make_server()
    (lists_dir / "re.yaml").write_text("list: re\npatterns:\n  - /x/\n  - '/(a+)+$/'\n")
    checked = run_cli("check", str(lists_dir))
    assert checked.returncode == 1
    assert f"{lists_dir / 're.yaml'}:4:5: patterns[1]: " in checked.stderr
    assert "nested quantifiers" in checked.stderr
    assert running.call(running.server.reload()) is False
    assert "nested quantifiers" in running.resolver.stats.last_reload_error
    # The pattern never loaded: the crafted name is just forwarded (the fake upstream
    # answers NXDOMAIN for names it does not know), and the old policy still blocks.
    assert rcode(running, "a" * 28 + "!.test", timeout=3) == "NXDOMAIN"
    assert rcode(running, "deepseek.com") == "NXDOMAIN"
    assert running.resolver.policy.patterns == ()


# --- 14: a reload that loses lists ------------------------------------------------------------


def test_a_dangling_link_or_an_empty_folder_fails_the_reload(
    make_server: Callable[..., RunningServer], lists_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "real.yaml"
    target.write_text("list: linked\ndomains: [example.test]\n")
    (lists_dir / "linked.yaml").symlink_to(target)
    running = make_server()
    stats = running.resolver.stats
    target.unlink()  # the link now dangles
    assert running.call(running.server.reload()) is False
    assert "symbolic link" in stats.last_reload_error and "linked.yaml" in stats.last_reload_error
    assert rcode(running, "example.test") == "NXDOMAIN"
    # Deleting a file is how a list is removed: allowed, counted, logged.
    (lists_dir / "linked.yaml").unlink()
    assert running.call(running.server.reload()) is True
    assert stats.lists_removed == 1
    assert rcode(running, "example.test") == "NOERROR"
    # An emptied folder would unblock everything: refused unless reload.allow_empty.
    (lists_dir / "deepseek.yaml").unlink()
    assert running.call(running.server.reload()) is False
    assert "holds no lists" in stats.last_reload_error
    assert "reload.allow_empty" in stats.last_reload_error
    assert rcode(running, "deepseek.com") == "NXDOMAIN"
    assert stats.reloads["failure"] == 2


def test_an_empty_folder_loads_when_the_operator_allows_it(
    make_server: Callable[..., RunningServer], lists_dir: Path
) -> None:
    running = make_server(reload=ReloadConfig(allow_empty=True))
    (lists_dir / "deepseek.yaml").unlink()
    assert running.call(running.server.reload()) is True
    assert running.resolver.policy.lists == ()


# --- 15: IPv4-mapped client groups ------------------------------------------------------------


def test_a_mapped_client_group_matches_its_ipv4_client(
    make_server: Callable[..., RunningServer], lists_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "resolver.yaml"
    config.write_text("groups:\n  lab: ['::ffff:127.0.0.3/128', '::ffff:10.0.0.0/104']\n")
    groups = load_config(config).groups
    assert groups == (("lab", ("127.0.0.3/32", "10.0.0.0/8")),)
    (lists_dir / "lab.yaml").write_text("list: lab\nclients: [lab]\ndomains: [example.test]\n")
    # The in-process server gets the group as written (ClientGroups unmaps it too).
    running = make_server(groups=(("lab", ("::ffff:127.0.0.3/128",)),))
    query = dns.message.make_query("example.test", "A")
    lab = dns.query.udp(query, "127.0.0.1", port=running.port, timeout=3, source="127.0.0.3")
    assert lab.rcode() == dns.rcode.NXDOMAIN
    assert rcode(running, "example.test") == "NOERROR"  # from 127.0.0.1: not in the group


# --- 16: remote lists on loopback -------------------------------------------------------------


class _Lists(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/broken":
            body = b"SECRET-BODY " * 10
            self.send_response(500)
        else:
            body = b"example.test\n"
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def list_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Lists)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield int(httpd.server_address[1])
    httpd.shutdown()
    httpd.server_close()


def test_a_remote_list_on_loopback_is_refused_unless_allowed(
    make_server: Callable[..., RunningServer], lists_dir: Path, tmp_path: Path, list_server: int
) -> None:
    url = f"http://127.0.0.1:{list_server}/list.txt"
    (lists_dir / "remote.yaml").write_text(
        f"list: remote\ninclude: [{{url: '{url}', format: domains, refresh: 1s}}]\n"
    )
    with pytest.raises(SourceError, match=r"loopback address; set remote\.allow_private"):
        load_policy(lists_dir, LoadOptions(state_dir=tmp_path / "state"))
    checked = run_cli("check", str(lists_dir))
    assert checked.returncode == 1 and "loopback" in checked.stderr
    # Allowed: the server fetches the list (in its refresher) and reloads with it.
    running = make_server(remote=RemoteConfig(allow_private=True), state_dir=tmp_path / "state")
    future = asyncio.run_coroutine_threadsafe(running.server.refresh_remotes(), running.loop)
    try:
        wait_for(lambda: rcode(running, "example.test") == "NXDOMAIN", 10)
    finally:
        running.loop.call_soon_threadsafe(running.server.stopping.set)
        future.result(5)
    assert running.server.fetch_status[url].status == "updated"


def test_a_name_resolving_to_loopback_and_the_admin_api_are_refused_at_fetch(
    tmp_path: Path, list_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = socket.getaddrinfo

    def fake(host: str, *args: Any, **kwargs: Any) -> Any:
        return real("127.0.0.1" if host == "lists.example.test" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    url = f"http://lists.example.test:{list_server}/list.txt"
    assert remote.refused_target(url, False) is None  # a name: only resolving tells
    result = remote.fetch(url, tmp_path, timeout=5)
    assert result.status == "failed"
    assert "resolves to 127.0.0.1, loopback" in (result.error or "")
    assert remote.fetch(url, tmp_path, timeout=5, allow_private=True).status == "updated"
    # The resolver's own admin API is never a list source, allowance or not.
    own = (("127.0.0.1", list_server),)
    refused = remote.fetch(url, tmp_path / "b", timeout=5, allow_private=True, own=own)
    assert "own admin or metrics endpoint" in (refused.error or "")
    # An error says the status and size, never the body.
    broken = remote.fetch(f"http://127.0.0.1:{list_server}/broken", tmp_path / "c", 5.0, 1000, True)
    assert broken.status == "failed"
    assert "HTTP 500 (120 bytes)" in (broken.error or "")
    assert "SECRET" not in (broken.error or "")
    assert os.listdir(tmp_path / "c") == []


# --- a load that never ends -------------------------------------------------------------------


def test_a_load_that_hangs_is_given_up_after_reload_timeout(
    make_server: Callable[..., RunningServer], lists_dir: Path
) -> None:
    # A list including a FIFO that nobody writes: opening it blocks for ever, as a list on
    # a stalled network mount would. The load is given up after reload.timeout, the reload
    # fails naming the cause, and the next reload is not held behind it.
    running = make_server(reload=ReloadConfig(timeout=1.5))
    stats = running.resolver.stats
    good_digest = running.resolver.policy.digest
    os.mkfifo(lists_dir / "stuck.txt")
    (lists_dir / "stuck.yaml").write_text(
        "list: stuck\ninclude: [{file: stuck.txt, format: domains}]\n"
    )
    started = time.monotonic()
    assert running.call(running.server.reload()) is False
    assert time.monotonic() - started < 10
    assert stats.reloads["failure"] == 1
    assert "reload.timeout" in stats.last_reload_error, stats.last_reload_error
    assert running.resolver.policy.digest == good_digest
    assert rcode(running, "deepseek.com") == "NXDOMAIN"
    # Fixed, the next reload loads.
    (lists_dir / "stuck.txt").unlink()
    (lists_dir / "stuck.txt").write_text("stuck.test\n")
    running.call(running.server.reload())
    assert stats.reloads["success"] >= 1 and not stats.last_reload_failed
    assert rcode(running, "stuck.test") == "NXDOMAIN"
