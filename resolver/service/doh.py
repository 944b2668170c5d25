"""DNS over HTTPS for clients (RFC 8484): HTTP/2 and HTTP/1.1 on one listener.

``GET {path}?dns=<base64url>`` and ``POST {path}`` (``application/dns-message``) are answered
by :meth:`Resolver.handle` with ``PROTO_DOH``; ``{path}/{id}`` names the client ``id``. The
answer goes out as ``200`` with ``Cache-Control: max-age`` its smallest TTL; each fault gets
its status (400, 403, 404, 405, 408, 413, 414, 415, 431). ALPN picks HTTP/2 (``h2``, the h2
state machine) or HTTP/1.1 with keep-alive; with ``doh.plain`` (behind a TLS-terminating
proxy) there is no TLS and HTTP/2 is spoken when the client starts with its preface.

Connections are accepted here, not by ``loop.create_server``, so that a connection counts
from its first byte (a TLS handshake that never ends holds a slot, not an unbounded task)
and a PROXY protocol header can be read before TLS starts. What a client can make it hold:
- connections: ``tcp.max_connections`` (handshakes included); over it the oldest idle
  connection (else the oldest busy one) is closed for the new one, and when every slot is
  still handshaking the new one is refused;
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
import ipaddress
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from ..config import Config, Listen
from ..core.pending import Pending
from ..core.stats import PROTO_DOH
from . import dohwire
from .assembly import StartupError
from .certs import CertError, CertStore
from .dohconn import MEDIA, PHRASES, REASONS, DoHConnection, Reply
from .listeners import Tasks, make_socket

log = logging.getLogger("resolver.doh")

#: The resolver's handle(): (query, client, tcp, proto, client id) -> answer.
Handle = Callable[[bytes, str, bool, int, str], bytes | Pending | None]


class DoHListener:
    """The DoH listeners of one server: their sockets, connections, limits and counts."""

    def __init__(
        self, handle: Handle, tasks: Tasks, config: Config, context: ssl.SSLContext | None
    ) -> None:
        doh, tcp = config.doh, config.tcp
        self.handle = handle
        self.tasks = tasks
        self.path = doh.path
        self.prefix = doh.path + "/"
        self.context = context
        self.proxies = tuple(ipaddress.ip_network(n, strict=False) for n in doh.trusted_proxies)
        self.proxy_protocol = doh.proxy_protocol
        self.max_connections = max(1, tcp.max_connections)
        self.idle_timeout = tcp.idle_timeout
        self.request_timeout = tcp.idle_timeout
        self.max_output = tcp.max_output
        #: Requests and connections refused, by reason (every reason, from 0).
        self.rejected: Counter[str] = Counter(dict.fromkeys(REASONS, 0))
        self.open: dict[DoHConnection, None] = {}  # insertion order = age
        #: Accepted, not yet a connection (PROXY header, TLS handshake).
        self.starting = 0
        self._readers: set[_ProxyReader] = set()
        self._sockets: list[socket.socket] = []
        self._starts: set[asyncio.Task[None]] = set()

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
            if not self._make_room():
                self.count("connection_limit")
                conn.close()
                continue
            if self.proxy_protocol and not dohwire.trusted(peer, self.proxies):
                self.count("proxy")  # only a trusted proxy may name the client
                conn.close()
                continue
            self.starting += 1
            if self.proxy_protocol:
                self._readers.add(_ProxyReader(self, conn, peer))
            else:
                self.connect(conn, peer)

    def _resume_accept(self, sock: socket.socket) -> None:
        if sock in self._sockets:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)

    def _make_room(self) -> bool:
        if len(self.open) + self.starting < self.max_connections:
            return True
        if not self.open:
            return False  # every slot is a handshake: refuse rather than evict blindly
        victim = next((c for c in self.open if c.idle), None) or next(iter(self.open))
        self.count("evicted")
        self.forget(victim)
        victim.abort()
        return True

    def connect(self, sock: socket.socket, peer: str) -> None:
        """Start serving an accepted socket (``starting`` counts it until it is up)."""
        task = asyncio.get_running_loop().create_task(self._start(sock, peer))
        self._starts.add(task)
        task.add_done_callback(self._starts.discard)

    async def _start(self, sock: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: DoHConnection(self, peer),
                sock,
                ssl=self.context,
                ssl_handshake_timeout=self.request_timeout if self.context else None,
            )
        except (TimeoutError, OSError):  # ssl.SSLError is an OSError
            self.count("handshake")
            sock.close()
        except asyncio.CancelledError:  # shutting down
            sock.close()
            raise
        finally:
            self.starting -= 1

    def admit(self, conn: DoHConnection) -> None:
        self.open[conn] = None

    def forget(self, conn: DoHConnection) -> None:
        self.open.pop(conn, None)

    def stop_accepting(self) -> None:
        """Close the listening sockets and the connections not yet up."""
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()
        for reader in list(self._readers):
            reader.fail(count=False)
        for task in list(self._starts):
            task.cancel()

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
        if not dohwire.is_query(message):
            return self._refuse(reply, 400, "bad_request", "not a DNS query")
        client = dohwire.forwarded_client(peer, headers.get("x-forwarded-for", ""), self.proxies)
        try:
            result = self.handle(message, client, True, PROTO_DOH, client_id or "")
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
        if dohwire.wants_padding(message):
            answer = dohwire.pad(answer)
        age = dohwire.max_age(answer)
        reply(200, [("content-type", MEDIA), ("cache-control", f"max-age={age}")], answer)
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
                return self.fail()
            self.buf += chunk
            if dohwire.proxy_needed(self.buf) != 0:
                return None
            source = dohwire.proxy_source(self.buf)
        except (BlockingIOError, InterruptedError):
            return None
        except (OSError, dohwire.ProxyError) as exc:
            log.debug("PROXY header from %s refused: %s", self.peer, exc)
            return self.fail()
        self._done()
        self.listener.connect(sock, source or self.peer)
        return None

    def _done(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.timer.cancel()
        self.listener._readers.discard(self)

    def fail(self, count: bool = True) -> None:
        if self not in self.listener._readers:
            return
        self._done()
        self.listener.starting -= 1
        if count:
            self.listener.count("proxy")
        self.sock.close()


async def start(
    config: Config, handle: Handle, tasks: Tasks, shared: bool
) -> tuple[DoHListener | None, list[tuple[str, int]]]:
    """The DoH listener of ``config`` bound to every ``doh.listen`` address (None when
    there is none), and the (host, port) pairs bound."""
    if not config.doh.listen:
        return None, []
    context = None
    if not config.doh.plain:
        assert config.tls.cert is not None and config.tls.key is not None  # checked by load
        try:
            context = CertStore(config.tls.cert, config.tls.key).context(("h2", "http/1.1"))
        except CertError as exc:
            raise StartupError(f"doh: {exc}") from None
    listener = DoHListener(handle, tasks, config, context)
    bound = []
    for listen in config.doh.listen:
        try:
            bound.append((listen.host, listener.bind(listen, shared)))
        except OSError as exc:
            listener.stop_accepting()
            raise StartupError(f"cannot listen on doh {listen}: {exc.strerror or exc}") from None
    return listener, bound
