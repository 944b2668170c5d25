"""Blocked names the memo does not hold, answered by the C loop (resolver/_fastblock.c,
core/blockview.py): byte for byte Python's answer, counted as Python counts it, and left
to Python whenever the C loop cannot be sure.

The first half compares the C answer with the pipeline's for a policy that has every kind
of rule and answer (each action, exact and domain rules, an allow, a monitor list, windows
not yet open, closing soon and over, a name in two lists), in every query shape; the
second sends a burst of distinct blocked names to a running server over UDP.
"""

from __future__ import annotations

import calendar
import importlib
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import pytest

from resolver.config.model import CacheConfig
from resolver.core.cache import Cache
from resolver.core.memo import MEMO_OVERHEAD, AnswerMemo
from resolver.core.pipeline import Resolver
from resolver.core.wire import label_offsets
from resolver.policy import load_policy
from resolver.policy.model import ALL_CLIENTS
from resolver.upstream.forwarder import Forwarder, Upstream

from .helpers.server import RunningServer

fastudp = pytest.importorskip("resolver._fastudp")

#: One hundred seconds before the "ending" list's window closes.
NOW = calendar.timegm((2027, 1, 1, 0, 0, 0)) - 100.0

LISTS = {
    "nx.yaml": "list: nx\nttl: 300\ndomains: [deepseek.com, shared.test]\nexact: [only.test]\n",
    "nodata.yaml": "list: nodata\naction: nodata\ndomains: [nodata.test, shared.test]\n",
    "refused.yaml": "list: refused\naction: refused\ndomains: [refused.test]\n",
    "null.yaml": "list: zero\naction: 'null'\ndomains: [null.test]\n",
    "sink.yaml": "list: sink\naction: {sinkhole: {a: [192.0.2.1, 192.0.2.2], "
    "aaaa: ['2001:db8::1']}}\ndomains: [sink.test]\n",
    "sinka.yaml": "list: sinka\naction: {sinkhole: {a: [192.0.2.9]}}\ndomains: [sinka.test]\n",
    "allow.yaml": "list: allow\nallow: [ok.deepseek.com]\n",
    "watch.yaml": "list: watch\nmode: monitor\ndomains: [watched.test]\n",
    "later.yaml": "list: later\nactive: {from: '2030-01-01T00:00Z'}\ndomains: [later.test]\n",
    "ending.yaml": "list: ending\nttl: 3600\nactive: {from: 2020-01-01, until: "
    "'2027-01-01T00:00Z'}\ndomains: [ending.test]\n",
    "expired.yaml": "list: expired\nactive: {from: 2019-01-01, until: 2020-01-01}\n"
    "domains: [expired.test]\n",
}

NAMES = [
    "deepseek.com",
    "chat.deepseek.com",
    "a.b.c.chat.deepseek.com",
    "CHAT.DeepSeek.COM",
    "a\\.b.deepseek.com",
    "ok.deepseek.com",
    "x.ok.deepseek.com",
    "only.test",
    "sub.only.test",
    "shared.test",
    "x.shared.test",
    "nodata.test",
    "refused.test",
    "null.test",
    "sink.test",
    "sinka.test",
    "watched.test",
    "later.test",
    "ending.test",
    "expired.test",
    "unlisted.test",
    "deepseek.com.evil.test",
]
TYPES = ["A", "AAAA", "TXT", "MX", "SOA", "HTTPS", "ANY", "CNAME"]


def shapes(name: str, rdtype: str, qid: int) -> list[tuple[str, bytes]]:
    """The query in each shape a client sends: no EDNS, EDNS (three payloads), the DO bit,
    an EDNS option (not plain: Python's), RD clear, CD set."""
    made: list[tuple[str, bytes]] = []

    def add(label: str, message: dns.message.Message) -> None:
        message.id = qid
        made.append((label, message.to_wire()))

    add("plain", dns.message.make_query(name, rdtype, use_edns=False))
    for payload in (512, 1232, 4096):
        add(f"edns{payload}", dns.message.make_query(name, rdtype, use_edns=0, payload=payload))
    add("do", dns.message.make_query(name, rdtype, want_dnssec=True))
    padded = dns.message.make_query(
        name, rdtype, use_edns=0, options=[dns.edns.GenericOption(65001, b"x")]
    )
    add("option", padded)
    norecurse = dns.message.make_query(name, rdtype, use_edns=False)
    norecurse.flags &= ~dns.flags.RD
    add("no-rd", norecurse)
    checking = dns.message.make_query(name, rdtype, use_edns=0)
    checking.flags |= dns.flags.CD
    add("cd", checking)
    return made


