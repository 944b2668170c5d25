"""DNS over QUIC listeners (RFC 9250, ALPN ``doq``, UDP port 853): start, certificate
renewal, stop.

aioquic is the optional extra ``quic`` (``pip install 'dns-filtering-resolver[quic]'``).
This module imports it only when ``doq.listen`` is set, so the package runs without it,
and a ``doq.listen`` without it is a clear startup error. The connections themselves are
:mod:`.doqconn`.

The limits are those of the TCP listeners (``tcp.idle_timeout``, ``tcp.max_connections``,
``tcp.max_pipeline`` as streams per connection): DoQ, like TCP, carries many queries per
connection.

Certificates: aioquic loads the PEM files itself (``QuicConfiguration.load_cert_chain``),
so the :class:`CertStore` is used to validate the pair (a mismatched key or an expired
certificate is refused) and to know when a new pair has been loaded. Each new connection
compares the count of pairs the store has loaded with the one the QUIC configuration was
built from; when they differ, a new configuration is built from the files and used for new
connections, while open connections keep theirs.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import socket
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..config import Config, Listen
from .assembly import StartupError
from .certs import CertError, CertStore

if TYPE_CHECKING:
    from ..core.pending import Pending
    from .doqconn import DoQServer, Limits

log = logging.getLogger("resolver")

MISSING: str = (
    "doq.listen needs aioquic, the optional 'quic' extra: "
    "pip install 'dns-filtering-resolver[quic]' (or pip install 'aioquic>=1.0'), "
    "or remove doq.listen from the config"
)


def available() -> bool:
    """Whether aioquic is installed."""
    return importlib.util.find_spec("aioquic") is not None


#: How often the store is asked to check for renewed files, and the QUIC configuration
#: brought up to date with what it loaded (seconds). A shared store is also checked by the
#: server's watcher; whichever sees a renewal first loads it, and this notices either way.
POLL: float = 5.0


class DoQListeners:
    """The DoQ listeners of one server, bound."""

    def __init__(self, config: Config, store: CertStore, own_store: bool, limits: Limits) -> None:
        self.config = config
        self.store = store
        self.own_store = own_store
        self.limits = limits
        self.servers: list[DoQServer] = []
        self.transports: list[asyncio.DatagramTransport] = []
        #: (host, port) actually bound, in the order of doq.listen.
        self.bound: list[tuple[str, int]] = []
        self.built_for = store.reloads["success"]  # the store's pair the configuration uses
        self.renewals = 0
        self.poller: asyncio.Task[None] | None = None

    def counts(self) -> dict[str, int]:
        """The counters (connections, bounds hit, faults) and the renewals picked up."""
        return {**asdict(self.limits.counts), "renewals": self.renewals}

    def check_certificate(self, renewed: bool = False) -> bool:
        """Use a new configuration for new connections if the store loaded a new pair
        (``renewed``: it says it did); True when a new configuration is in use. Cheap when
        nothing changed (two attribute comparisons)."""
        store = self.store
        loaded = store.reloads["success"]  # counts every pair the store loaded
        if loaded == self.built_for and not renewed:
            return False
        from .doqconn import configuration

        tls = self.config.tls
        assert tls.cert is not None and tls.key is not None
        try:
            quic = configuration(
                str(tls.cert), str(tls.key), self.limits.idle_timeout, self.limits.max_streams
            )
        except Exception as exc:  # files rewritten again since the store validated them
            log.error("DoQ keeps its certificate: %s: %s", tls.cert, exc)
            return False
        for server in self.servers:
            server.use(quic)
        self.built_for = loaded
        self.renewals += 1
        log.info("DoQ: new connections use the renewed certificate of %s", tls.cert)
        return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL)
            self.store.reload_if_changed()
            self.check_certificate()

    def stop_accepting(self) -> None:
        """Shutting down: no new connection, no new query; answers in progress go out."""
        self.limits.max_connections = 0
        self.limits.max_streams = 0

    def close(self) -> None:
        """Stop listening and close every connection (CONNECTION_CLOSE, no error)."""
        if self.poller is not None:
            self.poller.cancel()
            self.poller = None
        for server in self.servers:
            server.close()  # closes its transport too
        self.servers.clear()
        self.transports.clear()


async def start(
    config: Config,
    handler: Callable[..., Any],
    held: set[Pending],
    store: CertStore | None = None,
) -> DoQListeners | None:
    """Bind every ``doq.listen`` address; None when there is none. Raise :class:`StartupError`.

    ``store``: the certificate store the other TLS listeners share; without one, this
    module makes its own. Either way its files are checked for renewal every POLL seconds."""
    if not config.doq.listen:
        return None
    if not available():
        raise StartupError(MISSING)
    from .doqconn import DoQServer, Limits, configuration

    tls = config.tls
    if tls.cert is None or tls.key is None:
        raise StartupError("doq.listen needs a certificate: set tls.cert and tls.key")
    own = store is None
    try:
        if store is None:
            store = CertStore(tls.cert, tls.key)
        quic = configuration(
            str(tls.cert), str(tls.key), config.tcp.idle_timeout, config.tcp.max_pipeline
        )
    except CertError as exc:
        raise StartupError(f"cannot serve DoQ: {exc}") from None
    except Exception as exc:
        raise StartupError(f"cannot serve DoQ: {tls.cert}, {tls.key}: {exc}") from None
    limits = Limits(
        handler,
        held,
        tls.client_id_domain,
        config.tcp.max_connections,
        config.tcp.max_pipeline,
        config.tcp.idle_timeout,
    )
    limits.certs = store  # the handshakes are counted where DoT's and DoH's are
    listeners = DoQListeners(config, store, own, limits)
    loop = asyncio.get_running_loop()
    try:
        for listen in config.doq.listen:
            server = DoQServer(limits, quic)
            sock = _socket(listen)
            transport, _ = await loop.create_datagram_endpoint(_factory(server), sock=sock)
            listeners.servers.append(server)
            listeners.transports.append(transport)
            listeners.bound.append((listen.host, sock.getsockname()[1]))
    except BaseException:
        listeners.close()
        raise
    # Renewals: a handshake packet first asks for the store's latest pair (doqconn).
    limits.certificate_check = listeners.check_certificate
    listeners.poller = asyncio.ensure_future(listeners._poll())
    return listeners


def _factory(server: DoQServer) -> Callable[[], DoQServer]:
    return lambda: server


def _socket(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listen.host, listen.port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on doq {listen}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock
