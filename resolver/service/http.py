"""A small HTTP/1.1 server on the resolver's event loop, for the admin API and /metrics.

One request per connection (``Connection: close``), and an optional bearer token (or a
console session) for the paths that change or reveal state. A handler must never block.

What a hostile client can make it hold is bounded:

- at most ``max_connections`` connections at once; when full, the oldest connection still
  sending its request is closed to make room (a slow sender cannot lock the probes out),
  and only when every connection is being answered is the new one refused (503);
- the request line (``MAX_LINE``) and the headers (``MAX_HEADER_BYTES`` in all, httpread.py,
  ``MAX_HEADERS`` lines) within ``READ_TIMEOUT`` seconds: 414, 431, 408;
- the request is routed, its Host and Origin checked, and its token checked, all before a
  byte of body is read; a body is read only for methods that take one, and only up to
  ``MAX_BODY`` bytes (413), within ``READ_TIMEOUT``;
- the answer must be taken within ``WRITE_TIMEOUT``, or the connection is dropped.

Every refusal is counted by a reason from ``REASONS_COUNTED`` (resolver_http_rejected_total).

DNS rebinding and cross-site requests (admin API): with ``allowed_hosts`` given, a request
whose Host is not a loopback name or address, the address the client connected to, the
listen address or one of ``allowed_hosts`` is refused (421): a page that rebinds its own name
to this address still sends its own name as Host. A state-changing request (any method but
GET, HEAD, OPTIONS) with an ``Origin`` is refused (403) unless it comes from the console
(``sessions``, docs/console.md): a valid session cookie (which stands for the token), its
CSRF token in ``X-CSRF-Token``, and an Origin equal to the Host (checked above).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Protocol, cast
from urllib.parse import parse_qs, urlsplit

from ..defaults import DEFAULT_HTTP_MAX_CONNECTIONS
from .httpread import MAX_LINE, Gone, Head, Refused, read_head
from .httpstatus import REASONS

log = logging.getLogger("resolver.http")

#: A request body, for the methods that may have one (POST); GET and HEAD take none.
MAX_BODY: Final = 64 * 1024
#: Bytes received from the socket at once, into a buffer each connection keeps.
RECV_SIZE: Final = 16 * 1024
#: Seconds to receive the request line and headers (and, separately, the body).
READ_TIMEOUT: Final = 10.0
#: Seconds for the client to take the whole answer.
WRITE_TIMEOUT: Final = 10.0
#: Seconds between two log lines about refused connections.
WARN_INTERVAL: Final = 60.0
#: Methods that change nothing: allowed with an Origin header.
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
#: Host names that always mean this machine (RFC 6761 §6.3: ``.localhost`` is loopback).
LOCAL_NAMES: Final = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
#: Why a connection or request was refused: the values of the ``reason`` label.
REASONS_COUNTED: Final = (
    "connection_limit",  # every slot busy answering: refused with 503
    "evicted",  # the oldest connection still sending its request, closed to make room
    "timeout",  # request not received in time (408), or answer not taken in time
    "too_large",  # request line (414), headers (431) or body (413) over its limit
    "malformed",  # not HTTP/1.x as this server reads it (400, 501)
    "host",  # Host header not one of this listener's names (421)
    "origin",  # a state-changing request from a browser page (403)
    "unauthorized",  # missing or wrong bearer token (401)
    "csrf",  # a page's state-changing request without its session's CSRF token (403)
)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    #: The client's address, and whether the connection is TLS (a cookie's ``Secure``).
    peer: str = ""
    tls: bool = False
    #: The console session its cookie names (``HTTPServer.sessions``), if valid.
    session: Any = None


class Sessions(Protocol):
    """The console's session table (resolver/console/sessions.py). ``form_paths``: form
    posts (login, logout) whose handler checks their own credential."""

    form_paths: frozenset[str]
    #: Wrong tokens per client (console/sessions.py LoginGuard: locked, failure).
    guard: Any

    def find(self, cookie: str | None) -> Any: ...

    def csrf_ok(self, session: Any, given: str | None) -> bool: ...


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
    """Routes ``(method, path)`` to handlers; paths under ``protected`` need the token.

    ``allowed_hosts`` turns the Host check on (give ``()`` for loopback names and this
    listener's addresses only); ``None`` leaves it off (/metrics, which Prometheus may
    scrape through any Service name).
    """

    def __init__(
        self,
        routes: dict[tuple[str, str], Handler],
        token: str | None = None,
        protected: str = "/v1/",
        *,
        name: str = "admin",
        max_connections: int = DEFAULT_HTTP_MAX_CONNECTIONS,
        allowed_hosts: Iterable[str] | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        self.routes = routes
        self.token = token
        self.sessions = sessions
        self.protected = protected
        self.name = name
        self.max_connections = max(1, max_connections)
        self.allowed_hosts = (
            None
            if allowed_hosts is None
            else frozenset(_normal_host(h) for h in allowed_hosts if h.strip())
        )
        #: Seconds to receive a request's head (and its body), and to send the answer.
        self.read_timeout = READ_TIMEOUT
        self.write_timeout = WRITE_TIMEOUT
        self.server: asyncio.Server | None = None
        self.listen_host = ""
        #: Requests and connections refused, by reason (see ``REASONS_COUNTED``).
        self.rejected: Counter[str] = Counter(dict.fromkeys(REASONS_COUNTED, 0))
        #: Connections open now; those still sending their request, oldest first (a dict
        #: for its order).
        self._open: set[_Connection] = set()
        self._reading: dict[_Connection, None] = {}
        self._last_warning = 0.0
        self._unwarned = 0

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._open)

    async def start(self, host: str, port: int) -> int:
        """Listen; return the port bound (port 0 picks one)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Connection(self), host, port)
        self.listen_host = host
        sock = self.server.sockets[0]
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for conn in list(self._open):
                conn.abort()
            await self.server.wait_closed()

    def _admit(self, conn: _Connection) -> bool:
        """Take the new connection, making room if needed; False when it is refused."""
        if len(self._open) >= self.max_connections:
            if not self._reading:
                self._count("connection_limit")
                return False
            oldest = next(iter(self._reading))
            oldest.abort()
            self._count("evicted")
        self._open.add(conn)
        self._reading[conn] = None
        return True

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        self._reading.pop(conn, None)

    def _count(self, reason: str) -> None:
        self.rejected[reason] += 1
        if reason not in ("connection_limit", "evicted"):
            return
        # One line a minute at most: a flood must not become a flood of log lines.
        self._unwarned += 1
        now = time.monotonic()
        if now - self._last_warning >= WARN_INTERVAL:
            log.warning(
                "%s HTTP: %d connection(s) refused or closed early at the limit of %d open "
                "connections (max_connections) since the last report",
                self.name,
                self._unwarned,
                self.max_connections,
            )
            self._last_warning = now
            self._unwarned = 0

    async def _serve(self, conn: _Connection) -> None:
        try:
            response = await self._respond(conn)
            if response is not None:
                if conn.method == "HEAD":  # never a body, errors included (RFC 9110 §9.3.2)
                    response = _no_body(response)
                self._reading.pop(conn, None)
                if not await conn.send(_render(response), self.write_timeout):
                    self._count("timeout")
        except Exception:
            log.exception("%s HTTP connection failed", self.name)
            conn.abort()
        finally:
            self._forget(conn)
            conn.close()

    async def _respond(self, conn: _Connection) -> Response | None:
        """The answer to the one request on ``conn`` (None: nothing to answer)."""
        reader = conn.reader
        try:
            try:
                async with asyncio.timeout(self.read_timeout):
                    head = await read_head(reader)
                    conn.method = head.method
            except TimeoutError:
                raise Refused(408, "request not received in time") from None
            request = self._check(head, conn)
            self._reading.pop(conn, None)  # a request in hand: no longer evictable
            handler = self._route(request)
            if isinstance(handler, Response):
                return handler
            request.body = await self._read_body(reader, request)
        except Gone:
            return None
        except Refused as exc:
            self._count(exc.reason)
            response = error(exc.status, str(exc))
            if exc.status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="resolver"'
            if exc.retry:
                response.headers["Retry-After"] = str(int(exc.retry) + 1)
            return response
        try:
            return await handler(request)
        except Exception:
            log.exception(
                "%s HTTP handler failed for %s %s", self.name, request.method, request.path
            )
            return error(500, "internal error; see the resolver's log")

    def _check(self, head: Head, conn: _Connection) -> Request:
        """Host, Origin and token, in that order; the request without its body."""
        headers = head.headers
        split = urlsplit(head.target)
        if head.target.startswith("/"):
            host = headers.get("host")
        elif split.scheme.lower() in ("http", "https") and split.netloc:
            host = split.netloc  # absolute-form: its authority is the Host (RFC 9112 §3.2.2)
        else:
            raise Refused(400, "malformed request target")
        if host is None and head.version != "HTTP/1.0":
            raise Refused(400, "no Host header")  # RFC 9112 §3.2
        if self.allowed_hosts is not None and host is not None and not self._host_ok(host, conn):
            raise Refused(
                421,
                f"this server does not answer for the host {host[:100]!r}; "
                "add it to admin.allowed_hosts if it is one of its names",
            )
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        request = Request(head.method, split.path or "/", query, headers, b"", conn.peer, conn.tls)
        protected = request.path.startswith(self.protected) and self.token
        given = headers.get("authorization")
        bearer = bool(protected and given is not None and self._bearer(str(given), conn.peer))
        if self.sessions is not None:
            request.session = self.sessions.find(headers.get("cookie"))
        if head.method not in SAFE_METHODS:
            self._check_page(request, host, bearer)
        if protected and not bearer and request.session is None:
            raise Refused(401, "missing or wrong bearer token")
        return request

    def _bearer(self, given: str, peer: str) -> bool:
        """Whether ``given`` is the bearer token; wrong ones count with the console's wrong
        logins (the same lockout, or this header would be a way around it)."""
        guard = self.sessions.guard if self.sessions is not None else None
        wait = guard.locked(peer) if guard is not None else 0.0
        if wait:
            raise Refused(429, "too many wrong tokens: wait and try again", retry=wait)
        right = hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())
        if not right and guard is not None:
            guard.failure(peer)
        return right

    def _check_page(self, request: Request, host: str | None, bearer: bool) -> None:
        """A state-changing request from a web page (an Origin, or a session cookie in
        place of the token): only the console's own, with its CSRF token."""
        headers = request.headers
        origin = headers.get("origin")
        if origin is None and (request.session is None or bearer):
            return  # curl, the CLI: no page involved
        if self.sessions is None or (origin is not None and not _same_origin(origin, host)):
            raise Refused(
                403, "requests from web pages are refused (Origin header): use curl or the CLI"
            )
        if request.path in self.sessions.form_paths:
            return  # its handler checks the form's token
        if request.session is None:
            raise Refused(403, "requests from web pages need a console session: log in")
        if not self.sessions.csrf_ok(request.session, headers.get("x-csrf-token")):
            raise Refused(403, "missing or wrong CSRF token (X-CSRF-Token header)", "csrf")

    def _host_ok(self, host: str, conn: _Connection) -> bool:
        name = _normal_host(host)
        assert self.allowed_hosts is not None
        if name in self.allowed_hosts or name in LOCAL_NAMES or name.endswith(".localhost"):
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False  # a name not configured: what DNS rebinding sends
        if address.is_loopback:
            return True
        local = conn.sockname
        mine = {_normal_host(self.listen_host), _normal_host(str(local[0]) if local else "")}
        return _normal_host(str(address)) in mine

    def _route(self, request: Request) -> Handler | Response:
        handler = self.routes.get((request.method, request.path))
        if handler is not None:
            return handler
        if request.method == "HEAD" and ("GET", request.path) in self.routes:
            return partial(_head, self.routes[("GET", request.path)])  # RFC 9110 §9.3.2
        allowed = [m for m, p in self.routes if p == request.path]
        allowed += ["HEAD"] if "GET" in allowed and "HEAD" not in allowed else []
        if allowed:
            response = error(405, f"use {', '.join(allowed)} for {request.path}")
            response.headers["Allow"] = ", ".join(allowed)
            return response
        return error(404, f"no such endpoint: {request.path}")

    async def _read_body(self, reader: asyncio.StreamReader, request: Request) -> bytes:
        headers = request.headers
        if "transfer-encoding" in headers:
            raise Refused(501, "Transfer-Encoding is not supported; send Content-Length")
        length = headers.get("content-length", "0")
        if not length.isdigit() or len(length) > 12:
            raise Refused(400, "bad Content-Length")
        size = int(length)
        limit = 0 if request.method in ("GET", "HEAD") else MAX_BODY
        if size > limit:
            raise Refused(413, f"body too large: {request.method} takes at most {limit} bytes")
        if not size:
            return b""
        try:
            return await asyncio.wait_for(reader.readexactly(size), self.read_timeout)
        except TimeoutError:
            raise Refused(408, "body not received in time") from None
        except asyncio.IncompleteReadError:
            raise Gone from None


