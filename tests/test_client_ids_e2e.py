"""Client ids end to end (issue 19 item 5): real DoT, DoH and DoQ clients against the real
server, a certificate for ``*.dns.example.test`` made by a test CA. The id named by the TLS
server name (``laptop-7.dns.example.test``, DoT and DoQ) or by the DoH path
(``/dns-query/laptop-7``) brings the client into the group that lists it, so that a list
for that group blocks the name for that client only: not for another id, not for the
domain itself, not for a plain UDP client. The id is in the audit record, and each query
is counted under its transport."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest

from resolver.config import DoHConfig, DoQConfig, DoTConfig, Listen, TLSConfig
from resolver.observe.querylog import AuditConfig

from . import test_client_ids
from .helpers.http import http
from .helpers.server import RunningServer
from .helpers.testca import TestCA
from .helpers.wait import wait_for

DOMAIN = "dns.example.test"
#: Whether an answer is the finance list's (its SOA names the list).
blocked = test_client_ids.blocked


@pytest.fixture
def server(
    make_server: Callable[..., RunningServer], lists_dir: Path, tmp_path: Path
) -> RunningServer:
    (lists_dir / "finance.yaml").write_text(test_client_ids.FINANCE_LIST)
    ca = TestCA(tmp_path)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    ca.issue(cert, key, names=(DOMAIN, f"*.{DOMAIN}", "127.0.0.1"))
    quic = pytest.importorskip("aioquic") is not None
    running = make_server(
        tls=TLSConfig(cert=cert, key=key, client_id_domain=DOMAIN),
        dot=DoTConfig(listen=(Listen("127.0.0.1", 0),)),
        doh=DoHConfig(listen=(Listen("127.0.0.1", 0),)),
        doq=DoQConfig(listen=(Listen("127.0.0.1", 0),) if quic else ()),
        group_ids=(("finance", ("laptop-7",)),),
        groups=(("finance", ()),),
        audit=AuditConfig(sink="file", path=tmp_path / "audit.jsonl", what="all"),
        metrics=Listen("127.0.0.1", 0),
    )
    running.ca = ca  # type: ignore[attr-defined]
    return running


def port(server: RunningServer, proto: str) -> int:
    return next(b.port for b in server.server.bound if b.proto == proto)


def over_dot(server: RunningServer, name: str) -> dns.message.Message:
    context = ssl.create_default_context(cafile=str(server.ca.path))  # type: ignore[attr-defined]
    query = dns.message.make_query("finance.test", "A")
    return dns.query.tls(query, "127.0.0.1", port=port(server, "dot"), timeout=5,
                         ssl_context=context, server_hostname=name)  # fmt: skip


def over_doh(server: RunningServer, path: str) -> dns.message.Message:
    context = ssl.create_default_context(cafile=str(server.ca.path))  # type: ignore[attr-defined]
    query = dns.message.make_query("finance.test", "A")
    return dns.query.https(
        query, f"https://{DOMAIN}:{port(server, 'doh')}{path}", timeout=5,
        bootstrap_address="127.0.0.1", verify=context,
    )  # fmt: skip


def over_doq(server: RunningServer, name: str) -> dns.message.Message:
    query = dns.message.make_query("finance.test", "A")
    return dns.query.quic(query, "127.0.0.1", port=port(server, "doq"), timeout=5,
                          verify=str(server.ca.path), server_hostname=name)  # type: ignore[attr-defined]  # fmt: skip


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    log = tmp_path / "audit.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_the_id_of_a_dot_and_a_doh_client_selects_its_group(
    server: RunningServer, tmp_path: Path
) -> None:
    # Twice each: the second answer may come from the memo, which keeps the ids apart.
    for _ in range(2):
        assert blocked(over_dot(server, f"laptop-7.{DOMAIN}"))
        assert blocked(over_dot(server, f"LAPTOP-7.{DOMAIN}"))
        assert not blocked(over_dot(server, f"laptop-8.{DOMAIN}"))
        assert not blocked(over_dot(server, DOMAIN))
        assert blocked(over_doh(server, "/dns-query/laptop-7"))
        assert not blocked(over_doh(server, "/dns-query/laptop-8"))
        assert not blocked(over_doh(server, "/dns-query"))
        assert not blocked(server.query("finance.test"))  # plain UDP, same address
    wait_for(lambda: len(audit(tmp_path)) >= 16)
    records = audit(tmp_path)
    ids = [(r["proto"], r.get("client_id"), r["decision"]) for r in records]
    assert ids.count(("dot", "laptop-7", "blocked")) == 4
    assert ids.count(("doh", "laptop-7", "blocked")) == 2
    assert ("dot", "laptop-8", "blocked") not in ids and ("dot", "laptop-8", "forwarded") in ids
    assert any(p == "doh" and i == "laptop-8" and d != "blocked" for p, i, d in ids)
    assert all(i is None for p, i, _ in ids if p == "udp")
    assert [r.get("list") for r in records if r.get("client_id") == "laptop-7"] == [
        "finance-only"
    ] * 6
    # Each query counted under its transport.
    _, text, _ = http(f"http://127.0.0.1:{server.server.metrics_port}/metrics")
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")
    assert float(samples['resolver_requests_total{proto="dot",qtype="A"}']) == 8
    assert float(samples['resolver_requests_total{proto="doh",qtype="A"}']) == 6
    assert float(samples['resolver_requests_total{proto="udp",qtype="A"}']) == 2


def test_the_id_of_a_doq_client_selects_its_group(server: RunningServer, tmp_path: Path) -> None:
    pytest.importorskip("aioquic")
    assert blocked(over_doq(server, f"laptop-7.{DOMAIN}"))
    assert not blocked(over_doq(server, f"laptop-8.{DOMAIN}"))
    assert not blocked(over_doq(server, DOMAIN))
    wait_for(lambda: len(audit(tmp_path)) >= 3)
    ids = [(r["proto"], r.get("client_id"), r["decision"]) for r in audit(tmp_path)]
    assert ("doq", "laptop-7", "blocked") in ids
    assert ("doq", "laptop-8", "blocked") not in ids


@pytest.mark.skipif(shutil.which("kdig") is None, reason="kdig (knot-dnsutils) not installed")
def test_kdig_names_the_client_by_sni_over_dot_and_by_path_over_doh(server: RunningServer) -> None:
    ca = str(server.ca.path)  # type: ignore[attr-defined]

    def kdig(*args: str) -> str:
        done = subprocess.run(
            ["kdig", "@127.0.0.1", f"+tls-ca={ca}", f"+tls-hostname={DOMAIN}", "+time=5",
             "+retry=0", *args, "finance.test", "A"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    dot, doh = str(port(server, "dot")), str(port(server, "doh"))
    assert "finance-only.blocked.invalid" in kdig("-p", dot, f"+tls-sni=laptop-7.{DOMAIN}")
    assert "finance-only" not in kdig("-p", dot, f"+tls-sni=laptop-8.{DOMAIN}")
    assert "finance-only.blocked.invalid" in kdig("-p", doh, "+https=/dns-query/laptop-7")
    assert "finance-only" not in kdig("-p", doh, "+https=/dns-query/laptop-8")
