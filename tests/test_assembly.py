"""The one map from config to components (resolver/service/assembly.py): a reload from one
config to another leaves every reloadable setting as a fresh start with the new one would."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from resolver.config import (
    AclConfig,
    CacheConfig,
    Config,
    InflightConfig,
    Listen,
    RateLimitConfig,
    RebindingConfig,
    UpstreamHealthConfig,
    parse_upstream,
)
from resolver.core.pipeline import Resolver
from resolver.policy import load_policy
from resolver.service import assembly


def settings(resolver: Resolver) -> dict[str, Any]:
    """What the config sets on the components, as plain values."""
    cache, forwarder, guard = resolver.cache, resolver.forwarder, resolver.guard
    assert guard is not None
    return {
        "cache": (
            cache.max_entries,
            cache.min_ttl,
            cache.max_ttl,
            cache.max_negative_ttl,
            cache.serve_stale,
            cache.prefetch,
            cache.max_bytes,
        ),
        "memo": (resolver.stale_timer, resolver.memo_max_bytes, resolver.memo_max_entries),
        "forwarding": (
            forwarder.upstreams,
            forwarder.timeout,
            forwarder.deadline,
            forwarder.strategy,
            forwarder.routes,
            forwarder.max_fails,
            forwarder.probe_interval,
            forwarder.probe_max_interval,
            forwarder.probe_name,
        ),
        "inflight": (resolver.max_inflight, resolver.max_inflight_per_client),
        "rebinding": (resolver.internal_zones, resolver.rebinding is not None),
        "guard": (
            [str(n) for n in guard.networks],
            guard.denied,
            guard.rate,
            guard.burst,
            guard.over_limit,
            guard.ipv6_prefix,
            guard.max_clients,
        ),
    }


OLD = Config(listen=(Listen("127.0.0.1", 5399),), upstreams=(parse_upstream("192.0.2.1"),))
NEW = replace(
    OLD,
    upstreams=(parse_upstream("192.0.2.2"), parse_upstream("tcp://192.0.2.3:5300")),
    upstream_timeout=0.7,
    upstream_deadline=1.9,
    upstream_strategy="fastest",
    forward=(("corp.example", (parse_upstream("10.0.0.1"),)),),
    cache=CacheConfig(
        max_entries=1234,
        min_ttl=5,
        max_ttl=600,
        max_negative_ttl=60,
        serve_stale=30.0,
        stale_timer=0.4,
        prefetch=True,
        max_bytes=1 << 22,
        memo_max_bytes=1 << 20,
        memo_max_entries=99,
    ),
    acl=AclConfig(("10.0.0.0/8",), "drop"),
    ratelimit=RateLimitConfig(qps=10.0, burst=20.0, over_limit="truncate", ipv6_prefix=48),
    rebinding=RebindingConfig(True, ("corp.example",)),
    upstream_health=UpstreamHealthConfig(
        max_fails=7, probe_interval=2.0, probe_max_interval=9.0, probe_name="example.com"
    ),
    inflight=InflightConfig(max=500, per_client=20),
)


@pytest.fixture
def policy(tmp_path: Path) -> Any:
    return load_policy(tmp_path)


def test_reload_equals_a_fresh_build(policy: Any) -> None:
    fresh = assembly.build(NEW, policy, lambda: 0.0)
    running = assembly.build(OLD, policy, lambda: 0.0)
    assert settings(running) != settings(fresh)
    assembly.reconfigure(running, OLD, NEW)
    assert settings(running) == settings(fresh)


def test_reload_back_equals_the_first_build(policy: Any) -> None:
    first = assembly.build(OLD, policy, lambda: 0.0)
    running = assembly.build(NEW, policy, lambda: 0.0)
    assembly.reconfigure(running, NEW, OLD)
    assert settings(running) == settings(first)


def test_restart_only_settings_are_named(policy: Any, caplog: pytest.LogCaptureFixture) -> None:
    running = assembly.build(OLD, policy, lambda: 0.0)
    changed = replace(OLD, listen=(Listen("127.0.0.1", 5400),), workers=2)
    with caplog.at_level(logging.WARNING, logger="resolver"):
        assembly.reconfigure(running, OLD, changed)
    named = [r.getMessage().split("'")[1] for r in caplog.records if "restart" in r.getMessage()]
    assert named == ["listen", "workers"]


def test_guard_is_kept_when_its_settings_do_not_change(policy: Any) -> None:
    running = assembly.build(OLD, policy, lambda: 0.0)
    guard = running.guard
    assembly.reconfigure(running, OLD, replace(OLD, upstream_timeout=0.3))
    assert running.guard is guard  # its buckets survive an unrelated reload
