"""The console's routes on the admin listener: the page, its shipped assets, login and
logout, and ``/openapi.json``.

Every answer carries a strict Content-Security-Policy (scripts and styles from this server
only, no inline code), and the page is never cached; the assets are named in the page with
their content hash, so a browser may keep them until the next upgrade changes the hash.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Final
from urllib.parse import parse_qs

from ..service.http import Handler, Request, Response, error
from .sessions import SessionTable

CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: Headers on every console answer. The referrer policy is ``same-origin``, not
#: ``no-referrer``: under ``no-referrer`` a browser sends ``Origin: null`` on the page's own
#: form posts and fetches, and the server could no longer tell them from a foreign page's.
#: No referrer ever leaves for another site (and reference links say ``noreferrer``).
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
#: The files under ``/console/static/``, and their types: nothing else is ever served.
ASSETS: Final = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
HTML_TYPE: Final = "text/html; charset=utf-8"
#: A year: an asset URL carries its content hash, so a new version is a new URL.
IMMUTABLE: Final = "public, max-age=31536000, immutable"
PAGE: Final = "/console"


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def _read(name: str) -> bytes:
    return (resources.files("resolver.console") / "static" / name).read_bytes()


def _asset(body: bytes, content_type: str) -> Asset:
    return Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')


class Console:
    """The console of one admin listener: its sessions, login bound and routes.

    ``token`` is the admin token: when set, the page asks for it; when not (an admin API on
    loopback only), opening the page starts a session at once, so CSRF works the same.
    """

    def __init__(self, token: str | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.token = token or None
        self.sessions = SessionTable(clock=clock)
        self.guard = self.sessions.guard
        self.assets = {name: _asset(_read(name), kind) for name, kind in ASSETS.items()}
        page = _read("index.html").decode()
        for name, asset in self.assets.items():
            page = page.replace("{{" + name + "}}", asset.etag.strip('"'))
        self._template = page
        self._page = page.replace("{{login}}", "yes" if self.token else "no")
        self._login = _read("login.html").decode()
        self.openapi = _asset(
            (resources.files("resolver") / "schema" / "admin.openapi.json").read_bytes(),
            "application/json",
        )

    def rotate(self, token: str) -> None:
        """A new admin token (a reload of the config): every session ends, since each
        was opened with the old token, which may be the one that leaked."""
        self.token = token
        self._page = self._template.replace("{{login}}", "yes")
        self.sessions.revoke_all()

    def routes(self) -> dict[tuple[str, str], Handler]:
        """The console's routes, to merge into the admin listener's."""
        routes: dict[tuple[str, str], Handler] = {
            ("GET", PAGE): self.page,
            ("GET", PAGE + "/"): self.page,
            ("POST", PAGE + "/login"): self.login,
            ("POST", PAGE + "/logout"): self.logout,
            ("GET", "/openapi.json"): self.openapi_route,
        }
        for name in self.assets:
            routes[("GET", f"{PAGE}/static/{name}")] = self.static
        return routes

    async def page(self, request: Request) -> Response:
        """The console, or the login form when the token is set and no session is valid."""
        session = request.session
        headers: dict[str, str] = {}
        if session is None:
            if self.token:
                return self._login_page(200, "")
            value, session = self.sessions.create()
            headers["Set-Cookie"] = self.sessions.cookie(value, request.tls)
        body = self._page.replace("{{csrf}}", session.csrf)
        return _secure(Response(200, body.encode(), HTML_TYPE, headers))

    async def login(self, request: Request) -> Response:
        """``POST /console/login`` with the admin token in the form field ``token``."""
        client = request.peer
        wait = self.guard.locked(client)
        if wait:
            response = self._login_page(429, "Too many wrong tokens: wait a minute.")
            response.headers["Retry-After"] = str(int(wait) + 1)
            return response
        given = _form(request).get("token", "")
        if self.token and not hmac.compare_digest(given.encode(), self.token.encode()):
            self.guard.failure(client)
            return self._login_page(401, "Wrong token.")
        self.guard.success(client)
        if request.session is not None:
            self.sessions.end(request.session)  # a fresh id at each login
        value, _ = self.sessions.create()
        return _see_page({"Set-Cookie": self.sessions.cookie(value, request.tls)})

    async def logout(self, request: Request) -> Response:
        """``POST /console/logout`` with the session's CSRF token (form field ``csrf`` or
        the ``X-CSRF-Token`` header)."""
        session = request.session
        if session is None:
            return _see_page({"Set-Cookie": self.sessions.cleared_cookie(request.tls)})
        given = request.headers.get("x-csrf-token") or _form(request).get("csrf")
        if not self.sessions.csrf_ok(session, given):
            return _secure(error(403, "missing or wrong CSRF token"))
        self.sessions.end(session)
        return _see_page({"Set-Cookie": self.sessions.cleared_cookie(request.tls)})

    async def static(self, request: Request) -> Response:
        """An asset of the allowlist (the route table holds no other path)."""
        asset = self.assets[request.path.rsplit("/", 1)[1]]
        fresh = request.query.get("v") == asset.etag.strip('"')
        return _cached(request, asset, IMMUTABLE if fresh else "no-cache")

    async def openapi_route(self, request: Request) -> Response:
        """The admin API's OpenAPI description: public, as the package that ships it."""
        return _cached(request, self.openapi, "no-cache")

    def _login_page(self, status: int, message: str) -> Response:
        body = self._login.replace("{{error}}", html.escape(message))
        return _secure(Response(status, body.encode(), HTML_TYPE))


def _form(request: Request) -> dict[str, str]:
    """The fields of an ``application/x-www-form-urlencoded`` body (the last of each);
    none when it is not one, or has more fields than a form of ours (a body of 64 KiB
    could otherwise make thousands)."""
    try:
        fields = parse_qs(request.body.decode(), keep_blank_values=True, max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        return {}
    return {k: v[-1] for k, v in fields.items()}


def _secure(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def _see_page(headers: dict[str, str]) -> Response:
    """303 to the page (after a form post, so a reload does not post again)."""
    return _secure(Response(303, b"", HTML_TYPE, {"Location": PAGE, **headers}))


def _cached(request: Request, asset: Asset, cache: str) -> Response:
    headers = {"ETag": asset.etag, "Cache-Control": cache}
    if request.headers.get("if-none-match") == asset.etag:
        return _secure(Response(304, b"", asset.content_type, headers))
    return _secure(Response(200, asset.body, asset.content_type, headers))
