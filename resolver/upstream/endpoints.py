"""Upstream endpoints: what an upstream is (:class:`Upstream`) and how the config writes one
(:func:`parse_upstream`). Plain values, shared by the forwarder, its health and every
transport; this module imports nothing else from the upstream package.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Final

#: The port of each scheme; its keys are the schemes an upstream may name.
DEFAULT_PORTS: Final = {"udp": 53, "tcp": 53, "tls": 853, "https": 443}
DOH_PATH: Final = "/dns-query"
PIN_PARAM: Final = "pin-sha256"


@dataclass(frozen=True, slots=True)
class Upstream:
    """An upstream resolver address, as configured."""

    #: An IP address; for tls and https also a host name, resolved through the bootstrap
    #: servers and then the name the certificate must carry.
    host: str
    port: int = 53
    #: udp (with TCP for truncated replies), tcp, tls (DNS over TLS, RFC 7858) or https
    #: (DNS over HTTPS, RFC 8484).
    transport: str = "udp"
    #: For tls and https to an IP address: the name the certificate must carry (default:
    #: the address).
    tls_name: str | None = None
    #: For https: the path of the DoH endpoint.
    path: str = ""
    #: SHA-256 hashes (base64) of SubjectPublicKeyInfos, one of which the server's
    #: certificate must carry, on top of its verification (RFC 7858 4.2, RFC 7469).
    pins: tuple[str, ...] = ()
    #: Computed once (the query path reads them for every miss): the address family, the
    #: (host, port) that sockets connect to, and the label of metrics, logs and status.
    family: socket.AddressFamily = field(init=False, compare=False, repr=False)
    address: tuple[str, int] = field(init=False, compare=False, repr=False)
    label: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        v6 = ":" in self.host
        object.__setattr__(self, "family", socket.AF_INET6 if v6 else socket.AF_INET)
        object.__setattr__(self, "address", (self.host, self.port))
        hostport = f"[{self.host}]:{self.port}" if v6 else f"{self.host}:{self.port}"
        if self.transport == "udp":
            label = hostport
        else:
            name = f"#{self.tls_name}" if self.tls_name else ""
            label = f"{self.transport}://{hostport}{self.path}{name}"
        object.__setattr__(self, "label", label)

    @property
    def is_address(self) -> bool:
        """False for a host name (it needs the bootstrap servers)."""
        return is_ip(self.host)

    @property
    def server_name(self) -> str:
        """The name the certificate is verified against (SNI, HTTP authority)."""
        return self.tls_name or self.host

    def __str__(self) -> str:
        return self.label


def is_ip(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_HOSTNAME_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: missing ']'")
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':port' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        return text, default_port  # a name, an IPv4 address or a bare IPv6 address
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


def parse_upstream(text: str) -> Upstream:
    """Read an upstream: ``[udp://]IP[:port]``, ``tcp://IP[:port]``,
    ``tls://HOST[:port][?pin-sha256=B64][#name]`` (DNS over TLS, port 853) or
    ``https://HOST[:port][/path][?pin-sha256=B64][#name]`` (DNS over HTTPS, port 443, path
    /dns-query). For tls and https, HOST is an IP address (the certificate checked against
    ``name``, else the address) or a host name (resolved through the bootstrap servers and
    checked against that name); ``pin-sha256`` (repeatable) pins the server's key."""
    raw = text.strip()
    transport = "udp"
    if "://" in raw:
        transport, raw = raw.split("://", 1)
        transport = transport.lower()
        if transport not in DEFAULT_PORTS:
            raise ValueError(
                f"{text!r}: upstream scheme {transport!r} is not supported (udp, tcp, tls, https)"
            )
    encrypted = transport in ("tls", "https")
    raw, _, tls_name = raw.partition("#")
    if "?" in tls_name:
        raise ValueError(f"{text!r}: put '?{PIN_PARAM}=...' before '#name'")
    raw, has_query, query = raw.partition("?")
    if (tls_name or has_query) and not encrypted:
        raise ValueError(f"{text!r}: '#name' and '?{PIN_PARAM}=' are for tls:// and https://")
    pins = _pins(text, query) if has_query else ()
    path = ""
    if transport == "https":
        raw, slash, rest = raw.partition("/")
        path = "/" + rest if slash and rest else DOH_PATH
    elif "/" in raw:
        raise ValueError(f"{text!r}: only https:// upstreams have a path")
    host, port = split_host_port(raw, DEFAULT_PORTS[transport])
    if port == 0:
        raise ValueError(f"{text!r}: port 0 is no upstream port")
    if is_ip(host):
        return Upstream(host, port, transport, tls_name or None, path, pins)
    if not encrypted:
        raise ValueError(
            f"{text!r}: a plain upstream must be an IP address (host names are for tls:// "
            "and https:// upstreams, resolved through 'bootstrap')"
        )
    name = host.lower().rstrip(".")
    if len(name) > 253 or not all(_HOSTNAME_LABEL.match(x) for x in name.split(".")):
        raise ValueError(f"{text!r}: {host!r} is neither an IP address nor a host name")
    if tls_name:
        raise ValueError(f"{text!r}: '#name' is for an IP address; a host name is checked itself")
    return Upstream(name, port, transport, None, path, pins)


def _pins(text: str, query: str) -> tuple[str, ...]:
    pins = []
    for param in query.split("&"):
        key, _, value = param.partition("=")
        if key != PIN_PARAM:
            raise ValueError(f"{text!r}: unknown parameter {key!r} (known: {PIN_PARAM})")
        try:
            ok = len(base64.b64decode(value, validate=True)) == 32
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{text!r}: {PIN_PARAM} must be the base64 SHA-256 of the server key's "
                "SubjectPublicKeyInfo (44 characters)"
            )
        pins.append(value)
    return tuple(pins)
