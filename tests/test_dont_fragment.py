"""UDP answers leave with DF set and are never fragmented (service/sockopts.py): the
option on the listeners' sockets, and the bit on the wire."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from resolver.service.listeners import make_socket

from .helpers.server import RunningServer

linux = pytest.mark.skipif(os.uname().sysname != "Linux", reason="Linux's socket options")
IP_MTU_DISCOVER, IP_PMTUDISC_PROBE = 10, 3
ETH_P_IP = 0x0800


@linux
def test_udp_listener_sockets_set_df_and_tcp_ones_are_left_alone() -> None:
    udp = make_socket("127.0.0.1", 0, socket.SOCK_DGRAM, False)
    tcp = make_socket("127.0.0.1", 0, socket.SOCK_STREAM, False)
    try:
        assert udp.getsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER) == IP_PMTUDISC_PROBE
        assert tcp.getsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER) != IP_PMTUDISC_PROBE
    finally:
        udp.close()
        tcp.close()


@linux
def test_an_answer_on_the_wire_has_df_set(server: RunningServer) -> None:
    """Read off the loopback interface (needs CAP_NET_RAW): the IPv4 header of the
    server's answer says Don't Fragment, and its ID is 0, which the kernel gives a
    datagram that may never be fragmented (RFC 6864), instead of a hashed one. (Without
    the option DF is set too, loopback's MTU being large, but the ID is hashed, and an
    ICMP "fragmentation needed" would have the kernel fragment later answers.)"""
    try:
        tap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    except PermissionError:
        pytest.skip("no CAP_NET_RAW to read the loopback interface")
    try:
        tap.bind(("lo", 0))
        tap.settimeout(0.5)
        reply = server.query("chat.deepseek.com", "A")
        assert reply.rcode() == 3  # NXDOMAIN: the blocked answer
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                packet = tap.recv(65535)
            except TimeoutError:
                continue
            header = (packet[0] & 0x0F) * 4
            if packet[9] != socket.IPPROTO_UDP or len(packet) < header + 8:
                continue
            (source_port,) = struct.unpack("!H", packet[header : header + 2])
            if source_port != server.port:
                continue
            (flags,) = struct.unpack("!H", packet[6:8])
            assert flags & 0x4000  # DF
            assert flags & 0x3FFF == 0  # not a fragment
            assert packet[4:6] == b"\x00\x00"  # the ID of an unfragmentable datagram
            return
        pytest.fail("the answer was not seen on the loopback interface")
    finally:
        tap.close()
