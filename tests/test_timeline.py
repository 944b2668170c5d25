"""``GET /v1/timeline`` on the real server with a frozen clock: a pending, a monitor and an
enforced list with their countdowns, and the monitor phase's would-block matches per
client group (queries from two loopback addresses in two groups)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.query
import dns.rcode

from resolver.config import Listen

from .helpers.admin import call
from .helpers.http import TOKEN
from .helpers.server import FROZEN_NOW, Clock, RunningServer

LOOPBACK = Listen("127.0.0.1", 0)
PENDING = """\
list: later
description: a ban announced for August
reference: "Circular 12 (https://gov.example/c12), from 2026-08-01"
timezone: Europe/Brussels
active: {monitor_from: 2026-07-01, from: 2026-08-01}
domains: [later.test]
"""
MONITOR = """\
list: watch
description: monitored before its ban
reference: "Order 3"
timezone: UTC
active: {monitor_from: 2026-05-01, from: 2026-06-15T00:00:00Z}
domains:
  - soon.test
  - {name: extra.test, reference: "Order 3, annex", active: {until: 2027-01-01}}
"""


def _ask(running: RunningServer, name: str, source: str) -> int:
    query = dns.message.make_query(name, "A")
    reply = dns.query.udp(query, running.host, port=running.port, timeout=3, source=source)
    return int(reply.rcode())


def test_timeline_states_countdowns_and_would_block_by_group(
    make_server: Callable[..., RunningServer], lists_dir: Path, clock: Clock, tmp_path: Path
) -> None:
    clock.now = FROZEN_NOW  # 2026-06-01T12:00:00Z
    (lists_dir / "later.yaml").write_text(PENDING)
    (lists_dir / "watch.yaml").write_text(MONITOR)
    running = make_server(
        admin=LOOPBACK,
        admin_token=TOKEN,
        state_dir=tmp_path / "state",
        groups=(("office", ("127.0.0.1/32",)), ("lab", ("127.0.0.2/32",))),
    )
    for source in ("127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.3"):
        assert _ask(running, "soon.test", source) == dns.rcode.NOERROR  # monitored: answered
    assert _ask(running, "deepseek.com", "127.0.0.2") == dns.rcode.NXDOMAIN
    status, doc = call(running.server.admin_port, "GET", "/v1/timeline")
    assert status == 200
    lists = {entry["id"]: entry for entry in doc["lists"]}
    assert lists["later"]["state"] == "pending"
    assert lists["later"]["next_transition"] == "2026-07-01T00:00:00+02:00"
    assert lists["later"]["seconds_to_next"] == 29 * 86400 + 10 * 3600
    assert lists["later"]["enforced_from"] == "2026-08-01T00:00:00+02:00"
    assert lists["later"]["reference_url"] == "https://gov.example/c12"
    watch = lists["watch"]
    assert watch["state"] == "monitor" and watch["timezone"] == "UTC"
    assert watch["next_transition"] == "2026-06-15T00:00:00+00:00"
    assert watch["seconds_to_next"] == 13 * 86400 + 12 * 3600
    assert watch["would_block"] == 4 and watch["blocked"] == 0
    assert watch["would_block_by_group"] == {"": 1, "lab": 1, "office": 2}
    deepseek = lists["deepseek"]
    assert deepseek["state"] == "enforced" and deepseek["blocked"] == 1
    assert deepseek["enforced_from"] == "2025-02-26T00:00:00+01:00"
    assert deepseek["next_transition"] is None and deepseek["seconds_to_next"] is None
    rules = [rule for rule in doc["rules"] if rule["list"] == "watch"]
    assert [rule["name"] for rule in rules] == ["extra.test"]
    assert rules[0]["until"] == "2027-01-01T00:00:00+00:00"
    assert rules[0]["state"] == "monitor" and doc["rules_truncated"] is False


def test_would_block_by_group_adds_up_across_workers() -> None:
    from collections import Counter

    from resolver.observe.counts import Counts
    from resolver.policy.model import ClientGroups, Policy
    from resolver.policy.table import NameTable
    from resolver.service.rules_api import by_group

    groups = ClientGroups({"office": ["10.0.0.0/8"], "lab": ["192.168.0.0/16"]})
    office, lab = groups.bits["office"], groups.bits["lab"]
    first = Counts(would_block_groups=Counter({("watch", 1 | office): 3, ("watch", 1): 1}))
    second = Counts(would_block_groups=Counter({("watch", 1 | office | lab): 2}))
    total = first + second  # what the supervisor does with the workers' counts
    policy = Policy((), (), NameTable(), (), groups=groups)
    assert by_group(policy, total, "watch") == {"": 1, "lab": 2, "office": 5}
    assert by_group(policy, total, "other") == {}
