"""The admin API and /metrics against hostile HTTP clients (issue 17: items 5, 17 and 24).

- Item 5: a flood of connections that each send a large header and never finish holds
  almost nothing in the real server (resident memory from /proc/PID/status), connections
  beyond ``max_connections`` are closed, and a normal scrape still works; every limit
  answers with its own status (408, 413, 414, 431, 401 before any body is read).
- Item 17: a state-changing request from a web page (any Origin) and a request for a
  foreign Host (DNS rebinding) are refused by the admin API, and counted.
- Item 24: ``resolver_process_*``, and per remote list the time of its last successful
  fetch, its age and its refresh interval; the shipped alert fires on a stale list, as
  promtool evaluates it on the values a real scrape gave.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from resolver.config import Config, Listen, RemoteConfig
from resolver.policy import remote
from resolver.service.http import HTTPServer, Request, Response
from resolver.service.server import Server, StartupError

from .helpers.fakeupstream import FakeUpstream
from .helpers.memory import MiB, rss
from .helpers.realservers import ROOT, ResolverProcess, free_port
from .helpers.server import RunningServer
from .helpers.wait import wait_until

TOKEN = "a-test-token-of-32-characters-xx"
LOOPBACK = Listen("127.0.0.1", 0)
PROMTOOL = shutil.which("promtool")


# --- Helpers -------------------------------------------------------------------------------


def exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes; (status, headers, body), 0 if none."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head:
        return 0, {}, b""
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    host: str | None = None,
    body: bytes = b"",
) -> tuple[int, dict[str, str], bytes]:
    host = f"127.0.0.1:{port}" if host is None else host
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def scrape(port: int) -> str:
    status, _, body = request(port, "GET", "/metrics")
    assert status == 200
    return body.decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in an exposition, or None."""
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        metric, _, rest = series.partition("{")
        if metric != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return None


