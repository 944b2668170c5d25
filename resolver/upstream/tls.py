"""DNS over TLS (RFC 7858), and the TLS set-up that DNS over HTTPS (:mod:`.https`) shares
with it: verification against the trust store or a CA file, SPKI pins, host names resolved
through the bootstrap servers.

This module stays interpreted in the compiled build (setup.py): the DoH connection and
transport (interpreted, on h2) subclass :class:`EncryptedConnection` and
:class:`TLSTransport`, and an interpreted class cannot subclass a compiled one. It costs a
handshake per connection, not CPU per query.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
from collections.abc import Callable
from functools import partial
from typing import Any

from ..core.wire import FormatError, Mismatch, Query, Scan, scan_response
from .base import (
    BOOTSTRAP,
    MALFORMED,
    NETWORK,
    TIMEOUT,
    Connection,
    Lookup,
    Owner,
    UpstreamError,
    query_id,
    register,
    upstream_query,
)
from .endpoints import PIN_PARAM, Upstream


def spki_sha256(certificate: bytes) -> str:
    """The pin of a DER certificate: base64 of the SHA-256 of its SubjectPublicKeyInfo."""
    # Imported here: only pinned upstreams pay for it.
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = x509.load_der_x509_certificate(certificate).public_key()
    spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


async def connect_tls(
    up: Upstream,
    context: ssl.SSLContext,
    bootstrap: Lookup | None,
    timeout: float,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A verified TLS connection to ``up`` (its host name resolved through ``bootstrap``),
    its key checked against the pins. Any failure is an :class:`UpstreamError`: there is
    never a fallback to an unverified or unencrypted connection."""
    failure: Exception | None = None
    try:
        async with asyncio.timeout(timeout):
            if up.is_address:
                hosts = [up.host]
            elif bootstrap is None:
                raise UpstreamError(BOOTSTRAP, f"no bootstrap servers to resolve {up.host}")
            else:
                hosts = await bootstrap.lookup(up.host)
            for host in hosts:
                try:
                    reader, writer = await asyncio.open_connection(
                        host, up.port, ssl=context, server_hostname=up.server_name
                    )
                except (OSError, ssl.SSLError) as exc:
                    failure = exc
                    continue
                if up.pins:
                    cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
                    if spki_sha256(cert) not in up.pins:
                        writer.close()
                        failure = ssl.SSLError(f"the key of {host} matches no {PIN_PARAM} pin")
                        continue
                return reader, writer
    except TimeoutError:
        failure = TimeoutError()
    if bootstrap is not None and not up.is_address:
        bootstrap.forget(up.host)  # it may have moved: look it up again next time
    if isinstance(failure, TimeoutError):
        raise UpstreamError(TIMEOUT, "TLS connection not set up in time")
    raise UpstreamError(NETWORK, f"TLS: {failure}")


class EncryptedConnection:
    """What DNS-over-TLS and DNS-over-HTTPS connections share: one reused connection to
    one upstream, set up by :func:`connect_tls` when a query needs it."""

    def __init__(
        self,
        up: Upstream,
        context: ssl.SSLContext,
        idle: float = 30.0,
        bootstrap: Lookup | None = None,
    ) -> None:
        self.up = up
        self.context = context
        #: Seconds without a query in flight after which the connection is closed.
        self.idle = idle
        self.bootstrap = bootstrap
        self._connecting: asyncio.Lock = asyncio.Lock()
        #: Told of replies that are not the answer to our question (for the counts).
        self.ignored: Callable[[Exception], None] = lambda exc: None
        #: Connections set up so far (for tests and status).
        self.connects = 0

    async def query(self, wire: bytes, qid: int, question: bytes, timeout: float) -> Scan:
        """The reply to ``wire``; :class:`UpstreamError` when there is none in time."""
        raise NotImplementedError


class TLSConnection(EncryptedConnection):
    """One reused DNS-over-TLS connection (RFC 7858) with pipelining: queries go out as
    they come, answers are matched back by ID. It reconnects on the next query after a
    failure; a certificate that does not verify is a failure, never a downgrade."""

    writer: asyncio.StreamWriter | None = None
    reader_task: asyncio.Task[None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Queries in flight: ID -> (their future, their question).
        self.pending: dict[int, tuple[asyncio.Future[Scan], bytes]] = {}

    async def _connect(self, timeout: float) -> asyncio.StreamWriter:
        async with self._connecting:
            if self.writer is not None and not self.writer.is_closing():
                return self.writer
            reader, writer = await connect_tls(self.up, self.context, self.bootstrap, timeout)
            self.connects += 1
            self.writer = writer
            self.reader_task = asyncio.ensure_future(self._read(reader, writer))
            return writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(None if self.pending else self.idle):
                        size = int.from_bytes(await reader.readexactly(2), "big")
                        data = await reader.readexactly(size)
                except TimeoutError:
                    return  # idle: close; the next query reconnects
                qid = int.from_bytes(data[:2], "big") if len(data) >= 2 else -1
                waiting = self.pending.pop(qid, None)
                if waiting is None:
                    continue
                future, question = waiting
                try:
                    future.set_result(scan_response(data, qid, question))
                except (Mismatch, FormatError) as exc:
                    self.ignored(exc)
                    future.set_exception(UpstreamError(MALFORMED, str(exc)))
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            for future, _ in self.pending.values():
                if not future.done():
                    future.set_exception(UpstreamError(NETWORK, f"TLS: {exc}"))
            self.pending.clear()
        finally:
            writer.close()
            if self.writer is writer:
                self.writer = None

    async def query(self, wire: bytes, qid: int, question: bytes, timeout: float) -> Scan:
        writer = await self._connect(timeout)
        while qid in self.pending:
            qid = query_id()
            wire = qid.to_bytes(2, "big") + wire[2:]
        future: asyncio.Future[Scan] = asyncio.get_running_loop().create_future()
        self.pending[qid] = (future, question)
        try:
            writer.write(len(wire).to_bytes(2, "big") + wire)
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise UpstreamError(TIMEOUT, f"no TLS answer in {timeout:.2f} s") from None
        finally:
            self.pending.pop(qid, None)


def tls_context(ca_file: str | None = None, alpn: str | None = None) -> ssl.SSLContext:
    """Certificate verification against the system trust store (SSL_CERT_FILE honoured),
    or against ``ca_file``; ``alpn`` is the one protocol offered (h2 for DoH)."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        context.set_alpn_protocols([alpn])
    return context


class TLSTransport:
    """``tls://`` upstreams: one reused connection each, kept in the owner's
    ``connections`` (status reads them there) and set up on the first query."""

    #: The one protocol offered in the TLS handshake (ALPN), if any.
    alpn: str | None = None

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self.context = tls_context(owner.tls_ca_file, self.alpn)

    def connection(self, up: Upstream) -> Connection:
        """The connection to ``up``, made (not yet connected) if there is none."""
        conn = self.owner.connections.get(up)
        if conn is None:
            conn = self.owner.connections[up] = self.connect(up)
        return conn

    def connect(self, up: Upstream) -> EncryptedConnection:
        """A new connection object for ``up`` (it connects when a query needs it)."""
        conn = TLSConnection(up, self.context, bootstrap=self.owner.bootstrap)
        conn.ignored = partial(self.owner.ignored, up)
        return conn

    async def exchange(self, up: Upstream, q: Query, timeout: float, deadline: float) -> Scan:
        qid = query_id()
        wire = upstream_query(qid, q, True)
        return await self.connection(up).query(wire, qid, q.key + q.question[-4:], timeout)

    def close(self) -> None:
        """Connections close themselves when idle."""


register("tls", TLSTransport)
