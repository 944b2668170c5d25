"""``--workers N``: N processes answering on the same addresses (SO_REUSEPORT).

The process started by ``resolver serve`` is worker 0, the *primary*: it binds first, then
starts workers 1..N-1 as child processes (``python -m resolver serve ... --worker-child``)
that bind the same addresses with SO_REUSEPORT, so the kernel spreads queries across them:
each UDP datagram to a worker picked at random (:func:`spread_datagrams`), not by a hash
of the client's address and port, so that a few busy clients load every worker alike.
Each worker loads the policy itself and keeps its own cache.

Only the primary does what must happen once: the admin API and /metrics, the audit log
file, the file watcher and the remote-list refresher. It talks to each child over a private
socket pair (length-prefixed pickles; both ends are this program):

- every reload the primary makes (file edit, SIGHUP, ``POST /v1/reload``, a remote list
  that changed) is then made by every worker, and waited for, so a policy change reaches
  them all (and ``POST /v1/reload`` answers once it has);
- a scrape of /metrics first asks every worker for its counts and adds them up;
- a cache flush from the admin API is done by every worker;
- children send their audit entries to the primary, which writes the one audit log.

A child that dies is started again (with backoff); a child whose primary is gone stops.
SIGTERM to the primary stops the children first, each draining its answers in progress.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

from ..observe.counts import Counts
from ..observe.querylog import BLOCKED_DECISIONS, DECISIONS, AuditConfig

if TYPE_CHECKING:
    from ..core.account import AuditSink
    from ..core.pipeline import Resolver

log = logging.getLogger("resolver")

FRAME = struct.Struct("!I")
#: Seconds a child has to load its policy and bind before the start counts as failed.
START_TIMEOUT = 60.0
#: Seconds to wait for each child's counts when /metrics is scraped.
ASK_TIMEOUT = 2.0
#: A child dying within this many seconds of its start waits before the next try, doubling.
RESTART_BACKOFF = (1.0, 30.0)
#: Audit entries a child sends in one message, and how often it sends them.
AUDIT_BATCH = 512
AUDIT_INTERVAL = 0.2


#: setsockopt(SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF) (Linux 4.5), and the classic BPF
#: instructions of the program it attaches: A = a random number; A %= workers; return A.
_SO_ATTACH_REUSEPORT_CBPF: Final = 51
_BPF_LD_RANDOM: Final = (0x20, 0, 0, (-0x1000 + 56) & 0xFFFFFFFF)  # LD|W|ABS, SKF_AD_RANDOM
_BPF_MOD_K: Final = 0x94  # ALU|MOD|K
_BPF_RET_A: Final = (0x16, 0, 0, 0)  # RET|A


def spread_datagrams(sock: socket.socket, workers: int) -> bool:
    """Have the kernel hand each datagram to one of the ``workers`` sockets of the
    reuse-port group ``sock`` belongs to at random, not by a hash of the sender's address
    and port: a few busy clients (a NAT, a forwarding resolver, a load generator's four
    sockets) then load every worker alike, where the hash gave one worker three flows
    of four as often as not, and the workers' sum was that busiest one's share of it.
    (DNS over UDP needs no affinity: each query stands alone, and the answer leaves
    from the same address and port whichever worker sends it.) While fewer than
    ``workers`` sockets are in the group, the kernel falls back to its hash for the
    numbers beyond them. False (nothing changed) where the system does not take it."""
    if workers < 2 or not hasattr(socket, "SO_REUSEPORT"):
        return False
    import ctypes  # (here: only a primary with workers needs it)

    program = b"".join(
        struct.pack("=HBBI", *insn)
        for insn in (_BPF_LD_RANDOM, (_BPF_MOD_K, 0, 0, workers), _BPF_RET_A)
    )
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HP", len(program) // 8, ctypes.addressof(buffer))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        log.info("datagrams spread across workers by the kernel's hash: %s", exc)
        return False
    return True


class Channel:
    """One end of the socket pair: framed pickled messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    def send(self, message: tuple[Any, ...]) -> None:
        if self.writer.is_closing():
            return
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(FRAME.pack(len(data)) + data)

    async def receive(self) -> tuple[Any, ...]:
        """The next message; raises IncompleteReadError when the other end is gone."""
        size = FRAME.unpack(await self.reader.readexactly(FRAME.size))[0]
        message: tuple[Any, ...] = pickle.loads(await self.reader.readexactly(size))
        return message

    def close(self) -> None:
        self.writer.close()


