"""The outcome type is the one list of decisions: metrics, the audit log, explain and the
admin API's OpenAPI description all take theirs from it."""

from __future__ import annotations

import json
from pathlib import Path

from resolver.core.outcome import DECISIONS, POLICY_OUTCOMES, Outcome
from resolver.core.stats import Stats
from resolver.observe import querylog

SPEC = Path(__file__).resolve().parent.parent / "resolver" / "schema" / "admin.openapi.json"


def test_the_openapi_explain_decision_enum_is_the_outcome_types_policy_part() -> None:
    spec = json.loads(SPEC.read_text())
    enum = spec["components"]["schemas"]["Explain"]["properties"]["decision"]["enum"]
    assert enum == list(POLICY_OUTCOMES)
    assert set(POLICY_OUTCOMES) <= {o.value for o in Outcome}


def test_metrics_and_the_audit_log_take_the_outcome_types_labels() -> None:
    assert tuple(o.value for o in Outcome) == DECISIONS
    assert set(Stats().durations) == set(DECISIONS)
    assert frozenset(DECISIONS) == querylog.DECISIONS
    assert {Outcome.BLOCKED, Outcome.MONITORED} == querylog.BLOCKED_DECISIONS
