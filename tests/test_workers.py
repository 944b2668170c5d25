"""``--workers N`` against real processes: every worker answers on the shared addresses,
edits and reloads reach every worker, /metrics, the audit log and cache flushes cover them
all, a dead worker is started again, and stopping stops them all."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest

from .helpers.client import ask
from .helpers.fakeupstream import FakeUpstream
from .helpers.http import TOKEN, check_against_spec, http, urls
from .helpers.realservers import ResolverProcess, free_port
from .helpers.wait import wait_for

READY = "workers answering on the same addresses"


@pytest.fixture
def workers(tmp_path: Path, upstream: FakeUpstream) -> Iterator[tuple[ResolverProcess, Path, Path]]:
    for i in range(40):
        for prefix in "nc":
            upstream.records[(f"{prefix}{i}.example.test", "A")] = ["192.0.2.1"]
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "ban.yaml").write_text("list: ban\ndomains: [deepseek.com]\n")
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "resolver.yaml"
    config.write_text(
        f"blocklists: {lists}\n"
        f"admin: {{listen: '127.0.0.1:{free_port()}', token: {TOKEN}}}\n"
        f"metrics: {{listen: '127.0.0.1:{free_port()}'}}\n"
        "reload: {interval: 0.2, debounce: 0.2, checksum_interval: 1}\n"
        f"audit: {{sink: file, path: {audit}, log: blocked}}\n"
    )
    proc = ResolverProcess(
        "--config",
        str(config),
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream.address,
        "--workers",
        "3",
        ready_text=READY,
    )
    yield proc, lists, audit
    proc.stop()


def status(proc: ResolverProcess) -> dict[str, Any]:
    admin, _ = urls(proc)
    code, doc, _ = http(f"{admin}/v1/status", token=TOKEN)
    assert code == 200
    check_against_spec("/v1/status", "GET", code, doc)
    return doc  # type: ignore[no-any-return]


def metric(proc: ResolverProcess, line_start: str) -> float:
    _, text, _ = http(f"{urls(proc)[1]}/metrics")
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {line_start}")


def rcodes(port: int, names: list[str]) -> set[str]:
    """Each query from a fresh socket (a new source port), so the kernel spreads them."""
    return {dns.rcode.to_text(ask(port, name).rcode()) for name in names}


def test_every_worker_answers_and_is_counted(workers: tuple[ResolverProcess, Path, Path]) -> None:
    proc, _, audit = workers
    names = [f"q{i}.deepseek.com" for i in range(60)]
    assert rcodes(proc.port, names) == {"NXDOMAIN"}
    doc = status(proc)
    assert [w["index"] for w in doc["workers"]] == [0, 1, 2]
    assert all(w["alive"] and w["ready"] for w in doc["workers"])
    assert len({w["pid"] for w in doc["workers"]}) == 3
    assert len({w["policy"] for w in doc["workers"]}) == 1
    answers = [w["answers"] for w in doc["workers"]]
    assert sum(answers) == 60
    assert sum(1 for n in answers if n > 0) >= 2, answers  # the kernel spread them
    # /metrics adds up every worker's counts.
    assert metric(proc, 'resolver_blocked_total{list="ban"}') == 60
    # Children's audit entries reach the one audit file the first worker writes.
    wait_for(lambda: audit.exists() and len(audit.read_text().splitlines()) == 60)
    logged = {json.loads(line)["qname"] for line in audit.read_text().splitlines()}
    assert logged == {n + "." for n in names} or logged == set(names)


def test_one_client_socket_is_spread_over_every_worker(
    workers: tuple[ResolverProcess, Path, Path],
) -> None:
    """The primary has the kernel pick a worker per datagram at random, not by a hash
    of the client's address and port: one busy client socket loads them all."""
    proc, _, _ = workers
    before = [w["answers"] for w in status(proc)["workers"]]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        sock.connect(("127.0.0.1", proc.port))
        for i in range(60):
            sock.send(dns.message.make_query(f"s{i}.deepseek.com", "A").to_wire())
            assert dns.message.from_wire(sock.recv(4096)).rcode() == dns.rcode.NXDOMAIN
    after = [w["answers"] for w in status(proc)["workers"]]
    spread = [b - a for a, b in zip(before, after, strict=True)]
    assert sum(spread) == 60
    assert all(n > 0 for n in spread), spread  # 3 x (2/3)^60: never by chance


def test_an_edit_reaches_every_worker(workers: tuple[ResolverProcess, Path, Path]) -> None:
    proc, lists, _ = workers
    names = [f"n{i}.example.test" for i in range(40)]
    assert rcodes(proc.port, names) == {"NOERROR"}
    (lists / "ban.yaml").write_text("list: ban\ndomains: [deepseek.com, example.test]\n")
    wait_for(lambda: rcodes(proc.port, names[:5]) == {"NXDOMAIN"})
    wait_for(lambda: len({w["policy"] for w in status(proc)["workers"]}) == 1)
    # Cached answers from before the edit are not served by any worker.
    assert rcodes(proc.port, names) == {"NXDOMAIN"}


def test_reload_and_flush_through_the_api_reach_every_worker(
    workers: tuple[ResolverProcess, Path, Path],
) -> None:
    proc, _, _ = workers
    admin, _ = urls(proc)
    names = [f"c{i}.example.test" for i in range(40)]
    assert rcodes(proc.port, names) == {"NOERROR"}
    code, doc, _ = http(f"{admin}/v1/cache/flush", "POST", TOKEN)
    assert code == 200 and doc["flushed"] == 40  # each name is cached by one worker
    code, doc, _ = http(f"{admin}/v1/reload", "POST", TOKEN)
    assert code == 200 and doc["result"] == "success"
    # The primary answers once it has reloaded; the children log theirs when the word
    # reaches them, a moment later on a loaded machine.
    wait_for(lambda: sum(1 for line in proc.lines if "reloaded in" in line) >= 3, 10)