def flood(port: int, count: int, data: bytes) -> list[socket.socket]:
    """``count`` connections, each sending ``data`` (what the kernel takes) and waiting."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # closed by the server already
            sock.send(data)
        socks.append(sock)
    return socks


def closed_by_server(socks: list[socket.socket]) -> set[socket.socket]:
    """The connections the server has answered or closed (they are readable)."""
    done: set[socket.socket] = set()
    for start in range(0, len(socks), 500):  # select() takes fds below 1024 only; poll
        poller = select.poll()
        batch = {s.fileno(): s for s in socks[start : start + 500]}
        for fd in batch:
            poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        done |= {batch[fd] for fd, _ in poller.poll(0)}
    return done


# --- Item 5: the real server under a flood -------------------------------------------------


@pytest.fixture(scope="module")
def flooded() -> Iterator[tuple[ResolverProcess, int, int]]:
    """The real server, as ``resolver serve`` runs it, with /metrics and the admin API."""
    upstream = FakeUpstream(records={("example.test", "A"): ["192.0.2.1"]})
    metrics, admin = free_port(), free_port()
    proc = ResolverProcess(
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream.address,
        "--metrics",
        f"127.0.0.1:{metrics}",
        "--admin",
        f"127.0.0.1:{admin}",
    )
    try:
        yield proc, metrics, admin
    finally:
        proc.stop()
        upstream.close()


def test_thousand_connections_with_large_unfinished_headers_hold_little_memory(
    flooded: tuple[ResolverProcess, int, int],
) -> None:
    proc, metrics, _ = flooded
    pid = proc.proc.pid
    scrape(metrics)
    before = rss(pid) / MiB
    # Each: 7 header lines of 8000 bytes and one more line, never ended (~60 KB). The
    # version before read up to 100 such lines and a 1 MiB body before looking at them.
    line = b"X-Pad: " + b"a" * 7990 + b"\r\n"
    data = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n" + line * 7 + b"X-Last: " + b"b" * 4000
    peak = before
    socks: list[socket.socket] = []
    try:
        for _ in range(10):  # 10 x 100 connections, memory sampled between the batches
            socks += flood(metrics, 100, data)
            peak = max(peak, rss(pid) / MiB)
        wait_until(lambda: len(closed_by_server(socks)) == len(socks), 8)
        peak = max(peak, rss(pid) / MiB)
        assert peak - before < 30, f"RSS grew by {peak - before:.1f} MiB"
        assert len(closed_by_server(socks)) == len(socks)  # all answered 431 and closed
    finally:
        for sock in socks:
            sock.close()
    text = scrape(metrics)
    rejected = sample(text, "resolver_http_rejected_total", server="metrics", reason="too_large")
    assert rejected is not None and rejected >= 1000


def test_connections_beyond_the_cap_are_closed_and_scrapes_still_work(
    flooded: tuple[ResolverProcess, int, int],
) -> None:
    proc, metrics, admin = flooded
    pid = proc.proc.pid
    before_text = scrape(metrics)
    evicted_before = sample(
        before_text, "resolver_http_rejected_total", server="metrics", reason="evicted"
    )
    before = rss(pid) / MiB
    # Slowloris: a header line of 4000 bytes, never finished, on 1000 connections.
    data = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 4000
    socks: list[socket.socket] = []
    try:
        for _ in range(10):
            socks += flood(metrics, 100, data)
        # The server takes them all and closes the oldest beyond its 64.
        wait_until(lambda: len(socks) - len(closed_by_server(socks)) <= 64, 8)
        still_open = len(socks) - len(closed_by_server(socks))
        assert still_open <= 64, f"{still_open} connections held open"
        growth = rss(pid) / MiB - before
        # A normal scrape gets through (closing one more of the slow ones), and the admin
        # API, a listener of its own, never noticed.
        text = scrape(metrics)
        assert request(admin, "GET", "/readyz")[0] == 200
    finally:
        for sock in socks:
            sock.close()
    assert growth < 30, f"RSS grew by {growth:.1f} MiB"
    open_now = sample(text, "resolver_http_connections", server="metrics")
    assert open_now is not None and open_now <= 64
    assert sample(text, "resolver_http_max_connections", server="metrics") == 64
    evicted = sample(text, "resolver_http_rejected_total", server="metrics", reason="evicted")
    assert evicted is not None and evicted - (evicted_before or 0) >= 1000 - 64
    # Once the flood is gone, scrapes work as before.
    assert sample(scrape(metrics), "resolver_build_info") == 1.0


# --- Item 5: each limit and its status ------------------------------------------------------


@pytest.fixture
def http(make_server: Callable[..., RunningServer]) -> RunningServer:
    return make_server(admin=LOOPBACK, admin_token=TOKEN, metrics=LOOPBACK)


def _admin_http(running: RunningServer) -> HTTPServer:
    (found,) = [h for h in running.server.http_servers if h.name == "admin"]
    return found


def test_each_limit_answers_with_its_status(http: RunningServer) -> None:
    admin, metrics = http.server.admin_port, http.server.metrics_port
    auth = {"Authorization": f"Bearer {TOKEN}"}
    cases: list[tuple[int, bytes, int]] = [
        (admin, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", 414),
        (admin, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 9000, 431),
        (
            admin,
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(101))
            + b"\r\n",
            431,
        ),
        (
            admin,
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
            + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 500) for i in range(20))
            + b"\r\n",
            431,
        ),
        (admin, b"HELLO\r\n\r\n", 400),
        (admin, b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 needs a Host
        (admin, b"GET /healthz HTTP/1.0\r\n\r\n", 200),  # HTTP/1.0 may go without
        (admin, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n\r\n", 400),
        (admin, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nBad Name: x\r\n\r\n", 400),
        (admin, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n", 200),
        (metrics, b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n", 413),
        (metrics, b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n", 404),  # never admin paths
    ]
    for port, data, expected in cases:
        status, _, body = exchange(port, data)
        assert status == expected, (data[:80], status, body[:200])
    # A POST with a body to a route that takes none: up to 64 KiB is read, and ignored.
    status, _, body = request(
        admin,
        "POST",
        "/v1/cache/flush",
        {**auth, "Content-Length": "11"},
        body=b'{"all":true}'[:11],
    )
    assert status == 200, body
    status, _, _ = request(admin, "POST", "/v1/reload", {**auth, "Content-Length": "70000"})
    assert status == 413
    status, _, _ = request(
        admin, "POST", "/v1/reload", {**auth, "Transfer-Encoding": "chunked"}, body=b"0\r\n\r\n"
    )
    assert status == 501
    counts = scrape(metrics)
    for reason, at_least in (("too_large", 5), ("malformed", 5)):
        value = sample(counts, "resolver_http_rejected_total", server="admin", reason=reason)
        assert value is not None and value >= at_least, reason


def test_the_token_is_checked_before_any_body_is_read(http: RunningServer) -> None:
    admin = http.server.admin_port
    reloads = sum(http.resolver.stats.reloads.values())
    # A body is announced and never sent: without the token the answer comes at once.
    started = time.monotonic()
    status, headers, _ = request(admin, "POST", "/v1/reload", {"Content-Length": "60000"})
    assert status == 401 and time.monotonic() - started < 3
    assert headers["www-authenticate"].startswith("Bearer")
    assert sum(http.resolver.stats.reloads.values()) == reloads
    # With the token, the server waits for the body, but only so long (408).
    _admin_http(http).read_timeout = 0.5
    status, _, _ = request(
        admin, "POST", "/v1/reload", {"Authorization": f"Bearer {TOKEN}", "Content-Length": "10"}
    )
    assert status == 408
    assert sum(http.resolver.stats.reloads.values()) == reloads


def test_a_request_that_never_ends_times_out(http: RunningServer) -> None:
    _admin_http(http).read_timeout = 0.5
    admin = http.server.admin_port
    with socket.create_connection(("127.0.0.1", admin), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        started = time.monotonic()
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 ") and time.monotonic() - started < 3


def test_when_every_slot_is_answering_new_connections_get_503(
    make_server: Callable[..., RunningServer],
) -> None:
    running = make_server(admin=LOOPBACK, admin_max_connections=2)
    server = _admin_http(running)
    assert server.max_connections == 2
    release = asyncio.Event()

    async def slow(_: Request) -> Response:
        await release.wait()
        return Response(200, b"{}\n")

    server.routes[("GET", "/slow")] = slow  # a test route that holds its slot
    port = running.server.admin_port
    holders = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        for sock in holders:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert wait_until(lambda: server.connections == 2 and not server._reading, 5)
        status, _, _ = request(port, "GET", "/healthz")
        assert status == 503
        assert server.rejected["connection_limit"] == 1
    finally:
        running.loop.call_soon_threadsafe(release.set)
        for sock in holders:
            sock.close()
    assert wait_until(lambda: server.connections == 0, 5)
    assert request(port, "GET", "/healthz")[0] == 200


def test_off_loopback_the_admin_api_needs_a_token(upstream: FakeUpstream, lists_dir: Path) -> None:
    from resolver.upstream.endpoints import parse_upstream

    config = Config(
        listen=(LOOPBACK,),
        upstreams=(parse_upstream(upstream.address),),
        blocklists=lists_dir,
        admin=Listen("0.0.0.0", 0),  # refused before anything binds to it
    )
    with pytest.raises(StartupError, match=r"admin\.token"):
        asyncio.run(Server(config).start())


def test_with_a_token_every_v1_path_needs_it(http: RunningServer) -> None:
    admin = http.server.admin_port
    for method, path in (("GET", "/v1/status"), ("GET", "/v1/nope"), ("POST", "/v1/reload")):
        assert request(admin, method, path)[0] == 401, path
        wrong = {"Authorization": "Bearer wrong-wrong-wrong-wrong"}
        assert request(admin, method, path, wrong)[0] == 401, path
    assert request(admin, "GET", "/v1/status", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert request(admin, "GET", "/healthz")[0] == 200  # probes need no token


# --- Item 17: cross-site requests and DNS rebinding ----------------------------------------


@pytest.fixture
def loopback_admin(make_server: Callable[..., RunningServer]) -> RunningServer:
    """The shipped setup: the admin API on loopback, no token."""
    return make_server(
        admin=LOOPBACK, metrics=LOOPBACK, admin_allowed_hosts=("resolver.example.org",)
    )


def test_state_changing_requests_from_web_pages_are_refused(loopback_admin: RunningServer) -> None:
    admin = loopback_admin.server.admin_port
    stats = loopback_admin.resolver.stats
    reloads = sum(stats.reloads.values())
    # A page elsewhere, and even one that claims this very origin (after DNS rebinding the
    # attacker's page is same-origin): no browser has business with this API.
    for origin in ("http://evil.example", f"http://127.0.0.1:{admin}", "null"):
        status, _, body = request(admin, "POST", "/v1/reload", {"Origin": origin})
        assert status == 403, body
        assert request(admin, "POST", "/v1/cache/flush", {"Origin": origin})[0] == 403
    assert sum(stats.reloads.values()) == reloads  # nothing was reloaded
    # Reading is not changing: a GET with an Origin is answered (no CORS header lets a page
    # read it), and curl, which sends no Origin, may POST.
    status, headers, _ = request(admin, "GET", "/v1/status", {"Origin": "http://evil.example"})
    assert status == 200 and "access-control-allow-origin" not in headers
    assert request(admin, "POST", "/v1/reload")[0] == 200
    assert sum(stats.reloads.values()) == reloads + 1
    text = scrape(loopback_admin.server.metrics_port)
    assert sample(text, "resolver_http_rejected_total", server="admin", reason="origin") == 6


def test_foreign_host_names_are_refused(loopback_admin: RunningServer) -> None:
    admin = loopback_admin.server.admin_port
    refused = [
        "evil.example",
        f"evil.example:{admin}",
        "rebind.attacker.test.",
        "127.0.0.1.nip.io",
        "192.0.2.1",  # an address that is not this listener's
        "",
    ]
    allowed = [
        f"127.0.0.1:{admin}",
        "127.0.0.1",
        "127.0.0.2",  # loopback
        "localhost",
        f"LOCALHOST:{admin}",
        "api.localhost",
        "[::1]",
        f"[::1]:{admin}",
        "resolver.example.org",  # admin.allowed_hosts
        "Resolver.Example.Org.:8053",
    ]
    for host in refused:
        for method, path in (("GET", "/v1/status"), ("POST", "/v1/reload"), ("GET", "/healthz")):
            status, _, body = request(admin, method, path, host=host)
            assert status == 421, (host, path, body)
    for host in allowed:
        status, _, body = request(admin, "GET", "/v1/status", host=host)
        assert status == 200, (host, body)
    # The absolute form names its host in the request line, and is checked the same way.
    assert (
        exchange(admin, b"GET http://evil.example/v1/status HTTP/1.1\r\nHost: localhost\r\n\r\n")[0]
        == 421
    )
    text = scrape(loopback_admin.server.metrics_port)
    assert sample(text, "resolver_http_rejected_total", server="admin", reason="host") == 19
    # /metrics answers any name Prometheus reaches it by (a Service, a pod address).
    assert (
        request(
            loopback_admin.server.metrics_port, "GET", "/metrics", host="resolver-metrics.dns.svc"
        )[0]
        == 200
    )


def test_admin_allowed_hosts_is_read_from_the_config(tmp_path: Path) -> None:
    from resolver.config import load_config
    from resolver.yamlload import SourceError

    path = tmp_path / "resolver.yaml"
    path.write_text(
        "admin: {listen: '127.0.0.1:8053', max_connections: 8,"
        " allowed_hosts: [Resolver.Example.ORG., 192.0.2.53]}\n"
        "metrics: {listen: '127.0.0.1:9153', max_connections: 16}\n"
    )
    config = load_config(path)
    assert config.admin_allowed_hosts == ("resolver.example.org", "192.0.2.53")
    assert (config.admin_max_connections, config.metrics_max_connections) == (8, 16)
    assert Config().admin_max_connections == Config().metrics_max_connections == 64
    for bad in ("allowed_hosts: [evil/x]", "allowed_hosts: 3", "max_connections: 0"):
        path.write_text(f"admin: {{listen: '127.0.0.1:8053', {bad}}}\n")
        with pytest.raises(SourceError):
            load_config(path)


# --- Item 24: process metrics and the freshness of remote lists ----------------------------


def _promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> str:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_process_metrics_are_exported_and_the_scrape_passes_promtool(
    http: RunningServer,
) -> None:
    text = scrape(http.server.metrics_port)
    rss = sample(text, "resolver_process_resident_memory_bytes")
    assert rss is not None and rss > 10 * 2**20
    cpu = sample(text, "resolver_process_cpu_seconds_total")
    assert cpu is not None and cpu > 0
    fds = sample(text, "resolver_process_open_fds")
    assert fds is not None and fds > 3
    start = sample(text, "resolver_process_start_time_seconds")
    assert start is not None and time.time() - 3600 < start <= time.time()
    assert sample(text, "resolver_process_max_fds") is not None
    assert "# TYPE resolver_http_rejected_total counter" in text
    if PROMTOOL:
        _promtool("check", "metrics", stdin=text)


REMOTE_LISTS = {
    "fresh": "include: [{url: 'http://127.0.0.1:9/fresh.txt', format: domains, refresh: 1h}]",
    "stale": "include:\n"
    "  - {url: 'http://127.0.0.1:9/stale-a.txt', format: domains, refresh: 1h}\n"
    "  - {url: 'http://127.0.0.1:9/stale-b.txt', format: domains, refresh: 1h}",
    "never": "include: [{url: 'http://127.0.0.1:9/never.txt', format: domains, refresh: 1h}]",
}


def _copy(state: Path, url: str, fetched_at: float) -> None:
    """A copy of ``url`` as an earlier fetch left it."""
    path = remote.copy_path(url, state)
    path.write_text("ads.example\n")
    meta = {"url": url, "etag": None, "last_modified": None, "fetched_at": fetched_at}
    path.with_suffix(".json").write_text(json.dumps(meta))


def test_remote_list_freshness_and_the_stale_alert(
    make_server: Callable[..., RunningServer], lists_dir: Path, tmp_path: Path
) -> None:
    # Copies from earlier runs: fresh (10 min old), stale (one source 5 h old), never (none).
    # Every source is unreachable now (port 9): the fetches that fall due fail.
    state = tmp_path / "state"
    state.mkdir()
    now = time.time()
    _copy(state, "http://127.0.0.1:9/fresh.txt", now - 600)
    _copy(state, "http://127.0.0.1:9/stale-a.txt", now - 600)
    _copy(state, "http://127.0.0.1:9/stale-b.txt", now - 5 * 3600)
    for name, body in REMOTE_LISTS.items():
        (lists_dir / f"{name}.yaml").write_text(f"list: {name}\n{body}\n")
    # The sources are on loopback, which remote lists may use only when allowed.
    running = make_server(
        metrics=LOOPBACK, state_dir=state, remote=RemoteConfig(allow_private=True)
    )
    server = running.server

    async def one_round() -> None:
        with pytest.raises(TimeoutError):  # the refresher loops until stopped
            await asyncio.wait_for(server.refresh_remotes(), 3)

    running.call(one_round(), timeout=20)
    assert server.fetch_status["http://127.0.0.1:9/stale-b.txt"].status == "failed"
    assert server.fetch_status["http://127.0.0.1:9/fresh.txt"].status == "offline-copy"
    text = scrape(server.metrics_port)
    last = {
        name: sample(text, "resolver_remote_list_last_success_timestamp_seconds", list=name)
        for name in ("fresh", "stale", "never")
    }
    assert last["fresh"] == pytest.approx(now - 600, abs=1)
    assert last["stale"] == pytest.approx(now - 5 * 3600, abs=1)  # its stalest source
    assert last["never"] == 0
    age = {
        name: sample(text, "resolver_remote_list_age_seconds", list=name)
        for name in ("fresh", "stale", "never")
    }
    assert age["fresh"] == pytest.approx(600, abs=30)
    assert age["stale"] == pytest.approx(5 * 3600, abs=30)
    assert age["never"] is None  # no age without a success
    for name in ("fresh", "stale", "never"):
        assert sample(text, "resolver_remote_list_refresh_interval_seconds", list=name) == 3600
    assert "http://127.0.0.1:9" not in text  # URLs may hold credentials: never labels
    if not PROMTOOL:
        pytest.skip("promtool not found: install the Debian package 'prometheus'")
    _promtool("check", "metrics", stdin=text)
    _promtool("check", "rules", str(ROOT / "deploy" / "prometheus" / "rules.yml"))
    _alert_fires_on(tmp_path, text)


def _alert_fires_on(workdir: Path, text: str) -> None:
    """Evaluate the shipped alerts' expressions on the scraped values: the stale list, and
    only it, is stale; the list never fetched, and only it, is never fetched. (Their ``for``
    and annotations are checked by deploy/prometheus/rules_test.yml.)"""
    import yaml

    series = []
    values: dict[tuple[str, str], str] = {}
    for line in text.splitlines():
        if line.startswith("resolver_remote_list_"):
            name_labels, _, value = line.rpartition(" ")
            name, _, labels = name_labels.partition("{")
            labels = 'job="resolver",instance="r1:9153",' + labels.rstrip("}")
            series.append({"series": f"{name}{{{labels}}}", "values": f"{value}+0x20"})
            values[(name, labels.rpartition('list="')[2].rstrip('"'))] = value
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    expr = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}

    def one(name: str, list_id: str) -> dict[str, object]:
        labels = f'{name}{{instance="r1:9153", job="resolver", list="{list_id}"}}'
        return {"labels": labels, "value": float(values[(name, list_id)])}

    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": expr["ResolverRemoteListStale"],
                        "eval_time": "10m",
                        "exp_samples": [one("resolver_remote_list_age_seconds", "stale")],
                    },
                    {
                        "expr": expr["ResolverRemoteListNeverFetched"],
                        "eval_time": "10m",
                        "exp_samples": [
                            one("resolver_remote_list_last_success_timestamp_seconds", "never")
                        ],
                    },
                ],
            }
        ],
    }
    path = workdir / "scraped_rules_test.yml"
    path.write_text(json.dumps(tests))  # JSON is YAML
    _promtool("test", "rules", str(path))
