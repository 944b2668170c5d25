"""The web console without a browser: its headers (CSP and the rest), the shipped HTML
(no inline script or style), static files (allowlist, ETag, no path traversal), login (a
wrong token refused and counted, lockout), the bounded session table, CSRF on every change,
the Origin and Host rules, and /openapi.json; all against the real server on loopback."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from resolver.config import Listen
from resolver.console.routes import CSP
from resolver.console.sessions import LoginGuard, SessionTable

from .helpers.console import Answer, Browserless
from .helpers.http import TOKEN, scrape
from .helpers.realservers import ROOT
from .helpers.server import RunningServer

LOOPBACK = Listen("127.0.0.1", 0)
STATIC = ROOT / "resolver" / "console" / "static"


def _admin(make_server: Callable[..., RunningServer], token: str | None = TOKEN) -> Any:
    running = make_server(admin=LOOPBACK, admin_token=token, metrics=LOOPBACK)
    http_server = running.server.http_servers[0]
    return running, http_server, Browserless(running.server.admin_port)


def _check_security_headers(answer: Answer) -> None:
    headers = answer.headers
    assert headers["content-security-policy"] == CSP
    for part in ("default-src 'none'", "script-src 'self'", "frame-ancestors 'none'"):
        assert part in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "same-origin"  # see routes.SECURITY_HEADERS
    assert headers["x-frame-options"] == "DENY"


class _Inline(HTMLParser):
    """Collects what a strict CSP would block: inline scripts, styles, handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if tag == "script":
            self._in_script = True
            if not names.get("src"):
                self.problems.append("a <script> without src")
            else:
                self.scripts.append(str(names["src"]))
        if tag == "style":
            self.problems.append("a <style> element")
        for name, value in attrs:
            if name == "style" or name.startswith("on"):
                self.problems.append(f"<{tag} {name}=...>")
            if value and value.strip().lower().startswith("javascript:"):
                self.problems.append(f"<{tag} {name}=javascript:...>")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False if tag == "script" else self._in_script

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.problems.append("inline script text")


@pytest.mark.parametrize("name", ["index.html", "login.html"])
def test_shipped_html_has_no_inline_script_or_style(name: str) -> None:
    parser = _Inline()
    parser.feed((STATIC / name).read_text())
    assert parser.problems == []
    # The script is the only way in: app.js never builds HTML from text.
    script = (STATIC / "app.js").read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "eval(" not in script and "document.write" not in script


def test_page_without_token_opens_with_a_session(
    make_server: Callable[..., RunningServer],
) -> None:
    _, http_server, client = _admin(make_server, token=None)
    answer = client.open_page()
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/html")
    assert answer.headers["cache-control"] == "no-store"
    _check_security_headers(answer)
    cookie = answer.headers["set-cookie"]
    for part in ("HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="):
        assert part in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback: a Secure cookie would be lost
    assert len(client.cookie or "") >= 43 and client.csrf and len(client.csrf) >= 43
    assert len(http_server.sessions) == 1
    parser = _Inline()
    parser.feed(answer.text)
    assert parser.problems == [] and len(parser.scripts) == 1
    # The CSRF token guards changes even with no token configured.
    assert client.request("POST", "/v1/reload").status == 403
    ok = client.request("POST", "/v1/reload", headers={"X-CSRF-Token": client.csrf})
    assert ok.status == 200
    assert client.request("POST", "/v1/reload", cookie=False).status == 200  # curl, no token


def test_static_files_allowlist_etag_and_no_traversal(
    make_server: Callable[..., RunningServer],
) -> None:
    _, _, client = _admin(make_server)
    answer = client.request("GET", "/console/static/app.js")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/javascript")
    assert answer.body == (STATIC / "app.js").read_bytes()
    _check_security_headers(answer)
    etag = answer.headers["etag"]
    assert answer.headers["cache-control"] == "no-cache"
    again = client.request("GET", "/console/static/app.js", headers={"If-None-Match": etag})
    assert again.status == 304 and again.body == b""
    versioned = client.request("GET", f"/console/static/app.js?v={etag.strip(chr(34))}")
    assert "immutable" in versioned.headers["cache-control"]
    page = client.open_page().text  # the login page for now; the app's HTML names the hash
    assert "app.css" in page
    for path in (
        "/console/static/../routes.py",
        "/console/static/..%2froutes.py",
        "/console/static/%2e%2e/sessions.py",
        "/console/static/index.html",  # shipped, but served only as /console
        "/console/static/",
        "/console/static/app.js/",
        "/console/static//etc/passwd",
        "/console/static/APP.JS",
        "/console/../resolver/console/routes.py",
    ):
        assert client.request("GET", path).status == 404, path