@dataclass
class Child:
    """The primary's view of one child worker."""

    index: int
    process: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    #: The latest counts of the running process, and the sum of its dead predecessors'.
    counts: Counts = field(default_factory=Counts)
    base: Counts = field(default_factory=Counts)
    started_at: float = 0.0
    restarts: int = 0
    policy: str | None = None
    last_reload_error: str | None = None
    pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def status(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": self.process.pid if self.process else None,
            "alive": self.alive,
            "ready": self.ready.is_set(),
            "restarts": self.restarts,
            "answers": (self.base + self.counts).answered,
            "policy": self.policy,
            "last_reload_error": self.last_reload_error,
        }


class Supervisor:
    """In the primary: starts, watches, asks and stops the child workers."""

    def __init__(
        self,
        count: int,
        argv: Callable[[], Sequence[str]],
        audit: Callable[[], AuditSink | None],
    ) -> None:
        #: The primary's audit log (None while off), which writes the children's entries.
        self.audit = audit
        self.argv = argv
        self.children = [Child(i) for i in range(1, count)]
        self.stopping = False
        #: Set once every child has started: from then on a dead child is started again.
        self.started = False
        self._seq = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Start every child and wait until each answers; raise RuntimeError if one fails."""
        for child in self.children:
            await self._spawn(child)
        for child in self.children:
            if not await self._wait_ready(child, START_TIMEOUT):
                raise RuntimeError(
                    f"worker {child.index} did not start (exit code "
                    f"{child.process.returncode if child.process else None}; see its log above)"
                )
        self.started = True

    async def _wait_ready(self, child: Child, timeout: float) -> bool:
        waiter = asyncio.ensure_future(child.ready.wait())
        assert child.process is not None
        exited = asyncio.ensure_future(child.process.wait())
        done, _ = await asyncio.wait(
            (waiter, exited), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()
        if exited not in done:
            exited.cancel()
        return child.ready.is_set() and child.alive

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spawn(self, child: Child) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            argv = [
                *self.argv(),
                "--worker-child",
                str(theirs.fileno()),
                "--worker-index",
                str(child.index),
            ]
            child.ready = asyncio.Event()
            child.process = await asyncio.create_subprocess_exec(
                sys.executable, *argv, pass_fds=(theirs.fileno(),)
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        child.started_at = time.monotonic()
        child.channel = await Channel.open(ours)
        log.info("worker %d started (pid %d)", child.index, child.process.pid)
        self._spawn_task(self._read(child, child.channel))
        self._spawn_task(self._watch(child, child.process))

    async def _watch(self, child: Child, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        for future in child.pending.values():
            if not future.done():
                future.set_result(None)
        child.pending.clear()
        child.ready.clear()
        if self.stopping or not self.started:
            return  # during the first start, a dead child fails the start instead
        lived = time.monotonic() - child.started_at
        low, high = RESTART_BACKOFF
        delay = 0.0 if lived > high else min(high, low * 2 ** min(child.restarts, 5))
        log.error(
            "worker %d (pid %d) exited with code %s; starting it again in %.0f s",
            child.index,
            process.pid,
            code,
            delay,
        )
        await asyncio.sleep(delay)
        if self.stopping:
            return
        child.restarts += 1
        # What the dead process counted is kept, so that counters never go backwards; the
        # new process counts from zero on top. Its gauges (cache size...) died with it.
        dead = child.counts
        dead.cache_entries = dead.ratelimit_clients = dead.tcp_connections = 0
        dead.dot_connections = dead.dot_handshaking = dead.doh_connections = 0
        dead.udp_receive_queued.clear()
        dead.udp_receive_buffer.clear()
        child.base = child.base + child.counts
        child.counts = Counts()
        try:
            await self._spawn(child)
        except OSError as exc:
            log.error("cannot start worker %d again: %s", child.index, exc)

    async def _read(self, child: Child, channel: Channel) -> None:
        try:
            while True:
                message = await channel.receive()
                self._dispatch(child, message)
        except (asyncio.IncompleteReadError, ConnectionError, EOFError):
            pass
        finally:
            channel.close()

    def _dispatch(self, child: Child, message: tuple[Any, ...]) -> None:
        verb = message[0]
        if verb == "ready":
            child.policy = message[1]
            child.ready.set()
        elif verb == "reply":
            future = child.pending.pop(message[1], None)
            if future is not None and not future.done():
                future.set_result(message[2])
        elif verb == "audit":
            audit = self.audit()
            if audit is not None:
                for entry in message[1]:
                    audit.record(*entry)

    def live(self) -> list[Child]:
        return [c for c in self.children if c.alive and c.channel is not None]

    async def reload(self, digest: str) -> bool:
        """Have every child reload as the primary just did; False if one failed or loaded
        another policy than ``digest`` (a file changed between the loads)."""
        live = self.live()
        answers = await self.ask("reload", timeout=START_TIMEOUT)
        agreed = True
        for child, answer in zip(live, answers, strict=True):
            if answer is None:
                log.error("worker %d did not report its reload in time", child.index)
                agreed = False
                continue
            ok, child.policy, child.last_reload_error = answer
            if not ok:
                log.error("worker %d: reload failed: %s", child.index, child.last_reload_error)
                agreed = False
            elif child.policy != digest:
                log.warning(
                    "worker %d loaded policy %s, worker 0 has %s (a file changed between "
                    "the two loads; the next reload settles it)",
                    child.index,
                    child.policy,
                    digest,
                )
                agreed = False
        return agreed

    async def ask(self, verb: str, *args: Any, timeout: float = ASK_TIMEOUT) -> list[Any]:
        """Ask every live child; their answers (None for a child that did not answer)."""
        loop = asyncio.get_running_loop()
        futures = []
        for child in self.live():
            assert child.channel is not None
            seq = next(self._seq)
            future: asyncio.Future[Any] = loop.create_future()
            child.pending[seq] = future
            child.channel.send(("ask", seq, verb, *args))
            futures.append((child, seq, future))
        if not futures:
            return []
        await asyncio.wait([f for _, _, f in futures], timeout=timeout)
        out = []
        for child, seq, future in futures:
            child.pending.pop(seq, None)
            out.append(future.result() if future.done() else None)
        return out

    async def refresh_counts(self) -> None:
        """Ask every child for its counts (for a scrape of /metrics)."""
        live = self.live()
        answers = await self.ask("counts")
        for child, counts in zip(live, answers, strict=False):
            if counts is not None:
                child.counts = counts

    def total(self) -> Counts:
        """What the children counted, added up (as of the last :meth:`refresh_counts`)."""
        total = Counts()
        for child in self.children:
            total = total + child.base + child.counts
        return total

    async def stop(self, grace: float) -> None:
        """SIGTERM every child, wait for them to drain and exit, then kill what is left."""
        self.stopping = True
        procs = [c.process for c in self.children if c.process and c.process.returncode is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        if procs:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=grace)
            for proc in procs:
                if proc.returncode is None:
                    log.warning(
                        "worker (pid %d) did not stop in %.0f s; killing it", proc.pid, grace
                    )
                    proc.kill()
                    await proc.wait()
        for child in self.children:
            if child.channel is not None:
                child.channel.close()
        for task in list(self._tasks):
            task.cancel()


class RelayAudit:
    """A child's audit log: entries go to the primary, which writes the one log file.

    Same interface as :class:`~resolver.observe.querylog.AuditLog` as far as the query path goes.
    """

    def __init__(self, config: AuditConfig, channel: Channel) -> None:
        self.channel = channel
        self._enabled = config.sink != "off"
        self._wanted = DECISIONS if config.what == "all" else BLOCKED_DECISIONS
        self._limit = max(1, config.queue_size)
        self._batch: list[tuple[Any, ...]] = []
        self._dropped = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def dropped(self) -> int:
        return self._dropped

    def wants(self, decision: str) -> bool:
        return self._enabled and decision in self._wanted

    def record(self, *entry: Any) -> None:
        if not self._enabled or entry[6] not in self._wanted:
            return
        if len(self._batch) >= self._limit:
            self._dropped += 1
            return
        self._batch.append(entry)

    def start(self) -> None:
        if self._enabled and self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(AUDIT_INTERVAL)
            self.flush()

    def flush(self) -> None:
        while self._batch:
            self.channel.send(("audit", self._batch[:AUDIT_BATCH]))
            del self._batch[:AUDIT_BATCH]

    def close(self, timeout: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
        self.flush()


class Worker(Protocol):
    """What a child's link serves the primary from (the server provides it)."""

    @property
    def resolver(self) -> Resolver | None: ...

    @property
    def stopping(self) -> asyncio.Event: ...

    def counts(self) -> Counts: ...

    async def reload(self) -> bool: ...


