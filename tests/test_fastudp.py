"""The batched UDP listener's memo-hit loop, in C (resolver/_fastudp.c) and in Python.

Every test runs on both loops: the C one where the extension is built (``c``), and the
Python one it falls back to (``python``, also what ``RESOLVER_FASTUDP=0`` picks). They must
answer the same datagrams the same way and count them the same. Queries wait in the
listener's socket before it reads, so that its batches find them (as in test_udpbatch.py).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from resolver.core.memo import AnswerMemo, Info
from resolver.core.outcome import BLOCKED
from resolver.core.stats import Stats
from resolver.service import udpbatch
from resolver.service.listeners import Tasks

from .helpers.memory import MiB, rss
from .helpers.server import has_ipv6

pytestmark = pytest.mark.skipif(not udpbatch.available(), reason="no recvmmsg here")

NOW = 1000.0
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["c", "python"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "c":
        if udpbatch._SERVE is None:
            pytest.skip("resolver._fastudp is not built (or RESOLVER_FASTUDP=0)")
    else:
        monkeypatch.setattr(udpbatch, "_SERVE", None)
    return str(request.param)


def question(qid: int, name: int) -> bytes:
    """A plain query for a name numbered ``name``."""
    label = f"n{name}".encode()
    body = bytes([len(label)]) + label + b"\x04test\x00" + struct.pack("!HH", 1, 1)
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + body


def answer_of(data: bytes) -> bytes:
    """The memo's answer to ``data``: itself with QR set and an address behind."""
    return data[:2] + bytes([data[2] | 0x80]) + data[3:] + b"ANSWER"


class Source:
    """What the listener reads of the resolver: a real memo, with ``names`` in it."""

    def __init__(self, names: int, logged: bool = False) -> None:
        self.stats = Stats()
        self.now = NOW
        self.memo = AnswerMemo(self.stats, lambda: self.now)
        self.memo.fast_memo = self.memo.dicts[False]
        self.info = Info(self.stats, BLOCKED, 1, 3, "block", logged=logged)
        for name in range(names):
            data = question(0, name)
            self.memo.remember(False, data[2:], answer_of(data), NOW + 60, NOW, self.info)


class Pipeline:
    """The handler behind the memo: answers REFUSED-like echoes, notes what it got."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []

    def __call__(self, data: bytes, client: str, tcp: bool) -> bytes | None:
        self.seen.append((len(data), client))
        if len(data) < 12:
            return None  # too short to answer (the resolver drops these)
        return data[:2] + b"\x81\x05" + data[4:12]


async def exchange(
    source: Source,
    handler: Pipeline,
    queries: list[bytes],
    host: str = "127.0.0.1",
    expect: int | None = None,
    then: Callable[[udpbatch.BatchListener], None] | None = None,
) -> list[bytes]:
    """Queue ``queries`` in a fresh listener's socket, let it read them; the answers.
    ``then`` is called with the listener made, before it reads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host, 0))
    asker = socket.socket(family, socket.SOCK_DGRAM)
    asker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    asker.bind((host, 0))
    asker.setblocking(False)
    where = sock.getsockname()
    for data in queries:
        asker.sendto(data, where)
    listener = udpbatch.BatchListener(sock, handler, Tasks(), source)  # type: ignore[arg-type]
    if then is not None:
        then(listener)
    got: list[bytes] = []
    want = len(queries) if expect is None else expect
    deadline = time.monotonic() + 5
    try:
        while len(got) < want and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            while True:
                try:
                    got.append(asker.recv(65535))
                except BlockingIOError:
                    break
        await asyncio.sleep(0.05)  # nothing more should come
        while True:
            try:
                got.append(asker.recv(65535))
            except BlockingIOError:
                break
    finally:
        listener.close()
        asker.close()
    return got


