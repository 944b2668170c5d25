"""Reading one field of the config: the typed readers every section uses (a path
relative to the config file, a number in a range, a flag, a list of addresses or
networks, a section that is a mapping), each raising SourceError with the field's name."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from ..yamlload import (
    SourceError,
    YMap,
    check_keys,
    empty_map,
    item_where,
    value_where,
)
from .model import Listen, parse_listen


def read_path(doc: YMap, key: str, config_file: Path) -> Path | None:
    """A path setting, relative to the config file; None when not given (or empty)."""
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise SourceError(value_where(doc, key), key, "expected a path")
    return config_file.parent / value if value else None


def read_number(doc: YMap, key: str, kind: type, low: float, high: float, default: Any) -> Any:
    value = doc.get(key, default)
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or not low <= value <= high:
        noun = "a number" if kind is float else "a whole number"
        raise SourceError(value_where(doc, key), key, f"expected {noun} from {low:g} to {high:g}")
    return kind(value)


def read_section(
    doc: YMap, key: str, keys: frozenset[str], errors: list[SourceError] | None = None
) -> YMap:
    """The mapping under ``key`` (empty when left out); its unknown keys go to ``errors``
    when given (so that the keys it knows are still read), else are raised."""
    value = doc.get(key)
    if value is None:
        return empty_map(doc.where)
    if not isinstance(value, YMap):
        raise SourceError(value_where(doc, key), key, "expected a mapping")
    check_keys(value, keys, key, errors)
    return value


def read_addresses(doc: YMap, key: str, parse: Any) -> tuple[Any, ...]:
    value = doc.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise SourceError(value_where(doc, key), key, "expected a list of addresses")
    out = []
    for index, item in enumerate(value):
        try:
            out.append(parse(str(item)))
        except ValueError as exc:
            raise SourceError(
                item_where(value, index) or value_where(doc, key), f"{key}[{index}]", str(exc)
            ) from None
    return tuple(out)


def read_flag(doc: YMap, key: str, field_name: str, default: bool = False) -> bool:
    value = doc.get(key, default)
    if not isinstance(value, bool):
        raise SourceError(value_where(doc, key), field_name, "use true or false")
    return value


def read_networks(doc: YMap, key: str, field_name: str) -> tuple[str, ...]:
    value = doc.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise SourceError(value_where(doc, key), field_name, "expected a list of networks (CIDR)")
    out = []
    for index, net in enumerate(value):
        try:
            parsed = ipaddress.ip_network(str(net), strict=False)
        except ValueError:
            raise SourceError(
                item_where(value, index) or value_where(doc, key),
                f"{field_name}[{index}]",
                f"{net!r} is not a network (e.g. 10.0.0.0/8 or 2001:db8::/32)",
            ) from None
        # An IPv4-mapped network (::ffff:127.0.0.3/128) is kept in its IPv4 form: clients
        # are matched by their IPv4 address, so the mapped form would never match.
        unmapped = unmap_network(parsed)
        out.append(str(unmapped) if unmapped is not parsed else str(net))
    return tuple(out)


def unmap_network(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``net`` with an IPv4-mapped IPv6 network (``::ffff:0:0/96`` or inside it) given as
    the IPv4 network it stands for; any other network unchanged."""
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


def read_one_address(doc: YMap, key: str, field_name: str) -> Listen | None:
    value = doc.get(key)
    if value is None:
        return None
    try:
        return parse_listen(str(value))
    except ValueError as exc:
        raise SourceError(value_where(doc, key), field_name, str(exc)) from None


def read_host_names(admin: YMap) -> tuple[str, ...]:
    """``admin.allowed_hosts``: host names or addresses, without port."""
    value = admin.get("allowed_hosts", [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(
        isinstance(v, str) and v.strip() and not any(c in v for c in " /@") for v in value
    ):
        raise SourceError(
            value_where(admin, "allowed_hosts"),
            "admin.allowed_hosts",
            "expected a list of host names or addresses (like resolver.example.org)",
        )
    return tuple(v.strip().lower().rstrip(".") for v in value)
