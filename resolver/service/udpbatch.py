"""Batched UDP on Linux: many datagrams per system call, with recvmmsg and sendmmsg.

A blocked name or a cache hit costs the resolver about 8 us of CPU, and 70% of that is the
kernel's: one recvmsg and one sendmsg a query, each a system call. Under load the socket
holds many queries at once; reading up to :data:`SLOTS` of them with one recvmmsg and
sending their answers with one sendmmsg takes about a fifth off the CPU of a query
(bench/core_bench.py). Python's socket module has neither call, so they go through ctypes
into the C library, on buffers made once per listener (service/udpslots.py).

The sender's address becomes a Python tuple only when something needs it: the access list
(an IPv4 address is looked up in a small cache by its 32-bit value) or the full path of
:meth:`Resolver.handle`. When the socket's send buffer is full, answers wait in a bounded
queue that a writer callback drains, as the loop's own transport would do.

Where resolver/_fastudp.c is built (setup.py builds it with any compiler at hand;
RESOLVER_FASTUDP=0 turns it off; the log says which loop runs), memo hits never enter the
interpreter: the socket's readable event is a C function (``_fastudp.event``, which calls
back into Python only for what it hands back) that reads a batch, answers the hits as
fast_answer would (access list, expiry, audit log; counts in the memo's per-slot arrays,
which AnswerMemo.fold adds) and sends. What it hands back is answered here as without
it: misses, what it cannot decide, answers too large for a slot (bench/instructions.py: a
repeated blocked name went from about 16,500 user-space instructions to 1,000). A blocked
name the memo does not hold yet is decided in C as well, from a view of the policy
(core/blockview.py, resolver/_fastblock.c), and kept in the memo, whose oldest entries C
evicts as AnswerMemo does when it is full: a distinct blocked name went from 58,000
instructions interpreted and 28,000 compiled to about 2,500 (2,900 with the memo full).

Where the calls are missing (not Linux, no C library that has them), :func:`available`
says so and the server uses :class:`.listeners.UDPListener`, the loop's datagram
transport, which does the same work one datagram at a time. So does ``udp.batch: false``.
A system that refuses the calls when they are made (a seccomp filter) gets a warning in
the log, and the listener goes on the plain way, one datagram at a time.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import importlib
import logging
import os
import socket
import sys
from collections import deque
from collections.abc import Container, Iterable
from typing import Any, Final

from ..core.guard import EVERYONE
from ..core.memo import FAST_BOUND, AnswerMemo, Memo
from ..core.stats import PROTO_UDP
from ..observe.counts import Counts
from .listeners import FastSource, Handler, Tasks, UDPListener
from .sockopts import receive_queue
from .udpslots import NAME_SIZE as _NAME_SIZE
from .udpslots import RECV_SIZE, SEND_SIZE, SLOTS, Buffers, sockaddr_tuple

log = logging.getLogger("resolver.transport")

#: recvmmsg calls per readable event: a flood holds the loop for about 1 ms at most
#: before upstream replies and TCP get their turn (the loop's own UDP transport reads up
#: to 32 datagrams an event).
ROUNDS: Final = 2
#: Answers that may wait for room in the socket's send buffer; beyond, they are dropped
#: (the client asks again), as a full queue anywhere on the path would.
MAX_QUEUED: Final = 4096

#: Datagrams read one by one in an event while the socket is quiet (see BatchListener);
#: a batch pays for itself from about three datagrams on.
_PLAIN_READS: Final = 4
_MSG_DONTWAIT: Final = 0x40
#: What a system that does not let the process make a call answers.
_REFUSED: Final = (errno.ENOSYS, errno.EPERM, errno.EACCES)


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        recv, send = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    recv.restype = ctypes.c_int
    send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    send.restype = ctypes.c_int
    return libc


_LIBC: Final = _libc()


def _fast_module() -> Any:
    """resolver._fastudp (the C loop and its sendmmsg of later answers), or None: not
    built (no compiler at install time), not Linux, or turned off with RESOLVER_FASTUDP=0."""
    if _LIBC is None or os.environ.get("RESOLVER_FASTUDP", "1") == "0":
        return None
    try:
        return importlib.import_module("resolver._fastudp")
    except ImportError:
        return None


_FAST: Final = _fast_module()
#: The C loop's entry point, or None.
_SERVE: Final = getattr(_FAST, "serve", None)
#: The C sendmmsg of answers from their own bytes to their raw addresses, or None.
_SEND: Final = getattr(_FAST, "send", None)
#: A readable event handled in C from start to end (its argument: FIXED there), or None.
_EVENT: Final = getattr(_FAST, "event", None)
#: Which loop answers memo hits in batches: "c" (resolver._fastudp) or "python".
ENGINE: Final = "c" if _SERVE is not None else "python"


def available() -> bool:
    """True where recvmmsg and sendmmsg can be called (Linux)."""
    return _LIBC is not None


class BatchListener(UDPListener):
    """One UDP socket served with recvmmsg and sendmmsg, on its own reader callback.

    Where the C loop serves it (resolver/_fastudp.c, with the memo's fast path on), every
    readable event is one call of that loop, a batch of one datagram or many: a quiet
    server's blocked name or cache hit costs 8,200 instructions that way against 25,000
    read the plain way, and a miss 2% more (bench/instructions.py --outstanding 1; a
    round trip takes the same 0.04-0.09 ms either way, bench/udplat.c at 1,000 and
    20,000 qps).

    Without it, a batch has a price of its own: two ctypes calls and the setup of the
    slots cost about 5 us more than a recvfrom and a sendto when the batch is one query,
    which is what a lightly loaded server sees (a round trip went from 25 to 31 us). So
    the Python loop reads a quiet socket the plain way, up to :data:`_PLAIN_READS`
    datagrams an event with recvfrom, each answered by
    :meth:`UDPListener.datagram_received` (the same fast path and full path). When that
    many were waiting, there is a backlog: the next events read batches, for as long as
    a batch holds that many or more."""

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        tasks: Tasks,
        fast: FastSource | None = None,
        slots: int = SLOTS,
    ) -> None:
        super().__init__(handler, tasks, fast)
        #: Whether the C event (resolver/_fastudp.c's event()) is this socket's reader;
        #: see _python_reads.
        self._c_event = False
        self.sock = sock
        #: Whether the next event reads a batch: always where the C loop serves, otherwise
        #: when the last read found a backlog (_PLAIN_READS datagrams or more).
        self._busy = _SERVE is not None and fast is not None
        #: False once the system refused a batch call (a seccomp filter, say): from then
        #: on every datagram is read and answered the plain way.
        self._batching = True
        self._loop = asyncio.get_running_loop()
        self._buffers = Buffers(slots)
        self._fd = sock.fileno()
        #: Answers waiting for room in the send buffer, with their addresses.
        self._queue: deque[tuple[bytes, Any]] = deque()
        #: Answers dropped with the queue full (resolver_udp_answers_dropped_total).
        self.answers_dropped = 0
        #: Answers from upstream waiting for the next flush, with their raw addresses.
        self._waiting: list[tuple[bytes, bytes]] = []
        self._writing = False
        self.closed = False
        sock.setblocking(False)
        #: The C loop's entry point (None: the Python loop answers every batch), and the
        #: C sendmmsg of later answers that comes with it.
        self._serve = _SERVE
        self._send = _SEND if _SERVE is not None else None
        b = self._buffers
        event = _EVENT if _SERVE is getattr(_FAST, "serve", None) else None
        if event is not None and self.fast is not None:
            # What resolver/_fastudp.c's event() reads (FIXED there), its argument: with
            # it, an event the C loop can serve runs no Python and looks up no attribute.
            # The memo's state is the list fast_state, whose contents its properties keep.
            fixed = (
                self._fd,
                b.recv_ptr,
                b.send_ptr,
                b.slots,
                ROUNDS,
                SEND_SIZE,
                b._hosts,
                b.fresh,
                b.misses,
                b.slow_slots,
                b.slow_times,
                EVERYONE,
                FAST_BOUND,
                self,
                self._queue,
                self.fast.fast_state,
                self.fast,
            )
            self._loop.add_reader(self._fd, event, fixed)
            self._c_event = True
        else:
            self._loop.add_reader(self._fd, self._readable)
        loop = "C (resolver._fastudp)" if ENGINE == "c" else "Python"
        host = sock.getsockname()[0]
        log.info("UDP on %s: batches, memo hits answered by the %s loop", host, loop)

    def stop_accepting(self) -> None:
        """Shutting down (see UDPListener): from now on the Python loop reads, and drops."""
        super().stop_accepting()
        self._python_reads()

    def _python_reads(self) -> None:
        """From now on, _readable reads this socket, not the C event, which serves
        without asking: shutting down, the C loop failed, or batch calls refused."""
        if self._c_event:
            self._c_event = False
            if not self.closed:
                self._loop.add_reader(self._fd, self._readable)

    def close(self) -> None:
        if self.closed:
            return
        self._flush()  # answers that came in this turn of the loop still go out
        self.closed = True
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
        self.sock.close()
        self._buffers.close()

    def _readable(self) -> None:
        if self._busy:
            self._batches()
            return
        recvfrom = self.sock.recvfrom
        for _read in range(_PLAIN_READS):
            try:
                data, addr = recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP errors for earlier answers: no reason to stop
                log.debug("UDP receive error: %s", exc)
                return
            self.datagram_received(data, addr)
        # As many waiting as were read: a backlog, which batches read more cheaply.
        self._busy = self._batching

    def _batches(self) -> None:
        fast = self.fast
        if self._serve is not None and fast is not None and self.accepting and not self.closed:
            memo, clients = fast.fast_memo, fast.fast_clients
            if memo is not None and (clients is EVERYONE or type(clients) is set):
                self._fast_batches(self._serve, fast, memo, clients)
                return
        assert _LIBC is not None
        recvmmsg = _LIBC.recvmmsg
        b = self._buffers
        fd, slots = self._fd, b.slots
        for _round in range(ROUNDS):
            count = recvmmsg(fd, b.recv_ptr, slots, _MSG_DONTWAIT, None)
            self._busy = count >= _PLAIN_READS
            if count <= 0:  # (a refusal ends the batches: see _recv_error)
                if count < 0:
                    self._recv_error(ctypes.get_errno())
                return
            if not self.accepting or self.closed:
                continue  # shutting down: read and drop, as UDPListener does
            ready = self._answer(range(count), 0)
            if ready:
                self._send_batch(ready)
            if count < slots:
                return

    def _fast_batches(
        self, serve: Any, fast: AnswerMemo, memo: Memo, clients: Container[str]
    ) -> None:
        """The batches of the C loop (resolver/_fastudp.c), and what it hands back:
        datagrams it left (misses; an IPv6 or uncached IPv4 sender under an access list;
        expired, audited or large answers), answers that found no room, pauses."""
        b = self._buffers
        allowed = None if clients is EVERYONE else clients  # (the C loop's "everyone")
        rounds = ROUNDS
        while rounds > 0:
            try:
                # (A plain call: star-unpacked groups would build a list and a tuple an event.)
                count, ready, sent, code, missed, absent, slow, used, decided, evicted = serve(
                    self._fd,
                    b.recv_ptr,
                    b.send_ptr,
                    b.slots,
                    rounds,
                    SEND_SIZE,
                    memo,
                    allowed,
                    b._hosts,
                    fast.fast_counts,
                    fast.fast_times,
                    fast.clock(),
                    FAST_BOUND,
                    b.misses,
                    b.slow_slots,
                    b.slow_times,
                    not self._queue,  # (earlier answers wait: these queue behind them)
                    b.fresh,
                    fast.fast_blocks,
                    fast.max_entries,
                    fast.max_bytes,
                )
            except Exception as exc:  # (out of memory, say): the batch is lost, never the listener
                self._serve_failed(exc)
                return
            rounds -= used
            if decided:
                fast.fast_decided += decided
                fast.evictions += evicted
            if count <= 0:  # (a refusal ends the batches: see _recv_error)
                if count < 0:
                    self._recv_error(code)
                return
            if slow or missed or absent or sent < ready:
                self._after(ready, sent, missed, absent, slow)
            if count < b.slots:
                return

    def _after(self, ready: int, sent: int, missed: int, absent: int, slow: int) -> None:
        """What the C loop handed back of a batch: its pauses (``slow``, counted one by
        one), the datagrams it left (``missed``, with those not in the memo, in b.fresh;
        or only those, ``absent``), and the ``ready`` answers in the send slots, of which
        ``sent`` went out. (Called by resolver/_fastudp.c's event() too.)"""
        fast, b = self.fast, self._buffers
        assert fast is not None
        for k in range(slow):
            fast.fast_hits += 1
            fast.slots[b.slow_slots[k]].count(fast.stats, PROTO_UDP, b.slow_times[k])
        if missed:  # (with those not in the memo, in b.fresh already)
            ready = self._answer(b.misses[:missed], ready)
        elif absent:  # not in the memo: straight to the pipeline, in the order they came
            ready = self._fresh(ready)
        if sent < ready:
            self._send_batch(ready, sent)

    def _event_error(self, exc: BaseException) -> None:
        """A fault around the C loop in resolver/_fastudp.c's event() (reading the memo's
        clock, say): that event is lost, never the listener."""
        log.error(
            "internal error answering a UDP query", exc_info=(type(exc), exc, exc.__traceback__)
        )

    def _serve_failed(self, exc: BaseException) -> None:
        """The C loop failed (out of memory, say): the batch is lost, never the listener,
        which answers with the Python loop from now on."""
        log.error(
            "UDP: the C loop failed; the Python loop answers from now on",
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        self._serve = None
        self._python_reads()
        self._buffers.fresh.clear()

    def _answer(self, indices: Iterable[int], ready: int) -> int:
        """Answer the received datagrams ``indices`` from the memo, or hand them to the
        pipeline with those in ``b.fresh`` already; answers go in the send slots from
        ``ready`` on; return how many are there then."""
        b = self._buffers
        received, outgoing = b.received, b.outgoing
        lengths, len_at, recv_stride = b.recv_words, b.len_at, b.recv_stride
        send_words, name_at, send_stride = b.send_words, b.name_at, b.send_stride
        iov_words, iov_len_at, iov_stride = b.iov_words, b.iov_len_at, b.iov_stride
        names_base, fresh = b.names_base, b.fresh
        fast = self.fast
        memo = fast.fast_memo if fast is not None else None
        clients = fast.fast_clients if fast is not None else EVERYONE
        everyone = clients is EVERYONE
        for i in indices:
            size = lengths[i * recv_stride + len_at]
            start = i * RECV_SIZE
            host = None  # the sender, once known (each host() call costs)
            try:
                if (
                    memo is not None
                    and fast is not None
                    and size > 2
                    # (no call for a miss: most misses are new names)
                    and (key := bytes(received[start + 2 : start + size])) in memo
                    and (everyone or (host := b.host(i)) in clients)
                ):
                    # The memo's one lookup (AnswerMemo.fast_answer), as UDPListener's.
                    body = fast.fast_answer(key)
                    if body is not None:
                        end = 2 + len(body)
                        if end <= SEND_SIZE:
                            out = ready * SEND_SIZE
                            outgoing[out : out + 2] = received[start : start + 2]
                            outgoing[out + 2 : out + end] = body
                            iov_words[ready * iov_stride + iov_len_at] = end
                            send_words[ready * send_stride + name_at] = names_base + i * _NAME_SIZE
                            ready += 1
                        else:
                            first = bytes(received[start : start + 2])
                            self._sendto(first + body, b.address(i))
                        continue
                data = bytes(received[start : start + size])
                fresh.append((data, host, b.sockaddr(i), i))
            except Exception:  # a bug must cost one answer, never the listener
                log.exception("internal error answering a UDP query")
        return self._fresh(ready)

    def _fresh(self, ready: int) -> int:
        """Answer the datagrams that the C loop found in no memo entry, handed over as
        (datagram, host or None, sockaddr, index): the pipeline's. Answers go in the send
        slots from ``ready`` on; return how many are there then."""
        b = self._buffers
        fresh = b.fresh.copy()  # (b.fresh itself stays: the C event holds it)
        b.fresh.clear()
        handle, later, held, names_base = self.handle, self._later, self.tasks.held, b.names_base
        for data, host, sockaddr, i in fresh:
            try:
                result = handle(data, host if host is not None else b.host(i), False)
            except Exception:  # a bug must cost one answer, never the listener
                log.exception("internal error answering a UDP query")
                continue
            if result is None:
                continue
            if isinstance(result, bytes):
                if b.put(ready, result, names_base + i * _NAME_SIZE):
                    ready += 1
                else:
                    self._sendto(result, sockaddr_tuple(sockaddr))
                continue
            result.then(later, sockaddr, held)  # a Pending answer
        return ready

    def _send_batch(self, ready: int, sent: int = 0) -> None:
        """Send the ``ready`` answers in the send slots from ``sent`` on; queue what
        finds no room."""
        assert _LIBC is not None
        sendmmsg = _LIBC.sendmmsg
        b = self._buffers
        while sent < ready:
            if self._queue:  # earlier answers still wait: keep the order
                self._queue_from(sent, ready)
                return
            done = sendmmsg(self._fd, b.send_ptr + sent * b.msg_size, ready - sent, 0)
            if done > 0:
                sent += done
                continue
            code = ctypes.get_errno()
            if code == errno.EINTR:
                continue
            if code in _REFUSED:
                self._give_up("sendmmsg", code)
            if code in _REFUSED or code in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS):
                self._queue_from(sent, ready)  # sent one by one as the socket takes them
                return
            # This answer cannot be sent (its address, say): drop it, send the rest.
            log.debug("UDP send error: %s", errno.errorcode.get(code, code))
            sent += 1

    def _queue_from(self, first: int, ready: int) -> None:
        b = self._buffers
        for k in range(first, ready):
            size = b.iov_words[k * b.iov_stride + b.iov_len_at]
            name = b.send_words[k * b.send_stride + b.name_at]
            start = k * SEND_SIZE
            address = sockaddr_tuple(ctypes.string_at(name, _NAME_SIZE))
            self._enqueue(bytes(b.outgoing[start : start + size]), address)

    def _later(self, answer: bytes | None, sockaddr: bytes) -> None:
        """An answer that came after its batch (from upstream): it goes out with the
        others that come in the same turn of the loop, in one sendmmsg. Sent together,
        they also wake the client's reader once, not once each."""
        if answer is None or self.closed:
            return
        self._waiting.append((answer, sockaddr))
        if len(self._waiting) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send the answers that came since the last flush."""
        waiting, self._waiting = self._waiting, []
        if self.closed or not waiting:
            return
        if self._send is not None and self._batching and not self._queue:
            # From the answers' own bytes, without the send slots (resolver/_fastudp.c).
            sent, code = self._send(self._fd, waiting)
            if sent < len(waiting):
                if code in _REFUSED:
                    self._give_up("sendmmsg", code)
                for answer, sockaddr in waiting[sent:]:  # sent as the socket takes them
                    self._enqueue(answer, sockaddr_tuple(sockaddr))
            return
        b = self._buffers
        ready = 0
        for answer, sockaddr in waiting:
            at = ready * _NAME_SIZE
            if not b.put(ready, answer, b.later_base + at):
                self._sendto(answer, sockaddr_tuple(sockaddr))
                continue
            b.later_bytes[at : at + _NAME_SIZE] = sockaddr
            ready += 1
            if ready == b.slots:
                self._send_batch(ready)
                ready = 0
        if ready:
            self._send_batch(ready)

    def _sendto(self, answer: bytes | None, addr: Any) -> None:
        """Send one answer now, or queue it behind those that wait for room."""
        if answer is None or self.closed:
            return
        if not self._queue:
            try:
                self.sock.sendto(answer, addr)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                log.debug("UDP error: %s", exc)
                return
        self._enqueue(answer, addr)

    def _enqueue(self, answer: bytes, addr: Any) -> None:
        if len(self._queue) >= MAX_QUEUED:
            self.answers_dropped += 1
            log.debug("UDP send queue full: dropped an answer to %s", addr[0])
            return
        self._queue.append((answer, addr))
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        queue = self._queue
        while queue:
            answer, addr = queue[0]
            try:
                self.sock.sendto(answer, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("UDP error: %s", exc)
            queue.popleft()
        self._writing = False
        self._loop.remove_writer(self._fd)

    def _give_up(self, call: str, code: int) -> None:
        if self._batching:
            log.warning(
                "UDP: the system refused %s (%s); answering one datagram at a time",
                call,
                errno.errorcode.get(code, code),
            )
        self._batching = self._busy = False
        self._python_reads()

    def _recv_error(self, code: int) -> None:
        if code in _REFUSED:
            self._give_up("recvmmsg", code)
        elif code not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
            # ICMP errors for earlier answers (a client went away) are no reason to stop.
            log.debug("UDP receive error: %s", errno.errorcode.get(code, code))


def count_into(listeners: Iterable[UDPListener], counts: Counts) -> Counts:
    """Add what the kernel says of each UDP listener's receive queue (its drops, the bytes
    queued now, its bound) to ``counts`` by listening address, and the answers the batch
    listeners dropped."""
    for listener in listeners:
        if isinstance(listener, BatchListener):
            counts.udp_answers_dropped += listener.answers_dropped
            sock = None if listener.closed else listener.sock
        else:
            sock = listener._direct  # (its duplicate of the transport's socket, while open)
        if sock is None or (queue := receive_queue(sock)) is None:
            continue
        host, port = sock.getsockname()[:2]
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        queued, bound, drops = queue
        counts.udp_receive_queued[listen] += queued
        counts.udp_receive_buffer[listen] += bound
        counts.udp_receive_drops[listen] += drops
    return counts
