"""A system that refuses the batch calls (a seccomp filter, as strict container profiles
and sandboxes have): the resolver says so once and answers every query one datagram at a
time, whichever loop was serving. Here the refusal is the kernel's own, from a real
seccomp filter on the resolver's process (tests/helpers/refuse_syscall.py), so the C loop
(resolver/_fastudp.c), which calls recvmmsg and sendmmsg itself, meets it as it would."""

from __future__ import annotations

import socket
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from resolver.service import udpbatch

from .helpers import refuse_syscall
from .helpers.realservers import ResolverProcess

pytestmark = pytest.mark.skipif(
    not refuse_syscall.available() or not udpbatch.available(),
    reason="the seccomp helper knows x86-64 Linux only",
)


def burst(port: int, start: int, count: int) -> list[int]:
    """``count`` blocked names sent at once; the rcodes of the answers, by query ID."""
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    client.settimeout(5.0)
    try:
        for qid in range(start, start + count):
            query = dns.message.make_query(f"q{qid % 8}.deepseek.com", "A", use_edns=False)
            query.id = qid
            client.sendto(query.to_wire(), ("127.0.0.1", port))
        rcodes: dict[int, int] = {}
        while len(rcodes) < count:
            reply = dns.message.from_wire(client.recv(4096))
            rcodes[reply.id] = reply.rcode()
    finally:
        client.close()
    return [rcodes[qid] for qid in range(start, start + count)]


@pytest.mark.parametrize("refused", ["recvmmsg", "sendmmsg"])
def test_refused_batch_calls_cost_no_answer(tmp_path: Path, refused: str) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "ban.yaml").write_text("list: ban\ndomains: [deepseek.com]\n")
    proc = ResolverProcess(
        "--blocklists",
        str(lists),
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:9",
        launcher=("-m", "tests.helpers.refuse_syscall", refused),
    )
    try:
        # Bursts, so that batches are tried (and the C loop serves, where it is built);
        # the same eight names again and again, so that memo hits are among them.
        for start in (0, 100, 200):
            assert burst(proc.port, start, 60) == [dns.rcode.NXDOMAIN] * 60
        log = "\n".join(proc.lines)
        assert log.count(f"the system refused {refused}") == 1, log
    finally:
        proc.stop()