@pytest.fixture
def resolver(tmp_path: Path) -> Resolver:
    for file, text in LISTS.items():
        (tmp_path / file).write_text(text)
    policy = load_policy(tmp_path)
    # The forwarder is never asked: only blocked names reach the pipeline here.
    return Resolver(policy, Cache(), Forwarder([Upstream("127.0.0.1", 9)]), clock=lambda: NOW)


def blocked_by_policy(resolver: Resolver, name: str) -> bool:
    wire = dns.name.from_text(name).canonicalize().to_wire()
    assert wire is not None
    rule, apex, _monitor, _until = resolver.policy.decide(
        wire, label_offsets(wire), ALL_CLIENTS, NOW
    )
    return rule is not None and apex >= 0


def test_the_c_answer_is_the_pipelines_byte_for_byte(resolver: Resolver) -> None:
    view = resolver.memo.fast_blocks
    assert view is not None
    answered = left = 0
    qid = 1
    for name in NAMES:
        blocked = blocked_by_policy(resolver, name)
        for rdtype in TYPES:
            for label, data in shapes(name, rdtype, qid):
                qid += 1
                if not blocked:
                    # Allowed, monitored, pending, over, unlisted: never answered in C.
                    assert fastudp.blocked(view, data, NOW) is None, (name, rdtype, label)
                    continue
                python = resolver.handle(data, "192.0.2.7", False)
                assert isinstance(python, bytes), (name, rdtype, label)
                # The same question again, with a new ID: the kind is known now.
                again = (qid + 50_000).to_bytes(2, "big") + data[2:]
                c = fastudp.blocked(view, again, NOW)
                if c is None:
                    left += 1
                    # Python's: ANY (RFC 8482's cut) and queries that are not plain.
                    assert rdtype == "ANY" or label == "option", (name, rdtype, label)
                    continue
                answer, slot = c
                assert answer == again[:2] + python[2:], (name, rdtype, label)
                assert slot in resolver.memo.block_slots.values()
                answered += 1
    assert answered > 500 and left > 0


def test_the_ttl_is_cut_to_the_window_and_the_soa_sits_at_the_rule(resolver: Resolver) -> None:
    view = resolver.memo.fast_blocks
    for name, ttl, owner in (
        ("x.ending.test", 100, "ending.test."),
        ("a.chat.deepseek.com", 300, "deepseek.com."),
    ):
        data = dns.message.make_query(name, "TXT").to_wire()
        resolver.handle(data, "192.0.2.7", False)
        c = fastudp.blocked(view, data, NOW)
        assert c is not None
        reply = dns.message.from_wire(c[0])
        assert reply.authority[0].ttl == ttl
        assert reply.authority[0].name.to_text() == owner


def test_a_kind_python_has_not_answered_yet_is_left_to_it(resolver: Resolver) -> None:
    data = dns.message.make_query("new.deepseek.com", "A").to_wire()
    view = resolver.memo.fast_blocks
    assert fastudp.blocked(view, data, NOW) is None
    resolver.handle(data, "192.0.2.7", False)
    assert fastudp.blocked(view, data, NOW) is not None
    # A policy swap empties the memo and its kinds: Python answers the first one again.
    resolver.policy = resolver.policy
    view = resolver.memo.fast_blocks
    assert fastudp.blocked(view, data, NOW) is None


def test_no_view_for_patterns_groups_or_an_audit_log_that_wants_blocked(tmp_path: Path) -> None:
    (tmp_path / "re.yaml").write_text("list: re\npatterns: ['/^ads[0-9]+\\./']\n")
    policy = load_policy(tmp_path)
    resolver = Resolver(policy, Cache(), Forwarder([Upstream("127.0.0.1", 9)]))
    assert resolver.memo.fast_blocks is None

    class Audit:
        def wants(self, decision: str) -> bool:
            return True

    (tmp_path / "re.yaml").write_text("list: re\ndomains: [deepseek.com]\n")
    resolver.policy = load_policy(tmp_path)
    assert resolver.memo.fast_blocks is not None
    resolver.audit = Audit()  # type: ignore[assignment]
    assert resolver.memo.fast_blocks is None


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d[:-1],  # cut short
        lambda d: d + b"\x00",  # a trailing byte
        lambda d: d[:2] + b"\x81\x00" + d[4:],  # QR set: an answer, not a query
        lambda d: d[:2] + b"\x08\x00" + d[4:],  # opcode IQUERY
        lambda d: d[:4] + b"\x00\x02" + d[6:],  # two questions
        lambda d: d[:12] + b"\xc0\x0c" + d[-4:],  # a pointer for the name
        lambda d: d[:12] + b"\x40" + d[13:],  # a label of 64
    ],
)
def test_malformed_or_odd_queries_are_left_to_python(
    resolver: Resolver, mangle: Callable[[bytes], bytes]
) -> None:
    data = dns.message.make_query("chat.deepseek.com", "A", use_edns=False).to_wire()
    resolver.handle(data, "192.0.2.7", False)
    view = resolver.memo.fast_blocks
    assert fastudp.blocked(view, data, NOW) is not None
    assert fastudp.blocked(view, mangle(data), NOW) is None


