"""Raw HTTP against the console and the admin API, with the headers a browser would send
(Host, Origin, Cookie, X-CSRF-Token), and the console's session cookie and CSRF token."""

from __future__ import annotations

import http.client
import re
from dataclasses import dataclass, field
from urllib.parse import urlencode

COOKIE = "resolver_console"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


@dataclass
class Browserless:
    """A client of one admin listener that keeps the session cookie like a browser."""

    port: int
    cookie: str | None = None
    csrf: str | None = None
    sent: list[str] = field(default_factory=list)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str = b"",
        headers: dict[str, str] | None = None,
        *,
        cookie: bool = True,
    ) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            all_headers = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
            if cookie and self.cookie:
                all_headers["Cookie"] = f"{COOKIE}={self.cookie}"
            data = body.encode() if isinstance(body, str) else body
            conn.request(method, path, body=data or None, headers=all_headers)
            response = conn.getresponse()
            answer = Answer(
                response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
            )
        finally:
            conn.close()
        set_cookie = answer.headers.get("set-cookie", "")
        match = re.match(rf"{COOKIE}=([^;]*)", set_cookie)
        if match:
            self.cookie = match.group(1) or None
        return answer

    def form(
        self, path: str, fields: dict[str, str], headers: dict[str, str] | None = None
    ) -> Answer:
        return self.request(
            "POST",
            path,
            urlencode(fields),
            {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})},
        )

    def login(self, token: str) -> Answer:
        answer = self.form("/console/login", {"token": token})
        if answer.status == 303:
            self.open_page()
        return answer

    def open_page(self) -> Answer:
        """GET /console, keeping the CSRF token the page carries."""
        answer = self.request("GET", "/console")
        match = re.search(r'<meta name="csrf-token" content="([^"]*)"', answer.text)
        self.csrf = match.group(1) if match else None
        return answer
