"""The kernel's queue of UDP queries in front of the resolver: sized by udp.receive_buffer,
and what it drops when full is counted (resolver_udp_receive_drops_total), as an attacker
or a stalled process would make it. The queue is read from the kernel (SO_MEMINFO), so
these run where Linux can say (4.6 and later)."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from resolver.config import load_config
from resolver.service.sockopts import receive_queue
from resolver.yamlload import SourceError

from .helpers.http import http
from .helpers.realservers import ResolverProcess, free_port

pytestmark = pytest.mark.skipif(
    receive_queue(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) is None,
    reason="the system cannot report a socket's drops (SO_MEMINFO)",
)


def start(tmp_path: Path, udp: str, *more: str) -> ResolverProcess:
    lists = tmp_path / "lists"
    lists.mkdir(exist_ok=True)
    (lists / "ban.yaml").write_text("list: ban\ndomains: [deepseek.com]\n")
    config = tmp_path / "resolver.yaml"
    config.write_text(
        f"blocklists: {lists}\nmetrics: {{listen: '127.0.0.1:{free_port()}'}}\nudp: {udp}\n"
    )
    # The upstream is never asked: every name here is blocked.
    return ResolverProcess(
        "--config", str(config), "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", *more
    )


@pytest.fixture
def processes() -> Iterator[list[ResolverProcess]]:
    started: list[ResolverProcess] = []
    yield started
    for proc in started:
        proc.stop()


def metric(proc: ResolverProcess, name: str) -> float:
    url = "\n".join(proc.lines).split("metrics on ")[1].split()[0].rstrip("/")
    _, text, _ = http(f"{url}/metrics")
    for line in text.splitlines():
        if line.startswith(f'{name}{{listen="127.0.0.1:{proc.port}"}} '):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} for port {proc.port} in /metrics")


def granted(size: int) -> int:
    """What the kernel reports for a request of ``size`` (it doubles it): all of it as root
    (SO_RCVBUFFORCE), else up to net.core.rmem_max."""
    if os.geteuid() == 0:
        return 2 * size
    return 2 * min(size, int(Path("/proc/sys/net/core/rmem_max").read_text()))


def query(qid: int) -> bytes:
    message = dns.message.make_query(f"q{qid}.deepseek.com", "A", use_edns=False)
    message.id = qid
    return message.to_wire()


def test_a_burst_at_a_stopped_process_is_counted_query_for_query(
    tmp_path: Path, processes: list[ResolverProcess]
) -> None:
    """The attacker's view: 300 queries while the process cannot read (stopped, as a long
    pause would hold it). A small queue keeps a few; every other one is a kernel drop, and
    the counter says exactly how many: each query is either answered or counted."""
    proc = start(tmp_path, "{receive_buffer: 4096}")
    processes.append(proc)
    assert metric(proc, "resolver_udp_receive_buffer_bytes") == granted(4096)
    assert metric(proc, "resolver_udp_receive_drops_total") == 0
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    client.settimeout(1.0)
    sent = 300
    os.kill(proc.proc.pid, signal.SIGSTOP)
    try:
        for qid in range(sent):
            client.sendto(query(qid), ("127.0.0.1", proc.port))
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)
    answered = 0
    try:
        while True:
            reply = dns.message.from_wire(client.recv(4096))
            assert reply.rcode() == dns.rcode.NXDOMAIN
            answered += 1
    except TimeoutError:
        pass
    finally:
        client.close()
    drops = metric(proc, "resolver_udp_receive_drops_total")
    assert 0 < answered < 100  # a 4 KiB queue holds a handful of queries
    assert drops + answered == sent
    assert metric(proc, "resolver_udp_receive_queue_bytes") == 0  # all read since
    # And it answers on, as before.
    reply = dns.message.from_wire(_ask(proc.port, query(9999)))
    assert reply.rcode() == dns.rcode.NXDOMAIN


def _ask(port: int, data: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        sock.sendto(data, ("127.0.0.1", port))
        return sock.recv(4096)


@pytest.mark.parametrize("setting", ["{}", "{receive_buffer: 1MiB}", "{receive_buffer: 0}"])
def test_the_queue_is_the_size_the_config_asks(
    tmp_path: Path, processes: list[ResolverProcess], setting: str
) -> None:
    """4 MiB unless told (Linux's default, about 200 KiB, drops a burst of 300 queries);
    0 leaves the system's default."""
    proc = start(tmp_path, setting)
    processes.append(proc)
    size = metric(proc, "resolver_udp_receive_buffer_bytes")
    if setting == "{}":
        assert size == granted(4 << 20)
    elif "1MiB" in setting:
        assert size == granted(1 << 20)
    else:
        assert size == int(Path("/proc/sys/net/core/rmem_default").read_text())


def test_with_workers_the_gauges_add_up_every_workers_socket(
    tmp_path: Path, processes: list[ResolverProcess]
) -> None:
    proc = start(tmp_path, "{receive_buffer: 1MiB}", "--workers", "2")
    processes.append(proc)
    deadline = time.monotonic() + 10
    while metric(proc, "resolver_udp_receive_buffer_bytes") < 2 * granted(1 << 20):
        assert time.monotonic() < deadline, "the child's socket was never counted"
        time.sleep(0.2)
    assert metric(proc, "resolver_udp_receive_buffer_bytes") == 2 * granted(1 << 20)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("lots", "expected a size such as 64MiB"),
        ("-1", "0 (the system's own) or a size"),
        ("2GiB", "at most 1024 MiB"),
        ("yes", "expected a size"),
    ],
)
def test_a_bad_size_names_the_file_line_and_field(tmp_path: Path, value: str, message: str) -> None:
    config = tmp_path / "resolver.yaml"
    config.write_text(f"cache: {{max_entries: 1000}}\nudp:\n  receive_buffer: {value}\n")
    with pytest.raises(SourceError) as caught:
        load_config(config)
    text = str(caught.value)
    assert f"{config}:3:" in text
    assert "udp.receive_buffer" in text
    assert message in text
