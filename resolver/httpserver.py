"""A small HTTP/1.1 server on the resolver's event loop, for the admin API and /metrics.

Deliberately minimal: one request per connection (``Connection: close``), bounded request
line, headers and body, a read timeout, and an optional bearer token for the paths that
change or reveal state. It runs on the same loop as DNS, so a handler must never block.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("resolver.http")

MAX_LINE: Final = 8192
MAX_HEADERS: Final = 100
MAX_BODY: Final = 1 << 20
READ_TIMEOUT: Final = 10.0
REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, document: Any) -> Response:
    """A JSON response (pretty enough for curl, stable key order)."""
    return Response(status, (json.dumps(document, indent=2) + "\n").encode())


def error(status: int, message: str) -> Response:
    return json_response(status, {"error": message})


Handler = Callable[[Request], Awaitable[Response]]


class HTTPServer:
    """Routes ``(method, path)`` to handlers; paths under ``protected`` need the token."""

    def __init__(
        self,
        routes: dict[tuple[str, str], Handler],
        token: str | None = None,
        protected: str = "/v1/",
    ) -> None:
        self.routes = routes
        self.token = token
        self.protected = protected
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; return the port bound (port 0 picks one)."""
        self.server = await asyncio.start_server(self._serve, host, port, limit=MAX_LINE)
        sock = self.server.sockets[0]
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                request = await asyncio.wait_for(_read_request(reader), READ_TIMEOUT)
            except TimeoutError:
                response = error(408, "request not received in time")
            except _BadRequest as exc:
                response = error(exc.status, str(exc))
            else:
                response = await self._dispatch(request)
            head = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Status')}"]
            headers = {
                "Content-Type": response.content_type,
                "Content-Length": str(len(response.body)),
                "Connection": "close",
                "Cache-Control": "no-store",
                **response.headers,
            }
            head += [f"{k}: {v}" for k, v in headers.items()]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, request: Request) -> Response:
        if request.path.startswith(self.protected) and self.token:
            given = request.headers.get("authorization", "")
            expected = f"Bearer {self.token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                response = error(401, "missing or wrong bearer token")
                response.headers["WWW-Authenticate"] = 'Bearer realm="resolver"'
                return response
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            if any(path == request.path for _, path in self.routes):
                allowed = ", ".join(m for m, p in self.routes if p == request.path)
                response = error(405, f"use {allowed} for {request.path}")
                response.headers["Allow"] = allowed
                return response
            return error(404, f"no such endpoint: {request.path}")
        try:
            return await handler(request)
        except Exception:
            log.exception("admin API handler failed for %s %s", request.method, request.path)
            return error(500, "internal error; see the resolver's log")


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _read_request(reader: asyncio.StreamReader) -> Request:
    try:
        line = await reader.readline()
    except ValueError:
        raise _BadRequest(400, "request line too long") from None
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, "malformed request line")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        try:
            raw = await reader.readline()
        except ValueError:
            raise _BadRequest(400, "header line too long") from None
        text = raw.decode("latin-1").rstrip("\r\n")
        if not text:
            break
        name, sep, value = text.partition(":")
        if not sep:
            raise _BadRequest(400, "malformed header")
        headers[name.strip().lower()] = value.strip()
    else:
        raise _BadRequest(400, "too many headers")
    length = headers.get("content-length", "0")
    if not length.isdigit():
        raise _BadRequest(400, "bad Content-Length")
    if int(length) > MAX_BODY:
        raise _BadRequest(413, "body too large")
    body = await reader.readexactly(int(length)) if int(length) else b""
    split = urlsplit(target)
    query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
    return Request(method.upper(), split.path or "/", query, headers, body)
