"""Findings of the console's security and operator review (issue 20 section 2), each
with the test that failed before its fix: HEAD on GET routes, sessions across a token
change, wrong bearer tokens counted with the login form's, and more (docs/console.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from resolver.config import Listen
from resolver.console.sessions import LoginGuard

from .helpers.console import Browserless
from .helpers.http import TOKEN, scrape
from .helpers.server import RunningServer

LOOPBACK = Listen("127.0.0.1", 0)


def _admin(make_server: Callable[..., RunningServer], token: str | None = TOKEN) -> Any:
    running = make_server(admin=LOOPBACK, admin_token=token, metrics=LOOPBACK)
    return running, running.server.http_servers[0], Browserless(running.server.admin_port)


def test_head_answers_for_every_get_route_without_a_body(
    make_server: Callable[..., RunningServer],
) -> None:
    # RFC 9110 §9.3.2: HEAD is GET without the body, the same status and headers.
    _, http_server, client = _admin(make_server)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/console", "/console/static/app.js", "/openapi.json", "/healthz", "/v1/status"):
        got = client.request("GET", path, headers=bearer)
        head = client.request("HEAD", path, headers=bearer)
        assert head.status == got.status == 200, path
        assert head.body == b"", path
        assert head.headers["content-type"] == got.headers["content-type"], path
        if path != "/v1/status":  # the status document changes between two calls
            assert head.headers["content-length"] == str(len(got.body)), path
        assert head.headers.get("content-security-policy") == got.headers.get(
            "content-security-policy"
        ), path
    # The token still guards what it guards; a POST route still says which methods.
    assert client.request("HEAD", "/v1/status", cookie=False).status == 401
    wrong = client.request("HEAD", "/v1/reload", headers=bearer)
    assert wrong.status == 405 and wrong.body == b"" and wrong.headers["allow"] == "POST"
    assert client.request("HEAD", "/nowhere").status == 404
    listed = client.request("PUT", "/console", headers=bearer)
    assert listed.status == 405 and listed.headers["allow"] == "GET, HEAD"
    assert ("HEAD", "/console") not in http_server.routes  # one GET route serves both


def test_wrong_bearer_tokens_count_with_wrong_logins_and_lock_out(
    make_server: Callable[..., RunningServer],
) -> None:
    """The login form's lockout is no bound if /v1/* takes guesses in a header."""
    running, http_server, client = _admin(make_server)
    guard = http_server.sessions.guard
    for attempt in range(5):
        wrong = client.request("GET", "/v1/status", headers={"Authorization": f"Bearer x{attempt}"})
        assert wrong.status == 401, attempt
    assert guard.failed == 5 and guard.lockouts == 1
    right = {"Authorization": f"Bearer {TOKEN}"}
    locked = client.request("GET", "/v1/status", headers=right)  # even the right one waits
    assert locked.status == 429 and int(locked.headers["retry-after"]) >= 1
    assert client.form("/console/login", {"token": TOKEN}).status == 429  # one lockout
    # The probes stay open: a token sent to a path that needs none is not checked.
    assert client.request("GET", "/healthz", headers={"Authorization": "Bearer x"}).status == 200
    assert http_server.rejected["unauthorized"] >= 6
    _, samples = scrape(running.server.metrics_port)
    assert samples['resolver_console_logins_total{result="wrong"}'] == 5
    assert samples["resolver_console_lockouts_total"] == 1
    assert samples["resolver_console_global_lockouts_total"] == 0


def test_login_guard_counts_ipv6_per_64_and_all_clients_together() -> None:
    now = [0.0]
    guard = LoginGuard(
        max_failures=3, window=100, lockout=30, clock=lambda: now[0], max_failures_all=10
    )
    for host in range(1, 4):  # three addresses of one /64: one client
        guard.failure(f"2001:db8:1:2::{host}")
    assert guard.locked("2001:db8:1:2::ffff") > 0
    assert guard.locked("2001:db8:1:3::1") == 0  # the next /64 is another client
    assert guard.locked("::ffff:192.0.2.1") == 0
    guard.failure("::ffff:192.0.2.1")  # an IPv4-mapped address is its IPv4 address
    guard.failure("192.0.2.1")
    guard.failure("192.0.2.1")
    assert guard.locked("192.0.2.1") > 0
    # Many addresses, one guesser: past 10 wrong tokens in all, everyone waits.
    for index in range(4):
        guard.failure(f"198.51.100.{index}")
    assert guard.global_lockouts == 1
    assert guard.locked("203.0.113.9") > 0
    # The host's own operators (the CLI on loopback) are not locked out by others' guesses.
    assert guard.locked("127.0.0.1") == 0 and guard.locked("::1") == 0
    now[0] += 31
    assert guard.locked("203.0.113.9") == 0 and guard.locked("192.0.2.1") == 0


def test_a_reload_with_a_new_token_ends_every_session_and_the_old_token(
    make_server: Callable[..., RunningServer],
) -> None:
    running, http_server, client = _admin(make_server)
    assert client.login(TOKEN).status == 303 and client.csrf
    assert client.request("GET", "/v1/status").status == 200  # by the session cookie
    server = running.server
    new = "a-brand-new-token-0123456789"
    server.reread = lambda: replace(server.config, admin_token=new)
    assert running.call(server.reload())
    assert client.request("GET", "/v1/status").status == 401  # the session ended
    assert "Wrong" not in client.open_page().text and 'name="token"' in client.open_page().text
    old = client.request("GET", "/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert old.status == 401
    fresh = client.request("GET", "/v1/status", headers={"Authorization": f"Bearer {new}"})
    assert fresh.status == 200
    assert client.login(new).status == 303 and client.request("GET", "/v1/status").status == 200
    assert http_server.sessions.revoked == 1
    # Removing the token waits for a restart: a reload never leaves the API open.
    server.reread = lambda: replace(server.config, admin_token=None)
    assert running.call(server.reload())
    assert client.request("GET", "/v1/status", cookie=False).status == 401
    assert client.request("GET", "/v1/status").status == 200  # the session stays
    _, samples = scrape(server.metrics_port)
    assert samples['resolver_console_sessions_ended_total{reason="revoked"}'] == 1


def test_no_header_value_can_end_its_line() -> None:
    """Whatever a handler echoes into a header (a file name, a reason) cannot add one."""
    from resolver.service.http import Response, _render

    rendered = _render(
        Response(
            200,
            b"body",
            "text/csv",
            {
                "Content-Disposition": 'attachment; filename="q.csv"\r\nSet-Cookie: evil=1',
                "X-Name": "caf\u00e9 \u65e5\u672c\n\x00",
            },
        )
    )
    head, _, body = rendered.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert body == b"body" and not any(line.startswith(b"Set-Cookie") for line in lines)
    assert b'Content-Disposition: attachment; filename="q.csv"Set-Cookie: evil=1' in lines
    assert b"X-Name: caf\xe9 ??" in lines
