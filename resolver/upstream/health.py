"""Upstream health, in one home (Unbound's infra cache is the model): per upstream, the
transport failures in a row, whether it is marked down, its active probes with their
backoff, and its latency. It adjusts to a new config: upstreams that remain keep their
state, the others are dropped (and their probes stopped).

Only transport failures count (timeouts, refused or lost connections, TLS and HTTP
failures): an answer of any rcode is a working transport, since the rcode of one client's
question says nothing about the upstream. ``max_fails`` failures in a row mark an upstream
down; a down upstream is asked only when no other can answer, and probes find out when it
is back (as CoreDNS's forward does its health checks).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Final

from ..defaults import DEFAULT_DOWN_AFTER as DOWN_AFTER
from ..defaults import DEFAULT_MAX_BACKOFF as MAX_BACKOFF
from ..defaults import DEFAULT_PROBE_INTERVAL as PROBE_INTERVAL
from .base import UpstreamError
from .endpoints import Upstream

log = logging.getLogger("resolver.upstream")

#: How much a new exchange's duration moves the latency (exponential moving average).
_WEIGHT: Final = 0.2


class Entry:
    """What is known about one upstream."""

    def __init__(self) -> None:
        #: Transport failures in a row (an answer of any rcode resets it).
        self.failures = 0
        self.down = False
        #: Smoothed duration of its good answers, in seconds (0.0 until one came).
        self.latency = 0.0
        self.measured = False
        #: The probe loop, while it is down.
        self.probe: asyncio.Task[None] | None = None


class Health:
    """The health of a forwarder's upstreams, keyed by their labels. ``ask`` makes one
    probe exchange (an :class:`UpstreamError` when it fails; a ValueError when the probe
    cannot be made, such as a bad probe name)."""

    def __init__(self, ask: Callable[[Upstream], Awaitable[None]]) -> None:
        self.ask = ask
        self.max_fails = DOWN_AFTER
        self.probe_interval = PROBE_INTERVAL
        self.probe_max_interval = MAX_BACKOFF
        self.entries: dict[str, Entry] = {}
        #: The labels of the configured upstreams (see :meth:`adjust`).
        self.configured: set[str] = set()
        #: The labels of the upstreams whose latest exchange failed, an index of the
        #: entries that every forwarded query reads (empty: all is well).
        self.troubled: set[str] = set()
        #: Probes sent, by (upstream, result): success or failure (a metric).
        self.probes: Counter[tuple[str, str]] = Counter()

    def adjust(self, upstreams: Iterable[Upstream]) -> None:
        """Take a new config: keep the state of the upstreams that remain, drop the rest
        (stopping their probes)."""
        self.configured = {up.label for up in upstreams}
        for label in [label for label in self.entries if label not in self.configured]:
            self._forget(label)

    def _forget(self, label: str) -> None:
        entry = self.entries.pop(label)
        self.troubled.discard(label)
        if entry.probe is not None and entry.probe is not _current_task():
            entry.probe.cancel()

    def _entry(self, label: str) -> Entry:
        entry = self.entries.get(label)
        if entry is None:
            entry = self.entries[label] = Entry()
        return entry

    def healthy(self, up: Upstream) -> bool:
        """False from ``max_fails`` transport failures in a row until it answers again (a
        probe, or a query it was asked because no other upstream could answer)."""
        entry = self.entries.get(up.label)
        return entry is None or not entry.down

    def failures(self, label: str) -> int:
        """Transport failures in a row of the upstream labelled ``label``."""
        entry = self.entries.get(label)
        return 0 if entry is None else entry.failures

    def latency(self, up: Upstream) -> float:
        """The smoothed duration of ``up``'s answers (0.0 until one came)."""
        entry = self.entries.get(up.label)
        return 0.0 if entry is None else entry.latency

    def split(self, ups: list[Upstream]) -> tuple[list[Upstream], list[Upstream]]:
        """``ups`` that may be asked, and those resting (marked down, waiting for a probe
        to succeed), which are tried only when the others fail; each in their order."""
        usable: list[Upstream] = []
        resting: list[Upstream] = []
        for up in ups:
            entry = self.entries.get(up.label)
            if entry is not None and entry.down:
                resting.append(up)
            else:
                usable.append(up)
        return usable, resting

    def answered(self, label: str, took: float) -> None:
        """A good answer from the upstream labelled ``label`` in ``took`` seconds."""
        entry = self.entries.get(label)
        if entry is None:
            entry = self.entries[label] = Entry()
        if entry.measured:
            entry.latency += _WEIGHT * (took - entry.latency)
        else:
            entry.latency = took
            entry.measured = True

    def alive(self, up: Upstream) -> None:
        """``up`` replied (to a query or a probe, whatever the rcode): its transport works."""
        label = up.label
        self.troubled.discard(label)
        entry = self.entries.get(label)
        if entry is None:
            return
        entry.failures = 0
        if entry.down:
            entry.down = False
            log.warning("upstream %s is up again", up)

    def failed(self, up: Upstream, kind: str) -> None:
        """A transport failure of one exchange with ``up`` (timeout, network, TLS, HTTP,
        truncated over TCP too): ``max_fails`` in a row mark it down, and probes start."""
        label = up.label
        entry = self._entry(label)
        entry.failures += 1
        self.troubled.add(label)
        if entry.failures >= self.max_fails and not entry.down:
            entry.down = True
            log.warning(
                "upstream %s is down after %d failures in a row (last: %s); probing it",
                up,
                entry.failures,
                kind,
            )
            if entry.probe is None:
                entry.probe = _start(self._probe(up))

    async def _probe(self, up: Upstream) -> None:
        """While ``up`` is down: probe it after ``probe_interval`` seconds, doubling the
        wait after each failure up to ``probe_max_interval``; any reply brings it back."""
        label = up.label
        wait = self.probe_interval
        try:
            while self._is_down(label):
                await asyncio.sleep(wait)
                if not self._is_down(label):
                    break  # a client's query got an answer meanwhile
                if label not in self.configured:
                    self._forget(label)  # gone from the config: forget it
                    break
                try:
                    await self.ask(up)
                except UpstreamError as exc:
                    self.probes[(label, "failure")] += 1
                    log.debug("probe of upstream %s failed: %s", up, exc)
                    wait = min(wait * 2, self.probe_max_interval)
                    continue
                except ValueError as exc:  # a bad probe name in the config
                    self.probes[(label, "failure")] += 1
                    log.error("cannot probe upstream %s: %s", up, exc)
                    wait = self.probe_max_interval
                    continue
                self.probes[(label, "success")] += 1
                self.alive(up)
        finally:
            entry = self.entries.get(label)
            if entry is not None and entry.probe is _current_task():
                entry.probe = None

    def _is_down(self, label: str) -> bool:
        entry = self.entries.get(label)
        return entry is not None and entry.down

    def probing(self) -> list[asyncio.Task[None]]:
        """The probe loops running now."""
        return [e.probe for e in self.entries.values() if e.probe is not None]


def _start(probe: Coroutine[None, None, None]) -> asyncio.Task[None] | None:
    try:
        return asyncio.get_running_loop().create_task(probe)
    except RuntimeError:  # no loop (a synchronous caller): the next query tries it
        probe.close()
        return None


def _current_task() -> asyncio.Task[object] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop
        return None
