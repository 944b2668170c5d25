"""Shared fixtures: a fake upstream, list files, a clock, and the real server on loopback
(:class:`tests.helpers.server.RunningServer`, bound to port 0 on 127.0.0.1 and ::1).
Plain helpers live in tests/helpers/; this file holds fixtures only."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from resolver.config import Config, UDPConfig, parse_listen
from resolver.upstream.endpoints import parse_upstream

from .helpers.fakeupstream import FakeUpstream
from .helpers.server import Clock, RunningServer


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream(
        records={
            ("example.test", "A"): ["192.0.2.1"],
            ("example.test", "AAAA"): ["2001:db8::1"],
            ("www.example.test", "A"): ["192.0.2.2"],
            ("notdeepseek.com", "A"): ["192.0.2.3"],
            ("allowed.test", "A"): ["192.0.2.4"],
            ("big.test", "TXT"): [f'"{i}{"x" * 200}"' for i in range(10)],
            ("mixed.case.test", "A"): ["192.0.2.5"],
            ("soon.test", "A"): ["192.0.2.6"],
        }
    )
    yield fake
    fake.close()


DEEPSEEK_LIST = """\
list: deepseek
description: DeepSeek AI services
reference: "test ban, effective 2025-02-26"
timezone: Europe/Brussels
active:
  from: 2025-02-26
action: nxdomain
ttl: 60
domains:
  - deepseek.com
  - Deepseeksvc.COM.
"""


@pytest.fixture
def lists_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "blocklists"
    folder.mkdir()
    (folder / "deepseek.yaml").write_text(DEEPSEEK_LIST)
    return folder


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_server(
    upstream: FakeUpstream, lists_dir: Path, clock: Clock
) -> Iterator[Callable[..., RunningServer]]:
    started: list[RunningServer] = []

    def start(**overrides: Any) -> RunningServer:
        listen = overrides.pop("listen", ["127.0.0.1:0"])
        use_clock = overrides.pop("clock", clock)
        config = Config(
            listen=tuple(parse_listen(x) if isinstance(x, str) else x for x in listen),
            upstreams=(parse_upstream(upstream.address),),
            blocklists=lists_dir,
            upstream_timeout=0.4,
            upstream_deadline=1.5,
            drain_timeout=2.0,
        )
        config = replace(config, **overrides)
        running = RunningServer(config, use_clock)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def server(make_server: Callable[..., RunningServer]) -> RunningServer:
    return make_server()


@pytest.fixture(params=[True, False], ids=["udp-batch", "udp-single"])
def udp(request: pytest.FixtureRequest) -> UDPConfig:
    """Both UDP listeners: batched (service/udpbatch.py, where the system has recvmmsg) and one
    datagram at a time (service/listeners.py, UDPListener)."""
    return UDPConfig(batch=request.param)