def test_repeated_questions_are_answered_with_their_ids_and_counted(engine: str) -> None:
    source = Source(names=10)
    handler = Pipeline()
    queries = [question(qid, qid % 10) for qid in range(200)]
    got = asyncio.run(exchange(source, handler, queries))
    assert sorted(got) == sorted(answer_of(q) for q in queries)
    assert handler.seen == []  # the memo answered every one
    if engine == "c":
        assert sum(source.memo.fast_counts) > 0  # the C loop answered (most of) them
    source.memo.fold()
    assert source.memo.fast_hits == 200
    assert source.stats.blocked["block"] == 200
    assert source.stats.answers[("udp", "A", "NXDOMAIN", BLOCKED)] == 200
    # (in the first bucket but for a pause between reading and counting: a preemption)
    assert sum(source.stats.durations[BLOCKED].counts) == 200
    assert list(source.memo.fast_counts) == [0]


def test_misses_expired_and_audited_entries_go_to_the_pipeline(engine: str) -> None:
    source = Source(names=5)
    audited = Info(source.stats, BLOCKED, 1, 3, "block", logged=True)
    data = question(0, 99)
    source.memo.remember(False, data[2:], answer_of(data), NOW + 60, NOW, audited)
    source.now = NOW + 30
    soon = question(0, 98)
    source.memo.remember(False, soon[2:], answer_of(soon), NOW + 10, NOW, source.info)
    handler = Pipeline()
    queries = [question(qid, (0, 1, 50, 98, 99)[qid % 5]) for qid in range(100)]
    got = asyncio.run(exchange(source, handler, queries))
    assert len(got) == 100
    assert len(handler.seen) == 60  # 20 misses, 20 expired, 20 audited
    source.memo.fold()
    assert source.memo.fast_hits == 40


def test_the_access_list_is_asked_for_every_sender(engine: str) -> None:
    source = Source(names=3)
    source.memo.fast_clients = {"127.0.0.1"}
    handler = Pipeline()
    queries = [question(qid, qid % 3) for qid in range(100)]
    assert len(asyncio.run(exchange(source, handler, queries))) == 100
    assert handler.seen == []  # the first ones fill the address cache for the C loop
    source.memo.fast_clients = {"127.0.0.2"}  # this client is not let in
    assert len(asyncio.run(exchange(source, handler, queries))) == 100
    assert handler.seen == [(len(queries[0]), "127.0.0.1")] * 100
    source.memo.fold()
    assert source.memo.fast_hits == 100