def test_login_refuses_a_wrong_token_counts_and_locks_out(
    make_server: Callable[..., RunningServer],
) -> None:
    running, http_server, client = _admin(make_server)
    page = client.open_page()
    assert page.status == 200 and 'action="/console/login"' in page.text
    _check_security_headers(page)
    assert client.cookie is None and len(http_server.sessions) == 0
    assert client.request("GET", "/v1/status").status == 401
    guard = _console_guard(http_server)
    # A form of more fields than ours is not read, the right token in it or not.
    stuffed = {"token": TOKEN, **{f"f{i}": "x" for i in range(20)}}
    assert client.form("/console/login", stuffed).status == 401
    for attempt in range(4):
        wrong = client.login("not-the-token")
        assert wrong.status == 401, attempt
        assert "Wrong token" in wrong.text and client.cookie is None
    assert guard.failed == 5 and guard.lockouts == 1
    locked = client.login(TOKEN)  # even the right token waits out the lockout
    assert locked.status == 429 and int(locked.headers["retry-after"]) >= 1
    assert guard.refused == 1 and len(http_server.sessions) == 0
    text, samples = scrape(running.server.metrics_port)
    assert samples['resolver_console_logins_total{result="wrong"}'] == 5
    assert samples['resolver_console_logins_total{result="locked"}'] == 1
    assert samples["resolver_console_lockouts_total"] == 1
    assert samples["resolver_console_sessions"] == 0
    if shutil.which("promtool"):
        check = subprocess.run(
            ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0, check.stdout + check.stderr


def _console_guard(http_server: Any) -> LoginGuard:
    """The login guard of the console whose login route the admin listener serves."""
    handler = http_server.routes[("POST", "/console/login")]
    guard = handler.__self__.guard
    assert isinstance(guard, LoginGuard)
    return guard


def test_login_then_cookie_authorises_the_api_and_logout_ends_it(
    make_server: Callable[..., RunningServer],
) -> None:
    _, http_server, client = _admin(make_server)
    answer = client.login(TOKEN)
    assert answer.status == 303 and answer.headers["location"] == "/console"
    _check_security_headers(answer)
    assert client.cookie and client.csrf
    status = client.request("GET", "/v1/status")
    assert status.status == 200 and json.loads(status.body)["lists"]
    # Logout needs the session's CSRF token (form field).
    assert client.form("/console/logout", {"csrf": "wrong"}).status == 403
    out = client.form("/console/logout", {"csrf": client.csrf})
    assert out.status == 303 and client.cookie is None
    assert "Max-Age=0" in out.headers["set-cookie"]
    assert len(http_server.sessions) == 0


def test_session_table_stays_at_its_bound_under_many_logins(
    make_server: Callable[..., RunningServer],
) -> None:
    running, http_server, client = _admin(make_server)
    table: SessionTable = http_server.sessions
    first = None
    for _ in range(table.max_sessions + 10):
        assert client.form("/console/login", {"token": TOKEN}).status == 303
        first = first or client.cookie
        client.cookie = None  # a new browser each time: no session to replace
    assert len(table) == table.max_sessions
    assert table.evicted == 10 and table.created == table.max_sessions + 10
    _, samples = scrape(running.server.metrics_port)
    assert samples["resolver_console_sessions"] == table.max_sessions
    assert samples['resolver_console_sessions_ended_total{reason="evicted"}'] == 10
    client.cookie = first  # the oldest was evicted
    assert client.request("GET", "/v1/status").status == 401


def test_csrf_origin_and_host_rules(make_server: Callable[..., RunningServer]) -> None:
    _, http_server, client = _admin(make_server)
    client.login(TOKEN)
    port = client.port
    csrf = {"X-CSRF-Token": client.csrf or ""}
    same = {"Origin": f"http://127.0.0.1:{port}"}
    # A change by cookie needs the CSRF token, with or without an Origin.
    assert client.request("POST", "/v1/reload").status == 403
    assert client.request("POST", "/v1/reload", headers={"X-CSRF-Token": "x" * 43}).status == 403
    assert client.request("POST", "/v1/reload", headers=same).status == 403
    assert client.request("POST", "/v1/reload", headers={**same, **csrf}).status == 200
    # Another origin, even with the session and its token: refused.
    for origin in ("http://evil.example", f"http://localhost:{port}", "null", "http://127.0.0.1"):
        answer = client.request("POST", "/v1/reload", headers={**csrf, "Origin": origin})
        assert answer.status == 403, origin
    # Without the session, an Origin is refused as before, bearer token or not.
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert (
        client.request("POST", "/v1/reload", headers={**same, **bearer}, cookie=False).status == 403
    )
    # curl with the bearer token needs no CSRF token, cookie or not.
    assert client.request("POST", "/v1/reload", headers=bearer, cookie=False).status == 200
    assert client.request("POST", "/v1/reload", headers=bearer).status == 200
    # A login form posted from another origin is refused before its token is read.
    evil = client.form("/console/login", {"token": TOKEN}, {"Origin": "http://evil.example"})
    assert evil.status == 403
    # DNS rebinding: a Host that is not this listener's is refused first (421).
    for path in ("/console", "/console/static/app.js", "/openapi.json"):
        assert client.request("GET", path, headers={"Host": "evil.example"}).status == 421
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}", **csrf}
    assert client.request("POST", "/v1/reload", headers=rebound).status == 421
    rejected = http_server.rejected
    assert rejected["csrf"] >= 3 and rejected["origin"] >= 5 and rejected["host"] >= 4


