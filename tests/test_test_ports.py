"""The tests' own port picker: a test that asks for two ports gets two different ones.

CI once failed because an admin and a metrics listener were handed the same random port
and the second could not bind; this pins the picker's promise."""

from __future__ import annotations

import socket

from .helpers.realservers import _port_range, free_port


def test_ports_asked_for_in_a_row_are_all_different_and_in_the_range() -> None:
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)
    assert all(port in _port_range() for port in ports)


def test_a_port_in_use_is_skipped() -> None:
    first = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", first + 1))
        assert free_port() != first + 1
