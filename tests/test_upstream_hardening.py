"""Issue 17, items 6, 13, 19, 20 and 21: the real server on loopback, attacked or failed
the way the hardening review did it.

- 6: an allowed name that is a CNAME to a name banned 30 s later must not be handed out
  with the target's long TTL: every TTL stops at the ban.
- 13: TTLs are the floor of the time left, never rounded up past an instant.
- 19: one client filling the in-flight table with slow misses must not make the other
  clients' misses fail.
- 20: health comes from transport failures (confirmed by probes), never from the rcode of
  one client's question; /readyz says so.
- 21: a would-block match is counted when decided and audited even when the upstream fails.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.rcode
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from resolver.config import InflightConfig, Listen, UpstreamHealthConfig
from resolver.observe.metrics import ResolverCollector
from resolver.observe.querylog import AuditConfig

from .helpers.fakeupstream import Behaviour, FakeUpstream
from .helpers.server import FROZEN_NOW, RunningServer

BAN_AT = FROZEN_NOW + 30  # 2026-06-01T12:00:30Z
BAN_LIST = """\
list: soon
timezone: UTC
active: {from: "2026-06-01T12:00:30Z"}
action: nxdomain
ttl: 60
domains: [target.test]
"""


def ttls(reply: dns.message.Message) -> list[int]:
    return [rrset.ttl for section in (reply.answer, reply.authority) for rrset in section]


@pytest.fixture
def aliased(upstream: FakeUpstream) -> FakeUpstream:
    upstream.ttl = 3600
    upstream.records[("alias.test", "CNAME")] = ["hop.test."]
    upstream.records[("hop.test", "CNAME")] = ["target.test."]
    upstream.records[("target.test", "A")] = ["192.0.2.50"]
    return upstream


# --- 6 and 13: no TTL outlives the next ban of any name in the answer ---------------------


def test_a_cname_targets_ban_caps_every_ttl_at_its_floor(
    make_server: Callable[..., RunningServer], aliased: FakeUpstream, lists_dir: Path
) -> None:
    (lists_dir / "soon.yaml").write_text(BAN_LIST)
    running = make_server()
    running.clock.now = FROZEN_NOW + 3.3  # 26.7 s before the ban: at most 26
    first = running.query("alias.test")
    assert first.rcode() == dns.rcode.NOERROR and len(first.answer) == 3
    assert max(ttls(first)) == 26
    running.clock.now = FROZEN_NOW + 10.9  # from the cache: 19.1 s left
    # (18: the entry kept 26 s at 3.3, less 8 whole-or-begun seconds of age.)
    assert 18 <= max(ttls(running.query("alias.test"))) <= 19
    running.clock.now = FROZEN_NOW + 29.95
    assert max(ttls(running.query("alias.test"))) == 0
    assert aliased.count("alias.test") == 1
    running.clock.now = BAN_AT
    assert running.query("alias.test").rcode() == dns.rcode.NXDOMAIN  # passes through a ban


def test_a_ban_loaded_later_caps_what_the_cache_already_holds(
    make_server: Callable[..., RunningServer], aliased: FakeUpstream, lists_dir: Path
) -> None:
    running = make_server()
    running.clock.now = FROZEN_NOW
    assert min(ttls(running.query("alias.test"))) == 3600  # no ban yet: the upstream's TTL
    (lists_dir / "soon.yaml").write_text(BAN_LIST)
    assert running.call(running.server.reload())
    for now in (FROZEN_NOW + 0.25, FROZEN_NOW + 0.5, FROZEN_NOW + 12.75):
        running.clock.now = now
        for _ in range(3):  # the cache, then the answer memo: the same cap
            reply = running.query("alias.test")
            assert reply.rcode() == dns.rcode.NOERROR
            assert max(ttls(reply)) == int(BAN_AT - now), now
    assert aliased.count("alias.test") == 1


def test_a_stale_answer_stops_at_the_ban_too(
    make_server: Callable[..., RunningServer], aliased: FakeUpstream, lists_dir: Path
) -> None:
    from resolver.config import CacheConfig

    running = make_server(cache=CacheConfig(serve_stale=7200, stale_timer=0.2))
    running.clock.now = FROZEN_NOW - 3610  # its hour ends 40 s before the ban
    assert running.query("alias.test").rcode() == dns.rcode.NOERROR
    (lists_dir / "soon.yaml").write_text(BAN_LIST)
    assert running.call(running.server.reload())
    aliased.default = Behaviour("drop")  # the upstream fails: only the stale copy is left
    running.clock.now = BAN_AT - 9.5
    reply = running.query("alias.test", timeout=5)
    assert reply.rcode() == dns.rcode.NOERROR and len(reply.answer) == 3
    assert max(ttls(reply)) == 9  # not RFC 8767's 30 s: the ban comes first
    assert running.resolver.stats.stale == 1


def test_plain_ttls_are_the_floor_of_the_time_left(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream
) -> None:
    running = make_server()
    running.clock.now = FROZEN_NOW + 0.14
    assert ttls(running.query("example.test")) == [300]  # at the instant it came
    for age, left in ((0.5, 299), (0.86, 299), (1.0, 299), (1.01, 298), (299.9, 0)):
        running.clock.now = FROZEN_NOW + 0.14 + age
        assert ttls(running.query("example.test")) == [left], age
    assert upstream.count("example.test") == 1


# --- 19: a fair share of the in-flight budget per client ----------------------------------


def test_one_client_flooding_slow_misses_leaves_room_for_the_others(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream
) -> None:
    upstream.default = Behaviour(delay=0.8)  # every miss is slow...
    fast = [f"v{i}.fast.test" for i in range(40)]
    for name in fast:  # ...but the victim's names
        upstream.behaviours[name] = Behaviour()
    running = make_server(
        inflight=InflightConfig(max=64, per_client=16),
        upstream_timeout=1.2,
        upstream_deadline=2.0,
    )
    stop = threading.Event()
    replies: list[bytes] = []

    def flood() -> None:
        # From another loopback address: another client. Bounded in count and in time.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.2", 0))
            sock.setblocking(False)
            ends = time.monotonic() + 4.0
            for index in range(3000):
                if stop.is_set() or time.monotonic() > ends:
                    break
                query = dns.message.make_query(f"f{index}.slow.test", "A", use_edns=0)
                sock.sendto(query.to_wire(), (running.host, running.port))
                try:
                    while True:
                        replies.append(sock.recv(4096))
                except BlockingIOError:
                    pass
                time.sleep(0.002)

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        time.sleep(0.5)  # the flood holds its share by now
        good = 0
        for name in fast:
            reply = running.query(name, timeout=3)
            good += reply.rcode() != dns.rcode.SERVFAIL
    finally:
        stop.set()
        flooder.join(timeout=6)
    assert good >= 0.95 * len(fast)
    stats = running.resolver.stats
    assert stats.stopped["client_inflight"] > 0
    assert stats.stopped["overload"] == 0
    refused = [dns.message.from_wire(r) for r in replies]
    busy = [r for r in refused if r.rcode() == dns.rcode.SERVFAIL and r.extended_errors()]
    assert busy and "too many queries from this client" in (busy[0].extended_errors()[0].text)
    deadline = time.monotonic() + 5
    while running.resolver.waiting or running.resolver._held:  # every slot given back
        assert time.monotonic() < deadline
        time.sleep(0.1)


# --- 20: health from transport failures, confirmed by probes ------------------------------


def readyz(running: RunningServer) -> int:
    url = f"http://127.0.0.1:{running.server.admin_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def exposition(running: RunningServer) -> str:
    registry = CollectorRegistry()
    registry.register(ResolverCollector(running.server))
    return generate_latest(registry).decode()


def test_rcodes_for_a_broken_domain_leave_the_upstream_healthy(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream
) -> None:
    upstream.behaviours["broken.test"] = Behaviour("servfail")
    upstream.behaviours["refusing.test"] = Behaviour("refused")
    running = make_server(admin=Listen("127.0.0.1", 0))
    for _ in range(5):
        assert running.query("broken.test").rcode() == dns.rcode.SERVFAIL
        assert running.query("refusing.test").rcode() == dns.rcode.SERVFAIL
    forwarder = running.resolver.forwarder
    label = forwarder.upstreams[0].label
    assert forwarder.healthy(forwarder.upstreams[0]) and forwarder.failures[label] == 0
    assert forwarder.errors[(label, "rcode")] >= 10  # counted, as answers that are no answer
    assert readyz(running) == 200
    assert running.query("example.test").answer[0][0].to_text() == "192.0.2.1"
    assert f'resolver_upstream_up{{upstream="{label}"}} 1.0' in exposition(running)


def test_a_silent_upstream_is_down_until_a_probe_gets_an_answer(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream
) -> None:
    running = make_server(
        admin=Listen("127.0.0.1", 0),
        upstream_health=UpstreamHealthConfig(
            max_fails=3, probe_interval=0.2, probe_max_interval=0.4
        ),
    )
    forwarder = running.resolver.forwarder
    up = forwarder.upstreams[0]
    assert readyz(running) == 200
    upstream.default = Behaviour("drop")
    for index in range(2):  # two tries each (a single upstream): four timeouts
        assert running.query(f"gone{index}.test", timeout=5).rcode() == dns.rcode.SERVFAIL
    assert not forwarder.healthy(up)
    assert readyz(running) == 503
    time.sleep(0.8)  # probes go on, and fail
    assert forwarder.probes[(up.label, "failure")] >= 1
    assert not forwarder.healthy(up)
    upstream.default = Behaviour()  # back; no client asks anything meanwhile
    deadline = time.monotonic() + 5
    while not forwarder.healthy(up):
        assert time.monotonic() < deadline, "no probe brought it back"
        time.sleep(0.05)
    assert forwarder.probes[(up.label, "success")] == 1
    assert upstream.count("", "NS") >= 2  # the probes: the root's NS
    assert readyz(running) == 200
    text = exposition(running)
    assert f'resolver_upstream_probes_total{{result="success",upstream="{up.label}"}} 1.0' in text
    assert running.query("example.test").answer[0][0].to_text() == "192.0.2.1"


# --- 21: would-block matches counted and audited whatever the upstream does ---------------


def test_a_would_block_match_is_counted_and_audited_when_the_upstream_fails(
    make_server: Callable[..., RunningServer],
    upstream: FakeUpstream,
    lists_dir: Path,
    tmp_path: Path,
) -> None:
    (lists_dir / "watch.yaml").write_text(
        "list: watch\nactive: {monitor_from: 2020-01-01, from: 2099-01-01}\ndomains: [watch.test]\n"
    )
    log = tmp_path / "audit.jsonl"
    upstream.default = Behaviour("drop")  # unreachable: every exchange times out
    running = make_server(audit=AuditConfig(sink="file", path=log))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(
            dns.message.make_query("www.watch.test", "A").to_wire(), (running.host, running.port)
        )
        time.sleep(0.15)  # the upstream has not answered (nor timed out) yet
        assert running.resolver.stats.would_block["watch"] == 1  # counted when decided
        reply = dns.message.from_wire(sock.recv(4096))
    assert reply.rcode() == dns.rcode.SERVFAIL
    stats = running.resolver.stats
    assert stats.would_block["watch"] == 1
    assert stats.answers[("udp", "A", "SERVFAIL", "monitored")] == 1
    running.stop()  # writes out the audit log
    (entry,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert entry["decision"] == "monitored" and entry["list"] == "watch"
    assert entry["qname"] == "www.watch.test." and entry["rcode"] == "SERVFAIL"
    assert entry["rule"] == "watch.test"
