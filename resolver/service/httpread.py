"""Reading an HTTP/1.1 request head within bounds, and the refusals of the admin server
(service/http.py): the request line (``MAX_LINE``) and the headers (``MAX_HEADER_BYTES``
in all, ``MAX_HEADERS`` lines), no line folding, no second Host, Content-Length,
Authorization or Origin."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final

#: The request line: method, target (with its query) and version.
MAX_LINE: Final = 8192
#: All header lines together, and how many of them.
MAX_HEADER_BYTES: Final = 8192
MAX_HEADERS: Final = 100
#: Headers that must not appear twice (RFC 9110/9112: a request with two is malformed).
SINGLE_HEADERS: Final = frozenset({"host", "content-length", "authorization", "origin"})
#: The counted reason of each status this server refuses with by itself.
_STATUS_REASON: Final = {
    400: "malformed",
    401: "unauthorized",
    403: "origin",
    408: "timeout",
    413: "too_large",
    414: "too_large",
    421: "host",
    429: "unauthorized",
    431: "too_large",
    501: "malformed",
}


class Refused(Exception):
    """The request is answered with an error status without going further."""

    def __init__(self, status: int, message: str, reason: str = "", retry: float = 0) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason or _STATUS_REASON.get(status, "malformed")
        self.retry = retry  # seconds, for Retry-After


class Gone(Exception):
    """The client closed the connection before sending a whole request: nothing to answer."""


@dataclass
class Head:
    method: str
    target: str
    version: str
    headers: dict[str, str]


#: Why a request line or the headers were refused as too long (status, message).
_LINE_TOO_LONG: Final = (414, f"request line over {MAX_LINE} bytes")
_HEAD_TOO_LARGE: Final = (
    431,
    f"request headers over {MAX_HEADER_BYTES} bytes or {MAX_HEADERS} lines",
)


async def _read_line(reader: asyncio.StreamReader, too_long: tuple[int, str]) -> bytes:
    # Exceptions are made where they are raised, never kept in a variable: one held by a
    # frame its traceback refers to is a reference cycle, which would keep the reader and
    # its buffer until the next (rare: see server.GC_YOUNG) garbage collection.
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise Refused(*too_long) from None
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise Refused(400, "the request ended early") from None
        raise Gone from None


async def read_head(reader: asyncio.StreamReader) -> Head:
    """The request line and headers, within ``MAX_LINE``, ``MAX_HEADER_BYTES`` and
    ``MAX_HEADERS``; no byte of body."""
    line = await _read_line(reader, _LINE_TOO_LONG)
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise Refused(400, "malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    total = 0
    count = 0
    while True:
        raw = await _read_line(reader, _HEAD_TOO_LARGE)
        total += len(raw)
        if total > MAX_HEADER_BYTES:
            raise Refused(*_HEAD_TOO_LARGE)
        text = raw.decode("latin-1").rstrip("\r\n")
        if not text:
            break
        count += 1
        if count > MAX_HEADERS:
            raise Refused(*_HEAD_TOO_LARGE)
        name, sep, value = text.partition(":")
        # No space before the colon, no line folding (RFC 9112 §5.1, §5.2).
        if not sep or not name or name != name.strip() or " " in name or "\t" in name:
            raise Refused(400, "malformed header")
        key = name.lower()
        if key in headers and key in SINGLE_HEADERS:
            raise Refused(400, f"more than one {name} header")
        headers[key] = value.strip()
    return Head(method.upper(), target, version, headers)
