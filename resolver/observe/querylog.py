"""The audit log: one JSON object per line for each logged query, written off the hot path.

The security team uses this log to say which machines tried to reach a banned service, so
every blocked (and monitored, would-block) query can be recorded with the client, the name,
the list and the rule that matched. The resolver answers on the order of 100k queries per
second on one core, so logging must never slow or stop answering:

* :meth:`AuditLog.record` only puts a tuple on a bounded in-memory queue. It never blocks and
  never raises; when the queue is full the entry is counted in :attr:`AuditLog.dropped` and
  discarded (losing a log line is better than delaying an answer).
* A daemon thread formats the lines (JSON, time stamps, pseudonyms), writes them in batches
  and rotates the file by size. I/O errors are counted as drops and reported once; the thread
  keeps going and reopens the file on the next batch.

Line format (keys in this order, keys whose value is absent are left out)::

    {"time":"2026-11-28T21:30:00.123Z","client":"10.1.2.3","proto":"udp",
     "qname":"chat.deepseek.com.","qtype":"A","rcode":"NOERROR","decision":"blocked",
     "list":"ai-services","rule":"deepseek.com","reference":"Directive 2026-07",
     "upstream":"9.9.9.9:53","duration_ms":0.412}

``proto`` is the transport: udp, tcp, dot, doh or doq. A query over an encrypted
connection that named its client (DoH path ``/dns-query/{id}``, TLS server name
``{id}.{tls.client_id_domain}``) has ``"client_id":"{id}"`` right after ``client``.

Pseudonymisation: with ``pseudonymize_key`` set, ``client`` is ``anon-`` followed by the first
16 hex digits of HMAC-SHA256(key, address), and ``client_id`` likewise of the id. The same
address always gives the same pseudonym under one key, so reports still group by client, but
without the key the pseudonym cannot be linked back to an address. A consequence: filtering
a report by network (``resolver audit --client 10.0.0.0/8``) no longer works on such a log,
since the addresses are gone.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import hmac
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any, Final, TextIO

from ..core.outcome import BLOCKED_OUTCOMES
from ..core.outcome import DECISIONS as ALL_DECISIONS
from ..defaults import DEFAULT_AUDIT_KEEP, DEFAULT_AUDIT_MAX_BYTES, DEFAULT_AUDIT_QUEUE_SIZE

log = logging.getLogger("resolver.audit")

SINKS: Final = ("off", "stdout", "file")
WHATS: Final = ("all", "blocked")
DECISIONS: Final = frozenset(ALL_DECISIONS)
# What ``what: blocked`` keeps: queries the policy stopped, and those it would have stopped.
BLOCKED_DECISIONS: Final = BLOCKED_OUTCOMES

DEFAULT_MAX_BYTES: Final = DEFAULT_AUDIT_MAX_BYTES
DEFAULT_KEEP: Final = DEFAULT_AUDIT_KEEP
DEFAULT_QUEUE_SIZE: Final = DEFAULT_AUDIT_QUEUE_SIZE

# The writer takes at most this many entries per batch, so that one flush never holds an
# unbounded amount of formatted text in memory.
_MAX_BATCH: Final = 10_000
# Pseudonyms are cached (HMAC costs about a microsecond); the cache is emptied when it grows
# past this so that a scan from many addresses cannot grow memory without bound.
_PSEUDONYM_CACHE: Final = 65_536
# Put on the queue by close(); tells the writer to finish the batch and stop.
_STOP: Final = object()


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """Where the audit log goes and what it holds (the ``audit:`` section of the config)."""

    sink: str = "off"  # "off" | "stdout" | "file"
    path: Path | None = None  # for sink "file"
    what: str = "blocked"  # "all" (every query) | "blocked" (blocked and monitored only)
    max_bytes: int = DEFAULT_MAX_BYTES  # rotate the file when it would exceed this
    keep: int = DEFAULT_KEEP  # rotated files kept: path.1 ... path.<keep>
    pseudonymize_key: str | None = None  # when set, clients become keyed hashes
    queue_size: int = DEFAULT_QUEUE_SIZE


def pseudonym(key: bytes, address: str) -> str:
    """``anon-`` and the first 16 hex digits of HMAC-SHA256(key, address)."""
    return "anon-" + hmac.new(key, address.encode(), hashlib.sha256).hexdigest()[:16]


class AuditLog:
    """A non-blocking audit log: :meth:`record` queues, a daemon thread writes.

    ``stream`` replaces ``sys.stdout`` for sink ``stdout`` (tests use it).
    """

    def __init__(self, config: AuditConfig, stream: TextIO | None = None) -> None:
        if config.sink not in SINKS:
            raise ValueError(f"audit sink must be one of {', '.join(SINKS)}, not {config.sink!r}")
        if config.what not in WHATS:
            raise ValueError(f"audit 'what' must be one of {', '.join(WHATS)}")
        if config.sink == "file" and config.path is None:
            raise ValueError("audit sink 'file' needs a path")
        self.config = config
        self.written = 0
        # Two drop counters, each written by one thread only, so that neither loses counts
        # to a racing read-modify-write; ``dropped`` adds them up.
        self._dropped_full = 0  # the hot path: queue full, or recorded after close()
        self._dropped_io = 0  # the writer: I/O or formatting errors
        self._enabled = config.sink != "off"
        self._wanted = DECISIONS if config.what == "all" else BLOCKED_DECISIONS
        self._limit = max(1, config.queue_size)
        # SimpleQueue rather than queue.Queue: its put is implemented in C without a
        # condition variable, about 0.1 us against 0.8 us, and the hot path pays it on every
        # logged query. The bound is checked with qsize() before put: exact with one producer
        # (the event loop), over by at most one entry per extra producing thread.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stream: TextIO | None = None
        if config.sink == "stdout":
            self._stream = stream if stream is not None else sys.stdout
        self._file: Any = None  # the open binary file, or None until opened / after an error
        self._size = 0  # bytes in the current file
        self._failing = False  # an I/O error was reported and the sink has not recovered
        self._lost_while_failing = 0
        self._format_error_reported = False
        self._thread: threading.Thread | None = None
        self._closed = False
        self._key = config.pseudonymize_key.encode() if config.pseudonymize_key else None
        self._pseudonyms: dict[str, str] = {}
        self._second = -1  # the whole second whose text is in _second_text
        self._second_text = ""
        #: Given each batch on the writer thread, after it is written: the query store
        #: (observe/store.py) takes the records from here, at no cost to the query path.
        self.also: Callable[[list[tuple[Any, ...]]], None] | None = None

    @property
    def dropped(self) -> int:
        """Entries lost: queue full, recorded after close, or not written because of errors."""
        return self._dropped_full + self._dropped_io

    def wants(self, decision: str) -> bool:
        """Whether entries with this decision are logged; the hot path asks before building one."""
        return self._enabled and decision in self._wanted

    def record(
        self,
        when: float,
        client: str,
        proto: str,
        qname: str,
        qtype: str,
        rcode: str,
        decision: str,
        list_id: str | None = None,
        rule: str | None = None,
        reference: str | None = None,
        upstream: str | None = None,
        duration: float | None = None,
        client_id: str | None = None,
    ) -> None:
        """Queue one entry. Never blocks, never raises; counts the entry dropped if full.

        ``when`` is a Unix time, ``duration`` seconds; ``client_id`` the client's id on an
        encrypted connection (DoH path, TLS server name), if any. Decisions this log does not
        want are ignored, so a caller that skipped :meth:`wants` still gets a consistent log.
        """
        if not self._enabled or decision not in self._wanted:
            return
        if self._closed or self._queue.qsize() >= self._limit:
            self._dropped_full += 1
            return
        self._queue.put(
            (
                when,
                client,
                proto,
                qname,
                qtype,
                rcode,
                decision,
                list_id,
                rule,
                reference,
                upstream,
                duration,
                client_id,
            )
        )

    def start(self) -> None:
        """Start the writer thread (a daemon, so that it never holds up the process exit)."""
        if not self._enabled or self._thread is not None or self._closed:
            return
        self._thread = threading.Thread(target=self._run, name="audit-log", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, stop the writer and close the file.

        Waits at most ``timeout`` seconds for a stalled writer; the thread is a daemon, so a
        sink that hangs (a full pipe, a dead network file system) cannot hang shutdown.
        """
        if self._closed:
            return
        self._closed = True
        if not self._enabled:
            return
        self._queue.put(_STOP)
        if self._thread is None:
            # Never started: write the queued entries here rather than lose them.
            self._run()
        else:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning(
                    "audit log: the writer did not finish within %.1f s; about %d queued "
                    "entries may not be written",
                    timeout,
                    self._queue.qsize(),
                )

    # The writer thread.

    def _run(self) -> None:
        stop = False
        try:
            while not stop:
                batch: list[tuple[Any, ...]] = []
                item = self._queue.get()
                while True:
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)
                    if len(batch) >= _MAX_BATCH:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    try:
                        self._write_batch(batch)
                    except Exception:  # a bug here must not end the audit log for good
                        self._dropped_io += len(batch)
                        log.exception("audit log: unexpected error; %d entries lost", len(batch))
                    if self.also is not None:
                        self.also(batch)
        finally:
            self._close_file()

    def _write_batch(self, batch: list[tuple[Any, ...]]) -> None:
        lines: list[str] = []
        for entry in batch:
            try:
                lines.append(self._format(entry))
            except Exception as exc:  # a caller passed a value of the wrong type
                self._dropped_io += 1
                if not self._format_error_reported:
                    # Once: a caller bug would otherwise log an error per query. The entry is
                    # not shown, as it holds the client address the log may be hiding.
                    self._format_error_reported = True
                    log.error("audit log: cannot format an entry (dropped): %r", exc)
        if not lines:
            return
        before = self.written
        try:
            if self._stream is not None:
                self._stream.write("".join(lines))
                self._stream.flush()
                self.written += len(lines)
            else:
                self._write_file(lines)
        except Exception as exc:  # OSError mostly; any error must leave the thread alive
            self._fail(exc, len(lines) - (self.written - before))
            return
        if self._failing:
            self._failing = False
            log.warning("audit log: writing again; %d entries were lost", self._lost_while_failing)
            self._lost_while_failing = 0

    def _write_file(self, lines: list[str]) -> None:
        """Append ``lines`` to the file, rotating between lines so that none is ever split."""
        if self._file is None:
            self._open()
        limit = self.config.max_bytes
        chunk: list[bytes] = []
        chunk_size = 0
        for text in lines:
            data = text.encode()
            if self._size + chunk_size + len(data) > limit and self._size + chunk_size > 0:
                # This line would push the file over the limit: finish the file with what
                # fits, then start a new one. A line longer than the limit on its own still
                # goes into a file of its own rather than being lost.
                if chunk:
                    self._write_chunk(chunk, chunk_size)
                    chunk, chunk_size = [], 0
                self._rotate()
            chunk.append(data)
            chunk_size += len(data)
        if chunk:
            self._write_chunk(chunk, chunk_size)

    def _write_chunk(self, chunk: list[bytes], size: int) -> None:
        # The file is unbuffered, so a line counts as written once write() returned for it;
        # a short write (a disk filling up) is continued until it fails.
        data = memoryview(b"".join(chunk))
        while data:
            data = data[self._file.write(data) :]
        self._size += size
        self.written += len(chunk)

    def _fail(self, exc: BaseException, lost: int) -> None:
        """Count ``lost`` entries, report the first error of a run of errors, drop the file."""
        self._dropped_io += lost
        self._lost_while_failing += lost
        if not self._failing:
            self._failing = True
            # Once per run of failures: a full disk would otherwise log an error per batch.
            target = self.config.path if self._stream is None else "stdout"
            log.error(
                "audit log: cannot write to %s: %s; entries are dropped until it works again",
                target,
                exc,
            )
        if self._file is not None:
            # Cut off any part of a line a failed write left, so that the file holds only
            # whole lines when writing resumes.
            with contextlib.suppress(OSError):
                os.ftruncate(self._file.fileno(), self._size)
        # Reopen on the next batch: the directory may have been created, the disk freed.
        self._close_file()

    def _open(self) -> None:
        path = self.config.path
        assert path is not None  # checked in __init__
        path.parent.mkdir(parents=True, exist_ok=True)
        # Binary append, unbuffered: sizes are counted in bytes, and each batch is already
        # joined into one write, so a buffer would only hide which lines reached the file.
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - kept open across batches
        self._size = os.fstat(self._file.fileno()).st_size

    def _rotate(self) -> None:
        """path -> path.1 -> path.2 ... -> path.<keep>; older ones are deleted."""
        path = self.config.path
        assert path is not None
        keep = self.config.keep
        self._close_file()
        # Files beyond ``keep`` (left by a run with a larger keep) would never be cleaned up.
        for old in path.parent.glob(glob.escape(path.name) + ".*"):
            number = old.name[len(path.name) + 1 :]
            if number.isdigit() and int(number) > keep:
                old.unlink()
        if keep <= 0:
            path.unlink(missing_ok=True)
        else:
            for n in range(keep - 1, 0, -1):
                source = _numbered(path, n)
                if source.exists():
                    os.replace(source, _numbered(path, n + 1))
            if path.exists():
                os.replace(path, _numbered(path, 1))
        self._open()

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:
                log.error("audit log: closing %s: %s", self.config.path, exc)

    def _format(self, entry: tuple[Any, ...]) -> str:
        """One JSON line, built by hand: about twice as fast as a JSON encoder given a dict."""
        (when, client, proto, qname, qtype, rcode, decision, list_id, rule, reference,
         upstream, duration) = entry[:12]  # fmt: skip
        client_id = entry[12] if len(entry) > 12 else None
        # Microseconds rounded first, then truncated to milliseconds, as datetime does.
        second, ms = divmod(round(when * 1_000_000) // 1000, 1000)
        if second != self._second:
            # Most lines of a batch fall in the same second: format it once.
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        if self._key is not None:
            client = self._pseudonym(client)
            if client_id is not None:
                # A client id names a device or a person as an address does.
                client_id = self._pseudonym(client_id)
        enc = encode_basestring_ascii  # escapes quotes, controls and non-ASCII; C-accelerated
        line = f'{{"time":"{self._second_text}.{ms:03d}Z","client":{enc(client)},'
        if client_id is not None:
            line += f'"client_id":{enc(client_id)},'
        line += (
            f'"proto":{enc(proto)},"qname":{enc(qname)},"qtype":{enc(qtype)},'
            f'"rcode":{enc(rcode)},"decision":{enc(decision)}'
        )
        if list_id is not None:
            line += ',"list":' + enc(list_id)
        if rule is not None:
            line += ',"rule":' + enc(rule)
        if reference is not None:
            line += ',"reference":' + enc(reference)
        if upstream is not None:
            line += ',"upstream":' + enc(upstream)
        # NaN and infinities are not JSON; a clock oddity must not make the line unreadable.
        if duration is not None and math.isfinite(duration):
            line += f',"duration_ms":{duration * 1000.0:.3f}'
        return line + "}\n"

    def _pseudonym(self, address: str) -> str:
        cached = self._pseudonyms.get(address)
        if cached is None:
            assert self._key is not None
            if len(self._pseudonyms) >= _PSEUDONYM_CACHE:
                self._pseudonyms.clear()
            cached = self._pseudonyms[address] = pseudonym(self._key, address)
        return cached


def _numbered(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")
