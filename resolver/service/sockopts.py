"""Socket options of the listeners that are not the socket module's defaults."""

from __future__ import annotations

import logging
import os
import socket
from typing import Final

log = logging.getLogger("resolver.transport")

#: IP_MTU_DISCOVER and its IP_PMTUDISC_PROBE (Linux's numbers; the socket module names
#: neither): DF set on every datagram, the path MTU that ICMP reports ignored.
_IP_MTU_DISCOVER: Final = 10
_IP_PMTUDISC_PROBE: Final = 3


def dont_fragment(sock: socket.socket, family: int) -> None:
    """UDP answers leave with DF set and are never fragmented, whatever ICMP says of the
    path (RFC 9715, the advice of DNS Flag Day 2020; BIND does the same): they are at most
    1232 bytes (wire.EDNS_PAYLOAD), which any path carries, and a spoofed "fragmentation
    needed" cannot make them into fragments. On Linux, DF also spares the kernel the
    hashed IP ID of a datagram that may be fragmented: about 3% of a blocked answer's
    CPU (perf, bench/core_bench.py). Where the system lacks the option, it is left off."""
    try:
        if family == socket.AF_INET and os.uname().sysname == "Linux":
            sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_PROBE)
        elif family == socket.AF_INET6 and hasattr(socket, "IPV6_DONTFRAG"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DONTFRAG, 1)
    except OSError as exc:
        log.debug("UDP: no DF on answers (%s)", exc)
