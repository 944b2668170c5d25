"""The pipeline's stages one by one, each driven by a Context: no sockets, no event loop
(except for the forward stage's Pending), a fixed clock.

A stage reads what the query is from the Context and writes what it decides into it; these
tests check both, the answer a stage returns and what it declares for the memo
(``ctx.until``, ``ctx.info``), for the policy, cache, answer inspection, admission and
stale stages, the header checks, the memo and the answer inspection on their own.
"""

from __future__ import annotations

from pathlib import Path

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rrset
import pytest

from resolver.core import pipeline
from resolver.core.cache import Cache, Entry
from resolver.core.context import TCP_MAX, Context, new_context
from resolver.core.inspect import behind, inspects, private
from resolver.core.memo import FAST_BOUND, AnswerMemo, Info
from resolver.core.outcome import ALLOWED, BLOCKED, CACHED, ERROR, FORWARDED, MONITORED
from resolver.core.pipeline import Resolver
from resolver.core.stages import cache_key, unsupported
from resolver.core.stats import Stats
from resolver.core.wire import parse_query, scan_response
from resolver.policy import load_policy
from resolver.policy.model import ALL_CLIENTS
from resolver.policy.timewindow import NEVER
from resolver.upstream.forwarder import Forwarder, Upstream

NOW = 1_800_000_000.0


def write_lists(path: Path) -> Path:
    (path / "block.yaml").write_text("list: block\ndomains: [blocked.test]\n")
    (path / "watch.yaml").write_text("list: watch\nmode: monitor\ndomains: [watched.test]\n")
    (path / "allow.yaml").write_text("list: allow\nallow: [allowed.test]\n")
    return path


@pytest.fixture
def resolver(tmp_path: Path) -> Resolver:
    policy = load_policy(write_lists(tmp_path))
    # The forwarder is never asked: these tests stop before any upstream.
    return Resolver(policy, Cache(), Forwarder([Upstream("127.0.0.1", 9)]), clock=lambda: NOW)


def context(name: str, rdtype: str = "A", tcp: bool = False, **kwargs: object) -> Context:
    data = dns.message.make_query(name, rdtype, **kwargs).to_wire()  # type: ignore[arg-type]
    q = parse_query(data)
    return new_context(data, q, "192.0.2.7", tcp, int(tcp), "", 0.0, ALL_CLIENTS, data[2:])


def reply_entry(
    cache: Cache, ctx: Context, *records: tuple[str, str, str], now: float = NOW
) -> Entry:
    """Admit a reply with ``records`` (owner, type, data; TTL 300) for ctx's question."""
    query = dns.message.from_wire(ctx.data)
    reply = dns.message.make_response(query)
    for owner, rdtype, text in records:
        reply.answer.append(dns.rrset.from_text(owner, 300, "IN", rdtype, text))
    wire = reply.to_wire()
    scan = scan_response(wire, query.id, ctx.q.question)
    ctx.key = cache_key(ctx.q)
    return cache.admit(ctx.key, scan, now, NEVER)


# ------------------------------------------------------------------------- header checks