def test_openapi_document_is_served(make_server: Callable[..., RunningServer]) -> None:
    _, _, client = _admin(make_server)
    answer = client.request("GET", "/openapi.json", cookie=False)
    assert answer.status == 200 and answer.headers["content-type"] == "application/json"
    shipped = (ROOT / "resolver" / "schema" / "admin.openapi.json").read_bytes()
    assert answer.body == shipped
    assert json.loads(answer.body)["openapi"].startswith("3.")
    etag = answer.headers["etag"]
    assert client.request("GET", "/openapi.json", headers={"If-None-Match": etag}).status == 304


def test_session_table_expiry_and_cookie_flags() -> None:
    now = [1000.0]
    table = SessionTable(max_sessions=3, idle=60, lifetime=300, clock=lambda: now[0])
    value, session = table.create()
    header = f"other=1; resolver_console={value}"
    assert table.find(header) is session
    assert table.find("resolver_console=" + "A" * 43) is None
    assert table.find("resolver_console=" + "A" * 500) is None
    now[0] += 59
    assert table.find(header) is session  # used: idle time starts again
    for _ in range(4):
        now[0] += 59
        assert table.find(header) is session
    now[0] += 59  # 354 s after login: past the absolute lifetime
    assert table.find(header) is None and table.expired == 1 and len(table) == 0
    assert not table.csrf_ok(session, None) and not table.csrf_ok(session, "")
    assert table.csrf_ok(session, session.csrf)
    assert "; Secure" in table.cookie(value, tls=True)
    assert "; Secure" not in table.cookie(value, tls=False)
    # Expired sessions make room before a live one is evicted.
    for _ in range(3):
        table.create()
    now[0] += 61
    table.create()
    assert table.evicted == 0 and table.expired == 4 and len(table) == 1


def test_login_guard_is_bounded_per_client_and_in_clients() -> None:
    now = [0.0]
    guard = LoginGuard(max_failures=3, window=100, lockout=30, max_clients=4, clock=lambda: now[0])
    for _ in range(3):
        assert guard.locked("192.0.2.1") == 0
        guard.failure("192.0.2.1")
    assert guard.locked("192.0.2.1") > 0 and guard.lockouts == 1
    assert guard.locked("192.0.2.2") == 0  # another client is not locked out
    now[0] += 31
    assert guard.locked("192.0.2.1") == 0
    for i in range(10):
        guard.failure(f"198.51.100.{i}")
    assert len(guard) == 4 and guard.forgotten == 7


def test_console_assets_are_package_data() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"console/static/*"' in pyproject
    for name in ("index.html", "login.html", "app.js", "app.css", "icon.svg"):
        assert (STATIC / name).is_file()
    assert Path(STATIC / "app.js").stat().st_size < 40_000
