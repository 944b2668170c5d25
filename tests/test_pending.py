"""Forwarded answers travel as pending.Pending, not as futures: the waiter gets the answer in
the same turn, a shutdown waits for them and then gives up on the rest, and the TCP path
awaits them."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import dns.message
import dns.rcode
import pytest

from resolver.core.pending import Pending
from resolver.service.listeners import Tasks

from .helpers.fakeupstream import Behaviour, FakeUpstream
from .helpers.server import RunningServer


def test_the_waiter_gets_the_answer_once_and_leaves_the_held_set() -> None:
    got: list[tuple[bytes | None, Any]] = []
    held: set[Pending] = set()
    answer = Pending()
    answer.then(lambda a, arg: got.append((a, arg)), "addr", held)
    assert held == {answer} and not answer.done()
    answer.deliver(b"one")
    answer.deliver(b"two")  # only the first counts
    assert got == [(b"one", "addr")] and held == set() and answer.done()


def test_an_answer_delivered_before_its_waiter_is_given_at_once() -> None:
    got: list[bytes | None] = []
    answer = Pending()
    answer.deliver(b"early")
    held: set[Pending] = set()
    answer.then(lambda a, _: got.append(a), None, held)
    assert got == [b"early"] and held == set()
    waiting = Pending()
    waiting.then(lambda a, _: None)
    with pytest.raises(RuntimeError):  # one waiter per answer
        waiting.then(lambda a, _: None)


def test_a_cancelled_answer_goes_nowhere(caplog: pytest.LogCaptureFixture) -> None:
    got: list[bytes | None] = []
    held: set[Pending] = set()
    answer = Pending()
    answer.then(lambda a, _: got.append(a), None, held)
    answer.cancel()
    answer.deliver(b"late")
    assert got == [None] and held == set() and answer.cancelled
    failing = Pending()
    with caplog.at_level(logging.ERROR, logger="resolver"):
        failing.fail(ValueError("boom"))
    assert failing.done() and isinstance(failing.error, ValueError)
    assert "internal error" in caplog.text


def test_awaiting_a_pending_answer() -> None:
    async def scenario() -> tuple[bytes | None, bytes | None, bytes | None]:
        later = Pending()
        asyncio.get_running_loop().call_later(0.01, later.deliver, b"later")
        ready = Pending()
        ready.deliver(b"ready")
        gone = Pending()
        asyncio.get_running_loop().call_later(0.01, gone.cancel)
        return await later, await ready, await gone

    assert asyncio.run(scenario()) == (b"later", b"ready", None)


def test_drain_waits_for_held_answers_then_gives_up_on_the_rest() -> None:
    async def scenario() -> tuple[int, int, list[bytes | None]]:
        tasks = Tasks()
        got: list[bytes | None] = []
        soon, never = Pending(), Pending()
        for answer in (soon, never):
            answer.then(lambda a, _: got.append(a), None, tasks.held)
        asyncio.get_running_loop().call_later(0.05, soon.deliver, b"soon")
        left = await tasks.drain(0.3)
        return left, len(tasks.held), got

    left, still_held, got = asyncio.run(scenario())
    assert (left, still_held) == (1, 0)
    assert got == [b"soon", None]  # the one given up on is not sent


def test_shutdown_gives_up_on_an_answer_that_does_not_come_in_time(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream
) -> None:
    upstream.behaviours["slow.test"] = Behaviour(delay=3.0)
    running = make_server(drain_timeout=0.3, upstream_timeout=2.0, upstream_deadline=2.5)
    query = dns.message.make_query("slow.test", "A").to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        sock.sendto(query, (running.host, running.port))
        time.sleep(0.1)
        assert len(running.server.tasks.held) == 1
        started = time.monotonic()
        running.stop()
        assert time.monotonic() - started < 1.5  # the drain timeout, not the upstream's
        with pytest.raises(TimeoutError):
            sock.recv(512)
    assert running.server.tasks.held == set()


def test_a_forwarded_answer_over_tcp_is_awaited(server: RunningServer) -> None:
    reply = server.query("example.test", "A", tcp=True)
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer
