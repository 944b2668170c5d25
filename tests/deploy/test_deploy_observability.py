"""Checks of the observability files in deploy/: Prometheus config, alert rules and their
unit tests, the Grafana dashboard and its provisioning, all against the resolver's metric
contract (CONTRACT below).

The promtool checks need the Debian package ``prometheus`` and are skipped without it;
the structural checks need only Python.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
RULES_YML = PROMETHEUS_DIR / "rules.yml"
RULES_TEST_YML = PROMETHEUS_DIR / "rules_test.yml"
DASHBOARD_JSON = GRAFANA_DIR / "dashboard.json"
DASHBOARD_PROVIDER = GRAFANA_DIR / "provisioning" / "dashboards" / "resolver.yaml"
DATASOURCE_PROVIDER = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yaml"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: install the Debian package 'prometheus'",
)

# --- The metric contract -----------------------------------------------------------------
# Metric name -> (type, {label: allowed values, or None when any value goes}).
Labels = dict[str, frozenset[str] | None]

PROTO = frozenset({"udp", "tcp", "dot", "doh", "doq"})
QTYPE = frozenset(
    {"A", "AAAA", "CNAME", "MX", "TXT", "NS", "SOA", "PTR", "SRV", "HTTPS", "SVCB", "ANY", "other"}
)
RCODE = frozenset(
    {"NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "FORMERR", "NOTIMP", "BADVERS", "other"}
)
DECISION = frozenset(
    {"blocked", "monitored", "allowed", "cached", "forwarded", "refused", "error", "local"}
)
LIST_STATE = frozenset({"pending", "monitor", "enforced", "expired"})
RELOAD_RESULT = frozenset({"success", "failure"})
TLS_PROTO = frozenset({"dot", "doh", "doq"})
TLS_FAILURE = frozenset({"timeout", "protocol", "version", "closed", "busy"})
UPSTREAM_ERROR = frozenset({"timeout", "network", "malformed", "truncated", "rcode"})
DOQ_REJECTED = frozenset(
    {"connection_limit", "handshake_timeout", "stream_limit", "protocol", "buffer", "slow_stream"}
)

CONTRACT: dict[str, tuple[str, Labels]] = {
    "resolver_requests_total": ("counter", {"proto": PROTO, "qtype": QTYPE}),
    "resolver_responses_total": ("counter", {"rcode": RCODE, "decision": DECISION}),
    "resolver_request_duration_seconds": ("histogram", {"decision": DECISION}),
    "resolver_blocked_total": ("counter", {"list": None}),
    "resolver_would_block_total": ("counter", {"list": None}),
    "resolver_list_rules": ("gauge", {"list": None}),
    "resolver_list_state": ("gauge", {"list": None, "state": LIST_STATE}),
    "resolver_list_activation_timestamp_seconds": ("gauge", {"list": None}),
    "resolver_list_next_transition_timestamp_seconds": ("gauge", {"list": None}),
    "resolver_policy_reloads_total": ("counter", {"result": RELOAD_RESULT}),
    "resolver_policy_last_reload_success_timestamp_seconds": ("gauge", {}),
    "resolver_policy_last_reload_failed": ("gauge", {}),
    "resolver_policy_info": ("gauge", {"digest": None}),
    "resolver_cache_entries": ("gauge", {}),
    "resolver_cache_hits_total": ("counter", {}),
    "resolver_cache_misses_total": ("counter", {}),
    "resolver_cache_evictions_total": ("counter", {}),
    "resolver_upstream_request_duration_seconds": (
        "histogram",
        {"upstream": None, "rcode": RCODE},
    ),
    "resolver_upstream_errors_total": ("counter", {"upstream": None, "kind": UPSTREAM_ERROR}),
    "resolver_upstream_up": ("gauge", {"upstream": None}),
    "resolver_audit_dropped_total": ("counter", {}),
    "resolver_udp_receive_drops_total": ("counter", {"listen": None}),
    "resolver_build_info": ("gauge", {"version": None, "python": None}),
    "resolver_remote_list_last_success_timestamp_seconds": ("gauge", {"list": None}),
    "resolver_remote_list_age_seconds": ("gauge", {"list": None}),
    "resolver_remote_list_refresh_interval_seconds": ("gauge", {"list": None}),
    # The encrypted listeners' TLS (service/tlsmetrics.py).
    "resolver_tls_handshakes_total": ("counter", {"proto": TLS_PROTO}),
    "resolver_tls_handshake_failures_total": (
        "counter",
        {"proto": TLS_PROTO, "reason": TLS_FAILURE},
    ),
    "resolver_tls_certificate_expiry_timestamp_seconds": ("gauge", {}),
    "resolver_tls_certificate_reloads_total": ("counter", {"result": RELOAD_RESULT}),
    # Open connections of each encrypted transport, and DoQ's bounds (service/tlsmetrics.py).
    "resolver_dot_connections": ("gauge", {}),
    "resolver_doh_connections": ("gauge", {}),
    "resolver_doq_connections": ("gauge", {}),
    "resolver_doq_connections_accepted_total": ("counter", {}),
    "resolver_doq_rejected_total": ("counter", {"reason": DOQ_REJECTED}),
}

# Labels that Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# One sample of each metric, with HELP and TYPE, as the resolver exposes them on /metrics.
SAMPLE_EXPOSITION = """\
# HELP resolver_requests_total DNS requests received, by transport and query type.
# TYPE resolver_requests_total counter
resolver_requests_total{proto="udp",qtype="A"} 1027
# HELP resolver_responses_total DNS responses sent, by response code and decision.
# TYPE resolver_responses_total counter
resolver_responses_total{rcode="NOERROR",decision="forwarded"} 990
# HELP resolver_request_duration_seconds Time from receiving a request to answering it.
# TYPE resolver_request_duration_seconds histogram
resolver_request_duration_seconds_bucket{decision="cached",le="0.0001"} 12
resolver_request_duration_seconds_bucket{decision="cached",le="0.001"} 310
resolver_request_duration_seconds_bucket{decision="cached",le="0.01"} 318
resolver_request_duration_seconds_bucket{decision="cached",le="0.1"} 318
resolver_request_duration_seconds_bucket{decision="cached",le="0.5"} 318
resolver_request_duration_seconds_bucket{decision="cached",le="1"} 318
resolver_request_duration_seconds_bucket{decision="cached",le="5"} 318
resolver_request_duration_seconds_bucket{decision="cached",le="+Inf"} 318
resolver_request_duration_seconds_sum{decision="cached"} 0.142
resolver_request_duration_seconds_count{decision="cached"} 318
# HELP resolver_blocked_total Requests blocked, by the list that blocked them.
# TYPE resolver_blocked_total counter
resolver_blocked_total{list="deepseek"} 37
# HELP resolver_would_block_total Requests a list in monitor mode would have blocked.
# TYPE resolver_would_block_total counter
resolver_would_block_total{list="example-ai-services"} 5
# HELP resolver_list_rules Rules in the list, as last loaded.
# TYPE resolver_list_rules gauge
resolver_list_rules{list="deepseek"} 14
# HELP resolver_list_state 1 for the list's current state, 0 for the others.
# TYPE resolver_list_state gauge
resolver_list_state{list="deepseek",state="pending"} 0
resolver_list_state{list="deepseek",state="monitor"} 0
resolver_list_state{list="deepseek",state="enforced"} 1
resolver_list_state{list="deepseek",state="expired"} 0
# HELP resolver_list_activation_timestamp_seconds When enforcement of the list starts (0: always).
# TYPE resolver_list_activation_timestamp_seconds gauge
resolver_list_activation_timestamp_seconds{list="deepseek"} 1.7802e+09
# HELP resolver_list_next_transition_timestamp_seconds When the list's state next changes (0: never).
# TYPE resolver_list_next_transition_timestamp_seconds gauge
resolver_list_next_transition_timestamp_seconds{list="deepseek"} 0
# HELP resolver_policy_reloads_total Policy reload attempts, by result.
# TYPE resolver_policy_reloads_total counter
resolver_policy_reloads_total{result="success"} 3
# HELP resolver_policy_last_reload_success_timestamp_seconds When the policy last loaded without error.
# TYPE resolver_policy_last_reload_success_timestamp_seconds gauge
resolver_policy_last_reload_success_timestamp_seconds 1.7803152e+09
# HELP resolver_policy_last_reload_failed 1 when the most recent reload attempt failed, else 0.
# TYPE resolver_policy_last_reload_failed gauge
resolver_policy_last_reload_failed 0
# HELP resolver_policy_info The policy in force; the value is always 1.
# TYPE resolver_policy_info gauge
resolver_policy_info{digest="sha256:9f86d081884c7d65"} 1
# HELP resolver_cache_entries Entries in the answer cache.
# TYPE resolver_cache_entries gauge
resolver_cache_entries 2048
# HELP resolver_cache_hits_total Cache lookups that found an answer.
# TYPE resolver_cache_hits_total counter
resolver_cache_hits_total 318
# HELP resolver_cache_misses_total Cache lookups that found none.
# TYPE resolver_cache_misses_total counter
resolver_cache_misses_total 672
# HELP resolver_cache_evictions_total Entries evicted to make room.
# TYPE resolver_cache_evictions_total counter
resolver_cache_evictions_total 0
# HELP resolver_upstream_request_duration_seconds Round trip of one query to one upstream.
# TYPE resolver_upstream_request_duration_seconds histogram
resolver_upstream_request_duration_seconds_bucket{upstream="10.0.0.53:53",rcode="NOERROR",le="0.0001"} 0
resolver_upstream_request_duration_seconds_bucket{upstream="10.0.0.53:53",rcode="NOERROR",le="0.01"} 201
resolver_upstream_request_duration_seconds_bucket{upstream="10.0.0.53:53",rcode="NOERROR",le="0.1"} 640
resolver_upstream_request_duration_seconds_bucket{upstream="10.0.0.53:53",rcode="NOERROR",le="1"} 650
resolver_upstream_request_duration_seconds_bucket{upstream="10.0.0.53:53",rcode="NOERROR",le="5"} 650
resolver_upstream_request_duration_seconds_bucket{upstream="10.0.0.53:53",rcode="NOERROR",le="+Inf"} 650
resolver_upstream_request_duration_seconds_sum{upstream="10.0.0.53:53",rcode="NOERROR"} 19.5
resolver_upstream_request_duration_seconds_count{upstream="10.0.0.53:53",rcode="NOERROR"} 650
# HELP resolver_upstream_errors_total Failed upstream queries, by kind of failure.
# TYPE resolver_upstream_errors_total counter
resolver_upstream_errors_total{upstream="10.0.0.53:53",kind="timeout"} 2
# HELP resolver_upstream_up 1 when the upstream is healthy, 0 when it is down.
# TYPE resolver_upstream_up gauge
resolver_upstream_up{upstream="10.0.0.53:53"} 1
# HELP resolver_audit_dropped_total Audit records dropped because the audit queue was full.
# TYPE resolver_audit_dropped_total counter
resolver_audit_dropped_total 0
# HELP resolver_udp_receive_drops_total Queries the kernel dropped before the resolver read them.
# TYPE resolver_udp_receive_drops_total counter
resolver_udp_receive_drops_total{listen="127.0.0.1:53"} 0
# HELP resolver_build_info The resolver's build; the value is always 1.
# TYPE resolver_build_info gauge
resolver_build_info{version="0.1.0",python="3.11.7"} 1
# HELP resolver_remote_list_last_success_timestamp_seconds When the list's remote source was last fetched.
# TYPE resolver_remote_list_last_success_timestamp_seconds gauge
resolver_remote_list_last_success_timestamp_seconds{list="ads"} 1.7803152e+09
# HELP resolver_remote_list_age_seconds Seconds since that successful fetch.
# TYPE resolver_remote_list_age_seconds gauge
resolver_remote_list_age_seconds{list="ads"} 412.5
# HELP resolver_remote_list_refresh_interval_seconds How often the list's remote source is fetched.
# TYPE resolver_remote_list_refresh_interval_seconds gauge
resolver_remote_list_refresh_interval_seconds{list="ads"} 3600
# HELP resolver_tls_handshakes_total TLS handshakes completed by the encrypted listeners.
# TYPE resolver_tls_handshakes_total counter
resolver_tls_handshakes_total{proto="dot"} 118
# HELP resolver_tls_handshake_failures_total TLS handshakes that failed.
# TYPE resolver_tls_handshake_failures_total counter
resolver_tls_handshake_failures_total{proto="dot",reason="timeout"} 3
# HELP resolver_tls_certificate_expiry_timestamp_seconds When the certificate expires.
# TYPE resolver_tls_certificate_expiry_timestamp_seconds gauge
resolver_tls_certificate_expiry_timestamp_seconds 1.7966e+09
# HELP resolver_tls_certificate_reloads_total Reloads of the certificate files by result.
# TYPE resolver_tls_certificate_reloads_total counter
resolver_tls_certificate_reloads_total{result="success"} 2
# HELP resolver_dot_connections Open DNS-over-TLS client connections.
# TYPE resolver_dot_connections gauge
resolver_dot_connections 12
# HELP resolver_doh_connections Open DNS-over-HTTPS client connections.
# TYPE resolver_doh_connections gauge
resolver_doh_connections 40
# HELP resolver_doq_connections Open DNS-over-QUIC client connections.
# TYPE resolver_doq_connections gauge
resolver_doq_connections 3
# HELP resolver_doq_connections_accepted_total DNS-over-QUIC connections accepted.
# TYPE resolver_doq_connections_accepted_total counter
resolver_doq_connections_accepted_total 57
# HELP resolver_doq_rejected_total DNS-over-QUIC bounds hit, by reason.
# TYPE resolver_doq_rejected_total counter
resolver_doq_rejected_total{reason="stream_limit"} 1
"""

# Alert -> (for, severity) as the deployment asks for them.
EXPECTED_ALERTS = {
    "ResolverBanNotEnforced": ("5m", "page"),
    "ResolverPolicyReloadFailing": ("10m", "ticket"),
    "ResolverUpstreamDown": ("2m", "ticket"),
    "ResolverAllUpstreamsDown": ("2m", "page"),
    "ResolverHighServfailRatio": ("10m", None),
    "ResolverHighLatency": ("10m", None),
    "ResolverAuditDropping": (None, None),
    "ResolverDown": ("2m", "page"),
    "ResolverRemoteListStale": ("5m", "ticket"),
    "ResolverRemoteListNeverFetched": ("30m", "ticket"),
    "ResolverPolicyDigestMismatch": ("10m", "ticket"),
}

# --- PromQL helpers ----------------------------------------------------------------------
NAME_RE = re.compile(r"\bresolver_[a-z_]+")
STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
SELECTOR_RE = re.compile(r"\b(resolver_[a-z_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
PLAIN_ALTERNATION_RE = re.compile(r"^[A-Za-z0-9_]+(?:\|[A-Za-z0-9_]+)*$")


def contract_name(name: str) -> str | None:
    """The contract metric that series name ``name`` belongs to, or None."""
    if name in CONTRACT:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and CONTRACT.get(base, ("", {}))[0] == "histogram":
            return base
    return None


def metric_names(expr: str) -> set[str]:
    """The resolver_ series names an expression reads (string literals left out)."""
    return set(NAME_RE.findall(STRING_RE.sub('""', expr)))


def available_labels(expr: str) -> set[str]:
    """Labels the series of ``expr`` can carry: their contract labels, the target labels,
    and ``le`` where histogram buckets are read."""
    labels = set(TARGET_LABELS)
    for name in metric_names(expr):
        base = contract_name(name)
        if base is not None:
            labels |= set(CONTRACT[base][1])
        if name.endswith("_bucket"):
            labels.add("le")
    return labels


def promql_problems(expr: str) -> list[str]:
    """Where ``expr`` strays from the contract: unknown metrics, unknown labels, label
    values outside a label's enumeration."""
    problems = []
    names = metric_names(expr)
    if not names and "up{" not in expr:
        problems.append("reads no resolver_ metric")
    for name in sorted(names):
        if contract_name(name) is None:
            problems.append(f"{name}: not in the metric contract")
    for name, body in SELECTOR_RE.findall(expr):
        base = contract_name(name)
        if base is None:
            continue
        known = CONTRACT[base][1]
        for label, op, value in MATCHER_RE.findall(body):
            if label == "le" and name.endswith("_bucket"):
                continue
            if label in TARGET_LABELS:
                continue
            if label not in known:
                problems.append(f"{name}: no label {label!r}")
                continue
            allowed = known[label]
            if allowed is None or "$" in value:
                continue
            if op in ("=~", "!~"):
                if not PLAIN_ALTERNATION_RE.match(value):
                    continue
                values = value.split("|")
            else:
                values = [value]
            problems.extend(
                f"{name}: {label}={v!r} is not one of {sorted(allowed)}"
                for v in values
                if v not in allowed
            )
    labels = available_labels(expr)
    for group in GROUPING_RE.findall(STRING_RE.sub('""', expr)):
        for label in filter(None, (part.strip() for part in group.split(","))):
            if label not in labels:
                problems.append(f"grouping by {label!r}, which no series here has")
    return problems


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule
        for group in load_yaml(RULES_YML)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def load_dashboard() -> dict[str, Any]:
    with DASHBOARD_JSON.open(encoding="utf-8") as f:
        dashboard: dict[str, Any] = json.load(f)
    return dashboard