class _Connection(asyncio.BufferedProtocol):
    """One HTTP connection: bytes go from the socket into one small buffer of its own.

    A buffered protocol, so that the loop receives into ``RECV_SIZE`` bytes per connection
    instead of allocating up to 256 KiB per read; the StreamReader behind it stops reading
    from the socket once it holds twice ``MAX_LINE``. Admission (the connection cap) is
    decided as the connection is made, before anything is read.
    """

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.reader = asyncio.StreamReader(limit=MAX_LINE)
        self.transport: asyncio.Transport | None = None
        self.sockname: Any = None
        self.peer = ""
        self.tls = False
        self.method = ""  # the request's, once read
        self._scratch = memoryview(bytearray(0))
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are no subclasses of asyncio's, hence a cast, not a check.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.sockname = transport.get_extra_info("sockname")
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self.tls = transport.get_extra_info("sslcontext") is not None
        if not self.server._admit(self):
            # Every slot is busy answering: say so in a few bytes, read nothing.
            transport.pause_reading()
            transport.write(_render(error(503, "too many connections; try again")))
            transport.close()
            return
        self._scratch = memoryview(bytearray(RECV_SIZE))
        self.reader.set_transport(transport)
        asyncio.get_running_loop().create_task(self.server._serve(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        self.reader.feed_data(self._scratch[:nbytes])

    def eof_received(self) -> bool:
        self.reader.feed_eof()
        return True  # a client may half-close after its request and still read the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._scratch = memoryview(bytearray(0))
        if exc is None:
            self.reader.feed_eof()
        else:
            self.reader.set_exception(exc)
        self._writable.set()
        self.server._forget(self)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def send(self, data: bytes, timeout: float) -> bool:
        """Write ``data``; False (and the connection dropped) when it is not taken in time."""
        if self._lost or self.transport is None:
            return True
        self.transport.write(data)
        try:
            await asyncio.wait_for(self._writable.wait(), timeout)
        except TimeoutError:
            self.abort()
            return False
        return True

    def close(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        if transport.get_write_buffer_size():
            # close() waits for the answer to be flushed: a client that never reads it
            # must not keep the transport and its buffer for ever.
            asyncio.get_running_loop().call_later(self.server.write_timeout, transport.abort)

    def abort(self) -> None:
        self.server._forget(self)
        if self.transport is not None:
            self.transport.abort()


async def _head(get: Handler, request: Request) -> Response:
    """HEAD of a GET route: the GET's answer (``_serve`` drops its body)."""
    return await get(request)


def _no_body(response: Response) -> Response:
    """The answer's status and headers, its Content-Length included, without its body."""
    response.headers["Content-Length"] = str(len(response.body))
    response.body = b""
    return response


def _normal_host(host: str) -> str:
    """``host`` (a Host header or a configured name) without port, brackets, final dot."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _same_origin(origin: str, host: str | None) -> bool:
    """Whether a page's ``Origin`` is the server it was sent to (scheme and Host)."""
    split = urlsplit(origin.strip())
    if host is None or split.scheme not in ("http", "https") or not split.netloc:
        return False
    return split.netloc.lower() == host.strip().lower()


def _render(response: Response) -> bytes:
    head = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Status')}"]
    headers = {
        "Content-Type": response.content_type,
        "Content-Length": str(len(response.body)),
        "Connection": "close",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        **response.headers,
    }
    # A value never ends the header line (CR, LF, NUL dropped: no header injection
    # whatever a handler echoes), and what latin-1 cannot carry becomes "?".
    head += [f"{k}: {str(v).translate(_UNSAFE)}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace") + response.body


_UNSAFE: Final = dict.fromkeys((0, 10, 13))
