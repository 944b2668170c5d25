"""Findings of the console's security and operator review (issue 20 section 2), each
with the test that failed before its fix: HEAD on GET routes, sessions across a token
change, wrong bearer tokens counted with the login form's, and more (docs/console.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from resolver.config import Listen

from .helpers.console import Browserless
from .helpers.http import TOKEN
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