def test_a_dead_worker_is_started_again(workers: tuple[ResolverProcess, Path, Path]) -> None:
    proc, _, _ = workers
    assert rcodes(proc.port, [f"d{i}.deepseek.com" for i in range(30)]) == {"NXDOMAIN"}
    before = metric(proc, 'resolver_blocked_total{list="ban"}')
    victim = status(proc)["workers"][1]
    os.kill(victim["pid"], signal.SIGKILL)
    proc.wait_for("worker 1 (pid", 10)
    wait_for(lambda: status(proc)["workers"][1]["ready"], 15)
    again = status(proc)["workers"][1]
    assert again["restarts"] == 1 and again["pid"] != victim["pid"]
    # Counters never go backwards: the dead worker's counts are kept.
    assert metric(proc, 'resolver_blocked_total{list="ban"}') == before
    assert rcodes(proc.port, [f"e{i}.deepseek.com" for i in range(30)]) == {"NXDOMAIN"}
    assert metric(proc, 'resolver_blocked_total{list="ban"}') == before + 30


def test_sigterm_stops_every_worker(workers: tuple[ResolverProcess, Path, Path]) -> None:
    proc, _, _ = workers
    pids = [w["pid"] for w in status(proc)["workers"][1:]]
    assert proc.stop() == 0
    for pid in pids:
        assert not _alive(pid)


def test_workers_stop_when_the_first_worker_dies(
    workers: tuple[ResolverProcess, Path, Path],
) -> None:
    proc, _, _ = workers
    pids = [w["pid"] for w in status(proc)["workers"][1:]]
    proc.proc.kill()
    proc.finish()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def test_a_bad_worker_count_is_refused(tmp_path: Path, upstream: FakeUpstream) -> None:
    proc = ResolverProcess(
        "--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", "0", ready=False
    )
    assert proc.finish() == 2
    assert any("--workers must be from 1 to" in line for line in proc.lines)
    config = tmp_path / "c.yaml"
    config.write_text("upstreams: [127.0.0.1:1]\nworkers: 1000\n")
    proc = ResolverProcess("--config", str(config), ready=False)
    assert proc.finish() == 2
    assert any(f"{config}:2" in line and "workers" in line for line in proc.lines), proc.lines


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped by a dead parent) counts as gone.
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_the_encrypted_listeners_of_every_worker_are_counted(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Every worker serves DoT and DoH on the shared ports: their handshakes, open
    connections and answers reach /metrics from every worker, as the queries' counts do."""
    import ssl

    import dns.message
    import dns.query

    from .helpers.testca import TestCA

    ca = TestCA(tmp_path)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    ca.issue(cert, key)
    dot_port, doh_port = free_port(), free_port()
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "ban.yaml").write_text("list: ban\ndomains: [deepseek.com]\n")
    config = tmp_path / "resolver.yaml"
    config.write_text(
        f"blocklists: {lists}\n"
        f"admin: {{listen: '127.0.0.1:{free_port()}', token: {TOKEN}}}\n"
        f"metrics: {{listen: '127.0.0.1:{free_port()}'}}\n"
        f"tls: {{cert: {cert}, key: {key}}}\n"
        f"dot: {{listen: ['127.0.0.1:{dot_port}']}}\n"
        f"doh: {{listen: ['127.0.0.1:{doh_port}']}}\n"
    )
    proc = ResolverProcess("--config", str(config), "--listen", "127.0.0.1:0", "--upstream",
                           upstream.address, "--workers", "2", ready_text=READY)  # fmt: skip
    try:
        context = ssl.create_default_context(cafile=str(ca.path))
        query = dns.message.make_query("example.test", "A")
        rounds = 16  # each a new connection (a new source port): the kernel spreads them
        for _ in range(rounds):
            dns.query.tls(query, "127.0.0.1", port=dot_port, ssl_context=context,
                          server_hostname="dot.test", timeout=5)  # fmt: skip
            dns.query.https(query, f"https://dot.test:{doh_port}/dns-query", timeout=5,
                            bootstrap_address="127.0.0.1", verify=context)  # fmt: skip
        assert metric(proc, 'resolver_tls_handshakes_total{proto="dot"}') == rounds
        assert metric(proc, 'resolver_tls_handshakes_total{proto="doh"}') == rounds
        assert metric(proc, 'resolver_requests_total{proto="dot",qtype="A"}') == rounds
        assert metric(proc, 'resolver_requests_total{proto="doh",qtype="A"}') == rounds
        assert metric(proc, 'resolver_doh_rejected_total{reason="handshake"}') == 0
        assert metric(proc, "resolver_doh_connections ") >= 0
    finally:
        proc.stop()


def test_counts_add_up_every_field_in_either_build() -> None:
    """Every int field of Counts is a scalar added across workers, whichever build runs
    (the compiled one gives field types as classes, not strings)."""
    from dataclasses import fields

    from resolver.observe.counts import SCALARS, Counts

    ints = {f.name for f in fields(Counts) if type(getattr(Counts(), f.name)) is int}
    assert set(SCALARS) == ints
    one = Counts()
    for name in ints:
        setattr(one, name, 1)
    one.tls_handshakes["dot"] = 1
    one.doh_rejected["proxy"] = 0
    total = one + one
    assert {getattr(total, name) for name in ints} == {2}
    assert total.tls_handshakes["dot"] == 2
    assert total.doh_rejected == {"proxy": 0}  # a reason at 0 stays
