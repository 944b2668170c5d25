"""The console's metrics: sessions held and evicted, wrong logins and lockouts.

Read at scrape from the admin listener's session table (``HTTPServer.sessions``); nothing
here runs per request.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .sessions import SessionTable


class ConsoleCollector(Collector):
    """resolver_console_* from the session tables of a server's HTTP listeners."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        tables = [
            table
            for http in getattr(self.server, "http_servers", ())
            if isinstance(table := getattr(http, "sessions", None), SessionTable)
        ]
        if not tables:
            return
        yield GaugeMetricFamily(
            "resolver_console_sessions",
            "Console sessions held (bounded; the oldest is evicted to make room).",
            value=sum(len(t) for t in tables),
        )
        sessions = CounterMetricFamily(
            "resolver_console_sessions_ended",
            "Console sessions ended, by reason: evicted (the table was full), expired "
            "(idle or past their lifetime), logout, revoked (the admin token changed).",
            labels=["reason"],
        )
        sessions.add_metric(["evicted"], sum(t.evicted for t in tables))
        sessions.add_metric(["expired"], sum(t.expired for t in tables))
        sessions.add_metric(["logout"], sum(t.ended for t in tables))
        sessions.add_metric(["revoked"], sum(t.revoked for t in tables))
        yield sessions
        logins = CounterMetricFamily(
            "resolver_console_logins",
            "Console logins, by result: ok, wrong (a wrong token), locked (refused while "
            "the client was locked out after too many wrong tokens).",
            labels=["result"],
        )
        logins.add_metric(["ok"], sum(t.guard.succeeded for t in tables))
        logins.add_metric(["wrong"], sum(t.guard.failed for t in tables))
        logins.add_metric(["locked"], sum(t.guard.refused for t in tables))
        yield logins
        yield CounterMetricFamily(
            "resolver_console_lockouts",
            "Clients locked out of the console's login after too many wrong tokens.",
            value=sum(t.guard.lockouts for t in tables),
        )
        yield CounterMetricFamily(
            "resolver_console_global_lockouts",
            "Times every client was locked out of the login and the bearer token at once, "
            "after too many wrong tokens from many clients together.",
            value=sum(t.guard.global_lockouts for t in tables),
        )
