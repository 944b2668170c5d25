"""A real Prometheus server scrapes a real resolver; its HTTP API must report the numbers
the resolver counted, and the shipped alert rules must load and evaluate cleanly."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers.client import ask
from .helpers.fakeupstream import FakeUpstream
from .helpers.realservers import ROOT, ResolverProcess, free_port, stop_process

pytestmark = pytest.mark.skipif(
    not shutil.which("prometheus"), reason="needs the prometheus package (.ci/run installs it)"
)


class Prometheus:
    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        rules = workdir / "rules.yml"
        shutil.copy(ROOT / "deploy" / "prometheus" / "rules.yml", rules)
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{rules}]\n"
            "scrape_configs:\n"
            f"  - job_name: resolver\n    static_configs: [{{targets: ['{target}']}}]\n"
        )
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.api("/-/ready")
                break
            except OSError:
                assert time.monotonic() < deadline, "Prometheus did not start"
                time.sleep(0.2)

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
        return json.loads(body) if body.startswith("{") else body

    def value(self, query: str) -> float | None:
        result = self.api("/api/v1/query", query=query)["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        stop_process(self.proc, grace=10)


@pytest.fixture
def scraped(
    tmp_path: Path, upstream: FakeUpstream, lists_dir: Path
) -> Iterator[tuple[ResolverProcess, Prometheus]]:
    metrics = f"127.0.0.1:{free_port()}"
    resolver = ResolverProcess(
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream.address,
        "--blocklists",
        str(lists_dir),
        "--metrics",
        metrics,
    )
    prometheus = Prometheus(tmp_path, metrics)
    yield resolver, prometheus
    prometheus.stop()
    resolver.stop()


def test_prometheus_sees_the_blocked_count_and_the_list_state(
    scraped: tuple[ResolverProcess, Prometheus],
) -> None:
    resolver, prometheus = scraped
    for _ in range(7):
        ask(resolver.port, "chat.deepseek.com")
    ask(resolver.port, "example.test")
    query = 'resolver_blocked_total{list="deepseek"}'
    deadline = time.monotonic() + 30
    while prometheus.value(query) != 7:
        assert time.monotonic() < deadline, f"{query} = {prometheus.value(query)}"
        time.sleep(0.5)
    assert prometheus.value('resolver_list_state{list="deepseek",state="enforced"}') == 1
    assert prometheus.value('resolver_list_state{list="deepseek",state="pending"}') == 0
    assert prometheus.value('sum(resolver_responses_total{decision="forwarded"})') == 1
    assert prometheus.value('up{job="resolver"}') == 1
    # The shipped rules load, evaluate without errors, and nothing fires on a healthy resolver.
    deadline = time.monotonic() + 20
    while True:  # until every rule has been evaluated once
        groups = prometheus.api("/api/v1/rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule["health"] != "unknown" for rule in rules):
            break
        assert time.monotonic() < deadline, rules
        time.sleep(0.5)
    assert all(rule["health"] == "ok" for rule in rules), rules
    firing = [rule["name"] for rule in rules if rule.get("state") == "firing"]
    assert firing == []