class WorkerLink:
    """In a child: the channel to the primary, and what the child does when asked."""

    def __init__(self, fd: int, index: int) -> None:
        self.fd = fd
        self.index = index
        self.channel: Channel | None = None

    async def open(self) -> Channel:
        self.channel = await Channel.open(socket.socket(fileno=self.fd))
        return self.channel

    async def serve(self, server: Worker) -> None:
        """Answer the primary until it is gone (then stop this worker)."""
        channel = self.channel
        assert channel is not None and server.resolver is not None
        channel.send(("ready", server.resolver.policy.digest))
        handling: set[asyncio.Task[None]] = set()
        try:
            while True:
                message = await channel.receive()
                # Each in a task of its own: a reload of a large policy must not hold up
                # the answer to a scrape's request for counts.
                task = asyncio.ensure_future(self._handle(server, channel, message))
                handling.add(task)
                task.add_done_callback(handling.discard)
        except (asyncio.IncompleteReadError, ConnectionError, EOFError):
            if not server.stopping.is_set():
                log.error("worker %d: the first worker is gone; stopping", self.index)
                server.stopping.set()

    async def _handle(self, server: Worker, channel: Channel, message: tuple[Any, ...]) -> None:
        resolver = server.resolver
        assert resolver is not None
        verb = message[0]
        if verb == "ask":
            seq, what, *args = message[1:]
            answer: Any = None
            if what == "reload":
                ok = await server.reload()
                answer = (ok, resolver.policy.digest, resolver.stats.last_reload_error)
            elif what == "counts":
                answer = server.counts()  # a child has no supervisor: its own counts
            elif what == "flush":
                answer = resolver.cache.flush(args[0])
                resolver.forget_answers()
            channel.send(("reply", seq, answer))


def child_argv(
    config_path: str | None,
    upstreams: Sequence[str] | None,
    blocklists: str | None,
    log_level: str | None,
    listens: Sequence[str],
) -> list[str]:
    """The command line of a child worker: the primary's, with its bound addresses."""
    argv = ["-m", "resolver", "serve"]
    if config_path:
        argv += ["--config", os.path.abspath(config_path)]
    for upstream in upstreams or ():
        argv += ["--upstream", upstream]
    if blocklists:
        argv += ["--blocklists", os.path.abspath(blocklists)]
    if log_level:
        argv += ["--log-level", log_level]
    for listen in listens:
        argv += ["--listen", listen]
    return argv