def dashboard_targets() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in load_dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


# --- promtool ------------------------------------------------------------------------------
@needs_promtool
def test_promtool_check_config() -> None:
    result = run_promtool("check", "config", str(PROMETHEUS_YML))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(RULES_YML))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "duplicate" not in (result.stdout + result.stderr).lower()


@needs_promtool
def test_promtool_test_rules() -> None:
    result = run_promtool("test", "rules", str(RULES_TEST_YML))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_contract_exposition_passes_promtool_lint() -> None:
    """The contract's names, types and units follow Prometheus' naming conventions."""
    result = run_promtool("check", "metrics", stdin=SAMPLE_EXPOSITION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).strip() == ""


@needs_promtool
def test_prometheus_client_rendering_of_contract_passes_promtool_lint() -> None:
    """The contract as prometheus_client renders it (with its _created series) lints clean."""
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    for name, (kind, labels) in CONTRACT.items():
        values = [sorted(allowed)[0] if allowed else "x" for allowed in labels.values()]
        if kind == "counter":
            counter = prometheus_client.Counter(name, "help", list(labels), registry=registry)
            (counter.labels(*values) if labels else counter).inc()
        elif kind == "gauge":
            gauge = prometheus_client.Gauge(name, "help", list(labels), registry=registry)
            (gauge.labels(*values) if labels else gauge).set(1)
        else:
            histogram = prometheus_client.Histogram(
                name,
                "help",
                list(labels),
                buckets=(0.0001, 0.001, 0.01, 0.1, 0.5, 1, 5),
                registry=registry,
            )
            histogram.labels(*values).observe(0.002)
    text = prometheus_client.generate_latest(registry).decode()
    for name in CONTRACT:
        assert f"# TYPE {name} " in text
    result = run_promtool("check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """promtool parses every dashboard expression (Grafana's variables filled in)."""
    substitutions = {
        "$__rate_interval": "1m",
        "$__interval": "1m",
        "$__range": "1h",
        "$instance": ".*",
    }
    rules = []
    for index, (panel, target) in enumerate(dashboard_targets()):
        expr = target["expr"]
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"panel {panel['title']!r}: unknown variable in {expr}"
        rules.append({"record": f"dashboard:panel{panel['id']}:target{index}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- The contract sample -------------------------------------------------------------------
def test_sample_exposition_has_every_contract_metric() -> None:
    for name, (kind, labels) in CONTRACT.items():
        assert f"# HELP {name} " in SAMPLE_EXPOSITION, name
        assert f"# TYPE {name} {kind}\n" in SAMPLE_EXPOSITION, name
        series = f"{name}_count" if kind == "histogram" else name
        match = re.search(rf"^{series}(\{{[^}}]*\}})? ", SAMPLE_EXPOSITION, re.MULTILINE)
        assert match, f"no sample of {name}"
        found = set(re.findall(r"(\w+)=", match.group(1) or ""))
        assert found == set(labels), f"{name}: labels {found} != {set(labels)}"
    typed = set(re.findall(r"^# TYPE (\S+) ", SAMPLE_EXPOSITION, re.MULTILINE))
    assert typed == set(CONTRACT)


# --- Prometheus configuration --------------------------------------------------------------
def test_scrape_config() -> None:
    config = load_yaml(PROMETHEUS_YML)
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == ["rules.yml"]
    assert (PROMETHEUS_YML.parent / "rules.yml").is_file()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["resolver"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert set(targets) == {"resolver:9153", "localhost:9153"}


def test_alert_rules_shape() -> None:
    groups = load_yaml(RULES_YML)["groups"]
    assert [group["name"] for group in groups] == ["resolver"]
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "one rule per alert name"
    assert set(EXPECTED_ALERTS) <= set(names)
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no `for`"
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), name
        assert "$labels." in annotations["description"], f"{name}: no label values"
        expected_for, expected_severity = EXPECTED_ALERTS.get(name, (None, None))
        if expected_for is not None:
            assert rule["for"] == expected_for, name
        if expected_severity is not None:
            assert rule["labels"]["severity"] == expected_severity, name


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_rule_uses_only_contract_metrics(rule: dict[str, Any]) -> None:
    expr = rule["expr"]
    assert promql_problems(expr) == []
    labels = available_labels(expr) | set(rule["labels"])
    for text in rule["annotations"].values():
        for label in re.findall(r"\$labels\.(\w+)", text):
            assert label in labels, f"annotation reads $labels.{label}, absent from {expr}"


def test_promql_checker_catches_mistakes() -> None:
    """The contract checks above do fail on the mistakes they are there for."""
    assert promql_problems("rate(resolver_request_total[5m])")
    assert promql_problems('resolver_responses_total{decision="forward"}')
    assert promql_problems('resolver_list_state{state=~"enforced|expird"} == 1')
    assert promql_problems('resolver_blocked_total{lists="x"}')
    assert promql_problems("sum by (lists) (resolver_blocked_total)")
    assert promql_problems("resolver_cache_hits_total_count")
    assert promql_problems("resolver_request_duration_seconds_bucket") == []
    assert (
        promql_problems(
            'sum by (le) (resolver_upstream_request_duration_seconds_bucket{rcode="NOERROR"})'
        )
        == []
    )


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(RULES_TEST_YML)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "alerts never seen firing in rules_test.yml"
    assert names - quiet == set(), "alerts never seen quiet in rules_test.yml"


# --- Grafana -------------------------------------------------------------------------------
def test_dashboard_template_variables() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] == 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource = variables["DS_PROMETHEUS"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query"
    assert instance["datasource"]["uid"] == "${DS_PROMETHEUS}"
    query = instance["query"]
    query = query["query"] if isinstance(query, dict) else query
    assert query == "label_values(resolver_build_info, instance)"


def test_dashboard_panels_unique_ids_and_no_overlap() -> None:
    panels = load_dashboard()["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    boxes = []
    for panel in panels:
        pos = panel["gridPos"]
        x, y, w, h = pos["x"], pos["y"], pos["w"], pos["h"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0, panel["title"]
        assert x + w <= 24, f"{panel['title']!r} is wider than the grid"
        boxes.append((panel["title"], x, y, w, h))
    for i, (title_a, xa, ya, wa, ha) in enumerate(boxes):
        for title_b, xb, yb, wb, hb in boxes[i + 1 :]:
            overlap = xa < xb + wb and xb < xa + wa and ya < yb + hb and yb < ya + ha
            assert not overlap, f"{title_a!r} overlaps {title_b!r}"


def test_dashboard_panels_query_the_template_datasource() -> None:
    for panel in load_dashboard()["panels"]:
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, title
        targets = panel.get("targets", [])
        assert any(target.get("expr", "").strip() for target in targets), title
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), f"{title}: duplicate refIds"
        for target in targets:
            if "datasource" in target:
                assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", title


@pytest.mark.parametrize(
    "panel", load_dashboard()["panels"], ids=lambda panel: f"{panel['id']}-{panel['title']}"
)
def test_dashboard_panel_uses_only_contract_metrics(panel: dict[str, Any]) -> None:
    for target in panel["targets"]:
        expr = target["expr"]
        assert promql_problems(expr) == []
        for name, body in SELECTOR_RE.findall(expr):
            assert 'instance=~"$instance"' in body, f"{name} ignores the instance variable"
        legend = target.get("legendFormat", "")
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            assert label in available_labels(expr), f"legend reads {label}, absent from {expr}"


def test_dashboard_shows_every_contract_metric() -> None:
    shown = {
        contract_name(name)
        for _, target in dashboard_targets()
        for name in metric_names(target["expr"])
    }
    assert set(CONTRACT) - shown == set()


def test_dashboard_required_panels() -> None:
    panels = load_dashboard()["panels"]

    def find(pattern: str) -> dict[str, Any]:
        regex = re.compile(pattern)
        found = [p for p in panels if any(regex.search(t["expr"]) for t in p["targets"])]
        assert found, f"no panel queries {pattern}"
        return found[0]

    qps = find(
        r"sum by \(decision\) \(rate\(resolver_responses_total\{[^}]*\}\[\$__rate_interval\]\)\)"
    )
    assert qps["type"] == "timeseries"
    assert find(r"sum by \(list\) \(rate\(resolver_blocked_total")["type"] == "timeseries"
    assert find(r"sum by \(list\) \(rate\(resolver_would_block_total")["type"] == "timeseries"
    assert find(r"resolver_list_state\{[^}]*\} == 1")["type"] in {"table", "state-timeline"}
    transitions = find(r"resolver_list_next_transition_timestamp_seconds\{[^}]*\} \* 1000")
    assert transitions["type"] == "table"
    assert transitions["fieldConfig"]["defaults"]["unit"] == "dateTimeAsIso"
    latency = find(r"histogram_quantile\(0\.99, sum by \(decision, le\)")
    quantiles = {
        match
        for target in latency["targets"]
        for match in re.findall(r"histogram_quantile\(([\d.]+)", target["expr"])
    }
    assert quantiles == {"0.5", "0.95", "0.99"}
    assert find(r"resolver_cache_hits_total")["fieldConfig"]["defaults"]["unit"] == "percentunit"
    find(r"resolver_upstream_up")
    find(r"histogram_quantile\(.*resolver_upstream_request_duration_seconds_bucket")
    find(r"resolver_policy_last_reload_success_timestamp_seconds")
    find(r"resolver_policy_last_reload_failed")
    find(r"sum by \(result\) \(rate\(resolver_policy_reloads_total")
    find(r"resolver_policy_info")
    find(r"resolver_audit_dropped_total")


def test_grafana_provisioning() -> None:
    dashboards = load_yaml(DASHBOARD_PROVIDER)
    assert dashboards["apiVersion"] == 1
    [provider] = dashboards["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"

    datasources = load_yaml(DATASOURCE_PROVIDER)
    assert datasources["apiVersion"] == 1
    [prometheus] = datasources["datasources"]
    assert prometheus["type"] == "prometheus"
    assert prometheus["uid"] == "prometheus"
    assert prometheus["url"] == "http://prometheus:9090"
    # $__rate_interval is right only when Grafana knows the scrape interval.
    scrape_interval = load_yaml(PROMETHEUS_YML)["global"]["scrape_interval"]
    assert prometheus["jsonData"]["timeInterval"] == scrape_interval
    # The dashboard's data source variable defaults to the provisioned data source.
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["current"]["value"] == prometheus["uid"]
