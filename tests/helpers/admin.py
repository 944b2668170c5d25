"""JSON requests with a body to a resolver's admin API (the rule edit routes), checked
against the admin API's OpenAPI description."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from .http import TOKEN, check_against_spec


def call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = TOKEN,
    raw: bytes | None = None,
    check: bool = True,
) -> tuple[int, Any]:
    """``method path`` on the admin API at ``port`` with a JSON ``body`` (or ``raw``
    bytes); the status and the decoded JSON answer, checked against the spec."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is None and method == "POST":
        data = b""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=data)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    document = json.loads(text) if text.startswith(("{", "[")) else text
    if check:
        check_against_spec(path.split("?")[0], method, status, document)
    return status, document
