"""Socket options of the listeners that are not the socket module's defaults."""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Final

from ..defaults import DEFAULT_UDP_RECEIVE_BUFFER

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


#: SO_RCVBUFFORCE and SO_MEMINFO (Linux's numbers; the socket module names neither).
_SO_RCVBUFFORCE: Final = 33
_SO_MEMINFO: Final = 55
#: SO_MEMINFO's u32 fields: SK_MEMINFO_RMEM_ALLOC, _RCVBUF, ... and _DROPS, the ninth.
_MEMINFO_FIELDS: Final = 9


def receive_buffer(sock: socket.socket, size: int) -> tuple[int, bool]:
    """Ask that the kernel queue up to ``size`` bytes of datagrams for ``sock`` (0: leave
    the system's default): with SO_RCVBUFFORCE where the process may (CAP_NET_ADMIN, as
    Unbound does), else SO_RCVBUF, which net.core.rmem_max caps. Returns the size the
    kernel reports (it doubles the request for its own overhead) and whether the request
    was granted in full."""
    linux = sys.platform.startswith("linux")
    # (SO_RCVBUFFORCE's number is Linux's: elsewhere it means another option, or none.)
    options = (_SO_RCVBUFFORCE, socket.SO_RCVBUF) if linux else (socket.SO_RCVBUF,)
    for option in options if size > 0 else ():
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
            break
        except OSError as exc:
            log.debug("UDP: receive buffer option %d refused (%s)", option, exc)
    got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return got, size <= 0 or got >= (2 * size if linux else size)


def size_receive_queue(sock: socket.socket, configured: int | None) -> int:
    """Apply udp.receive_buffer (None: DEFAULT_UDP_RECEIVE_BUFFER) to a UDP listening
    socket; say so when the system granted less (a warning when the operator asked for
    that size, else a note). Returns the bound the kernel reports."""
    size = DEFAULT_UDP_RECEIVE_BUFFER if configured is None else configured
    got, granted = receive_buffer(sock, size)
    if not granted:
        host, port = sock.getsockname()[:2]
        (log.warning if configured is not None else log.info)(
            "UDP %s port %d: udp.receive_buffer asks %d bytes, the system granted %d "
            "(half of it for queries; net.core.rmem_max caps it: raise it with sysctl, or "
            "give the process CAP_NET_ADMIN)",
            host,
            port,
            size,
            got // 2,
        )
    return got


def receive_queue(sock: socket.socket) -> tuple[int, int, int] | None:
    """A UDP socket's receive side from the kernel (Linux 4.6+, SO_MEMINFO): bytes queued
    now, the queue's bound in bytes, and datagrams dropped since it was opened (almost
    always because the queue was full). None where the system cannot say."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, 4 * _MEMINFO_FIELDS)
    except OSError:
        return None
    if len(raw) < 4 * _MEMINFO_FIELDS:
        return None
    values = memoryview(raw).cast("I")
    return values[0], values[1], values[8]
