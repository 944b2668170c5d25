"""The query store: audit records into SQLite or PostgreSQL, written off the query path.

:meth:`QueryStore.record` is what :class:`~resolver.observe.querylog.AuditLog.record` is: a
bounded put on a queue that never blocks and never raises. A writer thread takes batches,
turns them into rows (pseudonyms as the JSON-lines log makes them, the client's groups
from the config) and inserts each batch in one transaction. When the database is away
the writer keeps the batch it holds and reconnects with backoff; the queue fills, and
what no longer fits is dropped and counted (``resolver_store_dropped_total{reason="full"}``):
answering never waits for the database. When it returns, what was queued is written.

Retention runs on the same thread every ``PRUNE_INTERVAL`` seconds: rows older than
``max_age``, then the oldest beyond ``max_rows``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Final, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..policy.model import ClientGroups
from .querylog import BLOCKED_DECISIONS, DECISIONS, AuditConfig, AuditLog, pseudonym
from .storeconfig import StoreConfig
from .storedb import Database, Search, open_database, reversed_name

log = logging.getLogger("resolver.store")

_MAX_BATCH: Final = 5_000
#: Seconds the writer lets records gather before it takes a batch.
GATHER: Final = 0.05
#: Seconds between two retention runs.
PRUNE_INTERVAL: Final = 10.0
#: Reconnection backoff, doubling from the first to the last.
BACKOFF: Final = (0.2, 10.0)
#: A batch the database refuses this many times over a working connection is dropped
#: (reason "error"): a row it cannot take must not stop the store for good.
_ATTEMPTS: Final = 3
_STOP: Final = object()
#: Clients and names whose row fields are kept worked out (each dict emptied beyond).
_CACHED: Final = 65_536
DROP_REASONS: Final = ("full", "error", "shutdown")


class QueryStore:
    """An audit sink that writes to a database (see the module docstring)."""

    def __init__(
        self,
        config: StoreConfig,
        audit: AuditConfig,
        target: str,
        groups: dict[str, Sequence[str]] | None = None,
    ) -> None:
        self.config = config
        #: A SQLite path or a PostgreSQL DSN.
        self.target = target
        self.key = audit.pseudonymize_key.encode() if audit.pseudonymize_key else None
        self._wanted = DECISIONS if audit.what == "all" else BLOCKED_DECISIONS
        self._limit = max(1, config.queue_size)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._groups = ClientGroups(dict(groups or {}))
        self._group_names = [
            (name, bit) for name, bit in self._groups.bits.items() if name != "all"
        ]
        self._clients: dict[str, tuple[str, str]] = {}  # address -> (as stored, groups)
        self._rnames: dict[str, str] = {}  # qname -> reversed name
        self._dropped_full = 0  # the hot path's counter; the writer's are in ``drops``
        self.drops: Counter[str] = Counter()
        self.rows = 0
        self.pruned = 0
        self.connected = False
        self._db: Database | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._reported = False  # an outage was logged and the database has not returned

    @property
    def dropped(self) -> int:
        """Records lost for any reason."""
        return self._dropped_full + sum(self.drops.values())

    def drop_counts(self) -> dict[str, int]:
        """Records lost, by reason (full, error, shutdown)."""
        counts = {reason: self.drops[reason] for reason in DROP_REASONS}
        counts["full"] += self._dropped_full
        return counts

    def queued(self) -> int:
        """Records waiting for the writer."""
        return self._queue.qsize()

    def wants(self, decision: str) -> bool:
        """Whether records with this decision are stored (``audit.log``)."""
        return decision in self._wanted

    def record(self, *entry: Any) -> None:
        """Queue one audit record (the tuple of AuditLog.record). Never blocks or raises."""
        if entry[6] not in self._wanted:
            return
        if self._closed or self._queue.qsize() >= self._limit:
            self._dropped_full += 1
            return
        self._queue.put(entry)

    def offer(self, batch: list[tuple[Any, ...]]) -> None:
        """Queue records another sink's writer thread took (AuditTee); as :meth:`record`,
        never blocks, and counts what does not fit."""
        for entry in batch:
            if self._closed or self._queue.qsize() >= self._limit:
                self._dropped_full += 1
            else:
                self._queue.put(entry)

    def start(self) -> None:
        """Start the writer thread (a daemon: a hung database cannot hold up exit)."""
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="query-store", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (if the database is there), then stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        if self._thread is None:
            self._stopping.set()  # written here, once: no waiting for a database away
            self._run()
            return
        self._thread.join(timeout)
        self._stopping.set()  # a writer still waiting for the database gives up now
        self._thread.join(1.0)

    def search(self, search: Search, per_client: bool = False) -> list[dict[str, Any]]:
        """Rows matching ``search`` (newest first), on a connection of its own; a client
        given as an address is pseudonymised first when the store holds pseudonyms."""
        client = search.client
        if client is not None and self.key is not None and not client.startswith("anon-"):
            search = replace(search, client=pseudonym(self.key, client))
        client_id = search.client_id
        if client_id is not None and self.key is not None and not client_id.startswith("anon-"):
            search = replace(search, client_id=pseudonym(self.key, client_id))
        db = open_database(self.target, readonly=True)
        try:
            return db.clients(search) if per_client else db.search(search)
        finally:
            db.close()

    def clients(self, search: Search) -> list[dict[str, Any]]:
        """Per-client counts within ``search``'s filters (see Database.clients)."""
        return self.search(search, per_client=True)

    # The writer thread.

    def _run(self) -> None:
        pending: list[tuple[Any, ...]] = []
        stop = False
        next_prune = 0.0
        try:
            # Connect (making the table) before the first record, so that a search finds
            # the database as soon as the server answers.
            self._ensure_db(False)
            while True:
                if not pending and not stop:
                    stop = self._take(pending)
                due = pending or time.monotonic() >= next_prune
                if due and not self._ensure_db(stop):
                    if stop:
                        break
                    continue
                if pending and self._write(pending):
                    pending = []
                if time.monotonic() >= next_prune and self._db is not None:
                    self._prune()
                    next_prune = time.monotonic() + PRUNE_INTERVAL
                if stop and (not pending or self._stopping.is_set()):
                    break
        except Exception:  # a bug here must not pass silently
            log.exception("query store: the writer stopped")
        finally:
            lost = len(pending) + sum(1 for item in _drain(self._queue) if item is not _STOP)
            if lost:
                self.drops["shutdown"] += lost
                log.warning("query store: %d records not written at shutdown", lost)
            if self._db is not None:
                self._db.close()
                self._db = None

    def _take(self, pending: list[tuple[Any, ...]]) -> bool:
        """Fill ``pending`` with up to one batch of rows; True when told to stop."""
        try:
            item = self._queue.get(timeout=PRUNE_INTERVAL)
        except queue.Empty:
            return False
        if self._queue.qsize() < _MAX_BATCH and not self._closed:
            # Let a batch gather: each wake-up of this thread is a request for the GIL
            # that the event loop must answer, and each batch a transaction.
            time.sleep(GATHER)
        while item is not _STOP:
            pending.append(self._row(item))
            if len(pending) >= _MAX_BATCH:
                return False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
        return True

    def _ensure_db(self, stopping: bool) -> bool:
        """Connect if not connected, backing off after failures; False while it fails."""
        delay = BACKOFF[0]
        while self._db is None:
            try:
                self._db = open_database(self.target)
            except Exception as exc:
                if not self._reported:  # once per outage, not once per attempt
                    log.error("query store: cannot reach %s: %s; retrying", self._label(), exc)
                    self._reported = True
                self.connected = False
                if stopping or self._stopping.wait(delay):
                    return False
                delay = min(delay * 2, BACKOFF[1])
                continue
            if not self.connected:
                log.info("query store: writing to %s", self._label())
            self.connected = True
            self._reported = False
        return True

    def _write(self, rows: list[tuple[Any, ...]]) -> bool:
        """Insert ``rows``; True when done with them (written, or dropped as refused)."""
        assert self._db is not None
        for attempt in range(_ATTEMPTS):
            try:
                self._db.insert(rows)
            except Exception as exc:
                log.warning("query store: insert failed (%s); reconnecting", exc)
                self._disconnect()
                if attempt + 1 == _ATTEMPTS or not self._ensure_db(self._stopping.is_set()):
                    break
                continue
            self.rows += len(rows)
            return True
        if self.connected:  # the database is there and refuses these rows
            self.drops["error"] += len(rows)
            return True
        return False

    def _prune(self) -> None:
        assert self._db is not None
        try:
            self.pruned += self._db.prune(self.config.max_age, self.config.max_rows, time.time())
        except Exception as exc:
            log.warning("query store: retention failed (%s)", exc)
            self._disconnect()

    def _disconnect(self) -> None:
        db, self._db = self._db, None
        self.connected = False
        if db is not None:
            try:
                db.close()
            except Exception:  # closing a dead connection may fail too
                log.debug("query store: closing", exc_info=True)

    def _row(self, entry: tuple[Any, ...]) -> tuple[Any, ...]:
        """A record as a row. What is worked out per client (pseudonym, groups) and per
        name (reversed) is kept in bounded dicts: this runs for every record, on a thread
        that shares the GIL with the event loop."""
        (when, client, proto, qname, qtype, rcode, decision, list_id, rule, reference,
         upstream, duration) = entry[:12]  # fmt: skip
        known = self._clients.get(client)
        if known is None:
            if len(self._clients) >= _CACHED:
                self._clients.clear()
            known = self._clients[client] = self._client(client)
        rname = self._rnames.get(qname)
        if rname is None:
            if len(self._rnames) >= _CACHED:
                self._rnames.clear()
            rname = self._rnames[qname] = reversed_name(qname)
        ms = round(duration * 1000.0, 3) if duration is not None else None
        client_id = entry[12] if len(entry) > 12 else None
        if client_id is not None and self.key is not None:
            client_id = pseudonym(self.key, client_id)  # an id names a device as an address does
        return (when, known[0], known[1], proto, qname, rname, qtype, rcode,
                decision, list_id, rule, reference, upstream, ms, client_id)  # fmt: skip

    def _client(self, client: str) -> tuple[str, str]:
        """The client as stored (its pseudonym with a key) and its groups (``,a,b,``)."""
        mask = self._groups.mask_of(client)
        groups = "," + "".join(f"{name}," for name, bit in self._group_names if mask & bit)
        return (pseudonym(self.key, client) if self.key is not None else client), groups

    def _label(self) -> str:
        return "PostgreSQL" if self.config.kind == "postgresql" else self.target


