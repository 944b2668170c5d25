"""What the DoH listener (:mod:`.doh`) reads and writes besides HTTP: the PROXY protocol
header (v1 text, v2 binary), X-Forwarded-For, the client id of a path, the ``dns``
parameter, and of an answer its freshness (Cache-Control max-age) and EDNS padding.
Pure functions on bytes and strings, so that each is tested without a socket."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Sequence
from typing import Final

from ..core.wire import FormatError, skip_name

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The 12 bytes that start a PROXY protocol v2 header.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
#: The shortest header of either version ("PROXY UNKNOWN\r\n" is 15 bytes): read first.
PROXY_MIN: Final = 15
#: A v1 header is at most 107 bytes; a v2 header is refused over this (its TLVs).
PROXY_V1_MAX: Final = 107
PROXY_V2_MAX: Final = 16 + 1024
#: A client id is one DNS label of these characters (AdGuard Home's convention).
_CLIENT_ID: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_OPT: Final = 41


class ProxyError(ValueError):
    """A PROXY protocol header that is not one."""


def proxy_needed(buf: bytes) -> int:
    """How many more bytes surely belong to the header that starts ``buf`` (0: it is
    complete); -1 for a v1 header whose end is not in ``buf`` yet (read up to its line
    end). Raise :class:`ProxyError` when ``buf`` cannot start a header."""
    if len(buf) < PROXY_MIN:
        return PROXY_MIN - len(buf)
    if buf.startswith(b"PROXY "):
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) >= PROXY_V1_MAX:
                raise ProxyError("v1 header without its line end")
            return -1
        return 0 if end + 2 == len(buf) else _raise("bytes after the v1 header")
    if buf[:12] != V2_SIGNATURE:
        raise ProxyError("not a PROXY protocol header")
    if len(buf) < 16:
        return 16 - len(buf)
    total = 16 + int.from_bytes(buf[14:16], "big")
    if total > PROXY_V2_MAX:
        raise ProxyError(f"v2 header of {total} bytes")
    return total - len(buf)


def _raise(why: str) -> int:
    raise ProxyError(why)


def proxy_source(header: bytes) -> str | None:
    """The client address a complete header names; None when it names none (v1 UNKNOWN, v2
    LOCAL or an unspecified family: then the connection's own peer counts)."""
    if header.startswith(b"PROXY "):
        parts = header[:-2].split(b" ")
        if len(parts) >= 2 and parts[1] == b"UNKNOWN":
            return None
        if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
            raise ProxyError("v1 header not of the form PROXY TCP4|TCP6 src dst sport dport")
        try:
            address = ipaddress.ip_address(parts[2].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise ProxyError("v1 header with a bad source address") from None
        if address.version != (4 if parts[1] == b"TCP4" else 6):
            raise ProxyError("v1 header whose source is not of its family")
        return str(address)
    version, command = header[12] >> 4, header[12] & 0x0F
    if version != 2 or command > 1:
        raise ProxyError(f"v2 header of version {version}, command {command}")
    family, size = header[13] >> 4, len(header) - 16
    if command == 0 or family == 0:
        return None  # LOCAL (the proxy's own health check) or UNSPEC
    if family == 1 and size >= 12:
        return str(ipaddress.IPv4Address(header[16:20]))
    if family == 2 and size >= 36:
        return str(ipaddress.IPv6Address(header[16:32]))
    if family in (1, 2):
        raise ProxyError("v2 header too short for its addresses")
    return None  # AF_UNIX: no address to name the client by


def trusted(address: str, networks: Sequence[Network]) -> bool:
    """``address`` is in one of ``networks``."""
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def forwarded_client(peer: str, forwarded: str, networks: Sequence[Network]) -> str:
    """The client of a request from ``peer`` with this X-Forwarded-For value: walking from
    the right, the first address not in ``networks`` (a trusted proxy). Only a trusted peer's
    header counts; a hop that is not an address stops the walk at the last trusted one."""
    if not forwarded or not trusted(peer, networks):
        return peer
    client = peer
    for hop in reversed(forwarded.split(",")[-32:]):
        try:
            ip = str(ipaddress.ip_address(hop.strip()))
        except ValueError:
            return client
        client = ip
        if not trusted(ip, networks):
            return ip
    return client


def client_id(rest: str) -> str | None:
    """The client id of a path's tail after ``{path}/`` (one label, folded to lower case);
    None when it is not one."""
    label = rest.lower()
    return label if _CLIENT_ID.fullmatch(label) else None


def decode_dns_param(value: str) -> bytes | None:
    """The message in a ``dns`` parameter (base64url without padding); None when bad."""
    if not value or len(value) % 4 == 1:
        return None
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None


def is_query(data: bytes) -> bool:
    """Enough of a DNS query to hand to the resolver: a header, QR clear, one question."""
    return len(data) >= 17 and not data[2] & 0x80 and data[4:6] == b"\x00\x01"


def _records(data: bytes, off: int, count: int) -> tuple[int, int, int]:
    """Walk ``count`` records from ``off``: (the offset after them, their smallest TTL or
    -1 when none, the offset of the last OPT record or -1)."""
    low, opt = -1, -1
    for _ in range(count):
        start = off
        off = skip_name(data, off)
        if off + 10 > len(data):
            raise FormatError("record runs past the end of the message")
        rtype = int.from_bytes(data[off : off + 2], "big")
        ttl = int.from_bytes(data[off + 4 : off + 8], "big")
        if rtype == _OPT:
            opt = start
        elif low < 0 or ttl < low:
            low = ttl
        off += 10 + int.from_bytes(data[off + 8 : off + 10], "big")
    if off > len(data):
        raise FormatError("record runs past the end of the message")
    return off, low, opt


def _sections(data: bytes) -> tuple[int, int, int]:
    """(the smallest TTL of the answer and authority sections or -1, the offset of the
    additional section's OPT record or -1, the offset after the last record)."""
    if len(data) < 12:
        raise FormatError("shorter than a header")
    off = 12
    for _ in range(int.from_bytes(data[4:6], "big")):
        off = skip_name(data, off) + 4
    counts = [int.from_bytes(data[i : i + 2], "big") for i in (6, 8, 10)]
    off, low, _ = _records(data, off, counts[0] + counts[1])
    end, _, opt = _records(data, off, counts[2])
    return low, opt, end


def max_age(answer: bytes) -> int:
    """Cache-Control max-age for an answer (RFC 8484 section 5.1): the smallest TTL of its
    answer and authority records; 0 for an error (not NOERROR or NXDOMAIN), for an answer
    without records, and for one that does not parse."""
    if len(answer) < 4 or answer[3] & 0x0F not in (0, 3):
        return 0
    try:
        low = _sections(answer)[0]
    except FormatError:
        return 0
    return max(low, 0)
