"""The transport and the client id of a query, through the pipeline: the ``proto`` label
of the answer metrics and the audit record for every transport (memo hits included),
client ids mapped to config groups (the union with the address's groups), the audit
record's ``client_id`` and its report, and explain (CLI and admin API) with a client id."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest

from resolver.config import load_config
from resolver.core.pipeline import Resolver
from resolver.core.stats import PROTO_DOH, PROTO_DOQ, PROTO_DOT, PROTO_TCP, PROTO_UDP
from resolver.observe.querylog import AuditConfig, AuditLog
from resolver.policy import ClientGroups
from resolver.yamlload import SourceError

from .helpers.cli import run_cli
from .helpers.fakeupstream import FakeUpstream
from .helpers.http import TOKEN, check_against_spec, http, urls
from .helpers.realservers import ResolverProcess, free_port
from .helpers.server import RunningServer
from .helpers.wait import wait_for

FINANCE_LIST = """\
list: finance-only
reference: test
clients: [finance]
action: nxdomain
domains: [finance.test]
"""


def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


# The config.


def test_a_group_names_networks_ids_or_both_and_the_list_form_stays(tmp_path: Path) -> None:
    config = load_config(
        write_config(
            tmp_path / "c.yaml",
            "groups:\n"
            "  staff: [10.0.0.0/8]\n"
            "  finance: {networks: [10.1.0.0/16], ids: [Laptop-7, finance]}\n"
            "  roaming: {ids: [phone-1]}\n",
        )
    )
    assert config.groups == (
        ("staff", ("10.0.0.0/8",)),
        ("finance", ("10.1.0.0/16",)),
        ("roaming", ()),
    )
    assert config.group_ids == (("finance", ("laptop-7", "finance")), ("roaming", ("phone-1",)))
    groups = ClientGroups(dict(config.groups), dict(config.group_ids))
    assert groups.mask_of_id("laptop-7") == groups.bits["finance"]
    assert groups.mask_of_id("LAPTOP-7") == groups.bits["finance"]  # ids ignore case
    assert groups.mask_of_id("phone-1") == groups.bits["roaming"]
    assert groups.mask_of_id("nobody") == 0


@pytest.mark.parametrize(
    ("body", "field", "line"),
    [
        ("groups:\n  a: {ids: [bad_id]}\n", "groups.a.ids[0]", 2),
        ("groups:\n  a: {ids: [-x]}\n", "groups.a.ids[0]", 2),
        ("groups:\n  a: {ids: []}\n", "groups.a.ids", 2),
        ("groups:\n  a: {names: [x]}\n", "groups.a", 2),
        ("groups:\n  a: {}\n", "groups.a", 2),
        ("groups:\n  a: {ids: [" + "x" * 64 + "]}\n", "groups.a.ids[0]", 2),
    ],
)
def test_bad_client_ids_are_errors_with_file_line_and_field(
    tmp_path: Path, body: str, field: str, line: int
) -> None:
    path = write_config(tmp_path / "c.yaml", body)
    with pytest.raises(SourceError) as caught:
        load_config(path)
    text = str(caught.value)
    assert f"{path}:{line}:" in text and field in text


# The pipeline: the real server on loopback, queries handed to it as the encrypted
# listeners hand theirs (Resolver.handle with proto and client_id).


@pytest.fixture
def finance_server(
    make_server: Callable[..., RunningServer], lists_dir: Path, tmp_path: Path
) -> RunningServer:
    (lists_dir / "finance.yaml").write_text(FINANCE_LIST)
    return make_server(
        groups=(("finance", ("10.1.0.0/16",)),),
        group_ids=(("finance", ("laptop-7",)),),
        audit=AuditConfig(sink="file", path=tmp_path / "audit.jsonl", what="all"),
    )


def ask(
    server: RunningServer,
    name: str,
    client: str,
    proto: int,
    client_id: str = "",
    rtype: str = "A",
) -> dns.message.Message:
    """The answer of ``server``'s pipeline to a query over ``proto``, as a listener gets it."""
    query = dns.message.make_query(name, rtype).to_wire()

    async def handle() -> Any:
        result = server.resolver.handle(query, client, proto != PROTO_UDP, proto, client_id)
        return await result if result is not None and not isinstance(result, bytes) else result

    return dns.message.from_wire(server.call(handle()))


