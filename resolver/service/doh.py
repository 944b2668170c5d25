"""DNS over HTTPS for clients (RFC 8484): HTTP/2 and HTTP/1.1 on one listener.

``GET {path}?dns=<base64url>`` and ``POST {path}`` (``application/dns-message``) are answered
by :meth:`Resolver.handle` with ``PROTO_DOH``; ``{path}/{id}`` names the client ``id``. The
answer goes out as ``200`` with ``Cache-Control: max-age`` its smallest TTL; each fault gets
its status (400, 403, 404, 405, 408, 413, 414, 415, 431). ALPN picks HTTP/2 (``h2``, framed by
:mod:`.h2wire`) or HTTP/1.1 with keep-alive; with ``doh.plain`` (behind a TLS-terminating
proxy) there is no TLS and HTTP/2 is spoken when the client starts with its preface.

Connections are accepted here, not by ``loop.create_server``, so that a connection counts
from its first byte (a TLS handshake that never ends holds a slot, not an unbounded task)
and a PROXY protocol header can be read before TLS starts. What a client can make it hold:
- connections: ``tcp.max_connections`` (handshakes and PROXY headers included); over it
  the oldest not yet up, else the oldest idle, else the oldest busy one is closed for the
  new one; one client (not a trusted proxy) ``tcp.max_connections_per_client``, over which
  its own oldest goes;
- per HTTP/2 connection ``MAX_STREAMS`` streams (SETTINGS_MAX_CONCURRENT_STREAMS; more is
  a connection error) and as many answers in flight (reset streams included): then reading
  pauses; per HTTP/1.1 connection one request at a time (reading pauses meanwhile);
- request target ``MAX_TARGET`` (414), headers ``MAX_HEADERS`` (431), body ``MAX_BODY`` (413);
- time: a request (its head and body, or a stream from HEADERS to END_STREAM) must arrive
  within ``tcp.idle_timeout`` (408, stream reset), a connection with nothing in flight is
  closed after ``tcp.idle_timeout`` however many bytes trickle in, a PROXY header and a TLS
  handshake get the same time;
- pending output: above ``tcp.max_output`` reading pauses; output not taken within the idle
  timeout, or over four times the mark, aborts the connection.
Every bound hit is counted by reason (:data:`REASONS`, ``resolver_doh_rejected_total``).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import unquote

from ..config import Config, Listen
from ..core.padding import pad_response, wants_padding
from ..core.pending import Pending
from ..core.stats import PROTO_DOH
from . import dohwire
from .assembly import StartupError
from .certs import CertError, CertStore
from .dohconn import MEDIA, PHRASES, REASONS, DoHConnection, Reply
from .dot import failure_reason
from .listeners import Tasks, forget_connection, make_socket

log = logging.getLogger("resolver.doh")

#: Answers whose headers are remembered: how many at once (then they are forgotten), and
#: up to what size (so at most 2 MB).
REMEMBER: Final = 4096
REMEMBER_SIZE: Final = 512
#: The resolver's handle(): (query, client, tcp, proto, client id) -> answer.
Handle = Callable[[bytes, str, bool, int, str], bytes | Pending | None]


class DoHListener:
    """The DoH listeners of one server: their sockets, connections, limits and counts."""

    def __init__(
        self,
        handle: Handle,
        tasks: Tasks,
        config: Config,
        context: ssl.SSLContext | None,
        store: CertStore | None = None,
    ) -> None:
        doh, tcp = config.doh, config.tcp
        self.handle = handle
        self.tasks = tasks
        self.path = doh.path
        self.prefix = doh.path + "/"
        self.context = context
        #: Where the TLS handshakes are counted (by every encrypted listener: certs.py);
        #: None with doh.plain, where there is no handshake.
        self.store = store if context is not None else None
        self.proxies = tuple(ipaddress.ip_network(n, strict=False) for n in doh.trusted_proxies)
        self.proxy_protocol = doh.proxy_protocol
        self.max_connections = max(1, tcp.max_connections)
        #: Connections of one client (not of a trusted proxy); 0: no limit.
        self.max_per_client = tcp.max_connections_per_client
        self.idle_timeout = tcp.idle_timeout
        self.request_timeout = tcp.idle_timeout
        self.max_output = tcp.max_output
        #: Requests and connections refused, by reason (every reason, from 0).
        self.rejected: Counter[str] = Counter(dict.fromkeys(REASONS, 0))
        self.open: dict[DoHConnection, None] = {}  # insertion order = age
        self.by_client: dict[str, dict[DoHConnection, None]] = {}
        #: Accepted, not yet a connection (PROXY header, TLS handshake): how many, and
        #: how to give up on each (a PROXY reader or a start task), oldest first.
        self.starting = 0
        self._starting: dict[object, Callable[[], bool]] = {}
        self._sockets: list[socket.socket] = []
        #: The headers of answers sent, by their bytes after the id (see _answered).
        self._headers: dict[bytes, list[tuple[str, str]]] = {}

    @property
    def tick(self) -> float:
        """How often a connection checks its timeouts."""
        return max(0.05, min(self.idle_timeout, self.request_timeout) / 4)

    def count(self, reason: str) -> None:
        self.rejected[reason] += 1

    def bind(self, listen: Listen, shared: bool) -> int:
        """Listen on ``listen``; the port bound."""
        sock = make_socket(listen.host, listen.port, socket.SOCK_STREAM, shared)
        sock.listen(1024)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)
        self._sockets.append(sock)
        return int(sock.getsockname()[1])

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(64):  # a burst, then the loop's other work gets its turn
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("DoH accept failed: %s", exc)
                if exc.errno in (errno.EMFILE, errno.ENFILE):  # readable until a fd frees
                    loop = asyncio.get_running_loop()
                    loop.remove_reader(sock.fileno())
                    loop.call_later(1.0, self._resume_accept, sock)
                return
            conn.setblocking(False)
            peer = str(addr[0])
            if not self._make_room(peer):
                self.count("connection_limit")
                self._handshake_failed("busy")
                conn.close()
                continue
            if self.proxy_protocol and not dohwire.trusted(peer, self.proxies):
                self.count("proxy")  # only a trusted proxy may name the client
                conn.close()
                continue
            self.starting += 1
            if self.proxy_protocol:
                reader = _ProxyReader(self, conn, peer)
                self._starting[reader] = functools.partial(reader.fail, count=False)
            else:
                self.connect(conn, peer)

    def _resume_accept(self, sock: socket.socket) -> None:
        if sock in self._sockets:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)

    def _make_room(self, peer: str) -> bool:
        """Room for a connection from ``peer``: over its own limit its oldest connection
        (idle first) goes; over the total, the oldest one not yet up (a handshake takes
        milliseconds, so the oldest is most likely one that never ends), else the oldest
        idle connection, else the oldest busy one."""
        mine = self.by_client.get(peer)
        full = mine and 0 < self.max_per_client <= len(mine)
        if mine and full and not dohwire.trusted(peer, self.proxies):
            self.count("client_limit")
            (next((c for c in mine if c.idle), None) or next(iter(mine))).abort()
        if len(self.open) + self.starting < self.max_connections:
            return True
        while self._starting:
            oldest = next(iter(self._starting))
            gave_up = self._starting[oldest]()  # False: a start task that failed
            # A PROXY reader leaves _starting by itself; a start task is counted off now.
            if self._starting.pop(oldest, None) is not None:
                self.starting -= 1
            if gave_up:
                self.count("evicted")
                if not isinstance(oldest, _ProxyReader):  # its TLS handshake never ended
                    self._handshake_failed("busy")
                return True
        victim = next((c for c in self.open if c.idle), None) or next(iter(self.open), None)
        if victim is None:
            return False
        self.count("evicted")
        victim.abort()
        return True

    def _handshake_failed(self, reason: str) -> None:
        if self.store is not None:
            self.store.handshake_failures["doh", reason] += 1

    def connect(self, sock: socket.socket, peer: str) -> None:
        """Start serving an accepted socket (``starting`` counts it until it is up)."""
        token = object()  # its entry in _starting, until the connection is up (admit)
        task = asyncio.get_running_loop().create_task(self._start(sock, peer, token))
        self._starting[token] = task.cancel
        task.add_done_callback(functools.partial(self._started, sock, token))

    def _started(self, sock: socket.socket, token: object, task: asyncio.Task[None]) -> None:
        if self._starting.pop(token, None) is not None:  # else counted off already
            self.starting -= 1
        if task.cancelled():  # evicted or shutting down, maybe before it even began
            sock.close()

    async def _start(self, sock: socket.socket, peer: str, token: object) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: DoHConnection(self, peer, token),
                sock,
                ssl=self.context,
                ssl_handshake_timeout=self.request_timeout if self.context else None,
            )
        except (TimeoutError, OSError) as exc:  # ssl.SSLError is an OSError
            self.count("handshake")
            self._handshake_failed(failure_reason(exc))
            sock.close()
            return
        if self.store is not None:
            self.store.handshakes["doh"] += 1

    def admit(self, conn: DoHConnection) -> None:
        if self._starting.pop(conn.token, None) is not None:  # up: no longer starting
            self.starting -= 1
        self.open[conn] = None
        self.by_client.setdefault(conn.peer, {})[conn] = None

    def forget(self, conn: DoHConnection) -> None:
        forget_connection(self.open, self.by_client, conn, conn.peer)

    def stop_accepting(self) -> None:
        """Close the listening sockets and the connections not yet up."""
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()
        for give_up in list(self._starting.values()):
            give_up()

    def stop_reading(self) -> None:
        """Shutting down: no new requests; each connection closes once it has answered."""
        for conn in list(self.open):
            conn.drain()

    def close_all(self) -> None:
        self.stop_accepting()
        for conn in list(self.open):
            conn.abort()

    # What a request is answered with, whatever its HTTP version.

    def serve(
        self,
        peer: str,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        reply: Reply,
    ) -> None:
        """Answer one request by calling ``reply`` (now, or when the answer arrives)."""
        if method == "POST" and target == self.path and headers.get("content-type") == MEDIA:
            # The usual request, the same as below in fewer steps.
            return self._query(peer, body, "", headers, reply)
        path, _, query = target.partition("?")
        client_id: str | None = ""
        if path != self.path:
            if not path.startswith(self.prefix):
                return self._refuse(reply, 404, "not_found")
            client_id = dohwire.client_id(path[len(self.prefix) :])
            if client_id is None:
                return self._refuse(reply, 400, "bad_request", "not a client id")
        if method == "GET":
            value = next(
                (v for k, _, v in (p.partition("=") for p in query.split("&")[:32]) if k == "dns"),
                None,
            )
            if value is None:
                return self._refuse(reply, 400, "bad_request", "no dns parameter")
            message = dohwire.decode_dns_param(unquote(value))
            if message is None:
                return self._refuse(reply, 400, "bad_request", "dns is not base64url")
        elif method == "POST":
            kind = headers.get("content-type", "").partition(";")[0].strip().lower()
            if kind != MEDIA:
                return self._refuse(reply, 415, "media_type", f"expected {MEDIA}")
            message = body
        else:
            return self._refuse(reply, 405, "method", extra=[("allow", "GET, POST")])
        return self._query(peer, message, client_id or "", headers, reply)

    def _query(
        self, peer: str, message: bytes, client_id: str, headers: dict[str, str], reply: Reply
    ) -> None:
        if not dohwire.is_query(message):
            return self._refuse(reply, 400, "bad_request", "not a DNS query")
        client = dohwire.forwarded_client(peer, headers.get("x-forwarded-for", ""), self.proxies)
        try:
            result = self.handle(message, client, True, PROTO_DOH, client_id)
        except Exception:  # a bug costs one answer, never the connection
            log.exception("internal error answering a DoH query")
            return reply(500, [("content-type", "text/plain")], b"internal error\n")
        if isinstance(result, Pending):
            result.then(self._answered, (message, reply), self.tasks.held)
        else:
            self._answered(result, (message, reply))
        return None

    def _answered(self, answer: bytes | None, arg: tuple[bytes, Reply]) -> None:
        message, reply = arg
        if answer is None:
            return self._refuse(reply, 403, "no_answer", "no answer for this client")
        if wants_padding(message):
            answer = pad_response(answer)
        # The headers of an answer are those of the same bytes before (its id aside): a
        # repeat is not parsed again for its smallest TTL (a TTL that fell makes new bytes).
        key = answer[2:]
        headers = self._headers.get(key)
        if headers is None:
            age = dohwire.max_age(answer)
            headers = [("content-type", MEDIA), ("cache-control", f"max-age={age}")]
            if len(key) <= REMEMBER_SIZE:
                if len(self._headers) >= REMEMBER:
                    self._headers.clear()
                self._headers[key] = headers
        reply(200, headers, answer)
        return None

    def _refuse(
        self, reply: Reply, status: int, reason: str, why: str = "", extra: list[Any] | None = None
    ) -> None:
        self.count(reason)
        text = f"{status} {PHRASES[status]}{': ' + why if why else ''}\n".encode()
        reply(status, [("content-type", "text/plain"), *(extra or [])], text)


class _ProxyReader:
    """Reads a PROXY protocol header off an accepted socket, never a byte beyond it, then
    hands the socket on (to TLS, when there is TLS) with the client it names."""

    def __init__(self, listener: DoHListener, sock: socket.socket, peer: str) -> None:
        self.listener = listener
        self.sock = sock
        self.peer = peer
        self.buf = b""
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._step)
        self.timer = loop.call_later(listener.request_timeout, self.fail)

    def _step(self) -> None:
        sock = self.sock
        try:
            need = dohwire.proxy_needed(self.buf)
            if need < 0:  # a v1 line: up to its end, which the peek shows or not yet
                peek = sock.recv(dohwire.PROXY_V1_MAX - len(self.buf), socket.MSG_PEEK)
                end = peek.find(b"\n")
                need = end + 1 if end >= 0 else len(peek)
            chunk = sock.recv(max(1, need))
            if not chunk:
                self.fail()
                return None
            self.buf += chunk
            if dohwire.proxy_needed(self.buf) != 0:
                return None
            source = dohwire.proxy_source(self.buf)
        except (BlockingIOError, InterruptedError):
            return None
        except (OSError, dohwire.ProxyError) as exc:
            log.debug("PROXY header from %s refused: %s", self.peer, exc)
            self.fail()
            return None
        self._done()
        self.listener.connect(sock, source or self.peer)
        return None

    def _done(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.timer.cancel()
        self.listener._starting.pop(self, None)

    def fail(self, count: bool = True) -> bool:
        """Give up on this connection (its header is late or bad, or room is needed)."""
        if self not in self.listener._starting:
            return False
        self._done()
        self.listener.starting -= 1
        if count:
            self.listener.count("proxy")
        self.sock.close()
        return True


async def start(
    config: Config, handle: Handle, tasks: Tasks, shared: bool, store: CertStore | None = None
) -> tuple[DoHListener | None, list[tuple[str, int]]]:
    """The DoH listener of ``config`` bound to every ``doh.listen`` address (None when
    there is none), and the (host, port) pairs bound. ``store``: the certificate store the
    TLS listeners share (its reloads reach this listener's context in place)."""
    if not config.doh.listen:
        return None, []
    context = None
    if not config.doh.plain:
        assert config.tls.cert is not None and config.tls.key is not None  # checked by load
        try:
            store = store or CertStore(config.tls.cert, config.tls.key)
            context = store.context(("h2", "http/1.1"))
        except CertError as exc:
            raise StartupError(f"doh: {exc}") from None
    listener = DoHListener(handle, tasks, config, context, store)
    bound = []
    for listen in config.doh.listen:
        try:
            bound.append((listen.host, listener.bind(listen, shared)))
        except OSError as exc:
            listener.stop_accepting()
            raise StartupError(f"cannot listen on doh {listen}: {exc.strerror or exc}") from None
    return listener, bound
