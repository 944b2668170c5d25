"""The encrypted listeners for clients, together: the certificate they share (certs.py),
DNS over TLS (dot.py), DNS over HTTPS (doh.py) and DNS over QUIC (doq.py).

The server starts them after its plain listeners, stops their reading when it drains and
closes them after; this module keeps that order in one place, so that the server's
lifecycle reads the same with or without them. Child workers bind DoT and DoH themselves
from the config (SO_REUSEPORT); DoQ runs in the primary only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from ..config import Config, Listen
from ..observe.counts import Counts
from . import doh, doq
from .assembly import StartupError
from .certs import CertError, CertStore, open_store
from .dot import DoTListeners, watch_certificate
from .listeners import Tasks, bind_message

#: (proto, host, port) of a bound listener, for the status and the log.
Bound = tuple[str, str, int]


class Encrypted:
    """The encrypted listeners of one server process, and their certificate."""

    def __init__(self) -> None:
        self.certs: CertStore | None = None
        self.dot: DoTListeners | None = None
        self.doh: doh.DoHListener | None = None
        self.doq: doq.DoQListeners | None = None

    async def start(
        self, config: Config, handle: Callable[..., Any], tasks: Tasks, shared: bool, primary: bool
    ) -> list[Bound]:
        """Load the certificate (when configured) and bind every encrypted listener;
        raise StartupError with the file or address at fault."""
        try:
            self.certs = self.certs or open_store(config.tls)
        except CertError as exc:
            raise StartupError(f"tls: {exc}") from None
        bound: list[Bound] = []
        if self.certs is not None and config.dot.listen:
            self.dot = DoTListeners(
                self.certs, handle, tasks, config.tcp, config.tls.client_id_domain
            )
            for listen in config.dot.listen:
                bound.append(("dot", listen.host, await self._bind_dot(listen, shared)))
        if primary:  # DNS over QUIC: in the primary only
            self.doq = await doq.start(config, handle, tasks.held, self.certs)
            bound += [("doq", *b) for b in self.doq.bound] if self.doq else []
        self.doh, doh_bound = await doh.start(config, handle, tasks, shared, self.certs)
        bound += [("doh", host, port) for host, port in doh_bound]
        return bound

    async def _bind_dot(self, listen: Listen, shared: bool) -> int:
        assert self.dot is not None
        try:
            return await self.dot.bind(listen, shared)
        except OSError as exc:
            raise StartupError(bind_message("dot", listen, exc)) from None

    def watch(self, tasks: Tasks, interval: Callable[[], float], stopping: asyncio.Event) -> None:
        """Check the certificate files every ``interval()`` seconds until ``stopping``."""
        if self.certs is not None:  # every worker: each serves with its own contexts
            tasks.spawn(watch_certificate(self.certs, interval, stopping))

    def reload(self) -> None:
        """SIGHUP, POST /v1/reload: read the certificate files again, changed or not."""
        if self.certs is not None:
            self.certs.reload_if_changed(force=True)

    @property
    def doh_rejected(self) -> Mapping[str, int]:
        """DNS-over-HTTPS connections and requests refused, by reason (service/doh.py)."""
        return self.doh.rejected if self.doh is not None else {}

    def count_into(self, counts: Counts) -> Counts:
        """Add what the DoT and DoH listeners and the certificate store of this process
        counted to ``counts`` (relayed from child workers as the queries' counts are)."""
        if self.certs is not None:
            counts.tls_handshakes.update(self.certs.handshakes)
            counts.tls_handshake_failures.update(self.certs.handshake_failures)
        if self.dot is not None:
            table = self.dot.connections
            counts.dot_connections += len(table.open)
            counts.dot_handshaking += len(self.dot.handshaking)
            counts.dot_evicted.update(
                {"idle": table.evicted_idle, "busy": table.evicted_busy,
                 "client": table.evicted_client}
            )  # fmt: skip
            counts.dot_aborted.update(
                {"stalled": table.aborted_stalled, "output": table.aborted_output}
            )
        if self.doh is not None:
            counts.doh_connections += len(self.doh.open)
            counts.doh_rejected.update(self.doh.rejected)
        return counts

    def stop_reading(self) -> None:
        """Draining: no new connections or queries; answers in progress still go out."""
        if self.dot is not None:
            self.dot.stop_reading()
        if self.doq is not None:
            self.doq.stop_accepting()
        if self.doh is not None:
            self.doh.stop_accepting()
            self.doh.stop_reading()

    def close(self) -> None:
        """After the drain: close every connection."""
        if self.doh is not None:
            self.doh.close_all()
        if self.dot is not None:
            self.dot.close()
        if self.doq is not None:
            self.doq.close()
            self.doq = None