async def exchange_from(
    source: Source, handler: Pipeline, senders: list[str], rounds: int
) -> dict[str, list[bytes]]:
    """Queue ``rounds`` queries from each of ``senders`` (IPv4 loopback addresses), taking
    turns, in a fresh listener's socket; the answers each sender got."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    askers = {}
    for host in senders:
        asker = askers[host] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        asker.bind((host, 0))
        asker.setblocking(False)
    for qid in range(rounds):
        for asker in askers.values():
            asker.sendto(question(qid, qid % 3), sock.getsockname())
    listener = udpbatch.BatchListener(sock, handler, Tasks(), source)  # type: ignore[arg-type]
    got: dict[str, list[bytes]] = {host: [] for host in senders}
    deadline = time.monotonic() + 5
    try:
        while sum(map(len, got.values())) < rounds * len(senders) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            for host, asker in askers.items():
                while True:
                    try:
                        got[host].append(asker.recv(65535))
                    except BlockingIOError:
                        break
    finally:
        listener.close()
        for asker in askers.values():
            asker.close()
    return got


def test_senders_of_one_batch_each_get_their_own_access(engine: str) -> None:
    """The C loop remembers each sender's access for the rest of its call, in 16 places:
    127.0.0.17 takes the place of 127.0.0.1 there, and must not take its access too."""
    source = Source(names=3)
    source.memo.fast_clients = {"127.0.0.1", "127.0.0.2"}
    handler = Pipeline()
    got = asyncio.run(exchange_from(source, handler, ["127.0.0.1", "127.0.0.17", "127.0.0.2"], 60))
    for host in ("127.0.0.1", "127.0.0.2"):
        assert sorted(got[host]) == sorted(answer_of(question(qid, qid % 3)) for qid in range(60))
    assert [reply[2:4] for reply in got["127.0.0.17"]] == [b"\x81\x05"] * 60  # the pipeline's
    assert handler.seen == [(len(question(0, 0)), "127.0.0.17")] * 60
    source.memo.fold()
    assert source.memo.fast_hits == 120


def test_a_quiet_socket_is_served_by_the_c_loop_one_datagram_at_a_time(engine: str) -> None:
    """No backlog needed: each lone query is a call of the C loop (its counts are the
    C loop's, in fast_counts), where the Python loop reads it the plain way."""

    async def main() -> list[bytes]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        asker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        asker.bind(("127.0.0.1", 0))
        asker.settimeout(2.0)
        listener = udpbatch.BatchListener(sock, handler, Tasks(), source)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        got = []
        try:
            for qid in range(5):
                asker.sendto(question(qid, qid % 2), sock.getsockname())
                got.append(await loop.run_in_executor(None, asker.recv, 4096))
        finally:
            listener.close()
            asker.close()
        return got

    source = Source(names=2)
    handler = Pipeline()
    got = asyncio.run(main())
    assert got == [answer_of(question(qid, qid % 2)) for qid in range(5)]
    assert handler.seen == []
    assert sum(source.memo.fast_counts) == (5 if engine == "c" else 0)
    source.memo.fold()
    assert source.memo.fast_hits == 5


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")
@pytest.mark.parametrize("acl", [False, True], ids=["everyone", "access-list"])
def test_ipv6_senders_get_their_answers(engine: str, acl: bool) -> None:
    """With an access list the C loop leaves IPv6 senders to the Python one."""
    source = Source(names=4)
    if acl:
        source.memo.fast_clients = {"::1"}
    handler = Pipeline()
    queries = [question(qid, qid % 4) for qid in range(150)]
    got = asyncio.run(exchange(source, handler, queries, host="::1"))
    assert sorted(got) == sorted(answer_of(q) for q in queries)
    source.memo.fold()
    assert source.memo.fast_hits == 150


#: Sizes of bad datagrams: empty, shorter than an ID, an ID alone, a header alone, and
#: the largest UDP payload over IPv4 (65,507 bytes; 65,535 cannot be sent in one).
BAD_SIZES = (0, 1, 2, 12, 65507)


def bad_datagrams(round_: int) -> list[bytes]:
    made = []
    for size in BAD_SIZES:
        made.append(bytes((round_ + k) % 256 for k in range(min(size, 64))).ljust(size, b"\xff"))
    hit = question(round_, 0)
    made += [hit[: len(hit) - 1], hit + b"\x00", hit[:2]]  # a hit cut short, or longer
    return made


def test_malformed_datagrams_get_the_same_treatment_and_memory_stays_flat(engine: str) -> None:
    source = Source(names=1)
    handler = Pipeline()
    good = [question(qid, 0) for qid in range(20)]
    asyncio.run(exchange(source, handler, good + bad_datagrams(0), expect=24))
    first_seen = sorted(handler.seen)
    # What reached the pipeline: every bad one (the memo answers none of them).
    sizes = sorted([*BAD_SIZES, len(good[0]) - 1, len(good[0]) + 1, 2])
    assert [size for size, _ in first_seen] == sizes
    before = rss(collect=True)
    for round_ in range(1, 31):
        handler.seen.clear()
        got = asyncio.run(exchange(source, handler, good + bad_datagrams(round_), expect=24))
        assert len(got) == 20 + 4  # the good ones; the 12-byte, 65,507 and the two cut hits
        assert sorted(handler.seen) == first_seen
    assert rss(collect=True) - before < 8 * MiB
    source.memo.fold()
    assert source.memo.fast_hits == 31 * 20


def test_a_failing_c_loop_hands_the_listener_to_the_python_loop(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr(udpbatch, "_SERVE", broken)
    source = Source(names=2)
    queries = [question(qid, qid % 2) for qid in range(100)]

    async def main() -> tuple[list[bytes], Any]:
        got = await exchange(source, Pipeline(), queries, expect=100)
        more = await exchange(source, Pipeline(), queries)  # a second listener, again
        return got, more

    with caplog.at_level("ERROR", logger="resolver.transport"):
        got, more = asyncio.run(main())
    # (A C loop that failed after reading would lose that batch; this one read nothing.)
    assert len(got) == len(more) == 100
    assert caplog.text.count("the C loop failed") == 2  # once a listener


def test_a_failing_c_event_hands_the_listener_to_the_python_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The whole event in C (_fastudp.event): a failure is logged with its cause, and the
    listener answers with the Python loop from then on."""
    if udpbatch._EVENT is None or udpbatch._SERVE is None:
        pytest.skip("resolver._fastudp is not built (or RESOLVER_FASTUDP=0)")
    source = Source(names=2)
    source.memo.fast_counts = array("i", [0])  # not the int64 counts the C loop writes
    queries = [question(qid, qid % 2) for qid in range(100)]
    with caplog.at_level("ERROR", logger="resolver.transport"):
        got = asyncio.run(exchange(source, Pipeline(), queries))
    assert sorted(got) == sorted(answer_of(q) for q in queries)  # (it failed before reading)
    assert caplog.text.count("the C loop failed") == 1
    assert "expected a writable 'q' array" in caplog.text  # the cause, from C
    source.memo.fold()
    assert source.memo.fast_hits == 100


_WITHOUT = """
import asyncio, sys
sys.modules["resolver._fastudp"] = None  # as if it had not been built: import fails
sys.path.insert(0, sys.argv[1])
from tests import test_fastudp as t
from resolver.service import udpbatch
assert udpbatch.ENGINE == "python" and udpbatch._SERVE is None, udpbatch.ENGINE
source, handler = t.Source(names=2), t.Pipeline()
queries = [t.question(qid, qid % 2) for qid in range(100)]
got = asyncio.run(t.exchange(source, handler, queries))
assert sorted(got) == sorted(t.answer_of(q) for q in queries), len(got)
source.memo.fold()
assert source.memo.fast_hits == 100
print("served", len(got))
"""


def test_a_build_without_the_extension_serves() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RESOLVER_FASTUDP"}
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT, str(REPO)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert "served 100" in done.stdout


def test_the_log_says_which_loop_answers(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> Any:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        udpbatch.BatchListener(sock, Pipeline(), Tasks()).close()

    with caplog.at_level("INFO", logger="resolver.transport"):
        asyncio.run(main())
    loop = "C (resolver._fastudp)" if udpbatch.ENGINE == "c" else "Python"
    assert f"memo hits answered by the {loop} loop" in caplog.text


def long_run(engine: str) -> tuple[int, int, int, int, int]:
    """One listener answers 40,000 memo hits in bursts: (RSS after 20 bursts, RSS at the
    end, datagrams the pipeline saw, answers the C loop counted, fast hits folded)."""
    if engine == "python":
        udpbatch._SERVE = None  # type: ignore[misc]
    source = Source(names=50)
    handler = Pipeline()

    async def main() -> list[int]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        asker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        asker.bind(("127.0.0.1", 0))
        asker.setblocking(False)
        where = sock.getsockname()
        listener = udpbatch.BatchListener(sock, handler, Tasks(), source)  # type: ignore[arg-type]
        sizes = []
        try:
            for burst in range(220):
                if burst in (20, 219):
                    sizes.append(rss(collect=True))
                for qid in range(200):
                    asker.sendto(question(qid, qid % 50), where)
                got, deadline = 0, time.monotonic() + 5
                while got < 200 and time.monotonic() < deadline:
                    await asyncio.sleep(0.001)
                    while True:
                        try:
                            asker.recv(512)
                        except BlockingIOError:
                            break
                        got += 1
                assert got == 200, (burst, got)
        finally:
            listener.close()
            asker.close()
        return sizes

    before, after = asyncio.run(main())
    counted = sum(source.memo.fast_counts)
    source.memo.fold()
    return before, after, len(handler.seen), counted, source.memo.fast_hits


_LONG_RUN = """
import sys
sys.path.insert(0, sys.argv[1])
from tests import test_fastudp as t
print(*t.long_run(sys.argv[2]))
"""


def test_a_long_run_of_hits_leaves_memory_flat(engine: str) -> None:
    """A reference leaked per datagram (the key made of its bytes, say) would show as
    megabytes. In a process of its own: in the suite's, what earlier tests' servers and
    threads free or take meanwhile moves its RSS by as much."""
    done = subprocess.run(
        [sys.executable, "-c", _LONG_RUN, str(REPO), engine],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    before, after, seen, counted, fast_hits = (int(x) for x in done.stdout.split())
    assert after - before < 1 * MiB, (before, after)
    assert seen == 0
    if engine == "c":
        assert counted > 20_000
    assert fast_hits == 220 * 200


@pytest.mark.parametrize(
    "name",
    ["", "com", "www.example.com", "a.b.c.d.e.f.g.h", "x" * 63 + ".y"],
)
def test_the_c_dotted_name_is_the_python_one(name: str) -> None:
    from resolver.policy import model

    native = model.dotted
    if native is model._dotted:
        pytest.skip("resolver._fastudp is not built")
    labels = [part.encode() for part in name.split(".") if part]
    if labels:
        labels[0] = labels[0].replace(b"x", b".", 2)  # a dot inside a label, legal on the wire
    key = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    offsets, at = [], 0
    for label in labels:
        offsets.append(at)
        at += len(label) + 1
    offs = tuple(offsets) or (0,)
    assert native(key, offs) == model._dotted(key, offs)
    with pytest.raises(IndexError):
        native(key, (0, len(key) + 5))


def test_the_c_send_skips_an_answer_the_system_refuses_and_sends_the_rest() -> None:
    if udpbatch._SEND is None:
        pytest.skip("resolver._fastudp is not built (or RESOLVER_FASTUDP=0)")
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(5)
        port = rx.getsockname()[1]
        raw = socket.AF_INET.to_bytes(2, sys.byteorder) + port.to_bytes(2, "big")
        raw = (raw + socket.inet_aton("127.0.0.1")).ljust(28, b"\0")  # a sockaddr slot
        answers = [(b"one", raw), (b"x" * 70000, raw), (b"two", raw)]  # too large: EMSGSIZE
        assert udpbatch._SEND(tx.fileno(), answers) == (3, 0)
        assert [rx.recv(100), rx.recv(100)] == [b"one", b"two"]
        with pytest.raises(TypeError):
            udpbatch._SEND(tx.fileno(), [(b"one", b"short")])
    finally:
        rx.close()
        tx.close()


@pytest.mark.parametrize(
    "change", ["no fast memo", "clock", "access list", "counts"], ids=lambda c: c.replace(" ", "-")
)
def test_what_changes_in_the_memo_after_the_listener_is_made_is_what_it_answers_by(
    engine: str, change: str
) -> None:
    """The C event reads the memo's state from a list its properties keep (fast_state),
    never from a copy of its own: each change here, made after the listener exists,
    decides the answers that follow."""
    source = Source(names=4)
    memo = source.memo
    queries = [question(qid, qid % 4) for qid in range(40)]
    handler = Pipeline()
    counts = array("q")

    def apply(_listener: udpbatch.BatchListener) -> None:
        if change == "no fast memo":
            memo.fast_memo = None
        elif change == "clock":
            memo.clock = lambda: NOW + 120  # past the entries' expiry
        elif change == "access list":
            memo.fast_clients = {"127.0.0.2"}
        else:
            counts.extend(memo.fast_counts)
            memo.fast_counts = counts  # (a new array the C loop must count in)

    got = asyncio.run(exchange(source, handler, queries, then=apply))
    assert len(got) == 40
    if change == "counts":
        assert sorted(got) == sorted(answer_of(q) for q in queries)
        memo.fold()
        assert memo.fast_hits == 40  # (C's counts too, read from the new array)
        return
    # The pipeline answers every one (the memo's answer would end in "ANSWER").
    assert not any(a.endswith(b"ANSWER") for a in got)
    assert len(handler.seen) == 40


def test_a_listener_that_stops_accepting_answers_nothing_more(engine: str) -> None:
    """Shutting down (Server.stop): the C event is no longer the reader, so memo hits
    get no answer either, as in the Python loop."""
    source = Source(names=2)
    handler = Pipeline()
    queries = [question(qid, qid % 2) for qid in range(20)]

    def stop(listener: udpbatch.BatchListener) -> None:
        listener.stop_accepting()

    got = asyncio.run(exchange(source, handler, queries, expect=0, then=stop))
    assert got == []
    assert handler.seen == []