#: Queries sent at once: a backlog that the server reads in batches, and that its socket's
#: receive buffer holds even when a loaded machine leaves the server slow to read.
WAVE = 50


def burst(running: RunningServer, count: int) -> list[bytes]:
    """Send ``q<i>.deepseek.com`` A for i < count, WAVE at a time, check that each gets
    NXDOMAIN with its own ID and question; return the queries."""
    queries = []
    for i in range(count):
        query = dns.message.make_query(f"q{i}.deepseek.com", "A", use_edns=False)
        query.id = i
        queries.append(query.to_wire())
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    client.settimeout(5.0)
    seen: set[int] = set()
    try:
        for start in range(0, count, WAVE):
            for data in queries[start : start + WAVE]:
                client.sendto(data, (running.host, running.port))
            deadline = time.monotonic() + 10.0
            while len(seen) < min(count, start + WAVE) and time.monotonic() < deadline:
                reply = dns.message.from_wire(client.recv(4096))
                assert reply.rcode() == dns.rcode.NXDOMAIN
                assert reply.question[0].name.to_text() == f"q{reply.id}.deepseek.com."
                seen.add(reply.id)
    finally:
        client.close()
    assert len(seen) == count
    return queries


def c_loop_server(make_server: Callable[..., RunningServer]) -> RunningServer:
    if importlib.import_module("resolver.service.udpbatch").ENGINE != "c":
        pytest.skip("the C loop is off (RESOLVER_FASTUDP=0)")
    running = make_server()
    running.query("first.deepseek.com", "A", use_edns=False)  # Python's: the kind is known
    return running


def test_a_burst_of_distinct_blocked_names_is_answered_in_c_and_counted(
    make_server: Callable[..., RunningServer],
) -> None:
    running = c_loop_server(make_server)
    resolver = running.resolver
    before = resolver.stats.blocked.get("deepseek", 0)
    hits_before = resolver.memo_hits
    count = 400
    burst(running, count)
    memo = resolver.memo
    assert memo.fast_decided > 0  # some of them came in batches, which C answered
    assert resolver.stats.blocked["deepseek"] - before == count
    # Decided in C (and then kept in the memo): not memo hits.
    assert resolver.memo_hits == hits_before


def test_what_c_answers_is_kept_in_the_memo_as_the_pipeline_keeps_it(
    make_server: Callable[..., RunningServer],
) -> None:
    running = c_loop_server(make_server)
    resolver = running.resolver
    memo = resolver.memo
    first = dns.message.make_query("first.deepseek.com", "A", use_edns=False).to_wire()
    kept_by_python = memo.dicts[False][first[2:]]
    count = 300
    queries = burst(running, count)
    decided = memo.fast_decided
    assert decided > 0
    kept = [memo.dicts[False].get(data[2:]) for data in queries]
    assert all(entry is not None for entry in kept)  # by C or by Python, each one
    for entry in kept:
        assert entry is not None
        # Same answer but for the name, same instant of expiry, same Info.
        assert entry[1:] == kept_by_python[1:]
    assert memo.sizes[0] == memo_bytes(memo)
    hits_before = resolver.memo_hits
    burst(running, count)  # the same names again: memo hits now, nothing decided anew
    assert resolver.memo_hits - hits_before == count
    assert memo.fast_decided == decided


def memo_bytes(memo: AnswerMemo) -> int:
    """The UDP memo's bytes as AnswerMemo.forget counts an entry's."""
    return sum(2 * len(value[0]) + 4 + MEMO_OVERHEAD for value in memo.dicts[False].values())


@pytest.mark.parametrize(
    "bounds", [{"memo_max_entries": 100}, {"memo_max_bytes": 40_000}], ids=["entries", "bytes"]
)
def test_what_c_keeps_stays_within_the_memos_bounds(
    make_server: Callable[..., RunningServer], bounds: dict[str, int]
) -> None:
    """C keeps answers and evicts the oldest to make room, as AnswerMemo does: 800
    distinct names into a memo that holds about 100, counted to the byte."""
    running = c_loop_server(lambda: make_server(cache=replace(CacheConfig(), **bounds)))
    memo = running.resolver.memo
    burst(running, 800)
    # C makes room itself, as Python would: before it did, Python took every datagram
    # of a batch after the memo filled (184-200 of 800 decided in C, 25-33 by bytes).
    assert memo.fast_decided >= 400
    assert memo.evictions > 0
    assert len(memo.dicts[False]) <= memo.max_entries
    assert memo.sizes[0] * 2 <= memo.max_bytes
    assert memo.sizes[0] == memo_bytes(memo)