def test_header_checks_name_the_rcode_of_what_is_not_served() -> None:
    assert unsupported(context("example.test").q) == 0
    q = parse_query(dns.message.make_query("example.test", "A", rdclass="CH").to_wire())
    assert unsupported(q) == dns.rcode.REFUSED
    notify = dns.message.make_query("example.test", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    assert unsupported(parse_query(notify.to_wire())) == dns.rcode.NOTIMP
    assert unsupported(context("example.test", use_edns=1).q) == dns.rcode.BADVERS


def test_a_context_knows_the_largest_answer_its_client_takes() -> None:
    assert context("example.test", use_edns=0, payload=1232).limit == 1232
    assert context("example.test", tcp=True).limit == TCP_MAX
    ctx = context("example.test")
    assert (ctx.decision, ctx.until, ctx.info, ctx.monitored) == (CACHED, 0.0, None, None)


# -------------------------------------------------------------------------------- policy


def test_policy_stage_answers_a_blocked_name_and_declares_it_memoisable(
    resolver: Resolver,
) -> None:
    ctx = context("www.blocked.test")
    answer = resolver._decide(ctx)
    assert answer is not None
    assert dns.message.from_wire(answer).rcode() == dns.rcode.NXDOMAIN
    assert ctx.info is not None and ctx.info.decision == BLOCKED
    assert ctx.until > ctx.now == NOW
    assert resolver.stats.blocked["block"] == 1


def test_policy_stage_notes_a_monitored_name_and_never_lets_it_be_memoised(
    resolver: Resolver,
) -> None:
    ctx = context("watched.test")
    assert resolver._decide(ctx) is None
    assert ctx.decision == MONITORED and ctx.monitored is not None
    assert ctx.until == 0.0  # every such query must be seen
    assert resolver.stats.would_block["watch"] == 1


def test_policy_stage_lets_other_names_on_with_their_decision(resolver: Resolver) -> None:
    ctx = context("allowed.test")
    assert resolver._decide(ctx) is None and ctx.decision == ALLOWED
    ctx = context("example.test")
    assert resolver._decide(ctx) is None and ctx.decision == CACHED
    assert ctx.valid_until == NEVER


# --------------------------------------------------------------------- cache, inspection


def test_cache_stage_serves_an_entry_and_says_until_when_it_stays_right(
    resolver: Resolver,
) -> None:
    ctx = context("example.test")
    assert resolver._decide(ctx) is None
    entry = reply_entry(resolver.cache, ctx, ("example.test.", "A", "192.0.2.1"))
    answer = resolver._serve(ctx, entry, pipeline._CACHED)
    reply = dns.message.from_wire(answer)
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer[0].ttl == 300
    assert ctx.info is not None and ctx.info.decision == CACHED and ctx.info.from_cache
    # Right until its served TTLs change: the next whole second of its age (here, admitted
    # this very instant, right after now).
    assert NOW < ctx.until <= NOW + 1.0
    assert ctx.until <= entry.expires


def test_answer_inspection_blocks_a_cname_into_a_blocked_name(resolver: Resolver) -> None:
    ctx = context("alias.example.test")
    assert resolver._decide(ctx) is None
    entry = reply_entry(
        resolver.cache,
        ctx,
        ("alias.example.test.", "CNAME", "cdn.blocked.test."),
        ("cdn.blocked.test.", "A", "192.0.2.1"),
    )
    assert inspects(resolver.policy, None, entry)
    for source in (pipeline._CACHED, pipeline._FRESH, pipeline._STALE):
        ctx.info = None
        answer = resolver._serve(ctx, entry, source)  # the one place, whatever the source
        assert dns.message.from_wire(answer).rcode() == dns.rcode.NXDOMAIN
        assert ctx.info is not None and ctx.info.decision == BLOCKED
    assert resolver.stats.blocked["block"] == 3


def test_rebinding_protection_blocks_a_private_address_for_a_public_name(
    resolver: Resolver,
) -> None:
    from resolver.policy.model import synthetic_ruleset

    ctx = context("public.example.test")
    entry = reply_entry(resolver.cache, ctx, ("public.example.test.", "A", "10.1.2.3"))
    assert private(bytes([10, 1, 2, 3])) and not private(bytes([192, 0, 2, 1]))
    policy = resolver.policy
    assert not inspects(policy, None, entry)  # nothing to look at: one test
    rules = synthetic_ruleset("rebinding", "DNS rebinding protection", "a private address")
    rule, why, _ = behind(policy, rules, (), ctx.q, entry, ALL_CLIENTS, NOW)
    assert rule is rules and why == "a private address"
    rule, _, _ = behind(policy, rules, ("example.test",), ctx.q, entry, ALL_CLIENTS, NOW)
    assert rule is None  # inside an internal zone


# ------------------------------------------------------------------ admission, stale, error


def test_admission_refuses_beyond_the_budgets_and_counts_what_it_lets_through(
    resolver: Resolver,
) -> None:
    ctx = context("example.test")
    resolver.max_inflight = 0
    answer = resolver._admit(ctx)
    assert answer is not None and dns.message.from_wire(answer).rcode() == dns.rcode.SERVFAIL
    assert resolver.stats.stopped["overload"] == 1
    resolver.max_inflight, resolver.max_inflight_per_client = 10, 1
    assert resolver._admit(ctx) is None and resolver.waiting == 1
    assert ctx.decision == FORWARDED  # what "cached" becomes on its way upstream
    busy = resolver._admit(context("example.test"))
    assert busy is not None and dns.message.from_wire(busy).rcode() == dns.rcode.SERVFAIL
    assert resolver.stats.stopped["client_inflight"] == 1


def test_stale_and_failed_answers_keep_the_decision_they_stand_for(resolver: Resolver) -> None:
    ctx = context("example.test")
    entry = reply_entry(resolver.cache, ctx, ("example.test.", "A", "192.0.2.1"), now=NOW - 400)
    ctx.decision = FORWARDED
    answer = resolver._serve(ctx, entry, pipeline._STALE)
    reply = dns.message.from_wire(answer)
    assert reply.answer[0].ttl == 30 and resolver.stats.stale == 1
    assert resolver.stats.answers[("udp", "A", "NOERROR", CACHED)] == 1
    failed = context("example.test")
    failed.decision = FORWARDED
    assert dns.message.from_wire(resolver._failed(failed)).rcode() == dns.rcode.SERVFAIL
    assert failed.decision == ERROR


# ---------------------------------------------------------------------------------- memo


def test_the_memo_answers_until_the_stage_declared_end_and_counts_the_fast_path() -> None:
    stats = Stats()
    now = [NOW]
    memo = AnswerMemo(stats, lambda: now[0])
    memo.fast_memo = memo.dicts[False]
    info = Info(stats, BLOCKED, 1, 3, "block")
    memo.remember(False, b"key", b"\x00\x01answer", NOW + 5, NOW, info)
    assert memo.fast_answer(b"key") == b"answer"
    assert memo.fast_answer(b"other") is None
    now[0] = NOW + 5
    assert memo.fast_answer(b"key") is None  # expired: the pipeline answers
    memo.fold()
    assert memo.fast_hits == 1 and stats.blocked["block"] == 1
    assert stats.answers[("udp", "A", "NXDOMAIN", BLOCKED)] == 1
    assert FAST_BOUND > 0
    memo.remember(False, b"gone", b"\x00\x01x", NOW, NOW, info)  # until <= now: not kept
    assert memo.entries == 1


def test_the_memo_keeps_audited_answers_from_the_fast_path() -> None:
    stats = Stats()
    memo = AnswerMemo(stats, lambda: NOW)
    memo.fast_memo = memo.dicts[False]
    logged = Info(stats, BLOCKED, 1, 3, "block", logged=True)
    memo.remember(False, b"key", b"\x00\x01answer", NOW + 5, NOW, logged)
    assert memo.fast_answer(b"key") is None  # the full path writes its audit line
    assert memo.dicts[False][b"key"][0] == b"answer"


def test_the_memo_stays_within_its_bytes() -> None:
    memo = AnswerMemo(Stats(), lambda: NOW)
    memo.max_bytes = 64 * 1024
    info = Info(Stats(), BLOCKED, 1, 3)
    for i in range(1000):
        memo.remember(False, i.to_bytes(4, "big"), bytes(100), NOW + 5, NOW, info)
        assert memo.size * 2 <= memo.max_bytes
    assert memo.evictions > 0
    memo.remember(False, b"huge", bytes(8000), NOW + 5, NOW, info)
    assert memo.rejections == 1