def _drain(q: queue.SimpleQueue[Any]) -> Iterator[Any]:
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return


class AuditTee:
    """The JSON-lines log and the query store as one audit sink. The query path puts a
    record on the log's queue only; the log's writer hands each batch to the store
    (:meth:`QueryStore.offer`), so that a second sink costs answering nothing."""

    def __init__(self, log_: AuditLog, store: QueryStore) -> None:
        self.log = log_
        self.store = store
        log_.also = store.offer

    @property
    def record(self) -> Callable[..., None]:
        return self.log.record

    @property
    def dropped(self) -> int:
        """The JSON-lines log's drops (the store's have metrics of their own)."""
        return self.log.dropped

    def wants(self, decision: str) -> bool:
        return self.log.wants(decision)

    def start(self) -> None:
        self.log.start()
        self.store.start()

    def close(self, timeout: float = 5.0) -> None:
        self.log.close(timeout)  # hands its last batches to the store
        self.store.close(timeout)


def find_store(audit: object) -> QueryStore | None:
    """The query store among the resolver's audit sinks, if there is one."""
    if isinstance(audit, QueryStore):
        return audit
    if isinstance(audit, AuditTee):
        return audit.store
    return None


class _Source(Protocol):
    @property
    def resolver(self) -> Any: ...


class StoreCollector(Collector):
    """``resolver_store_*``: rows written, records dropped by reason, queue, connection."""

    def __init__(self, source: _Source) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        resolver = self.source.resolver
        store = find_store(resolver.audit if resolver is not None else None)
        if store is None:
            return
        yield CounterMetricFamily(
            "resolver_store_rows", "Audit records written to the query store.", value=store.rows
        )
        dropped = CounterMetricFamily(
            "resolver_store_dropped",
            "Audit records the query store lost: full (queue full, e.g. while the database "
            "is away), error (rows the database refused), shutdown (not written at exit).",
            labels=["reason"],
        )
        for reason, count in store.drop_counts().items():
            dropped.add_metric([reason], count)
        yield dropped
        yield CounterMetricFamily(
            "resolver_store_pruned", "Rows deleted by retention.", value=store.pruned
        )
        yield GaugeMetricFamily(
            "resolver_store_queue", "Records waiting for the store's writer.", value=store.queued()
        )
        yield GaugeMetricFamily(
            "resolver_store_up",
            "1 while the query store's database is connected.",
            value=1 if store.connected else 0,
        )