def test_a_client_id_brings_its_groups_and_the_memo_keeps_them_apart(
    finance_server: RunningServer,
) -> None:
    server = finance_server
    outside = "127.0.0.9"
    for _ in range(2):  # the second time from the memo
        assert blocked(ask(server, "finance.test", outside, PROTO_DOT, "laptop-7"))
        assert blocked(ask(server, "finance.test", outside, PROTO_DOT, "LAPTOP-7"))
        assert not blocked(ask(server, "finance.test", outside, PROTO_DOT, "other"))
        assert not blocked(ask(server, "finance.test", outside, PROTO_DOT))
        # the address's groups still apply, with or without an id
        assert blocked(ask(server, "finance.test", "10.1.2.3", PROTO_DOH, "other"))
        assert blocked(ask(server, "finance.test", "10.1.2.3", PROTO_TCP))


def blocked(reply: dns.message.Message) -> bool:
    """Whether the answer is the finance list's (its SOA names the list)."""
    return any("finance-only.blocked.invalid" in rrset.to_text() for rrset in reply.authority)


def test_every_transport_is_counted_under_its_own_proto_memo_hits_included(
    finance_server: RunningServer,
) -> None:
    server = finance_server
    # The encrypted transports share TCP's memo: the first query over TCP fills it, and
    # the later ones (memo hits) are each counted under their own proto.
    for proto in (PROTO_TCP, PROTO_DOT, PROTO_DOH, PROTO_DOQ, PROTO_DOQ, PROTO_UDP):
        ask(server, "finance.test", "10.1.2.3", proto)
    assert server.resolver.memo_hits >= 4
    answers = server.resolver.stats.answers
    by_proto = {
        proto: answers[(proto, "A", "NXDOMAIN", "blocked")]
        for proto in ("udp", "tcp", "dot", "doh", "doq")
    }
    assert by_proto == {"udp": 1, "tcp": 1, "dot": 1, "doh": 1, "doq": 2}


def test_the_audit_record_has_the_proto_and_the_client_id(
    finance_server: RunningServer, tmp_path: Path
) -> None:
    server = finance_server
    ask(server, "finance.test", "127.0.0.9", PROTO_DOH, "laptop-7")
    ask(server, "finance.test", "127.0.0.9", PROTO_DOH, "laptop-7")  # (a memo hit)
    ask(server, "finance.test", "10.1.2.3", PROTO_UDP)
    log = tmp_path / "audit.jsonl"

    def lines() -> list[dict[str, Any]]:
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    wait_for(lambda: len(lines()) >= 3)
    first, second, third = lines()[:3]
    assert first["proto"] == second["proto"] == "doh"
    assert first["client_id"] == second["client_id"] == "laptop-7"
    assert list(first)[:3] == ["time", "client", "client_id"]
    assert third["proto"] == "udp" and "client_id" not in third
    # The report shows the id beside the address, and filters by it.
    done = run_cli("audit", str(log), "--json")
    rows = json.loads(done.stdout)
    assert {(r["client"], r.get("client_id")) for r in rows} == {
        ("127.0.0.9", "laptop-7"),
        ("10.1.2.3", None),
    }
    done = run_cli("audit", str(log), "--client-id", "Laptop-7")
    assert "127.0.0.9 [laptop-7]" in done.stdout and "10.1.2.3" not in done.stdout


def test_resolver_arpa_and_all_answer_paths_take_the_proto(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server()
    ask(server, "_dns.resolver.arpa", "127.0.0.1", PROTO_DOQ, rtype="SVCB")
    ask(server, "example.test", "127.0.0.1", PROTO_DOT)  # forwarded
    ask(server, "example.test", "127.0.0.1", PROTO_DOH)  # memo hit of a cache hit
    answers = server.resolver.stats.answers
    assert answers[("doq", "SVCB", "NOERROR", "local")] == 1
    assert answers[("dot", "A", "NOERROR", "forwarded")] == 1
    assert answers[("doh", "A", "NOERROR", "cached")] == 1


def test_the_default_proto_follows_tcp(make_server: Callable[..., RunningServer]) -> None:
    server = make_server()
    assert isinstance(server.resolver, Resolver)
    server.query("example.test")
    server.query("example.test", tcp=True)
    answers = server.resolver.stats.answers
    assert answers[("udp", "A", "NOERROR", "forwarded")] == 1
    assert answers[("tcp", "A", "NOERROR", "cached")] == 1


# Explain.


@pytest.fixture
def explained(tmp_path: Path, upstream: FakeUpstream) -> Iterator[tuple[Path, Path]]:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "finance.yaml").write_text(FINANCE_LIST)
    config = write_config(
        tmp_path / "resolver.yaml",
        "blocklists: lists\n"
        "groups:\n  finance: {networks: [10.1.0.0/16], ids: [laptop-7]}\n"
        f"admin: {{listen: '127.0.0.1:{free_port()}', token: {TOKEN}}}\n"
        f"metrics: {{listen: '127.0.0.1:{free_port()}'}}\n",
    )
    yield config, lists


def test_explain_takes_a_client_id_on_the_command_line(explained: tuple[Path, Path]) -> None:
    config, _ = explained
    args = ("explain", "finance.test", "--config", str(config), "--client", "127.0.0.9")
    doc = json.loads(run_cli(*args, "--client-id", "laptop-7", "--json").stdout)
    assert doc["decision"] == "blocked" and doc["client_id"] == "laptop-7"
    assert doc["groups"] == ["all", "finance"]
    text = run_cli(*args, "--client-id", "laptop-7").stdout
    assert "for 127.0.0.9 (client id laptop-7)" in text and "client groups: finance" in text
    doc = json.loads(run_cli(*args, "--json").stdout)
    assert doc["decision"] == "forwarded" and "client_id" not in doc
    assert run_cli(*args, "--client-id", "not_an_id").returncode != 0


def test_explain_takes_a_client_id_in_the_admin_api(
    explained: tuple[Path, Path], upstream: FakeUpstream
) -> None:
    config, _ = explained
    proc = ResolverProcess(
        "--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address
    )
    try:
        admin, _ = urls(proc)
        query = "/v1/explain?name=finance.test&client=127.0.0.9&client_id=laptop-7"
        status, doc, _ = http(f"{admin}{query}", token=TOKEN)
        check_against_spec("/v1/explain", "GET", status, doc)
        assert status == 200 and doc["decision"] == "blocked"
        assert doc["client_id"] == "laptop-7" and doc["groups"] == ["all", "finance"]
        status, doc, _ = http(f"{admin}/v1/explain?name=x.test&client_id=a_b", token=TOKEN)
        assert status == 400
    finally:
        proc.stop()


def test_a_pseudonymised_log_hides_the_client_id_too() -> None:
    out = io.StringIO()
    log = AuditLog(AuditConfig(sink="stdout", pseudonymize_key="k" * 16), stream=out)
    for _ in range(2):
        log.record(0.0, "10.0.0.1", "dot", "a.test.", "A", "NXDOMAIN", "blocked", "l", None,
                   None, None, 0.001, "laptop-7")  # fmt: skip
    log.close()
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["client_id"].startswith("anon-") and "laptop-7" not in out.getvalue()
    assert first["client_id"] == second["client_id"] != first["client"]
